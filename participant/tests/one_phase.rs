//! One-phase commits over gRPC, on RocksDB in a temporary directory: the
//! handlers, the batch and what a restart reads back. A transaction on this
//! participant's accounts is one call; the duplicate of a committed or
//! refused one, after a restart too, gets the first answer and moves
//! nothing; a malformed request in a batch is refused alone; ids of the
//! other protocol are refused.

use std::time::{Duration, Instant};
use tandem::domain::Id;
use tandem::pb;
use tandem::pb::participant_client::ParticipantClient;
use tandem::tls::Security;
use tandem_participant::node::{Node, NodeConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

fn config(dir: &std::path::Path) -> NodeConfig {
    NodeConfig {
        node_id: id("p1"),
        disk: tandem::store::Disk::Path(dir.to_path_buf()),
        // Never asked here: a one-phase transaction is never in doubt.
        coordinators: vec![(id("c1"), "http://127.0.0.1:9".into())],
        peers: Vec::new(),
        in_doubt_after_ms: 60_000,
        finished_retention_ms: 60_000,
        idempotency_retention_ms: tandem_participant::saga::IDEMPOTENCY_RETENTION_DEFAULT_MS,
        owned_accounts: None,
        store_free_min_bytes: 0,
        security: Security::Insecure,
        network: tandem::net::Network::Tcp,
        wall_clock: tandem::clock::WallClock::System,
    }
}

struct Running {
    client: ParticipantClient<Channel>,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

async fn start(dir: &std::path::Path) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // A node stopped in this process lets go of its store once its last
    // task has ended.
    let deadline = Instant::now() + Duration::from_secs(10);
    let node = loop {
        match Node::open(config(dir)) {
            Ok(node) => break node,
            Err(error) if error.to_string().contains("lock") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the node does not open its store: {error}"),
        }
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        node.run(listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let client =
        ParticipantClient::new(tandem::server::channel(&format!("http://{addr}"), &Security::Insecure).unwrap());
    Running { client, stop, done }
}

async fn stop(running: Running) {
    let _ = running.stop.send(());
    running.done.await.unwrap();
}

fn request(txn: &str, from: u64, to: u64, amount: i64, position: u64) -> pb::OnePhaseRequest {
    pb::OnePhaseRequest {
        txn_id: txn.into(),
        coordinator_id: "c1".into(),
        legs: vec![pb::Leg { account: from, amount: -amount }, pb::Leg { account: to, amount }],
        coordinator_incarnation: 0xC1,
        position,
        low_watermark: 1,
        idempotency_key: String::new(),
        trace_parent: String::new(),
    }
}

async fn posted(client: &mut ParticipantClient<Channel>, account: u64) -> i64 {
    client.get_balance(pb::GetBalanceRequest { account }).await.unwrap().into_inner().posted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_phase_commits_are_one_call_each_and_a_duplicate_after_a_restart_gets_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut p1 = start(dir.path()).await;
    let open = pb::OpenAccountsRequest {
        accounts: vec![
            pb::NewAccount { account: 1, initial_balance: 100 },
            pb::NewAccount { account: 2, initial_balance: 0 },
        ],
    };
    p1.client.open_accounts(open).await.unwrap();

    let answer = p1.client.commit_one_phase(request("t1", 1, 2, 30, 1)).await.unwrap().into_inner();
    assert_eq!((answer.outcome, answer.duplicate), (pb::OnePhaseOutcome::Committed as i32, false), "{answer:?}");
    let batch = pb::OnePhaseBatchRequest {
        requests: vec![
            request("t2", 1, 2, 500, 2),
            request("not an id", 1, 2, 5, 3),
            request("t3", 2, 1, 10, 4),
            request("t1", 1, 2, 30, 1),
        ],
    };
    let answers = p1.client.commit_one_phase_batch(batch.clone()).await.unwrap().into_inner().answers;
    assert_eq!(answers.len(), 4);
    let refused = |a: &pb::OnePhaseResponse, refusal: pb::Refusal| {
        a.outcome == pb::OnePhaseOutcome::Refused as i32 && a.refusal == refusal as i32
    };
    assert!(refused(&answers[0], pb::Refusal::InsufficientFunds), "{:?}", answers[0]);
    assert!(
        refused(&answers[1], pb::Refusal::InvalidRequest) && answers[1].reason.contains("txn_id"),
        "{:?}",
        answers[1]
    );
    assert_eq!(answers[2].outcome, pb::OnePhaseOutcome::Committed as i32, "{:?}", answers[2]);
    assert!(answers[3].duplicate && answers[3].outcome == pb::OnePhaseOutcome::Committed as i32);
    assert_eq!((posted(&mut p1.client, 1).await, posted(&mut p1.client, 2).await), (80, 20));
    // The other protocol's calls for a one-phase id are refused.
    let prepare = pb::PrepareRequest {
        txn_id: "t1".into(),
        coordinator_id: "c1".into(),
        legs: vec![pb::Leg { account: 1, amount: -30 }],
        ..Default::default()
    };
    let vote = p1.client.prepare(prepare).await.unwrap().into_inner();
    assert_eq!((vote.vote, vote.refusal), (pb::Vote::No as i32, pb::Refusal::ProtocolMismatch as i32), "{vote:?}");
    let commit = p1.client.commit(pb::DecisionRequest { txn_id: "t1".into(), ..Default::default() }).await;
    assert_eq!(commit.unwrap_err().code(), Code::FailedPrecondition);
    let record = p1.client.lookup_transaction(pb::LookupTransactionRequest { txn_id: "t2".into() }).await;
    let record = record.unwrap().into_inner();
    assert_eq!((record.state, record.one_phase), (pb::RecordState::Aborted as i32, true), "{record:?}");
    // Bounds: an empty batch is refused as a whole.
    let empty = p1.client.commit_one_phase_batch(pb::OnePhaseBatchRequest { requests: vec![] }).await;
    assert_eq!(empty.unwrap_err().code(), Code::InvalidArgument);

    // Restarted: every duplicate gets its first answer and moves nothing.
    stop(p1).await;
    let mut p1 = start(dir.path()).await;
    let again = p1.client.commit_one_phase_batch(batch).await.unwrap().into_inner().answers;
    assert!(again[0].duplicate && refused(&again[0], pb::Refusal::InsufficientFunds), "{:?}", again[0]);
    assert_eq!(again[0].reason, answers[0].reason, "the first refusal's reason");
    assert!(again[2].duplicate && again[3].duplicate);
    assert_eq!((posted(&mut p1.client, 1).await, posted(&mut p1.client, 2).await), (80, 20));
    stop(p1).await;
}
