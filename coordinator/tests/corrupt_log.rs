//! A coordinator whose decision log holds a record it cannot read does not
//! start, and says which record; it never panics (it used to, on a short
//! record, a bad generation record, or a participant the directory lost).

use tandem::domain::Id;
use tandem::store::{Op, Store};
use tandem_coordinator::directory::Shard;
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
        wall_clock: tandem::clock::WallClock::System,
        incarnation_seed: None,
        saga_step_attempts: 3,
        saga_deadline_ms: 1_000,
        security: tandem::tls::Security::Insecure,
        network: tandem::net::Network::Tcp,
        one_phase_commit: tandem_coordinator::core::OnePhaseCommit::Auto,
        commit_protocol: tandem_coordinator::core::CommitProtocol::Parallel,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_record_it_cannot_read_stops_the_coordinator_with_a_message_naming_it() {
    let valid_decision = {
        let record = tandem_coordinator::core::CommitRecord {
            participants: vec![Id::parse("id", "p1").unwrap()],
            idempotency_key: None,
            position: 0,
        };
        tandem_coordinator::log::encode_commit(&record).unwrap()
    };
    let unknown_participant = {
        let record = tandem_coordinator::core::CommitRecord {
            participants: vec![Id::parse("id", "p9").unwrap()],
            idempotency_key: None,
            position: 0,
        };
        tandem_coordinator::log::encode_commit(&record).unwrap()
    };
    for (key, value, named) in [
        (b"d/t1".to_vec(), valid_decision[..valid_decision.len() - 1].to_vec(), "d/t1"),
        (b"d/t1".to_vec(), [valid_decision.clone(), vec![0]].concat(), "d/t1"),
        (b"d/not an id".to_vec(), valid_decision.clone(), "d/not an id"),
        (b"d/t1".to_vec(), unknown_participant, "p9"),
        (b"m/generation".to_vec(), vec![1, 2, 3], "m/generation"),
        (b"s/s1".to_vec(), vec![2, 0], "s/s1"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.write(vec![Op::Put(key.clone(), value)]).await.unwrap();
        store.close();
        drop(store);
        let refused = Node::open(config(dir.path())).await.err().expect("the coordinator does not start");
        let message = refused.to_string();
        assert!(message.contains(named), "{}: {message}", String::from_utf8_lossy(&key));
    }
}
