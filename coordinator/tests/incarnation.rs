//! In-process tests, over real gRPC on loopback, of what a coordinator
//! tells its participants about itself and keeps for its clients (issue
//! 11): its log's incarnation, the positions and low watermarks it stamps
//! on every message, and idempotency keys kept for a time, not a count.
//!
//! The participants are the real ones, each behind a server that records
//! what the coordinator sent it (and can answer COMMITs UNAVAILABLE for a
//! while); the coordinator's log is on a disk in memory, and its wall clock
//! is one the test sets.
//!
//! What they pin down:
//! - a coordinator restarted on an empty disk has another incarnation and
//!   hands out other ids; asked about a transaction of the old one, it
//!   answers UNKNOWN_INCARNATION, never ABORT; restarted on its own disk it
//!   keeps its incarnation;
//! - each participant's watermark passes finished transactions, is held by
//!   a commit that this participant has not acknowledged (and not by one
//!   that only another participant has not), and never goes back, across a
//!   restart too;
//! - an idempotency key answers its first result for the whole retention
//!   (by the wall clock), is refused with FAILED_PRECONDITION for another
//!   request (other legs, or the same legs by another protocol), is a new
//!   request past the retention, and its records and their expiry index
//!   entries are collected.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem::clock::WallClock;
use tandem::domain::Id;
use tandem::pb;
use tandem::pb::coordinator_client::CoordinatorClient;
use tandem::pb::participant_server::{Participant, ParticipantServer};
use tandem::store::memory::MemoryDisk;
use tandem::store::Disk;
use tandem::tls::Security;
use tandem_coordinator::directory::Shard;
use tandem_coordinator::log;
use tandem_coordinator::node::{Node, NodeConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const ACCOUNTS_EACH: u64 = 10;
const INITIAL_BALANCE: i64 = 1_000;
const EVENTUALLY_MS: u64 = 30_000;
const HOUR_MS: u64 = 3_600_000;
const RETENTION_MS: u64 = 24 * HOUR_MS;

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

async fn bind() -> (TcpListener, String) {
    let (listener, addr) = tandem::server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (listener, format!("http://{addr}"))
}

async fn until_stopped(stopped: oneshot::Receiver<()>) {
    let _ = stopped.await;
}

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

/// One message the coordinator sent a participant, as it was stamped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    txn_ids: Vec<String>,
    coordinator_id: String,
    incarnation: u64,
    position: u64,
    low_watermark: u64,
}

impl Seen {
    /// A batch of COMMITs, from CommitBatch or riding on a PrepareBatch.
    fn commits(r: &pb::DecisionBatchRequest) -> Seen {
        Seen {
            kind: "commit",
            txn_ids: r.txn_ids.clone(),
            coordinator_id: r.coordinator_id.clone(),
            incarnation: r.coordinator_incarnation,
            position: 0,
            low_watermark: r.low_watermark,
        }
    }
}

#[derive(Default)]
struct Record {
    seen: Vec<Seen>,
    /// COMMITs are answered UNAVAILABLE (redelivered) while set.
    commits_unavailable: bool,
}

/// The real participant behind a server that records what it is sent.
#[derive(Clone)]
struct Recording {
    node: tandem_participant::node::Node,
    record: Arc<Mutex<Record>>,
}

impl Recording {
    fn note(&self, seen: Seen) {
        self.record.lock().unwrap().seen.push(seen);
    }

    fn seen(&self, kind: &str) -> Vec<Seen> {
        self.record.lock().unwrap().seen.iter().filter(|s| s.kind == kind).cloned().collect()
    }

    /// The prepares and one-phase commits it was sent, in order: each
    /// carries the coordinator's watermark for it.
    fn requests(&self) -> Vec<Seen> {
        let record = self.record.lock().unwrap();
        record.seen.iter().filter(|s| s.kind == "prepare" || s.kind == "one-phase").cloned().collect()
    }
}

macro_rules! participant_with {
    ({ $($own:item)* } $($method:ident($request:ty) -> $response:ty;)*) => {
        #[tonic::async_trait]
        impl Participant for Recording {
            $($own)*
            $(async fn $method(&self, request: Request<$request>) -> Result<Response<$response>, Status> {
                Participant::$method(&self.node, request).await
            })*
        }
    };
}

participant_with! {
    {
        async fn prepare_batch(
            &self,
            request: Request<pb::PrepareBatchRequest>,
        ) -> Result<Response<pb::PrepareBatchResponse>, Status> {
            for p in &request.get_ref().prepares {
                self.note(Seen {
                    kind: "prepare",
                    txn_ids: vec![p.txn_id.clone()],
                    coordinator_id: p.coordinator_id.clone(),
                    incarnation: p.coordinator_incarnation,
                    position: p.position,
                    low_watermark: p.low_watermark,
                });
            }
            let mut request = request;
            if let Some(r) = &request.get_ref().commits {
                // COMMITs riding on the prepares: seen as CommitBatch's are,
                // and held back alike.
                self.note(Seen::commits(r));
                if self.record.lock().unwrap().commits_unavailable {
                    request.get_mut().commits = None;
                    let mut response = Participant::prepare_batch(&self.node, request).await?;
                    response.get_mut().commits_refused_code = tonic::Code::Unavailable as i32;
                    response.get_mut().commits_refused_reason = "commits are held back by the test".into();
                    return Ok(response);
                }
            }
            Participant::prepare_batch(&self.node, request).await
        }

        async fn commit_one_phase_batch(
            &self,
            request: Request<pb::OnePhaseBatchRequest>,
        ) -> Result<Response<pb::OnePhaseBatchResponse>, Status> {
            for r in &request.get_ref().requests {
                self.note(Seen {
                    kind: "one-phase",
                    txn_ids: vec![r.txn_id.clone()],
                    coordinator_id: r.coordinator_id.clone(),
                    incarnation: r.coordinator_incarnation,
                    position: r.position,
                    low_watermark: r.low_watermark,
                });
            }
            Participant::commit_one_phase_batch(&self.node, request).await
        }

        async fn commit_batch(
            &self,
            request: Request<pb::DecisionBatchRequest>,
        ) -> Result<Response<pb::DecisionResponse>, Status> {
            self.note(Seen::commits(request.get_ref()));
            if self.record.lock().unwrap().commits_unavailable {
                return Err(Status::unavailable("commits are held back by the test"));
            }
            Participant::commit_batch(&self.node, request).await
        }

        async fn abort(&self, request: Request<pb::DecisionRequest>) -> Result<Response<pb::DecisionResponse>, Status> {
            let r = request.get_ref();
            self.note(Seen {
                kind: "abort",
                txn_ids: vec![r.txn_id.clone()],
                coordinator_id: r.coordinator_id.clone(),
                incarnation: r.coordinator_incarnation,
                position: r.position,
                low_watermark: 0,
            });
            Participant::abort(&self.node, request).await
        }

        async fn saga_step_batch(
            &self,
            request: Request<pb::SagaStepBatchRequest>,
        ) -> Result<Response<pb::SagaStepBatchResponse>, Status> {
            for s in &request.get_ref().steps {
                self.note(Seen {
                    kind: "step",
                    txn_ids: vec![s.saga_id.clone()],
                    coordinator_id: s.coordinator_id.clone(),
                    incarnation: s.coordinator_incarnation,
                    position: s.position,
                    low_watermark: s.low_watermark,
                });
            }
            Participant::saga_step_batch(&self.node, request).await
        }
    }
    prepare(pb::PrepareRequest) -> pb::PrepareResponse;
    commit(pb::DecisionRequest) -> pb::DecisionResponse;
    open_accounts(pb::OpenAccountsRequest) -> pb::OpenAccountsResponse;
    get_balance(pb::GetBalanceRequest) -> pb::Balance;
    read_balances(pb::ReadBalancesRequest) -> pb::ReadBalancesResponse;
    list_prepared(pb::ListPreparedRequest) -> pb::ListPreparedResponse;
    resolve_in_doubt(pb::ResolveInDoubtRequest) -> pb::HeuristicDecision;
    lookup_transaction(pb::LookupTransactionRequest) -> pb::TransactionRecord;
    get_health(pb::GetHealthRequest) -> pb::NodeHealth;
    set_account_closed(pb::SetAccountClosedRequest) -> pb::Balance;
    saga_step(pb::SagaStepRequest) -> pb::SagaStepResponse;
    forget_sagas(pb::ForgetSagasRequest) -> pb::ForgetSagasResponse;
    start_transfer(pb::StartTransferRequest) -> pb::TransferStatus;
    get_transfer_status(pb::GetTransferStatusRequest) -> pb::TransferStatus;
    list_parked_transfers(pb::ListParkedTransfersRequest) -> pb::ListParkedTransfersResponse;
    resolve_parked_transfer(pb::ResolveParkedTransferRequest) -> pb::TransferStatus;
    deliver_event(pb::ChoreographyEvent) -> pb::DeliverEventResponse;
    deliver_events(pb::DeliverEventsRequest) -> pb::DeliverEventsResponse;
    commit_one_phase(pb::OnePhaseRequest) -> pb::OnePhaseResponse;
}

/// What a test runs: the recorded participants, and what stops them.
struct Cluster {
    participants: Vec<Recording>,
    urls: Vec<String>,
    coordinator_url: String,
    coordinator_listener: Option<TcpListener>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Cluster {
    /// `count` participants (`p1`, ...), each behind a recording server.
    async fn start(count: u64) -> Cluster {
        let (coordinator_listener, coordinator_url) = bind().await;
        let mut cluster = Cluster {
            participants: Vec::new(),
            urls: Vec::new(),
            coordinator_url,
            coordinator_listener: Some(coordinator_listener),
            stops: Vec::new(),
        };
        for index in 0..count {
            let node = tandem_participant::node::Node::open(tandem_participant::node::NodeConfig {
                node_id: id(&format!("p{}", index + 1)),
                disk: Disk::Memory(MemoryDisk::new()),
                coordinators: vec![(id("c1"), cluster.coordinator_url.clone())],
                peers: Vec::new(),
                in_doubt_after_ms: 60_000,
                finished_retention_ms: 300_000,
                idempotency_retention_ms: tandem_participant::saga::IDEMPOTENCY_RETENTION_DEFAULT_MS,
                owned_accounts: Some(index * ACCOUNTS_EACH..(index + 1) * ACCOUNTS_EACH),
                store_free_min_bytes: 0,
                security: Security::Insecure,
                network: tandem::net::Network::Tcp,
                wall_clock: WallClock::System,
            })
            .unwrap();
            let accounts = (index * ACCOUNTS_EACH..(index + 1) * ACCOUNTS_EACH)
                .map(|account| pb::NewAccount { account, initial_balance: INITIAL_BALANCE })
                .collect();
            Participant::open_accounts(&node, Request::new(pb::OpenAccountsRequest { accounts })).await.unwrap();
            let recording = Recording { node, record: Arc::default() };
            let (listener, url) = bind().await;
            let (sender, stopped) = oneshot::channel();
            cluster.stops.push(sender);
            let (health, health_service) = tonic_health::server::health_reporter();
            health.set_serving::<ParticipantServer<Recording>>().await;
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(health_service)
                    .add_service(ParticipantServer::new(recording.clone()))
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(listener),
                        until_stopped(stopped),
                    ),
            );
            cluster.participants.push(recording);
            cluster.urls.push(url);
        }
        cluster
    }

    /// Starts the coordinator `c1` on `log`, reading `clock`.
    async fn coordinator(&mut self, log: &MemoryDisk, clock: &Clock) -> Coordinator {
        let shards = self
            .urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let i = i as u64;
                Shard::parse(&format!("p{}={url}@{}..{}", i + 1, i * ACCOUNTS_EACH, (i + 1) * ACCOUNTS_EACH)).unwrap()
            })
            .collect();
        let (node, recovered) = Node::open(NodeConfig {
            node_id: id("c1"),
            disk: Disk::Memory(log.clone()),
            shards,
            prepare_timeout_ms: 5_000,
            call_timeout_ms: 1_000,
            active_max: 1_000,
            idempotency_retention_ms: RETENTION_MS,
            saga_step_attempts: 3,
            saga_deadline_ms: 5_000,
            security: Security::Insecure,
            network: tandem::net::Network::Tcp,
            one_phase_commit: tandem_coordinator::core::OnePhaseCommit::Auto,
            commit_protocol: tandem_coordinator::core::CommitProtocol::Parallel,
            wall_clock: clock.wall_clock(),
            incarnation_seed: None,
        })
        .await
        .unwrap();
        let incarnation = node.incarnation();
        let listener = match self.coordinator_listener.take() {
            Some(listener) => listener,
            None => {
                let addr = self.coordinator_url.trim_start_matches("http://");
                TcpListener::bind(addr).await.unwrap()
            }
        };
        let (stop, stopped) = oneshot::channel();
        let running = tokio::spawn(node.run(listener, recovered, until_stopped(stopped)));
        let client =
            CoordinatorClient::new(tandem::server::channel(&self.coordinator_url, &Security::Insecure).unwrap());
        Coordinator { client, incarnation, stop, running }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

struct Coordinator {
    client: CoordinatorClient<Channel>,
    incarnation: u64,
    stop: oneshot::Sender<()>,
    running: tokio::task::JoinHandle<Result<(), tandem::Error>>,
}

impl Coordinator {
    /// Stops it and waits until its log is closed.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.running.await.unwrap().unwrap();
    }

    async fn transfer(&mut self, from: u64, to: u64, key: &str) -> Result<pb::TransactionResult, Status> {
        let request = pb::TransferRequest {
            from_account: from,
            to_account: to,
            amount: 1,
            idempotency_key: key.into(),
            ..Default::default()
        };
        self.client.transfer(request).await.map(Response::into_inner)
    }

    async fn committed(&mut self, from: u64, to: u64) -> String {
        let result = self.transfer(from, to, "").await.unwrap();
        assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
        result.txn_id
    }

    async fn state(&mut self, txn: &str) -> i32 {
        let request = pb::GetTransactionRequest { txn_id: txn.into() };
        self.client.get_transaction(request).await.unwrap().into_inner().state
    }

    async fn query(&mut self, txn: &str, incarnation: u64) -> pb::QueryDecisionResponse {
        let request = pb::QueryDecisionRequest {
            txn_id: txn.into(),
            participant_id: "p1".into(),
            coordinator_incarnation: incarnation,
        };
        self.client.query_decision(request).await.unwrap().into_inner()
    }

    async fn posted(&mut self, account: u64) -> i64 {
        let audit = eventually("an audit answers", async || {
            match self.client.audit(pb::AuditRequest { include_accounts: true }).await {
                Ok(audit) => Some(audit.into_inner()),
                Err(status) if status.code() == Code::Unavailable => None,
                Err(status) => panic!("the audit failed: {status:?}"),
            }
        })
        .await;
        audit.participants.iter().flat_map(|p| &p.accounts).find(|b| b.account == account).unwrap().posted
    }
}

/// A wall clock the test sets.
#[derive(Clone)]
struct Clock(Arc<AtomicU64>);

impl Clock {
    fn new() -> Clock {
        Clock(Arc::new(AtomicU64::new(1_800_000_000_000)))
    }

    fn wall_clock(&self) -> WallClock {
        let now = self.0.clone();
        WallClock::Set(Arc::new(move || now.load(Ordering::Relaxed)))
    }

    fn forward(&self, by_ms: u64) {
        self.0.fetch_add(by_ms, Ordering::Relaxed);
    }
}

/// The incarnation and the position an id of `c1` carries.
fn parse_id(txn: &str) -> (u64, u64) {
    let parts: Vec<&str> = txn.rsplitn(4, '-').collect();
    assert_eq!((parts.len(), parts[3]), (4, "c1"), "{txn}");
    let incarnation = u64::from_str_radix(parts[2], 16).unwrap();
    let position = log::position(parts[1].parse().unwrap(), parts[0].parse().unwrap()).unwrap();
    assert_eq!(log::incarnation_of(&id("c1"), &id(txn)), Some(incarnation));
    (incarnation, position)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_on_an_empty_disk_is_a_new_incarnation_and_never_presumes_the_old_ones_transactions_aborted() {
    let mut cluster = Cluster::start(2).await;
    let clock = Clock::new();
    let first_log = MemoryDisk::new();
    let mut c1 = cluster.coordinator(&first_log, &clock).await;
    let old_txn = c1.committed(0, ACCOUNTS_EACH).await;
    let (old_incarnation, old_position) = parse_id(&old_txn);
    assert_eq!(old_incarnation, c1.incarnation);
    assert_ne!(old_incarnation, 0);
    // Every message to the participants says who sent it.
    for participant in &cluster.participants {
        let prepares = participant.seen("prepare");
        assert_eq!(prepares.len(), 1, "{prepares:?}");
        let prepare = &prepares[0];
        assert_eq!((prepare.coordinator_id.as_str(), prepare.incarnation), ("c1", old_incarnation));
        assert_eq!(prepare.position, old_position);
        assert!(prepare.low_watermark <= old_position, "{prepare:?}");
    }
    eventually("the first transfer is finished", async || {
        (c1.state(&old_txn).await == pb::TransactionState::Committed as i32).then_some(())
    })
    .await;
    let answer = c1.query(&old_txn, 0).await;
    assert_eq!((answer.decision, answer.coordinator_incarnation), (pb::Decision::Abort as i32, old_incarnation));

    // Restarted on its own log: the same incarnation, later ids.
    c1.stop().await;
    let mut c1 = cluster.coordinator(&first_log, &clock).await;
    assert_eq!(c1.incarnation, old_incarnation);
    let (_, position) = parse_id(&c1.committed(1, ACCOUNTS_EACH + 1).await);
    assert!(position > old_position);

    // Started on an empty disk under the same name: another incarnation.
    c1.stop().await;
    let mut c1 = cluster.coordinator(&MemoryDisk::new(), &clock).await;
    assert_ne!(c1.incarnation, old_incarnation);
    let new_txn = c1.committed(2, ACCOUNTS_EACH + 2).await;
    let (new_incarnation, _) = parse_id(&new_txn);
    assert_eq!(new_incarnation, c1.incarnation);
    assert_ne!(new_txn, old_txn);
    // The old incarnation's transactions are unknown here, never ABORT:
    // named by the participant, or only by the id.
    for asked in [0, old_incarnation] {
        let answer = c1.query(&old_txn, asked).await;
        assert_eq!(answer.decision, pb::Decision::UnknownIncarnation as i32, "asked {asked}: {answer:?}");
        assert_eq!(answer.coordinator_incarnation, new_incarnation);
    }
    // Even an id that looks like one of this incarnation, named as another's.
    let answer = c1.query(&new_txn, old_incarnation).await;
    assert_eq!(answer.decision, pb::Decision::UnknownIncarnation as i32);
    // One of its own that it does not know: presumed abort, as ever.
    let unknown = log::txn_id(&id("c1"), new_incarnation, 1, 999_999).unwrap();
    assert_eq!(c1.query(unknown.as_str(), new_incarnation).await.decision, pb::Decision::Abort as i32);
    eventually("the new transfer is finished", async || {
        (c1.state(&new_txn).await == pb::TransactionState::Committed as i32).then_some(())
    })
    .await;
    assert_eq!(c1.query(&new_txn, 0).await.decision, pb::Decision::Abort as i32, "finished: ABORT, as before");
    c1.stop().await;
}

/// The watermarks `participant` was sent on prepares and one-phase
/// commits, in order.
fn prepare_watermarks(participant: &Recording) -> Vec<u64> {
    participant.requests().iter().map(|s| s.low_watermark).collect()
}

fn assert_never_back(what: &str, watermarks: &[u64]) {
    assert!(watermarks.windows(2).all(|w| w[0] <= w[1]), "{what}: a watermark went back: {watermarks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_participants_watermark_passes_finished_transactions_waits_for_its_own_acknowledgements_and_never_goes_back(
) {
    let mut cluster = Cluster::start(2).await;
    let clock = Clock::new();
    let log_disk = MemoryDisk::new();
    let mut c1 = cluster.coordinator(&log_disk, &clock).await;
    let (p1, p2) = (cluster.participants[0].clone(), cluster.participants[1].clone());

    // A finished transaction is passed, at both participants.
    let first = c1.committed(0, ACCOUNTS_EACH).await;
    let (_, first_position) = parse_id(&first);
    eventually("p1's and p2's watermarks pass a finished transaction", async || {
        c1.committed(1, ACCOUNTS_EACH + 1).await;
        let passed = |p: &Recording| p.seen("prepare").last().unwrap().low_watermark > first_position;
        (passed(&p1) && passed(&p2)).then_some(())
    })
    .await;

    // A commit p2 does not acknowledge holds p2's watermark, not p1's.
    p2.record.lock().unwrap().commits_unavailable = true;
    let held = c1.committed(2, ACCOUNTS_EACH + 2).await;
    let (_, held_position) = parse_id(&held);
    eventually("p1 acknowledged, p2 did not", async || {
        let pending = c1.client.get_transaction(pb::GetTransactionRequest { txn_id: held.clone() }).await;
        (pending.unwrap().into_inner().pending_participants == ["p2"]).then_some(())
    })
    .await;
    eventually("p1's watermark passes the commit p1 acknowledged", async || {
        c1.committed(3, 4).await; // p1 alone: one phase
        let last = p1.requests().last().unwrap().clone();
        assert_eq!((last.kind, last.coordinator_id.as_str(), last.incarnation), ("one-phase", "c1", c1.incarnation));
        (last.low_watermark > held_position).then_some(())
    })
    .await;
    // p2's one-phase commits (transactions that need p2 too) never pass it.
    for _ in 0..3 {
        let result = c1.transfer(ACCOUNTS_EACH + 3, ACCOUNTS_EACH + 4, "").await.unwrap();
        assert_eq!(result.outcome, pb::Outcome::Committed as i32);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p2_marks = prepare_watermarks(&p2);
    assert!(p2_marks.iter().all(|w| *w <= held_position), "p2 is held at {held_position}: {p2_marks:?}");
    assert!(p2.seen("commit").iter().all(|s| s.low_watermark <= held_position && s.incarnation == c1.incarnation));
    let p1_before_restart = *prepare_watermarks(&p1).last().unwrap();
    let p1_commits_before_restart = p1.seen("commit").len();

    // Restarted: the logged commit is redelivered to both, and p1 (which
    // had acknowledged it) is not held by it again: nothing goes back.
    c1.stop().await;
    let mut c1 = cluster.coordinator(&log_disk, &clock).await;
    c1.committed(5, 6).await; // p1 alone
    let p1_marks = prepare_watermarks(&p1);
    assert!(*p1_marks.last().unwrap() >= p1_before_restart, "p1 went back after the restart: {p1_marks:?}");
    assert_never_back("p1's prepares", &p1_marks);
    // The redelivery goes on the COMMIT queue, which lingers for a prepare
    // to ride on: it may reach p1 after the one-phase commit above.
    let after_restart = eventually("the logged commit is redelivered to p1", async || {
        let after_restart = p1.seen("commit").split_off(p1_commits_before_restart);
        after_restart.iter().any(|s| s.txn_ids.contains(&held)).then_some(after_restart)
    })
    .await;
    assert!(
        after_restart.iter().all(|s| s.low_watermark >= p1_before_restart),
        "p1's COMMITs after the restart went back below {p1_before_restart}: {after_restart:?}"
    );

    // p2 acknowledges at last: its watermark passes the commit.
    p2.record.lock().unwrap().commits_unavailable = false;
    eventually("the held commit is acknowledged", async || {
        (c1.state(&held).await == pb::TransactionState::Committed as i32).then_some(())
    })
    .await;
    eventually("p2's watermark passes the commit it acknowledged", async || {
        c1.committed(ACCOUNTS_EACH + 5, ACCOUNTS_EACH + 6).await;
        (p2.requests().last().unwrap().low_watermark > held_position).then_some(())
    })
    .await;
    assert_never_back("p1's prepares", &prepare_watermarks(&p1));
    assert_never_back("p2's prepares", &prepare_watermarks(&p2));
    c1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_answers_for_its_retention_by_the_wall_clock_then_is_a_new_request_and_is_collected() {
    let mut cluster = Cluster::start(2).await;
    let clock = Clock::new();
    let start_ms = clock.0.load(Ordering::Relaxed);
    let log_disk = MemoryDisk::new();
    let mut c1 = cluster.coordinator(&log_disk, &clock).await;
    let (from, to) = (0, ACCOUNTS_EACH);

    let first = c1.transfer(from, to, "key-1").await.unwrap();
    assert_eq!(first.outcome, pb::Outcome::Committed as i32);
    eventually("the first transfer is finished", async || {
        (c1.state(&first.txn_id).await == pb::TransactionState::Committed as i32).then_some(())
    })
    .await;

    // 23 hours later: the same answer, and the money moved once.
    clock.forward(23 * HOUR_MS);
    let retry = c1.transfer(from, to, "key-1").await.unwrap();
    assert_eq!(retry, first);
    assert_eq!(c1.posted(from).await, INITIAL_BALANCE - 1);

    // The key for another request: refused, and nothing moves.
    let other_legs = c1.transfer(from, to + 1, "key-1").await.unwrap_err();
    assert_eq!(other_legs.code(), Code::FailedPrecondition, "{other_legs:?}");
    assert!(other_legs.message().contains("key-1") && other_legs.message().contains("another request"));
    let as_saga = c1
        .client
        .transfer(pb::TransferRequest {
            from_account: from,
            to_account: to,
            amount: 1,
            idempotency_key: "key-1".into(),
            protocol: pb::Protocol::SagaOrchestrated as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(as_saga.code(), Code::FailedPrecondition, "the same legs by another protocol: {as_saga:?}");
    assert_eq!((c1.posted(from).await, c1.posted(to + 1).await), (INITIAL_BALANCE - 1, INITIAL_BALANCE));

    // A saga's key the same way: its recovery is part of the request.
    let saga = |recovery: pb::Recovery| pb::TransferRequest {
        from_account: from + 1,
        to_account: to + 1,
        amount: 1,
        idempotency_key: "key-2".into(),
        protocol: pb::Protocol::SagaOrchestrated as i32,
        recovery: recovery as i32,
    };
    let saga_first = c1.client.transfer(saga(pb::Recovery::Backward)).await.unwrap().into_inner();
    assert_eq!(saga_first.outcome, pb::Outcome::Committed as i32);
    assert_eq!(c1.client.transfer(saga(pb::Recovery::Backward)).await.unwrap().into_inner(), saga_first);
    // Its steps said who sent them, and where the saga stands.
    let (_, saga_position) = parse_id(&saga_first.txn_id);
    for participant in &cluster.participants {
        let steps = participant.seen("step");
        assert!(!steps.is_empty());
        for step in steps {
            assert_eq!((step.coordinator_id.as_str(), step.incarnation), ("c1", c1.incarnation), "{step:?}");
            assert_eq!(step.position, saga_position);
            assert!(step.low_watermark <= saga_position, "{step:?}");
        }
    }
    let forward = c1.client.transfer(saga(pb::Recovery::Forward)).await.unwrap_err();
    assert_eq!(forward.code(), Code::FailedPrecondition, "{forward:?}");
    let as_2pc = c1.transfer(from + 1, to + 1, "key-2").await.unwrap_err();
    assert_eq!(as_2pc.code(), Code::FailedPrecondition, "{as_2pc:?}");

    // Past the retention: a new request, which moves the money again.
    clock.forward(HOUR_MS + 1_000);
    let anew = c1.transfer(from, to, "key-1").await.unwrap();
    assert_eq!(anew.outcome, pb::Outcome::Committed as i32);
    assert_ne!(anew.txn_id, first.txn_id);
    assert_eq!(c1.posted(from).await, INITIAL_BALANCE - 2);
    // And the retry of the new one answers the new one.
    assert_eq!(c1.transfer(from, to, "key-1").await.unwrap(), anew);

    // The first request's records and index entries are collected; the
    // new request's stay (its key record was rewritten: the old entry does
    // not take it).
    let first_finished = log::key(log::FINISHED_PREFIX, &id(&first.txn_id));
    let first_expiry = start_ms + RETENTION_MS;
    let records = eventually("the expired records are collected", async || {
        c1.committed(2, ACCOUNTS_EACH + 2).await; // an fsync, so that the disk shows the deletes
        let records = log_disk.durable_records();
        let stale = records.iter().any(|(key, _)| {
            *key == first_finished
                || (key.starts_with(log::EXPIRY_PREFIX) && log::parse_expiry_key(key).unwrap().0 <= first_expiry)
        });
        (!stale).then_some(records)
    })
    .await;
    let key_record = records.iter().find(|(key, _)| *key == log::key(log::KEY_PREFIX, &id("key-1"))).unwrap();
    assert_eq!(log::decode_keyed(&key_record.1).unwrap().txn.as_str(), anew.txn_id, "the new request's key stays");

    // Much later, everything that expires is gone, index included.
    clock.forward(2 * RETENTION_MS);
    eventually("every expired record and index entry is collected", async || {
        c1.committed(3, ACCOUNTS_EACH + 3).await;
        let now = clock.0.load(Ordering::Relaxed);
        let records = log_disk.durable_records();
        let left = records
            .iter()
            .filter(|(key, _)| key.starts_with(log::EXPIRY_PREFIX))
            .filter(|(key, _)| log::parse_expiry_key(key).unwrap().0 <= now)
            .count();
        let keys = records.iter().filter(|(key, _)| key.starts_with(log::KEY_PREFIX)).count();
        (left == 0 && keys == 0).then_some(())
    })
    .await;
    c1.stop().await;
}
