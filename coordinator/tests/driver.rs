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
//!   ones in it is split, so that the others are delivered.

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
use tandem_coordinator::core::CommitRecord;
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
async fn commits_go_on_while_an_audit_reads_and_one_that_cannot_read_a_paused_participant_names_it() {
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
    let mut committed = 0u64;
    let mut inside_the_read = 0u64;
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
        if started >= window.0 && Instant::now() <= window.1 {
            inside_the_read += 1;
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
    ({ $($own:item)* } $($method:ident($request:ty) -> $response:ty;)*) => {
        #[tonic::async_trait]
        impl Participant for Refusing {
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
            {
                let mut refusals = self.refusals.lock().unwrap();
                for prepare in &request.get_ref().prepares {
                    if refusals.refuse_next > 0 {
                        refusals.refuse_next -= 1;
                        refusals.refused.insert(prepare.txn_id.clone());
                    }
                }
            }
            Participant::prepare_batch(&self.node, request).await
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
