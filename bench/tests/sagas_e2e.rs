//! Sagas end to end, on real processes: orchestrated and choreographed
//! transfers running together while a participant, or the coordinator, is
//! SIGKILLed and restarted; then the invariant checker (the bench's own)
//! resolves every outcome and checks the ledger exactly, suspense included.
//! Also: a dead letter that an operator resolves, compensation of a credit
//! refused by a closed or unknown account, for both kinds of saga and both
//! recoveries, and the abort reason each outcome carries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::cluster::{default_bin_dir, Cluster, ClusterSpec, NodeRef};
use tandem::pb;
use tandem::rng::SplitMix64;
use tandem::trust::Role;
use tandem_bench::check::check;
use tandem_bench::scenario::Protocol;
use tandem_bench::workload::{Client, HistoryEntry, OpOutcome};

const BALANCE: i64 = 1_000;

async fn start(participants: usize, accounts: u64) -> (Cluster, tempfile::TempDir) {
    start_with(participants, accounts, &[]).await
}

/// A cluster whose coordinator also takes `coordinator_args`.
async fn start_with(participants: usize, accounts: u64, coordinator_args: &[&str]) -> (Cluster, tempfile::TempDir) {
    let (spec, dir) = spec_with(participants, accounts, coordinator_args);
    (Cluster::start(spec).await.expect("the cluster starts"), dir)
}

fn spec_with(participants: usize, accounts: u64, coordinator_args: &[&str]) -> (ClusterSpec, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(default_bin_dir(), dir.path().to_path_buf());
    spec.participants = participants;
    spec.accounts_per_participant = accounts;
    spec.initial_balance = BALANCE;
    spec.log_level = "info".into();
    spec.coordinator_args = vec!["--call-timeout-ms".into(), "300".into()];
    if !coordinator_args.contains(&"--saga-step-attempts") {
        spec.coordinator_args.extend(["--saga-step-attempts".into(), "6".into()]);
    }
    spec.coordinator_args.extend(coordinator_args.iter().map(|a| a.to_string()));
    spec.participant_args = vec!["--in-doubt-after-ms".into(), "200".into()];
    (spec, dir)
}

fn client(cluster: &Cluster) -> Client {
    let coordinator = cluster.channel(&cluster.coordinator.url(), cluster.client()).unwrap();
    let participants =
        cluster.participants.iter().map(|p| cluster.channel(&p.url(), cluster.client()).unwrap()).collect();
    Client::new(coordinator, participants, cluster.spec.accounts_per_participant)
}

/// Runs `clients` loops of random transfers, alternating the protocols,
/// until `stop`; returns every operation.
fn load(
    cluster: &Cluster,
    clients: usize,
    protocols: &'static [Protocol],
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<HistoryEntry>>> {
    let accounts = cluster.accounts().end;
    let started = Instant::now();
    (0..clients)
        .map(|c| {
            let mut client = client(cluster);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut rng = SplitMix64::new(c as u64 + 11);
                let mut history = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let protocol = protocols[n % protocols.len()];
                    let from = rng.below(accounts);
                    let to = (from + 1 + rng.below(accounts - 1)) % accounts;
                    let amount = 1 + rng.below(200) as i64;
                    let key = format!("{}-{c}-{n}", protocol.name());
                    let start_us = started.elapsed().as_micros() as u64;
                    let (outcome, txn_id, detail) =
                        client.transfer(protocol, from, to, amount, &key, Duration::from_secs(3)).await;
                    history.push(HistoryEntry {
                        protocol,
                        client: c,
                        key,
                        from,
                        to,
                        amount,
                        start_us,
                        end_us: started.elapsed().as_micros() as u64,
                        outcome,
                        txn_id,
                        detail,
                    });
                    if !outcome.is_definite() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                history
            })
        })
        .collect()
}

async fn kill_restart_and_check(victim: NodeRef, protocols: &'static [Protocol]) {
    let (mut cluster, _dir) = start(3, 30).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&cluster, 8, protocols, stop.clone());
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    cluster.kill(victim).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.restart(victim).await.expect("the victim restarts on its data");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut history = Vec::new();
    for task in tasks {
        history.extend(task.await.unwrap());
    }
    assert!(cluster.crashed().is_empty(), "no node crashed on its own");
    let unknown = history.iter().filter(|e| !e.outcome.is_definite()).count();
    let report = check(&cluster, &mut history).await;
    assert!(report.passed(), "{:#?}", report.violations);
    for protocol in protocols {
        let committed = history.iter().filter(|e| e.protocol == *protocol && e.outcome == OpOutcome::Committed).count();
        assert!(committed > 20, "{protocol}: only {committed} committed");
    }
    assert!(history.iter().all(|e| e.outcome.is_definite()), "every saga ended");
    eprintln!(
        "{} operations, {unknown} with an outcome learned after healing; money {} posted + {} in suspense",
        history.len(),
        report.total_posted,
        report.total_suspense
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrated_and_choreographed_sagas_survive_a_participant_sigkill() {
    kill_restart_and_check(NodeRef::Participant(1), &[Protocol::Orchestrated, Protocol::Choreographed]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrated_sagas_resume_after_the_coordinator_is_sigkilled() {
    kill_restart_and_check(NodeRef::Coordinator, &[Protocol::Orchestrated, Protocol::Choreographed]).await;
}

fn saga_transfer(from: u64, to: u64, amount: i64, recovery: pb::Recovery, key: &str) -> pb::TransferRequest {
    pb::TransferRequest {
        from_account: from,
        to_account: to,
        amount,
        idempotency_key: key.into(),
        protocol: pb::Protocol::SagaOrchestrated as i32,
        recovery: recovery as i32,
    }
}

/// An operator resolves dead letter `saga` back to its source account
/// `source`: the saga is RESOLVED, the account has its balance back, and
/// nothing is left in suspense.
async fn resolve_back_to_the_source(cluster: &Cluster, saga: &str, source: u64) {
    let mut coordinator = cluster.coordinator_client(cluster.operator()).unwrap();
    // A release without a reason is refused, and changes nothing.
    let before = posted(cluster, source).await;
    let status = coordinator
        .resolve_dead_letter(pb::ResolveDeadLetterRequest { saga_id: saga.into(), to_account: 0, reason: " ".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{}", status.message());
    assert_eq!(posted(cluster, source).await, before);
    let reason = "ticket 7: the customer reopened the account";
    let resolved = coordinator
        .resolve_dead_letter(pb::ResolveDeadLetterRequest {
            saga_id: saga.into(),
            to_account: 0,
            reason: reason.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.state, pb::SagaState::Resolved as i32);
    assert!(resolved.reason.ends_with(&format!("; resolved by tandem://operator/bench: {reason}")), "{resolved:?}");
    assert_eq!(posted(cluster, source).await, BALANCE);
    // The end record says who released it and why.
    let ended = coordinator
        .get_transaction(pb::GetTransactionRequest { txn_id: saga.into() })
        .await
        .unwrap()
        .into_inner()
        .detail;
    assert!(ended.starts_with("finished as Resolved: "), "{ended}");
    assert!(ended.ends_with(&format!("; resolved by tandem://operator/bench: {reason}")), "{ended}");
    let audit = coordinator.audit(pb::AuditRequest { include_accounts: false }).await.unwrap().into_inner();
    assert_eq!((audit.total_posted, audit.total_suspense), (cluster.spec.total_money(), 0));
}

async fn posted(cluster: &Cluster, account: u64) -> i64 {
    let owner = (account / cluster.spec.accounts_per_participant) as usize;
    let mut client = cluster.participant_client(owner, cluster.operator()).unwrap();
    client.get_balance(pb::GetBalanceRequest { account }).await.unwrap().into_inner().posted
}

fn two_phase_transfer(from: u64, to: u64, amount: i64) -> pb::TransferRequest {
    pb::TransferRequest { from_account: from, to_account: to, amount, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credit_is_compensated_at_once_backward_or_forward_and_says_why() {
    // A saga deadline far beyond the test: forward recovery must not wait for it.
    let (mut spec, _dir) = spec_with(2, 10, &["--saga-deadline-ms", "600000"]);
    // The directory routes accounts 9 and 19 to p1 and p2, which lack them.
    spec.unopened_accounts = [9, 19].into();
    let mut cluster = Cluster::start(spec).await.expect("the cluster starts");
    let mut coordinator = cluster.coordinator_client(cluster.client()).unwrap();
    let mut operator = cluster.coordinator_client(cluster.operator()).unwrap();
    let mut p2 = cluster.participant_client(1, cluster.operator()).unwrap();
    p2.set_account_closed(pb::SetAccountClosedRequest { account: 15, closed: true }).await.unwrap();

    // Backward: the credit to the closed account is refused, the debit refunded.
    let result =
        coordinator.transfer(saga_transfer(3, 15, 100, pb::Recovery::Backward, "b1")).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Compensated as i32, "{result:?}");
    assert_eq!(result.abort_reason, pb::AbortReason::Refused as i32, "{result:?}");
    assert!(result.reason.contains("closed"), "{}", result.reason);
    assert_eq!(posted(&cluster, 3).await, BALANCE);

    // Choreographed, the same: the target rejects, the source refunds.
    let mut client = client(&cluster);
    let (outcome, _, detail) = client.transfer(Protocol::Choreographed, 4, 15, 100, "c1", Duration::from_secs(5)).await;
    assert_eq!(outcome, OpOutcome::Compensated, "{detail}");
    assert_eq!(posted(&cluster, 4).await, BALANCE);

    // Forward: no retry can change a business refusal, so the debit is
    // refunded at once, neither parked nor held until the deadline.
    for (to, key, abort_reason, words) in [
        (15, "f1", pb::AbortReason::Refused, "closed"),
        (19, "f2", pb::AbortReason::UnknownAccount, "account 19 does not exist"),
    ] {
        let started = Instant::now();
        let result =
            coordinator.transfer(saga_transfer(3, to, 250, pb::Recovery::Forward, key)).await.unwrap().into_inner();
        assert_eq!(result.outcome, pb::Outcome::Compensated as i32, "{result:?}");
        assert_eq!(result.abort_reason, abort_reason as i32, "{result:?}");
        assert!(result.reason.contains(words), "{}", result.reason);
        assert!(started.elapsed() < Duration::from_secs(10), "compensated after {:?}", started.elapsed());
        assert_eq!(posted(&cluster, 3).await, BALANCE);
        // The same key gets the same answer, without a second saga.
        let again =
            coordinator.transfer(saga_transfer(3, to, 250, pb::Recovery::Forward, key)).await.unwrap().into_inner();
        assert_eq!(again, result);
    }
    let listed = operator.list_dead_letters(pb::ListDeadLettersRequest::default()).await.unwrap().into_inner();
    assert!(listed.dead_letters.is_empty(), "{listed:?}");
    let audit = coordinator.audit(pb::AuditRequest { include_accounts: false }).await.unwrap().into_inner();
    assert_eq!((audit.total_posted, audit.total_suspense), (cluster.spec.total_money(), 0));

    // An account its participant lacks is a refusal learned by asking, the
    // same for both protocols: ABORTED when nothing moved (2PC, or a saga's
    // debit), with the abort reason UNKNOWN_ACCOUNT.
    for (request, words) in [
        (saga_transfer(9, 12, 5, pb::Recovery::Backward, "u1"), "account 9 does not exist"),
        (two_phase_transfer(9, 12, 5), "account 9 does not exist"),
        (two_phase_transfer(3, 19, 5), "account 19 does not exist"),
    ] {
        let result = coordinator.transfer(request.clone()).await.unwrap().into_inner();
        assert_eq!(result.outcome, pb::Outcome::Aborted as i32, "{request:?}: {result:?}");
        assert_eq!(result.abort_reason, pb::AbortReason::UnknownAccount as i32, "{request:?}: {result:?}");
        assert!(result.reason.contains(words), "{}", result.reason);
    }
    // An account in no participant's range is bad input: NOT_FOUND at once.
    for request in [saga_transfer(3, 999, 5, pb::Recovery::Forward, "n1"), two_phase_transfer(3, 999, 5)] {
        let status = coordinator.transfer(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound, "{}", status.message());
        assert!(status.message().contains("999"), "{}", status.message());
    }
    assert_eq!((posted(&cluster, 3).await, posted(&cluster, 12).await), (BALANCE, BALANCE));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_saga_whose_credit_keeps_failing_compensates_after_its_deadline() {
    let (mut cluster, _dir) = start_with(2, 10, &["--saga-deadline-ms", "1500"]).await;
    let mut coordinator = cluster.coordinator_client(cluster.client()).unwrap();
    // The target stops answering (SIGSTOP): every credit attempt times out.
    cluster.node(NodeRef::Participant(1)).pause();
    let saga = tokio::spawn(async move {
        coordinator.transfer(saga_transfer(3, 15, 100, pb::Recovery::Forward, "fw1")).await.unwrap().into_inner()
    });
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert!(!saga.is_finished(), "the credit's compensation waits for the target to answer");
    cluster.node(NodeRef::Participant(1)).resume();
    let result = tokio::time::timeout(Duration::from_secs(20), saga).await.expect("the saga ends").unwrap();
    // Without the deadline, forward recovery would have committed once the
    // target came back.
    assert_eq!(result.outcome, pb::Outcome::Compensated as i32, "{result:?}");
    assert_eq!(result.abort_reason, pb::AbortReason::ParticipantUnavailable as i32, "{result:?}");
    assert!(result.reason.contains("deadline"), "{}", result.reason);
    assert_eq!((posted(&cluster, 3).await, posted(&cluster, 15).await), (BALANCE, BALANCE));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_steps_on_the_wire_keep_their_barrier_semantics() {
    let (cluster, _dir) = start(1, 4).await;
    // The test speaks as the coordinator c1, the one p1 was configured with.
    let mut p1 = cluster.participant_client(0, &cluster.identity(Role::Coordinator, "c1").unwrap()).unwrap();
    let step = |phase: pb::StepPhase| pb::SagaStepRequest {
        saga_id: "manual-1".into(),
        kind: pb::StepKind::Debit as i32,
        phase: phase as i32,
        account: 1,
        amount: 40,
        ..Default::default()
    };
    // Empty compensation first, then the hanging step does nothing.
    let answer = p1.saga_step(step(pb::StepPhase::Compensation)).await.unwrap().into_inner();
    assert_eq!(answer.outcome, pb::StepOutcome::EmptyCompensation as i32);
    let answer = p1.saga_step(step(pb::StepPhase::Action)).await.unwrap().into_inner();
    assert_eq!(answer.outcome, pb::StepOutcome::HangingIgnored as i32);
    assert_eq!(posted(&cluster, 1).await, BALANCE);
    // Bad input is an error status and changes nothing.
    let mut bad = step(pb::StepPhase::Action);
    bad.amount = -5;
    bad.saga_id = "manual-2".into();
    assert_eq!(p1.saga_step(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let mut bad = step(pb::StepPhase::Action);
    bad.saga_id = "white space".into();
    assert_eq!(p1.saga_step(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    // A duplicated step applies once.
    let mut once = step(pb::StepPhase::Action);
    once.saga_id = "manual-3".into();
    let first = p1.saga_step(once.clone()).await.unwrap().into_inner();
    let second = p1.saga_step(once).await.unwrap().into_inner();
    assert_eq!((first.outcome, first.duplicate), (pb::StepOutcome::Applied as i32, false));
    assert_eq!((second.outcome, second.duplicate), (pb::StepOutcome::Applied as i32, true));
    assert_eq!(posted(&cluster, 1).await, BALANCE - 40);
    // A batch judges each step alone: applied, malformed, duplicate.
    let mut batched = step(pb::StepPhase::Action);
    batched.saga_id = "manual-4".into();
    let mut malformed = batched.clone();
    malformed.amount = 0;
    let results = p1
        .saga_step_batch(pb::SagaStepBatchRequest { steps: vec![batched.clone(), malformed, batched] })
        .await
        .unwrap()
        .into_inner()
        .results;
    let first = results[0].response.clone().expect("judged");
    assert_eq!((first.outcome, first.duplicate), (pb::StepOutcome::Applied as i32, false));
    assert_eq!((results[1].response.is_none(), results[1].error_code), (true, tonic::Code::InvalidArgument as i32));
    assert!(results[1].error.contains("positive"), "{}", results[1].error);
    assert!(results[2].response.as_ref().expect("judged").duplicate, "the second one in the batch is a duplicate");
    assert_eq!(posted(&cluster, 1).await, BALANCE - 80);
    // No choreographed transfer is parked here; resolving an unknown one is NOT_FOUND.
    let mut p1 = cluster.participant_client(0, cluster.operator()).unwrap();
    let parked = p1.list_parked_transfers(pb::ListParkedTransfersRequest::default()).await.unwrap().into_inner().parked;
    assert!(parked.is_empty());
    let request = pb::ResolveParkedTransferRequest { saga_id: "nope".into(), to_account: 0, reason: "test".into() };
    assert_eq!(p1.resolve_parked_transfer(request).await.unwrap_err().code(), tonic::Code::NotFound);
}

/// Waits until `node` has exited on its own (a crash point fired).
async fn wait_for_crash(cluster: &mut Cluster, node: NodeRef) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.node(node).exited().is_none() {
        assert!(Instant::now() < deadline, "{node} did not reach its crash point");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Restarts `node` with `crash_at` armed (or disarmed, with `None`).
async fn restart_with_crash_point(cluster: &mut Cluster, node: NodeRef, crash_at: Option<&str>) {
    cluster.node(node).env =
        crash_at.map(|point| vec![(tandem::crash::CRASH_AT_ENV.to_string(), point.to_string())]).unwrap_or_default();
    cluster.restart(node).await.expect("the node restarts on its data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_after_its_step_is_written_applies_the_retry_once() {
    // Enough attempts that the debit's retry outlasts the restart.
    let (mut cluster, _dir) = start_with(2, 10, &["--saga-step-attempts", "200"]).await;
    let source = NodeRef::Participant(0);
    restart_with_crash_point(&mut cluster, source, Some("saga-step-written")).await;
    let mut coordinator = cluster.coordinator_client(cluster.client()).unwrap();
    let saga = tokio::spawn(async move {
        coordinator.transfer(saga_transfer(2, 12, 70, pb::Recovery::Backward, "once-1")).await.unwrap().into_inner()
    });
    // The debit is durable at the source, which dies before it answers.
    wait_for_crash(&mut cluster, source).await;
    restart_with_crash_point(&mut cluster, source, None).await;
    let result = tokio::time::timeout(Duration::from_secs(30), saga).await.expect("the saga ends").unwrap();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    // The retried debit found its barrier: applied once, not twice.
    assert_eq!((posted(&cluster, 2).await, posted(&cluster, 12).await), (BALANCE - 70, BALANCE + 70));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_relay_killed_between_delivery_and_forgetting_redelivers_and_the_target_applies_once() {
    let (mut cluster, _dir) = start(2, 10).await;
    let source = NodeRef::Participant(0);
    restart_with_crash_point(&mut cluster, source, Some("relay-delivered")).await;
    let mut p1 = cluster.participant_client(0, cluster.client()).unwrap();
    let started = p1
        .start_transfer(pb::StartTransferRequest {
            saga_id: "relay-1".into(),
            from_account: 3,
            to_account: 13,
            amount: 90,
            target_participant: "p2".into(),
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.state, pb::TransferState::Debited as i32, "{started:?}");
    // The target credited and acknowledged; the source dies before it
    // forgets the event, so its restarted relay delivers it again.
    wait_for_crash(&mut cluster, source).await;
    restart_with_crash_point(&mut cluster, source, None).await;
    let mut p1 = cluster.participant_client(0, cluster.operator()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = p1
            .get_transfer_status(pb::GetTransferStatusRequest { saga_id: "relay-1".into() })
            .await
            .unwrap()
            .into_inner();
        if status.terminal {
            assert_eq!(status.state, pb::TransferState::Completed as i32, "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the transfer never completed: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The redelivered event was dropped by the target's inbox: credited once.
    assert_eq!((posted(&cluster, 3).await, posted(&cluster, 13).await), (BALANCE - 90, BALANCE + 90));
    let settled = Instant::now() + Duration::from_secs(10);
    loop {
        let balances = p1
            .read_balances(pb::ReadBalancesRequest { include_accounts: false, include_prepared: false })
            .await
            .unwrap()
            .into_inner();
        if balances.outbox_pending == 0 {
            break;
        }
        assert!(Instant::now() < settled, "the redelivered event was never forgotten");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.stop().await;
}

/// Makes a dead letter of a saga from `from` (on p1) to `to` (on p2): the
/// credit will be refused (`to` is closed), but only once p2 answers
/// again; meanwhile `from` is closed too, so the refund of the debit cannot
/// be applied and the money is parked in p1's suspense account. `from`
/// stays closed.
async fn dead_letter(
    cluster: &mut Cluster,
    (from, to, amount): (u64, u64, i64),
    recovery: pb::Recovery,
    key: &str,
) -> pb::TransactionResult {
    let mut coordinator = cluster.coordinator_client(cluster.client()).unwrap();
    let mut p1 = cluster.participant_client(0, cluster.operator()).unwrap();
    let mut p2 = cluster.participant_client(1, cluster.operator()).unwrap();
    p2.set_account_closed(pb::SetAccountClosedRequest { account: to, closed: true }).await.unwrap();
    let before = posted(cluster, from).await;
    cluster.node(NodeRef::Participant(1)).pause();
    let request = saga_transfer(from, to, amount, recovery, key);
    let saga = tokio::spawn(async move { coordinator.transfer(request).await.unwrap().into_inner() });
    let debited = Instant::now() + Duration::from_secs(10);
    while posted(cluster, from).await != before - amount {
        assert!(Instant::now() < debited, "the debit never happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p1.set_account_closed(pb::SetAccountClosedRequest { account: from, closed: true }).await.unwrap();
    cluster.node(NodeRef::Participant(1)).resume();
    let result = tokio::time::timeout(Duration::from_secs(30), saga).await.expect("the saga ends").unwrap();
    assert_eq!(result.outcome, pb::Outcome::DeadLettered as i32, "{result:?}");
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_that_keeps_failing_is_dead_lettered_and_an_operator_resolves_it() {
    let (mut cluster, _dir) = start(2, 10).await;
    // Forward recovery parks money only when the refund itself fails.
    let result = dead_letter(&mut cluster, (5, 16, 120), pb::Recovery::Forward, "refund-1").await;
    // The abort reason is the refusal that turned the saga back.
    assert_eq!(result.abort_reason, pb::AbortReason::Refused as i32, "{result:?}");
    assert!(result.reason.contains("closed") && result.reason.contains("parked"), "{}", result.reason);
    // The operator looks into it; a client retries the transfer.
    let mut coordinator = cluster.coordinator_client(cluster.operator()).unwrap();
    let mut client = cluster.coordinator_client(cluster.client()).unwrap();
    let mut p1 = cluster.participant_client(0, cluster.operator()).unwrap();
    let listed = coordinator.list_dead_letters(pb::ListDeadLettersRequest::default()).await.unwrap().into_inner();
    assert_eq!((listed.dead_letters.len(), listed.total), (1, 1));
    let dead = &listed.dead_letters[0];
    assert_eq!((dead.saga_id.as_str(), dead.amount, dead.parked), (result.txn_id.as_str(), 120, true));
    assert_eq!(dead.suspense_participant, "p1");
    // Conservation holds with suspense counted.
    let audit = coordinator.audit(pb::AuditRequest { include_accounts: false }).await.unwrap().into_inner();
    assert_eq!((audit.total_posted, audit.total_suspense), (cluster.spec.total_money() - 120, 120));
    // The same key gets the same answer, without a second saga.
    let again =
        client.transfer(saga_transfer(5, 16, 120, pb::Recovery::Forward, "refund-1")).await.unwrap().into_inner();
    assert_eq!(again, result);
    assert_eq!(posted(&cluster, 5).await, BALANCE - 120);
    // Resolving to an account on another participant is refused.
    let status = coordinator
        .resolve_dead_letter(pb::ResolveDeadLetterRequest {
            saga_id: result.txn_id.clone(),
            to_account: 15,
            reason: "test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{}", status.message());
    // Releasing into the still closed account fails and leaves the dead letter.
    let refused = coordinator
        .resolve_dead_letter(pb::ResolveDeadLetterRequest {
            saga_id: result.txn_id.clone(),
            to_account: 0,
            reason: "test".into(),
        })
        .await;
    assert!(refused.is_err() || refused.unwrap().into_inner().state != pb::SagaState::Resolved as i32);
    // The operator reopens the account and resolves the dead letter, once.
    p1.set_account_closed(pb::SetAccountClosedRequest { account: 5, closed: false }).await.unwrap();
    resolve_back_to_the_source(&cluster, &result.txn_id, 5).await;
    assert!(coordinator
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .dead_letters
        .is_empty());
    let status = coordinator
        .resolve_dead_letter(pb::ResolveDeadLetterRequest {
            saga_id: result.txn_id,
            to_account: 0,
            reason: "test".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    cluster.stop().await;
}

async fn saga_barriers(cluster: &Cluster) -> Vec<u64> {
    let mut counts = Vec::new();
    for i in 0..cluster.participants.len() {
        let mut client = cluster.participant_client(i, cluster.operator()).unwrap();
        let read = client
            .read_balances(pb::ReadBalancesRequest { include_accounts: false, include_prepared: false })
            .await
            .unwrap();
        counts.push(read.into_inner().saga_barriers);
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_barriers_of_ended_sagas_are_forgotten_and_a_dead_letters_wait_for_its_resolution() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ClusterSpec::new(default_bin_dir(), dir.path().to_path_buf());
    spec.participants = 2;
    spec.accounts_per_participant = 10;
    spec.initial_balance = BALANCE;
    spec.participant_args = vec!["--finished-retention-ms".into(), "300".into()];
    let mut cluster = Cluster::start(spec).await.expect("the cluster starts");
    let mut coordinator = cluster.coordinator_client(cluster.client()).unwrap();
    let mut operator = cluster.coordinator_client(cluster.operator()).unwrap();
    let mut p2 = cluster.participant_client(1, cluster.operator()).unwrap();
    p2.set_account_closed(pb::SetAccountClosedRequest { account: 17, closed: true }).await.unwrap();
    for (to, key, recovery) in [
        (11, "done-1", pb::Recovery::Backward),
        (17, "refused-1", pb::Recovery::Backward),
        (17, "refused-2", pb::Recovery::Forward),
    ] {
        coordinator.transfer(saga_transfer(1, to, 10, recovery, key)).await.unwrap();
    }
    let parked = dead_letter(&mut cluster, (1, 17, 10), pb::Recovery::Backward, "dead-1").await;
    let mut p1 = cluster.participant_client(0, cluster.operator()).unwrap();
    p1.set_account_closed(pb::SetAccountClosedRequest { account: 1, closed: false }).await.unwrap();
    // Completed and compensated sagas are forgotten: their barriers go
    // (after the linger, the retention and a collection round). The dead
    // letter is not over: the barrier of its refused credit stays at the
    // target, and the barrier of its parked debit stays at the source until
    // the release ran (it is what allows the release: a release for a saga
    // that parked nothing is refused).
    let wait_for = |expected: [u64; 2]| {
        let cluster = &cluster;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let counts = saga_barriers(cluster).await;
                if counts == expected {
                    break;
                }
                assert!(Instant::now() < deadline, "barriers left: {counts:?}, expected {expected:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for([1, 1]).await;
    // Once an operator resolves it, it is over too.
    let resolved = operator
        .resolve_dead_letter(pb::ResolveDeadLetterRequest {
            saga_id: parked.txn_id,
            to_account: 0,
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resolved.state, pb::SagaState::Resolved as i32);
    wait_for([0, 0]).await;
    assert_eq!(posted(&cluster, 1).await, BALANCE - 10, "only the completed transfer moved money");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_redelivered_events_is_dropped_by_the_inbox_and_a_malformed_one_is_refused_alone() {
    let (mut cluster, _dir) = start(2, 10).await;
    let mut p1 = cluster.participant_client(0, cluster.client()).unwrap();
    let request = pb::StartTransferRequest {
        saga_id: "wire-1".into(),
        from_account: 1,
        to_account: 12,
        amount: 5,
        target_participant: "p2".into(),
        wait_ms: 5_000,
    };
    let status = p1.start_transfer(request).await.unwrap().into_inner();
    assert_eq!(status.state, pb::TransferState::Completed as i32, "{status:?}");
    // The relay's event, delivered twice more in one batch, with a bad one.
    let debited = pb::ChoreographyEvent {
        version: 1,
        event_id: "wire-1:debited".into(),
        kind: pb::EventKind::TransferDebited as i32,
        saga_id: "wire-1".into(),
        from_account: 1,
        to_account: 12,
        amount: 5,
        source_participant: "p1".into(),
        target_participant: "p2".into(),
        reason: String::new(),
        sequence: 1,
        trace_parent: String::new(),
    };
    let mut malformed = debited.clone();
    malformed.version = 0;
    // The test speaks as p1, a peer p2 was configured with.
    let mut p2 = cluster.participant_client(1, &cluster.identity(Role::Participant, "p1").unwrap()).unwrap();
    let results = p2
        .deliver_events(pb::DeliverEventsRequest { events: vec![debited.clone(), malformed, debited] })
        .await
        .unwrap()
        .into_inner()
        .results;
    let summary: Vec<(bool, bool)> = results.iter().map(|r| (r.delivered, r.duplicate)).collect();
    assert_eq!(summary, [(true, true), (false, false), (true, true)]);
    assert!(results[1].error.contains("version"), "{}", results[1].error);
    assert_eq!((posted(&cluster, 1).await, posted(&cluster, 12).await), (BALANCE - 5, BALANCE + 5));
    cluster.stop().await;
}

/// The checker learns, with the client's own certificate, the outcome of a
/// transfer the client never heard back about, by every protocol (a
/// choreographed one is asked again at its source participant, which only
/// a client may call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_learns_every_protocols_outcome_the_client_missed() {
    let (mut cluster, _dir) = start(2, 10).await;
    let mut sender = client(&cluster);
    let mut history = Vec::new();
    for (i, protocol) in
        [Protocol::TwoPhaseCommit, Protocol::Orchestrated, Protocol::Choreographed].into_iter().enumerate()
    {
        let (from, to, amount, key) = (i as u64, 10 + i as u64, 5 + i as i64, format!("missed-{i}"));
        let (outcome, _, detail) = sender.transfer(protocol, from, to, amount, &key, Duration::from_secs(5)).await;
        assert_eq!(outcome, OpOutcome::Committed, "{protocol}: {detail}");
        // As if the answer had been lost on its way back.
        history.push(HistoryEntry {
            protocol,
            client: 0,
            key,
            from,
            to,
            amount,
            start_us: 0,
            end_us: 1,
            outcome: OpOutcome::Unknown,
            txn_id: String::new(),
            detail: "the answer was lost".into(),
        });
    }
    let report = check(&cluster, &mut history).await;
    assert!(report.passed(), "{:#?}", report.violations);
    assert_eq!(report.resolved_after_run, 3);
    assert!(history.iter().all(|e| e.outcome == OpOutcome::Committed), "{history:#?}");
    cluster.stop().await;
}
