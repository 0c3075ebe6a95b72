//! Tests of the participant's saga steps (barrier semantics) and of the
//! choreography (outbox, inbox, compensation, suspense), including restarts
//! from what reached the disk.

use super::*;
use crate::core::{Config, Core, Refusal};
use std::collections::BTreeMap;

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

fn config(name: &str) -> Config {
    Config {
        node_id: id(name),
        coordinators: [id("c1")].into_iter().collect(),
        in_doubt_after_ms: 500,
        finished_retention_ms: 60_000,
        owned_accounts: None,
    }
}

#[derive(Default, Clone)]
struct Disk(BTreeMap<Vec<u8>, Vec<u8>>);

impl Disk {
    fn apply(&mut self, effects: &Effects) {
        for op in &effects.ops {
            match op {
                Op::Put(k, v) => {
                    self.0.insert(k.clone(), v.clone());
                }
                Op::Delete(k) => {
                    self.0.remove(k);
                }
            }
        }
    }
}

/// A participant with accounts 1 (100) and 2 (0).
fn node(name: &str) -> (Core, Disk) {
    let mut core = Core::new(config(name));
    let mut disk = Disk::default();
    disk.apply(&core.open_accounts(&[(1, 100), (2, 0)]).unwrap());
    (core, disk)
}

fn step(core: &mut Core, disk: &mut Disk, kind: StepKind, phase: StepPhase, account: u64, amount: i64) -> StepAnswer {
    let (answer, effects) = core.saga_step(id("s1"), kind, phase, account, amount, 0).unwrap();
    disk.apply(&effects);
    answer
}

#[test]
fn a_duplicate_step_does_nothing_and_gets_the_first_answer() {
    let (mut core, mut disk) = node("p1");
    let first = step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30);
    assert_eq!(first, StepAnswer { outcome: StepOutcome::Applied, duplicate: false });
    let again = step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30);
    assert_eq!(again, StepAnswer { outcome: StepOutcome::Applied, duplicate: true });
    assert_eq!(core.account(1).unwrap().posted, 70, "applied once");
}

#[test]
fn an_empty_compensation_succeeds_and_the_hanging_step_after_it_does_nothing() {
    let (mut core, mut disk) = node("p1");
    let compensation = step(&mut core, &mut disk, StepKind::Debit, StepPhase::Compensation, 1, 30);
    assert_eq!(compensation.outcome, StepOutcome::EmptyCompensation);
    assert_eq!(core.account(1).unwrap().posted, 100, "nothing refunded that was never taken");
    let hanging = step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30);
    assert_eq!(hanging.outcome, StepOutcome::HangingIgnored);
    assert_eq!(core.account(1).unwrap().posted, 100, "the hanging debit took nothing");
}

#[test]
fn a_compensation_undoes_its_step_once() {
    let (mut core, mut disk) = node("p1");
    step(&mut core, &mut disk, StepKind::Credit, StepPhase::Action, 2, 40);
    assert_eq!(core.account(2).unwrap().posted, 40);
    assert_eq!(
        step(&mut core, &mut disk, StepKind::Credit, StepPhase::Compensation, 2, 40).outcome,
        StepOutcome::Applied
    );
    let again = step(&mut core, &mut disk, StepKind::Credit, StepPhase::Compensation, 2, 40);
    assert_eq!(again, StepAnswer { outcome: StepOutcome::Applied, duplicate: true });
    assert_eq!(core.account(2).unwrap().posted, 0);
}

#[test]
fn a_refused_step_stays_refused_and_its_compensation_is_empty() {
    let (mut core, mut disk) = node("p1");
    let refused = step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 500);
    assert!(
        matches!(refused.outcome, StepOutcome::Refused(Some(Refusal::InsufficientFunds), ref r) if r.contains("available")),
        "{refused:?}"
    );
    let again = step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 500);
    assert!(again.duplicate && again.outcome == refused.outcome, "{again:?}");
    let compensation = step(&mut core, &mut disk, StepKind::Debit, StepPhase::Compensation, 1, 500);
    assert_eq!(compensation.outcome, StepOutcome::EmptyCompensation);
    assert_eq!(core.account(1).unwrap().posted, 100);
}

#[test]
fn a_refused_action_says_why_to_every_duplicate_and_after_a_restart() {
    let (mut core, mut disk) = node("p2");
    disk.apply(&core.set_closed(2, true).unwrap().1);
    let cases = [
        ("s1", 99, Refusal::UnknownAccount, "account 99 does not exist on p2"),
        ("s2", 2, Refusal::AccountClosed, "account 2 is closed"),
        ("s3", 1, Refusal::BalanceOverflow, "would overflow"),
    ];
    for (saga, account, refusal, words) in cases {
        let amount = if account == 1 { i64::MAX } else { 30 };
        let (answer, effects) =
            core.saga_step(id(saga), StepKind::Credit, StepPhase::Action, account, amount, 0).unwrap();
        disk.apply(&effects);
        assert!(
            matches!(answer.outcome, StepOutcome::Refused(Some(r), ref text) if r == refusal && text.contains(words)),
            "{answer:?}"
        );
    }
    let mut core = Core::recover(config("p2"), disk.0.clone(), 0).unwrap();
    for (saga, account, refusal, words) in cases {
        let amount = if account == 1 { i64::MAX } else { 30 };
        let (again, _) = core.saga_step(id(saga), StepKind::Credit, StepPhase::Action, account, amount, 0).unwrap();
        assert!(again.duplicate, "{again:?}");
        assert!(
            matches!(again.outcome, StepOutcome::Refused(Some(r), ref text) if r == refusal && text.contains(words)),
            "{again:?}"
        );
    }
}

#[test]
fn a_barrier_refused_before_refusals_were_recorded_still_reads() {
    let legacy = [vec![2u8], 6u16.to_le_bytes().to_vec(), b"closed".to_vec(), vec![0]].concat();
    let barrier = decode_barrier(&legacy).unwrap();
    assert_eq!(barrier.action, Some(ActionResult::Refused(None, "closed".into())));
    assert_eq!(decode_barrier(&encode_barrier(&barrier).unwrap()), Ok(barrier.clone()));
}

#[test]
fn a_refund_to_a_closed_account_is_refused_unrecorded_and_can_be_retried_or_parked() {
    let (mut core, mut disk) = node("p1");
    step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30);
    disk.apply(&core.set_closed(1, true).unwrap().1);
    let refund = step(&mut core, &mut disk, StepKind::Debit, StepPhase::Compensation, 1, 30);
    assert!(matches!(refund.outcome, StepOutcome::Refused(Some(Refusal::AccountClosed), _)), "{refund:?}");
    // Compensating into suspense instead parks the money.
    let parked = step(&mut core, &mut disk, StepKind::Debit, StepPhase::CompensateToSuspense, 1, 30);
    assert_eq!(parked.outcome, StepOutcome::Applied);
    assert_eq!((core.account(1).unwrap().posted, core.suspense()), (70, 30));
    // The refund cannot happen twice now: it is a duplicate of the parking.
    disk.apply(&core.set_closed(1, false).unwrap().1);
    let late = step(&mut core, &mut disk, StepKind::Debit, StepPhase::Compensation, 1, 30);
    assert!(late.duplicate);
    assert!(
        matches!(late.outcome, StepOutcome::Refused(None, ref r) if r.contains("suspense")),
        "the refund is refused, so its asker learns the money is parked: {late:?}"
    );
    assert_eq!((core.account(1).unwrap().posted, core.suspense()), (70, 30));
    // An operator releases it.
    assert_eq!(step(&mut core, &mut disk, StepKind::Release, StepPhase::Action, 1, 30).outcome, StepOutcome::Applied);
    assert_eq!((core.account(1).unwrap().posted, core.suspense()), (100, 0));
    // Everything survives a restart.
    let core = Core::recover(config("p1"), disk.0.clone(), 0).unwrap();
    assert_eq!((core.account(1).unwrap().posted, core.suspense()), (100, 0));
}

#[test]
fn parking_a_debit_already_refunded_parks_nothing_and_says_so() {
    let (mut core, mut disk) = node("p1");
    step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30);
    assert_eq!(
        step(&mut core, &mut disk, StepKind::Debit, StepPhase::Compensation, 1, 30).outcome,
        StepOutcome::Applied
    );
    // The refund's answer was lost; the orchestrator, out of budget, parks.
    let parked = step(&mut core, &mut disk, StepKind::Debit, StepPhase::CompensateToSuspense, 1, 30);
    assert_eq!(parked, StepAnswer { outcome: StepOutcome::EmptyCompensation, duplicate: true });
    assert_eq!((core.account(1).unwrap().posted, core.suspense()), (100, 0), "refunded once, nothing parked");
}

#[test]
fn compensating_into_suspense_parks_nothing_when_the_debit_never_ran() {
    let (mut core, mut disk) = node("p1");
    let parked = step(&mut core, &mut disk, StepKind::Debit, StepPhase::CompensateToSuspense, 1, 30);
    assert_eq!(parked.outcome, StepOutcome::EmptyCompensation);
    assert_eq!(core.suspense(), 0);
    assert_eq!(
        step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30).outcome,
        StepOutcome::HangingIgnored
    );
}

#[test]
fn bad_steps_are_errors() {
    let (mut core, _) = node("p1");
    assert!(core.saga_step(id("s1"), StepKind::Debit, StepPhase::Action, 1, 0, 0).is_err());
    assert!(core.saga_step(id("s1"), StepKind::Credit, StepPhase::CompensateToSuspense, 1, 5, 0).is_err());
    assert!(core.saga_step(id("s1"), StepKind::Release, StepPhase::Compensation, 1, 5, 0).is_err());
}

#[test]
fn steps_survive_a_restart_with_their_barriers() {
    let (mut core, mut disk) = node("p1");
    step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30);
    let mut core = Core::recover(config("p1"), disk.0.clone(), 0).unwrap();
    // The retry after the crash (the participant died before replying) applies once.
    let retry = step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30);
    assert!(retry.duplicate);
    assert_eq!(core.account(1).unwrap().posted, 70);
}

/// Moves every durable outbox event of `from` to `to`, as the relay does,
/// returning how many were delivered.
fn relay(from: &mut (Core, Disk), to: &mut (Core, Disk)) -> usize {
    let events = from.0.outbox();
    for (seq, event) in &events {
        let (_, effects) = to.0.deliver_event(event.clone(), 0).unwrap();
        to.1.apply(&effects);
        to.0.mark_outbox_durable(to.0.outbox_end());
        let effects = from.0.outbox_delivered(&[*seq]);
        from.1.apply(&effects);
    }
    events.len()
}

fn start(source: &mut (Core, Disk), saga: &str, from: u64, to: u64, amount: i64) -> Transfer {
    let (transfer, effects) = source.0.start_transfer(id(saga), from, to, amount, id("p2"), String::new(), 0).unwrap();
    source.1.apply(&effects);
    source.0.mark_outbox_durable(source.0.outbox_end());
    transfer
}

#[test]
fn a_choreographed_transfer_debits_credits_and_completes() {
    let mut p1 = node("p1");
    let mut p2 = node("p2");
    let transfer = start(&mut p1, "s1", 1, 2, 30);
    assert_eq!(transfer.state, TransferState::Debited);
    assert_eq!(p1.0.account(1).unwrap().posted, 70);
    assert_eq!(relay(&mut p1, &mut p2), 1);
    assert_eq!(p2.0.account(2).unwrap().posted, 30);
    assert_eq!(relay(&mut p2, &mut p1), 1);
    assert_eq!(p1.0.transfer(&id("s1")).unwrap().state, TransferState::Completed);
    assert!(p1.0.outbox().is_empty() && p2.0.outbox().is_empty());
    // A retried start gets the same transfer, not a second one.
    let again = start(&mut p1, "s1", 1, 2, 30);
    assert_eq!(again.state, TransferState::Completed);
    assert_eq!(p1.0.account(1).unwrap().posted, 70);
}

#[test]
fn a_saga_id_reused_with_other_parameters_is_refused_and_changes_nothing() {
    let mut p1 = node("p1");
    let first = start(&mut p1, "s1", 1, 2, 30);
    let before = (p1.0.accounts().clone(), p1.0.outbox().len());
    for (from, to, amount, target, differs) in [
        (1, 2, 31, "p2", "amount 31"),
        (2, 2, 30, "p2", "from_account 2"),
        (1, 3, 30, "p2", "to_account 3"),
        (1, 2, 30, "p3", "target_participant p3"),
    ] {
        let error = p1.0.start_transfer(id("s1"), from, to, amount, id(target), String::new(), 0).unwrap_err();
        let Error::FailedPrecondition(message) = &error else { panic!("{differs}: {error:?}") };
        assert_eq!(tonic::Status::from(error.clone()).code(), tonic::Code::FailedPrecondition);
        assert!(message.contains("s1") && message.contains(differs), "{differs}: {message}");
    }
    assert_eq!((p1.0.accounts().clone(), p1.0.outbox().len()), before, "nothing changed");
    // The exact retry still gets the same transfer, and writes nothing.
    let (again, effects) = p1.0.start_transfer(id("s1"), 1, 2, 30, id("p2"), String::new(), 0).unwrap();
    assert_eq!(again, first);
    assert!(effects.ops.is_empty());
}

#[test]
fn an_event_is_not_relayed_before_it_is_durable() {
    let mut p1 = node("p1");
    let (_, effects) = p1.0.start_transfer(id("s1"), 1, 2, 30, id("p2"), String::new(), 0).unwrap();
    assert!(p1.0.outbox().is_empty(), "the debit and its event are not on disk yet");
    p1.1.apply(&effects);
    p1.0.mark_outbox_durable(p1.0.outbox_end());
    assert_eq!(p1.0.outbox().len(), 1);
}

#[test]
fn the_relay_takes_one_peers_durable_events_in_order_in_bounded_batches() {
    let mut p1 = node("p1");
    for (i, target) in ["p2", "p3", "p2", "p2", "p3"].into_iter().enumerate() {
        let (_, effects) = p1.0.start_transfer(id(&format!("s{i}")), 1, 2, 1, id(target), String::new(), 0).unwrap();
        p1.1.apply(&effects);
    }
    assert!(p1.0.outbox_destinations().is_empty(), "nothing is on disk yet");
    assert!(p1.0.outbox_batch(&id("p2"), 0, 10).is_empty());
    p1.0.mark_outbox_durable(p1.0.outbox_end());
    assert_eq!(p1.0.outbox_destinations(), vec![id("p2"), id("p3")]);
    let seqs = |batch: Vec<(u64, Event)>| batch.into_iter().map(|(seq, _)| seq).collect::<Vec<_>>();
    assert_eq!(seqs(p1.0.outbox_batch(&id("p2"), 0, 10)), vec![0, 2, 3]);
    assert_eq!(seqs(p1.0.outbox_batch(&id("p2"), 0, 2)), vec![0, 2], "at most the batch");
    assert_eq!(seqs(p1.0.outbox_batch(&id("p2"), 1, 10)), vec![2, 3], "from a sequence on");
    assert_eq!(seqs(p1.0.outbox_batch(&id("p3"), 0, 10)), vec![1, 4]);
    assert!(p1.0.outbox_batch(&id("p2"), 99, 10).is_empty());
    assert!(p1.0.outbox_batch(&id("p4"), 0, 10).is_empty());
    // An event written later waits for its fsync, after the others.
    let (_, effects) = p1.0.start_transfer(id("s9"), 1, 2, 1, id("p2"), String::new(), 0).unwrap();
    p1.1.apply(&effects);
    assert_eq!(seqs(p1.0.outbox_batch(&id("p2"), 0, 10)), vec![0, 2, 3]);
    // Delivered events leave the index with the outbox; a restart rebuilds it.
    p1.1.apply(&p1.0.outbox_delivered(&[1, 4, 0]));
    assert_eq!(seqs(p1.0.outbox_batch(&id("p2"), 0, 10)), vec![2, 3]);
    assert_eq!(p1.0.outbox_destinations(), vec![id("p2")]);
    let restarted = Core::recover(config("p1"), p1.1 .0.clone(), 0).unwrap();
    assert_eq!(seqs(restarted.outbox_batch(&id("p2"), 0, 10)), vec![2, 3, 5]);
    assert_eq!(restarted.outbox_destinations(), vec![id("p2")]);
}

#[test]
fn a_redelivered_event_is_dropped_by_the_inbox() {
    let mut p1 = node("p1");
    let mut p2 = node("p2");
    start(&mut p1, "s1", 1, 2, 30);
    let (_, event) = p1.0.outbox()[0].clone();
    // The relay delivered, then crashed before marking it delivered.
    let (_, effects) = p2.0.deliver_event(event.clone(), 0).unwrap();
    p2.1.apply(&effects);
    let mut p1_restarted = (Core::recover(config("p1"), p1.1 .0.clone(), 0).unwrap(), p1.1.clone());
    assert_eq!(p1_restarted.0.outbox().len(), 1, "the event is still in the outbox after the restart");
    let mut p2_restarted = (Core::recover(config("p2"), p2.1 .0.clone(), 0).unwrap(), p2.1.clone());
    assert_eq!(relay(&mut p1_restarted, &mut p2_restarted), 1);
    assert_eq!(p2_restarted.0.account(2).unwrap().posted, 30, "credited once");
    let ((duplicate, _), _) = p2_restarted.0.deliver_event(event, 0).unwrap();
    assert!(duplicate);
}

#[test]
fn a_rejected_credit_refunds_or_parks_the_money_in_suspense() {
    let mut p1 = node("p1");
    let mut p2 = node("p2");
    p2.1.apply(&p2.0.set_closed(2, true).unwrap().1);
    start(&mut p1, "s1", 1, 2, 30);
    relay(&mut p1, &mut p2);
    relay(&mut p2, &mut p1);
    assert!(matches!(p1.0.transfer(&id("s1")).unwrap().state, TransferState::Compensated(_)));
    assert_eq!(p1.0.account(1).unwrap().posted, 100);
    // Now the refund fails too: the source account closes meanwhile.
    start(&mut p1, "s2", 1, 2, 40);
    p1.1.apply(&p1.0.set_closed(1, true).unwrap().1);
    relay(&mut p1, &mut p2);
    relay(&mut p2, &mut p1);
    assert!(matches!(p1.0.transfer(&id("s2")).unwrap().state, TransferState::DeadLettered(_)));
    assert_eq!((p1.0.account(1).unwrap().posted, p1.0.suspense()), (60, 40));
    let restarted = Core::recover(config("p1"), p1.1 .0.clone(), 0).unwrap();
    assert_eq!(restarted.suspense(), 40);
    assert!(matches!(restarted.transfer(&id("s2")).unwrap().state, TransferState::DeadLettered(_)));
}

#[test]
fn a_refund_that_the_suspense_account_cannot_hold_either_is_refused_unapplied_and_retried() {
    let mut p1 = node("p1");
    let mut p2 = node("p2");
    p2.1.apply(&p2.0.set_closed(2, true).unwrap().1);
    // Dead letters have filled the suspense account almost to the top.
    p1.0.sagas.suspense = i64::MAX - 10;
    start(&mut p1, "s1", 1, 2, 40);
    p1.1.apply(&p1.0.set_closed(1, true).unwrap().1);
    relay(&mut p1, &mut p2);
    let (_, rejected) = p2.0.outbox()[0].clone();
    let refused = p1.0.deliver_event(rejected.clone(), 0);
    assert!(
        matches!(&refused, Err(error @ Error::Busy(message)) if error.is_retryable() && message.contains("suspense")),
        "{refused:?}"
    );
    assert_eq!(p1.0.suspense(), i64::MAX - 10, "never wrapped");
    assert_eq!(p1.0.transfer(&id("s1")).unwrap().state, TransferState::Debited, "still in flight");
    // Once an operator made room, the redelivered event parks the money.
    p1.0.sagas.suspense = 0;
    let (_, effects) = p1.0.deliver_event(rejected, 0).unwrap();
    p1.1.apply(&effects);
    assert!(matches!(p1.0.transfer(&id("s1")).unwrap().state, TransferState::DeadLettered(_)));
    assert_eq!((p1.0.account(1).unwrap().posted, p1.0.suspense()), (60, 40));
}

#[test]
fn an_operator_lists_a_parked_transfer_and_releases_its_money() {
    let mut p1 = node("p1");
    let mut p2 = node("p2");
    p2.1.apply(&p2.0.set_closed(2, true).unwrap().1);
    start(&mut p1, "s1", 1, 2, 40);
    p1.1.apply(&p1.0.set_closed(1, true).unwrap().1);
    relay(&mut p1, &mut p2);
    relay(&mut p2, &mut p1);
    assert_eq!(p1.0.suspense(), 40);
    // Parked transfers outlive the retention: they wait for the operator.
    let retention = config("p1").finished_retention_ms;
    p1.1.apply(&p1.0.collect_garbage(10 * retention));
    let parked = p1.0.parked_transfers();
    assert_eq!(parked.len(), 1);
    assert_eq!((parked[0].0.as_str(), parked[0].1.amount), ("s1", 40));
    // Into the closed source: refused, nothing changes.
    assert!(matches!(
        p1.0.resolve_parked_transfer(&id("s1"), None, "by tandem://operator/t: refund", 0),
        Err(Error::InvalidInput(_))
    ));
    assert_eq!(p1.0.suspense(), 40);
    p1.1.apply(&p1.0.set_closed(1, false).unwrap().1);
    let (resolved, effects) =
        p1.0.resolve_parked_transfer(&id("s1"), None, "by tandem://operator/t: refund", 0).unwrap();
    p1.1.apply(&effects);
    assert!(
        matches!(resolved.state, TransferState::Resolved(ref r) if r.ends_with("released to account 1 by tandem://operator/t: refund")),
        "the record keeps who released it and why: {:?}",
        resolved.state
    );
    assert_eq!((p1.0.account(1).unwrap().posted, p1.0.suspense()), (100, 0));
    assert!(p1.0.parked_transfers().is_empty());
    // Once: a second resolution is refused; a restart sees the same.
    assert!(matches!(
        p1.0.resolve_parked_transfer(&id("s1"), None, "by tandem://operator/t: refund", 0),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        p1.0.resolve_parked_transfer(&id("nope"), None, "by tandem://operator/t: refund", 0),
        Err(Error::NotFound(_))
    ));
    let restarted = Core::recover(config("p1"), p1.1 .0.clone(), 0).unwrap();
    assert_eq!((restarted.account(1).unwrap().posted, restarted.suspense()), (100, 0));
    assert!(matches!(restarted.transfer(&id("s1")).unwrap().state, TransferState::Resolved(_)));
}

#[test]
fn a_refused_debit_rejects_the_transfer_and_sends_nothing() {
    let mut p1 = node("p1");
    let transfer = start(&mut p1, "s1", 1, 2, 500);
    assert!(matches!(transfer.state, TransferState::Rejected(ref r) if r.contains("available")));
    assert!(p1.0.outbox().is_empty());
    assert!(
        p1.0.start_transfer(id("s2"), 1, 1, 5, id("p2"), String::new(), 0).is_err(),
        "the same account on both sides"
    );
    assert!(p1.0.start_transfer(id("s3"), 99, 2, 5, id("p2"), String::new(), 0).is_err(), "an unknown source account");
}

#[test]
fn events_round_trip_and_a_newer_version_with_a_known_kind_is_read() {
    let event = Event {
        version: 7,
        id: "s1:debited".into(),
        kind: EventKind::TransferDebited,
        saga: id("s1"),
        from: 1,
        to: 2,
        amount: 30,
        source: id("p1"),
        target: id("p2"),
        reason: String::new(),
        seq: 1,
        trace_parent: String::new(),
    };
    assert_eq!(decode_event(&encode_event(&event).unwrap()), Ok(event.clone()));
    let unnumbered = Event { seq: 0, ..event.clone() };
    assert_eq!(decode_event(&encode_event(&unnumbered).unwrap()), Ok(unnumbered));
    // A trace context is kept with a numbered event; a record written
    // before events carried one (the same bytes without it) reads as none.
    let traced =
        Event { trace_parent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(), ..event.clone() };
    assert_eq!(decode_event(&encode_event(&traced).unwrap()), Ok(traced.clone()));
    assert_eq!(encode_event(&traced).unwrap().len(), encode_event(&event).unwrap().len() + 2 + 55);
    let mut p2 = node("p2");
    let ((duplicate, _), effects) = p2.0.deliver_event(traced.clone(), 0).unwrap();
    p2.1.apply(&effects);
    assert!(!duplicate);
    assert_eq!(p2.0.account(2).unwrap().posted, 30);
    // The answer carries the debit's trace context back to its source.
    p2.0.mark_outbox_durable(p2.0.outbox_end());
    let answer = p2.0.outbox().first().cloned().expect("the credit's answer").1;
    assert_eq!((answer.kind, answer.trace_parent), (EventKind::TransferCredited, traced.trace_parent));
}

#[test]
fn a_step_without_compensation_keeps_its_barrier_past_the_retention() {
    // The orchestrator may wait far longer than the retention (its target
    // down, or itself down) before it refunds or redelivers: the barrier of
    // an applied debit must still be there, or the refund would be "empty"
    // and the money lost.
    let (mut core, mut disk) = node("p1");
    let retention = config("p1").finished_retention_ms;
    let (answer, effects) = core.saga_step(id("s1"), StepKind::Debit, StepPhase::Action, 1, 30, 0).unwrap();
    disk.apply(&effects);
    assert_eq!(answer.outcome, StepOutcome::Applied);
    let late = 10 * retention;
    disk.apply(&core.collect_garbage(late));
    let (again, _) = core.saga_step(id("s1"), StepKind::Debit, StepPhase::Action, 1, 30, late).unwrap();
    assert_eq!(again, StepAnswer { outcome: StepOutcome::Applied, duplicate: true }, "not applied twice");
    let (refund, effects) = core.saga_step(id("s1"), StepKind::Debit, StepPhase::Compensation, 1, 30, late).unwrap();
    disk.apply(&effects);
    assert_eq!(refund.outcome, StepOutcome::Applied, "a real refund, not an empty compensation");
    assert_eq!(core.account(1).unwrap().posted, 100);
    // Compensated, the step is finished for good: collected after the retention.
    assert!(disk.0.keys().any(|k| k.starts_with(b"b/")));
    disk.apply(&core.collect_garbage(late + retention + 1));
    assert!(!disk.0.keys().any(|k| k.starts_with(b"b/")), "the compensated barrier is collected");
}

#[test]
fn a_forgotten_saga_loses_its_barriers_after_the_retention_and_the_mark_survives_a_restart() {
    let (mut core, mut disk) = node("p1");
    let retention = config("p1").finished_retention_ms;
    let (_, effects) = core.saga_step(id("s1"), StepKind::Debit, StepPhase::Action, 1, 30, 0).unwrap();
    disk.apply(&effects);
    // Past the retention, unforgotten: kept (see the test above).
    disk.apply(&core.collect_garbage(2 * retention));
    assert_eq!(core.barrier_count(), 1);
    // The orchestrator says s1 ended (and names a saga never seen here).
    let (marked, effects) = core.forget_sagas(&[id("s1"), id("never-here")], 2 * retention);
    assert_eq!(marked, 1);
    disk.apply(&effects);
    // A step of s1 still on its way meets the barrier until the retention.
    let (late, _) = core.saga_step(id("s1"), StepKind::Debit, StepPhase::Action, 1, 30, 2 * retention + 1).unwrap();
    assert!(late.duplicate, "applied once");
    // The mark is on disk: a restarted node forgets the barrier too.
    let mut core = Core::recover(config("p1"), disk.0.clone(), 2 * retention).unwrap();
    assert_eq!(core.barrier_count(), 1);
    disk.apply(&core.collect_garbage(3 * retention + 1));
    assert_eq!(core.barrier_count(), 0);
    assert!(!disk.0.keys().any(|k| k.starts_with(b"b/")));
    assert_eq!(core.account(1).unwrap().posted, 70);
}

/// The forged calls of issue 9 that used to stop a node or corrupt a record,
/// each refused now with nothing changed.
mod forged {
    use super::*;

    /// p1 with a choreographed transfer of 40 from account 1 parked in its
    /// suspense account (the target refused, the refund failed).
    fn parked_transfer() -> (Core, Disk) {
        let mut p1 = node("p1");
        let mut p2 = node("p2");
        p2.1.apply(&p2.0.set_closed(2, true).unwrap().1);
        start(&mut p1, "t1", 1, 2, 40);
        p1.1.apply(&p1.0.set_closed(1, true).unwrap().1);
        relay(&mut p1, &mut p2);
        relay(&mut p2, &mut p1);
        p1.1.apply(&p1.0.set_closed(1, false).unwrap().1);
        assert_eq!(p1.0.suspense(), 40);
        p1
    }

    #[test]
    fn a_release_for_a_saga_that_parked_nothing_here_takes_nothing_and_the_parked_transfer_still_resolves() {
        // Before: the release drained the suspense account, and the
        // operator's resolution then hit an assert under the core lock.
        let (mut core, mut disk) = parked_transfer();
        let (answer, effects) = core.saga_step(id("made-up"), StepKind::Release, StepPhase::Action, 2, 40, 0).unwrap();
        assert!(matches!(&answer.outcome, StepOutcome::Refused(None, r) if r.contains("parked nothing")), "{answer:?}");
        assert!(effects.ops.is_empty());
        assert_eq!((core.suspense(), core.account(2).unwrap().posted), (40, 0), "nothing taken");
        let (resolved, effects) =
            core.resolve_parked_transfer(&id("t1"), None, "by tandem://operator/t: refund", 0).unwrap();
        disk.apply(&effects);
        assert!(matches!(resolved.state, TransferState::Resolved(_)));
        assert_eq!((core.account(1).unwrap().posted, core.suspense()), (100, 0));
    }

    #[test]
    fn a_release_takes_exactly_what_its_saga_parked_and_only_once() {
        let (mut core, mut disk) = node("p1");
        step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30);
        step(&mut core, &mut disk, StepKind::Debit, StepPhase::CompensateToSuspense, 1, 30);
        // A second saga's parked money is in the same suspense account.
        let (_, effects) = core.saga_step(id("s2"), StepKind::Debit, StepPhase::Action, 1, 50, 0).unwrap();
        disk.apply(&effects);
        let (_, effects) =
            core.saga_step(id("s2"), StepKind::Debit, StepPhase::CompensateToSuspense, 1, 50, 0).unwrap();
        disk.apply(&effects);
        assert_eq!(core.suspense(), 80);
        for amount in [31, 29, 80] {
            let refused = step(&mut core, &mut disk, StepKind::Release, StepPhase::Action, 2, amount);
            assert!(matches!(refused.outcome, StepOutcome::Refused(..)), "{amount}: {refused:?}");
        }
        assert_eq!(core.suspense(), 80);
        let released = step(&mut core, &mut disk, StepKind::Release, StepPhase::Action, 2, 30);
        assert_eq!(released.outcome, StepOutcome::Applied);
        let again = step(&mut core, &mut disk, StepKind::Release, StepPhase::Action, 2, 30);
        assert_eq!(again, StepAnswer { outcome: StepOutcome::Applied, duplicate: true }, "not twice");
        assert_eq!((core.suspense(), core.account(2).unwrap().posted), (50, 30));
        let restarted = Core::recover(config("p1"), disk.0.clone(), 0).unwrap();
        assert_eq!((restarted.suspense(), restarted.parked_known_total()), (50, 50));
    }

    #[test]
    fn a_parked_debit_keeps_its_barrier_until_its_release_even_when_forgotten_early() {
        let (mut core, mut disk) = node("p1");
        let retention = config("p1").finished_retention_ms;
        step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30);
        step(&mut core, &mut disk, StepKind::Debit, StepPhase::CompensateToSuspense, 1, 30);
        let (_, effects) = core.forget_sagas(&[id("s1")], 1);
        disk.apply(&effects);
        disk.apply(&core.collect_garbage(10 * retention));
        let released = step(&mut core, &mut disk, StepKind::Release, StepPhase::Action, 1, 30);
        assert_eq!(released.outcome, StepOutcome::Applied, "the barrier that allows the release is still there");
        assert_eq!((core.account(1).unwrap().posted, core.suspense()), (100, 0));
    }

    #[test]
    fn resolving_a_parked_transfer_when_suspense_holds_less_is_an_error_not_a_panic() {
        // A node whose suspense account was drained before releases were
        // checked: its records disagree; the resolution is refused.
        let (_, mut disk) = parked_transfer();
        disk.0.insert(SUSPENSE_KEY.to_vec(), 10i64.to_le_bytes().to_vec());
        let mut core = Core::recover(config("p1"), disk.0.clone(), 0).unwrap();
        let refused = core.resolve_parked_transfer(&id("t1"), None, "by tandem://operator/t: refund", 0);
        assert!(matches!(&refused, Err(Error::Fatal(m)) if m.contains("holds 10")), "{refused:?}");
        assert_eq!((core.suspense(), core.account(1).unwrap().posted), (10, 60), "nothing changed");
        assert!(core.account(1).is_ok(), "the core still answers");
    }

    fn rejection(reason: String) -> Event {
        Event {
            version: 1,
            id: "t1:rejected".into(),
            kind: EventKind::TransferRejected,
            saga: id("t1"),
            from: 1,
            to: 2,
            amount: 40,
            source: id("p1"),
            target: id("p2"),
            reason,
            // The first event p2 numbered for p1.
            seq: 1,
            trace_parent: String::new(),
        }
    }

    #[test]
    fn a_reason_over_the_limit_is_refused_and_one_at_the_limit_survives_a_restart() {
        // Before: a reason over 64 KiB was stored with a truncated length,
        // and the next start decoded garbage or panicked.
        let mut p1 = node("p1");
        start(&mut p1, "t1", 1, 2, 40);
        for len in [REASON_LEN_MAX + 1, 70_000] {
            let refused = p1.0.deliver_event(rejection("r".repeat(len)), 0);
            assert!(matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("reason")), "{refused:?}");
        }
        assert_eq!(p1.0.transfer(&id("t1")).unwrap().state, TransferState::Debited, "nothing changed");
        let (_, effects) = p1.0.deliver_event(rejection("r".repeat(REASON_LEN_MAX)), 0).unwrap();
        p1.1.apply(&effects);
        let restarted = Core::recover(config("p1"), p1.1 .0.clone(), 0).unwrap();
        assert!(
            matches!(&restarted.transfer(&id("t1")).unwrap().state, TransferState::Compensated(r) if r.len() == REASON_LEN_MAX)
        );
        assert_eq!(restarted.account(1).unwrap().posted, 100);
    }

    #[test]
    fn events_with_a_bad_amount_id_or_version_are_refused_by_the_core_itself() {
        // Before: a negative amount reached the core's credit and broke the
        // account's invariants (an assert under the lock).
        let (mut core, _) = node("p2");
        let debited = |amount: i64, event_id: &str, version: u32| Event {
            version,
            id: event_id.into(),
            kind: EventKind::TransferDebited,
            saga: id("t1"),
            from: 1,
            to: 2,
            amount,
            source: id("p1"),
            target: id("p2"),
            reason: String::new(),
            seq: 1,
            trace_parent: String::new(),
        };
        for event in [
            debited(-50, "t1:debited", 1),
            debited(0, "t1:debited", 1),
            debited(5, "", 1),
            debited(5, &"x".repeat(129), 1),
            debited(5, "a b", 1),
            debited(5, "t1:debited", 0),
        ] {
            assert!(matches!(core.deliver_event(event.clone(), 0), Err(Error::InvalidInput(_))), "{event:?}");
        }
        assert_eq!(core.account(2).unwrap().posted, 0);
        assert_eq!(core.outbox_end(), 0);
    }

    #[test]
    fn an_answer_that_does_not_match_its_transfer_is_refused() {
        let mut p1 = node("p1");
        start(&mut p1, "t1", 1, 2, 40);
        let mut bigger = rejection(String::new());
        bigger.amount = 4_000;
        assert!(matches!(p1.0.deliver_event(bigger, 0), Err(Error::InvalidInput(_))));
        let mut elsewhere = rejection(String::new());
        elsewhere.from = 2;
        assert!(matches!(p1.0.deliver_event(elsewhere, 0), Err(Error::InvalidInput(_))));
        assert_eq!(p1.0.transfer(&id("t1")).unwrap().state, TransferState::Debited);
        assert_eq!(p1.0.account(1).unwrap().posted, 60);
    }

    #[test]
    fn a_compensation_for_another_amount_than_its_step_is_refused() {
        let (mut core, mut disk) = node("p1");
        step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30);
        for phase in [StepPhase::Compensation, StepPhase::CompensateToSuspense] {
            let refused = core.saga_step(id("s1"), StepKind::Debit, phase, 1, 3_000, 0);
            assert!(matches!(refused, Err(Error::InvalidInput(_))), "{phase:?}");
        }
        assert_eq!((core.account(1).unwrap().posted, core.suspense()), (70, 0));
        let refund = step(&mut core, &mut disk, StepKind::Debit, StepPhase::Compensation, 1, 30);
        assert_eq!(refund.outcome, StepOutcome::Applied);
        assert_eq!(core.account(1).unwrap().posted, 100);
    }

    #[test]
    fn barriers_written_before_amounts_were_stored_still_read_and_release_within_the_unclaimed_suspense() {
        let (mut core, mut disk) = node("p1");
        step(&mut core, &mut disk, StepKind::Debit, StepPhase::Action, 1, 30);
        step(&mut core, &mut disk, StepKind::Debit, StepPhase::CompensateToSuspense, 1, 30);
        // The same barrier as an older node wrote it: no forgotten flag, no amount.
        let key = barrier_key(&id("s1"), StepKind::Debit);
        disk.0.insert(key, vec![1, 3]);
        let mut core = Core::recover(config("p1"), disk.0.clone(), 0).unwrap();
        let too_much = step(&mut core, &mut disk, StepKind::Release, StepPhase::Action, 1, 31);
        assert!(matches!(too_much.outcome, StepOutcome::Refused(..)));
        let released = step(&mut core, &mut disk, StepKind::Release, StepPhase::Action, 1, 30);
        assert_eq!(released.outcome, StepOutcome::Applied);
        assert_eq!(core.suspense(), 0);
    }
}

mod without_time_windows {
    //! Deduplication and barriers that hold whatever the age of a
    //! redelivery (see "Deduplication with no time window" and "Late
    //! steps" in the module essay), and the idempotency retention.
    use super::*;

    const LONG_MS: u64 = 400 * 24 * 3_600 * 1_000;

    fn restarted(node: &(Core, Disk), name: &str, now_ms: u64) -> (Core, Disk) {
        let mut core = Core::recover(config(name), node.1 .0.clone(), now_ms).unwrap();
        core.mark_outbox_durable(core.outbox_end());
        (core, node.1.clone())
    }

    /// Every kind of collection, at `now_ms`.
    fn collect_everything(node: &mut (Core, Disk), now_ms: u64) {
        let effects = node.0.collect_garbage(now_ms);
        node.1.apply(&effects);
        let effects = node.0.collect_sagas(now_ms, IDEMPOTENCY_RETENTION_DEFAULT_MS, usize::MAX);
        node.1.apply(&effects);
    }

    fn keys_with(disk: &Disk, prefix: &[u8]) -> usize {
        disk.0.keys().filter(|key| key.starts_with(prefix)).count()
    }

    /// A TransferDebited event from p1 to p2, numbered `seq`.
    fn debited(saga: &str, seq: u64) -> Event {
        Event {
            version: EVENT_VERSION,
            id: format!("{saga}:debited"),
            kind: EventKind::TransferDebited,
            saga: id(saga),
            from: 1,
            to: 2,
            amount: 5,
            source: id("p1"),
            target: id("p2"),
            reason: String::new(),
            seq,
            trace_parent: String::new(),
        }
    }

    fn deliver(node: &mut (Core, Disk), event: Event, now_ms: u64) -> Result<bool, Error> {
        let ((duplicate, _), effects) = node.0.deliver_event(event, now_ms)?;
        node.1.apply(&effects);
        Ok(duplicate)
    }

    #[test]
    fn events_are_numbered_per_peer_and_a_number_survives_its_event() {
        let mut p1 = node("p1");
        for (saga, target) in [("s1", "p2"), ("s2", "p3"), ("s3", "p2")] {
            let (_, effects) = p1.0.start_transfer(id(saga), 1, 2, 1, id(target), String::new(), 0).unwrap();
            p1.1.apply(&effects);
        }
        p1.0.mark_outbox_durable(p1.0.outbox_end());
        let numbers: Vec<(String, u64)> =
            p1.0.outbox().into_iter().map(|(_, e)| (e.destination().to_string(), e.seq)).collect();
        assert_eq!(numbers, [("p2".into(), 1), ("p3".into(), 1), ("p2".into(), 2)]);
        // Delivered and forgotten: the counter stays, and a restart goes on
        // from it, never giving number 1 or 2 for p2 again.
        let seqs: Vec<u64> = p1.0.outbox().into_iter().map(|(seq, _)| seq).collect();
        p1.1.apply(&p1.0.outbox_delivered(&seqs));
        assert_eq!(keys_with(&p1.1, b"o/"), 0);
        let mut p1 = restarted(&p1, "p1", 0);
        start(&mut p1, "s4", 1, 2, 1);
        assert_eq!(p1.0.outbox()[0].1.seq, 3);
    }

    #[test]
    fn a_number_whose_event_was_lost_before_it_was_durable_is_given_again_safely() {
        // The write of s1's debit, event and counter never reached the disk
        // (a power loss before its fsync): it was never relayed, so no peer
        // can have applied number 1, and the next event gets it.
        let mut p1 = node("p1");
        let (_, lost) = p1.0.start_transfer(id("s1"), 1, 2, 1, id("p2"), String::new(), 0).unwrap();
        assert!(p1.0.outbox().is_empty(), "not relayed before it is durable");
        assert!(
            lost.ops.iter().any(|op| matches!(op, Op::Put(k, _) if k.starts_with(b"q/"))),
            "the counter rides with the event"
        );
        let mut p1 = restarted(&p1, "p1", 0);
        start(&mut p1, "s2", 1, 2, 1);
        assert_eq!(p1.0.outbox()[0].1.seq, 1);
        assert!(p1.0.transfer(&id("s1")).is_none());
    }

    #[test]
    fn a_redelivery_of_any_age_is_a_duplicate_after_restarts_and_leaves_no_record_per_event() {
        let mut p1 = node("p1");
        let mut p2 = node("p2");
        start(&mut p1, "s1", 1, 2, 30);
        let (_, event) = p1.0.outbox()[0].clone();
        assert_eq!(event.seq, 1);
        assert!(!deliver(&mut p2, event.clone(), 0).unwrap());
        assert_eq!(keys_with(&p2.1, b"i/"), 0, "no inbox record for a numbered event");
        // Long past every retention, with collections and restarts between.
        collect_everything(&mut p2, LONG_MS);
        let mut p2 = restarted(&p2, "p2", LONG_MS);
        collect_everything(&mut p2, 2 * LONG_MS);
        assert!(deliver(&mut p2, event.clone(), 2 * LONG_MS).unwrap(), "still a duplicate");
        let mut p2 = restarted(&p2, "p2", 3 * LONG_MS);
        assert!(deliver(&mut p2, event, 3 * LONG_MS).unwrap());
        assert_eq!(p2.0.account(2).unwrap().posted, 30, "credited once");
        assert_eq!(p2.0.outbox().len(), 1, "answered once");
        // The answer flows back, numbered by p2, and is deduplicated the same way.
        let (_, answer) = p2.0.outbox()[0].clone();
        assert_eq!((answer.kind, answer.seq), (EventKind::TransferCredited, 1));
        assert!(!deliver(&mut p1, answer.clone(), 0).unwrap());
        collect_everything(&mut p1, LONG_MS);
        let mut p1 = restarted(&p1, "p1", LONG_MS);
        // The transfer itself is gone after the idempotency retention; its
        // answer, redelivered, is still a duplicate, not an error.
        assert!(p1.0.transfer(&id("s1")).is_none());
        assert!(deliver(&mut p1, answer, LONG_MS).unwrap());
        assert_eq!(p1.0.account(1).unwrap().posted, 70);
    }

    #[test]
    fn numbers_out_of_order_apply_once_each_and_the_state_stays_small() {
        let mut p2 = node("p2");
        for seq in [3, 1, 5] {
            assert!(!deliver(&mut p2, debited(&format!("t{seq}"), seq), 0).unwrap());
        }
        assert_eq!(p2.0.sagas.applied_from[&id("p1")], Applied { contiguous: 1, above: [3, 5].into() });
        for seq in [1, 3, 5] {
            assert!(deliver(&mut p2, debited(&format!("t{seq}"), seq), 0).unwrap(), "{seq} again");
        }
        // A duplicate is judged by its number, whatever else it says.
        assert!(deliver(&mut p2, debited("another", 3), 0).unwrap());
        for seq in [4, 2] {
            assert!(!deliver(&mut p2, debited(&format!("t{seq}"), seq), 0).unwrap());
        }
        assert_eq!(p2.0.sagas.applied_from[&id("p1")], Applied { contiguous: 5, above: BTreeSet::new() });
        assert_eq!(p2.0.account(2).unwrap().posted, 25, "five events, five credits");
        let p2 = restarted(&p2, "p2", 0);
        assert_eq!(p2.0.sagas.applied_from[&id("p1")], Applied { contiguous: 5, above: BTreeSet::new() });
        // Unnumbered events (an older node) still go through the inbox.
        let mut p2 = p2;
        assert!(!deliver(&mut p2, debited("old", 0), 0).unwrap());
        assert!(deliver(&mut p2, debited("old", 0), 0).unwrap());
        assert_eq!(keys_with(&p2.1, b"i/"), 1);
    }

    #[test]
    fn a_source_too_far_ahead_is_held_back_with_an_error_and_nothing_changes() {
        let mut p2 = node("p2");
        let too_far = SEQUENCE_AHEAD_MAX + 1;
        let before = p2.1 .0.clone();
        let error = p2.0.deliver_event(debited("far", too_far), 0).unwrap_err();
        let Error::Busy(message) = &error else { panic!("{error:?}") };
        assert!(error.is_retryable() && message.contains("held back") && message.contains("p1"), "{message}");
        assert_eq!(p2.1 .0, before);
        assert_eq!(p2.0.account(2).unwrap().posted, 0);
        assert!(!deliver(&mut p2, debited("edge", SEQUENCE_AHEAD_MAX), 0).unwrap(), "at the bound: applied");
        assert!(p2.0.deliver_event(debited("far", too_far), 0).is_err(), "still held back");
        // Once the gap below is filled, it goes through.
        for seq in 1..SEQUENCE_AHEAD_MAX {
            deliver(&mut p2, debited(&format!("f{seq}"), seq), 0).unwrap();
        }
        assert!(!deliver(&mut p2, debited("far", too_far), 0).unwrap());
        assert_eq!(p2.0.sagas.applied_from[&id("p1")].contiguous, too_far);
    }

    fn order(position: u64, low_watermark: u64) -> Option<StepOrder> {
        Some(StepOrder { coordinator: id("c1"), incarnation: 7, position, low_watermark })
    }

    #[allow(clippy::too_many_arguments)]
    fn ordered(
        node: &mut (Core, Disk),
        saga: &str,
        kind: StepKind,
        phase: StepPhase,
        account: u64,
        amount: i64,
        order: Option<StepOrder>,
    ) -> StepAnswer {
        let (answer, effects) = node.0.saga_step_ordered(id(saga), kind, phase, account, amount, order, 0).unwrap();
        node.1.apply(&effects);
        answer
    }

    #[test]
    fn a_late_step_below_the_watermark_does_nothing_and_leaves_nothing() {
        let mut p1 = node("p1");
        // Saga s9 at position 9 tells this node: below 5, every saga is done.
        ordered(&mut p1, "s9", StepKind::Debit, StepPhase::Action, 1, 10, order(9, 5));
        let barriers = p1.0.barrier_count();
        let action = ordered(&mut p1, "s3", StepKind::Debit, StepPhase::Action, 1, 10, order(3, 0));
        let StepOutcome::Refused(None, reason) = &action.outcome else { panic!("{action:?}") };
        assert!(reason.contains("late") && reason.contains("watermark 5") && reason.contains("s3"), "{reason}");
        let credit = ordered(&mut p1, "s3", StepKind::Credit, StepPhase::Action, 2, 10, order(3, 0));
        assert!(matches!(credit.outcome, StepOutcome::Refused(None, _)), "{credit:?}");
        for phase in [StepPhase::Compensation, StepPhase::CompensateToSuspense] {
            let compensation = ordered(&mut p1, "s3", StepKind::Debit, phase, 1, 10, order(3, 0));
            assert_eq!(compensation.outcome, StepOutcome::EmptyCompensation);
        }
        assert_eq!((p1.0.account(1).unwrap().posted, p1.0.account(2).unwrap().posted), (90, 0));
        assert_eq!((p1.0.barrier_count(), p1.0.suspense()), (barriers, 0), "no record for late steps");
        // A release keeps its rule: it needs a parked debit.
        let release = ordered(&mut p1, "s3", StepKind::Release, StepPhase::Action, 1, 10, order(3, 0));
        assert!(matches!(&release.outcome, StepOutcome::Refused(None, r) if r.contains("parked nothing")));
        // At or above the watermark, a step is judged as before; and the
        // watermark survives a restart, so a late step stays late.
        let at = ordered(&mut p1, "s5", StepKind::Debit, StepPhase::Action, 1, 10, order(5, 0));
        assert_eq!(at.outcome, StepOutcome::Applied);
        let mut p1 = restarted(&p1, "p1", 0);
        let late = ordered(&mut p1, "s4", StepKind::Debit, StepPhase::Action, 1, 10, order(4, 0));
        assert!(matches!(late.outcome, StepOutcome::Refused(None, _)));
        assert_eq!(p1.0.account(1).unwrap().posted, 80);
        // A step with no order, or another incarnation, is not judged by it.
        let unordered = ordered(&mut p1, "s1", StepKind::Debit, StepPhase::Action, 1, 10, None);
        assert_eq!(unordered.outcome, StepOutcome::Applied);
        let other = Some(StepOrder { coordinator: id("c1"), incarnation: 8, position: 1, low_watermark: 0 });
        assert_eq!(
            ordered(&mut p1, "s2", StepKind::Debit, StepPhase::Action, 1, 10, other).outcome,
            StepOutcome::Applied
        );
        // An unknown coordinator is bad input, and changes nothing.
        let stranger = Some(StepOrder { coordinator: id("c9"), incarnation: 1, position: 1, low_watermark: 9 });
        let refused = p1.0.saga_step_ordered(id("s7"), StepKind::Debit, StepPhase::Action, 1, 10, stranger, 0);
        assert!(matches!(refused, Err(Error::InvalidInput(_))));
    }

    #[test]
    fn a_step_with_its_barrier_below_the_watermark_keeps_barrier_semantics() {
        let mut p1 = node("p1");
        ordered(&mut p1, "s1", StepKind::Debit, StepPhase::Action, 1, 10, order(1, 0));
        // The watermark passes s1 (a bug would be needed for s1 to step
        // again; its barrier still answers until it is collected).
        ordered(&mut p1, "s2", StepKind::Credit, StepPhase::Action, 2, 10, order(2, 2));
        let again = ordered(&mut p1, "s1", StepKind::Debit, StepPhase::Action, 1, 10, order(1, 0));
        assert_eq!(again, StepAnswer { outcome: StepOutcome::Applied, duplicate: true });
        assert_eq!(p1.0.account(1).unwrap().posted, 90);
    }

    #[test]
    fn barriers_below_the_watermark_go_with_no_wait_and_a_parked_debit_waits_for_its_release() {
        let mut p1 = node("p1");
        ordered(&mut p1, "s1", StepKind::Debit, StepPhase::Action, 1, 10, order(1, 0));
        ordered(&mut p1, "s2", StepKind::Debit, StepPhase::Action, 1, 10, order(2, 0));
        ordered(&mut p1, "s2", StepKind::Debit, StepPhase::CompensateToSuspense, 1, 10, order(2, 0));
        ordered(&mut p1, "s3", StepKind::Credit, StepPhase::Action, 2, 10, order(3, 0));
        assert_eq!(p1.0.barrier_count(), 3);
        // Nothing is below a watermark yet: nothing goes, however late.
        let effects = p1.0.collect_sagas(LONG_MS, IDEMPOTENCY_RETENTION_DEFAULT_MS, usize::MAX);
        assert!(effects.ops.is_empty());
        // s4's step says every saga below 3 is done: s1 goes at once (same
        // ms, no retention), s2's parked debit stays, s3 stays.
        ordered(&mut p1, "s4", StepKind::Credit, StepPhase::Action, 2, 10, order(4, 3));
        let effects = p1.0.collect_sagas(0, IDEMPOTENCY_RETENTION_DEFAULT_MS, usize::MAX);
        p1.1.apply(&effects);
        assert_eq!(effects.ops, vec![Op::Delete(barrier_key(&id("s1"), StepKind::Debit))]);
        assert_eq!(p1.0.barrier_count(), 3);
        assert!(p1.0.collect_sagas(0, IDEMPOTENCY_RETENTION_DEFAULT_MS, usize::MAX).ops.is_empty(), "set aside");
        // After a restart too, the parked debit stays until its release.
        let mut p1 = restarted(&p1, "p1", 0);
        p1.1.apply(&p1.0.collect_sagas(0, IDEMPOTENCY_RETENTION_DEFAULT_MS, usize::MAX));
        assert_eq!(p1.0.barrier_count(), 3);
        let release = ordered(&mut p1, "s2", StepKind::Release, StepPhase::Action, 1, 10, order(2, 0));
        assert_eq!(release.outcome, StepOutcome::Applied);
        assert_eq!(p1.0.suspense(), 0);
        let effects = p1.0.collect_sagas(0, IDEMPOTENCY_RETENTION_DEFAULT_MS, usize::MAX);
        p1.1.apply(&effects);
        assert_eq!(
            effects.ops,
            vec![
                Op::Delete(barrier_key(&id("s2"), StepKind::Debit)),
                Op::Delete(barrier_key(&id("s2"), StepKind::Release))
            ]
        );
        assert_eq!(p1.0.barrier_count(), 2, "s3 and s4 are above the watermark");
        // What went is judged late from now on: nothing moves twice.
        let late = ordered(&mut p1, "s1", StepKind::Debit, StepPhase::Action, 1, 10, order(1, 0));
        assert!(matches!(late.outcome, StepOutcome::Refused(None, _)));
        assert_eq!(
            ordered(&mut p1, "s1", StepKind::Debit, StepPhase::Compensation, 1, 10, order(1, 0)).outcome,
            StepOutcome::EmptyCompensation
        );
        assert_eq!(p1.0.account(1).unwrap().posted, 90, "s1 took 10, s2's 10 went to suspense and back");
        let restarted = restarted(&p1, "p1", 0);
        assert_eq!(restarted.0.barrier_count(), 2);
    }

    #[test]
    fn a_reused_transfer_id_past_the_idempotency_retention_is_a_new_transfer() {
        let mut p1 = node("p1");
        let mut p2 = node("p2");
        let retention = 3_600_000;
        start(&mut p1, "s1", 1, 2, 30);
        relay(&mut p1, &mut p2);
        // Completed at 1,000 on the core's clock.
        let (_, answer) = p2.0.outbox()[0].clone();
        let (_, effects) = p1.0.deliver_event(answer, 1_000).unwrap();
        p1.1.apply(&effects);
        assert_eq!(p1.0.transfer(&id("s1")).unwrap().ended_at_ms, Some(1_000));
        // Within the retention, across a restart: remembered, and another
        // transfer under its id is refused.
        p1.1.apply(&p1.0.collect_sagas(1_000 + retention - 1, retention, usize::MAX));
        let mut p1 = restarted(&p1, "p1", 1_000 + retention - 1);
        p1.1.apply(&p1.0.collect_sagas(1_000 + retention - 1, retention, usize::MAX));
        let refused = p1.0.start_transfer(id("s1"), 1, 2, 5, id("p2"), String::new(), 1_000 + retention - 1);
        assert!(matches!(refused, Err(Error::FailedPrecondition(_))), "{refused:?}");
        // Past it: forgotten, on disk too, and the id starts a new transfer.
        p1.1.apply(&p1.0.collect_sagas(1_000 + retention, retention, usize::MAX));
        assert!(p1.0.transfer(&id("s1")).is_none());
        assert_eq!(keys_with(&p1.1, b"c/"), 0);
        let (again, effects) =
            p1.0.start_transfer(id("s1"), 1, 2, 5, id("p2"), String::new(), 1_000 + retention).unwrap();
        p1.1.apply(&effects);
        assert_eq!(again.state, TransferState::Debited);
        assert_eq!(p1.0.account(1).unwrap().posted, 65);
        // In flight, it is never collected, however long.
        p1.1.apply(&p1.0.collect_sagas(LONG_MS, retention, usize::MAX));
        assert_eq!(p1.0.transfer(&id("s1")).unwrap().state, TransferState::Debited);
    }

    #[test]
    fn a_full_outbox_refuses_new_transfers_and_changes_nothing() {
        let mut p1 = (Core::new(config("p1")), Disk::default());
        p1.1.apply(&p1.0.open_accounts(&[(1, OUTBOX_MAX as i64 + 10), (2, 0)]).unwrap());
        for i in 0..OUTBOX_MAX {
            let (_, effects) = p1.0.start_transfer(id(&format!("s{i}")), 1, 2, 1, id("p2"), String::new(), 0).unwrap();
            p1.1.apply(&effects);
        }
        let before = p1.1 .0.len();
        let error = p1.0.start_transfer(id("one-more"), 1, 2, 1, id("p2"), String::new(), 0).unwrap_err();
        let Error::Busy(message) = &error else { panic!("{error:?}") };
        assert!(message.contains("one-more") && message.contains(&OUTBOX_MAX.to_string()), "{message}");
        assert_eq!(tonic::Status::from(error.clone()).code(), tonic::Code::ResourceExhausted);
        assert_eq!((p1.1 .0.len(), p1.0.account(1).unwrap().posted), (before, 10));
        // A retry of a transfer already started is still answered.
        assert!(p1.0.start_transfer(id("s0"), 1, 2, 1, id("p2"), String::new(), 0).is_ok());
        // Answers owed to peers are not refused (see OUTBOX_MAX).
        let owed =
            Event { kind: EventKind::TransferDebited, source: id("p3"), target: id("p1"), to: 2, ..debited("in", 1) };
        assert!(!deliver(&mut p1, owed, 0).unwrap());
        assert_eq!(p1.0.outbox_len(), OUTBOX_MAX + 1);
    }
}
