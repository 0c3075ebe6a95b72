//! In-process tests of a participant whose disk fails: the real node, its
//! gRPC server and health service on a loopback port, over the in-memory
//! disk (`tandem::store::memory`), which can fill up and fail an fsync on
//! demand. The same behaviour on a real disk (RocksDB on a full tmpfs) is
//! tested end to end in `tests/cluster.rs`.

use std::time::{Duration, Instant};
use tandem::domain::Id;
use tandem::pb;
use tandem::pb::participant_server::Participant;
use tandem::store::memory::MemoryDisk;
use tandem::store::Disk;
use tandem::tls::Security;
use tandem_participant::node::{Node, NodeConfig};
use tonic::Request;
use tonic_health::pb::health_check_response::ServingStatus;

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

async fn start(disk: &MemoryDisk) -> (Node, String, tokio::sync::oneshot::Sender<()>) {
    let node = Node::open(NodeConfig {
        node_id: id("p1"),
        disk: Disk::Memory(disk.clone()),
        coordinators: vec![(id("c1"), "http://127.0.0.1:1".into())],
        peers: Vec::new(),
        in_doubt_after_ms: 60_000,
        finished_retention_ms: 300_000,
        idempotency_retention_ms: tandem_participant::saga::IDEMPOTENCY_RETENTION_DEFAULT_MS,
        owned_accounts: None,
        store_free_min_bytes: 1_000,
        // In process, the trust layer is not what is tested here.
        security: Security::Insecure,
        network: tandem::net::Network::Tcp,
        wall_clock: tandem::clock::WallClock::System,
    })
    .unwrap();
    let (listener, addr) = tandem::server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(node.clone().run(listener, async move {
        let _ = stopped.await;
    }));
    (node, format!("http://{addr}"), stop)
}

async fn health(url: &str) -> Option<i32> {
    let channel = tandem::server::channel(url, &Security::Insecure).unwrap();
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: "tandem.v1.Participant".into() };
    client.check(request).await.ok().map(|answer| answer.into_inner().status)
}

async fn wait_for_health(url: &str, status: ServingStatus, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(url).await != Some(status as i32) {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn prepare(txn: &str) -> Request<pb::PrepareRequest> {
    Request::new(pb::PrepareRequest {
        txn_id: txn.into(),
        coordinator_id: "c1".into(),
        legs: vec![pb::Leg { account: 1, amount: -10 }, pb::Leg { account: 2, amount: 10 }],
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_node_until_it_has_room_and_a_failed_fsync_until_it_is_reopened() {
    let disk = MemoryDisk::new();
    let (node, url, stop) = start(&disk).await;
    let accounts =
        vec![pb::NewAccount { account: 1, initial_balance: 100 }, pb::NewAccount { account: 2, initial_balance: 0 }];
    Participant::open_accounts(&node, Request::new(pb::OpenAccountsRequest { accounts })).await.unwrap();
    let vote = Participant::prepare(&node, prepare("t1")).await.unwrap().into_inner();
    assert_eq!(vote.vote, pb::Vote::Yes as i32);
    assert_eq!(health(&url).await, Some(ServingStatus::Serving as i32));

    // Full: the next write fails, nothing is acknowledged, NOT_SERVING.
    disk.set_capacity_bytes(Some(disk.used_bytes()));
    assert!(Participant::prepare(&node, prepare("t2")).await.is_err(), "a prepare was acknowledged on a full disk");
    wait_for_health(&url, ServingStatus::NotServing, "still SERVING with a full disk").await;
    let refused = Participant::prepare(&node, prepare("t3")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // Less room than --store-free-min-mb asks: it stays down.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(health(&url).await, Some(ServingStatus::NotServing as i32), "came back on a full disk");

    // Room again: reopened and recovered by itself; t1 is still prepared.
    disk.set_capacity_bytes(None);
    wait_for_health(&url, ServingStatus::Serving, "did not recover once the disk had room").await;
    let prepared = Participant::list_prepared(&node, Request::new(pb::ListPreparedRequest { limit: 0 }))
        .await
        .unwrap()
        .into_inner();
    assert!(prepared.prepared.iter().any(|p| p.txn_id == "t1"), "{prepared:?}");
    Participant::commit(&node, Request::new(pb::DecisionRequest { txn_id: "t1".into(), ..Default::default() }))
        .await
        .unwrap();
    let balance = |account| Participant::get_balance(&node, Request::new(pb::GetBalanceRequest { account }));
    assert_eq!(balance(1).await.unwrap().into_inner().posted, 90);
    assert_eq!(balance(2).await.unwrap().into_inner().posted, 10);

    // A failed fsync: the same, and reopened at once since there is room.
    disk.fail_next_fsync();
    assert!(Participant::prepare(&node, prepare("t4")).await.is_err(), "acknowledged after a failed fsync");
    wait_for_health(&url, ServingStatus::NotServing, "still SERVING after a failed fsync").await;
    wait_for_health(&url, ServingStatus::Serving, "did not recover after a failed fsync").await;
    let vote = Participant::prepare(&node, prepare("t5")).await.unwrap().into_inner();
    assert_eq!(vote.vote, pb::Vote::Yes as i32, "{vote:?}");
    let _ = stop.send(());
}
