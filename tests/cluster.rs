//! End-to-end tests: the real `coordinator` and `participant` binaries on
//! loopback, RocksDB on disk, real SIGKILLs. Build the binaries first:
//! `cargo build --release --workspace` (the README's test command does).
//!
//! The crash tests run concurrent keyed transfers while a node is killed and
//! restarted, then heal and check the ledger exactly: every transfer is
//! retried with its idempotency key until it has a definite outcome, and
//! each account's posted balance must equal its initial balance plus the
//! committed transfers, with no reservation left and nothing negative.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem::cluster::{default_bin_dir, Cluster, ClusterSpec, NodeRef};
use tandem::pb;
use tandem::rng::SplitMix64;
use tandem::store::Store;
use tandem::tls::Security;
use tandem::trust::Role;
use tonic::Code;

const INITIAL_BALANCE: i64 = 1_000;

async fn start_cluster(participants: usize, accounts_each: u64) -> (Cluster, tempfile::TempDir) {
    start_cluster_asking_after(participants, accounts_each, 200).await
}

/// A cluster whose participants ask about an in-doubt transaction after
/// `in_doubt_after_ms`.
async fn start_cluster_asking_after(
    participants: usize,
    accounts_each: u64,
    in_doubt_after_ms: u64,
) -> (Cluster, tempfile::TempDir) {
    let (spec, dir) = cluster_spec(participants, accounts_each, in_doubt_after_ms);
    let cluster = Cluster::start(spec).await.expect("the cluster starts");
    (cluster, dir)
}

fn cluster_spec(participants: usize, accounts_each: u64, in_doubt_after_ms: u64) -> (ClusterSpec, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let spec = cluster_spec_in(dir.path(), participants, accounts_each, in_doubt_after_ms, &[]);
    (spec, dir)
}

/// A cluster whose data (and logs) are in `dir`: a participant's in
/// `dir/p1`, `dir/p2`, ...
async fn start_cluster_in(
    dir: &std::path::Path,
    participants: usize,
    accounts_each: u64,
    in_doubt_after_ms: u64,
    participant_args: &[&str],
) -> Cluster {
    let spec = cluster_spec_in(dir, participants, accounts_each, in_doubt_after_ms, participant_args);
    Cluster::start(spec).await.expect("the cluster starts")
}

fn cluster_spec_in(
    dir: &std::path::Path,
    participants: usize,
    accounts_each: u64,
    in_doubt_after_ms: u64,
    participant_args: &[&str],
) -> ClusterSpec {
    let mut spec = ClusterSpec::new(default_bin_dir(), dir.to_path_buf());
    spec.participants = participants;
    spec.accounts_per_participant = accounts_each;
    spec.initial_balance = INITIAL_BALANCE;
    spec.log_level = "info".into();
    spec.coordinator_args = vec!["--prepare-timeout-ms".into(), "300".into(), "--call-timeout-ms".into(), "300".into()];
    spec.participant_args = vec!["--in-doubt-after-ms".into(), in_doubt_after_ms.to_string()];
    spec.participant_args.extend(participant_args.iter().map(|arg| arg.to_string()));
    spec
}

fn transfer(from: u64, to: u64, amount: i64, key: &str) -> pb::TransferRequest {
    pb::TransferRequest {
        from_account: from,
        to_account: to,
        amount,
        idempotency_key: key.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_commit_abort_and_reject_bad_input_with_clear_statuses() {
    let (mut spec, _dir) = cluster_spec(2, 10, 200);
    // The directory routes account 19 to p2, which does not have it (yet).
    spec.unopened_accounts = [19].into();
    let cluster = Cluster::start(spec).await.expect("the cluster starts");
    let mut client = cluster.coordinator_client(cluster.client()).unwrap();

    // A cross-participant transfer commits and moves the money.
    let result = client.transfer(transfer(0, 15, 300, "")).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    let mut p1 = cluster.participant_client(0, cluster.client()).unwrap();
    let mut p2 = cluster.participant_client(1, cluster.operator()).unwrap();
    // At once, the debit is at least reserved: nobody can spend it twice.
    let b0 = p1.get_balance(pb::GetBalanceRequest { account: 0 }).await.unwrap().into_inner();
    assert_eq!(b0.available, 700);
    // COMMITTED means decided; the participants apply it right after.
    wait_until_settled(&cluster, Duration::from_secs(10)).await;
    let b0 = p1.get_balance(pb::GetBalanceRequest { account: 0 }).await.unwrap().into_inner();
    let b15 = p2.get_balance(pb::GetBalanceRequest { account: 15 }).await.unwrap().into_inner();
    assert_eq!((b0.posted, b0.available, b15.posted), (700, 700, 1_300));

    // Insufficient funds: an ABORTED outcome with that reason, nothing moved.
    let result = client.transfer(transfer(0, 15, 701, "")).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Aborted as i32);
    assert_eq!(result.abort_reason, pb::AbortReason::InsufficientFunds as i32);
    assert!(result.reason.contains("available"), "{}", result.reason);

    // The status lookup knows the commit; an unknown id is presumed aborted.
    let status =
        client.get_transaction(pb::GetTransactionRequest { txn_id: result.txn_id.clone() }).await.unwrap().into_inner();
    assert_eq!(status.state, pb::TransactionState::Unknown as i32, "an unkeyed abort leaves no record");

    // Bad input gets a clear status and changes nothing.
    let cases: Vec<(pb::TransferRequest, Code)> = vec![
        (transfer(0, 15, 0, ""), Code::InvalidArgument),
        (transfer(0, 15, -5, ""), Code::InvalidArgument),
        (transfer(3, 3, 5, ""), Code::InvalidArgument),
        (transfer(0, 999, 5, ""), Code::NotFound),
        (transfer(0, 15, 5, "bad key!"), Code::InvalidArgument),
        (transfer(0, 15, 5, &"k".repeat(65)), Code::InvalidArgument),
    ];
    for (request, code) in cases {
        let status = client.transfer(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), code, "{request:?}: {}", status.message());
        assert!(!status.message().is_empty());
    }
    let legs = |pairs: &[(u64, i64)]| {
        pairs.iter().map(|(account, amount)| pb::Leg { account: *account, amount: *amount }).collect()
    };
    for (request, code) in [
        (legs(&[(1, -5), (12, 4)]), Code::InvalidArgument), // does not sum to zero
        (legs(&[(1, i64::MAX), (12, i64::MAX)]), Code::InvalidArgument), // overflow
        ((0..17).map(|a| pb::Leg { account: a, amount: 1 }).collect(), Code::InvalidArgument), // too many legs
    ] {
        let status =
            client.execute(pb::ExecuteRequest { legs: request, idempotency_key: String::new() }).await.unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
    }
    let status = client.get_transaction(pb::GetTransactionRequest { txn_id: "no spaces".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // An account that its participant does not have is a refusal learned by
    // asking it (an account in no participant's range, above, is bad input):
    // ABORTED with the abort reason UNKNOWN_ACCOUNT, nothing moved.
    let result = client.transfer(transfer(0, 19, 5, "")).await.unwrap().into_inner();
    let result_of_execute = client
        .execute(pb::ExecuteRequest { legs: legs(&[(19, -5), (1, 5)]), idempotency_key: String::new() })
        .await
        .unwrap()
        .into_inner();
    for result in [result, result_of_execute] {
        assert_eq!(result.outcome, pb::Outcome::Aborted as i32, "{result:?}");
        assert_eq!(result.abort_reason, pb::AbortReason::UnknownAccount as i32, "{result:?}");
        assert!(result.reason.contains("account 19 does not exist on p2"), "{}", result.reason);
        assert!(!result.txn_id.is_empty());
    }
    // Once p2 has the account, the same transfer commits.
    p2.open_accounts(pb::OpenAccountsRequest {
        accounts: vec![pb::NewAccount { account: 19, initial_balance: INITIAL_BALANCE }],
    })
    .await
    .unwrap();
    let result = client.transfer(transfer(19, 0, 5, "")).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    // A batched prepare judges each prepare alone: a malformed one is
    // refused with its reason, the others vote as Prepare would.
    let prepare = |txn: &str, legs: Vec<pb::Leg>| pb::PrepareRequest {
        txn_id: txn.into(),
        coordinator_id: "c1".into(),
        legs,
        ..Default::default()
    };
    // Speaking as the coordinator c1, the one the participants were
    // configured with.
    let mut p1_as_c1 = cluster.participant_client(0, &cluster.identity(Role::Coordinator, "c1").unwrap()).unwrap();
    let votes = p1_as_c1
        .prepare_batch(pb::PrepareBatchRequest {
            prepares: vec![
                prepare("manual-1", legs(&[(1, -5)])),
                prepare("bad id!", legs(&[(1, -5)])),
                prepare("manual-2", legs(&[(1, -1_000_000)])),
            ],
            commits: None,
        })
        .await
        .unwrap()
        .into_inner()
        .votes;
    let summary: Vec<(i32, i32)> = votes.iter().map(|v| (v.vote, v.refusal)).collect();
    assert_eq!(
        summary,
        vec![
            (pb::Vote::Yes as i32, 0),
            (pb::Vote::No as i32, pb::Refusal::InvalidRequest as i32),
            (pb::Vote::No as i32, pb::Refusal::InsufficientFunds as i32),
        ]
    );
    assert!(votes[1].reason.contains("txn_id"), "{}", votes[1].reason);
    p1_as_c1.abort(pb::DecisionRequest { txn_id: "manual-1".into(), ..Default::default() }).await.unwrap();
    let status = p1_as_c1.prepare_batch(pb::PrepareBatchRequest { prepares: vec![], commits: None }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // A batched commit with no ids, too many, or a malformed one is refused whole.
    for txn_ids in [vec![], vec!["t".to_string(); 1_025], vec!["ok-1".into(), "not ok".into()]] {
        let status =
            p1_as_c1.commit_batch(pb::DecisionBatchRequest { txn_ids, ..Default::default() }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }
    // COMMITs may ride on a PrepareBatch: applied before its prepares, in
    // the same write, answered apart from the votes; a malformed list
    // refuses the COMMITs only, and nothing of them is applied.
    let posted_before = p1.get_balance(pb::GetBalanceRequest { account: 3 }).await.unwrap().into_inner().posted;
    let first = p1_as_c1
        .prepare_batch(pb::PrepareBatchRequest {
            prepares: vec![prepare("manual-3", legs(&[(3, -7), (6, 7)]))],
            commits: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.votes[0].vote, pb::Vote::Yes as i32, "{first:?}");
    let commits = |ids: &[&str]| {
        Some(pb::DecisionBatchRequest {
            txn_ids: ids.iter().map(|id| id.to_string()).collect(),
            coordinator_id: "c1".into(),
            ..Default::default()
        })
    };
    let refused = p1_as_c1
        .prepare_batch(pb::PrepareBatchRequest {
            prepares: vec![prepare("manual-4", legs(&[(3, -1), (6, 1)]))],
            commits: commits(&["manual-3", "not ok"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refused.commits_refused_code, Code::InvalidArgument as i32, "{refused:?}");
    assert!(refused.commits_refused_reason.contains("txn_ids"), "{refused:?}");
    assert_eq!(refused.votes[0].vote, pb::Vote::Yes as i32, "the prepare is judged anyway: {refused:?}");
    let balance = p1.get_balance(pb::GetBalanceRequest { account: 3 }).await.unwrap().into_inner();
    assert_eq!((balance.posted, balance.reserved), (posted_before, 8), "nothing committed: {balance:?}");
    let taken = p1_as_c1
        .prepare_batch(pb::PrepareBatchRequest {
            prepares: vec![prepare("manual-5", legs(&[(3, -2), (6, 2)]))],
            commits: commits(&["manual-3", "manual-4"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((taken.commits_refused_code, taken.votes[0].vote), (0, pb::Vote::Yes as i32), "{taken:?}");
    let balance = p1.get_balance(pb::GetBalanceRequest { account: 3 }).await.unwrap().into_inner();
    assert_eq!((balance.posted, balance.reserved), (posted_before - 8, 2), "both committed once: {balance:?}");
    let credited = p1.get_balance(pb::GetBalanceRequest { account: 6 }).await.unwrap().into_inner();
    assert_eq!((credited.posted, credited.incoming), (INITIAL_BALANCE + 8, 2), "{credited:?}");
    p1_as_c1.abort(pb::DecisionRequest { txn_id: "manual-5".into(), ..Default::default() }).await.unwrap();

    // A general transaction over three accounts on two participants.
    let result = client
        .execute(pb::ExecuteRequest { legs: legs(&[(1, -100), (2, -50), (12, 150)]), idempotency_key: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32);

    // Idempotency: the same key gets the first result; reused for another
    // request, it is refused.
    let first = client.transfer(transfer(4, 14, 10, "order-1")).await.unwrap().into_inner();
    let again = client.transfer(transfer(4, 14, 10, "order-1")).await.unwrap().into_inner();
    assert_eq!(first, again);
    let misuse = client.transfer(transfer(4, 14, 11, "order-1")).await.unwrap_err();
    assert_eq!(misuse.code(), Code::FailedPrecondition);
    wait_until_settled(&cluster, Duration::from_secs(10)).await;
    let b4 = p1.get_balance(pb::GetBalanceRequest { account: 4 }).await.unwrap().into_inner();
    assert_eq!(b4.posted, 990, "applied once");
    let status = client.get_transaction(pb::GetTransactionRequest { txn_id: first.txn_id }).await.unwrap().into_inner();
    assert!(
        status.state == pb::TransactionState::Committed as i32
            || status.state == pb::TransactionState::Committing as i32
    );

    // The audit sees all the money, and nothing prepared.
    let audit = client.audit(pb::AuditRequest { include_accounts: true }).await.unwrap().into_inner();
    assert_eq!(audit.total_posted, 20 * INITIAL_BALANCE);
    assert_eq!(audit.account_count, 20);
    assert_eq!(audit.participants.iter().map(|p| p.accounts.len()).sum::<usize>(), 20);

    // A participant rejects malformed calls itself, too.
    let status = p1_as_c1
        .prepare(pb::PrepareRequest {
            txn_id: "".into(),
            coordinator_id: "c1".into(),
            legs: legs(&[(0, -1)]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = cluster
        .participant_client(0, cluster.operator())
        .unwrap()
        .open_accounts(pb::OpenAccountsRequest { accounts: vec![pb::NewAccount { account: 0, initial_balance: 5 }] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_before_the_prepare_leaves_a_tombstone_and_prepared_transfers_are_listed() {
    // Long enough that the manual prepare below is still in doubt (not yet
    // asked about) when it is listed, even on a loaded machine.
    let (cluster, _dir) = start_cluster_asking_after(1, 2, 3_000).await;
    // The test speaks as the coordinator c1 (its prepares and aborts) and
    // reads balances as the operator.
    let mut p1 = cluster.participant_client(0, &cluster.identity(Role::Coordinator, "c1").unwrap()).unwrap();
    let mut p1_reader = cluster.participant_client(0, cluster.operator()).unwrap();
    let legs = vec![pb::Leg { account: 0, amount: -10 }, pb::Leg { account: 1, amount: 10 }];
    p1.abort(pb::DecisionRequest { txn_id: "manual-1".into(), ..Default::default() }).await.unwrap();
    let vote = p1
        .prepare(pb::PrepareRequest {
            txn_id: "manual-1".into(),
            coordinator_id: "c1".into(),
            legs: legs.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((vote.vote, vote.refusal), (pb::Vote::No as i32, pb::Refusal::AlreadyAborted as i32));

    // A prepare the coordinator never ran: listed, then resolved by asking the
    // coordinator, which has no record and answers ABORT.
    let vote = p1
        .prepare(pb::PrepareRequest {
            txn_id: "manual-2".into(),
            coordinator_id: "c1".into(),
            legs,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vote.vote, pb::Vote::Yes as i32);
    let listed = p1.list_prepared(pb::ListPreparedRequest { limit: 0 }).await.unwrap().into_inner();
    assert_eq!(listed.total, 1);
    assert_eq!(listed.prepared[0].txn_id, "manual-2");
    let balance = p1_reader.get_balance(pb::GetBalanceRequest { account: 0 }).await.unwrap().into_inner();
    assert_eq!((balance.reserved, balance.available), (10, 990));
    wait_until_settled(&cluster, Duration::from_secs(10)).await;
    let balance = p1_reader.get_balance(pb::GetBalanceRequest { account: 0 }).await.unwrap().into_inner();
    assert_eq!((balance.posted, balance.reserved), (1_000, 0));
}

/// What the clients saw: for each idempotency key, the transfer and its
/// definite outcome, if it got one.
#[derive(Default)]
struct Ledger {
    transfers: BTreeMap<String, (u64, u64, i64, Option<bool>)>,
}

/// Runs `clients` loops of random keyed transfers until `stop` is set.
fn spawn_load(
    cluster: &Cluster,
    clients: usize,
    seed: u64,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let accounts = cluster.accounts().end;
    (0..clients)
        .map(|c| {
            let mut client = cluster.coordinator_client(cluster.client()).unwrap();
            let ledger = ledger.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut rng = SplitMix64::new(seed * 1_000 + c as u64);
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let from = rng.below(accounts);
                    let to = (from + 1 + rng.below(accounts - 1)) % accounts;
                    let amount = 1 + rng.below(300) as i64;
                    let key = format!("c{c}-{n}");
                    ledger.lock().unwrap().transfers.insert(key.clone(), (from, to, amount, None));
                    let mut request = tonic::Request::new(transfer(from, to, amount, &key));
                    request.set_timeout(Duration::from_secs(3));
                    match client.transfer(request).await {
                        Ok(result) => {
                            let committed = result.get_ref().outcome == pb::Outcome::Committed as i32;
                            ledger.lock().unwrap().transfers.get_mut(&key).unwrap().3 = Some(committed);
                        }
                        // Unavailable, timed out: the outcome is unknown for now.
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        })
        .collect()
}

/// Waits until no participant holds a prepared transfer or a reservation.
async fn wait_until_settled(cluster: &Cluster, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let mut settled = true;
        for i in 0..cluster.participants.len() {
            let mut client = cluster.participant_client(i, cluster.operator()).unwrap();
            match client
                .read_balances(pb::ReadBalancesRequest { include_accounts: false, include_prepared: false })
                .await
            {
                Ok(balances) => {
                    let b = balances.into_inner();
                    settled &= b.prepared_count == 0 && b.total_reserved == 0 && b.total_incoming == 0;
                }
                Err(_) => settled = false,
            }
        }
        if settled {
            return;
        }
        assert!(Instant::now() < deadline, "the cluster did not settle within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Gives every transfer a definite outcome (retrying with its key), then
/// checks the ledger exactly.
async fn check_ledger(cluster: &Cluster, ledger: &Ledger) {
    let mut client = cluster.coordinator_client(cluster.client()).unwrap();
    let mut expected: BTreeMap<u64, i64> = cluster.accounts().map(|a| (a, INITIAL_BALANCE)).collect();
    let mut unknown_resolved = 0;
    let (mut committed_count, mut aborted_count) = (0, 0);
    for (key, (from, to, amount, outcome)) in &ledger.transfers {
        let committed = match outcome {
            Some(committed) => *committed,
            None => {
                unknown_resolved += 1;
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match client.transfer(transfer(*from, *to, *amount, key)).await {
                        Ok(result) => break result.into_inner().outcome == pb::Outcome::Committed as i32,
                        Err(status) if Instant::now() < deadline => {
                            eprintln!("retrying {key}: {}", status.message());
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(status) => panic!("{key} has no outcome: {status}"),
                    }
                }
            }
        };
        if committed {
            committed_count += 1;
            *expected.get_mut(from).unwrap() -= amount;
            *expected.get_mut(to).unwrap() += amount;
        } else {
            aborted_count += 1;
        }
    }
    eprintln!(
        "{} transfers: {committed_count} committed, {aborted_count} aborted, {unknown_resolved} resolved after healing",
        ledger.transfers.len()
    );
    assert!(committed_count > 50, "the load did run: {committed_count} commits");
    wait_until_settled(cluster, Duration::from_secs(15)).await;
    let audit = client.audit(pb::AuditRequest { include_accounts: true }).await.unwrap().into_inner();
    assert_eq!(audit.total_posted, cluster.spec.total_money(), "money is conserved");
    assert_eq!(audit.total_reserved, 0);
    for participant in &audit.participants {
        assert_eq!(participant.prepared_count, 0);
        for balance in &participant.accounts {
            assert!(balance.available >= 0, "{balance:?}");
            assert_eq!(
                balance.posted, expected[&balance.account],
                "account {}: posted differs from the committed transfers",
                balance.account
            );
        }
    }
}

async fn crash_and_heal(victim: NodeRef, seed: u64) {
    let (mut cluster, _dir) = start_cluster(3, 20).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = spawn_load(&cluster, 8, seed, ledger.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    cluster.kill(victim).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.restart(victim).await.expect("the victim restarts on its data");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert!(cluster.crashed().is_empty(), "no node crashed on its own");
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    check_ledger(&cluster, &ledger).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_survive_a_participant_sigkill_and_restart() {
    crash_and_heal(NodeRef::Participant(0), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_survive_a_coordinator_sigkill_and_restart() {
    crash_and_heal(NodeRef::Coordinator, 2).await;
}

/// A small tmpfs mounted on a directory for the life of the value, so that
/// a node's disk can fill up for real. `None` where mounting is not allowed
/// (not root, no CAP_SYS_ADMIN).
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &std::path::Path, size_mib: u64) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        Ok(SmallDisk { path: path.to_path_buf() })
    }

    /// Fills the disk with a file of zeros, and keeps it full (what a node
    /// frees, the filler takes) until [`Filler::release`].
    fn fill(&self) -> Filler {
        use std::io::Write;
        let path = self.path.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let chunk = vec![0u8; 4096];
        let topping_up = std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                while file.write_all(&chunk).is_ok() {}
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        // Full once the first pass has failed a write.
        while Store::free_bytes(&self.path).unwrap() >= 4096 {
            std::thread::sleep(Duration::from_millis(1));
        }
        Filler { path, stop, topping_up: Some(topping_up) }
    }
}

struct Filler {
    path: std::path::PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    topping_up: Option<std::thread::JoinHandle<()>>,
}

impl Filler {
    /// Stops filling and deletes the file: the disk has room again.
    fn release(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.topping_up.take() {
            thread.join().unwrap();
        }
        std::fs::remove_file(&self.path).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: a node killed a moment ago may still hold a file open.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

async fn participant_health(cluster: &Cluster, i: usize) -> Option<i32> {
    use tonic_health::pb::health_client::HealthClient;
    let channel = cluster.channel(&cluster.participants[i].url(), cluster.client()).unwrap();
    let mut request =
        tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: "tandem.v1.Participant".into() });
    request.set_timeout(Duration::from_millis(500));
    let answer = tokio::time::timeout(Duration::from_millis(500), HealthClient::new(channel).check(request)).await;
    match answer {
        Ok(Ok(response)) => Some(response.into_inner().status),
        _ => None,
    }
}

/// Issue 8: a participant whose disk fills under load stops acknowledging
/// and says NOT_SERVING; once there is room again it reopens its store and
/// recovers as a restart would, with no operator, and every transfer has a
/// definite outcome that the ledger accounts for exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_whose_disk_fills_stops_serving_and_recovers_by_itself_once_it_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let disk = match SmallDisk::mount(&dir.path().join("p1"), 64) {
        Ok(disk) => disk,
        Err(error) => {
            eprintln!("SKIPPED: this test fills a real disk and cannot mount a tmpfs here: {error}");
            return;
        }
    };
    // A primed log has its room already (see --wal-prime-mb): writes fill
    // it without asking the filesystem for more, and the full disk shows
    // once the log must grow. 1 MiB, not the default 16, so that this load
    // gets there within seconds.
    let cluster = start_cluster_in(dir.path(), 2, 20, 200, &["--store-free-min-mb", "8", "--wal-prime-mb", "1"]).await;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(participant_health(&cluster, 0).await, Some(serving));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = spawn_load(&cluster, 4, 8, ledger.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    let filler = disk.fill();
    let deadline = Instant::now() + Duration::from_secs(30);
    while participant_health(&cluster, 0).await != Some(not_serving) {
        assert!(Instant::now() < deadline, "p1 kept saying SERVING with a full disk");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Why, in its own words: the store's error.
    let mut p1 = cluster.participant_client(0, cluster.client()).unwrap();
    let said = p1.get_health(pb::GetHealthRequest {}).await.unwrap().into_inner();
    assert!(!said.live && !said.ready, "{said:?}");
    assert!(said.reason.starts_with("the store failed ("), "{said:?}");
    // It stays down while the disk is full (it tries to reopen its store
    // after 200 ms, then backs off).
    let full_until = Instant::now() + Duration::from_millis(1_500);
    while Instant::now() < full_until {
        assert_ne!(participant_health(&cluster, 0).await, Some(serving), "p1 came back with its disk still full");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    filler.release();
    let deadline = Instant::now() + Duration::from_secs(30);
    while participant_health(&cluster, 0).await != Some(serving) {
        assert!(Instant::now() < deadline, "p1 did not recover by itself once its disk had room");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let said = p1.get_health(pb::GetHealthRequest {}).await.unwrap().into_inner();
    assert!(said.live && said.reason.is_empty(), "{said:?}");
    // A transfer from p1 to p2 commits again.
    let mut client = cluster.coordinator_client(cluster.client()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for attempt in 0.. {
        let key = format!("after-recovery-{attempt}");
        ledger.lock().unwrap().transfers.insert(key.clone(), (0, 25, 1, None));
        let mut request = tonic::Request::new(transfer(0, 25, 1, &key));
        request.set_timeout(Duration::from_secs(3));
        if let Ok(result) = client.transfer(request).await {
            let committed = result.get_ref().outcome == pb::Outcome::Committed as i32;
            ledger.lock().unwrap().transfers.get_mut(&key).unwrap().3 = Some(committed);
            if committed {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no transfer touching p1 committed after it recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let mut cluster = cluster;
    assert!(cluster.crashed().is_empty(), "no node exited: p1 recovered in process");
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    check_ledger(&cluster, &ledger).await;
    cluster.stop().await;
    drop(disk);
}

/// A coordinator whose decision log fails a write (a full disk) says
/// NOT_SERVING, liveness included, and acknowledges nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_whose_disk_fills_says_not_serving() {
    let dir = tempfile::tempdir().unwrap();
    let disk = match SmallDisk::mount(&dir.path().join("c1"), 64) {
        Ok(disk) => disk,
        Err(error) => {
            eprintln!("SKIPPED: this test fills a real disk and cannot mount a tmpfs here: {error}");
            return;
        }
    };
    let mut spec = cluster_spec_in(dir.path(), 2, 10, 200, &[]);
    // No primed log (the participant's test above has one): filling 16 MiB
    // of it one transfer at a time (about 450 bytes of log each) would take
    // this test long, and what it is about is how the coordinator reports a
    // failed log.
    spec.coordinator_args.extend(["--wal-prime-mb".to_string(), "0".to_string()]);
    let cluster = Cluster::start(spec).await.expect("the cluster starts");
    let mut client = cluster.coordinator_client(cluster.client()).unwrap();
    let result = client.transfer(transfer(1, 11, 5, "before")).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    let filler = disk.fill();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attempt = 0;
    loop {
        use tonic_health::pb::health_client::HealthClient;
        let channel = cluster.channel(&cluster.coordinator.url(), cluster.client()).unwrap();
        let health = HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
            .await
            .unwrap()
            .into_inner();
        if health.status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "the coordinator kept saying SERVING with its log failed");
        // Transfers write the log; those that fit in the log file (its
        // primed, recycled room, or the last page) are durable and commit;
        // the first that does not fit fails the store.
        attempt += 1;
        let _ = client.transfer(transfer(2, 12, 1, &format!("full-{attempt}"))).await;
    }
    let refused = client.transfer(transfer(3, 13, 1, "after")).await;
    assert!(refused.is_err() || refused.unwrap().get_ref().outcome != pb::Outcome::Committed as i32);
    // GetHealth says why, with the store's error.
    let said = client.get_health(pb::GetHealthRequest {}).await.unwrap().into_inner();
    assert!(!said.live && !said.ready, "{said:?}");
    assert!(said.reason.starts_with("the decision log failed ("), "{said:?}");
    assert!(said.reason.contains("restart this coordinator"), "{said:?}");
    filler.release();
    drop(cluster);
    drop(disk);
}

/// Issue 8: a choreographed transfer's target paused (SIGSTOP) across the
/// source relay's delivery timeout gets the event, applies the credit in a
/// call its client already gave up, and its reply event must still be
/// relayed with no other traffic to carry it: the transfer completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_choreographed_transfer_completes_after_its_target_was_paused_across_the_relay_timeout() {
    let (mut cluster, _dir) = start_cluster(2, 10).await;
    let mut source = cluster.participant_client(0, cluster.client()).unwrap();
    let target = NodeRef::Participant(1);
    let timeout_ms = RELAY_DELIVERY_TIMEOUT_MS;
    for (i, pause_ms) in [timeout_ms - 50, timeout_ms, timeout_ms + 50, timeout_ms + 100].into_iter().enumerate() {
        let saga_id = format!("paused-{i}");
        cluster.node(target).pause();
        let started = source
            .start_transfer(pb::StartTransferRequest {
                saga_id: saga_id.clone(),
                from_account: 1,
                to_account: 11,
                amount: 5,
                target_participant: "p2".into(),
                wait_ms: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(started.state, pb::TransferState::Debited as i32, "{started:?}");
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        cluster.node(target).resume();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = source
                .get_transfer_status(pb::GetTransferStatusRequest { saga_id: saga_id.clone() })
                .await
                .unwrap()
                .into_inner();
            if status.terminal {
                assert_eq!(status.state, pb::TransferState::Completed as i32, "{status:?}");
                break;
            }
            assert!(Instant::now() < deadline, "{saga_id} (target paused {pause_ms} ms) stuck: {status:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut p2 = cluster.participant_client(1, cluster.operator()).unwrap();
    let credited = p2.get_balance(pb::GetBalanceRequest { account: 11 }).await.unwrap().into_inner();
    assert_eq!(credited.posted, INITIAL_BALANCE + 4 * 5, "each transfer credited once");
    let balances = p2
        .read_balances(pb::ReadBalancesRequest { include_accounts: false, include_prepared: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balances.outbox_pending, 0, "no reply left in the target's outbox");
    cluster.stop().await;
}

/// The source's relay gives up a delivery after this long (the
/// participant's `DELIVERY_TIMEOUT_MS`).
const RELAY_DELIVERY_TIMEOUT_MS: u64 = 1_000;

/// Asks a node's reflection service the questions a client without the
/// proto files asks first: the services, then the file of `symbol`. Returns
/// the services listed and the names of the files sent back.
async fn reflect(url: &str, who: &Security, symbol: &str) -> (Vec<String>, Vec<String>) {
    use prost::Message;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = tandem::server::channel(url, who).unwrap();
    let mut reflection = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let ask = |message| tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(symbol.into())),
    ];
    let mut stream = reflection.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("{response:?}") };
    let mut services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    services.sort();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("{response:?}")
    };
    let files = files
        .file_descriptor_proto
        .iter()
        .map(|encoded| prost_types::FileDescriptorProto::decode(encoded.as_slice()).unwrap().name().to_string())
        .collect();
    (services, files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_answer_standard_health_and_reflection_and_stop_on_sigterm() {
    let (mut cluster, _dir) = start_cluster(1, 1).await;
    // Each node lists what it serves, and only that; a file comes with the
    // files it imports, so a client needs no second question to use it.
    let (services, files) = reflect(&cluster.coordinator.url(), cluster.client(), "tandem.v1.Coordinator").await;
    assert_eq!(services, ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "tandem.v1.Coordinator"]);
    assert_eq!(files, ["tandem/v1/coordinator.proto", "tandem/v1/participant.proto"]);
    let (services, files) = reflect(&cluster.participants[0].url(), cluster.client(), "tandem.v1.Participant").await;
    assert_eq!(services, ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "tandem.v1.Participant"]);
    assert_eq!(files, ["tandem/v1/participant.proto"]);
    for node in cluster.nodes() {
        let status = cluster.node(node).stop(Duration::from_secs(5)).await.unwrap();
        assert!(status.success(), "{node} exits cleanly on SIGTERM: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_after_applying_a_commit_before_acknowledging_applies_it_once() {
    let (mut cluster, _dir) = start_cluster(2, 10).await;
    let target = NodeRef::Participant(1);
    cluster.node(target).env = vec![(tandem::crash::CRASH_AT_ENV.into(), "commit-applied".into())];
    cluster.restart(target).await.unwrap();
    let mut client = cluster.coordinator_client(cluster.client()).unwrap();
    // The decision is durable, so the client hears COMMITTED; the target
    // applies the commit durably and dies before acknowledging it.
    let result = client.transfer(transfer(1, 11, 40, "crash-commit")).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.node(target).exited().is_none() {
        assert!(Instant::now() < deadline, "the target never reached its crash point");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.node(target).env.clear();
    cluster.restart(target).await.unwrap();
    // The coordinator redelivers the COMMIT; the restarted target finds it
    // applied and only acknowledges.
    wait_until_settled(&cluster, Duration::from_secs(20)).await;
    let acknowledged = Instant::now() + Duration::from_secs(20);
    loop {
        let status = client
            .get_transaction(pb::GetTransactionRequest { txn_id: result.txn_id.clone() })
            .await
            .unwrap()
            .into_inner();
        if status.state == pb::TransactionState::Committed as i32 {
            break;
        }
        assert_eq!(status.pending_participants, vec!["p2".to_string()], "{status:?}");
        assert!(Instant::now() < acknowledged, "the redelivered commit was never acknowledged: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut p1 = cluster.participant_client(0, cluster.client()).unwrap();
    let mut p2 = cluster.participant_client(1, cluster.client()).unwrap();
    let b1 = p1.get_balance(pb::GetBalanceRequest { account: 1 }).await.unwrap().into_inner();
    let b11 = p2.get_balance(pb::GetBalanceRequest { account: 11 }).await.unwrap().into_inner();
    assert_eq!((b1.posted, b11.posted, b11.incoming), (INITIAL_BALANCE - 40, INITIAL_BALANCE + 40, 0));
    cluster.stop().await;
}

/// The coordinator's health for `service` (`Err` with the status code when
/// it has none).
async fn health(url: &str, who: &Security, service: &str) -> Result<i32, Code> {
    let channel = tandem::server::channel(url, who).unwrap();
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: service.into() });
    request.set_timeout(Duration::from_secs(2));
    client.check(request).await.map(|r| r.into_inner().status).map_err(|status| status.code())
}

/// Polls the coordinator's health for `service` until it is `want`; panics
/// with the last answer after `limit`.
async fn wait_health(
    url: &str,
    who: &Security,
    service: &str,
    want: tonic_health::pb::health_check_response::ServingStatus,
    limit: Duration,
) {
    let deadline = Instant::now() + limit;
    loop {
        let answer = health(url, who, service).await;
        if answer == Ok(want as i32) {
            return;
        }
        assert!(Instant::now() < deadline, "{service} is {answer:?}, not {want:?}, after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_readiness_says_when_a_participant_is_paused_and_when_it_is_back() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let (mut cluster, _dir) = start_cluster(2, 2).await;
    let url = cluster.coordinator.url();
    let who = cluster.client().clone();
    let limit = Duration::from_secs(10);
    wait_health(&url, &who, "tandem.v1.Coordinator.ready", ServingStatus::Serving, limit).await;
    wait_health(&url, &who, "tandem.v1.Participant/p1", ServingStatus::Serving, limit).await;

    cluster.node(NodeRef::Participant(0)).pause();
    wait_health(&url, &who, "tandem.v1.Coordinator.ready", ServingStatus::NotServing, limit).await;
    wait_health(&url, &who, "tandem.v1.Participant/p1", ServingStatus::NotServing, limit).await;
    // Only the paused one is unreachable, and the coordinator itself is live.
    assert_eq!(health(&url, &who, "tandem.v1.Participant/p2").await, Ok(ServingStatus::Serving as i32));
    assert_eq!(health(&url, &who, "").await, Ok(ServingStatus::Serving as i32));
    assert_eq!(health(&url, &who, "tandem.v1.Coordinator").await, Ok(ServingStatus::Serving as i32));
    // GetHealth says the same, and why.
    let mut coordinator = cluster.coordinator_client(cluster.client()).unwrap();
    let said = coordinator.get_health(pb::GetHealthRequest {}).await.unwrap().into_inner();
    assert!(said.live && !said.ready, "{said:?}");
    assert!(said.reason.contains("participant p1 does not answer as serving"), "{said:?}");
    assert!(!said.reason.contains("p2"), "{said:?}");

    cluster.node(NodeRef::Participant(0)).resume();
    wait_health(&url, &who, "tandem.v1.Coordinator.ready", ServingStatus::Serving, limit).await;
    assert_eq!(health(&url, &who, "tandem.v1.Participant/p1").await, Ok(ServingStatus::Serving as i32));
    let said = coordinator.get_health(pb::GetHealthRequest {}).await.unwrap().into_inner();
    assert!(said.live && said.ready && said.reason.is_empty(), "{said:?}");
    let mut p1 = cluster.participant_client(0, cluster.client()).unwrap();
    let said = p1.get_health(pb::GetHealthRequest {}).await.unwrap().into_inner();
    assert!(said.live && said.ready && said.reason.is_empty(), "{said:?}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totals_near_the_int64_limit_are_exact_or_out_of_range_never_wrapped() {
    // Two participants with two accounts each at half the int64 limit (which
    // OpenAccounts allows): each participant's total fits, their sum does not.
    let half = i64::MAX / 2;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(default_bin_dir(), dir.path().to_path_buf());
    spec.accounts_per_participant = 2;
    spec.initial_balance = half;
    spec.log_level = "info".into();
    let cluster = Cluster::start(spec).await.expect("the cluster starts");
    let mut coordinator = cluster.coordinator_client(cluster.client()).unwrap();
    let mut p1 = cluster.participant_client(0, cluster.operator()).unwrap();
    let balances = p1
        .read_balances(pb::ReadBalancesRequest { include_accounts: false, include_prepared: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(balances.total_posted, 2 * half, "exact while it fits");

    let audit = coordinator.audit(pb::AuditRequest { include_accounts: false }).await;
    let status = audit.expect_err("the sum over both participants does not fit an int64");
    assert_eq!(status.code(), Code::OutOfRange, "{}", status.message());
    let exact = (4 * half as i128).to_string();
    assert!(status.message().contains("total_posted") && status.message().contains(&exact), "{}", status.message());

    // Money moves into p1 until its own total passes the limit, although
    // every account stays within its own.
    let result = coordinator.transfer(transfer(2, 0, 2, "")).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match p1.read_balances(pb::ReadBalancesRequest { include_accounts: false, include_prepared: false }).await {
            Err(status) => break status,
            Ok(balances) => {
                assert_eq!(balances.get_ref().total_posted, 2 * half, "before the commit is applied");
                assert!(Instant::now() < deadline, "the commit was never applied");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let exact = (2 * half as i128 + 2).to_string();
    assert_eq!(status.code(), Code::OutOfRange, "{}", status.message());
    assert!(
        status.message().contains("total_posted")
            && status.message().contains("p1")
            && status.message().contains(&exact),
        "{}",
        status.message()
    );
    let b0 = p1.get_balance(pb::GetBalanceRequest { account: 0 }).await.unwrap().into_inner();
    assert_eq!(b0.posted, half + 2, "each account is still exact");

    // The audit names the participant whose own total does not fit.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match coordinator.audit(pb::AuditRequest { include_accounts: false }).await {
            Err(status) if status.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(status) => break status,
            Ok(audit) => panic!("a wrapped audit: {:?}", audit.into_inner()),
        }
    };
    assert_eq!(status.code(), Code::OutOfRange, "{}", status.message());
    assert!(status.message().contains("p1") && status.message().contains(&exact), "{}", status.message());
}
