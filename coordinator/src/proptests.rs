//! Property tests of the coordinator's cores and of its log's decoders.
//!
//! - Random sequences of the 2PC core's inputs (begins with reused ids and
//!   keys and empty splits, single-participant ones that run in one phase,
//!   votes and one-phase answers with any reason from anyone, durable
//!   callbacks and deadlines out of phase, acknowledgements from anyone)
//!   never panic, and the protocol still holds: a transaction's client
//!   hears at most one answer, hears COMMITTED only after its decision was
//!   persisted and made durable (2PC) or its participant answered (one
//!   phase), a COMMIT goes out only after that, a one-phase transaction
//!   never prepares, a keyed one is sent only once its intent is durable
//!   and keeps its key until its outcome is logged, and an idempotency key
//!   is held by at most one transaction in flight.
//! - Random sequences of the saga core's inputs (any step result for any
//!   saga, out of order, with reasons of any length) never panic; a saga
//!   finishes at most once, parks what it debited, and every record and
//!   outcome it produces fits the log's codec.
//! - Random bytes and mutated records never panic a log decoder; what
//!   decodes encodes again.
//!
//! Case counts are modest so the tests run in seconds; a failure prints
//! its seed and minimal case, and proptest replays it first next time.

use crate::core::{
    AbortReason, Action, CommitProtocol, CommitRecord, Core, OnePhaseCommit, OnePhaseResult, Outcome, Phase, VoteResult,
};
use crate::log;
use crate::saga::{Recovery, SagaAction, SagaCore, SagaRecord, SagaSpec, Stage, StepKind, StepPhase, StepResult};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use tandem::domain::{Id, Leg, REASON_STORED_LEN_MAX};

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

fn reason() -> impl Strategy<Value = String> {
    prop_oneof![3 => "[a-z ]{0,12}", 1 => Just("r".repeat(70_000)), 1 => Just("é".repeat(3_000))]
}

#[derive(Debug, Clone)]
enum TwoPc {
    Begin(u8, Vec<u8>, Option<u8>),
    Vote(u8, u8, Option<(AbortReason, String)>),
    /// A vote from a participant the transaction still waits for.
    VoteWaiting(u8, Option<(AbortReason, String)>),
    CommitDurable(u8),
    AbortDurable(u8),
    Acked(u8, u8),
    EndDurable(u8),
    IntentDurable(u8),
    /// A one-phase answer from any participant.
    OnePhaseAnswer(u8, u8, Option<(AbortReason, String)>),
    /// A one-phase answer from the transaction's participant.
    OnePhaseAnswerWaiting(u8, Option<(AbortReason, String)>),
    Overdue(u8),
    OnePhaseLogged(u8),
    /// A parallel commit's staged record is durable.
    StagedDurable(u8),
}

fn abort_reason() -> impl Strategy<Value = AbortReason> {
    prop_oneof![
        Just(AbortReason::InsufficientFunds),
        Just(AbortReason::BalanceOverflow),
        Just(AbortReason::UnknownAccount),
        Just(AbortReason::ParticipantUnavailable),
        Just(AbortReason::Refused),
    ]
}

fn two_pc() -> impl Strategy<Value = TwoPc> {
    prop_oneof![
        2 => (0..5u8, proptest::collection::vec(0..3u8, 0..3), proptest::option::of(0..2u8))
            .prop_map(|(t, ps, k)| TwoPc::Begin(t, ps, k)),
        2 => (0..5u8, 0..3u8, proptest::option::weighted(0.3, (abort_reason(), reason())))
            .prop_map(|(t, p, v)| TwoPc::Vote(t, p, v)),
        4 => (0..5u8, proptest::option::weighted(0.15, (abort_reason(), reason())))
            .prop_map(|(t, v)| TwoPc::VoteWaiting(t, v)),
        2 => (0..5u8).prop_map(TwoPc::CommitDurable),
        1 => (0..5u8).prop_map(TwoPc::AbortDurable),
        2 => (0..5u8, 0..3u8).prop_map(|(t, p)| TwoPc::Acked(t, p)),
        1 => (0..5u8).prop_map(TwoPc::EndDurable),
        2 => (0..5u8).prop_map(TwoPc::IntentDurable),
        1 => (0..5u8, 0..3u8, proptest::option::weighted(0.3, (abort_reason(), reason())))
            .prop_map(|(t, p, r)| TwoPc::OnePhaseAnswer(t, p, r)),
        3 => (0..5u8, proptest::option::weighted(0.3, (abort_reason(), reason())))
            .prop_map(|(t, r)| TwoPc::OnePhaseAnswerWaiting(t, r)),
        1 => (0..5u8).prop_map(TwoPc::Overdue),
        2 => (0..5u8).prop_map(TwoPc::OnePhaseLogged),
        2 => (0..5u8).prop_map(TwoPc::StagedDurable),
    ]
}

fn one_phase_result(result: Option<(AbortReason, String)>) -> OnePhaseResult {
    match result {
        None => OnePhaseResult::Committed,
        Some((reason, message)) => OnePhaseResult::Refused(reason, message),
    }
}

/// What the test saw of one incarnation of a transaction id.
#[derive(Default, Debug)]
struct Seen {
    persisted_commit: bool,
    durable_commit: bool,
    replies: u32,
    committed: bool,
    sent_abort: bool,
    /// Began with one participant and one-phase commit on.
    one_phase: bool,
    keyed: bool,
    intent_durable: bool,
    outcome_persisted: bool,
    /// Parallel commit: its staged record was persisted, then made durable.
    persisted_staged: bool,
    staged_durable: bool,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_2pc_core_takes_any_sequence_of_inputs_without_a_panic(
        inputs in proptest::collection::vec(two_pc(), 1..60),
        parallel in any::<bool>(),
        one_phase_mode in 0..3u8,
    ) {
        let mut core = Core::new(3);
        core.set_commit_protocol(if parallel { CommitProtocol::Parallel } else { CommitProtocol::Classic });
        let one_phase_mode = [OnePhaseCommit::Auto, OnePhaseCommit::Always, OnePhaseCommit::Off][one_phase_mode as usize];
        core.set_one_phase(one_phase_mode);
        let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
        let mut next_position = 1u64;
        for input in inputs {
            // The watermarks rise (the core asserts they never go back, and
            // never pass a transaction or saga that holds them).
            let due = core.watermarks_due();
            core.on_watermarks_durable(&due);
            let (txn_name, actions, durable_call) = match input {
                TwoPc::Begin(t, participants, key) => {
                    let legs: BTreeMap<Id, Vec<Leg>> = participants
                        .iter()
                        .map(|p| (id(&format!("p{p}")), vec![Leg { account: *p as u64, amount: 1 }]))
                        .collect();
                    // The rule, written out again: one participant, and
                    // with a key under parallel commit only if told always.
                    let one_phase = legs.len() == 1
                        && match one_phase_mode {
                            OnePhaseCommit::Always => true,
                            OnePhaseCommit::Off => false,
                            OnePhaseCommit::Auto => key.is_none() || !parallel,
                        };
                    let actions =
                        core.begin(id(&format!("t{t}")), next_position, legs, key.map(|k| id(&format!("k{k}"))));
                    next_position += 1;
                    if actions.is_ok() {
                        seen.insert(format!("t{t}"), Seen { one_phase, keyed: key.is_some(), ..Seen::default() });
                    }
                    (format!("t{t}"), actions.unwrap_or_default(), false)
                }
                TwoPc::Vote(t, p, vote) => {
                    let vote = match vote {
                        None => VoteResult::Yes,
                        Some((reason, message)) => VoteResult::No(reason, message),
                    };
                    (format!("t{t}"), core.on_vote(&id(&format!("t{t}")), &id(&format!("p{p}")), vote), false)
                }
                TwoPc::VoteWaiting(t, vote) => {
                    let txn = id(&format!("t{t}"));
                    let waiting = match core.get(&txn).map(|a| &a.phase) {
                        Some(Phase::Preparing { waiting } | Phase::Staging { waiting, .. }) => waiting.iter().next().cloned(),
                        _ => None,
                    };
                    let vote = match vote {
                        None => VoteResult::Yes,
                        Some((reason, message)) => VoteResult::No(reason, message),
                    };
                    let actions = waiting.map(|p| core.on_vote(&txn, &p, vote)).unwrap_or_default();
                    (format!("t{t}"), actions, false)
                }
                TwoPc::CommitDurable(t) => (format!("t{t}"), core.on_commit_durable(&id(&format!("t{t}"))), true),
                TwoPc::AbortDurable(t) => {
                    let outcome = Outcome::Aborted(AbortReason::Refused, "no".into());
                    (format!("t{t}"), core.on_abort_durable(&id(&format!("t{t}")), outcome), false)
                }
                TwoPc::Acked(t, p) => {
                    (format!("t{t}"), core.on_commit_acked(&id(&format!("t{t}")), &id(&format!("p{p}"))), false)
                }
                TwoPc::EndDurable(t) => {
                    core.on_end_durable(&id(&format!("t{t}")));
                    (format!("t{t}"), Vec::new(), false)
                }
                TwoPc::IntentDurable(t) => {
                    let txn = id(&format!("t{t}"));
                    if matches!(core.get(&txn).map(|a| &a.phase), Some(Phase::Intending { .. })) {
                        seen.get_mut(&format!("t{t}")).expect("held").intent_durable = true;
                    }
                    (format!("t{t}"), core.on_intent_durable(&txn), false)
                }
                TwoPc::OnePhaseAnswer(t, p, result) => {
                    let txn = id(&format!("t{t}"));
                    (format!("t{t}"), core.on_one_phase_answer(&txn, &id(&format!("p{p}")), one_phase_result(result)), true)
                }
                TwoPc::OnePhaseAnswerWaiting(t, result) => {
                    let txn = id(&format!("t{t}"));
                    let participant = core.get(&txn).map(|a| a.participants[0].clone());
                    let actions = participant
                        .map(|p| core.on_one_phase_answer(&txn, &p, one_phase_result(result)))
                        .unwrap_or_default();
                    (format!("t{t}"), actions, true)
                }
                TwoPc::Overdue(t) => (format!("t{t}"), core.on_one_phase_overdue(&id(&format!("t{t}"))), false),
                TwoPc::StagedDurable(t) => {
                    let txn = id(&format!("t{t}"));
                    if let Some(seen) = seen.get_mut(&format!("t{t}")) {
                        if seen.persisted_staged {
                            seen.staged_durable = true;
                        }
                    }
                    (format!("t{t}"), core.on_staged_durable(&txn, 1), false)
                }
                TwoPc::OnePhaseLogged(t) => {
                    let txn = id(&format!("t{t}"));
                    let logging = matches!(core.get(&txn).map(|a| &a.phase), Some(Phase::OnePhaseLogging { .. }));
                    let persisted = seen.get(&format!("t{t}")).is_some_and(|seen| seen.outcome_persisted);
                    prop_assert!(!logging || persisted, "logging a one-phase outcome that was not persisted");
                    core.on_one_phase_logged(&txn);
                    (format!("t{t}"), Vec::new(), false)
                }
            };
            for action in actions {
                let txn = match &action {
                    Action::SendPrepare { txn, .. }
                    | Action::PersistCommit { txn, .. }
                    | Action::SendCommit { txn, .. }
                    | Action::SendAbort { txn, .. }
                    | Action::PersistAbort { txn, .. }
                    | Action::Reply { txn, .. }
                    | Action::PersistEnd { txn, .. }
                    | Action::PersistIntent { txn, .. }
                    | Action::SendOnePhase { txn, .. }
                    | Action::ReplyUnknown { txn, .. }
                    | Action::PersistOnePhaseOutcome { txn, .. }
                    | Action::PersistStaged { txn, .. }
                    | Action::PersistStagedAbort { txn, .. } => txn.to_string(),
                };
                prop_assert_eq!(&txn, &txn_name, "an action for another transaction");
                let seen = seen.get_mut(&txn).expect("an action for a transaction that began");
                let two_phase_only = matches!(
                    action,
                    Action::SendPrepare { .. } | Action::PersistCommit { .. } | Action::SendCommit { .. } | Action::SendAbort { .. } | Action::PersistAbort { .. } | Action::PersistEnd { .. } | Action::PersistStaged { .. } | Action::PersistStagedAbort { .. }
                );
                prop_assert!(!(seen.one_phase && two_phase_only), "a one-phase transaction ran a step of 2PC: {:?}", action);
                match action {
                    Action::PersistIntent { record, .. } => {
                        prop_assert!(seen.one_phase && seen.keyed, "an intent for a transaction that is not keyed one-phase");
                        prop_assert!(log::encode_intent(&record).is_ok(), "the intent fits the log");
                    }
                    Action::SendOnePhase { .. } => {
                        prop_assert!(seen.one_phase);
                        prop_assert!(!seen.keyed || seen.intent_durable, "a keyed one-phase request before its intent was durable");
                    }
                    Action::ReplyUnknown { .. } => {
                        seen.replies += 1;
                        prop_assert_eq!(seen.replies, 1, "a client heard two answers");
                    }
                    Action::PersistOnePhaseOutcome { txn, idempotency_key, outcome, .. } => {
                        prop_assert!(seen.one_phase && durable_call, "a one-phase outcome logged before its answer");
                        prop_assert!(!seen.outcome_persisted, "a one-phase outcome logged twice");
                        seen.outcome_persisted = true;
                        prop_assert_eq!(idempotency_key.is_some(), seen.keyed);
                        if let Some(key) = &idempotency_key {
                            prop_assert_eq!(core.key_in_flight(key), Some(&txn), "the key is freed before its outcome is logged");
                        }
                        prop_assert!(log::one_phase_outcome_ops(&txn, idempotency_key.as_ref(), &outcome, 1, 86_400_000).is_ok(), "the outcome fits the log");
                    }
                    Action::PersistCommit { record, .. } => {
                        prop_assert!(!seen.sent_abort, "a commit decision after an abort");
                        prop_assert!(log::encode_commit(&record).is_ok());
                        seen.persisted_commit = true;
                    }
                    Action::Reply { outcome, .. } => {
                        seen.replies += 1;
                        prop_assert_eq!(seen.replies, 1, "a client heard two outcomes");
                        if outcome == Outcome::Committed {
                            prop_assert!(
                                (durable_call && (seen.persisted_commit || seen.one_phase)) || seen.staged_durable,
                                "COMMITTED before the decision (or the staged record) was durable or the answer came"
                            );
                            seen.durable_commit = true;
                            seen.committed = true;
                        }
                    }
                    Action::SendCommit { .. } => prop_assert!(seen.durable_commit, "a COMMIT before the decision was durable"),
                    Action::SendAbort { .. } => {
                        prop_assert!(!seen.persisted_commit, "an ABORT after a commit decision");
                        seen.sent_abort = true;
                    }
                    Action::PersistAbort { key, outcome, txn } => {
                        prop_assert!(!seen.persisted_commit);
                        prop_assert!(log::abort_ops(&txn, &key, &outcome, 1, 86_400_000).is_ok(), "the outcome fits the log");
                    }
                    Action::PersistStaged { record, .. } => {
                        prop_assert!(parallel && !seen.one_phase && !seen.persisted_staged, "a staged record out of place");
                        prop_assert!(log::encode_staged(&record).is_ok(), "the staged record fits the log");
                        seen.persisted_staged = true;
                    }
                    Action::PersistStagedAbort { txn, idempotency_key, outcome, .. } => {
                        prop_assert!(seen.staged_durable, "a parallel commit's abort logged before its staged record was durable");
                        prop_assert!(!seen.committed, "an abort logged after COMMITTED");
                        prop_assert_eq!(idempotency_key.is_some(), seen.keyed);
                        prop_assert!(log::staged_abort_ops(&txn, idempotency_key.as_ref(), &outcome, 1, 86_400_000).is_ok());
                    }
                    Action::PersistEnd { staged, .. } => {
                        prop_assert_eq!(staged.is_some(), seen.persisted_staged, "an end record of the wrong kind");
                    }
                    Action::SendPrepare { .. } => {}
                }
            }
            // An idempotency key is held by the one transaction that has it.
            for k in 0..2 {
                let key = id(&format!("k{k}"));
                if let Some(txn) = core.key_in_flight(&key) {
                    let active = core.get(txn);
                    prop_assert!(active.is_some_and(|a| a.idempotency_key.as_ref() == Some(&key)));
                }
            }
            prop_assert!(core.active_count() <= 3);
        }
    }
}

#[derive(Debug, Clone)]
enum SagaInput {
    Begin(u8, i64, Option<u8>),
    Started(u8),
    Step(u8, StepKind, StepPhase, StepResult),
    /// The result of the step the saga waits for.
    Next(u8, StepResult),
    Resolve(u8, u64),
}

fn step_result() -> impl Strategy<Value = StepResult> {
    prop_oneof![
        3 => Just(StepResult::Applied),
        1 => Just(StepResult::Empty),
        2 => (abort_reason(), reason()).prop_map(|(why, text)| StepResult::Refused(why, text)),
        1 => Just(StepResult::Hanging),
        2 => reason().prop_map(StepResult::Exhausted),
    ]
}

fn saga_input() -> impl Strategy<Value = SagaInput> {
    let kind = prop_oneof![Just(StepKind::Debit), Just(StepKind::Credit), Just(StepKind::Release)];
    let phase =
        prop_oneof![Just(StepPhase::Action), Just(StepPhase::Compensation), Just(StepPhase::CompensateToSuspense)];
    prop_oneof![
        1 => (0..4u8, prop_oneof![1..100i64, Just(0i64), Just(-3i64)], proptest::option::of(0..2u8))
            .prop_map(|(s, a, k)| SagaInput::Begin(s, a, k)),
        1 => (0..4u8).prop_map(SagaInput::Started),
        2 => (0..4u8, kind, phase, step_result()).prop_map(|(s, k, p, r)| SagaInput::Step(s, k, p, r)),
        6 => (0..4u8, step_result()).prop_map(|(s, r)| SagaInput::Next(s, r)),
        1 => (0..4u8, 0..3u64).prop_map(|(s, a)| SagaInput::Resolve(s, a)),
    ]
}

fn spec(amount: i64, key: Option<u8>) -> SagaSpec {
    SagaSpec {
        from: 1,
        to: 2,
        amount,
        from_participant: id("p1"),
        to_participant: id("p2"),
        recovery: Recovery::Backward,
        idempotency_key: key.map(|k| id(&format!("k{k}"))),
        fingerprint: 7,
        position: 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_saga_core_takes_any_sequence_of_inputs_without_a_panic(inputs in proptest::collection::vec(saga_input(), 1..60)) {
        let mut core = SagaCore::new(3);
        let mut next_position = 1u64;
        // Sagas finished, by name, in their current incarnation.
        let mut finished: BTreeSet<String> = BTreeSet::new();
        let mut amounts: BTreeMap<String, i64> = BTreeMap::new();
        let mut waits_for: BTreeMap<String, (StepKind, StepPhase)> = BTreeMap::new();
        for input in inputs {
            // The watermarks rise (the core asserts they never go back, and
            // never pass a transaction or saga that holds them).
            let due = core.watermarks_due();
            core.on_watermarks_durable(&due);
            let actions = match input {
                SagaInput::Begin(s, amount, key) => {
                    let began = core.begin(id(&format!("s{s}")), SagaSpec { position: next_position, ..spec(amount, key) });
                    next_position += 1;
                    if began.is_ok() {
                        prop_assert!(amount > 0, "a saga of {} began", amount);
                        finished.remove(&format!("s{s}"));
                        amounts.insert(format!("s{s}"), amount);
                    }
                    began.unwrap_or_default()
                }
                SagaInput::Started(s) => core.on_started(&id(&format!("s{s}"))),
                SagaInput::Step(s, kind, phase, result) => core.on_step(&id(&format!("s{s}")), kind, phase, result),
                SagaInput::Next(s, result) => match waits_for.get(&format!("s{s}")).copied() {
                    Some((kind, phase)) => core.on_step(&id(&format!("s{s}")), kind, phase, result),
                    None => core.on_started(&id(&format!("s{s}"))),
                },
                SagaInput::Resolve(s, account) => core.resolve(&id(&format!("s{s}")), account, "by tandem://operator/t: test".into()).unwrap_or_default(),
            };
            for action in actions {
                match action {
                    SagaAction::Persist { record, .. } => {
                        prop_assert!(record.reason.len() <= REASON_STORED_LEN_MAX);
                        prop_assert!(log::encode_saga(&record).is_ok(), "a saga record that does not fit the log");
                    }
                    SagaAction::Finish { saga, spec, outcome } => {
                        prop_assert!(finished.insert(saga.to_string()), "{} finished twice", saga);
                        prop_assert!(log::saga_finish_ops(&saga, &spec, &outcome, 86_400_000).is_ok(), "an outcome that does not fit the log");
                        // Its terminal record is written, as the driver says.
                        core.on_finish_written(&saga);
                    }
                    SagaAction::DeadLetter { saga, record, outcome } => {
                        prop_assert_eq!(Some(&record.parked), amounts.get(saga.as_str()), "parked other than the debit");
                        prop_assert!(log::dead_letter_ops(&saga, &record, &outcome).is_ok());
                    }
                    SagaAction::Step { saga, kind, phase, amount, .. } => {
                        prop_assert!(amount > 0);
                        waits_for.insert(saga.to_string(), (kind, phase));
                    }
                    SagaAction::ResolveReply { .. } => {}
                }
            }
            for (saga, record) in core.dead_letters() {
                prop_assert_eq!(record.stage == Stage::DeadLettered || record.stage == Stage::Releasing, true, "{}", saga);
            }
        }
    }
}

/// A decoder (true: it decoded, and what it decoded encodes again) and a
/// record it reads.
type Decoder = fn(&[u8]) -> bool;

fn valid_log_records() -> Vec<(Decoder, Vec<u8>)> {
    fn commit(bytes: &[u8]) -> bool {
        log::decode_commit(bytes).map(|r| log::encode_commit(&r).unwrap()).is_ok()
    }
    fn finished(bytes: &[u8]) -> bool {
        log::decode_finished(bytes).map(|r| log::encode_finished(&r).unwrap()).is_ok()
    }
    fn keyed(bytes: &[u8]) -> bool {
        log::decode_keyed(bytes).map(|r| log::encode_keyed(&r).unwrap()).is_ok()
    }
    fn saga(bytes: &[u8]) -> bool {
        log::decode_saga(bytes).map(|r| log::encode_saga(&r).unwrap()).is_ok()
    }
    fn generation(bytes: &[u8]) -> bool {
        log::decode_generation(bytes).is_ok()
    }
    fn incarnation(bytes: &[u8]) -> bool {
        log::decode_incarnation(bytes).is_ok()
    }
    fn watermarks(bytes: &[u8]) -> bool {
        log::decode_watermarks(bytes).is_ok()
    }
    fn expiry(bytes: &[u8]) -> bool {
        log::parse_expiry_key(bytes).is_ok()
    }
    let record = SagaRecord {
        spec: spec(30, Some(1)),
        stage: Stage::Parking,
        reason: "refused".into(),
        cause: Some(AbortReason::UnknownAccount),
        parked: 30,
        resolution: String::new(),
    };
    vec![
        (
            commit,
            log::encode_commit(&CommitRecord {
                participants: vec![id("p1"), id("p2")],
                idempotency_key: Some(id("k")),
                position: 1 << 40 | 1,
            })
            .unwrap(),
        ),
        (
            finished,
            log::encode_finished(&log::Finished {
                outcome: log::FinishedAs::Committed,
                idempotency_key: Some(id("k")),
                expires_ms: 1_700_000_000_000,
                resolution: String::new(),
            })
            .unwrap(),
        ),
        (
            keyed,
            log::encode_keyed(&log::KeyedResult {
                txn: id("t1"),
                outcome: Outcome::Aborted(AbortReason::Refused, "no".into()),
                fingerprint: 3,
                expires_ms: 1_700_000_000_000,
            })
            .unwrap(),
        ),
        (
            keyed,
            log::encode_keyed(&log::KeyedResult {
                txn: id("t1"),
                outcome: Outcome::Compensated(Some(AbortReason::Refused), "back".into()),
                fingerprint: 3,
                expires_ms: 1_700_000_000_000,
            })
            .unwrap(),
        ),
        (saga, log::encode_saga(&record).unwrap()),
        (generation, 7u64.to_le_bytes().to_vec()),
        (incarnation, 0x1234_5678_9abc_def0u64.to_le_bytes().to_vec()),
        (watermarks, log::encode_watermarks(1 << 40 | 5, 1 << 40 | 3)),
        (expiry, log::expiry_key(1_700_000_000_000, b"k/key")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_and_mutated_bytes_never_panic_a_log_decoder(
        bytes in proptest::collection::vec(any::<u8>(), 0..80),
        pick in any::<usize>(),
        cut in any::<usize>(),
        at in any::<usize>(),
        byte in any::<u8>(),
        extra in proptest::collection::vec(any::<u8>(), 0..4),
    ) {
        let records = valid_log_records();
        for (decode, _) in &records {
            decode(&bytes);
        }
        let (decode, valid) = &records[pick % records.len()];
        prop_assert!(decode(valid));
        let mut mutated = valid.clone();
        mutated[at % valid.len()] = byte;
        mutated.truncate(cut % (valid.len() + 1));
        mutated.extend_from_slice(&extra);
        decode(&mutated);
        let _ = log::id_from_key(log::DECISION_PREFIX, &bytes);
    }
}
