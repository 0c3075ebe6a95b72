//! In-process tests of the outbox relay: two real participant nodes, each
//! serving gRPC over mutual TLS on a loopback port with RocksDB in a
//! temporary directory.

use std::time::{Duration, Instant};
use tandem::domain::Id;
use tandem::local_ca::LocalCa;
use tandem::pb;
use tandem::pb::participant_server::Participant;
use tandem::trust::Role;
use tandem_participant::node::{Node, NodeConfig};
use tokio::sync::oneshot;
use tonic::Request;

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

/// Node `name`'s configuration, over mutual TLS with a certificate of `ca`.
fn config(ca: &LocalCa, name: &str, dir: &std::path::Path, peers: Vec<(Id, String)>) -> NodeConfig {
    NodeConfig {
        node_id: id(name),
        disk: tandem::store::Disk::Path(dir.join(name)),
        // No coordinator runs: these tests use choreographed transfers only.
        coordinators: vec![(id("c1"), "https://127.0.0.1:1".into())],
        peers,
        in_doubt_after_ms: 500,
        finished_retention_ms: 300_000,
        owned_accounts: None,
        store_free_min_bytes: 0,
        security: ca.security(Role::Participant, name).unwrap(),
        network: tandem::net::Network::Tcp,
    }
}

/// A loopback address nothing listens on (bound, then released).
fn closed_address() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

async fn serve(node: &Node, listener: tokio::net::TcpListener) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(node.clone().run(listener, async move {
        let _ = stopped.await;
    }));
    stop
}

async fn open_account(node: &Node, account: u64, balance: i64) {
    Participant::open_accounts(
        node,
        Request::new(pb::OpenAccountsRequest { accounts: vec![pb::NewAccount { account, initial_balance: balance }] }),
    )
    .await
    .unwrap();
}

async fn posted(node: &Node, account: u64) -> i64 {
    Participant::get_balance(node, Request::new(pb::GetBalanceRequest { account })).await.unwrap().into_inner().posted
}

/// The target of a choreographed transfer applies the credit in a call
/// whose client gives up before the answer (the source's delivery timed
/// out: issue 8, a target paused across the relay's timeout). The reply
/// event it wrote must still be relayed, with no other traffic to carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_written_by_a_call_whose_client_gave_up_is_still_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::new("relay test CA").unwrap();
    let (source_listener, source_addr) = tandem::server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (target_listener, _) = tandem::server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    // The source cannot reach the target by itself: this test delivers its
    // event by hand, as a relay whose call timed out would have.
    let source =
        Node::open(config(&ca, "p1", dir.path(), vec![(id("p2"), format!("https://{}", closed_address()))])).unwrap();
    let target = Node::open(config(&ca, "p2", dir.path(), vec![(id("p1"), format!("https://{source_addr}"))])).unwrap();
    let stop_source = serve(&source, source_listener).await;
    let stop_target = serve(&target, target_listener).await;
    open_account(&source, 1, 100).await;
    open_account(&target, 2, 0).await;

    let started = Participant::start_transfer(
        &source,
        Request::new(pb::StartTransferRequest {
            saga_id: "s1".into(),
            from_account: 1,
            to_account: 2,
            amount: 10,
            target_participant: "p2".into(),
            wait_ms: 0,
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(started.state, pb::TransferState::Debited as i32);

    let debited = pb::ChoreographyEvent {
        version: 1,
        event_id: "s1:debited".into(),
        kind: pb::EventKind::TransferDebited as i32,
        saga_id: "s1".into(),
        from_account: 1,
        to_account: 2,
        amount: 10,
        source_participant: "p1".into(),
        target_participant: "p2".into(),
        reason: String::new(),
    };
    // Polled once (the credit and its reply are written and submitted to
    // the store), then dropped before the fsync completes: what tonic does
    // to a handler whose client cancelled the call.
    let call = Participant::deliver_events(&target, Request::new(pb::DeliverEventsRequest { events: vec![debited] }));
    let _ = tokio::time::timeout(Duration::ZERO, call).await;

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = Participant::get_transfer_status(
            &source,
            Request::new(pb::GetTransferStatusRequest { saga_id: "s1".into() }),
        )
        .await
        .unwrap()
        .into_inner();
        if status.state == pb::TransferState::Completed as i32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the target's reply was never relayed: the source still says {:?}",
            pb::TransferState::try_from(status.state)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(posted(&source, 1).await, 90);
    assert_eq!(posted(&target, 2).await, 10);
    let _ = stop_source.send(());
    let _ = stop_target.send(());
}
