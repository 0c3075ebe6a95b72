//! How long a coordinator takes to open a log with many finished records
//! and idempotency keys: start-up reads only the meta records, the logged
//! decisions and the sagas, so it should not grow with them. A measurement,
//! not a test (it writes millions of records and reports times):
//!
//! `cargo run --release -p tandem-coordinator --example coordinator_startup -- 1000000`
//! (opens the log at a tenth of that, that, and three times that)

use std::time::Instant;
use tandem::domain::Id;
use tandem::store::{Op, Store};
use tandem_coordinator::directory::Shard;
use tandem_coordinator::log;
use tandem_coordinator::node::{Node, NodeConfig};

fn config(dir: &std::path::Path) -> NodeConfig {
    NodeConfig {
        node_id: Id::parse("id", "c1").unwrap(),
        disk: tandem::store::Disk::Path(dir.to_path_buf()),
        shards: vec![Shard::parse("p1=http://127.0.0.1:9@0..100").unwrap()],
        prepare_timeout_ms: 1_000,
        call_timeout_ms: 1_000,
        active_max: 10,
        idempotency_retention_ms: 24 * 3_600_000,
        saga_step_attempts: 3,
        saga_deadline_ms: 1_000,
        security: tandem::tls::Security::Insecure,
        network: tandem::net::Network::Tcp,
        one_phase_commit: tandem_coordinator::core::OnePhaseCommit::Auto,
        commit_protocol: tandem_coordinator::core::CommitProtocol::Parallel,
        wall_clock: tandem::clock::WallClock::System,
        incarnation_seed: None,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total: u64 = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let (node, _) = Node::open(config(dir.path())).await.unwrap();
    let incarnation = node.incarnation();
    node.close();
    drop(node);
    let mut opened_ms = Vec::new();
    let mut written = 0u64;
    for target in [total / 10, total, 3 * total] {
        let store = Store::open(dir.path()).unwrap();
        while written < target {
            let mut ops = Vec::with_capacity(3 * 10_000);
            for _ in 0..10_000.min(target - written) {
                written += 1;
                let txn = log::txn_id(&Id::parse("id", "c1").unwrap(), incarnation, 1, written).unwrap();
                let key = Id::parse("key", &format!("key-{written}")).unwrap();
                let expires_ms = 4_000_000_000_000 + written;
                let outcome = tandem_coordinator::core::Outcome::Committed;
                let keyed = log::KeyedResult { txn: txn.clone(), outcome, fingerprint: written, expires_ms };
                let finished = log::Finished {
                    outcome: log::FinishedAs::Committed,
                    idempotency_key: Some(key.clone()),
                    expires_ms,
                    resolution: String::new(),
                };
                let (k, f) = (log::key(log::KEY_PREFIX, &key), log::key(log::FINISHED_PREFIX, &txn));
                ops.push(Op::Put(log::expiry_key(expires_ms, &k), Vec::new()));
                ops.push(Op::Put(log::expiry_key(expires_ms, &f), Vec::new()));
                ops.push(Op::Put(k, log::encode_keyed(&keyed).unwrap()));
                ops.push(Op::Put(f, log::encode_finished(&finished).unwrap()));
            }
            store.write(ops).await.unwrap();
        }
        store.close();
        drop(store);
        let started = Instant::now();
        let (node, recovered) = Node::open(config(dir.path())).await.unwrap();
        let ms = started.elapsed().as_secs_f64() * 1_000.0;
        assert!(recovered.commits.is_empty() && recovered.sagas.is_empty());
        assert_eq!(node.incarnation(), incarnation);
        node.close();
        drop(node);
        println!("{written} finished transactions with keys (4 records each): Node::open took {ms:.1} ms");
        opened_ms.push((written, ms));
    }
    println!("{opened_ms:?}");
}
