//! `coordinator`: the transaction coordinator of a tandem cluster.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use tandem::domain::Id;
use tandem::tls::TlsFlags;
use tandem::trust::Role;
use tandem_coordinator::core::{CommitProtocol, OnePhaseCommit};
use tandem_coordinator::directory::Shard;
use tandem_coordinator::node::{Node, NodeConfig};

/// A tandem coordinator: runs transfers over the participants with
/// two-phase commit (presumed abort) and a durable decision log, or as
/// orchestrated sagas with a saga log. Prints `listening on ADDR` on stdout
/// once it serves.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to serve gRPC on (port 0: the kernel picks one).
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// Directory of the decision log (RocksDB); created if missing, reused on
    /// restart to finish logged commits.
    #[arg(long)]
    data_dir: PathBuf,
    /// This coordinator's id; participants must be started with it
    /// (--coordinator ID=URL). At most 24 characters.
    #[arg(long, default_value = "c1")]
    node_id: String,
    /// A participant and the accounts it owns, as NAME=URL@FIRST..END (END
    /// exclusive), for example p1=https://127.0.0.1:7101@0..1000. Repeat for
    /// each participant; ranges may not overlap. Only these participants (by
    /// the name in their certificate) may ask for decisions here.
    #[arg(long = "participant", value_name = "NAME=URL@FIRST..END", required = true)]
    participants: Vec<String>,
    /// A participant that has not voted within this bound makes the
    /// transaction abort.
    #[arg(long, default_value_t = 1_000)]
    prepare_timeout_ms: u64,
    /// Deadline of each COMMIT, ABORT and balance read sent to a participant
    /// (COMMITs are redelivered until acknowledged).
    #[arg(long, default_value_t = 1_000)]
    call_timeout_ms: u64,
    /// Gone: audits no longer wait for commits, nor hold them up.
    #[arg(long, hide = true)]
    audit_timeout_ms: Option<String>,
    /// Most transactions in flight at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 10_000)]
    active_max: usize,
    /// How long an idempotency key's result (and a finished transaction's
    /// status) is kept at least, from when it was written, by this
    /// machine's wall clock: a retry within it gets the first answer (or
    /// FAILED_PRECONDITION if it asks for something else); past it, the key
    /// is a new request. A duration: 24h, 90m, 3600s, 500ms. Keys are never
    /// dropped because of their number; their records are deleted from
    /// disk once past it.
    #[arg(long, default_value = "24h", value_parser = tandem::clock::parse_duration_ms, value_name = "DURATION")]
    idempotency_retention: u64,
    /// Gone: idempotency keys are kept for a time (--idempotency-retention),
    /// never up to a count.
    #[arg(long, hide = true)]
    finished_retained_max: Option<String>,
    /// Threads of the async runtime (default: one per core). A local cluster
    /// runs every node on one machine and gives each one thread.
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Attempts of an orchestrated saga's debit or credit before its
    /// transient failures count as a failure (then the saga compensates).
    /// Compensations retry until the participant answers.
    #[arg(long, default_value_t = 8)]
    saga_step_attempts: u32,
    /// How long an orchestrated saga's steps are retried (the forward
    /// recovery of a credit included) before it compensates. Counted from
    /// the saga's first step; a restarted coordinator starts it again.
    /// Compensations are retried until they succeed
    #[arg(long, default_value_t = 30_000)]
    saga_deadline_ms: u64,
    /// Which transactions whose legs all live on one participant are
    /// committed in one phase: one call, which the participant applies and
    /// makes durable in one write, and no decision record here. auto: those
    /// without an idempotency key, and keyed ones too under classic 2PC
    /// (a keyed one logs an intent first: two fsyncs in a row, where
    /// parallel commit takes one fsync's time). always: keyed ones too.
    /// off: none, every transaction by --commit-protocol, for a comparison
    /// (true and false are read as always and off)
    #[arg(long, value_enum, default_value_t = OnePhaseArg::Auto)]
    one_phase_commit: OnePhaseArg,
    /// How a transaction over several participants is committed. parallel:
    /// the participants' set and legs are logged (fsynced) while the
    /// prepares run, and the transaction is committed as soon as that record
    /// and every prepare are durable: the client waits for one fsync's time,
    /// not two; an abort is logged before its client hears it. classic: the
    /// decision is logged after every vote is in, then the client hears it.
    /// Both recover every transaction to the outcome its client heard (see
    /// coordinator/src/core.rs)
    #[arg(long, value_enum, default_value_t = CommitProtocolArg::Parallel)]
    commit_protocol: CommitProtocolArg,
    /// Log filter: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Mutual TLS: the certificate names this node tandem://coordinator/ID.
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

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CommitProtocolArg {
    Parallel,
    Classic,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum OnePhaseArg {
    Auto,
    #[value(alias = "true")]
    Always,
    #[value(alias = "false")]
    Off,
}

fn main() -> std::process::ExitCode {
    let args: Args = tandem::config::parse("coordinator");
    if args.audit_timeout_ms.is_some() {
        eprintln!(
            "coordinator: --audit-timeout-ms is gone: an audit no longer waits for commits in flight nor holds up new ones (it counts the decided ones it finds half applied)"
        );
        return std::process::ExitCode::FAILURE;
    }
    if args.finished_retained_max.is_some() {
        eprintln!(
            "coordinator: --finished-retained-max is gone: idempotency keys and finished records are kept for a time, --idempotency-retention (default 24h), never up to a count"
        );
        return std::process::ExitCode::FAILURE;
    }
    let (worker_threads, log_level, node_id, trace) =
        (args.worker_threads, args.log_level.clone(), args.node_id.clone(), args.trace.clone());
    tandem::server::run_node("coordinator", worker_threads, &log_level, &node_id, &trace, run(args))
}

async fn run(args: Args) -> Result<(), String> {
    let shards =
        args.participants.iter().map(|p| Shard::parse(p)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    let node_id = Id::parse("node id", &args.node_id).map_err(|e| e.to_string())?;
    args.store.apply().map_err(|e| e.to_string())?;
    let security = args.tls.security().map_err(|e| e.to_string())?;
    security.check_node(Role::Coordinator, node_id.as_str()).map_err(|e| e.to_string())?;
    let (node, recovered) = Node::open(NodeConfig {
        node_id: node_id.clone(),
        disk: tandem::store::Disk::Path(args.data_dir),
        shards,
        prepare_timeout_ms: args.prepare_timeout_ms,
        call_timeout_ms: args.call_timeout_ms,
        active_max: args.active_max,
        idempotency_retention_ms: args.idempotency_retention,
        wall_clock: tandem::clock::WallClock::System,
        incarnation_seed: None,
        saga_step_attempts: args.saga_step_attempts.max(1),
        saga_deadline_ms: args.saga_deadline_ms,
        security: security.clone(),
        network: tandem::net::Network::Tcp,
        one_phase_commit: match args.one_phase_commit {
            OnePhaseArg::Auto => OnePhaseCommit::Auto,
            OnePhaseArg::Always => OnePhaseCommit::Always,
            OnePhaseArg::Off => OnePhaseCommit::Off,
        },
        commit_protocol: match args.commit_protocol {
            CommitProtocolArg::Parallel => CommitProtocol::Parallel,
            CommitProtocolArg::Classic => CommitProtocol::Classic,
        },
    })
    .await
    .map_err(|e| e.to_string())?;
    let observed = node.clone();
    tandem::metrics::serve_if_asked(&args.http, &security, std::sync::Arc::new(move || observed.observe_gauges()))
        .await
        .map_err(|e| e.to_string())?;
    let (listener, addr) =
        tandem::server::bind(args.listen).await.map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(node = %node_id, %addr, "coordinator serving");
    println!("listening on {addr}");
    node.run(listener, recovered, tandem::server::shutdown_signal()).await.map_err(|e| e.to_string())
}

/// mimalloc: fewer cycles per allocation than glibc malloc on the gRPC path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
