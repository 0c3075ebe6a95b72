//! Tests of the saga orchestrator's core: each path of the saga, and
//! recovery from each stage.

use super::*;

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

fn spec(recovery: Recovery) -> SagaSpec {
    SagaSpec {
        from: 1,
        to: 1_001,
        amount: 30,
        from_participant: id("p1"),
        to_participant: id("p2"),
        recovery,
        idempotency_key: Some(id("k1")),
        fingerprint: 1,
        position: 1,
    }
}

/// Starts a saga and returns the core with the debit step sent.
fn started(recovery: Recovery) -> SagaCore {
    let mut core = SagaCore::new(10);
    let actions = core.begin(id("s1"), spec(recovery)).unwrap();
    assert!(matches!(&actions[..], [SagaAction::Persist { fsync: true, .. }]), "the start record is fsynced first");
    let actions = core.on_started(&id("s1"));
    assert!(actions
        .iter()
        .any(|a| matches!(a, SagaAction::Step { kind: StepKind::Debit, phase: StepPhase::Action, .. })));
    core
}

fn step_of(actions: &[SagaAction]) -> (StepKind, StepPhase, Retry) {
    actions
        .iter()
        .find_map(|a| match a {
            SagaAction::Step { kind, phase, retry, .. } => Some((*kind, *phase, *retry)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no step in {actions:?}"))
}

fn finish_of(actions: &[SagaAction]) -> Outcome {
    actions
        .iter()
        .find_map(|a| match a {
            SagaAction::Finish { outcome, .. } | SagaAction::DeadLetter { outcome, .. } => Some(outcome.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("not finished: {actions:?}"))
}

#[test]
fn the_happy_path_debits_then_credits_then_finishes() {
    let mut core = started(Recovery::Backward);
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    assert_eq!(step_of(&a), (StepKind::Credit, StepPhase::Action, Retry::Budgeted));
    let a = core.on_step(&id("s1"), StepKind::Credit, StepPhase::Action, StepResult::Applied);
    assert_eq!(finish_of(&a), Outcome::Committed);
    assert!(core.get(&id("s1")).is_none());
    assert!(core.key_in_flight(&id("k1")).is_none());
}

#[test]
fn a_refused_debit_aborts_with_its_reason() {
    let mut core = started(Recovery::Backward);
    let refused = StepResult::Refused(AbortReason::InsufficientFunds, "has 5 available".into());
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, refused);
    assert!(matches!(finish_of(&a), Outcome::Aborted(AbortReason::InsufficientFunds, _)));
}

#[test]
fn a_debit_refused_for_an_account_its_participant_lacks_aborts_with_that_reason() {
    let mut core = started(Recovery::Forward);
    let refused = StepResult::Refused(AbortReason::UnknownAccount, "p1: account 1 does not exist on p1".into());
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, refused);
    assert!(matches!(finish_of(&a), Outcome::Aborted(AbortReason::UnknownAccount, ref r) if r.contains("account 1")));
}

#[test]
fn a_refused_credit_is_compensated_backward() {
    let mut core = started(Recovery::Backward);
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    let refused = StepResult::Refused(AbortReason::Refused, "account 1001 is closed".into());
    let a = core.on_step(&id("s1"), StepKind::Credit, StepPhase::Action, refused);
    assert_eq!(step_of(&a), (StepKind::Debit, StepPhase::Compensation, Retry::Forever));
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Compensation, StepResult::Applied);
    assert!(matches!(finish_of(&a), Outcome::Compensated(Some(AbortReason::Refused), ref r) if r.contains("closed")));
}

#[test]
fn forward_recovery_retries_the_credit_until_the_deadline_and_refunds_a_refused_one_at_once() {
    let mut core = started(Recovery::Forward);
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    assert_eq!(step_of(&a), (StepKind::Credit, StepPhase::Action, Retry::UntilDeadline));
    // No retry can change a business refusal: the debit is refunded now,
    // not parked, and not after the deadline.
    let refused = StepResult::Refused(AbortReason::UnknownAccount, "account 1001 does not exist on p2".into());
    let a = core.on_step(&id("s1"), StepKind::Credit, StepPhase::Action, refused);
    assert_eq!(step_of(&a), (StepKind::Debit, StepPhase::Compensation, Retry::Forever));
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Compensation, StepResult::Applied);
    let outcome = finish_of(&a);
    assert!(
        matches!(outcome, Outcome::Compensated(Some(AbortReason::UnknownAccount), ref r) if r.contains("does not exist")),
        "{outcome:?}"
    );
    assert!(core.dead_letters().is_empty());
}

#[test]
fn a_credit_refused_for_overflow_compensates_with_that_reason() {
    let mut core = started(Recovery::Backward);
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    let refused = StepResult::Refused(AbortReason::BalanceOverflow, "would overflow its balance".into());
    core.on_step(&id("s1"), StepKind::Credit, StepPhase::Action, refused);
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Compensation, StepResult::Applied);
    assert!(matches!(finish_of(&a), Outcome::Compensated(Some(AbortReason::BalanceOverflow), _)));
}

#[test]
fn forward_recovery_parks_only_a_refund_that_fails() {
    let mut core = started(Recovery::Forward);
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    let refused = StepResult::Refused(AbortReason::UnknownAccount, "account 1001 does not exist".into());
    core.on_step(&id("s1"), StepKind::Credit, StepPhase::Action, refused);
    let refund_refused = StepResult::Refused(AbortReason::Refused, "account 1 is closed".into());
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Compensation, refund_refused);
    assert_eq!(step_of(&a), (StepKind::Debit, StepPhase::CompensateToSuspense, Retry::Forever));
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::CompensateToSuspense, StepResult::Applied);
    // The dead letter keeps the reason that turned the saga back.
    let outcome = finish_of(&a);
    assert!(
        matches!(outcome, Outcome::DeadLettered(Some(AbortReason::UnknownAccount), ref r)
            if r.contains("does not exist") && r.contains("account 1 is closed") && r.contains("parked")),
        "{outcome:?}"
    );
    assert_eq!(core.dead_letters().len(), 1);
    assert_eq!(core.dead_letters()[0].1.cause, Some(AbortReason::UnknownAccount), "logged with the record");
}

#[test]
fn a_forward_credit_past_the_deadline_is_compensated_then_the_debit_refunded() {
    let mut core = started(Recovery::Forward);
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    let past = StepResult::Exhausted("the saga deadline passed".into());
    let a = core.on_step(&id("s1"), StepKind::Credit, StepPhase::Action, past);
    assert_eq!(step_of(&a), (StepKind::Credit, StepPhase::Compensation, Retry::Forever));
    let a = core.on_step(&id("s1"), StepKind::Credit, StepPhase::Compensation, StepResult::Empty);
    assert_eq!(step_of(&a), (StepKind::Debit, StepPhase::Compensation, Retry::Forever));
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Compensation, StepResult::Applied);
    assert!(matches!(
        finish_of(&a),
        Outcome::Compensated(Some(AbortReason::ParticipantUnavailable), ref r) if r.contains("deadline")
    ));
}

#[test]
fn a_credit_of_unknown_fate_is_compensated_before_the_refund() {
    let mut core = started(Recovery::Backward);
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    let a = core.on_step(&id("s1"), StepKind::Credit, StepPhase::Action, StepResult::Exhausted("timeout".into()));
    assert_eq!(step_of(&a), (StepKind::Credit, StepPhase::Compensation, Retry::Forever));
    let a = core.on_step(&id("s1"), StepKind::Credit, StepPhase::Compensation, StepResult::Empty);
    assert_eq!(step_of(&a), (StepKind::Debit, StepPhase::Compensation, Retry::Forever));
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Compensation, StepResult::Applied);
    assert!(matches!(finish_of(&a), Outcome::Compensated(Some(AbortReason::ParticipantUnavailable), _)));
}

#[test]
fn a_credit_that_cannot_be_taken_back_stands() {
    let mut core = started(Recovery::Backward);
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    core.on_step(&id("s1"), StepKind::Credit, StepPhase::Action, StepResult::Exhausted("timeout".into()));
    let spent = StepResult::Refused(AbortReason::InsufficientFunds, "spent".into());
    let a = core.on_step(&id("s1"), StepKind::Credit, StepPhase::Compensation, spent);
    assert_eq!(finish_of(&a), Outcome::Committed);
}

#[test]
fn a_failing_refund_dead_letters_and_an_operator_resolves_it() {
    let mut core = started(Recovery::Backward);
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    core.on_step(
        &id("s1"),
        StepKind::Credit,
        StepPhase::Action,
        StepResult::Refused(AbortReason::Refused, "closed".into()),
    );
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Compensation, StepResult::Exhausted("down".into()));
    assert_eq!(step_of(&a), (StepKind::Debit, StepPhase::CompensateToSuspense, Retry::Forever));
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::CompensateToSuspense, StepResult::Applied);
    let listed = core.dead_letters();
    assert_eq!((listed.len(), listed[0].1.parked), (1, 30));
    assert!(core.key_in_flight(&id("k1")).is_none(), "the client has its answer");
    let a = core.resolve(&id("s1"), 1, "by tandem://operator/t: refund".into()).unwrap();
    assert_eq!(step_of(&a), (StepKind::Release, StepPhase::Action, Retry::Attempts));
    assert!(matches!(core.resolve(&id("s1"), 1, "by tandem://operator/t: refund".into()), Err(Error::Conflict(_))));
    let a = core.on_step(&id("s1"), StepKind::Release, StepPhase::Action, StepResult::Applied);
    assert!(a.iter().any(|x| matches!(x, SagaAction::ResolveReply { result: Ok(()), .. })));
    let end_reason = a.iter().find_map(|x| match x {
        SagaAction::Finish { outcome: Outcome::DeadLettered(_, reason), .. } => Some(reason.clone()),
        _ => None,
    });
    assert!(
        end_reason.as_deref().is_some_and(|r| r.ends_with("; resolved by tandem://operator/t: refund")),
        "the end record keeps who resolved it and why: {end_reason:?}"
    );
    assert!(core.dead_letters().is_empty() && core.get(&id("s1")).is_none());
}

#[test]
fn a_failed_release_leaves_the_dead_letter_for_another_try() {
    let mut core = started(Recovery::Backward);
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    core.on_step(
        &id("s1"),
        StepKind::Credit,
        StepPhase::Action,
        StepResult::Refused(AbortReason::Refused, "closed".into()),
    );
    core.on_step(
        &id("s1"),
        StepKind::Debit,
        StepPhase::Compensation,
        StepResult::Refused(AbortReason::Refused, "closed".into()),
    );
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::CompensateToSuspense, StepResult::Applied);
    core.resolve(&id("s1"), 1, "by tandem://operator/t: refund".into()).unwrap();
    let a = core.on_step(
        &id("s1"),
        StepKind::Release,
        StepPhase::Action,
        StepResult::Refused(AbortReason::Refused, "closed".into()),
    );
    assert!(a.iter().any(|x| matches!(x, SagaAction::ResolveReply { result: Err(_), .. })));
    assert_eq!(core.dead_letters().len(), 1);
}

#[test]
fn recovery_resends_the_step_of_each_logged_stage() {
    for (stage, expected) in [
        (Stage::Starting, Some((StepKind::Debit, StepPhase::Action))),
        (Stage::Debiting, Some((StepKind::Debit, StepPhase::Action))),
        (Stage::Crediting, Some((StepKind::Credit, StepPhase::Action))),
        (Stage::CompensatingCredit, Some((StepKind::Credit, StepPhase::Compensation))),
        (Stage::CompensatingDebit, Some((StepKind::Debit, StepPhase::Compensation))),
        (Stage::Parking, Some((StepKind::Debit, StepPhase::CompensateToSuspense))),
        (Stage::DeadLettered, None),
        (Stage::Releasing, None),
    ] {
        let mut core = SagaCore::new(10);
        let record = SagaRecord {
            spec: spec(Recovery::Backward),
            stage,
            reason: String::new(),
            cause: None,
            parked: 30,
            resolution: String::new(),
        };
        let actions = core.recover(vec![(id("s1"), record)]);
        match expected {
            Some((kind, phase)) => {
                let (k, p, _) = step_of(&actions);
                assert_eq!((k, p), (kind, phase), "{stage:?}");
                assert!(core.key_in_flight(&id("k1")).is_some());
            }
            None => {
                assert!(actions.is_empty(), "{stage:?}");
                assert_eq!(core.dead_letters().len(), 1);
            }
        }
    }
}

#[test]
fn a_restarted_coordinator_still_knows_why_its_saga_turned_back() {
    let mut core = SagaCore::new(10);
    let record = SagaRecord {
        spec: spec(Recovery::Forward),
        stage: Stage::CompensatingDebit,
        reason: "the credit was refused: account 1001 does not exist on p2".into(),
        cause: Some(AbortReason::UnknownAccount),
        parked: 0,
        resolution: String::new(),
    };
    let a = core.recover(vec![(id("s1"), record)]);
    assert_eq!(step_of(&a), (StepKind::Debit, StepPhase::Compensation, Retry::Forever));
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Compensation, StepResult::Applied);
    assert!(matches!(finish_of(&a), Outcome::Compensated(Some(AbortReason::UnknownAccount), _)));
}

#[test]
fn a_saga_resumed_past_a_lost_stage_does_not_invent_a_reason() {
    let mut core = started(Recovery::Backward);
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    let a = core.on_step(&id("s1"), StepKind::Credit, StepPhase::Action, StepResult::Hanging);
    assert_eq!(step_of(&a), (StepKind::Credit, StepPhase::Compensation, Retry::Forever));
    core.on_step(&id("s1"), StepKind::Credit, StepPhase::Compensation, StepResult::Empty);
    let a = core.on_step(&id("s1"), StepKind::Debit, StepPhase::Compensation, StepResult::Applied);
    assert!(matches!(finish_of(&a), Outcome::Compensated(None, ref r) if r.contains("resumed after a crash")));
}

#[test]
fn a_key_in_flight_is_refused_and_the_number_of_sagas_is_bounded() {
    let mut core = started(Recovery::Backward);
    assert!(matches!(core.begin(id("s2"), spec(Recovery::Backward)), Err(Error::Conflict(_))));
    let mut small = SagaCore::new(1);
    small.begin(id("a"), SagaSpec { idempotency_key: None, ..spec(Recovery::Backward) }).unwrap();
    assert!(matches!(
        small.begin(id("b"), SagaSpec { idempotency_key: None, position: 2, ..spec(Recovery::Backward) }),
        Err(Error::Busy(_))
    ));
}

#[test]
fn a_saga_holds_the_participants_it_may_still_send_a_step_to() {
    let mut core = SagaCore::new(10);
    core.start_positions(1, BTreeMap::new());
    let (p1, p2) = (id("p1"), id("p2"));
    let spec = SagaSpec { position: 5, ..spec(Recovery::Backward) };
    core.begin(id("s1"), spec).unwrap();
    core.on_started(&id("s1"));
    assert_eq!(core.watermarks_due(), vec![(p1.clone(), 5), (p2.clone(), 5)]);
    core.on_watermarks_durable(&core.watermarks_due());
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::Action, StepResult::Applied);
    assert!(core.watermarks_due().is_empty(), "crediting: both");
    core.on_step(
        &id("s1"),
        StepKind::Credit,
        StepPhase::Action,
        StepResult::Refused(AbortReason::UnknownAccount, "no".into()),
    );
    assert_eq!(core.watermarks_due(), vec![(p2.clone(), 6)], "compensating the debit: the source only");
    core.on_step(
        &id("s1"),
        StepKind::Debit,
        StepPhase::Compensation,
        StepResult::Refused(AbortReason::Refused, "closed".into()),
    );
    core.on_step(&id("s1"), StepKind::Debit, StepPhase::CompensateToSuspense, StepResult::Applied);
    core.on_finish_written(&id("s1"));
    assert_eq!(core.holding_count(&p1), 1, "a dead letter holds its source until an operator resolves it");
    let release = core.resolve(&id("s1"), 1, "by tandem://operator/t: refund".into()).unwrap();
    assert!(matches!(&release[..], [SagaAction::Step { position: 5, .. }]));
    let finished = core.on_step(&id("s1"), StepKind::Release, StepPhase::Action, StepResult::Applied);
    assert!(finished.iter().any(|a| matches!(a, SagaAction::Finish { .. })));
    assert_eq!(core.holding_count(&p1), 1, "until its terminal record is written");
    core.on_finish_written(&id("s1"));
    assert_eq!(core.holding_count(&p1), 0);
    assert_eq!(core.watermarks_due(), vec![(p1, 6), (p2, 6)]);
}
