//! In-process tests of the decision query (`resolve_in_doubt`): a real
//! participant node, serving on a loopback port, holds prepared
//! transactions whose coordinator is a stand-in gRPC server that can be
//! paused: it accepts every call and answers none, as a coordinator stopped
//! with SIGSTOP does, until it is resumed. The stand-in counts the decision
//! queries it holds, so the test sees what the participant asks, how many at
//! once, and how often.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem::domain::Id;
use tandem::pb;
use tandem::pb::coordinator_server::{Coordinator, CoordinatorServer};
use tandem::pb::participant_server::Participant;
use tandem::store::memory::MemoryDisk;
use tandem::store::Disk;
use tandem::tls::Security;
use tandem_participant::node::{Node, NodeConfig, QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX, QUERY_TIMEOUT_MS};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

/// How long a prepared transaction waits before its coordinator is asked.
const IN_DOUBT_AFTER_MS: u64 = 100;
/// Transactions in doubt: several times what may be asked at once, so that
/// a participant that asks about all of them at once is seen to.
const IN_DOUBT_TXNS: usize = 3 * QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX;
/// How long the coordinator stays paused: several query deadlines.
const PAUSE_MS: u64 = 4 * QUERY_TIMEOUT_MS;
/// From this long after the first query on, the queries of the pause are
/// counted: by then every query sent before the participant saw the
/// coordinator time out has timed out too.
const PAUSE_SETTLED_MS: u64 = 2 * QUERY_TIMEOUT_MS;
/// Once the coordinator answers again, every transaction is resolved within
/// this: less than one query deadline, so no backoff grown during the pause
/// and no query timeout stands between the answer and the resolution.
const RESOLVED_AFTER_RESUME_MAX_MS: u64 = QUERY_TIMEOUT_MS;
/// A guard so that a broken node fails the test instead of hanging it.
const GUARD_MS: u64 = 20_000;

/// What the stand-in coordinator saw.
#[derive(Default)]
struct Seen {
    /// Decision queries received.
    received: AtomicUsize,
    /// Queries received and not yet answered or cancelled.
    in_flight: AtomicUsize,
    /// The most queries held at once.
    peak: AtomicUsize,
    /// Queries received for a transaction already asked about (a query
    /// for it still held).
    overlapping: AtomicUsize,
    /// The queries held, per transaction.
    held: Mutex<BTreeMap<String, usize>>,
}

/// Counts a query as held until it is answered or its caller gives up (the
/// server drops the handler when the client resets the stream).
struct Held {
    seen: Arc<Seen>,
    txn: String,
}

impl Held {
    fn new(seen: &Arc<Seen>, txn: String) -> Held {
        seen.received.fetch_add(1, Ordering::SeqCst);
        let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        seen.peak.fetch_max(now, Ordering::SeqCst);
        let mut held = seen.held.lock().unwrap();
        let count = held.entry(txn.clone()).or_default();
        if *count > 0 {
            seen.overlapping.fetch_add(1, Ordering::SeqCst);
        }
        *count += 1;
        Held { seen: seen.clone(), txn }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.seen.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut held = self.seen.held.lock().unwrap();
        let count = held.get_mut(&self.txn).expect("a held query is counted");
        *count -= 1;
        if *count == 0 {
            held.remove(&self.txn);
        }
    }
}

/// A coordinator that answers COMMIT to every decision query while
/// `answering` says so, and holds every query unanswered while it does not.
struct PausableCoordinator {
    seen: Arc<Seen>,
    answering: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Coordinator for PausableCoordinator {
    async fn query_decision(
        &self,
        request: Request<pb::QueryDecisionRequest>,
    ) -> Result<Response<pb::QueryDecisionResponse>, Status> {
        let _held = Held::new(&self.seen, request.into_inner().txn_id);
        let mut answering = self.answering.clone();
        let _ = answering.wait_for(|answering| *answering).await;
        Ok(Response::new(pb::QueryDecisionResponse { decision: pb::Decision::Commit as i32, ..Default::default() }))
    }

    async fn transfer(&self, _: Request<pb::TransferRequest>) -> Result<Response<pb::TransactionResult>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn transfer_batch(
        &self,
        _: Request<pb::TransferBatchRequest>,
    ) -> Result<Response<pb::TransferBatchResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn execute(&self, _: Request<pb::ExecuteRequest>) -> Result<Response<pb::TransactionResult>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_transaction(
        &self,
        _: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::TransactionStatus>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn list_dead_letters(
        &self,
        _: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn resolve_dead_letter(
        &self,
        _: Request<pb::ResolveDeadLetterRequest>,
    ) -> Result<Response<pb::SagaStatus>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn audit(&self, _: Request<pb::AuditRequest>) -> Result<Response<pb::AuditResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_health(&self, _: Request<pb::GetHealthRequest>) -> Result<Response<pb::NodeHealth>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// Serves a paused stand-in coordinator on a loopback port: its URL, what
/// it sees, and the switch that resumes it.
async fn pausable_coordinator() -> (String, Arc<Seen>, watch::Sender<bool>) {
    let (listener, addr) = tandem::server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let seen = Arc::new(Seen::default());
    let (resume, answering) = watch::channel(false);
    let service = CoordinatorServer::new(PausableCoordinator { seen: seen.clone(), answering });
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
    (format!("http://{addr}"), seen, resume)
}

async fn start_participant(coordinator_url: String) -> (Node, oneshot::Sender<()>) {
    let node = Node::open(NodeConfig {
        node_id: id("p1"),
        disk: Disk::Memory(MemoryDisk::new()),
        coordinators: vec![(id("c1"), coordinator_url)],
        peers: Vec::new(),
        in_doubt_after_ms: IN_DOUBT_AFTER_MS,
        finished_retention_ms: 300_000,
        idempotency_retention_ms: tandem_participant::saga::IDEMPOTENCY_RETENTION_DEFAULT_MS,
        owned_accounts: None,
        store_free_min_bytes: 0,
        // In process, the trust layer is not what is tested here.
        security: Security::Insecure,
        network: tandem::net::Network::Tcp,
        wall_clock: tandem::clock::WallClock::System,
    })
    .unwrap();
    let (listener, _) = tandem::server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(node.clone().run(listener, async move {
        let _ = stopped.await;
    }));
    (node, stop)
}

async fn prepared(node: &Node) -> u64 {
    Participant::list_prepared(node, Request::new(pb::ListPreparedRequest { limit: 1 }))
        .await
        .unwrap()
        .into_inner()
        .total
}

async fn balance(node: &Node, account: u64) -> pb::Balance {
    Participant::get_balance(node, Request::new(pb::GetBalanceRequest { account })).await.unwrap().into_inner()
}

/// The coordinator of many in-doubt transactions is paused for several
/// query deadlines. The participant asks about at most a bounded number at
/// once, never twice at once about one transaction, and, once a query has
/// timed out, only one query at a time until the coordinator answers; it
/// keeps every reservation (a query that timed out is no answer); and when
/// the coordinator answers again, it resolves them all at once, not after
/// backoffs grown during the pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_coordinator_gets_bounded_queries_and_is_asked_again_at_once_when_it_answers() {
    let (url, seen, resume) = pausable_coordinator().await;
    let (node, stop) = start_participant(url).await;
    let accounts = vec![
        pb::NewAccount { account: 1, initial_balance: IN_DOUBT_TXNS as i64 },
        pb::NewAccount { account: 2, initial_balance: 0 },
    ];
    Participant::open_accounts(&node, Request::new(pb::OpenAccountsRequest { accounts })).await.unwrap();
    for i in 0..IN_DOUBT_TXNS {
        let prepare = pb::PrepareRequest {
            txn_id: format!("t{i}"),
            coordinator_id: "c1".into(),
            legs: vec![pb::Leg { account: 1, amount: -1 }, pb::Leg { account: 2, amount: 1 }],
            ..Default::default()
        };
        let vote = Participant::prepare(&node, Request::new(prepare)).await.unwrap().into_inner();
        assert_eq!(vote.vote, pb::Vote::Yes as i32, "{vote:?}");
    }

    // The pause: counted from the first query.
    let guard = Instant::now() + Duration::from_millis(GUARD_MS);
    while seen.received.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < guard, "the in-doubt transactions were never asked about");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first_query = Instant::now();
    tokio::time::sleep_until(first_query + Duration::from_millis(PAUSE_SETTLED_MS)).await;
    let received_settled = seen.received.load(Ordering::SeqCst);
    tokio::time::sleep_until(first_query + Duration::from_millis(PAUSE_MS)).await;
    let received_late = seen.received.load(Ordering::SeqCst) - received_settled;

    let peak = seen.peak.load(Ordering::SeqCst);
    assert!(
        peak <= QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX,
        "{peak} decision queries were held at once by a paused coordinator; the most is {QUERIES_IN_FLIGHT_PER_COORDINATOR_MAX}"
    );
    let overlapping = seen.overlapping.load(Ordering::SeqCst);
    assert_eq!(overlapping, 0, "{overlapping} queries asked about a transaction whose last query was still unanswered");
    // Each query to a coordinator that does not answer lasts a deadline, and
    // only one is sent at a time: at most one per deadline, and one begun
    // before the window.
    let late_max = ((PAUSE_MS - PAUSE_SETTLED_MS) / QUERY_TIMEOUT_MS + 1) as usize;
    assert!(
        received_late <= late_max,
        "{received_late} queries reached the paused coordinator in the last {} ms of its pause; at most {late_max} (one at a time)",
        PAUSE_MS - PAUSE_SETTLED_MS
    );
    // A query that timed out is no answer: every reservation is held.
    assert_eq!(prepared(&node).await, IN_DOUBT_TXNS as u64, "a transaction was decided with no answer");
    let source = balance(&node, 1).await;
    assert_eq!((source.posted, source.reserved), (IN_DOUBT_TXNS as i64, IN_DOUBT_TXNS as i64), "{source:?}");

    resume.send(true).unwrap();
    let resumed = Instant::now();
    while prepared(&node).await > 0 {
        assert!(
            resumed.elapsed() <= Duration::from_millis(RESOLVED_AFTER_RESUME_MAX_MS),
            "{} transactions still in doubt {} ms after the coordinator answered again",
            prepared(&node).await,
            resumed.elapsed().as_millis()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (source, target) = (balance(&node, 1).await, balance(&node, 2).await);
    assert_eq!((source.posted, source.reserved), (0, 0), "{source:?}");
    assert_eq!((target.posted, target.incoming), (IN_DOUBT_TXNS as i64, 0), "{target:?}");
    let _ = stop.send(());
}
