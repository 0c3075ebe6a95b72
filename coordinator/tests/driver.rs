//! In-process tests of the coordinator's driver over real gRPC on loopback:
//! a coordinator and its participants in this process, each serving on a
//! port of its own, their records on disks in memory, plaintext.
//!
//! What they pin down:
//! - commits are decided while an audit reads (it holds nothing up); an
//!   audit that cannot read a participant (paused: the link accepts and
//!   never answers) answers within a short bound, UNAVAILABLE naming that
//!   participant;
//! - while commits wait for a participant that rejects them (applied on
//!   the others, prepared there), an audit is exact: it counts them as
//!   applied;
//! - a COMMIT that its participant rejects (a non-retryable answer) does not
//!   take one of the participant's call slots for good: the other COMMITs
//!   keep flowing, and the rejected ones are delivered once the participant
//!   takes them, each exactly once; one batch of COMMITs with rejected
//!   ones in it is split, so that the others are delivered;
//! - a transfer whose accounts are both on one participant is one call to
//!   it (one-phase commit) and writes no decision record (none at all
//!   without an idempotency key; with one, the key's outcome, its intent
//!   gone), and a retry of the key gets its answer without another call;
//!   by default (`auto`) a keyed one goes by parallel commit instead (its
//!   staged record's fsync beside the prepare's); with `one_phase_commit`
//!   off, every such transfer runs 2PC;
//! - a TransferBatch runs each of its transfers as Transfer would and
//!   answers each in its place: a bad one fails alone, a refused one is
//!   refused alone, a key it used answers a later Transfer; an empty batch
//!   or one past the most is refused whole and runs nothing;
//! - a restarted coordinator sends the request of each logged one-phase
//!   intent again, whether its participant had applied it or not, and logs
//!   the participant's first answer under the key: a retry of the key gets
//!   it, and nothing is applied twice;
//! - a restarted coordinator is alive but not ready while a staged
//!   transaction it recovered waits for a vote, and ready once it is
//!   decided.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem::domain::Id;
use tandem::pb;
use tandem::pb::coordinator_client::CoordinatorClient;
use tandem::pb::participant_server::{Participant, ParticipantServer};
use tandem::proxy::LinkProxy;
use tandem::store::memory::MemoryDisk;
use tandem::store::{Disk, Op};
use tandem::tls::Security;
use tandem_coordinator::core::{CommitRecord, IntentRecord, OnePhaseCommit};
use tandem_coordinator::directory::Shard;
use tandem_coordinator::log;
use tandem_coordinator::node::{self, Node, NodeConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// Accounts each participant owns and opens: participant `i` (`p{i+1}`)
/// owns `i * ACCOUNTS_EACH .. (i + 1) * ACCOUNTS_EACH`.
const ACCOUNTS_EACH: u64 = 10;
const INITIAL_BALANCE: i64 = 1_000;
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
        idempotency_retention_ms: tandem_participant::saga::IDEMPOTENCY_RETENTION_DEFAULT_MS,
        owned_accounts: Some(index * ACCOUNTS_EACH..(index + 1) * ACCOUNTS_EACH),
        store_free_min_bytes: 0,
        security: Security::Insecure,
        network: tandem::net::Network::Tcp,
        wall_clock: tandem::clock::WallClock::System,
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
/// its decision log on `log`, serving on `listener`, and a client of it.
async fn coordinator(
    listener: TcpListener,
    url: &str,
    urls: &[String],
    log: MemoryDisk,
    call_timeout_ms: u64,
    stop: &mut Stop,
) -> CoordinatorClient<Channel> {
    coordinator_with(listener, url, urls, log, call_timeout_ms, OnePhaseCommit::Auto, stop).await
}

/// [`coordinator`], with one-phase commit as `one_phase_commit` says.
async fn coordinator_with(
    listener: TcpListener,
    url: &str,
    urls: &[String],
    log: MemoryDisk,
    call_timeout_ms: u64,
    one_phase_commit: OnePhaseCommit,
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
        disk: Disk::Memory(log),
        shards,
        prepare_timeout_ms: 5_000,
        call_timeout_ms,
        active_max: 1_000,
        idempotency_retention_ms: 24 * 3_600_000,
        wall_clock: tandem::clock::WallClock::System,
        incarnation_seed: None,
        saga_step_attempts: 3,
        saga_deadline_ms: 5_000,
        security: Security::Insecure,
        network: tandem::net::Network::Tcp,
        one_phase_commit,
        commit_protocol: tandem_coordinator::core::CommitProtocol::Parallel,
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

/// The audit, once it answers (it is UNAVAILABLE while a participant cannot be read).
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
async fn commits_go_on_while_an_audit_reads_their_commits_wait_for_it_and_one_that_cannot_read_a_paused_participant_names_it(
) {
    // COMMIT deadlines may legitimately be long; the audit's reads must not
    // be, so that it answers in bounded time.
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
    let mut client =
        coordinator(coordinator_listener, &coordinator_url, &urls, MemoryDisk::new(), CALL_TIMEOUT_MS, &mut stop).await;
    let total = 3 * ACCOUNTS_EACH as i64 * INITIAL_BALANCE;
    let audit = exact_audit(&mut client).await;
    assert_eq!((audit.total_posted, audit.total_reserved), (total, 0), "{audit:?}");

    p3_link.black_hole();
    let audit_started = Instant::now();
    let audit = tokio::spawn({
        let mut client = client.clone();
        async move { client.audit(pb::AuditRequest { include_accounts: false }).await }
    });
    // Transfers between p1 and p2, back to back, until the audit has
    // answered. It cannot answer before its read of p3 times out
    // (AUDIT_READ_TIMEOUT_MS): transfers begun and committed well inside
    // that window were decided while it read (an audit that held commits
    // back while reading would allow none).
    let commit_wait_max = Duration::from_millis(node::AUDIT_READ_TIMEOUT_MS + SCHEDULING_SLACK_MS);
    let window = (
        audit_started + Duration::from_millis(50),
        audit_started + Duration::from_millis(node::AUDIT_READ_TIMEOUT_MS - 50),
    );
    let mut p1 = tandem::pb::participant_client::ParticipantClient::new(
        tandem::server::channel(&urls[0], &Security::Insecure).unwrap(),
    );
    let mut committed = 0u64;
    let mut inside_the_read = 0u64;
    let mut held_seen = 0u64;
    let mut slowest = Duration::ZERO;
    // A COMMIT held back by the audit keeps its transaction in flight, and
    // this coordinator takes 1,000 at most (`active_max`): a quick machine
    // reaches that inside the read, and then the coordinator rightly
    // pushes back (RESOURCE_EXHAUSTED). Stay well under it.
    const HELD_MAX: u64 = 500;
    while !audit.is_finished() && committed < HELD_MAX {
        let started = Instant::now();
        let result = tokio::time::timeout(commit_wait_max, client.transfer(transfer(0, ACCOUNTS_EACH, 1)))
            .await
            .unwrap_or_else(|_| panic!("a commit waited more than {commit_wait_max:?} behind the audit"))
            .unwrap()
            .into_inner();
        assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
        committed += 1;
        slowest = slowest.max(started.elapsed());
        if started >= window.0 && Instant::now() <= window.1 {
            inside_the_read += 1;
            // Decided while the audit reads: applied nowhere until it ends
            // (its COMMITs wait), so p1 still holds it prepared, and every
            // other one decided inside the read.
            let read = pb::ReadBalancesRequest { include_accounts: false, include_prepared: false };
            let prepared = p1.read_balances(read).await.unwrap().into_inner().prepared_count;
            if !audit.is_finished() {
                assert!(
                    prepared >= inside_the_read,
                    "{prepared} prepared at p1, {inside_the_read} decided inside the read"
                );
                held_seen = held_seen.max(prepared);
            }
        }
    }
    let status = audit.await.unwrap().expect_err("p3 cannot be read");
    let audit_took = audit_started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("p3"), "the status names the participant: {}", status.message());
    assert!(!status.message().contains("p1") && !status.message().contains("p2"), "{}", status.message());
    assert!(audit_took < commit_wait_max, "the audit answered after {audit_took:?}");
    assert!(audit_took >= Duration::from_millis(node::AUDIT_READ_TIMEOUT_MS), "{audit_took:?}");
    assert!(inside_the_read > 0, "no commit was decided while the audit read ({committed} in all)");
    assert!(held_seen > 0, "no COMMIT was seen waiting for the audit");
    println!(
        "{committed} commits during the audit ({inside_the_read} begun and ended inside its read), the slowest in {slowest:?}; the audit answered in {audit_took:?}: {}",
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

/// What [`Refusing`] refuses.
#[derive(Default)]
struct Refusals {
    /// The next this many prepares get their transaction's COMMIT refused.
    refuse_next: usize,
    /// Transactions whose COMMIT is refused while `accepting` is false.
    refused: BTreeSet<String>,
    accepting: bool,
    /// COMMIT calls refused so far.
    calls_refused: u64,
}

/// A participant that answers COMMITs of chosen transactions with
/// INVALID_ARGUMENT, as a participant does for a transaction it aborted,
/// until told to accept them; everything else is the real participant's.
#[derive(Clone)]
struct Refusing {
    node: tandem_participant::node::Node,
    refusals: Arc<Mutex<Refusals>>,
}

impl Refusing {
    fn refuse(&self, txn_ids: &[String]) -> Result<(), Status> {
        let mut refusals = self.refusals.lock().unwrap();
        if refusals.accepting {
            return Ok(());
        }
        if let Some(txn) = txn_ids.iter().find(|txn| refusals.refused.contains(*txn)) {
            refusals.calls_refused += 1;
            return Err(Status::invalid_argument(format!(
                "{txn} is aborted here; a commit for it breaks the protocol"
            )));
        }
        Ok(())
    }
}

/// `Participant` for [`Refusing`]: the methods given, and the others
/// handed to the real participant unchanged. (The attribute is emitted here,
/// so that it sees the methods this macro writes.)
macro_rules! participant_with {
    ($server:ty, { $($own:item)* } $($method:ident($request:ty) -> $response:ty;)*) => {
        #[tonic::async_trait]
        impl Participant for $server {
            $($own)*
            $(async fn $method(&self, request: Request<$request>) -> Result<Response<$response>, Status> {
                Participant::$method(&self.node, request).await
            })*
        }
    };
}

participant_with! {
    Refusing,
    {
        async fn prepare_batch(
            &self,
            request: Request<pb::PrepareBatchRequest>,
        ) -> Result<Response<pb::PrepareBatchResponse>, Status> {
            {
                let mut refusals = self.refusals.lock().unwrap();
                for prepare in &request.get_ref().prepares {
                    if refusals.refuse_next > 0 {
                        refusals.refuse_next -= 1;
                        refusals.refused.insert(prepare.txn_id.clone());
                    }
                }
            }
            // COMMITs riding on the prepares are refused as CommitBatch
            // would refuse them, and the prepares still judged.
            let mut request = request;
            let riding = request.get_ref().commits.as_ref().map(|commits| self.refuse(&commits.txn_ids));
            let refused = match riding {
                Some(Err(status)) => {
                    request.get_mut().commits = None;
                    Some(status)
                }
                _ => None,
            };
            let mut response = Participant::prepare_batch(&self.node, request).await?;
            if let Some(status) = refused {
                response.get_mut().commits_refused_code = status.code() as i32;
                response.get_mut().commits_refused_reason = status.message().to_string();
            }
            Ok(response)
        }

        async fn commit(&self, request: Request<pb::DecisionRequest>) -> Result<Response<pb::DecisionResponse>, Status> {
            self.refuse(std::slice::from_ref(&request.get_ref().txn_id))?;
            Participant::commit(&self.node, request).await
        }

        async fn commit_batch(
            &self,
            request: Request<pb::DecisionBatchRequest>,
        ) -> Result<Response<pb::DecisionResponse>, Status> {
            self.refuse(&request.get_ref().txn_ids)?;
            Participant::commit_batch(&self.node, request).await
        }
    }
    prepare(pb::PrepareRequest) -> pb::PrepareResponse;
    abort(pb::DecisionRequest) -> pb::DecisionResponse;
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
    saga_step_batch(pb::SagaStepBatchRequest) -> pb::SagaStepBatchResponse;
    start_transfer(pb::StartTransferRequest) -> pb::TransferStatus;
    get_transfer_status(pb::GetTransferStatusRequest) -> pb::TransferStatus;
    list_parked_transfers(pb::ListParkedTransfersRequest) -> pb::ListParkedTransfersResponse;
    resolve_parked_transfer(pb::ResolveParkedTransferRequest) -> pb::TransferStatus;
    deliver_event(pb::ChoreographyEvent) -> pb::DeliverEventResponse;
    deliver_events(pb::DeliverEventsRequest) -> pb::DeliverEventsResponse;
    commit_one_phase(pb::OnePhaseRequest) -> pb::OnePhaseResponse;
    commit_one_phase_batch(pb::OnePhaseBatchRequest) -> pb::OnePhaseBatchResponse;
}

/// p1, reached through a [`Refusing`] server: it and its URL.
async fn refusing_p1(coordinator_url: &str, stop: &mut Stop) -> (Refusing, String) {
    let (listener, _) = bind().await;
    let p1 = participant(0, listener, coordinator_url, stop).await;
    let refusing = Refusing { node: p1, refusals: Arc::default() };
    let (listener, url) = bind().await;
    let (sender, stopped) = oneshot::channel();
    stop.0.push(sender);
    // Healthy, as the coordinator's readiness probe asks.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ParticipantServer<Refusing>>().await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(ParticipantServer::new(refusing.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                until_stopped(stopped),
            ),
    );
    (refusing, url)
}

async fn state(client: &mut CoordinatorClient<Channel>, txn: &str) -> pb::TransactionStatus {
    client.get_transaction(pb::GetTransactionRequest { txn_id: txn.into() }).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_a_participant_rejects_leave_its_call_slots_and_are_delivered_once_it_takes_them() {
    let mut stop = Stop(Vec::new());
    let (coordinator_listener, coordinator_url) = bind().await;
    // p1 is the real participant, reached through a server that refuses
    // chosen COMMITs; p2 is plain.
    let (refusing, p1_url) = refusing_p1(&coordinator_url, &mut stop).await;
    let (listener, p2_url) = bind().await;
    participant(1, listener, &coordinator_url, &mut stop).await;
    let mut client =
        coordinator(coordinator_listener, &coordinator_url, &[p1_url, p2_url], MemoryDisk::new(), 1_000, &mut stop)
            .await;

    // More refused COMMITs than p1 has call slots, one after the other, so
    // that each goes out alone while the earlier ones are refused.
    let refused_count = node::BATCHES_IN_FLIGHT_MAX + 1;
    refusing.refusals.lock().unwrap().refuse_next = refused_count;
    let mut refused = Vec::new();
    for _ in 0..refused_count {
        let result = client.transfer(transfer(0, ACCOUNTS_EACH, 1)).await.unwrap().into_inner();
        assert_eq!(result.outcome, pb::Outcome::Committed as i32, "the decision is durable: {result:?}");
        refused.push(result.txn_id);
    }
    assert_eq!(refusing.refusals.lock().unwrap().refused, refused.iter().cloned().collect());
    eventually("p1 has refused every one of them", async || {
        (refusing.refusals.lock().unwrap().calls_refused >= refused_count as u64).then_some(())
    })
    .await;

    // The next COMMITs to p1 are delivered: the refused ones hold no slot.
    for _ in 0..3 {
        let result = client.transfer(transfer(1, ACCOUNTS_EACH + 1, 1)).await.unwrap().into_inner();
        assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
        let txn = result.txn_id;
        eventually("a COMMIT behind the refused ones is acknowledged", async || {
            (state(&mut client, &txn).await.state == pb::TransactionState::Committed as i32).then_some(())
        })
        .await;
    }
    // The refused ones are not given up: still committing, waiting for p1
    // only (p2 acknowledged its COMMITs).
    for txn in &refused {
        eventually("a refused COMMIT waits for p1 only", async || {
            let status = state(&mut client, txn).await;
            assert_ne!(status.state, pb::TransactionState::Committed as i32, "{status:?}");
            (status.state == pb::TransactionState::Committing as i32 && status.pending_participants == ["p1"])
                .then_some(())
        })
        .await;
    }
    // They are offered again, out of the slots, and slowly.
    eventually("the refused COMMITs are offered again", async || {
        (refusing.refusals.lock().unwrap().calls_refused >= 2 * refused_count as u64).then_some(())
    })
    .await;
    let calls = refusing.refusals.lock().unwrap().calls_refused;
    assert!(calls < 10 * refused_count as u64, "refused COMMITs are offered again slowly: {calls} calls");

    // While they wait, applied on p2 and prepared on p1, an audit is exact:
    // it counts their legs prepared on p1 as applied.
    let total = 2 * ACCOUNTS_EACH as i64 * INITIAL_BALANCE;
    let audit = exact_audit(&mut client).await;
    assert_eq!((audit.total_posted, audit.total_reserved), (total, 0), "{audit:?}");
    assert_eq!(posted(&audit, 0), INITIAL_BALANCE - refused_count as i64);
    assert_eq!(posted(&audit, ACCOUNTS_EACH), INITIAL_BALANCE + refused_count as i64);
    assert_eq!(audit.commits_in_flight, refused_count as u64, "{audit:?}");

    // p1 takes them now: each is delivered, and applied once.
    refusing.refusals.lock().unwrap().accepting = true;
    for txn in &refused {
        eventually("a COMMIT that was refused is delivered once p1 takes it", async || {
            (state(&mut client, txn).await.state == pb::TransactionState::Committed as i32).then_some(())
        })
        .await;
    }
    let audit = exact_audit(&mut client).await;
    assert_eq!((audit.total_posted, audit.total_reserved, audit.total_suspense), (total, 0, 0), "{audit:?}");
    assert_eq!(audit.commits_in_flight, 0);
    assert_eq!(posted(&audit, 0), INITIAL_BALANCE - refused_count as i64);
    assert_eq!(posted(&audit, ACCOUNTS_EACH), INITIAL_BALANCE + refused_count as i64);
    assert_eq!(posted(&audit, 1), INITIAL_BALANCE - 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_batch_of_commits_is_split_so_that_the_others_in_it_are_delivered() {
    let mut stop = Stop(Vec::new());
    let (coordinator_listener, coordinator_url) = bind().await;
    let (refusing, p1_url) = refusing_p1(&coordinator_url, &mut stop).await;
    let (listener, p2_url) = bind().await;
    let p2 = participant(1, listener, &coordinator_url, &mut stop).await;

    // Transactions that c1 prepared at both participants and decided to
    // commit before it stopped: restarted, it sends their COMMITs together,
    // in one batch per participant. p1 rejects two of them.
    const LOGGED: u64 = 8;
    let (from, to) = (2, ACCOUNTS_EACH + 2);
    let log = MemoryDisk::new();
    let store = log.open().unwrap();
    let mut txns = Vec::new();
    for i in 0..LOGGED {
        let txn = format!("t{i}");
        for (node, account, amount) in [(&refusing.node, from, -1), (&p2, to, 1)] {
            let prepare = pb::PrepareRequest {
                txn_id: txn.clone(),
                coordinator_id: "c1".into(),
                legs: vec![pb::Leg { account, amount }],
                ..Default::default()
            };
            let vote = Participant::prepare(node, Request::new(prepare)).await.unwrap().into_inner();
            assert_eq!(vote.vote, pb::Vote::Yes as i32, "{vote:?}");
        }
        let record = CommitRecord { participants: vec![id("p1"), id("p2")], idempotency_key: None, position: 0 };
        let decision = Op::Put(log::key(log::DECISION_PREFIX, &id(&txn)), log::encode_commit(&record).unwrap());
        store.write(vec![decision]).await.unwrap();
        txns.push(txn);
    }
    store.close();
    drop(store);
    let refused: BTreeSet<String> = [txns[1].clone(), txns[6].clone()].into();
    refusing.refusals.lock().unwrap().refused = refused.clone();
    let mut client =
        coordinator(coordinator_listener, &coordinator_url, &[p1_url, p2_url], log, 1_000, &mut stop).await;

    for txn in txns.iter().filter(|txn| !refused.contains(*txn)) {
        eventually("a COMMIT batched with rejected ones is acknowledged", async || {
            (state(&mut client, txn).await.state == pb::TransactionState::Committed as i32).then_some(())
        })
        .await;
    }
    for txn in &refused {
        eventually("a rejected COMMIT waits for p1 only", async || {
            let status = state(&mut client, txn).await;
            assert_ne!(status.state, pb::TransactionState::Committed as i32, "{status:?}");
            (status.state == pb::TransactionState::Committing as i32 && status.pending_participants == ["p1"])
                .then_some(())
        })
        .await;
    }

    refusing.refusals.lock().unwrap().accepting = true;
    for txn in &refused {
        eventually("a COMMIT that was rejected is delivered once p1 takes it", async || {
            (state(&mut client, txn).await.state == pb::TransactionState::Committed as i32).then_some(())
        })
        .await;
    }
    let audit = exact_audit(&mut client).await;
    let total = 2 * ACCOUNTS_EACH as i64 * INITIAL_BALANCE;
    assert_eq!((audit.total_posted, audit.total_reserved, audit.total_suspense), (total, 0, 0), "{audit:?}");
    assert_eq!(posted(&audit, from), INITIAL_BALANCE - LOGGED as i64, "each COMMIT applied once");
    assert_eq!(posted(&audit, to), INITIAL_BALANCE + LOGGED as i64, "each COMMIT applied once");
}

/// The calls a [`Counting`] participant received, by method.
type Calls = Arc<Mutex<std::collections::BTreeMap<&'static str, u64>>>;

/// The real participant, counting the 2PC and one-phase calls it gets.
#[derive(Clone)]
struct Counting {
    node: tandem_participant::node::Node,
    calls: Calls,
}

impl Counting {
    fn count(&self, method: &'static str) {
        *self.calls.lock().unwrap().entry(method).or_default() += 1;
    }
}

participant_with! {
    Counting,
    {
        async fn prepare(&self, request: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareResponse>, Status> {
            self.count("prepare");
            Participant::prepare(&self.node, request).await
        }

        async fn prepare_batch(
            &self,
            request: Request<pb::PrepareBatchRequest>,
        ) -> Result<Response<pb::PrepareBatchResponse>, Status> {
            self.count("prepare_batch");
            if request.get_ref().commits.is_some() {
                self.count("commits_riding");
            }
            Participant::prepare_batch(&self.node, request).await
        }

        async fn commit(&self, request: Request<pb::DecisionRequest>) -> Result<Response<pb::DecisionResponse>, Status> {
            self.count("commit");
            Participant::commit(&self.node, request).await
        }

        async fn commit_batch(
            &self,
            request: Request<pb::DecisionBatchRequest>,
        ) -> Result<Response<pb::DecisionResponse>, Status> {
            self.count("commit_batch");
            Participant::commit_batch(&self.node, request).await
        }

        async fn abort(&self, request: Request<pb::DecisionRequest>) -> Result<Response<pb::DecisionResponse>, Status> {
            self.count("abort");
            Participant::abort(&self.node, request).await
        }

        async fn commit_one_phase(
            &self,
            request: Request<pb::OnePhaseRequest>,
        ) -> Result<Response<pb::OnePhaseResponse>, Status> {
            self.count("commit_one_phase");
            Participant::commit_one_phase(&self.node, request).await
        }

        async fn commit_one_phase_batch(
            &self,
            request: Request<pb::OnePhaseBatchRequest>,
        ) -> Result<Response<pb::OnePhaseBatchResponse>, Status> {
            self.count("commit_one_phase_batch");
            Participant::commit_one_phase_batch(&self.node, request).await
        }
    }
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
    saga_step_batch(pb::SagaStepBatchRequest) -> pb::SagaStepBatchResponse;
    start_transfer(pb::StartTransferRequest) -> pb::TransferStatus;
    get_transfer_status(pb::GetTransferStatusRequest) -> pb::TransferStatus;
    list_parked_transfers(pb::ListParkedTransfersRequest) -> pb::ListParkedTransfersResponse;
    resolve_parked_transfer(pb::ResolveParkedTransferRequest) -> pb::TransferStatus;
    deliver_event(pb::ChoreographyEvent) -> pb::DeliverEventResponse;
    deliver_events(pb::DeliverEventsRequest) -> pb::DeliverEventsResponse;
}

/// p1 (counting its calls) and p2, and c1 over them with one-phase commit
/// as `one_phase_commit` says, its log on `log`.
async fn counted_cluster(
    log: MemoryDisk,
    one_phase_commit: OnePhaseCommit,
    stop: &mut Stop,
) -> (Calls, CoordinatorClient<Channel>) {
    let (coordinator_listener, coordinator_url) = bind().await;
    let (listener, _) = bind().await;
    let p1 = participant(0, listener, &coordinator_url, stop).await;
    let counting = Counting { node: p1, calls: Calls::default() };
    let (listener, p1_url) = bind().await;
    let (sender, stopped) = oneshot::channel();
    stop.0.push(sender);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ParticipantServer<Counting>>().await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(ParticipantServer::new(counting.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                until_stopped(stopped),
            ),
    );
    let (listener, p2_url) = bind().await;
    participant(1, listener, &coordinator_url, stop).await;
    let client =
        coordinator_with(coordinator_listener, &coordinator_url, &[p1_url, p2_url], log, 1_000, one_phase_commit, stop)
            .await;
    (counting.calls, client)
}

/// The prefixes of the records in the coordinator's log (`m/` apart: the
/// incarnation, the generation and the watermarks), each once, once what
/// was written is durable.
async fn logged_prefixes(log: &MemoryDisk) -> BTreeSet<String> {
    // The watermark round (every 50 ms) ends with an fsync, which makes
    // every earlier write durable.
    tokio::time::sleep(Duration::from_millis(4 * node::WATERMARK_INTERVAL_MS)).await;
    log.durable_records()
        .into_iter()
        .map(|(key, _)| String::from_utf8_lossy(&key[..2]).into_owned())
        .filter(|prefix| prefix != "m/")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_on_one_participant_is_one_call_to_it_and_writes_no_decision_record() {
    let mut stop = Stop(Vec::new());
    let log = MemoryDisk::new();
    let (calls, mut client) = counted_cluster(log.clone(), OnePhaseCommit::Always, &mut stop).await;
    let result = client.transfer(transfer(0, 1, 5)).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    assert_eq!(
        *calls.lock().unwrap(),
        [("commit_one_phase_batch", 1)].into(),
        "one call to p1, no prepare and no COMMIT"
    );
    assert!(logged_prefixes(&log).await.is_empty(), "no decision, no end record, nothing for it in the log");
    let status = state(&mut client, &result.txn_id).await;
    assert_eq!(status.state, pb::TransactionState::Unknown as i32, "only its client heard it: {status:?}");
    // A refusal is one call too, and moves nothing.
    let result = client.transfer(transfer(2, 3, 5 * INITIAL_BALANCE)).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Aborted as i32, "{result:?}");
    assert_eq!(result.abort_reason, pb::AbortReason::InsufficientFunds as i32, "{result:?}");
    assert_eq!(calls.lock().unwrap().get("commit_one_phase_batch"), Some(&2));
    assert!(logged_prefixes(&log).await.is_empty());

    // With an idempotency key: still one call; the key's outcome is logged
    // (its intent gone), and a retry gets it without another call.
    let keyed = pb::TransferRequest { idempotency_key: "k1".into(), ..transfer(0, 1, 7) };
    let result = client.transfer(keyed.clone()).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    assert_eq!(calls.lock().unwrap().get("commit_one_phase_batch"), Some(&3));
    let prefixes = logged_prefixes(&log).await;
    assert_eq!(prefixes, ["f/", "k/", "x/"].map(String::from).into(), "the key's result, its status and their expiry");
    let again = client.transfer(keyed.clone()).await.unwrap().into_inner();
    assert_eq!((again.outcome, &again.txn_id), (result.outcome, &result.txn_id), "the first answer");
    let other = pb::TransferRequest { amount: 8, ..keyed };
    let status = client.transfer(other).await.expect_err("the key was used for another request");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(calls.lock().unwrap().get("commit_one_phase_batch"), Some(&3), "no call for the retries");
    assert_eq!(state(&mut client, &result.txn_id).await.state, pb::TransactionState::Committed as i32);

    // Across participants, 2PC as before.
    let result = client.transfer(transfer(0, ACCOUNTS_EACH, 1)).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    eventually("the COMMIT reaches p1", async || (calls.lock().unwrap().get("commit_batch") == Some(&1)).then_some(()))
        .await;
    assert_eq!(calls.lock().unwrap().get("prepare_batch"), Some(&1));
    let audit = exact_audit(&mut client).await;
    assert_eq!(posted(&audit, 0), INITIAL_BALANCE - 5 - 7 - 1, "each transfer applied once");
    assert_eq!(posted(&audit, 1), INITIAL_BALANCE + 5 + 7);
    assert_eq!((audit.total_posted, audit.total_reserved), (2 * ACCOUNTS_EACH as i64 * INITIAL_BALANCE, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_ride_on_the_next_prepares_to_their_participant_and_apply_once() {
    let mut stop = Stop(Vec::new());
    let (calls, mut client) = counted_cluster(MemoryDisk::new(), OnePhaseCommit::Auto, &mut stop).await;
    // Back to back across both participants: a transfer's COMMITs wait
    // COMMIT_LINGER_MS for a prepare to ride on, and the next transfer's
    // prepares follow within a round trip (on a loaded machine some may
    // not: each COMMIT then goes alone, and the money moves the same).
    // At least 40, and on until one COMMIT rode (at most 400).
    let riding = || calls.lock().unwrap().get("commits_riding").copied().unwrap_or(0);
    let mut transfers: i64 = 0;
    while transfers < 40 || (riding() == 0 && transfers < 400) {
        let result = client.transfer(transfer(0, ACCOUNTS_EACH, 1)).await.unwrap().into_inner();
        assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
        transfers += 1;
    }
    eventually("every COMMIT is applied", async || {
        let audit = exact_audit(&mut client).await;
        (audit.total_reserved == 0 && posted(&audit, ACCOUNTS_EACH) == INITIAL_BALANCE + transfers).then_some(audit)
    })
    .await;
    let audit = exact_audit(&mut client).await;
    assert_eq!(posted(&audit, 0), INITIAL_BALANCE - transfers, "each transfer applied once");
    assert_eq!(audit.total_posted, 2 * ACCOUNTS_EACH as i64 * INITIAL_BALANCE, "no money made or lost");
    let calls = calls.lock().unwrap().clone();
    let riding = calls.get("commits_riding").copied().unwrap_or(0);
    assert!(riding > 0, "no COMMIT rode on a prepare in {transfers} transfers back to back: {calls:?}");
    let commit_calls = calls.get("commit_batch").copied().unwrap_or(0);
    assert!(
        commit_calls < 2 * transfers as u64,
        "fewer COMMIT calls than COMMITs, since some rode on prepares: {calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_phase_commit_off_a_transfer_on_one_participant_runs_2pc() {
    let mut stop = Stop(Vec::new());
    let log = MemoryDisk::new();
    let (calls, mut client) = counted_cluster(log.clone(), OnePhaseCommit::Off, &mut stop).await;
    let result = client.transfer(transfer(0, 1, 5)).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    eventually("the COMMIT reaches p1", async || (calls.lock().unwrap().get("commit_batch") == Some(&1)).then_some(()))
        .await;
    assert_eq!(calls.lock().unwrap().get("prepare_batch"), Some(&1));
    assert_eq!(calls.lock().unwrap().get("commit_one_phase_batch"), None);
    eventually("the end record replaces the decision", async || {
        (state(&mut client, &result.txn_id).await.state == pb::TransactionState::Committed as i32).then_some(())
    })
    .await;
    assert!(logged_prefixes(&log).await.contains("f/"), "classic 2PC logs its decision, then its end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_keyed_transfer_on_one_participant_goes_by_parallel_commit_and_an_unkeyed_one_in_one_phase() {
    let mut stop = Stop(Vec::new());
    let log = MemoryDisk::new();
    let (calls, mut client) = counted_cluster(log.clone(), OnePhaseCommit::Auto, &mut stop).await;
    let result = client.transfer(transfer(0, 1, 5)).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    assert_eq!(*calls.lock().unwrap(), [("commit_one_phase_batch", 1)].into(), "unkeyed: one phase");

    let keyed = pb::TransferRequest { idempotency_key: "k1".into(), ..transfer(0, 1, 7) };
    let result = client.transfer(keyed.clone()).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    eventually("the COMMIT reaches p1", async || (calls.lock().unwrap().get("commit_batch") == Some(&1)).then_some(()))
        .await;
    assert_eq!(calls.lock().unwrap().get("prepare_batch"), Some(&1), "keyed: a prepare");
    assert_eq!(calls.lock().unwrap().get("commit_one_phase_batch"), Some(&1), "and no one-phase call");
    eventually("the end record replaces the staged one", async || {
        (state(&mut client, &result.txn_id).await.state == pb::TransactionState::Committed as i32).then_some(())
    })
    .await;
    let prefixes = logged_prefixes(&log).await;
    assert!(!prefixes.contains("i/") && !prefixes.contains("p/"), "no intent, no staged record left: {prefixes:?}");
    let again = client.transfer(keyed).await.unwrap().into_inner();
    assert_eq!((again.outcome, &again.txn_id), (result.outcome, &result.txn_id), "the key's first answer");
    assert_eq!(calls.lock().unwrap().get("prepare_batch"), Some(&1), "and no call for the retry");
    let audit = exact_audit(&mut client).await;
    assert_eq!(posted(&audit, 0), INITIAL_BALANCE - 5 - 7, "each transfer applied once");
    assert_eq!(posted(&audit, 1), INITIAL_BALANCE + 5 + 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_batch_runs_each_transfer_on_its_own_and_answers_each_in_its_place() {
    let mut stop = Stop(Vec::new());
    let (calls, mut client) = counted_cluster(MemoryDisk::new(), OnePhaseCommit::Auto, &mut stop).await;
    let keyed = pb::TransferRequest { idempotency_key: "k-batch".into(), ..transfer(0, ACCOUNTS_EACH, 3) };
    let batch = pb::TransferBatchRequest {
        transfers: vec![
            transfer(1, ACCOUNTS_EACH + 1, 5),
            keyed.clone(),
            transfer(2, 3, 0),
            transfer(4, 5, 2 * INITIAL_BALANCE),
            transfer(6, 7, 11),
        ],
    };
    let results = client.transfer_batch(batch).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 5, "{results:?}");
    let outcome = |i: usize| results[i].result.as_ref().map(|r| (r.outcome, r.abort_reason));
    let committed = Some((pb::Outcome::Committed as i32, 0));
    assert_eq!((outcome(0), outcome(1), outcome(4)), (committed, committed, committed), "{results:?}");
    assert_eq!(results[2].result, None, "a bad transfer fails alone: {results:?}");
    assert_eq!(results[2].status_code, Code::InvalidArgument as i32);
    assert!(results[2].status_message.contains("amount"), "{}", results[2].status_message);
    let refused = Some((pb::Outcome::Aborted as i32, pb::AbortReason::InsufficientFunds as i32));
    assert_eq!(outcome(3), refused, "{results:?}");
    // Its key answers a later Transfer with the batch's result.
    let again = client.transfer(keyed).await.unwrap().into_inner();
    assert_eq!(Some(&again.txn_id), results[1].result.as_ref().map(|r| &r.txn_id));

    // Empty, or past the most: refused whole, and nothing runs.
    let prepares_before = calls.lock().unwrap().get("prepare_batch").copied();
    let status = client.transfer_batch(pb::TransferBatchRequest { transfers: Vec::new() }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let too_many = vec![transfer(0, 1, 1); node::TRANSFER_BATCH_MAX + 1];
    let status = client.transfer_batch(pb::TransferBatchRequest { transfers: too_many }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("256"), "{status:?}");
    assert_eq!(calls.lock().unwrap().get("prepare_batch").copied(), prepares_before);
    let audit = exact_audit(&mut client).await;
    assert_eq!(posted(&audit, 0), INITIAL_BALANCE - 3, "each transfer applied once");
    assert_eq!(posted(&audit, 1), INITIAL_BALANCE - 5);
    assert_eq!(posted(&audit, 4), INITIAL_BALANCE, "refused");
    assert_eq!(posted(&audit, 7), INITIAL_BALANCE + 11);
    assert_eq!(posted(&audit, ACCOUNTS_EACH), INITIAL_BALANCE + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_sends_each_logged_intent_again_and_logs_the_first_answer_under_its_key() {
    let mut stop = Stop(Vec::new());
    let log_disk = MemoryDisk::new();
    // The log of a coordinator that crashed with two keyed one-phase
    // transfers in flight: t-applied reached p1 (which applied it), t-lost
    // never left. Its incarnation and generation are known, so that the
    // restarted coordinator stamps as it did.
    let (listener, p1_url) = bind().await;
    let (coordinator_listener, coordinator_url) = bind().await;
    let p1 = participant(0, listener, &coordinator_url, &mut stop).await;
    let (listener, p2_url) = bind().await;
    participant(1, listener, &coordinator_url, &mut stop).await;
    let incarnation = 0x1234_5678_9abc_def0u64;
    let txn = |sequence| log::txn_id(&id("c1"), incarnation, 1, sequence).unwrap();
    let (applied, lost) = (txn(1), txn(2));
    let intent = |key: &str, sequence: u64, amount: i64| IntentRecord {
        participant: id("p1"),
        idempotency_key: id(key),
        position: log::position(1, sequence).unwrap(),
        legs: vec![tandem::domain::Leg { account: 2, amount: -amount }, tandem::domain::Leg { account: 3, amount }],
    };
    let store = log_disk.open().unwrap();
    let mut ops = vec![
        Op::Put(log::GENERATION_KEY.to_vec(), 1u64.to_le_bytes().to_vec()),
        Op::Put(log::INCARNATION_KEY.to_vec(), incarnation.to_le_bytes().to_vec()),
    ];
    ops.extend(log::intent_ops(&applied, &intent("k-applied", 1, 10)).unwrap());
    ops.extend(log::intent_ops(&lost, &intent("k-lost", 2, 20)).unwrap());
    store.write(ops).await.unwrap();
    store.close();
    drop(store);
    let request = pb::OnePhaseRequest {
        txn_id: applied.to_string(),
        coordinator_id: "c1".into(),
        legs: vec![pb::Leg { account: 2, amount: -10 }, pb::Leg { account: 3, amount: 10 }],
        coordinator_incarnation: incarnation,
        position: log::position(1, 1).unwrap(),
        low_watermark: 1,
        idempotency_key: "k-applied".into(),
        trace_parent: String::new(),
    };
    let answer = Participant::commit_one_phase(&p1, Request::new(request)).await.unwrap().into_inner();
    assert_eq!(answer.outcome, pb::OnePhaseOutcome::Committed as i32, "{answer:?}");

    let mut client =
        coordinator(coordinator_listener, &coordinator_url, &[p1_url, p2_url], log_disk.clone(), 1_000, &mut stop)
            .await;
    for (txn, key, amount) in [(&applied, "k-applied", 10), (&lost, "k-lost", 20)] {
        let retry = pb::TransferRequest { idempotency_key: key.into(), ..transfer(2, 3, amount) };
        let result = eventually("the key's outcome is logged", async || match client.transfer(retry.clone()).await {
            Ok(result) => Some(result.into_inner()),
            Err(status) if status.code() == Code::Aborted => None, // in flight
            Err(status) => panic!("{key}: {status:?}"),
        })
        .await;
        assert_eq!((result.outcome, result.txn_id.as_str()), (pb::Outcome::Committed as i32, txn.as_str()));
    }
    eventually("each intent is gone with its outcome logged", async || {
        let records = log_disk.durable_records();
        let intents = records.iter().filter(|(key, _)| key.starts_with(log::INTENT_PREFIX)).count();
        let keys = records.iter().filter(|(key, _)| key.starts_with(log::KEY_PREFIX)).count();
        (intents == 0 && keys == 2).then_some(())
    })
    .await;
    let audit = exact_audit(&mut client).await;
    assert_eq!(posted(&audit, 2), INITIAL_BALANCE - 30, "each applied once");
    assert_eq!(posted(&audit, 3), INITIAL_BALANCE + 30);
}

/// A participant whose prepares wait until `open` turns true (its health
/// answers SERVING all along): a recovered transaction stays undecided for
/// as long as the test wants.
#[derive(Clone)]
struct Stalling {
    node: tandem_participant::node::Node,
    open: tokio::sync::watch::Receiver<bool>,
}

impl Stalling {
    async fn wait_open(&self) {
        let mut open = self.open.clone();
        let _ = open.wait_for(|open| *open).await;
    }
}

participant_with! {
    Stalling,
    {
        async fn prepare(&self, request: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareResponse>, Status> {
            self.wait_open().await;
            Participant::prepare(&self.node, request).await
        }

        async fn prepare_batch(
            &self,
            request: Request<pb::PrepareBatchRequest>,
        ) -> Result<Response<pb::PrepareBatchResponse>, Status> {
            self.wait_open().await;
            Participant::prepare_batch(&self.node, request).await
        }
    }
    commit(pb::DecisionRequest) -> pb::DecisionResponse;
    commit_batch(pb::DecisionBatchRequest) -> pb::DecisionResponse;
    abort(pb::DecisionRequest) -> pb::DecisionResponse;
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
    saga_step_batch(pb::SagaStepBatchRequest) -> pb::SagaStepBatchResponse;
    start_transfer(pb::StartTransferRequest) -> pb::TransferStatus;
    get_transfer_status(pb::GetTransferStatusRequest) -> pb::TransferStatus;
    list_parked_transfers(pb::ListParkedTransfersRequest) -> pb::ListParkedTransfersResponse;
    resolve_parked_transfer(pb::ResolveParkedTransferRequest) -> pb::TransferStatus;
    deliver_event(pb::ChoreographyEvent) -> pb::DeliverEventResponse;
    deliver_events(pb::DeliverEventsRequest) -> pb::DeliverEventsResponse;
    commit_one_phase(pb::OnePhaseRequest) -> pb::OnePhaseResponse;
    commit_one_phase_batch(pb::OnePhaseBatchRequest) -> pb::OnePhaseBatchResponse;
}

/// The coordinator's answer for health service `service`.
async fn health_of(url: &str, service: &str) -> i32 {
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(tandem::server::channel(url, &Security::Insecure).unwrap());
    let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
    health.check(request).await.map(|answer| answer.into_inner().status).unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_is_not_ready_while_it_recovers_a_staged_transaction_and_is_once_that_is_decided() {
    use tonic_health::pb::health_check_response::ServingStatus as Answer;
    let mut stop = Stop(Vec::new());
    let log_disk = MemoryDisk::new();
    let (coordinator_listener, coordinator_url) = bind().await;
    let (listener, p1_url) = bind().await;
    participant(0, listener, &coordinator_url, &mut stop).await;
    // p2 answers its health at once and its prepares only once opened.
    let (listener, _) = bind().await;
    let p2 = participant(1, listener, &coordinator_url, &mut stop).await;
    let (open, opened) = tokio::sync::watch::channel(false);
    let stalling = Stalling { node: p2, open: opened };
    let (listener, p2_url) = bind().await;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ParticipantServer<Stalling>>().await;
    let (sender, stopped) = oneshot::channel();
    stop.0.push(sender);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(ParticipantServer::new(stalling))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                until_stopped(stopped),
            ),
    );
    // The log of a coordinator that crashed after staging a transfer from
    // p1 to p2 (parallel commit): the restart prepares it again.
    let incarnation = 0x0fed_cba9_8765_4321u64;
    let txn = log::txn_id(&id("c1"), incarnation, 1, 1).unwrap();
    let record = tandem_coordinator::core::StagedRecord {
        idempotency_key: None,
        position: log::position(1, 1).unwrap(),
        fingerprint: 0,
        legs: [
            (id("p1"), vec![tandem::domain::Leg { account: 0, amount: -5 }]),
            (id("p2"), vec![tandem::domain::Leg { account: ACCOUNTS_EACH, amount: 5 }]),
        ]
        .into_iter()
        .collect(),
    };
    let store = log_disk.open().unwrap();
    let mut ops = vec![
        Op::Put(log::GENERATION_KEY.to_vec(), 1u64.to_le_bytes().to_vec()),
        Op::Put(log::INCARNATION_KEY.to_vec(), incarnation.to_le_bytes().to_vec()),
    ];
    ops.extend(log::staged_ops(&txn, &record).unwrap());
    store.write(ops).await.unwrap();
    store.close();
    drop(store);

    let mut client =
        coordinator(coordinator_listener, &coordinator_url, &[p1_url, p2_url], log_disk.clone(), 1_000, &mut stop)
            .await;
    // Both participants are reachable, yet the coordinator is not ready: a
    // recovered transaction waits for its votes.
    eventually("both participants are seen reachable", async || {
        let p1 = health_of(&coordinator_url, &node::participant_ready_service(&id("p1"))).await;
        let p2 = health_of(&coordinator_url, &node::participant_ready_service(&id("p2"))).await;
        (p1 == Answer::Serving as i32 && p2 == Answer::Serving as i32).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2 * node::READY_PROBE_INTERVAL_MS)).await;
    assert_eq!(health_of(&coordinator_url, node::READY_SERVICE).await, Answer::NotServing as i32);
    assert_eq!(health_of(&coordinator_url, "").await, Answer::Serving as i32, "alive all along");

    // p2 votes: the transaction commits, and the coordinator is ready.
    open.send(true).unwrap();
    eventually("the recovered transaction commits", async || {
        (state(&mut client, txn.as_str()).await.state == pb::TransactionState::Committed as i32).then_some(())
    })
    .await;
    eventually("ready once nothing recovered is undecided", async || {
        (health_of(&coordinator_url, node::READY_SERVICE).await == Answer::Serving as i32).then_some(())
    })
    .await;
}
