//! In-process tests of the coordinator's driver over real gRPC on loopback:
//! a coordinator and its participants in this process, each serving on a
//! port of its own, their records on disks in memory, plaintext.
//!
//! What they pin down:
//! - an audit that cannot read a participant (paused: the link accepts and
//!   never answers) gives the commit fence back within a short bound, fails
//!   with UNAVAILABLE naming that participant, and commits between the
//!   other participants go on meanwhile.

use std::time::Duration;
use tandem::domain::Id;
use tandem::pb;
use tandem::pb::coordinator_client::CoordinatorClient;
use tandem::pb::participant_server::Participant;
use tandem::proxy::LinkProxy;
use tandem::store::memory::MemoryDisk;
use tandem::store::Disk;
use tandem::tls::Security;
use tandem_coordinator::directory::Shard;
use tandem_coordinator::node::{self, Node, NodeConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Accounts each participant owns and opens: participant `i` (`p{i+1}`)
/// owns `i * ACCOUNTS_EACH .. (i + 1) * ACCOUNTS_EACH`.
const ACCOUNTS_EACH: u64 = 10;
const INITIAL_BALANCE: i64 = 1_000;
/// How long the coordinator waits for the commit fence (its default).
const AUDIT_TIMEOUT_MS: u64 = 100;
/// What a loaded 2-core machine adds to a bound of the code under test.
const SCHEDULING_SLACK_MS: u64 = 2_000;
/// How long a test waits for something that should happen soon.
const EVENTUALLY_MS: u64 = 30_000;

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

fn transfer(from: u64, to: u64, amount: i64) -> pb::TransferRequest {
    pb::TransferRequest { from_account: from, to_account: to, amount, ..Default::default() }
}

/// A loopback listener on a port the kernel picks, and its plaintext URL.
async fn bind() -> (TcpListener, String) {
    let (listener, addr) = tandem::server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (listener, format!("http://{addr}"))
}

/// Stops what it started when dropped (the end of a test, or a panic).
struct Stop(Vec<oneshot::Sender<()>>);

async fn until_stopped(stopped: oneshot::Receiver<()>) {
    let _ = stopped.await;
}

/// Participant `p{index+1}` with its accounts opened, serving on `listener`;
/// it knows the coordinator at `coordinator_url` but never asks it anything
/// here (nothing stays in doubt for a minute).
async fn participant(
    index: u64,
    listener: TcpListener,
    coordinator_url: &str,
    stop: &mut Stop,
) -> tandem_participant::node::Node {
    let name = format!("p{}", index + 1);
    let node = tandem_participant::node::Node::open(tandem_participant::node::NodeConfig {
        node_id: id(&name),
        disk: Disk::Memory(MemoryDisk::new()),
        coordinators: vec![(id("c1"), coordinator_url.to_string())],
        peers: Vec::new(),
        in_doubt_after_ms: 60_000,
        finished_retention_ms: 300_000,
        owned_accounts: Some(index * ACCOUNTS_EACH..(index + 1) * ACCOUNTS_EACH),
        store_free_min_bytes: 0,
        security: Security::Insecure,
    })
    .unwrap();
    let accounts = (index * ACCOUNTS_EACH..(index + 1) * ACCOUNTS_EACH)
        .map(|account| pb::NewAccount { account, initial_balance: INITIAL_BALANCE })
        .collect();
    Participant::open_accounts(&node, Request::new(pb::OpenAccountsRequest { accounts })).await.unwrap();
    let (sender, stopped) = oneshot::channel();
    stop.0.push(sender);
    tokio::spawn(node.clone().run(listener, until_stopped(stopped)));
    node
}

/// The coordinator `c1` over the participants at `urls` (`p1`, `p2`, ...),
/// serving on `listener`, and a client of it.
async fn coordinator(
    listener: TcpListener,
    url: &str,
    urls: &[String],
    call_timeout_ms: u64,
    stop: &mut Stop,
) -> CoordinatorClient<Channel> {
    let shards = urls
        .iter()
        .enumerate()
        .map(|(i, participant_url)| {
            let i = i as u64;
            Shard::parse(&format!("p{}={participant_url}@{}..{}", i + 1, i * ACCOUNTS_EACH, (i + 1) * ACCOUNTS_EACH))
                .unwrap()
        })
        .collect();
    let (node, recovered) = Node::open(NodeConfig {
        node_id: id("c1"),
        disk: Disk::Memory(MemoryDisk::new()),
        shards,
        prepare_timeout_ms: 5_000,
        call_timeout_ms,
        audit_timeout_ms: AUDIT_TIMEOUT_MS,
        active_max: 1_000,
        finished_retained_max: 1_000,
        saga_step_attempts: 3,
        saga_deadline_ms: 5_000,
        security: Security::Insecure,
    })
    .await
    .unwrap();
    let (sender, stopped) = oneshot::channel();
    stop.0.push(sender);
    tokio::spawn(node.run(listener, recovered, until_stopped(stopped)));
    CoordinatorClient::new(tandem::server::channel(url, &Security::Insecure).unwrap())
}

/// Polls `read` until it says done, for at most [`EVENTUALLY_MS`].
async fn eventually<T>(what: &str, mut read: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_millis(EVENTUALLY_MS);
    loop {
        if let Some(value) = read().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {EVENTUALLY_MS} ms");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The audit, once it answers (it is UNAVAILABLE while commits are in flight).
async fn exact_audit(client: &mut CoordinatorClient<Channel>) -> pb::AuditResponse {
    eventually("an audit answers", async || match client.audit(pb::AuditRequest { include_accounts: true }).await {
        Ok(audit) => Some(audit.into_inner()),
        Err(status) if status.code() == Code::Unavailable => None,
        Err(status) => panic!("the audit failed: {status:?}"),
    })
    .await
}

fn posted(audit: &pb::AuditResponse, account: u64) -> i64 {
    let balances = audit.participants.iter().flat_map(|p| &p.accounts);
    balances.filter(|b| b.account == account).map(|b| b.posted).next().expect("the account is in the audit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_that_cannot_read_a_paused_participant_lets_commits_go_on_and_names_it() {
    // COMMIT deadlines may legitimately be long; the audit's reads, which
    // hold up every commit decision while they run, must not be.
    const CALL_TIMEOUT_MS: u64 = 30_000;
    let mut stop = Stop(Vec::new());
    let (coordinator_listener, coordinator_url) = bind().await;
    let mut urls = Vec::new();
    let mut proxy = None;
    for index in 0..3 {
        let (listener, url) = bind().await;
        let addr = listener.local_addr().unwrap();
        participant(index, listener, &coordinator_url, &mut stop).await;
        if index == 2 {
            // p3 is reached through a link that can be made silent: a
            // paused process accepts connections and never answers.
            let link = LinkProxy::start(addr).await.unwrap();
            urls.push(format!("http://{}", link.local_addr()));
            proxy = Some(link);
        } else {
            urls.push(url);
        }
    }
    let p3_link = proxy.unwrap();
    let mut client = coordinator(coordinator_listener, &coordinator_url, &urls, CALL_TIMEOUT_MS, &mut stop).await;
    let total = 3 * ACCOUNTS_EACH as i64 * INITIAL_BALANCE;
    let audit = exact_audit(&mut client).await;
    assert_eq!((audit.total_posted, audit.total_reserved), (total, 0), "{audit:?}");

    p3_link.black_hole();
    let audit_started = Instant::now();
    let audit = tokio::spawn({
        let mut client = client.clone();
        async move { client.audit(pb::AuditRequest { include_accounts: false }).await }
    });
    // Transfers between p1 and p2, back to back, from before the audit takes
    // the fence until it has answered: some of them are decided while it
    // holds the fence, and none may wait long for it.
    let commit_wait_max = Duration::from_millis(AUDIT_TIMEOUT_MS + node::AUDIT_READ_TIMEOUT_MS + SCHEDULING_SLACK_MS);
    let mut committed = 0u64;
    let mut slowest = Duration::ZERO;
    while !audit.is_finished() {
        let started = Instant::now();
        let result = tokio::time::timeout(commit_wait_max, client.transfer(transfer(0, ACCOUNTS_EACH, 1)))
            .await
            .unwrap_or_else(|_| panic!("a commit waited more than {commit_wait_max:?} behind the audit"))
            .unwrap()
            .into_inner();
        assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
        committed += 1;
        slowest = slowest.max(started.elapsed());
    }
    let status = audit.await.unwrap().expect_err("p3 cannot be read");
    let audit_took = audit_started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("p3"), "the status names the participant: {}", status.message());
    assert!(!status.message().contains("p1") && !status.message().contains("p2"), "{}", status.message());
    assert!(audit_took < commit_wait_max, "the audit answered after {audit_took:?}");
    assert!(committed > 0);
    println!(
        "{committed} commits during the audit, the slowest in {slowest:?}; the audit answered in {audit_took:?}: {}",
        status.message()
    );

    // Once p3 answers again, audits are exact: no money was created or
    // destroyed, and each transfer moved its unit once.
    p3_link.heal();
    let audit = exact_audit(&mut client).await;
    assert_eq!((audit.total_posted, audit.total_reserved, audit.total_suspense), (total, 0, 0), "{audit:?}");
    assert_eq!(posted(&audit, 0), INITIAL_BALANCE - committed as i64);
    assert_eq!(posted(&audit, ACCOUNTS_EACH), INITIAL_BALANCE + committed as i64);
}
