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
    let mut spec = ClusterSpec::new(default_bin_dir(), dir.path().to_path_buf());
    spec.participants = participants;
    spec.accounts_per_participant = accounts_each;
    spec.initial_balance = INITIAL_BALANCE;
    spec.log_level = "info".into();
    spec.coordinator_args = vec!["--prepare-timeout-ms".into(), "300".into(), "--call-timeout-ms".into(), "300".into()];
    spec.participant_args = vec!["--in-doubt-after-ms".into(), in_doubt_after_ms.to_string()];
    (spec, dir)
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
    let mut client = cluster.coordinator_client().unwrap();

    // A cross-participant transfer commits and moves the money.
    let result = client.transfer(transfer(0, 15, 300, "")).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    let mut p1 = cluster.participant_client(0).unwrap();
    let mut p2 = cluster.participant_client(1).unwrap();
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
    let prepare =
        |txn: &str, legs: Vec<pb::Leg>| pb::PrepareRequest { txn_id: txn.into(), coordinator_id: "c1".into(), legs };
    let votes = p1
        .prepare_batch(pb::PrepareBatchRequest {
            prepares: vec![
                prepare("manual-1", legs(&[(1, -5)])),
                prepare("bad id!", legs(&[(1, -5)])),
                prepare("manual-2", legs(&[(1, -1_000_000)])),
            ],
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
    p1.abort(pb::DecisionRequest { txn_id: "manual-1".into() }).await.unwrap();
    let status = p1.prepare_batch(pb::PrepareBatchRequest { prepares: vec![] }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // A batched commit with no ids, too many, or a malformed one is refused whole.
    for txn_ids in [vec![], vec!["t".to_string(); 1_025], vec!["ok-1".into(), "not ok".into()]] {
        let status = p1.commit_batch(pb::DecisionBatchRequest { txn_ids }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }

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
    assert_eq!(misuse.code(), Code::InvalidArgument);
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
    let status = p1
        .prepare(pb::PrepareRequest { txn_id: "".into(), coordinator_id: "c1".into(), legs: legs(&[(0, -1)]) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = p1
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
    let mut p1 = cluster.participant_client(0).unwrap();
    let legs = vec![pb::Leg { account: 0, amount: -10 }, pb::Leg { account: 1, amount: 10 }];
    p1.abort(pb::DecisionRequest { txn_id: "manual-1".into() }).await.unwrap();
    let vote = p1
        .prepare(pb::PrepareRequest { txn_id: "manual-1".into(), coordinator_id: "c1".into(), legs: legs.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((vote.vote, vote.refusal), (pb::Vote::No as i32, pb::Refusal::AlreadyAborted as i32));

    // A prepare the coordinator never ran: listed, then resolved by asking the
    // coordinator, which has no record and answers ABORT.
    let vote = p1
        .prepare(pb::PrepareRequest { txn_id: "manual-2".into(), coordinator_id: "c1".into(), legs })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vote.vote, pb::Vote::Yes as i32);
    let listed = p1.list_prepared(pb::ListPreparedRequest { limit: 0 }).await.unwrap().into_inner();
    assert_eq!(listed.total, 1);
    assert_eq!(listed.prepared[0].txn_id, "manual-2");
    let balance = p1.get_balance(pb::GetBalanceRequest { account: 0 }).await.unwrap().into_inner();
    assert_eq!((balance.reserved, balance.available), (10, 990));
    wait_until_settled(&cluster, Duration::from_secs(10)).await;
    let balance = p1.get_balance(pb::GetBalanceRequest { account: 0 }).await.unwrap().into_inner();
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
            let mut client = cluster.coordinator_client().unwrap();
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
            let mut client = cluster.participant_client(i).unwrap();
            match client.read_balances(pb::ReadBalancesRequest { include_accounts: false }).await {
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
    let mut client = cluster.coordinator_client().unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_answer_standard_health_and_reflection_and_stop_on_sigterm() {
    let (mut cluster, _dir) = start_cluster(1, 1).await;
    let channel = tandem::server::channel(&cluster.coordinator.url()).unwrap();
    let mut reflection = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = reflection.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("{response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"tandem.v1.Coordinator".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
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
    let mut client = cluster.coordinator_client().unwrap();
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
    let mut p1 = cluster.participant_client(0).unwrap();
    let mut p2 = cluster.participant_client(1).unwrap();
    let b1 = p1.get_balance(pb::GetBalanceRequest { account: 1 }).await.unwrap().into_inner();
    let b11 = p2.get_balance(pb::GetBalanceRequest { account: 11 }).await.unwrap().into_inner();
    assert_eq!((b1.posted, b11.posted, b11.incoming), (INITIAL_BALANCE - 40, INITIAL_BALANCE + 40, 0));
    cluster.stop().await;
}
