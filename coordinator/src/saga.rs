//! The saga orchestrator's core: orchestrated transfer sagas over the same
//! participants as 2PC, with no I/O.
//!
//! # The saga
//!
//! A transfer saga has two steps, each a local atomic write at its
//! participant with barrier semantics (see `participant/src/saga.rs`):
//! debit the source, then credit the target. The saga log records each
//! saga's intent and its stage:
//!
//! - the start record is fsynced before the debit is sent: without it, a
//!   coordinator that crashed after the debit would forget money it took.
//!   That fsync is what the saga log adds to the critical path; later stage
//!   records are only buffered, because a stage lost in a machine crash is
//!   redone, and every step is idempotent (a redone step is a duplicate, a
//!   redone action after its compensation is a hanging step);
//! - debit refused (insufficient funds, unknown or closed account): the saga
//!   aborts, nothing moved;
//! - credit refused for a business reason (unknown or closed account,
//!   overflow): no retry can change that, so the debit is refunded at once
//!   (the compensation), whatever the recovery: forward recovery retries
//!   only what may still succeed, a credit that got no answer. Parking the
//!   money in suspense is for a refund that fails (below), not for a
//!   refusal;
//! - a step that fails transiently (unavailable, timeout) is retried with
//!   capped exponential backoff up to its budget of attempts and the saga
//!   deadline (the driver does that) and then counts as failed with an
//!   unknown effect: a debit whose fate is
//!   unknown is compensated (an empty compensation if it never ran); a
//!   credit whose fate is unknown is compensated first (if it ran, it is
//!   taken back; if the target already spent it, the transfer stands and
//!   the saga completes), then the debit. Forward recovery retries the
//!   credit without a budget of attempts, until the saga deadline; past it
//!   the saga compensates as backward recovery would. Compensations are not
//!   bounded: a credit's compensation must learn whether the credit ran, and
//!   parking must park; a participant that never comes back blocks them
//!   (that is the saga's price, as a stuck coordinator is 2PC's).
//! - a refund that cannot be applied (refused: the source account was
//!   closed meanwhile) makes the saga a dead letter: the debit is
//!   compensated into the source participant's suspense account instead
//!   (retried until it succeeds; it parks nothing if the debit never ran).
//!   Dead letters stay in the log, listed for an operator, who releases the
//!   money to an account. A refund that fails transiently is retried until
//!   the source answers, like the parking would be: the suspense account is
//!   on that same participant, so giving up on the refund would only turn a
//!   participant's restart into a dead letter for an operator (it did, in
//!   the bench's default scenario, before the refund retried).
//!
//! The client hears the outcome once the saga is terminal: COMMITTED
//! (completed), ABORTED, COMPENSATED or DEAD_LETTERED, and, unless it
//! completed, the abort reason of what turned the saga back: the refusal of
//! its debit or credit (insufficient funds, balance overflow, unknown
//! account; any other is REFUSED), or PARTICIPANT_UNAVAILABLE when it gave
//! up on a step that got no answer. A dead letter keeps the reason that
//! turned it back; its text says why the refund failed too. The reason is
//! logged with the saga's stage, so a restarted coordinator still knows it
//! (but not a stage a machine crash lost: a saga resumed past it, on a
//! hanging step, has none to give).
//!
//! # Recovery
//!
//! A restarted coordinator resumes every saga in its log from its stage by
//! resending that stage's step. After a machine crash that stage may be
//! older than the truth (later stage records were only buffered): a redone
//! action is then a duplicate (same answer as the first time) or a hanging
//! step, whose compensation already ran. On a hanging step the saga moves to
//! that compensation and sends it again: the duplicate's answer says what
//! the compensation came to (refunded, empty, or parked in suspense), so the
//! saga ends where it had already got to and the client hears the truth.
//!
//! # Positions and the saga watermark
//!
//! Each saga has a position ([`SagaSpec::position`], handed out by the
//! driver under this core's lock, from the same sequence as transactions).
//! A saga holds the saga watermark of each participant it may still send a
//! step to, by stage: both of its participants until it turns back to its
//! debit's compensation (starting, debiting, crediting, compensating the
//! credit); then only the source (compensating the debit, parking). Its
//! watermark is the smallest position among the sagas that hold it, or,
//! with none, the next position; what is sent is the last value made
//! durable in the log, as for 2PC (`crate::watermark`), and it never goes
//! back (asserted).
//!
//! A dead letter keeps holding its source participant: it sends one more
//! step there, the Release, once an operator resolves it, however long
//! that takes; a watermark past it would make that Release look like a
//! late step. Dead letters are few and listed, and they hold nothing else
//! (not the target, not 2PC's watermark).
//!
//! Why the watermark a restarted coordinator recovers with is right: a
//! saga leaves a participant only by a stage change, and the driver
//! submits a stage's record to the log under this core's lock, so before
//! any watermark computed afterwards is written (the log is one ordered
//! WAL, and a watermark is written with an fsync, which makes the stage
//! durable too); a saga that ends holds its participants until its
//! terminal record is written ([`SagaCore::on_finish_written`]). So a saga
//! below a durable watermark never resumes at a stage that sends a step
//! to that participant.
//!
//! # Input
//!
//! Nothing reaches a panic: a saga id already in use is refused, a result
//! for a step the saga no longer waits for is ignored, and a callback for a
//! saga in another stage changes nothing (the property test in
//! `proptests.rs` throws random sequences of them at the core). The reasons
//! a saga collects from its participants are clipped where they are
//! received, and the reason it stores to `REASON_STORED_LEN_MAX`, so every
//! saga record fits the log's codec.
//!
//! # Isolation
//!
//! None: between the debit and the credit, the money is in no account. An
//! audit that reads all balances then sees less money than there is. The
//! bench measures how often.

use crate::core::{AbortReason, Outcome};
use crate::watermark::Watermarks;
use std::collections::{BTreeMap, HashMap};
use tandem::domain::{clip_text, AccountId, Amount, Id, REASON_STORED_LEN_MAX};
use tandem::Error;

/// A reason as a saga stores it: at most [`REASON_STORED_LEN_MAX`] bytes.
fn stored_reason(reason: &str) -> String {
    clip_text(reason, REASON_STORED_LEN_MAX)
}

/// A resolved dead letter's reason, in its end record and in the answer
/// to the operator: why it was dead-lettered, then who released its money
/// and why (`resolution`, from [`tandem::trust::operator_decision`]).
pub(crate) fn resolved_reason(reason: &str, resolution: &str) -> String {
    stored_reason(&format!("{reason}; resolved {resolution}"))
}

pub type SagaId = Id;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    Backward,
    Forward,
}

/// What a saga moves, where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaSpec {
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    pub from_participant: Id,
    pub to_participant: Id,
    pub recovery: Recovery,
    pub idempotency_key: Option<Id>,
    /// Fingerprint of the request, for the idempotency record.
    pub fingerprint: u64,
    /// The saga's position (0 in records written before positions).
    pub position: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The start record is being fsynced.
    Starting,
    Debiting,
    Crediting,
    CompensatingCredit,
    CompensatingDebit,
    /// Dead letter: compensating the debit into suspense.
    Parking,
    /// Dead letter, money parked (or nothing to park).
    DeadLettered,
    /// An operator's release from suspense is under way.
    Releasing,
}

/// The saga log's record of one saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaRecord {
    pub spec: SagaSpec,
    pub stage: Stage,
    /// Why the saga left its happy path (empty while it is on it).
    pub reason: String,
    /// The same, as the client's abort reason: the refusal that turned the
    /// saga back, or [`AbortReason::ParticipantUnavailable`] when it gave
    /// up on a participant that did not answer. `None` on the happy path,
    /// and when the saga resumed after a crash past a logged stage it had
    /// lost (a hanging step).
    pub cause: Option<AbortReason>,
    /// Amount parked in suspense (dead letters).
    pub parked: Amount,
    /// While an operator's release runs (stage `Releasing`): who asked and
    /// why, for the end record. Not logged: after a crash the saga is a
    /// dead letter again and the operator asks again.
    pub resolution: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Debit,
    Credit,
    Release,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    Action,
    Compensation,
    CompensateToSuspense,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Transient failures are retried up to the step's budget of attempts
    /// and the saga deadline, whichever comes first.
    Budgeted,
    /// Transient failures are retried up to the step's budget of attempts,
    /// whatever the saga deadline (an operator's release of a dead letter).
    Attempts,
    /// Transient failures are retried until the saga deadline.
    UntilDeadline,
    /// Transient failures are retried until the step succeeds.
    Forever,
}

/// What a step came to, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepResult {
    Applied,
    /// A compensation with nothing to undo.
    Empty,
    /// Refused for a business reason: definite. Any reason but those a
    /// participant names (insufficient funds, overflow, unknown account)
    /// is [`AbortReason::Refused`].
    Refused(AbortReason, String),
    /// An action that arrived after its compensation and was ignored: the
    /// saga had gone further than this coordinator remembers (a machine
    /// crash lost its buffered stage records).
    Hanging,
    /// Transient failures past the budget: the effect is unknown.
    Exhausted(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SagaAction {
    /// Write the saga's record: fsynced for the start (then call
    /// [`SagaCore::on_started`]), buffered otherwise.
    Persist { saga: SagaId, record: SagaRecord, fsync: bool },
    /// Send one step, retrying transient failures by `retry`, then call
    /// [`SagaCore::on_step`].
    Step {
        saga: SagaId,
        /// The saga's position, stamped on the step.
        position: u64,
        participant: Id,
        kind: StepKind,
        phase: StepPhase,
        account: AccountId,
        amount: Amount,
        retry: Retry,
    },
    /// The saga is terminal: remove its record, remember its outcome (and
    /// its key's), then answer the client.
    Finish { saga: SagaId, spec: SagaSpec, outcome: Outcome },
    /// The saga became a dead letter: keep its record (stage DeadLettered),
    /// remember its key's outcome, answer the client.
    DeadLetter { saga: SagaId, record: SagaRecord, outcome: Outcome },
    /// Answer the operator who asked for a release.
    ResolveReply { saga: SagaId, result: Result<(), Error> },
}

pub struct SagaCore {
    sagas: HashMap<SagaId, SagaRecord>,
    keys_in_flight: HashMap<Id, SagaId>,
    active_max: usize,
    marks: Watermarks,
    /// The participants whose saga watermark each saga holds, at its
    /// position; a saga that ended stays here until its terminal record is
    /// written.
    holds: HashMap<SagaId, (u64, Vec<Id>)>,
}

/// The participants a saga at `stage` may still send a step to.
fn needed(spec: &SagaSpec, stage: Stage) -> Vec<Id> {
    match stage {
        Stage::Starting | Stage::Debiting | Stage::Crediting | Stage::CompensatingCredit => {
            let mut both = vec![spec.from_participant.clone(), spec.to_participant.clone()];
            both.dedup();
            both
        }
        Stage::CompensatingDebit | Stage::Parking | Stage::DeadLettered | Stage::Releasing => {
            vec![spec.from_participant.clone()]
        }
    }
}

impl SagaCore {
    pub fn new(active_max: usize) -> SagaCore {
        SagaCore {
            sagas: HashMap::new(),
            keys_in_flight: HashMap::new(),
            active_max,
            marks: Watermarks::default(),
            holds: HashMap::new(),
        }
    }

    /// Sets where positions start (the first of this process's generation)
    /// and the durable saga watermarks read back from the log; before
    /// [`SagaCore::recover`].
    pub fn start_positions(&mut self, next_position: u64, floors: BTreeMap<Id, u64>) {
        self.marks.start(next_position, floors);
    }

    /// The saga watermark to send to `participant` (see the essay).
    pub fn watermark(&self, participant: &Id) -> u64 {
        self.marks.floor(participant)
    }

    /// The saga watermarks that may rise, to be made durable and then
    /// passed to [`SagaCore::on_watermarks_durable`].
    pub fn watermarks_due(&self) -> Vec<(Id, u64)> {
        self.marks.due()
    }

    /// These saga watermarks are durable: they are sent from now on.
    pub fn on_watermarks_durable(&mut self, advanced: &[(Id, u64)]) {
        self.marks.on_durable(advanced)
    }

    /// How many sagas hold `participant`'s saga watermark.
    pub fn holding_count(&self, participant: &Id) -> usize {
        self.marks.held_count(participant)
    }

    /// Makes `saga` hold exactly the participants its stage needs (only
    /// ever fewer than before, except when it is first held).
    fn rehold(&mut self, saga: &SagaId) {
        let Some(record) = self.sagas.get(saga) else { return };
        let wanted = needed(&record.spec, record.stage);
        let position = record.spec.position;
        let (_, held) = self.holds.entry(saga.clone()).or_insert_with(|| (position, Vec::new()));
        let released: Vec<Id> = held.iter().filter(|p| !wanted.contains(p)).cloned().collect();
        held.retain(|p| wanted.contains(p));
        for participant in released {
            self.marks.release(&participant, position, saga);
        }
    }

    /// The terminal record of a saga that ended is written: it no longer
    /// holds any watermark.
    pub fn on_finish_written(&mut self, saga: &SagaId) {
        if self.sagas.contains_key(saga) {
            return; // a dead letter: it still holds its source.
        }
        if let Some((position, held)) = self.holds.remove(saga) {
            for participant in held {
                self.marks.release(&participant, position, saga);
            }
        }
    }

    pub fn key_in_flight(&self, key: &Id) -> Option<&SagaId> {
        self.keys_in_flight.get(key)
    }

    pub fn begin(&mut self, saga: SagaId, spec: SagaSpec) -> Result<Vec<SagaAction>, Error> {
        if self.sagas.contains_key(&saga) || self.holds.contains_key(&saga) {
            return Err(Error::AlreadyExists(format!("saga {saga} is running already")));
        }
        if spec.amount <= 0 {
            return Err(Error::InvalidInput(format!("a saga moves a positive amount, not {}", spec.amount)));
        }
        let running = self.sagas.values().filter(|r| r.stage != Stage::DeadLettered).count();
        if running >= self.active_max {
            return Err(Error::Busy(format!("{running} sagas are running, the most this coordinator takes")));
        }
        if let Some(key) = &spec.idempotency_key {
            if let Some(other) = self.keys_in_flight.get(key) {
                return Err(Error::Conflict(format!(
                    "a saga with idempotency key {key} is running ({other}); retry to get its outcome"
                )));
            }
        }
        self.marks.register(spec.position)?;
        if let Some(key) = &spec.idempotency_key {
            self.keys_in_flight.insert(key.clone(), saga.clone());
        }
        let position = spec.position;
        let participants = needed(&spec, Stage::Starting);
        for participant in &participants {
            self.marks.hold(participant, position, &saga);
        }
        self.holds.insert(saga.clone(), (position, participants));
        let record = SagaRecord {
            spec,
            stage: Stage::Starting,
            reason: String::new(),
            cause: None,
            parked: 0,
            resolution: String::new(),
        };
        self.sagas.insert(saga.clone(), record.clone());
        Ok(vec![SagaAction::Persist { saga, record, fsync: true }])
    }

    /// The start record is durable: the debit may go. For a saga that is
    /// not starting, nothing happens.
    pub fn on_started(&mut self, saga: &SagaId) -> Vec<SagaAction> {
        let Some(record) = self.sagas.get_mut(saga).filter(|record| record.stage == Stage::Starting) else {
            tracing::error!(%saga, "a saga's start record became durable for a saga that is not starting; ignored");
            return Vec::new();
        };
        record.stage = Stage::Debiting;
        let mut actions = vec![SagaAction::Persist { saga: saga.clone(), record: record.clone(), fsync: false }];
        actions.extend(Self::stage_step(saga, record));
        actions
    }

    /// The step that a stage sends (and resends after a restart); `None`
    /// for the stages that send none of their own.
    fn stage_step(saga: &SagaId, record: &SagaRecord) -> Option<SagaAction> {
        let spec = &record.spec;
        let (participant, kind, phase, account, retry) = match record.stage {
            Stage::Debiting => (&spec.from_participant, StepKind::Debit, StepPhase::Action, spec.from, Retry::Budgeted),
            Stage::Crediting => {
                let retry = if spec.recovery == Recovery::Forward { Retry::UntilDeadline } else { Retry::Budgeted };
                (&spec.to_participant, StepKind::Credit, StepPhase::Action, spec.to, retry)
            }
            // Its effect must be known before the debit is refunded.
            Stage::CompensatingCredit => {
                (&spec.to_participant, StepKind::Credit, StepPhase::Compensation, spec.to, Retry::Forever)
            }
            Stage::CompensatingDebit => {
                (&spec.from_participant, StepKind::Debit, StepPhase::Compensation, spec.from, Retry::Forever)
            }
            Stage::Parking => {
                (&spec.from_participant, StepKind::Debit, StepPhase::CompensateToSuspense, spec.from, Retry::Forever)
            }
            Stage::Starting | Stage::DeadLettered | Stage::Releasing => return None,
        };
        Some(SagaAction::Step {
            saga: saga.clone(),
            position: spec.position,
            participant: participant.clone(),
            kind,
            phase,
            account,
            amount: spec.amount,
            retry,
        })
    }

    fn move_to(&mut self, saga: &SagaId, stage: Stage, reason: Option<String>) -> Vec<SagaAction> {
        let Some(record) = self.sagas.get_mut(saga) else { return Vec::new() };
        record.stage = stage;
        if let Some(reason) = reason {
            record.reason = stored_reason(&reason);
        }
        let mut actions = vec![SagaAction::Persist { saga: saga.clone(), record: record.clone(), fsync: false }];
        actions.extend(Self::stage_step(saga, record));
        self.rehold(saga);
        actions
    }

    /// Leaves the happy path for `stage`, because of `cause`.
    fn turn_back(
        &mut self,
        saga: &SagaId,
        stage: Stage,
        cause: Option<AbortReason>,
        reason: String,
    ) -> Vec<SagaAction> {
        let Some(record) = self.sagas.get_mut(saga) else { return Vec::new() };
        record.cause = cause;
        self.move_to(saga, stage, Some(reason))
    }

    fn finish(&mut self, saga: &SagaId, outcome: Outcome) -> Vec<SagaAction> {
        let Some(record) = self.sagas.remove(saga) else { return Vec::new() };
        if let Some(key) = &record.spec.idempotency_key {
            self.keys_in_flight.remove(key);
        }
        vec![SagaAction::Finish { saga: saga.clone(), spec: record.spec, outcome }]
    }

    /// A step's result.
    pub fn on_step(&mut self, saga: &SagaId, kind: StepKind, phase: StepPhase, result: StepResult) -> Vec<SagaAction> {
        let Some(record) = self.sagas.get(saga) else { return Vec::new() };
        let stage = record.stage;
        let amount = record.spec.amount;
        let (cause, reason_so_far) = (record.cause, record.reason.clone());
        match (stage, kind, phase, result) {
            (Stage::Debiting, StepKind::Debit, StepPhase::Action, StepResult::Applied) => {
                self.move_to(saga, Stage::Crediting, None)
            }
            (Stage::Debiting, StepKind::Debit, StepPhase::Action, StepResult::Refused(why, reason)) => {
                self.finish(saga, Outcome::Aborted(why, stored_reason(&reason)))
            }
            (Stage::Debiting, StepKind::Debit, StepPhase::Action, StepResult::Hanging) => self.turn_back(
                saga,
                Stage::CompensatingDebit,
                None,
                "resumed after a crash: the debit had already been compensated".into(),
            ),
            (Stage::Crediting, StepKind::Credit, StepPhase::Action, StepResult::Hanging) => self.turn_back(
                saga,
                Stage::CompensatingCredit,
                None,
                "resumed after a crash: the credit had already been compensated".into(),
            ),
            (Stage::Debiting, StepKind::Debit, StepPhase::Action, StepResult::Exhausted(error)) => self.turn_back(
                saga,
                Stage::CompensatingDebit,
                Some(AbortReason::ParticipantUnavailable),
                format!("the debit's outcome is unknown: {error}"),
            ),
            (Stage::Crediting, StepKind::Credit, StepPhase::Action, StepResult::Applied) => {
                self.finish(saga, Outcome::Committed)
            }
            // Backward or forward: no retry can change a business refusal,
            // so the debit is refunded now (forward recovery only retries
            // what may yet succeed: a credit that got no answer).
            (Stage::Crediting, StepKind::Credit, StepPhase::Action, StepResult::Refused(why, reason)) => {
                self.turn_back(saga, Stage::CompensatingDebit, Some(why), format!("the credit was refused: {reason}"))
            }
            (Stage::Crediting, StepKind::Credit, StepPhase::Action, StepResult::Exhausted(error)) => self.turn_back(
                saga,
                Stage::CompensatingCredit,
                Some(AbortReason::ParticipantUnavailable),
                format!("the credit's outcome is unknown: {error}"),
            ),
            (
                Stage::CompensatingCredit,
                StepKind::Credit,
                StepPhase::Compensation,
                StepResult::Applied | StepResult::Empty,
            ) => self.move_to(saga, Stage::CompensatingDebit, None),
            // The credit ran and its money was spent already: the transfer stands.
            (Stage::CompensatingCredit, StepKind::Credit, StepPhase::Compensation, StepResult::Refused(..)) => {
                self.finish(saga, Outcome::Committed)
            }
            (
                Stage::CompensatingDebit,
                StepKind::Debit,
                StepPhase::Compensation,
                StepResult::Applied | StepResult::Empty,
            ) => self.finish(saga, Outcome::Compensated(cause, reason_so_far)),
            // The saga keeps the cause that turned it back; the text says
            // why the refund failed too.
            (
                Stage::CompensatingDebit,
                StepKind::Debit,
                StepPhase::Compensation,
                StepResult::Refused(_, why) | StepResult::Exhausted(why),
            ) => {
                let reason = format!("{reason_so_far}; the refund failed: {why}");
                self.move_to(saga, Stage::Parking, Some(reason))
            }
            (Stage::Parking, StepKind::Debit, StepPhase::CompensateToSuspense, StepResult::Applied) => {
                let Some(record) = self.sagas.get_mut(saga) else { return Vec::new() };
                record.stage = Stage::DeadLettered;
                record.parked = amount;
                // Parking held only the source already, as a dead letter does.
                if let Some(key) = &record.spec.idempotency_key {
                    self.keys_in_flight.remove(key);
                }
                let outcome = Outcome::DeadLettered(
                    record.cause,
                    stored_reason(&format!("{}; {amount} parked in suspense", record.reason)),
                );
                vec![SagaAction::DeadLetter { saga: saga.clone(), record: record.clone(), outcome }]
            }
            // Nothing parked: the debit never ran, or its refund went
            // through after all (that answer had been lost).
            (Stage::Parking, StepKind::Debit, StepPhase::CompensateToSuspense, StepResult::Empty) => {
                self.finish(saga, Outcome::Compensated(cause, reason_so_far))
            }
            (Stage::Releasing, StepKind::Release, StepPhase::Action, StepResult::Applied) => {
                let Some(record) = self.sagas.remove(saga) else { return Vec::new() };
                let mut actions = vec![SagaAction::Finish {
                    saga: saga.clone(),
                    spec: record.spec,
                    outcome: Outcome::DeadLettered(record.cause, resolved_reason(&record.reason, &record.resolution)),
                }];
                actions.push(SagaAction::ResolveReply { saga: saga.clone(), result: Ok(()) });
                actions
            }
            (
                Stage::Releasing,
                StepKind::Release,
                StepPhase::Action,
                StepResult::Refused(_, why) | StepResult::Exhausted(why),
            ) => {
                if let Some(record) = self.sagas.get_mut(saga) {
                    record.stage = Stage::DeadLettered;
                }
                vec![SagaAction::ResolveReply {
                    saga: saga.clone(),
                    result: Err(Error::Unavailable(format!("the release failed: {why}"))),
                }]
            }
            (stage, kind, phase, result) => {
                // A result for a step this stage no longer waits for (a
                // duplicate after a restart): nothing to do.
                tracing::debug!(%saga, ?stage, ?kind, ?phase, ?result, "stale step result ignored");
                Vec::new()
            }
        }
    }

    /// An operator releases a dead letter's money to `to_account` (on the
    /// suspense participant).
    pub fn resolve(
        &mut self,
        saga: &SagaId,
        to_account: AccountId,
        decision: String,
    ) -> Result<Vec<SagaAction>, Error> {
        let record = self.sagas.get_mut(saga).ok_or_else(|| Error::NotFound(format!("no dead letter {saga}")))?;
        match record.stage {
            Stage::DeadLettered => {}
            Stage::Releasing => return Err(Error::Conflict(format!("{saga} is being resolved"))),
            _ => return Err(Error::InvalidInput(format!("{saga} is not a dead letter (stage {:?})", record.stage))),
        }
        record.stage = Stage::Releasing;
        record.resolution = decision;
        Ok(vec![SagaAction::Step {
            saga: saga.clone(),
            position: record.spec.position,
            participant: record.spec.from_participant.clone(),
            kind: StepKind::Release,
            phase: StepPhase::Action,
            account: to_account,
            amount: record.parked,
            retry: Retry::Attempts,
        }])
    }

    pub fn get(&self, saga: &SagaId) -> Option<&SagaRecord> {
        self.sagas.get(saga)
    }

    pub fn dead_letters(&self) -> Vec<(SagaId, SagaRecord)> {
        let mut list: Vec<_> = self
            .sagas
            .iter()
            .filter(|(_, r)| matches!(r.stage, Stage::DeadLettered | Stage::Releasing))
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }

    pub fn running_count(&self) -> usize {
        self.sagas.values().filter(|r| !matches!(r.stage, Stage::DeadLettered)).count()
    }

    /// Resumes the sagas of a restarted coordinator from their logged stage.
    pub fn recover(&mut self, logged: Vec<(SagaId, SagaRecord)>) -> Vec<SagaAction> {
        let mut actions = Vec::new();
        for (saga, mut record) in logged {
            match record.stage {
                // The start record is durable; the debit may have been sent.
                Stage::Starting => record.stage = Stage::Debiting,
                // The operator asks again.
                Stage::Releasing => record.stage = Stage::DeadLettered,
                _ => {}
            }
            if record.stage != Stage::DeadLettered {
                actions.extend(Self::stage_step(&saga, &record));
                if let Some(key) = &record.spec.idempotency_key {
                    self.keys_in_flight.insert(key.clone(), saga.clone());
                }
            }
            // A saga below a participant's durable watermark had sent its
            // last step there (see the essay): it does not hold it again.
            let position = record.spec.position;
            let held: Vec<Id> = needed(&record.spec, record.stage)
                .into_iter()
                .filter(|participant| self.marks.hold(participant, position, &saga))
                .collect();
            self.holds.insert(saga.clone(), (position, held));
            self.sagas.insert(saga, record);
        }
        actions
    }
}

#[cfg(test)]
mod tests;
