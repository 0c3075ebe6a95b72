//! How long a participant takes to start serving with many finished
//! transaction records and 10,000 prepared ones on disk. A measurement, not
//! a test (it writes millions of records and reports times):
//!
//! `cargo run --release -p tandem-participant --example participant_startup -- 1000000`
//! (opens the store at a tenth of that, that, and three times that)
//!
//! The records are made by the participant's own core (stamped prepares and
//! commits whose watermark never passes them, so none is collected) and
//! written to RocksDB in batches; then `Node::open` reads the store back
//! and rebuilds the core, as a restart does.

use std::time::Instant;
use tandem::domain::{Id, Leg};
use tandem::store::Store;
use tandem_participant::core::{Config, Core, Stamp};
use tandem_participant::node::{Node, NodeConfig};

const PREPARED: u64 = 10_000;
const ACCOUNTS: u64 = 1_000;

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

fn node_config(dir: &std::path::Path) -> NodeConfig {
    NodeConfig {
        node_id: id("p1"),
        disk: tandem::store::Disk::Path(dir.to_path_buf()),
        coordinators: vec![(id("c1"), "http://127.0.0.1:9".into())],
        peers: Vec::new(),
        in_doubt_after_ms: 60_000,
        finished_retention_ms: 300_000,
        idempotency_retention_ms: tandem_participant::saga::IDEMPOTENCY_RETENTION_DEFAULT_MS,
        owned_accounts: None,
        store_free_min_bytes: 0,
        security: tandem::tls::Security::Insecure,
        network: tandem::net::Network::Tcp,
        wall_clock: tandem::clock::WallClock::System,
    }
}

fn core_config() -> Config {
    Config {
        node_id: id("p1"),
        coordinators: [id("c1")].into_iter().collect(),
        in_doubt_after_ms: 60_000,
        finished_retention_ms: 300_000,
        owned_accounts: None,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total: u64 = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let mut core = Core::new(core_config());
    let mut store = Store::open(dir.path()).unwrap();
    let accounts: Vec<(u64, i64)> = (0..ACCOUNTS).map(|a| (a, 1_000_000_000)).collect();
    store.write(core.open_accounts(&accounts).unwrap().ops).await.unwrap();
    let stamp = |position: u64| Stamp { incarnation: 0xC1, position, low_watermark: 1, idempotency_key: None };
    let legs = |n: u64| vec![Leg { account: n % ACCOUNTS, amount: -1 }, Leg { account: (n + 1) % ACCOUNTS, amount: 1 }];
    let mut position = 0u64;
    // The prepared ones first, so that every later total has them.
    let mut ops = Vec::new();
    for _ in 0..PREPARED {
        position += 1;
        let txn = id(&format!("c1-prepared-{position:012}"));
        let (_, effects) = core.prepare_stamped(txn, id("c1"), legs(position), stamp(position), 0).unwrap();
        ops.extend(effects.ops);
    }
    store.write(ops).await.unwrap();
    let mut finished = 0u64;
    let mut figures = Vec::new();
    for target in [total / 10, total, 3 * total] {
        while finished < target {
            let mut ops = Vec::new();
            for _ in 0..10_000.min(target - finished) {
                position += 1;
                finished += 1;
                let txn = id(&format!("c1-finished-{position:012}"));
                let (_, effects) =
                    core.prepare_stamped(txn.clone(), id("c1"), legs(position), stamp(position), 0).unwrap();
                ops.extend(effects.ops);
                ops.extend(core.commit(&txn, 1).unwrap().ops);
            }
            store.write(ops).await.unwrap();
        }
        // Where the time goes: reading every record, then rebuilding the
        // core from them.
        let started = Instant::now();
        let records = store.scan_prefix(b"").unwrap();
        let scan_ms = started.elapsed().as_secs_f64() * 1_000.0;
        let started = Instant::now();
        let recovered = Core::recover(core_config(), records, 1).unwrap();
        let recover_ms = started.elapsed().as_secs_f64() * 1_000.0;
        drop(recovered);
        println!(
            "  of which: reading the records {scan_ms:.0} ms, rebuilding the core {recover_ms:.0} ms (measured apart)"
        );
        store.close();
        drop(store);
        let started = Instant::now();
        let node = Node::open(node_config(dir.path())).unwrap();
        let ms = started.elapsed().as_secs_f64() * 1_000.0;
        node.close();
        drop(node);
        println!("{finished} finished and {PREPARED} prepared transactions: Node::open took {ms:.0} ms");
        figures.push((finished, ms));
        // Reopened for the next round's writes.
        store = Store::open(dir.path()).unwrap();
    }
    println!("{figures:?}");
}
