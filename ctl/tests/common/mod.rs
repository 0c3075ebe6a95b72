//! What the cluster tests of tandemctl share: a local cluster of the real
//! binaries (mutual TLS), tandemctl run as a process with the cluster's
//! certificates, and the recipes that make a dead letter and a parked
//! transfer on purpose. Each test file uses a part of it.
#![allow(dead_code)]

use serde_json::Value;
use std::time::{Duration, Instant};
use tandem::cluster::{default_bin_dir, Cluster, ClusterSpec, NodeRef};
use tandem::pb;
use tandem::trust::Role;

pub const ACCOUNTS_EACH: u64 = 10;
pub const BALANCE: i64 = 1_000;

/// What one run of tandemctl gave.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("stdout is not one JSON document ({e}):\n{}\nstderr: {}", self.stdout, self.stderr)
        })
    }
}

/// Runs tandemctl as `identity` (`operator` or `client`: the cluster's
/// certificates in DATA_DIR/tls/), naming the coordinator and both
/// participants, with `args` after.
pub async fn tandemctl(cluster: &Cluster, identity: &str, args: &[&str]) -> Run {
    let tls = cluster.tls_dir().expect("the cluster runs with mutual TLS");
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandemctl"));
    command
        .arg("--tls-cert")
        .arg(tls.join(format!("{identity}.pem")))
        .arg("--tls-key")
        .arg(tls.join(format!("{identity}.key")))
        .arg("--tls-ca")
        .arg(tls.join("ca.pem"))
        .args(["--coordinator", &cluster.coordinator.url()])
        .args(["--timeout-ms", "3000"])
        // The environment must not leak into the test.
        .env_remove("TANDEM_COORDINATOR")
        .env_remove("TANDEM_PARTICIPANTS");
    for (i, participant) in cluster.participants.iter().enumerate() {
        command.arg("--participant").arg(format!("p{}={}", i + 1, participant.url()));
    }
    command.args(args);
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("tandemctl answers within 30 s")
        .expect("tandemctl runs");
    Run {
        code: output.status.code().expect("tandemctl exits, not killed by a signal"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

pub async fn start() -> (Cluster, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(default_bin_dir(), dir.path().to_path_buf());
    spec.accounts_per_participant = ACCOUNTS_EACH;
    spec.initial_balance = BALANCE;
    // Sagas give up on a paused participant quickly (see the dead letter).
    spec.coordinator_args = ["--call-timeout-ms", "300", "--saga-step-attempts", "6"].map(String::from).to_vec();
    spec.participant_args = ["--in-doubt-after-ms", "200"].map(String::from).to_vec();
    (Cluster::start(spec).await.expect("the cluster starts"), dir)
}

pub fn transfer(from: u64, to: u64, amount: i64) -> pb::TransferRequest {
    pb::TransferRequest { from_account: from, to_account: to, amount, ..Default::default() }
}

/// Polls `txn get` until the coordinator and both participants say
/// committed (a COMMITTED answer means decided; the acknowledgements follow).
pub async fn wait_committed_everywhere(cluster: &Cluster, txn_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let run = tandemctl(cluster, "operator", &["--json", "txn", "get", txn_id]).await;
        assert_eq!(run.code, 0, "{run:?}");
        let view = run.json();
        let participants: Vec<&str> =
            view["participants"].as_array().unwrap().iter().map(|p| p["state"].as_str().unwrap()).collect();
        if view["coordinator"]["state"] == "committed" && participants == ["committed", "committed"] {
            return view;
        }
        assert!(Instant::now() < deadline, "{txn_id} never showed committed everywhere: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn posted(cluster: &Cluster, participant: usize, account: u64) -> i64 {
    let mut client = cluster.participant_client(participant, cluster.operator()).unwrap();
    client.get_balance(pb::GetBalanceRequest { account }).await.unwrap().into_inner().posted
}

pub async fn close(cluster: &Cluster, participant: usize, account: u64, closed: bool) {
    let mut client = cluster.participant_client(participant, cluster.operator()).unwrap();
    client.set_account_closed(pb::SetAccountClosedRequest { account, closed }).await.unwrap();
}

pub async fn reopen(cluster: &Cluster, participant: usize, account: u64) {
    close(cluster, participant, account, false).await;
}

/// Waits until `account` on `participant` was debited by `amount`.
pub async fn wait_debited(cluster: &Cluster, participant: usize, account: u64, before: i64, amount: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while posted(cluster, participant, account).await != before - amount {
        assert!(Instant::now() < deadline, "the debit never happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An orchestrated saga from `from` (p1) to `to` (p2) that ends
/// DEAD_LETTERED: `to` is closed, so the credit is refused, but only once
/// p2 answers again; meanwhile `from` is closed too, so the refund cannot
/// be applied and the money is parked in p1's suspense. `from` stays closed.
pub async fn dead_letter(cluster: &mut Cluster, (from, to, amount): (u64, u64, i64)) -> String {
    close(cluster, 1, to, true).await;
    let before = posted(cluster, 0, from).await;
    cluster.node(NodeRef::Participant(1)).pause();
    let mut coordinator = cluster.coordinator_client(cluster.client()).unwrap();
    let request = pb::TransferRequest {
        protocol: pb::Protocol::SagaOrchestrated as i32,
        recovery: pb::Recovery::Forward as i32,
        ..transfer(from, to, amount)
    };
    let saga = tokio::spawn(async move { coordinator.transfer(request).await.map(|r| r.into_inner()) });
    wait_debited(cluster, 0, from, before, amount).await;
    close(cluster, 0, from, true).await;
    cluster.node(NodeRef::Participant(1)).resume();
    let result = tokio::time::timeout(Duration::from_secs(30), saga).await.expect("the saga ends").unwrap().unwrap();
    assert_eq!(result.outcome, pb::Outcome::DeadLettered as i32, "{result:?}");
    result.txn_id
}

/// A transaction in doubt on p1: c1 is paused (it stays paused), and a
/// stand-in with c1's certificate prepares `txn_id` there with one leg
/// (account, amount), so no decision can come.
pub async fn in_doubt(cluster: &mut Cluster, txn_id: &str, (account, amount): (u64, i64)) {
    cluster.node(NodeRef::Coordinator).pause();
    let as_c1 = cluster.identity(Role::Coordinator, "c1").unwrap();
    let mut p1_as_c1 = cluster.participant_client(0, &as_c1).unwrap();
    let vote = p1_as_c1
        .prepare(pb::PrepareRequest {
            txn_id: txn_id.into(),
            coordinator_id: "c1".into(),
            legs: vec![pb::Leg { account, amount }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vote.vote, pb::Vote::Yes as i32, "{vote:?}");
}

/// A choreographed transfer from `from` (p1) to `to` (p2) that ends parked
/// in p1's suspense, the same way as [`dead_letter`]. `from` stays closed.
pub async fn parked_transfer(cluster: &mut Cluster, (from, to, amount): (u64, u64, i64)) -> String {
    let saga_id = "parked-1".to_string();
    close(cluster, 1, to, true).await;
    let before = posted(cluster, 0, from).await;
    cluster.node(NodeRef::Participant(1)).pause();
    let mut p1 = cluster.participant_client(0, cluster.client()).unwrap();
    let started = p1
        .start_transfer(pb::StartTransferRequest {
            saga_id: saga_id.clone(),
            from_account: from,
            to_account: to,
            amount,
            target_participant: "p2".into(),
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.state, pb::TransferState::Debited as i32, "{started:?}");
    wait_debited(cluster, 0, from, before, amount).await;
    close(cluster, 0, from, true).await;
    cluster.node(NodeRef::Participant(1)).resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = p1
            .get_transfer_status(pb::GetTransferStatusRequest { saga_id: saga_id.clone() })
            .await
            .unwrap()
            .into_inner();
        if status.state == pb::TransferState::DeadLettered as i32 {
            return saga_id;
        }
        assert!(Instant::now() < deadline, "the transfer was never parked: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
