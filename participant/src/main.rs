//! `participant`: one bank shard of a tandem cluster.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use tandem::domain::Id;
use tandem::tls::TlsFlags;
use tandem::trust::Role;
use tandem_participant::node::{Node, NodeConfig};

/// A tandem participant: holds the accounts of one shard, takes part in
/// two-phase commit, applies saga steps, and runs choreographed transfers
/// with its peers (outbox and inbox). Prints `listening on ADDR` on stdout
/// once it serves.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on (port 0: the kernel picks one).
    #[arg(long, default_value = "127.0.0.1:7101")]
    listen: SocketAddr,
    /// Directory of this node's RocksDB; created if missing, reused on restart.
    #[arg(long)]
    data_dir: PathBuf,
    /// This participant's id, as the coordinator's directory names it.
    #[arg(long, default_value = "p1")]
    node_id: String,
    /// A coordinator this node takes transactions from, as ID=URL (for
    /// example c1=https://127.0.0.1:7100); repeat for several. In-doubt
    /// transactions are resolved by asking it. Only these coordinators (by
    /// the name in their certificate) may prepare, commit, abort, send saga
    /// steps and read balances here.
    #[arg(long = "coordinator", value_name = "ID=URL", required = true)]
    coordinators: Vec<String>,
    /// Another participant, as NAME=URL, to which choreographed sagas send
    /// their events; repeat for each (this node itself may be listed). Only
    /// these peers (by the name in their certificate) may deliver events
    /// here.
    #[arg(long = "peer", value_name = "NAME=URL")]
    peers: Vec<String>,
    /// A prepared transaction with no decision after this long is in doubt,
    /// and this node starts asking its coordinator.
    #[arg(long, default_value_t = 500)]
    in_doubt_after_ms: u64,
    /// How long finished transactions are remembered (duplicate detection).
    #[arg(long, default_value_t = 300_000)]
    finished_retention_ms: u64,
    /// How long a choreographed transfer's id (StartTransfer's saga_id) is
    /// remembered after the transfer ends: a retry within it gets that
    /// transfer, the same id with another transfer is refused; after it,
    /// the id starts a new transfer. A number with a unit: 24h, 90m,
    /// 3600s, 500ms.
    #[arg(long, default_value = "24h", value_name = "DURATION", value_parser = tandem::clock::parse_duration_ms)]
    idempotency_retention: u64,
    /// The account ids this node owns, FIRST..END (END excluded), as in the
    /// coordinator's directory; OpenAccounts refuses others. Default: any.
    #[arg(long, value_name = "FIRST..END", value_parser = tandem::domain::parse_account_range)]
    accounts: Option<std::ops::Range<u64>>,
    /// After its store failed (a full disk, a failed fsync), the node stops
    /// serving, and reopens the store and recovers as a restart would once
    /// the data directory's filesystem has this many MiB free.
    #[arg(long, default_value_t = 64)]
    store_free_min_mb: u64,
    /// Write an fsynced record (a prepare, a one-phase commit) on the
    /// thread that handles the call when the store is idle, instead of
    /// handing it to the store's writer thread and waiting to be woken:
    /// one transaction at a time, two thread wake-ups less a write. Under
    /// load the writer thread groups writes as before. false: always hand
    /// writes to the writer.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    write_in_place: bool,
    /// Threads of the async runtime (default: one per core). A local cluster
    /// runs every node on one machine and gives each one thread.
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Log filter: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Mutual TLS: the certificate names this node tandem://participant/ID.
    #[command(flatten)]
    tls: TlsFlags,
    #[command(flatten)]
    http: tandem::metrics::HttpFlags,
    #[command(flatten)]
    store: tandem::store::StoreFlags,
    /// --otlp-endpoint (see tandem::trace).
    #[command(flatten)]
    trace: tandem::trace::TraceFlags,
    /// --config FILE and --print-config (see tandem::config).
    #[command(flatten)]
    config: tandem::config::ConfigFlags,
}

fn parse_peer(text: &str) -> Result<(Id, String), String> {
    let (id, url) = text.split_once('=').ok_or_else(|| format!("{text:?} is not ID=URL"))?;
    Ok((Id::parse("node id", id).map_err(|e| e.to_string())?, url.to_string()))
}

fn main() -> std::process::ExitCode {
    let args: Args = tandem::config::parse("participant");
    let (worker_threads, log_level, node_id, trace) =
        (args.worker_threads, args.log_level.clone(), args.node_id.clone(), args.trace.clone());
    tandem::server::run_node("participant", worker_threads, &log_level, &node_id, &trace, run(args))
}

async fn run(args: Args) -> Result<(), String> {
    let node_id = Id::parse("node id", &args.node_id).map_err(|e| e.to_string())?;
    args.store.apply().map_err(|e| e.to_string())?;
    tandem::store::set_write_in_place(args.write_in_place);
    let security = args.tls.security().map_err(|e| e.to_string())?;
    security.check_node(Role::Participant, node_id.as_str()).map_err(|e| e.to_string())?;
    let coordinators = args.coordinators.iter().map(|c| parse_peer(c)).collect::<Result<Vec<_>, _>>()?;
    let peers = args.peers.iter().map(|c| parse_peer(c)).collect::<Result<Vec<_>, _>>()?;
    let node = Node::open(NodeConfig {
        node_id: node_id.clone(),
        disk: tandem::store::Disk::Path(args.data_dir),
        coordinators,
        peers,
        in_doubt_after_ms: args.in_doubt_after_ms,
        finished_retention_ms: args.finished_retention_ms,
        idempotency_retention_ms: args.idempotency_retention,
        owned_accounts: args.accounts,
        store_free_min_bytes: args.store_free_min_mb.saturating_mul(1 << 20),
        security: security.clone(),
        network: tandem::net::Network::Tcp,
        wall_clock: tandem::clock::WallClock::System,
    })
    .map_err(|e| e.to_string())?;
    let observed = node.clone();
    tandem::metrics::serve_if_asked(&args.http, &security, std::sync::Arc::new(move || observed.observe_gauges()))
        .await
        .map_err(|e| e.to_string())?;
    let (listener, addr) =
        tandem::server::bind(args.listen).await.map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(node = %node_id, %addr, "participant serving");
    println!("listening on {addr}");
    node.run(listener, tandem::server::shutdown_signal()).await.map_err(|e| e.to_string())
}

/// mimalloc: fewer cycles per allocation than glibc malloc on the gRPC path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
