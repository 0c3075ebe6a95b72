//! In-process tests of a coordinator that lost its log: a real participant
//! node, serving on a loopback port, holds transactions prepared under the
//! coordinator's incarnation A; the coordinator comes back on an empty data
//! directory as incarnation B and, as a naive coordinator would, answers
//! every decision query ABORT ("no record"). The participant must not
//! believe it: the transactions are orphans, reported and kept until an
//! operator decides them heuristically; a contrary outcome delivered later
//! by A (its disk found again) is recorded as heuristic-mixed, applied
//! nowhere, and accounted for.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem::domain::Id;
use tandem::pb;
use tandem::pb::coordinator_server::{Coordinator, CoordinatorServer};
use tandem::pb::participant_server::Participant;
use tandem::store::memory::MemoryDisk;
use tandem::store::Disk;
use tandem::tls::Security;
use tandem_participant::node::{Node, NodeConfig};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};

const INCARNATION_A: u64 = 0xA11CE;
const INCARNATION_B: u64 = 0xB0B;
const IN_DOUBT_AFTER_MS: u64 = 50;
/// A guard so that a broken node fails the test instead of hanging it.
const GUARD_MS: u64 = 20_000;

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

/// Incarnation B of coordinator c1: it has no record of anything, and
/// answers ABORT to every query, as a coordinator that presumes abort
/// would.
struct Amnesiac {
    queries: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Coordinator for Amnesiac {
    async fn query_decision(
        &self,
        _: Request<pb::QueryDecisionRequest>,
    ) -> Result<Response<pb::QueryDecisionResponse>, Status> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(pb::QueryDecisionResponse {
            decision: pb::Decision::Abort as i32,
            coordinator_incarnation: INCARNATION_B,
        }))
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

async fn amnesiac_coordinator() -> (String, Arc<AtomicUsize>) {
    let (listener, addr) = tandem::server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let service = CoordinatorServer::new(Amnesiac { queries: queries.clone() });
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));
    (format!("http://{addr}"), queries)
}

async fn start_participant(coordinator_url: String, disk: MemoryDisk) -> (Node, oneshot::Sender<()>) {
    let node = Node::open(NodeConfig {
        node_id: id("p1"),
        disk: Disk::Memory(disk),
        coordinators: vec![(id("c1"), coordinator_url)],
        peers: Vec::new(),
        in_doubt_after_ms: IN_DOUBT_AFTER_MS,
        finished_retention_ms: 300_000,
        idempotency_retention_ms: tandem_participant::saga::IDEMPOTENCY_RETENTION_DEFAULT_MS,
        owned_accounts: None,
        store_free_min_bytes: 0,
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

async fn list(node: &Node) -> pb::ListPreparedResponse {
    Participant::list_prepared(node, Request::new(pb::ListPreparedRequest { limit: 100 })).await.unwrap().into_inner()
}

async fn balances(node: &Node) -> pb::ReadBalancesResponse {
    Participant::read_balances(
        node,
        Request::new(pb::ReadBalancesRequest { include_accounts: true, include_prepared: false }),
    )
    .await
    .unwrap()
    .into_inner()
}

fn posted(balances: &pb::ReadBalancesResponse, account: u64) -> (i64, i64) {
    let b = balances.accounts.iter().find(|b| b.account == account).unwrap();
    (b.posted, b.reserved)
}

/// A prepare from incarnation B (`c1-b-<position>`) with `key` gets NO,
/// naming `earlier`.
async fn key_is_held_by(node: &Node, position: u64, key: &str, earlier: &str) {
    let prepare = pb::PrepareRequest {
        txn_id: format!("c1-b-{position}"),
        coordinator_id: "c1".into(),
        legs: vec![pb::Leg { account: 1, amount: -5 }, pb::Leg { account: 2, amount: 5 }],
        coordinator_incarnation: INCARNATION_B,
        position,
        low_watermark: 1,
        idempotency_key: key.into(),
        trace_parent: String::new(),
    };
    let vote = Participant::prepare(node, Request::new(prepare)).await.unwrap().into_inner();
    assert_eq!(
        (vote.vote, vote.refusal, vote.earlier_txn_id.as_str()),
        (pb::Vote::No as i32, pb::Refusal::KeyOfLostIncarnation as i32, earlier),
        "{vote:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_lost_its_log_is_not_believed_its_orphans_wait_for_an_operator_and_a_contrary_outcome_is_reported(
) {
    let (url, queries) = amnesiac_coordinator().await;
    let disk = MemoryDisk::new();
    let (node, stop) = start_participant(url.clone(), disk.clone()).await;
    let accounts =
        vec![pb::NewAccount { account: 1, initial_balance: 100 }, pb::NewAccount { account: 2, initial_balance: 0 }];
    Participant::open_accounts(&node, Request::new(pb::OpenAccountsRequest { accounts })).await.unwrap();
    // Incarnation A prepared two transfers of 30 and 20 from 1 to 2, then
    // lost its log.
    for (i, amount) in [(1u64, 30i64), (2, 20)] {
        let prepare = pb::PrepareRequest {
            txn_id: format!("c1-a-{i}"),
            coordinator_id: "c1".into(),
            legs: vec![pb::Leg { account: 1, amount: -amount }, pb::Leg { account: 2, amount }],
            coordinator_incarnation: INCARNATION_A,
            position: i,
            low_watermark: 1,
            idempotency_key: format!("key-{i}"),
            trace_parent: String::new(),
        };
        let vote = Participant::prepare(&node, Request::new(prepare)).await.unwrap().into_inner();
        assert_eq!(vote.vote, pb::Vote::Yes as i32, "{vote:?}");
    }

    // B's answer is heard, and not believed: both are orphans, reservations held.
    let guard = Instant::now() + Duration::from_millis(GUARD_MS);
    while list(&node).await.orphaned < 2 {
        assert!(Instant::now() < guard, "never orphaned: {:?}", list(&node).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let asked = queries.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(20 * IN_DOUBT_AFTER_MS)).await;
    let listed = list(&node).await;
    assert_eq!(listed.total, 2, "{listed:?}");
    assert!(listed.prepared.iter().all(|p| p.orphaned && p.coordinator_incarnation == INCARNATION_A), "{listed:?}");
    let read = balances(&node).await;
    assert_eq!(posted(&read, 1), (100, 50), "nothing aborted by presumption: {read:?}");
    assert_eq!(read.orphaned_count, 2);
    // A client retries key-1 at incarnation B: the key is A's orphan's, so
    // the retry reserves nothing and names the orphan.
    key_is_held_by(&node, 1, "key-1", "c1-a-1").await;
    assert_eq!(posted(&balances(&node).await, 1), (100, 50));
    assert!(
        queries.load(Ordering::SeqCst) <= asked + 2,
        "orphans are not asked about again ({} queries after {asked})",
        queries.load(Ordering::SeqCst)
    );

    // A restart keeps them orphaned.
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(100)).await;
    disk.crash_process();
    let (node, stop) = start_participant(url, disk.clone()).await;
    assert_eq!(list(&node).await.orphaned, 2);
    key_is_held_by(&node, 2, "key-2", "c1-a-2").await;

    // The operator decides: a reason is required; c1-a-1 commits, c1-a-2 aborts.
    let resolve = |txn: &str, commit: bool, reason: &str| pb::ResolveInDoubtRequest {
        txn_id: txn.into(),
        commit,
        reason: reason.into(),
    };
    let refused = Participant::resolve_in_doubt(&node, Request::new(resolve("c1-a-1", true, ""))).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let decided = Participant::resolve_in_doubt(&node, Request::new(resolve("c1-a-1", true, "p2 committed it")))
        .await
        .unwrap()
        .into_inner();
    assert!(decided.committed && decided.state == pb::HeuristicState::Decided as i32, "{decided:?}");
    Participant::resolve_in_doubt(&node, Request::new(resolve("c1-a-2", false, "no participant committed it")))
        .await
        .unwrap();
    let again = Participant::resolve_in_doubt(&node, Request::new(resolve("c1-a-2", true, "again"))).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
    let read = balances(&node).await;
    assert_eq!((posted(&read, 1), posted(&read, 2)), ((70, 0), (30, 0)), "{read:?}");
    assert_eq!((read.orphaned_count, read.prepared_count, read.heuristic_excess), (0, 0, 0));
    // Decided, the keys stay held: a retry cannot move the money again.
    key_is_held_by(&node, 3, "key-1", "c1-a-1").await;
    key_is_held_by(&node, 4, "key-2", "c1-a-2").await;

    // Incarnation A's disk is found, and it delivers COMMIT for both: the
    // one aborted by the operator is heuristic-mixed, nothing is applied twice.
    let commit = pb::DecisionBatchRequest {
        txn_ids: vec!["c1-a-1".into(), "c1-a-2".into()],
        coordinator_id: "c1".into(),
        coordinator_incarnation: INCARNATION_A,
        low_watermark: 1,
        trace_parents: Vec::new(),
    };
    Participant::commit_batch(&node, Request::new(commit.clone())).await.unwrap();
    Participant::commit_batch(&node, Request::new(commit)).await.unwrap();
    let read = balances(&node).await;
    assert_eq!((posted(&read, 1), posted(&read, 2)), ((70, 0), (30, 0)), "{read:?}");
    assert_eq!(read.heuristic_mixed_count, 1);
    // Account 1 holds 20 more than the coordinator's outcome gives it,
    // account 2 20 less: the excess sums to 0 on this node, and the ledger
    // reconciles account by account from the list.
    assert_eq!(read.heuristic_excess, 0);
    let listed = list(&node).await;
    let states: Vec<(String, i32)> = listed.heuristic.iter().map(|h| (h.txn_id.clone(), h.state)).collect();
    assert_eq!(
        states,
        vec![
            ("c1-a-1".to_string(), pb::HeuristicState::Confirmed as i32),
            ("c1-a-2".to_string(), pb::HeuristicState::Mixed as i32)
        ]
    );
    // The evidence an operator reads elsewhere.
    let record =
        Participant::lookup_transaction(&node, Request::new(pb::LookupTransactionRequest { txn_id: "c1-a-1".into() }))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(record.state, pb::RecordState::Committed as i32, "{record:?}");
    assert!(record.heuristic.is_some());
    let _ = stop.send(());
}
