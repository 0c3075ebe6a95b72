//! Who may call what, over real mutual TLS, on the real binaries.
//!
//! A local cluster (c1, p1, p2; its own throw-away CA) is called on every
//! RPC of both services by every kind of caller: the bench's client and
//! operator, the coordinator c1 that the participants were configured with
//! and a coordinator c9 they were not, the configured participants p1 and p2
//! and an unknown p9, a caller with no certificate, one whose certificate
//! comes from another CA (naming itself c1), and one that speaks plaintext.
//!
//! Every request is one that would change money if it went through (a
//! credit from nowhere, an account closed, a prepare that reserves, a
//! tombstone...). First every caller that may not make a call makes it: each
//! is PERMISSION_DENIED, or refused at the TLS handshake, and afterwards
//! every balance, reservation and counter of both participants reads back
//! exactly as before. Then every caller that may make it does: none is
//! PERMISSION_DENIED (some fail for other reasons, NOT_FOUND or
//! INVALID_ARGUMENT, which is fine: they passed the check).
//!
//! The expected table is written here from the issue, not read from
//! `tandem::trust::POLICY`, so that a change to the policy shows up as a
//! failing row.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tandem::cluster::{default_bin_dir, Cluster, ClusterSpec};
use tandem::local_ca::LocalCa;
use tandem::pb;
use tandem::pb::coordinator_client::CoordinatorClient;
use tandem::pb::participant_client::ParticipantClient;
use tandem::tls::{Credentials, Security};
use tandem::trust::{Caller, Role};
use tonic::transport::Channel;
use tonic::Code;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum As {
    Client,
    Operator,
    /// The coordinator every participant was configured with.
    C1,
    /// A coordinator of the same CA that no participant was configured with.
    C9,
    /// Participants in the coordinator's directory and each other's peers.
    P1,
    P2,
    /// A participant of the same CA that nobody was configured with.
    P9,
    /// TLS without a client certificate.
    NoCertificate,
    /// A certificate naming tandem://coordinator/c1, from another CA.
    OtherCa,
    /// Plaintext HTTP/2 to a TLS port.
    Plaintext,
}

const EVERYONE: [As; 10] =
    [As::Client, As::Operator, As::C1, As::C9, As::P1, As::P2, As::P9, As::NoCertificate, As::OtherCa, As::Plaintext];
const AUTHENTICATED: &[As] = &[As::Client, As::Operator, As::C1, As::C9, As::P1, As::P2, As::P9];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Coordinator,
    /// p1 (configured: coordinator c1, peers p1 and p2).
    Participant,
}

type Reply = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>;
type Call = Box<dyn Fn(Channel) -> Reply>;

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(5));
    request
}

macro_rules! coordinator {
    ($method:ident, $message:expr) => {{
        let call: Call = Box::new(|channel: Channel| {
            Box::pin(async move { CoordinatorClient::new(channel).$method(request($message)).await.map(|_| ()) })
                as Reply
        });
        call
    }};
}

macro_rules! participant {
    ($method:ident, $message:expr) => {{
        let call: Call = Box::new(|channel: Channel| {
            Box::pin(async move { ParticipantClient::new(channel).$method(request($message)).await.map(|_| ()) })
                as Reply
        });
        call
    }};
}

fn legs() -> Vec<pb::Leg> {
    vec![pb::Leg { account: 0, amount: -5 }, pb::Leg { account: 1, amount: 5 }]
}

/// A credit of 100 to account 1 on p1 from nowhere, as p2's relay would
/// send it.
fn event(id: &str) -> pb::ChoreographyEvent {
    pb::ChoreographyEvent {
        version: 1,
        event_id: format!("{id}:debited"),
        kind: pb::EventKind::TransferDebited as i32,
        saga_id: id.into(),
        from_account: 15,
        to_account: 1,
        amount: 100,
        source_participant: "p2".into(),
        target_participant: "p1".into(),
        reason: String::new(),
        sequence: 0,
        trace_parent: String::new(),
    }
}

/// A saga credit of 100 to account 1 from nowhere.
fn credit(saga: &str) -> pb::SagaStepRequest {
    pb::SagaStepRequest {
        saga_id: saga.into(),
        kind: pb::StepKind::Credit as i32,
        phase: pb::StepPhase::Action as i32,
        account: 1,
        amount: 100,
        ..Default::default()
    }
}

fn prepare(txn: &str) -> pb::PrepareRequest {
    pb::PrepareRequest { txn_id: txn.into(), coordinator_id: "c1".into(), legs: legs(), ..Default::default() }
}

fn one_phase(txn: &str) -> pb::OnePhaseRequest {
    pb::OnePhaseRequest { txn_id: txn.into(), coordinator_id: "c1".into(), legs: legs(), ..Default::default() }
}

/// Every RPC, where it is called, with what, and who may make it.
fn table() -> Vec<(&'static str, Node, Call, &'static [As])> {
    use As::*;
    use Node::Coordinator as C;
    use Node::Participant as P;
    let health = || -> Call {
        Box::new(|channel: Channel| {
            Box::pin(async move {
                tonic_health::pb::health_client::HealthClient::new(channel)
                    .check(request(tonic_health::pb::HealthCheckRequest { service: String::new() }))
                    .await
                    .map(|_| ())
            }) as Reply
        })
    };
    vec![
        (
            "Transfer",
            C,
            coordinator!(
                transfer,
                pb::TransferRequest { from_account: 0, to_account: 15, amount: 7, ..Default::default() }
            ),
            &[Client],
        ),
        (
            "TransferBatch",
            C,
            coordinator!(
                transfer_batch,
                pb::TransferBatchRequest {
                    transfers: vec![pb::TransferRequest {
                        from_account: 0,
                        to_account: 15,
                        amount: 7,
                        ..Default::default()
                    }]
                }
            ),
            &[Client],
        ),
        (
            "Execute",
            C,
            coordinator!(execute, pb::ExecuteRequest { legs: legs(), idempotency_key: String::new() }),
            &[Client],
        ),
        (
            "GetTransaction",
            C,
            coordinator!(get_transaction, pb::GetTransactionRequest { txn_id: "c1-000001-000000000001".into() }),
            &[Client, Operator],
        ),
        ("Audit", C, coordinator!(audit, pb::AuditRequest { include_accounts: true }), &[Client, Operator]),
        (
            "QueryDecision",
            C,
            coordinator!(
                query_decision,
                pb::QueryDecisionRequest {
                    txn_id: "c1-000001-000000000001".into(),
                    participant_id: "p1".into(),
                    ..Default::default()
                }
            ),
            &[P1, P2],
        ),
        ("ListDeadLetters", C, coordinator!(list_dead_letters, pb::ListDeadLettersRequest::default()), &[Operator]),
        (
            "ResolveDeadLetter",
            C,
            coordinator!(
                resolve_dead_letter,
                pb::ResolveDeadLetterRequest { saga_id: "s-0".into(), to_account: 0, reason: "test".into() }
            ),
            &[Operator],
        ),
        ("Health", C, health(), AUTHENTICATED),
        ("GetHealth", C, coordinator!(get_health, pb::GetHealthRequest {}), AUTHENTICATED),
        ("Prepare", P, participant!(prepare, prepare("t-1")), &[C1]),
        (
            "PrepareBatch",
            P,
            participant!(prepare_batch, pb::PrepareBatchRequest { prepares: vec![prepare("t-2")], commits: None }),
            &[C1],
        ),
        ("Commit", P, participant!(commit, pb::DecisionRequest { txn_id: "t-1".into(), ..Default::default() }), &[C1]),
        (
            "CommitBatch",
            P,
            participant!(commit_batch, pb::DecisionBatchRequest { txn_ids: vec!["t-2".into()], ..Default::default() }),
            &[C1],
        ),
        ("CommitOnePhase", P, participant!(commit_one_phase, one_phase("t-4")), &[C1]),
        (
            "CommitOnePhaseBatch",
            P,
            participant!(commit_one_phase_batch, pb::OnePhaseBatchRequest { requests: vec![one_phase("t-5")] }),
            &[C1],
        ),
        // A forged abort would leave a tombstone: checked below.
        ("Abort", P, participant!(abort, pb::DecisionRequest { txn_id: "t-3".into(), ..Default::default() }), &[C1]),
        (
            "OpenAccounts",
            P,
            participant!(
                open_accounts,
                pb::OpenAccountsRequest { accounts: vec![pb::NewAccount { account: 3, initial_balance: 1_000_000 }] }
            ),
            &[Operator],
        ),
        (
            "SetAccountClosed",
            P,
            participant!(set_account_closed, pb::SetAccountClosedRequest { account: 2, closed: true }),
            &[Operator],
        ),
        ("GetBalance", P, participant!(get_balance, pb::GetBalanceRequest { account: 0 }), &[Client, Operator]),
        (
            "ReadBalances",
            P,
            participant!(read_balances, pb::ReadBalancesRequest { include_accounts: true, include_prepared: false }),
            &[C1, Operator],
        ),
        ("ListPrepared", P, participant!(list_prepared, pb::ListPreparedRequest { limit: 10 }), &[C1, Operator]),
        ("SagaStep", P, participant!(saga_step, credit("s-1")), &[C1]),
        (
            "SagaStepBatch",
            P,
            participant!(saga_step_batch, pb::SagaStepBatchRequest { steps: vec![credit("s-2")] }),
            &[C1],
        ),
        ("ForgetSagas", P, participant!(forget_sagas, pb::ForgetSagasRequest { saga_ids: vec!["s-0".into()] }), &[C1]),
        (
            "StartTransfer",
            P,
            participant!(
                start_transfer,
                pb::StartTransferRequest {
                    saga_id: "ch-1".into(),
                    from_account: 0,
                    to_account: 15,
                    amount: 4,
                    target_participant: "p2".into(),
                    wait_ms: 0,
                }
            ),
            &[Client],
        ),
        (
            "GetTransferStatus",
            P,
            participant!(get_transfer_status, pb::GetTransferStatusRequest { saga_id: "ch-1".into() }),
            &[Client, Operator],
        ),
        (
            "ListParkedTransfers",
            P,
            participant!(list_parked_transfers, pb::ListParkedTransfersRequest::default()),
            &[Operator],
        ),
        (
            "ResolveParkedTransfer",
            P,
            participant!(
                resolve_parked_transfer,
                pb::ResolveParkedTransferRequest { saga_id: "ch-0".into(), to_account: 0, reason: "test".into() }
            ),
            &[Operator],
        ),
        (
            "ResolveInDoubt",
            P,
            participant!(
                resolve_in_doubt,
                pb::ResolveInDoubtRequest { txn_id: "t-9".into(), commit: false, reason: "test".into() }
            ),
            &[Operator],
        ),
        (
            "LookupTransaction",
            P,
            participant!(lookup_transaction, pb::LookupTransactionRequest { txn_id: "t-9".into() }),
            &[Operator],
        ),
        ("DeliverEvent", P, participant!(deliver_event, event("e-1")), &[P1, P2]),
        (
            "DeliverEvents",
            P,
            participant!(deliver_events, pb::DeliverEventsRequest { events: vec![event("e-2")] }),
            &[P1, P2],
        ),
        ("Health", P, health(), AUTHENTICATED),
        ("GetHealth", P, participant!(get_health, pb::GetHealthRequest {}), AUTHENTICATED),
    ]
}

/// How each kind of caller reaches the cluster.
struct Callers {
    cluster: Cluster,
    other_ca: Security,
    ca_pem: Vec<u8>,
}

impl Callers {
    fn security(&self, who: As) -> Security {
        let identity = |role, name| self.cluster.identity(role, name).unwrap();
        match who {
            As::Client => self.cluster.client().clone(),
            As::Operator => self.cluster.operator().clone(),
            As::C1 => identity(Role::Coordinator, "c1"),
            As::C9 => identity(Role::Coordinator, "c9"),
            As::P1 => identity(Role::Participant, "p1"),
            As::P2 => identity(Role::Participant, "p2"),
            As::P9 => identity(Role::Participant, "p9"),
            As::OtherCa => self.other_ca.clone(),
            As::NoCertificate | As::Plaintext => Security::Insecure,
        }
    }

    fn channel(&self, who: As, node: Node) -> Channel {
        let url = match node {
            Node::Coordinator => self.cluster.coordinator.url(),
            Node::Participant => self.cluster.participants[0].url(),
        };
        match who {
            As::NoCertificate => {
                // The cluster's CA, so the client trusts the server; no
                // identity of its own.
                let tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
                tonic::transport::Endpoint::from_shared(url).unwrap().tls_config(tls).unwrap().connect_lazy()
            }
            As::Plaintext => tandem::server::channel(&url.replace("https://", "http://"), &Security::Insecure).unwrap(),
            _ => tandem::server::channel(&url, &self.security(who)).unwrap(),
        }
    }

    /// Both participants' balances, reservations and counters.
    async fn state(&self) -> Vec<pb::ReadBalancesResponse> {
        let mut state = Vec::new();
        for i in 0..self.cluster.participants.len() {
            let mut client = self.cluster.participant_client(i, self.cluster.operator()).unwrap();
            state.push(
                client
                    .read_balances(pb::ReadBalancesRequest { include_accounts: true, include_prepared: false })
                    .await
                    .unwrap()
                    .into_inner(),
            );
        }
        state
    }
}

async fn start() -> (Callers, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(default_bin_dir(), dir.path().to_path_buf());
    spec.participants = 2;
    spec.accounts_per_participant = 10;
    spec.log_level = "info".into();
    // No in-doubt query while the table runs: the allowed prepares of the
    // second half stay as they are.
    spec.participant_args = vec!["--in-doubt-after-ms".into(), "60000".into()];
    let cluster = Cluster::start(spec).await.expect("the cluster starts");
    let ca_pem = std::fs::read(cluster.tls_dir().expect("the cluster runs over TLS").join("ca.pem")).unwrap();
    // Another CA's certificate naming the configured coordinator, with the
    // cluster's CA trusted (so the client accepts the server: only the
    // server's check can refuse it).
    let issued =
        LocalCa::new("an impostor's CA").unwrap().issue(&Caller::new(Role::Coordinator, "c1").unwrap()).unwrap();
    let other_ca = Security::mutual(
        Credentials::from_pem(issued.cert_pem.into_bytes(), issued.key_pem.into_bytes(), ca_pem.clone()).unwrap(),
    );
    (Callers { cluster, other_ca, ca_pem }, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_is_refused_to_every_caller_the_table_does_not_name_and_changes_nothing() {
    let (callers, _dir) = start().await;
    let table = table();
    let before = callers.state().await;

    // Everyone who may not: refused, one way or the other.
    let mut refusals = 0;
    for (rpc, node, call, allowed) in &table {
        for who in EVERYONE.iter().filter(|who| !allowed.contains(*who)) {
            let status = call(callers.channel(*who, *node))
                .await
                .expect_err(&format!("{rpc} on {node:?} as {who:?} went through"));
            let refused = match who {
                // No certificate of this CA: the handshake fails (the
                // server requires one), which the client sees as a
                // transport error, a dropped connection, or (plaintext) an
                // HTTP/2 error: the call reached no handler.
                As::NoCertificate | As::OtherCa | As::Plaintext => {
                    matches!(
                        status.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::PermissionDenied
                    ) || (status.code() == Code::Internal && status.message().contains("h2 protocol error"))
                }
                _ => status.code() == Code::PermissionDenied,
            };
            assert!(refused, "{rpc} on {node:?} as {who:?}: {:?} {}", status.code(), status.message());
            if status.code() == Code::PermissionDenied && rpc != &"Health" {
                assert!(status.message().contains(rpc), "the refusal names the RPC: {}", status.message());
            }
            refusals += 1;
        }
    }
    assert!(refusals > 200, "{refusals}");
    assert_eq!(callers.state().await, before, "a refused call changed something");

    // A refused Abort left no tombstone: the configured coordinator's
    // prepare of that transaction still votes YES.
    let mut as_c1 = ParticipantClient::new(callers.channel(As::C1, Node::Participant));
    let vote = as_c1.prepare(prepare("t-3")).await.unwrap().into_inner();
    assert_eq!(vote.vote, pb::Vote::Yes as i32, "{vote:?}");
    as_c1.abort(pb::DecisionRequest { txn_id: "t-3".into(), ..Default::default() }).await.unwrap();

    // A refusal says who may and who asked.
    let status = call_as(&callers, &table, "SagaStep", As::C9).await;
    assert!(status.message().contains("(c1)") && status.message().contains("tandem://coordinator/c9"), "{status:?}");
    let status = call_as(&callers, &table, "DeliverEvent", As::P9).await;
    assert!(status.message().contains("p1, p2") && status.message().contains("tandem://participant/p9"), "{status:?}");

    // Everyone who may: past the check (other failures are fine).
    for (rpc, node, call, allowed) in &table {
        for who in allowed.iter() {
            if let Err(status) = call(callers.channel(*who, *node)).await {
                assert_ne!(status.code(), Code::PermissionDenied, "{rpc} on {node:?} as {who:?}: {}", status.message());
                assert!(
                    !matches!(status.code(), Code::Unavailable | Code::Unknown),
                    "{rpc} on {node:?} as {who:?}: {:?} {}",
                    status.code(),
                    status.message()
                );
            }
        }
    }
    let mut cluster = callers.cluster;
    assert!(cluster.crashed().is_empty());
    cluster.stop().await;
}

async fn call_as(
    callers: &Callers,
    table: &[(&'static str, Node, Call, &'static [As])],
    rpc: &str,
    who: As,
) -> tonic::Status {
    let (_, node, call, _) = table.iter().find(|(name, ..)| *name == rpc).unwrap();
    call(callers.channel(who, *node)).await.unwrap_err()
}

#[test]
fn every_rpc_of_the_policy_is_in_the_table_here() {
    let rows: Vec<&str> = table().into_iter().map(|(rpc, ..)| rpc).collect();
    for (path, _) in tandem::trust::POLICY {
        let (service, method) = path.trim_start_matches('/').split_once('/').unwrap();
        if service.starts_with("tandem.") {
            assert!(rows.contains(&method), "{path} is not in this test's table");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insecure_cluster_runs_plaintext_and_trusts_everyone() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(default_bin_dir(), dir.path().to_path_buf());
    spec.insecure = true;
    let mut cluster = Cluster::start(spec).await.expect("the cluster starts");
    assert!(cluster.coordinator.url().starts_with("http://") && cluster.tls_dir().is_none());
    let mut client = cluster.coordinator_client(cluster.client()).unwrap();
    let transfer = pb::TransferRequest { from_account: 0, to_account: 150, amount: 5, ..Default::default() };
    let result = client.transfer(transfer).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    // Without certificates there is no caller to check: anyone may prepare.
    let mut p1 = cluster.participant_client(0, &Security::Insecure).unwrap();
    p1.abort(pb::DecisionRequest { txn_id: "anyone".into(), ..Default::default() }).await.unwrap();
    let log = std::fs::read_to_string(dir.path().join("p1.log")).unwrap();
    assert!(log.contains("--insecure"), "the node warns: {log}");
    cluster.stop().await;
}

#[test]
fn a_node_without_certificates_or_with_another_nodes_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let bin = default_bin_dir();
    let run = |binary: &str, extra: &[&str]| {
        let mut args = vec!["--listen", "127.0.0.1:0", "--data-dir"];
        let data = dir.path().join(binary).display().to_string();
        args.push(&data);
        match binary {
            "participant" => args.extend(["--coordinator", "c1=https://127.0.0.1:1"]),
            _ => args.extend(["--participant", "p1=https://127.0.0.1:1@0..10"]),
        }
        args.extend(extra);
        let output = std::process::Command::new(bin.join(binary)).args(&args).output().unwrap();
        assert!(!output.status.success(), "{binary} {extra:?} started");
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    for binary in ["participant", "coordinator"] {
        let stderr = run(binary, &[]);
        assert!(stderr.contains("--tls-cert") && stderr.contains("--insecure"), "{stderr}");
    }
    // A participant given the coordinator's certificate: it would be
    // refused by everyone, so it does not start.
    let ca = LocalCa::new("test CA").unwrap();
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let ca_file = ca.write_ca(&tls).unwrap();
    let files = ca.issue(&Caller::new(Role::Coordinator, "c1").unwrap()).unwrap().write(&tls, "c1").unwrap();
    let (cert, key, ca_path) =
        (files.cert.display().to_string(), files.key.display().to_string(), ca_file.display().to_string());
    let stderr = run("participant", &["--node-id", "p1", "--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca_path]);
    assert!(stderr.contains("tandem://coordinator/c1") && stderr.contains("tandem://participant/p1"), "{stderr}");
}
