//! In-process tests of the outbox relay: two real participant nodes, each
//! serving gRPC over mutual TLS on a loopback port with RocksDB in a
//! temporary directory.

use std::time::{Duration, Instant};
use tandem::domain::Id;
use tandem::local_ca::LocalCa;
use tandem::pb;
use tandem::pb::participant_server::Participant;
use tandem::proxy::LinkProxy;
use tandem::trust::Role;
use tandem_participant::node::{Node, NodeConfig, DELIVERY_TIMEOUT_MS, RELAY_BACKOFF_MAX_MS, RELAY_BATCH_MAX};
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
        idempotency_retention_ms: tandem_participant::saga::IDEMPOTENCY_RETENTION_DEFAULT_MS,
        owned_accounts: None,
        store_free_min_bytes: 0,
        security: ca.security(Role::Participant, name).unwrap(),
        network: tandem::net::Network::Tcp,
        wall_clock: tandem::clock::WallClock::System,
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

async fn start_transfer(node: &Node, saga: &str, to_account: u64, target: &str, wait_ms: u32) -> pb::TransferStatus {
    let request = pb::StartTransferRequest {
        saga_id: saga.into(),
        from_account: 1,
        to_account,
        amount: 1,
        target_participant: target.into(),
        wait_ms,
    };
    Participant::start_transfer(node, Request::new(request)).await.unwrap().into_inner()
}

async fn read_balances(node: &Node) -> pb::ReadBalancesResponse {
    Participant::read_balances(
        node,
        Request::new(pb::ReadBalancesRequest { include_accounts: false, include_prepared: false }),
    )
    .await
    .unwrap()
    .into_inner()
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
        // The first event p1 numbered for p2.
        sequence: 1,
        trace_parent: String::new(),
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

/// Transfers to the peer whose link is a black hole: more than one call
/// carries, so that its events alone could fill every call under way.
const BLACK_HOLED_TRANSFERS: usize = 2 * RELAY_BATCH_MAX;
/// A transfer to a peer that answers completes within this while another
/// peer is black-holed: less than one delivery deadline, so it never waits
/// for a call to the silent peer to time out.
const OTHER_PEER_TRANSFER_MAX_MS: u64 = DELIVERY_TIMEOUT_MS;
/// Once the link heals, the held transfers complete within this: the
/// call lost in the black hole times out, the longest backoff passes, and
/// a loaded machine gets room.
const HEALED_TRANSFERS_MAX_MS: u64 = DELIVERY_TIMEOUT_MS + RELAY_BACKOFF_MAX_MS + 10_000;
/// How long p2's link stays a black hole: calls to it time out, and the
/// relay backs off from it, several times over.
const BLACK_HOLE_MS: u64 = 3 * DELIVERY_TIMEOUT_MS + RELAY_BACKOFF_MAX_MS;
/// How often a transfer to p3 starts meanwhile.
const OTHER_TRANSFER_EVERY_MS: u64 = 100;
/// Money enough for the transfers to p3 (at most one per
/// `OTHER_TRANSFER_EVERY_MS` of the black hole).
const OTHER_TRANSFERS_MAX: i64 = (BLACK_HOLE_MS / OTHER_TRANSFER_EVERY_MS + 1) as i64;
/// A guard so that a broken relay fails the test instead of hanging it.
const GUARD_MS: u32 = 20_000;

/// p1 relays to two peers; its link to p2 is a black hole (connections
/// accepted, never answered), with hundreds of events queued for p2. A
/// transfer to p3 still completes at once, while calls to p2 time out and
/// the relay backs off from it: a silent peer delays no other.
/// When the link heals, every event queued for p2 is delivered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_peer_does_not_hold_up_events_to_another_peer() {
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::new("relay test CA").unwrap();
    let bind = || tandem::server::bind("127.0.0.1:0".parse().unwrap());
    let ((l1, a1), (l2, a2), (l3, a3)) = (bind().await.unwrap(), bind().await.unwrap(), bind().await.unwrap());
    let to_p2 = LinkProxy::start(a2).await.unwrap();
    to_p2.black_hole();
    let p1_peers = vec![(id("p2"), format!("https://{}", to_p2.local_addr())), (id("p3"), format!("https://{a3}"))];
    let p1 = Node::open(config(&ca, "p1", dir.path(), p1_peers)).unwrap();
    let p2 = Node::open(config(&ca, "p2", dir.path(), vec![(id("p1"), format!("https://{a1}"))])).unwrap();
    let p3 = Node::open(config(&ca, "p3", dir.path(), vec![(id("p1"), format!("https://{a1}"))])).unwrap();
    let stops = [serve(&p1, l1).await, serve(&p2, l2).await, serve(&p3, l3).await];
    open_account(&p1, 1, BLACK_HOLED_TRANSFERS as i64 + OTHER_TRANSFERS_MAX).await;
    open_account(&p2, 2, 0).await;
    open_account(&p3, 3, 0).await;

    let mut started = tokio::task::JoinSet::new();
    for i in 0..BLACK_HOLED_TRANSFERS {
        let p1 = p1.clone();
        started.spawn(async move { start_transfer(&p1, &format!("held{i}"), 2, "p2", 0).await });
    }
    while let Some(status) = started.join_next().await {
        assert_eq!(status.unwrap().state, pb::TransferState::Debited as i32);
    }

    // Transfers to p3, one after another, for as long as the black hole
    // lasts: through the calls to p2 that time out and the backoffs after.
    let black_hole_began = Instant::now();
    let mut others = 0;
    while black_hole_began.elapsed() < Duration::from_millis(BLACK_HOLE_MS) {
        let began = Instant::now();
        let other = start_transfer(&p1, &format!("other{others}"), 3, "p3", GUARD_MS).await;
        let took = began.elapsed();
        assert_eq!(other.state, pb::TransferState::Completed as i32, "{other:?} after {took:?}");
        assert!(
            took <= Duration::from_millis(OTHER_PEER_TRANSFER_MAX_MS),
            "a transfer to p3 took {took:?}, {:?} into p2's black hole; at most {OTHER_PEER_TRANSFER_MAX_MS} ms",
            black_hole_began.elapsed()
        );
        others += 1;
        tokio::time::sleep(Duration::from_millis(OTHER_TRANSFER_EVERY_MS)).await;
    }
    assert_eq!(read_balances(&p1).await.transfers_in_flight, BLACK_HOLED_TRANSFERS as u64);

    to_p2.heal();
    let healed = Instant::now();
    loop {
        let balances = read_balances(&p1).await;
        if balances.transfers_in_flight == 0 && balances.outbox_pending == 0 {
            break;
        }
        assert!(
            healed.elapsed() <= Duration::from_millis(HEALED_TRANSFERS_MAX_MS),
            "{} transfers to p2 still in flight {:?} after the link healed ({} events in p1's outbox)",
            balances.transfers_in_flight,
            healed.elapsed(),
            balances.outbox_pending
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(posted(&p1, 1).await, OTHER_TRANSFERS_MAX - others);
    assert_eq!(posted(&p2, 2).await, BLACK_HOLED_TRANSFERS as i64, "every held transfer credited once");
    assert_eq!(posted(&p3, 3).await, others);
    for stop in stops {
        let _ = stop.send(());
    }
}
