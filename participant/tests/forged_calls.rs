//! In-process gRPC tests of the forged calls of issue 9 that used to stop a
//! participant or corrupt its records: two real participants (their
//! RocksDB in temporary directories, their relays running) park a
//! choreographed transfer in suspense; then the forged calls arrive over
//! gRPC, each is refused with a clear status, the node keeps serving, the
//! operator's resolution still works, and a restart reads every record.

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

struct Running {
    client: ParticipantClient<Channel>,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

fn config(name: &str, dir: &std::path::Path, peers: Vec<(Id, String)>) -> NodeConfig {
    NodeConfig {
        node_id: id(name),
        disk: tandem::store::Disk::Path(dir.to_path_buf()),
        // Never asked in these tests (nothing stays in doubt).
        coordinators: vec![(id("c1"), "http://127.0.0.1:9".into())],
        peers,
        in_doubt_after_ms: 60_000,
        finished_retention_ms: 60_000,
        idempotency_retention_ms: tandem_participant::saga::IDEMPOTENCY_RETENTION_DEFAULT_MS,
        owned_accounts: None,
        store_free_min_bytes: 0,
        // Plaintext, every caller trusted: each forged call must reach the
        // handler it targets, as it would from a configured coordinator or
        // peer gone wrong. The trust layer, which refuses most of them from
        // anyone else, is tested in tests/trust.rs.
        security: Security::Insecure,
        network: tandem::net::Network::Tcp,
        wall_clock: tandem::clock::WallClock::System,
    }
}

async fn start(config: NodeConfig, listener: TcpListener) -> Running {
    let addr = listener.local_addr().unwrap();
    // A node stopped in this process lets go of its store once its last
    // task has ended (a real restart is a new process).
    let deadline = Instant::now() + Duration::from_secs(10);
    let node = loop {
        match Node::open(config.clone()) {
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

async fn balance(client: &mut ParticipantClient<Channel>, account: u64) -> pb::Balance {
    client.get_balance(pb::GetBalanceRequest { account }).await.unwrap().into_inner()
}

async fn suspense(client: &mut ParticipantClient<Channel>) -> i64 {
    client
        .read_balances(pb::ReadBalancesRequest { include_accounts: false, include_prepared: false })
        .await
        .unwrap()
        .into_inner()
        .suspense
}

async fn set_closed(client: &mut ParticipantClient<Channel>, account: u64, closed: bool) {
    client.set_account_closed(pb::SetAccountClosedRequest { account, closed }).await.unwrap();
}

fn event(kind: pb::EventKind, reason: String, amount: i64) -> pb::ChoreographyEvent {
    pb::ChoreographyEvent {
        version: 1,
        event_id: "forged:1".into(),
        kind: kind as i32,
        saga_id: "forged".into(),
        from_account: 1,
        to_account: 2,
        amount,
        source_participant: "p2".into(),
        target_participant: "p1".into(),
        reason,
        sequence: 0,
        trace_parent: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_calls_are_refused_and_the_node_keeps_serving_and_restarts() {
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (l1, l2) = (TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap());
    let url = |l: &TcpListener| format!("http://{}", l.local_addr().unwrap());
    let (url1, url2) = (url(&l1), url(&l2));
    let l1_addr = l1.local_addr().unwrap();
    let mut p1 = start(config("p1", dir1.path(), vec![(id("p2"), url2.clone())]), l1).await;
    let open = pb::OpenAccountsRequest { accounts: vec![pb::NewAccount { account: 1, initial_balance: 100 }] };
    p1.client.open_accounts(open).await.unwrap();

    // A dead letter: p1 debits 40 for p2, whose answer waits until p2
    // serves; meanwhile account 1 closes, so when p2 rejects the credit
    // (it has no account 2), the refund fails: 40 parked in suspense.
    let started = p1
        .client
        .start_transfer(pb::StartTransferRequest {
            saga_id: "t1".into(),
            from_account: 1,
            to_account: 2,
            amount: 40,
            target_participant: "p2".into(),
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.state, pb::TransferState::Debited as i32, "{started:?}");
    set_closed(&mut p1.client, 1, true).await;
    let p2 = start(config("p2", dir2.path(), vec![(id("p1"), url1.clone())]), l2).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while suspense(&mut p1.client).await != 40 {
        assert!(Instant::now() < deadline, "the transfer was not parked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set_closed(&mut p1.client, 1, false).await;

    // 1. A release for a saga that parked nothing here: refused, takes nothing.
    let release = p1
        .client
        .saga_step(pb::SagaStepRequest {
            saga_id: "made-up".into(),
            kind: pb::StepKind::Release as i32,
            phase: pb::StepPhase::Action as i32,
            account: 1,
            amount: 40,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(release.outcome, pb::StepOutcome::Refused as i32, "{release:?}");
    assert_eq!(suspense(&mut p1.client).await, 40);

    // 2. Reasons over the limit (one over 64 KiB used to be stored with a
    // truncated length): INVALID_ARGUMENT, nothing stored.
    for len in [tandem::domain::REASON_LEN_MAX + 1, 70_000] {
        let refused = p1.client.deliver_event(event(pb::EventKind::TransferRejected, "r".repeat(len), 40)).await;
        assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);
    }
    // 3. A negative amount, a malformed event id.
    let refused = p1.client.deliver_event(event(pb::EventKind::TransferDebited, String::new(), -5)).await;
    assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);
    let mut bad_id = event(pb::EventKind::TransferDebited, String::new(), 5);
    bad_id.event_id = "has space".into();
    assert_eq!(p1.client.deliver_event(bad_id).await.unwrap_err().code(), Code::InvalidArgument);
    // 4. An oversized id.
    let long_id = pb::GetTransferStatusRequest { saga_id: "x".repeat(65) };
    assert_eq!(p1.client.get_transfer_status(long_id).await.unwrap_err().code(), Code::InvalidArgument);

    // The node still serves, and the operator's resolution works (it used
    // to hit an assert under the core lock, poisoning it for every call).
    assert_eq!(balance(&mut p1.client, 1).await.posted, 60);
    let resolved = p1
        .client
        .resolve_parked_transfer(pb::ResolveParkedTransferRequest {
            saga_id: "t1".into(),
            to_account: 0,
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.state, pb::TransferState::Resolved as i32);
    assert_eq!((balance(&mut p1.client, 1).await.posted, suspense(&mut p1.client).await), (100, 0));

    // A restart reads every record it wrote.
    stop(p1).await;
    stop(p2).await;
    let l1 = TcpListener::bind(l1_addr).await.unwrap();
    let mut p1 = start(config("p1", dir1.path(), vec![(id("p2"), url2)]), l1).await;
    assert_eq!((balance(&mut p1.client, 1).await.posted, suspense(&mut p1.client).await), (100, 0));
    stop(p1).await;
}

#[test]
fn a_corrupt_record_stops_the_node_from_starting_with_a_message_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let refused = runtime.block_on(async {
        let store = tandem::store::Store::open(dir.path()).unwrap();
        // A transfer record cut short, as a reason over 64 KiB used to leave one.
        store.write(vec![tandem::store::Op::Put(b"c/t1".to_vec(), vec![5, 0xff, 0xff, b'r'])]).await.unwrap();
        store.close();
        drop(store);
        Node::open(config("p1", dir.path(), vec![])).err().expect("the node does not start")
    });
    let message = refused.to_string();
    assert!(message.contains("c/t1") && message.contains("corrupt"), "{message}");
}
