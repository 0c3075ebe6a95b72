//! The participant's side of sagas, with no I/O (it extends [`Core`]).
//!
//! # Steps with barrier semantics (orchestrated sagas)
//!
//! A saga step (debit, credit, release from suspense) or its compensation
//! is one atomic local write: the balance change and the
//! barrier record of (saga id, step kind) together. The barrier makes every
//! delivery safe:
//! - a duplicate action or compensation does nothing and gets the first
//!   answer;
//! - a compensation whose action never ran (or was refused) records itself
//!   and succeeds with nothing to undo (empty compensation);
//! - an action that arrives after its compensation does nothing (hanging
//!   step), so a delayed debit cannot take money the saga already gave up.
//!
//! An action refused for a business reason (insufficient funds, unknown or
//! closed account, overflow) is recorded as refused, with that reason, so
//! duplicates stay refused and say why (the orchestrator reports it to its
//! client as the saga's abort reason). A compensation that cannot be applied (the refund's account was
//! closed, the credit was already spent) is not recorded: the orchestrator
//! may retry it, and after its budget compensates the debit into this
//! participant's suspense account instead ([`StepPhase::CompensateToSuspense`]:
//! it parks the money only if the debit did run), where an operator finds it
//! and releases it ([`StepKind::Release`]).
//!
//! A barrier records the amount its step moved, and a compensation must
//! name the same amount: a refund or a parking never moves more, or less,
//! than the debit it undoes. A release is only for a saga whose debit was
//! parked here, takes exactly what that debit parked, and runs once (its
//! own barrier): so the suspense account always holds what the parked
//! sagas and parked transfers put there, and a release for a saga that
//! parked nothing (which used to drain the suspense account, after which
//! an operator's resolution of a parked transfer found less than it
//! expected) is refused and changes nothing. A parked debit's barrier is
//! kept until its saga is forgotten (the orchestrator forgets a dead
//! letter once it is resolved, and a forget that came first does not count
//! until the release ran): it is what allows the release. Barriers
//! written before amounts were stored allow a release of at most what the
//! suspense account holds beyond the parked amounts this node knows.
//!
//! # Choreographed transfers
//!
//! No controller: [`Core::start_transfer`] debits the source and puts a
//! `TransferDebited` event in the outbox in the same atomic write. The node's
//! relay delivers outbox events at least once, each peer's in outbox order
//! from an index by destination ([`Core::outbox_batch`]: a pass costs what
//! it sends), so that a peer that is down holds up no other;
//! [`Core::deliver_event`] drops a duplicate (see below), credits the
//! target and answers `TransferCredited`, or `TransferRejected`, on which
//! the source refunds (or, if the refund cannot be applied, parks the money
//! in suspense: a dead letter). Each event has a schema version; readers
//! accept every version whose kind they know.
//!
//! # Deduplication with no time window
//!
//! Each node numbers the events it sends to each peer: 1, 2, 3, ... per
//! destination, with a durable counter (`q/<peer>`) written in the same
//! atomic write as the outbox event it numbers (`push_event`). An event is
//! relayed only once that write is known durable (an fsync that covers it
//! returned: `outbox_durable_end`; the store completes writes in order), so
//! a number can be given again only if its event, and the debit or credit
//! that caused it, were lost together before any peer could see them: a
//! power loss never makes a number that a peer may have applied stand for
//! another event. The counter outlives the events (delivered events are
//! deleted; the counter never is).
//!
//! The receiver keeps, per sender, the highest number applied with none
//! missing below it and the numbers applied above it (`w/<peer>`), updated
//! in the same atomic write as the event's effects: an event is applied
//! exactly when its number is recorded. A number at or below the
//! contiguous one, or among those above, is a duplicate, whatever its age,
//! across restarts, with no record per event and nothing to expire. The
//! relay sends a peer's events in order, so the numbers above are few (a
//! gap is an event the receiver refused for now: a suspense account that
//! cannot park more); a number more than [`SEQUENCE_AHEAD_MAX`] past the
//! contiguous one is held back (refused unapplied, RESOURCE_EXHAUSTED,
//! which the relay retries), so the state per sender is bounded. The answer
//! events flow the other way, numbered by their own sender the same way.
//! An event with no number (written by a node from before numbers) takes
//! the old path: an inbox record per event id (`i/<event id>`), kept for
//! `finished_retention_ms`; such events stop once every node runs this
//! version and the old outboxes have drained.
//!
//! Caveat: the numbering belongs to a node's disk. A participant restored
//! from an older copy of its disk, or started on an empty one under the
//! same name, would number from an earlier point and its peers would take
//! its new events for duplicates (the money stays debited at the source,
//! in flight, never credited twice); such a node needs a new name, as a
//! coordinator that lost its log needs a new incarnation.
//!
//! # Late steps (orchestrated sagas with no time window)
//!
//! A step request may say where its saga stands: its coordinator, that
//! coordinator's incarnation, the saga's position, and the coordinator's
//! saga watermark for this participant (below it, every saga of the
//! incarnation has sent its last step here). This node keeps the highest
//! watermark per (coordinator, incarnation) (`s/<coordinator>/<incarnation>`,
//! constant state, written with the step that raised it), and records the
//! saga's place in each barrier it creates ([`StepOrder`], [`SagaPlace`]).
//! Then:
//! - a barrier whose saga is below the watermark goes at the next
//!   collection, with no retention wait ([`Core::collect_sagas`]), except a
//!   debit parked in suspense, which waits for its release as before;
//! - a step (action or compensation of a debit or credit) whose saga is
//!   below the watermark and that finds no barrier here is late: a
//!   duplicate the network held, of a saga that has ended. An action does
//!   nothing and is answered REFUSED, with a reason saying it is late; a
//!   compensation is an empty compensation. Neither leaves a record, so
//!   the state stays constant however many late steps arrive, however
//!   late. A release keeps its own rule (it needs the parked debit's
//!   barrier).
//!
//! Why REFUSED and not HANGING_IGNORED for a late action: HANGING_IGNORED
//! says "your compensation came first", which this node cannot know (the
//! barrier that would say so is gone); REFUSED says what is true (nothing
//! changed, and retrying will not help) and its reason says why. Both make
//! an orchestrator that is still waiting (one whose watermark was wrong)
//! turn back and compensate, and that compensation is empty here: nothing
//! moved either way. What an orchestrator must never hear for a step that
//! did nothing is APPLIED, and it does not.
//!
//! A step with no coordinator, or incarnation 0 (an older coordinator),
//! keeps the rules below: its barriers go after ForgetSagas and the
//! retention.
//!
//! # Retention
//!
//! Barriers of sagas whose steps said no place follow the old rule: kept
//! for `finished_retention_ms` after they can go, with one exception: the
//! barrier of a step whose action ran or was refused and that has no
//! compensation is kept for good. This node cannot tell a completed saga
//! from one whose orchestrator is still waiting, and deleting that barrier
//! would turn a late refund into an empty compensation (money lost) or a
//! redelivered action into a second one. So the orchestrator tells its
//! participants when a saga has ended: [`Core::forget_sagas`] marks the
//! saga's barriers, and they go after the retention counted from then (a
//! step of the saga still on its way meets its barrier until then; one
//! later than that is the caveat the watermark removes). A saga whose
//! forget never arrives keeps its barriers: a leak, never a double step.
//!
//! A choreographed transfer's record is its idempotency key: kept while it
//! is in flight or parked, and for the node's idempotency retention
//! (`--idempotency-retention`, 24 h by default) after it ended, on the
//! core's ms clock (the end time is stored with the record, so a restart
//! does not reset it; a wall clock set forward while the node was down
//! shortens it by as much); then deleted ([`Core::collect_sagas`]), and its
//! id starts a new transfer. A count never shortens it: at
//! [`TRANSFERS_MAX`] records a new transfer is refused instead. Its events
//! need no record: they are deduplicated by their numbers.
//!
//! # Bounds
//!
//! Every map here has a bound, answered with RESOURCE_EXHAUSTED (`Busy`)
//! and a message when reached, changing nothing: the outbox
//! ([`OUTBOX_MAX`], for new transfers; answers owed to peers are bounded
//! by the peers' [`TRANSFERS_IN_FLIGHT_MAX`]), transfers in flight,
//! transfer records ([`TRANSFERS_MAX`]), barriers ([`BARRIERS_MAX`]), the
//! old inbox ([`INBOX_MAX`]), peers with sequence state
//! ([`SEQUENCE_PEERS_MAX`]), numbers applied ahead
//! ([`SEQUENCE_AHEAD_MAX`]) and incarnations per coordinator
//! ([`INCARNATIONS_PER_COORDINATOR_MAX`]).
//!
//! # Invariant
//!
//! Money is conserved when suspense and money in flight are counted: a
//! debited choreographed transfer whose event is not yet applied at the
//! target holds its amount "in flight" (the isolation anomaly of sagas that
//! the bench's audits measure); at quiescence nothing is in flight. The
//! suspense account holds exactly the amounts of the parked transfers and
//! of the parked debits not yet released; no step takes more from it.
//!
//! # Input
//!
//! Events from peers are checked before anything changes ([`Event::check`]):
//! a schema version, an id of at most `EVENT_ID_LEN_MAX` bytes, a positive
//! amount, a reason of at most `REASON_LEN_MAX` bytes; an answer event must
//! match the transfer it answers. Reasons this node composes are clipped
//! to `REASON_STORED_LEN_MAX`, and every record is encoded (and so checked
//! against its codec's limits) before the state changes.

use crate::core::{account_put, Account, Core, Effects, Refusal, Retained};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use tandem::codec::{corrupt, parse_id, Reader, Writer};
use tandem::domain::{
    check_event_id, check_text_len, clip_text, AccountId, Amount, Id, REASON_LEN_MAX, REASON_STORED_LEN_MAX,
};
use tandem::store::{Durability, Op};
use tandem::Error;

/// The schema version of the events this node writes.
pub const EVENT_VERSION: u32 = 1;

/// How far past the last sequence number applied with none missing below it
/// a source's event may be applied here (see "Deduplication with no time
/// window"). An event further ahead is held back: refused unapplied
/// (RESOURCE_EXHAUSTED, retryable), and the source's relay offers it again
/// once the gap below it is filled. The receiver's state per source is then
/// at most this many numbers. Larger than what the relay has in flight to
/// one peer (`RELAY_BATCH_MAX * RELAY_CALLS_PER_PEER_MAX` in `node.rs`),
/// so that in-order delivery is never held back.
pub const SEQUENCE_AHEAD_MAX: u64 = 4_096;
/// Most peers this node keeps sequence state for, each way (a peer is
/// counted once it has sent, or been sent, a numbered event).
pub const SEQUENCE_PEERS_MAX: usize = 1_024;
/// Most events in the outbox: StartTransfer is refused (RESOURCE_EXHAUSTED,
/// nothing changes) while it holds this many. Answers a peer is owed are
/// added even beyond it (refusing them could stall two peers whose
/// outboxes are full of transfers to each other); they are bounded by the
/// peers' own [`TRANSFERS_IN_FLIGHT_MAX`].
pub const OUTBOX_MAX: usize = 100_000;
/// Most choreographed transfers started here and not yet answered: each
/// can cause one answer in a peer's outbox. StartTransfer is refused
/// (RESOURCE_EXHAUSTED) while this many are in flight.
pub const TRANSFERS_IN_FLIGHT_MAX: usize = 100_000;
/// Most transfer records held (in flight, kept for the idempotency
/// retention, or parked): StartTransfer is refused (RESOURCE_EXHAUSTED)
/// beyond it rather than forgetting an id before its retention ends.
pub const TRANSFERS_MAX: usize = 2_000_000;
/// Most saga step barriers held: a step that would add one beyond it is
/// refused (RESOURCE_EXHAUSTED, retryable) and changes nothing.
pub const BARRIERS_MAX: usize = 2_000_000;
/// Most inbox records (events from older nodes, which carry no sequence
/// number) held: such an event beyond it is refused unapplied (retryable).
pub const INBOX_MAX: usize = 1_000_000;
/// Most incarnations of one coordinator whose saga watermark is kept: a
/// step from another one beyond it is refused (RESOURCE_EXHAUSTED).
pub const INCARNATIONS_PER_COORDINATOR_MAX: usize = 64;
/// Default of `--idempotency-retention`: how long a choreographed
/// transfer's id is remembered after the transfer ends.
pub const IDEMPOTENCY_RETENTION_DEFAULT_MS: u64 = 24 * 3_600 * 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StepKind {
    Debit,
    Credit,
    Release,
}

impl StepKind {
    fn code(self) -> u8 {
        match self {
            StepKind::Debit => b'd',
            StepKind::Credit => b'c',
            StepKind::Release => b'r',
        }
    }

    fn from_code(code: u8) -> Option<StepKind> {
        match code {
            b'd' => Some(StepKind::Debit),
            b'c' => Some(StepKind::Credit),
            b'r' => Some(StepKind::Release),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    Action,
    Compensation,
    /// Debit only: compensate into the suspense account.
    CompensateToSuspense,
}

/// What a saga step says of its orchestrator (SagaStepRequest's
/// `coordinator_id`, `coordinator_incarnation`, `position`,
/// `low_watermark`): below `low_watermark`, every saga of that incarnation
/// has sent its last step to this participant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOrder {
    pub coordinator: Id,
    /// 0: not given (an older coordinator): no watermark is kept.
    pub incarnation: u64,
    /// 0: not given: the step is never judged late.
    pub position: u64,
    /// 0: not given.
    pub low_watermark: u64,
}

/// Where a saga stands at its orchestrator, as its first step here said:
/// stored with the barrier, so that the barrier goes once the saga
/// watermark of its incarnation passes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SagaPlace {
    pub coordinator: Id,
    pub incarnation: u64,
    pub position: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compensation {
    Refunded,
    /// Nothing to undo: the action never ran or was refused.
    Empty,
    Parked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    Applied,
    /// Why, when it is one of the refusals a prepare also knows (unknown or
    /// closed account, insufficient funds, overflow); `None` for another
    /// (a refund asked for after the debit was parked, a release for a saga
    /// that parked nothing here), and for an action refused by a node that
    /// did not record why.
    Refused(Option<Refusal>, String),
    EmptyCompensation,
    HangingIgnored,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepAnswer {
    pub outcome: StepOutcome,
    pub duplicate: bool,
}

/// What a step's action came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ActionResult {
    Applied,
    Refused(Option<Refusal>, String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Barrier {
    /// `None`: the action never ran.
    action: Option<ActionResult>,
    compensation: Option<Compensation>,
    /// The orchestrator said the saga ended ([`Core::forget_sagas`]): the
    /// barrier goes after the retention even if it has no compensation.
    forgotten: bool,
    /// The amount of the first action or compensation recorded: what the
    /// step moved, which its compensation must name too (`None` in barriers
    /// written before amounts were stored).
    amount: Option<Amount>,
    /// The saga's place at its orchestrator (`None`: its first step here
    /// did not say, an older coordinator); then only [`Core::forget_sagas`]
    /// and the retention collect the barrier.
    place: Option<SagaPlace>,
}

impl SagaState {
    /// The outbox index holds exactly the outbox's events (in debug builds,
    /// where the core's tests and property tests run).
    fn debug_assert_outbox_index(&self) {
        debug_assert_eq!(
            self.outbox_by_destination.values().map(BTreeSet::len).sum::<usize>(),
            self.outbox.len(),
            "the outbox index and the outbox disagree"
        );
    }

    /// Whether the release of `saga` ran here.
    fn released(&self, saga: &Id) -> bool {
        self.barriers
            .get(&(saga.clone(), StepKind::Release))
            .is_some_and(|release| release.action == Some(ActionResult::Applied))
    }

    /// Whether the saga watermark of `barrier`'s coordinator incarnation
    /// has passed its saga: that saga sent its last step here.
    fn below_watermark(&self, barrier: &Barrier) -> bool {
        barrier.place.as_ref().is_some_and(|place| {
            self.saga_watermarks
                .get(&(place.coordinator.clone(), place.incarnation))
                .is_some_and(|watermark| place.position < *watermark)
        })
    }

    /// Whether `barrier`, of `saga`'s step `kind`, may go: its step was
    /// refunded or had nothing to undo, or its saga ended (the orchestrator
    /// said so with ForgetSagas, or its saga watermark passed the saga). A
    /// debit parked in suspense waits for its release as well (a forget or
    /// a watermark that came first must not take away what allows the
    /// release), and the release's barrier waits for the parked debit's
    /// (which counts as released only while the release's is there).
    fn is_collectable(&self, saga: &Id, kind: StepKind, barrier: &Barrier) -> bool {
        let ended = barrier.forgotten || self.below_watermark(barrier);
        if kind == StepKind::Release
            && self
                .barriers
                .get(&(saga.clone(), StepKind::Debit))
                .is_some_and(|debit| debit.compensation == Some(Compensation::Parked))
        {
            return false;
        }
        match barrier.compensation {
            Some(Compensation::Parked) => ended && self.released(saga),
            Some(Compensation::Refunded | Compensation::Empty) => true,
            None => ended,
        }
    }

    /// Adds a barrier to the index by place, if it has one.
    fn index_barrier(&mut self, saga: &Id, kind: StepKind, barrier: &Barrier) {
        if let Some(place) = &barrier.place {
            self.barriers_by_place.entry((place.coordinator.clone(), place.incarnation)).or_default().insert((
                place.position,
                saga.clone(),
                kind,
            ));
        }
    }

    /// Removes a barrier from the index by place.
    fn unindex_barrier(&mut self, saga: &Id, kind: StepKind, place: &Option<SagaPlace>) {
        let Some(place) = place else { return };
        let incarnation = (place.coordinator.clone(), place.incarnation);
        if let Some(entries) = self.barriers_by_place.get_mut(&incarnation) {
            entries.remove(&(place.position, saga.clone(), kind));
            if entries.is_empty() {
                self.barriers_by_place.remove(&incarnation);
            }
        }
    }

    /// Counts a transfer record replacing `before` (if any).
    fn count_transfer(&mut self, before: Option<&Transfer>, after: &Transfer) {
        if before.is_none_or(|t| t.state.is_terminal()) && !after.state.is_terminal() {
            self.in_flight += 1;
        }
        if before.is_some_and(|t| !t.state.is_terminal()) && after.state.is_terminal() {
            self.in_flight -= 1;
        }
    }
}

/// What this node applied of one source's numbered events: every number up
/// to `contiguous`, and those in `above` (each in `contiguous + 2 ..=
/// contiguous + SEQUENCE_AHEAD_MAX`). Constant size per source, whatever
/// the age of the events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Applied {
    contiguous: u64,
    above: BTreeSet<u64>,
}

impl Applied {
    fn has(&self, seq: u64) -> bool {
        seq <= self.contiguous || self.above.contains(&seq)
    }

    fn insert(&mut self, seq: u64) {
        debug_assert!(!self.has(seq) && seq <= self.contiguous + SEQUENCE_AHEAD_MAX);
        self.above.insert(seq);
        while self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        debug_assert!(self.above.first().is_none_or(|first| *first > self.contiguous + 1));
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferState {
    Debited,
    Completed,
    Rejected(String),
    Compensated(String),
    DeadLettered(String),
    /// A dead letter an operator released from suspense (the reason says to
    /// which account).
    Resolved(String),
}

impl TransferState {
    pub fn is_terminal(&self) -> bool {
        !matches!(self, TransferState::Debited)
    }

    /// Whether its record may go after the retention: terminal, and not a
    /// parked transfer, which waits for its operator.
    fn is_collectable(&self) -> bool {
        self.is_terminal() && !matches!(self, TransferState::DeadLettered(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub state: TransferState,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    pub target: Id,
    /// When it became terminal and collectable, in the core's ms clock:
    /// its id is remembered for the idempotency retention from then.
    pub ended_at_ms: Option<u64>,
}

impl Transfer {
    /// The transfer with its end time set if it just became collectable.
    fn stamped(mut self, now_ms: u64) -> Transfer {
        if self.state.is_collectable() && self.ended_at_ms.is_none() {
            self.ended_at_ms = Some(now_ms);
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    TransferDebited,
    TransferCredited,
    TransferRejected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub version: u32,
    pub id: String,
    pub kind: EventKind,
    pub saga: Id,
    pub from: AccountId,
    pub to: AccountId,
    pub amount: Amount,
    pub source: Id,
    pub target: Id,
    pub reason: String,
    /// The sender's number for this event among those it sent to this
    /// destination: 1, 2, 3, ... with no gap and never reused (see
    /// "Deduplication with no time window"). 0: none (an event an older
    /// node wrote): the inbox drops its duplicates.
    pub seq: u64,
    /// The W3C trace context (`traceparent`) of the span that made this
    /// event, so the peer's handling of it joins the transfer's trace;
    /// empty: none (this node does not export traces). Advisory: never
    /// checked nor acted on, kept with the event in the outbox, and copied
    /// into the answer to a debit (the driver hands a debit in with its own
    /// span's context). A numbered event only stores one.
    pub trace_parent: String,
}

impl Event {
    /// Checks what this core relies on in an event from a peer, before
    /// anything changes: a schema version, an id of 1 to `EVENT_ID_LEN_MAX`
    /// characters of the id alphabet, a positive amount, and a reason of at
    /// most `REASON_LEN_MAX` bytes.
    pub fn check(&self) -> Result<(), Error> {
        if self.version == 0 {
            return Err(Error::InvalidInput("an event needs a schema version".into()));
        }
        check_event_id(&self.id)?;
        if self.amount <= 0 {
            return Err(Error::InvalidInput(format!("event {} has a non-positive amount {}", self.id, self.amount)));
        }
        check_text_len(&format!("the reason of event {}", self.id), &self.reason, REASON_LEN_MAX)
    }

    /// The participant that sent this event (and numbered it).
    pub fn sender(&self) -> &Id {
        match self.kind {
            EventKind::TransferDebited => &self.source,
            EventKind::TransferCredited | EventKind::TransferRejected => &self.target,
        }
    }

    /// The participant this event is for.
    pub fn destination(&self) -> &Id {
        match self.kind {
            EventKind::TransferDebited => &self.target,
            EventKind::TransferCredited | EventKind::TransferRejected => &self.source,
        }
    }
}

#[derive(Default)]
pub struct SagaState {
    pub(crate) suspense: Amount,
    barriers: HashMap<(Id, StepKind), Barrier>,
    /// The barriers that have a place, by coordinator incarnation and
    /// position, so that those a watermark passed are found without a scan.
    /// A parked debit not yet released leaves it (it waits for its
    /// release, which puts it back).
    barriers_by_place: BTreeMap<(Id, u64), BTreeSet<(u64, Id, StepKind)>>,
    /// The highest saga watermark heard from each coordinator incarnation.
    saga_watermarks: BTreeMap<(Id, u64), u64>,
    transfers: HashMap<Id, Transfer>,
    /// Transfers not yet terminal.
    in_flight: usize,
    /// Collectable transfers by the time they ended, for the idempotency
    /// retention.
    transfers_by_end: BTreeSet<(u64, Id)>,
    /// Inbox of events that carry no sequence number (from older nodes).
    inbox: HashSet<String>,
    /// The last sequence number given to an event for each peer.
    sent_to: BTreeMap<Id, u64>,
    /// What was applied of each peer's numbered events.
    applied_from: BTreeMap<Id, Applied>,
    outbox: BTreeMap<u64, Event>,
    /// The outbox's sequences by the participant each event is for, so
    /// that the relay takes one peer's next events without looking at the
    /// others' ([`Core::outbox_batch`]). Holds exactly the outbox's events.
    outbox_by_destination: BTreeMap<Id, BTreeSet<u64>>,
    next_outbox_seq: u64,
    /// Outbox events below this sequence are on disk. Only those are
    /// relayed: a peer must never apply an event whose cause (the debit)
    /// a crash here could still undo.
    outbox_durable_end: u64,
}

const SUSPENSE_KEY: &[u8] = b"m/suspense";

fn barrier_key(saga: &Id, kind: StepKind) -> Vec<u8> {
    let mut key = b"b/".to_vec();
    key.push(kind.code());
    key.push(b'/');
    key.extend_from_slice(saga.as_str().as_bytes());
    key
}

fn transfer_key(saga: &Id) -> Vec<u8> {
    let mut key = b"c/".to_vec();
    key.extend_from_slice(saga.as_str().as_bytes());
    key
}

fn inbox_key(event_id: &str) -> Vec<u8> {
    let mut key = b"i/".to_vec();
    key.extend_from_slice(event_id.as_bytes());
    key
}

fn sent_key(peer: &Id) -> Vec<u8> {
    let mut key = b"q/".to_vec();
    key.extend_from_slice(peer.as_str().as_bytes());
    key
}

fn applied_key(peer: &Id) -> Vec<u8> {
    let mut key = b"w/".to_vec();
    key.extend_from_slice(peer.as_str().as_bytes());
    key
}

/// `s/<coordinator>/<incarnation, 16 hex digits>`.
fn watermark_key(coordinator: &Id, incarnation: u64) -> Vec<u8> {
    format!("s/{coordinator}/{incarnation:016x}").into_bytes()
}

fn parse_watermark_key(rest: &[u8]) -> Result<(Id, u64), Error> {
    let rest = std::str::from_utf8(rest).map_err(|_| corrupt("a watermark key is not UTF-8"))?;
    let (coordinator, incarnation) =
        rest.rsplit_once('/').ok_or_else(|| corrupt("a watermark key is s/<coordinator>/<incarnation>"))?;
    if incarnation.len() != 16 {
        return Err(corrupt("a watermark key's incarnation is 16 hex digits"));
    }
    let incarnation =
        u64::from_str_radix(incarnation, 16).map_err(|_| corrupt("a watermark key's incarnation is 16 hex digits"))?;
    Ok((parse_id(coordinator)?, incarnation))
}

fn encode_u64(value: u64) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(value);
    w.finish()
}

fn decode_u64(bytes: &[u8]) -> Result<u64, Error> {
    let mut r = Reader::new(bytes);
    let value = r.u64()?;
    r.done()?;
    Ok(value)
}

/// What was applied of a peer's events: the contiguous number, how many
/// above it, and those numbers.
pub(crate) fn encode_applied(applied: &Applied) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(applied.contiguous);
    w.u32(applied.above.len() as u32);
    for seq in &applied.above {
        w.u64(*seq);
    }
    w.finish()
}

pub(crate) fn decode_applied(bytes: &[u8]) -> Result<Applied, Error> {
    let mut r = Reader::new(bytes);
    let contiguous = r.u64()?;
    let count = r.u32()? as u64;
    if count >= SEQUENCE_AHEAD_MAX {
        return Err(corrupt(format!("{count} numbers applied ahead; at most {}", SEQUENCE_AHEAD_MAX - 1)));
    }
    let mut above = BTreeSet::new();
    for _ in 0..count {
        let seq = r.u64()?;
        let ahead = seq.checked_sub(contiguous).unwrap_or(0);
        if !(2..=SEQUENCE_AHEAD_MAX).contains(&ahead) || !above.insert(seq) {
            return Err(corrupt(format!("number {seq} applied ahead of {contiguous}")));
        }
    }
    r.done()?;
    Ok(Applied { contiguous, above })
}

fn outbox_key(seq: u64) -> Vec<u8> {
    let mut key = b"o/".to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The step kind and saga of a barrier key, after `b/`: `<kind>/<saga>`.
fn parse_barrier_key(rest: &[u8]) -> Result<(StepKind, Id), Error> {
    let [code, b'/', saga @ ..] = rest else { return Err(corrupt("a barrier key is b/<kind>/<saga>")) };
    let kind = StepKind::from_code(*code).ok_or_else(|| corrupt(format!("barrier step kind {code}")))?;
    let saga = std::str::from_utf8(saga).map_err(|_| corrupt("a barrier key's saga is not UTF-8"))?;
    Ok((kind, parse_id(saga)?))
}

fn flag(byte: u8) -> Result<bool, Error> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(corrupt(format!("flag {other}"))),
    }
}

fn positive(amount: Amount) -> Result<Amount, Error> {
    if amount <= 0 {
        return Err(corrupt(format!("amount {amount}; amounts are positive")));
    }
    Ok(amount)
}

pub(crate) fn refusal_code(refusal: Option<Refusal>) -> u8 {
    match refusal {
        None => 0,
        Some(Refusal::InsufficientFunds) => 1,
        Some(Refusal::UnknownAccount) => 2,
        Some(Refusal::BalanceOverflow) => 3,
        Some(Refusal::AlreadyAborted) => 4,
        Some(Refusal::UnknownCoordinator) => 5,
        Some(Refusal::ConflictingPrepare) => 6,
        Some(Refusal::AccountClosed) => 7,
        Some(Refusal::Late) => 8,
        Some(Refusal::KeyOfLostIncarnation) => 9,
        Some(Refusal::ProtocolMismatch) => 10,
    }
}

pub(crate) fn refusal_from_code(code: u8) -> Result<Option<Refusal>, Error> {
    Ok(match code {
        0 => None,
        1 => Some(Refusal::InsufficientFunds),
        2 => Some(Refusal::UnknownAccount),
        3 => Some(Refusal::BalanceOverflow),
        4 => Some(Refusal::AlreadyAborted),
        5 => Some(Refusal::UnknownCoordinator),
        6 => Some(Refusal::ConflictingPrepare),
        7 => Some(Refusal::AccountClosed),
        8 => Some(Refusal::Late),
        9 => Some(Refusal::KeyOfLostIncarnation),
        10 => Some(Refusal::ProtocolMismatch),
        other => return Err(corrupt(format!("refusal code {other}"))),
    })
}

/// A barrier: the action (none, applied, or refused with its kind and
/// reason), the compensation, the forgotten flag, the amount.
fn encode_barrier(barrier: &Barrier) -> Result<Vec<u8>, Error> {
    let mut w = Writer::new();
    match &barrier.action {
        None => w.byte(0),
        Some(ActionResult::Applied) => w.byte(1),
        Some(ActionResult::Refused(refusal, reason)) => {
            w.byte(3);
            w.byte(refusal_code(*refusal));
            w.text("a refused step's reason", reason)?;
        }
    }
    w.byte(match barrier.compensation {
        None => 0,
        Some(Compensation::Refunded) => 1,
        Some(Compensation::Empty) => 2,
        Some(Compensation::Parked) => 3,
    });
    w.byte(barrier.forgotten as u8);
    if let Some(amount) = barrier.amount {
        w.i64(amount);
    }
    if let Some(place) = &barrier.place {
        if barrier.amount.is_none() {
            return Err(Error::InvalidInput("a barrier with a place records its amount".into()));
        }
        w.short_text("a saga's coordinator", place.coordinator.as_str())?;
        w.u64(place.incarnation);
        w.u64(place.position);
    }
    Ok(w.finish())
}

fn decode_barrier(bytes: &[u8]) -> Result<Barrier, Error> {
    let mut r = Reader::new(bytes);
    let action = match r.byte()? {
        0 => None,
        1 => Some(ActionResult::Applied),
        // Written before refusals were recorded with their kind.
        2 => Some(ActionResult::Refused(None, r.text()?)),
        3 => {
            let refusal = refusal_from_code(r.byte()?)?;
            Some(ActionResult::Refused(refusal, r.text()?))
        }
        other => return Err(corrupt(format!("barrier action {other}"))),
    };
    let compensation = match r.byte()? {
        0 => None,
        1 => Some(Compensation::Refunded),
        2 => Some(Compensation::Empty),
        3 => Some(Compensation::Parked),
        other => return Err(corrupt(format!("barrier compensation {other}"))),
    };
    // Barriers written before sagas could be forgotten end here; those
    // written before amounts were stored end after the flag, and those
    // written before places were stored (or of a step that said none)
    // after the amount.
    let (forgotten, amount) = match r.remaining() {
        0 => (false, None),
        1 => (flag(r.byte()?)?, None),
        _ => (flag(r.byte()?)?, Some(positive(r.i64()?)?)),
    };
    let place = match r.remaining() {
        0 => None,
        _ => {
            let coordinator = parse_id(&r.short_text()?)?;
            let (incarnation, position) = (r.u64()?, r.u64()?);
            if incarnation == 0 || position == 0 {
                return Err(corrupt("a barrier's place has an incarnation and a position"));
            }
            Some(SagaPlace { coordinator, incarnation, position })
        }
    };
    r.done()?;
    Ok(Barrier { action, compensation, forgotten, amount, place })
}

pub(crate) fn encode_transfer(transfer: &Transfer) -> Result<Vec<u8>, Error> {
    let mut w = Writer::new();
    let (code, reason) = match &transfer.state {
        TransferState::Debited => (1, ""),
        TransferState::Completed => (2, ""),
        TransferState::Rejected(r) => (3, r.as_str()),
        TransferState::Compensated(r) => (4, r.as_str()),
        TransferState::DeadLettered(r) => (5, r.as_str()),
        TransferState::Resolved(r) => (6, r.as_str()),
    };
    w.byte(code);
    w.text("a transfer's reason", reason)?;
    w.u64(transfer.from);
    w.u64(transfer.to);
    w.i64(transfer.amount);
    w.text("a transfer's target", transfer.target.as_str())?;
    if let Some(ended_at_ms) = transfer.ended_at_ms {
        w.u64(ended_at_ms);
    }
    Ok(w.finish())
}

pub(crate) fn decode_transfer(bytes: &[u8]) -> Result<Transfer, Error> {
    let mut r = Reader::new(bytes);
    let code = r.byte()?;
    let reason = r.text()?;
    let state = match code {
        1 => TransferState::Debited,
        2 => TransferState::Completed,
        3 => TransferState::Rejected(reason),
        4 => TransferState::Compensated(reason),
        5 => TransferState::DeadLettered(reason),
        6 => TransferState::Resolved(reason),
        other => return Err(corrupt(format!("transfer state {other}"))),
    };
    let (from, to, amount, target) = (r.u64()?, r.u64()?, positive(r.i64()?)?, r.id()?);
    // Records written before end times were stored end here.
    let ended_at_ms = if r.remaining() == 0 { None } else { Some(r.u64()?) };
    r.done()?;
    let transfer = Transfer { state, from, to, amount, target, ended_at_ms };
    Ok(transfer)
}

pub fn encode_event(event: &Event) -> Result<Vec<u8>, Error> {
    let mut w = Writer::new();
    w.u32(event.version);
    w.text("an event id", &event.id)?;
    w.byte(match event.kind {
        EventKind::TransferDebited => 1,
        EventKind::TransferCredited => 2,
        EventKind::TransferRejected => 3,
    });
    w.text("a saga id", event.saga.as_str())?;
    w.u64(event.from);
    w.u64(event.to);
    w.i64(event.amount);
    w.text("a source participant", event.source.as_str())?;
    w.text("a target participant", event.target.as_str())?;
    w.text("an event's reason", &event.reason)?;
    if event.seq != 0 {
        w.u64(event.seq);
        // Events written before they carried a trace context end before it.
        if !event.trace_parent.is_empty() {
            w.text("an event's trace context", &event.trace_parent)?;
        }
    }
    Ok(w.finish())
}

pub fn decode_event(bytes: &[u8]) -> Result<Event, Error> {
    let mut r = Reader::new(bytes);
    let version = r.u32()?;
    let id = r.text()?;
    check_event_id(&id).map_err(corrupt)?;
    let kind = match r.byte()? {
        1 => EventKind::TransferDebited,
        2 => EventKind::TransferCredited,
        3 => EventKind::TransferRejected,
        other => return Err(corrupt(format!("event kind {other}"))),
    };
    let event = Event {
        version,
        id,
        kind,
        saga: r.id()?,
        from: r.u64()?,
        to: r.u64()?,
        amount: positive(r.i64()?)?,
        source: r.id()?,
        target: r.id()?,
        reason: r.text()?,
        seq: 0,
        trace_parent: String::new(),
    };
    // Events written before they were numbered end here.
    let seq = match r.remaining() {
        0 => 0,
        _ => match r.u64()? {
            0 => return Err(corrupt("an event's sequence number is at least 1")),
            seq => seq,
        },
    };
    // And those written before they carried a trace context, here.
    let trace_parent = if r.remaining() == 0 { String::new() } else { r.text()? };
    r.done()?;
    Ok(Event { seq, trace_parent, ..event })
}

impl Core {
    /// Rebuilds saga state from one stored record (called by recovery for
    /// every key that is not an account or a 2PC transaction). A record
    /// that does not decode, or a key of no known kind, is an error.
    pub(crate) fn recover_saga_record(&mut self, key: &[u8], value: &[u8], now_ms: u64) -> Result<(), Error> {
        let sagas = &mut self.sagas;
        if key == SUSPENSE_KEY {
            let mut r = Reader::new(value);
            let suspense = r.i64()?;
            r.done()?;
            if suspense < 0 {
                return Err(corrupt(format!("a negative suspense account {suspense}")));
            }
            sagas.suspense = suspense;
        } else if let Some(rest) = key.strip_prefix(b"b/") {
            let (kind, saga) = parse_barrier_key(rest)?;
            let barrier = decode_barrier(value)?;
            // Queued if it may be collectable; collection checks again (a
            // release it waits for is read later: its key sorts after).
            if barrier.forgotten || barrier.compensation.is_some() {
                self.finished.push_back((now_ms, Retained::Key(key.to_vec())));
            }
            // Indexed by place; a parked debit not yet released leaves the
            // index when collection meets it.
            sagas.index_barrier(&saga, kind, &barrier);
            sagas.barriers.insert((saga, kind), barrier);
        } else if let Some(rest) = key.strip_prefix(b"s/") {
            let (coordinator, incarnation) = parse_watermark_key(rest)?;
            sagas.saga_watermarks.insert((coordinator, incarnation), decode_u64(value)?);
        } else if key.starts_with(b"c/") {
            let saga = tandem::codec::id_from_key(b"c/", key)?;
            let transfer = decode_transfer(value)?;
            if transfer.state.is_collectable() {
                // Its retention counts from its end; a record written
                // before end times were stored, from now. A clock that is
                // now before the stored end (set back) counts from now.
                let ended_at_ms = transfer.ended_at_ms.map_or(now_ms, |ended| ended.min(now_ms));
                sagas.transfers_by_end.insert((ended_at_ms, saga.clone()));
            }
            sagas.count_transfer(None, &transfer);
            sagas.transfers.insert(saga, transfer);
        } else if key.starts_with(b"q/") {
            let peer = tandem::codec::id_from_key(b"q/", key)?;
            let sent = decode_u64(value)?;
            let last = sagas.sent_to.entry(peer).or_default();
            *last = (*last).max(sent);
        } else if key.starts_with(b"w/") {
            let peer = tandem::codec::id_from_key(b"w/", key)?;
            sagas.applied_from.insert(peer, decode_applied(value)?);
        } else if let Some(event_id) = key.strip_prefix(b"i/") {
            let event_id = String::from_utf8(event_id.to_vec()).map_err(|_| corrupt("an inbox key is not UTF-8"))?;
            check_event_id(&event_id).map_err(corrupt)?;
            if !value.is_empty() {
                return Err(corrupt("an inbox record holds nothing"));
            }
            sagas.inbox.insert(event_id);
            self.finished.push_back((now_ms, Retained::Key(key.to_vec())));
        } else if let Some(seq) = key.strip_prefix(b"o/") {
            let seq: [u8; 8] = seq.try_into().map_err(|_| corrupt("an outbox key holds eight bytes after o/"))?;
            let seq = u64::from_be_bytes(seq);
            let next = seq.checked_add(1).ok_or_else(|| corrupt("the outbox sequence is exhausted"))?;
            let event = decode_event(value)?;
            // The counter is written with every event it numbers (`q/`
            // sorts after `o/`: the larger of the two is kept).
            if event.seq != 0 {
                let last = sagas.sent_to.entry(event.destination().clone()).or_default();
                *last = (*last).max(event.seq);
            }
            sagas.outbox_by_destination.entry(event.destination().clone()).or_default().insert(seq);
            sagas.outbox.insert(seq, event);
            sagas.next_outbox_seq = sagas.next_outbox_seq.max(next);
            sagas.outbox_durable_end = sagas.next_outbox_seq;
        } else {
            return Err(corrupt("a key of no kind this node knows"));
        }
        Ok(())
    }

    /// Drops a retained saga record from memory; `true` if its key should be
    /// deleted from the store.
    pub(crate) fn forget_saga_record(&mut self, key: &[u8]) -> bool {
        let sagas = &mut self.sagas;
        if let Some(rest) = key.strip_prefix(b"b/") {
            let Ok((kind, saga)) = parse_barrier_key(rest) else { return false };
            // Only a compensated step, or one whose saga the orchestrator
            // said ended, is finished for good. A step whose action ran (or
            // was refused) and has no compensation may still be compensated,
            // or redelivered by an orchestrator that restarts from its log,
            // however late: its barrier is what makes that safe, so it is
            // kept (see "Retention" above).
            let closed =
                sagas.barriers.get(&(saga.clone(), kind)).is_some_and(|b| sagas.is_collectable(&saga, kind, b));
            if !closed {
                return false;
            }
            let barrier = sagas.barriers.remove(&(saga.clone(), kind)).expect("looked up above");
            sagas.unindex_barrier(&saga, kind, &barrier.place);
            return true;
        }
        // Transfers are collected after the idempotency retention
        // ([`Core::collect_sagas`]), not here.
        if let Some(event_id) = key.strip_prefix(b"i/") {
            return sagas.inbox.remove(std::str::from_utf8(event_id).unwrap_or(""));
        }
        false
    }

    /// The orchestrator says these sagas ended: their barriers may go once
    /// the retention has passed from `now_ms`. Unknown ids are ignored (a
    /// saga whose steps never reached this node). Returns how many barriers
    /// were marked.
    pub fn forget_sagas(&mut self, sagas: &[Id], now_ms: u64) -> (u32, Effects) {
        let mut ops = Vec::new();
        let mut marked = 0;
        for saga in sagas {
            for kind in [StepKind::Debit, StepKind::Credit, StepKind::Release] {
                let Some(barrier) = self.sagas.barriers.get_mut(&(saga.clone(), kind)) else { continue };
                if barrier.forgotten {
                    continue;
                }
                let marked_barrier = Barrier { forgotten: true, ..barrier.clone() };
                // A barrier whose record would not fit stays unmarked: a
                // leak, never a double step.
                let Ok(value) = encode_barrier(&marked_barrier) else { continue };
                *barrier = marked_barrier;
                let key = barrier_key(saga, kind);
                ops.push(Op::Put(key.clone(), value));
                self.finished.push_back((now_ms, Retained::Key(key)));
                marked += 1;
            }
        }
        // Unsynced: a mark lost in a crash only keeps the barrier.
        (marked, Effects { ops, durability: Durability::Buffered })
    }

    /// Saga step barriers held (each saga leaves one per step here until it
    /// is compensated or forgotten, and the retention has passed).
    pub fn barrier_count(&self) -> usize {
        self.sagas.barriers.len()
    }

    pub fn suspense(&self) -> Amount {
        self.sagas.suspense
    }

    fn suspense_put(&self) -> Op {
        Op::Put(SUSPENSE_KEY.to_vec(), self.sagas.suspense.to_le_bytes().to_vec())
    }

    /// Why `account` cannot give `amount`, if it cannot.
    fn cannot_debit(&self, id: AccountId, amount: Amount) -> Option<(Refusal, String)> {
        match self.accounts.get(&id) {
            None => Some((Refusal::UnknownAccount, format!("account {id} does not exist on {}", self.config.node_id))),
            Some(a) if a.closed => Some((Refusal::AccountClosed, format!("account {id} is closed"))),
            Some(a) if a.available() < amount => Some((
                Refusal::InsufficientFunds,
                format!("account {id} has {} available, the debit needs {amount}", a.available()),
            )),
            Some(_) => None,
        }
    }

    /// Why `account` cannot take `amount`, if it cannot.
    fn cannot_credit(&self, id: AccountId, amount: Amount) -> Option<(Refusal, String)> {
        match self.accounts.get(&id) {
            None => Some((Refusal::UnknownAccount, format!("account {id} does not exist on {}", self.config.node_id))),
            Some(a) if a.closed => Some((Refusal::AccountClosed, format!("account {id} is closed"))),
            Some(a) if a.posted.checked_add(a.incoming).and_then(|s| s.checked_add(amount)).is_none() => Some((
                Refusal::BalanceOverflow,
                format!("crediting {amount} to account {id} would overflow its balance"),
            )),
            Some(_) => None,
        }
    }

    /// Why `saga` cannot release `amount` from suspense to `account`, if it
    /// cannot: a release is only for a saga whose debit was parked here,
    /// takes exactly what that debit parked (see "Steps with barrier
    /// semantics"), and never more than the suspense account holds.
    fn cannot_release(&self, saga: &Id, account: AccountId, amount: Amount) -> Option<(Option<Refusal>, String)> {
        let parked = match self.sagas.barriers.get(&(saga.clone(), StepKind::Debit)) {
            Some(barrier) if barrier.compensation == Some(Compensation::Parked) => barrier.amount,
            _ => {
                return Some((
                    None,
                    format!(
                        "saga {saga} parked nothing in the suspense account of {}; a release is only for a debit compensated into suspense",
                        self.config.node_id
                    ),
                ))
            }
        };
        match parked {
            Some(parked) if parked != amount => {
                return Some((None, format!("saga {saga} parked {parked}; the release asks for {amount}")));
            }
            Some(_) => {}
            // Parked before barriers stored amounts: at most what the
            // suspense account holds beyond the parked amounts known here.
            None => {
                let unclaimed = self.sagas.suspense as i128 - self.parked_known_total();
                if amount as i128 > unclaimed {
                    return Some((
                        Some(Refusal::InsufficientFunds),
                        format!(
                            "the suspense account holds {unclaimed} not parked by a known saga or transfer, less than {amount}"
                        ),
                    ));
                }
            }
        }
        if self.sagas.suspense < amount {
            let why = format!("the suspense account holds {}, less than {amount}", self.sagas.suspense);
            return Some((Some(Refusal::InsufficientFunds), why));
        }
        self.cannot_credit(account, amount).map(|(refusal, why)| (Some(refusal), why))
    }

    /// What the suspense account holds for parked transfers and for parked
    /// debits not yet released whose amounts are known.
    pub(crate) fn parked_known_total(&self) -> i128 {
        let transfers: i128 = self
            .sagas
            .transfers
            .values()
            .filter(|t| matches!(t.state, TransferState::DeadLettered(_)))
            .map(|t| t.amount as i128)
            .sum();
        let debits: i128 = self
            .sagas
            .barriers
            .iter()
            .filter(|((saga, kind), barrier)| {
                *kind == StepKind::Debit
                    && barrier.compensation == Some(Compensation::Parked)
                    && !self.sagas.released(saga)
            })
            .filter_map(|(_, barrier)| barrier.amount)
            .map(i128::from)
            .sum();
        transfers + debits
    }

    /// Changes a posted balance by `delta`. Every caller checked first
    /// (`cannot_debit`, `cannot_credit`) that the account exists and the
    /// change keeps its invariants: no input reaches the assertion.
    fn change_posted(&mut self, id: AccountId, delta: Amount) -> Op {
        let account: &mut Account = self.accounts.get_mut(&id).expect("checked before");
        account.posted += delta;
        account.assert_invariants(id);
        account_put(id, account)
    }

    /// One step or compensation of an orchestrated saga whose request said
    /// nothing of its orchestrator (an older coordinator): see
    /// [`Core::saga_step_ordered`].
    pub fn saga_step(
        &mut self,
        saga: Id,
        kind: StepKind,
        phase: StepPhase,
        account: AccountId,
        amount: Amount,
        now_ms: u64,
    ) -> Result<(StepAnswer, Effects), Error> {
        self.saga_step_ordered(saga, kind, phase, account, amount, None, now_ms)
    }

    /// One step or compensation of an orchestrated saga, with what its
    /// request said of its orchestrator (`order`). What it does is decided,
    /// and its barrier encoded, before anything changes: a refusal or an
    /// error leaves the state as it was (the watermark the request carried
    /// is kept only with a step that was judged).
    ///
    /// A step below the saga watermark of its coordinator incarnation, with
    /// no barrier here, is late (see "Late steps"): an action does nothing
    /// and is REFUSED, saying so; a compensation is an empty compensation;
    /// neither leaves a record. A release keeps its own rule (it needs the
    /// parked debit's barrier, which stays until the release ran).
    #[allow(clippy::too_many_arguments)]
    pub fn saga_step_ordered(
        &mut self,
        saga: Id,
        kind: StepKind,
        phase: StepPhase,
        account: AccountId,
        amount: Amount,
        order: Option<StepOrder>,
        now_ms: u64,
    ) -> Result<(StepAnswer, Effects), Error> {
        // The incarnation's watermark, raised by this request's: judged
        // before anything changes, kept only if the step is judged.
        let mut raised = None;
        let mut place = None;
        let mut watermark = 0;
        if let Some(order) = order.filter(|order| order.incarnation != 0) {
            if !self.config.coordinators.contains(&order.coordinator) {
                return Err(Error::InvalidInput(format!(
                    "coordinator {} is not one {} was configured with (--coordinator)",
                    order.coordinator, self.config.node_id
                )));
            }
            let incarnation = (order.coordinator.clone(), order.incarnation);
            let known = self.sagas.saga_watermarks.get(&incarnation).copied();
            if known.is_none() {
                let incarnations = self
                    .sagas
                    .saga_watermarks
                    .range((order.coordinator.clone(), 0)..)
                    .take_while(|((c, _), _)| *c == order.coordinator)
                    .count();
                if incarnations >= INCARNATIONS_PER_COORDINATOR_MAX {
                    return Err(Error::Busy(format!(
                        "{} keeps the saga watermarks of {INCARNATIONS_PER_COORDINATOR_MAX} incarnations of coordinator {} and no more; incarnation {:016x} is refused",
                        self.config.node_id, order.coordinator, order.incarnation
                    )));
                }
            }
            watermark = known.unwrap_or(0).max(order.low_watermark);
            if known.is_none_or(|known| known < watermark) {
                raised = Some((incarnation, watermark));
            }
            if order.position != 0 {
                place = Some(SagaPlace {
                    coordinator: order.coordinator,
                    incarnation: order.incarnation,
                    position: order.position,
                });
            }
        }
        let late = place.as_ref().is_some_and(|place| place.position < watermark)
            && kind != StepKind::Release
            && !self.sagas.barriers.contains_key(&(saga.clone(), kind));
        let (answer, mut effects) = if late {
            let place = place.as_ref().expect("late steps have a place");
            if amount <= 0 {
                return Err(Error::InvalidInput(format!("a saga step's amount must be positive; it is {amount}")));
            }
            let outcome = match phase {
                StepPhase::Action => StepOutcome::Refused(
                    None,
                    format!(
                        "late step: saga {saga} is at position {} of coordinator {} (incarnation {:016x}), below its saga watermark {watermark} on {}: every saga there has sent its last step, and this one did nothing",
                        place.position, place.coordinator, place.incarnation, self.config.node_id
                    ),
                ),
                StepPhase::Compensation | StepPhase::CompensateToSuspense => StepOutcome::EmptyCompensation,
            };
            (StepAnswer { outcome, duplicate: false }, Effects { ops: Vec::new(), durability: Durability::Lazy })
        } else {
            self.judge_step(saga, kind, phase, account, amount, place, now_ms)?
        };
        if let Some(((coordinator, incarnation), watermark)) = raised {
            // Rides with the step's write. Lost in a crash, it goes back
            // with everything written after it (the store keeps writes in
            // order), the deletions of the barriers it passed included.
            effects.ops.push(Op::Put(watermark_key(&coordinator, incarnation), encode_u64(watermark)));
            self.sagas.saga_watermarks.insert((coordinator, incarnation), watermark);
        }
        Ok((answer, effects))
    }

    /// Judges one step against its barrier (see "Steps with barrier
    /// semantics"). `place` is recorded in a barrier it creates.
    #[allow(clippy::too_many_arguments)]
    fn judge_step(
        &mut self,
        saga: Id,
        kind: StepKind,
        phase: StepPhase,
        account: AccountId,
        amount: Amount,
        place: Option<SagaPlace>,
        now_ms: u64,
    ) -> Result<(StepAnswer, Effects), Error> {
        if amount <= 0 {
            return Err(Error::InvalidInput(format!("a saga step's amount must be positive; it is {amount}")));
        }
        match (kind, phase) {
            (StepKind::Release, StepPhase::Compensation | StepPhase::CompensateToSuspense) => {
                return Err(Error::InvalidInput("a release step has no compensation".into()))
            }
            (StepKind::Credit, StepPhase::CompensateToSuspense) => {
                return Err(Error::InvalidInput("only a debit can be compensated into suspense".into()))
            }
            _ => {}
        }
        let key = (saga.clone(), kind);
        let existing = self.sagas.barriers.get(&key).cloned();
        let is_new = existing.is_none();
        let mut barrier = existing.unwrap_or(Barrier { place, ..Barrier::default() });
        let lazy = |outcome, duplicate| {
            Ok((StepAnswer { outcome, duplicate }, Effects { ops: Vec::new(), durability: Durability::Lazy }))
        };
        // The money the step moves: into `account`, and into suspense.
        let mut posted_delta: Amount = 0;
        let mut suspense_delta: Amount = 0;
        let outcome = match phase {
            StepPhase::Action => {
                if barrier.compensation.is_some() {
                    return lazy(StepOutcome::HangingIgnored, false);
                }
                if let Some(result) = &barrier.action {
                    let outcome = match result {
                        ActionResult::Applied => StepOutcome::Applied,
                        ActionResult::Refused(refusal, reason) => StepOutcome::Refused(*refusal, reason.clone()),
                    };
                    return lazy(outcome, true);
                }
                let known = |refusal: Option<(Refusal, String)>| refusal.map(|(refusal, why)| (Some(refusal), why));
                let refusal = match kind {
                    StepKind::Debit => known(self.cannot_debit(account, amount)),
                    StepKind::Credit => known(self.cannot_credit(account, amount)),
                    StepKind::Release => self.cannot_release(&saga, account, amount),
                };
                barrier.amount = Some(amount);
                match refusal {
                    // A refused release is not recorded: the operator may
                    // fix the account and try again.
                    Some((refusal, reason)) if kind == StepKind::Release => {
                        return lazy(StepOutcome::Refused(refusal, reason), false);
                    }
                    Some((refusal, reason)) => {
                        barrier.action = Some(ActionResult::Refused(refusal, reason.clone()));
                        StepOutcome::Refused(refusal, reason)
                    }
                    None => {
                        match kind {
                            StepKind::Debit => posted_delta = -amount,
                            StepKind::Credit => posted_delta = amount,
                            StepKind::Release => {
                                suspense_delta = -amount;
                                posted_delta = amount;
                            }
                        }
                        barrier.action = Some(ActionResult::Applied);
                        StepOutcome::Applied
                    }
                }
            }
            StepPhase::Compensation | StepPhase::CompensateToSuspense => {
                if let Some(done) = barrier.compensation {
                    // The answer says what the asked-for compensation came
                    // to, not only that one ran: an orchestrator that asks
                    // to park a debit already refunded (its refund's answer
                    // was lost) must learn that nothing was parked, and one
                    // that asks for a refund of a parked debit must learn
                    // that the money is in suspense.
                    let outcome = match (done, phase) {
                        (Compensation::Empty, _) => StepOutcome::EmptyCompensation,
                        (Compensation::Refunded, StepPhase::CompensateToSuspense) => StepOutcome::EmptyCompensation,
                        (Compensation::Parked, StepPhase::Compensation) => StepOutcome::Refused(
                            None,
                            format!("the debit of {saga} was compensated into the suspense account, not refunded"),
                        ),
                        (Compensation::Refunded, _) | (Compensation::Parked, _) => StepOutcome::Applied,
                    };
                    return lazy(outcome, true);
                }
                match barrier.action {
                    // Never ran, or refused: nothing to undo; recorded so a
                    // hanging action is ignored.
                    None | Some(ActionResult::Refused(..)) => {
                        barrier.amount.get_or_insert(amount);
                        barrier.compensation = Some(Compensation::Empty);
                        StepOutcome::EmptyCompensation
                    }
                    Some(ActionResult::Applied) => {
                        // A compensation undoes what its step moved: no more,
                        // no less (unknown for barriers written before
                        // amounts were stored).
                        if let Some(moved) = barrier.amount.filter(|moved| *moved != amount) {
                            return Err(Error::InvalidInput(format!(
                                "the compensation of {saga}'s {kind:?} names {amount}; the step moved {moved}"
                            )));
                        }
                        if phase == StepPhase::CompensateToSuspense {
                            if self.sagas.suspense.checked_add(amount).is_none() {
                                let why = "the suspense account would overflow".to_string();
                                return lazy(StepOutcome::Refused(Some(Refusal::BalanceOverflow), why), false);
                            }
                            suspense_delta = amount;
                            barrier.compensation = Some(Compensation::Parked);
                        } else {
                            let refusal = match kind {
                                StepKind::Debit => self.cannot_credit(account, amount),
                                StepKind::Credit | StepKind::Release => self.cannot_debit(account, amount),
                            };
                            if let Some((refusal, reason)) = refusal {
                                // Not recorded: the compensation may be retried.
                                let why = format!("cannot compensate: {reason}");
                                return lazy(StepOutcome::Refused(Some(refusal), why), false);
                            }
                            posted_delta = if kind == StepKind::Debit { amount } else { -amount };
                            barrier.compensation = Some(Compensation::Refunded);
                        }
                        StepOutcome::Applied
                    }
                }
            }
        };
        let key_bytes = barrier_key(&saga, kind);
        if is_new && self.sagas.barriers.len() >= BARRIERS_MAX {
            return Err(Error::Busy(format!(
                "{} holds {BARRIERS_MAX} saga step barriers, its most; the step of {saga} waits until sagas end (their watermark passes them, or ForgetSagas)",
                self.config.node_id
            )));
        }
        // Encoded before anything changes: a barrier too large for its
        // record (a refusal's reason) is an error, not a half-applied step.
        let barrier_value = encode_barrier(&barrier)?;
        let mut ops = Vec::new();
        if suspense_delta != 0 {
            // Checked above: a release takes at most what suspense holds, a
            // parking does not overflow it.
            self.sagas.suspense += suspense_delta;
            ops.push(self.suspense_put());
        }
        if posted_delta != 0 {
            ops.push(self.change_posted(account, posted_delta));
        }
        ops.push(Op::Put(key_bytes.clone(), barrier_value));
        if is_new {
            self.sagas.index_barrier(&saga, kind, &barrier);
        }
        // A release lets its parked debit go once the saga ended: back in
        // the index by place it left (see `collect_sagas`).
        if kind == StepKind::Release && barrier.action == Some(ActionResult::Applied) {
            if let Some(debit) = self.sagas.barriers.get(&(saga.clone(), StepKind::Debit)).cloned() {
                self.sagas.index_barrier(&saga, StepKind::Debit, &debit);
            }
        }
        self.sagas.barriers.insert(key, barrier.clone());
        // Queued for collection once it may go (see "Retention"); a step
        // with no compensation is queued when its saga is forgotten.
        if self.sagas.is_collectable(&saga, kind, &barrier) {
            self.finished.push_back((now_ms, Retained::Key(key_bytes)));
        }
        let durability = if outcome == StepOutcome::Applied { Durability::Fsync } else { Durability::Lazy };
        Ok((StepAnswer { outcome, duplicate: false }, Effects { ops, durability }))
    }

    /// The number the next event for `peer` gets, before anything
    /// changes; `Err` if this node may number events for no more peers.
    fn next_seq_to(&self, peer: &Id) -> Result<u64, Error> {
        match self.sagas.sent_to.get(peer) {
            Some(last) => {
                last.checked_add(1).ok_or_else(|| Error::Fatal(format!("the event numbers for {peer} are exhausted")))
            }
            None if self.sagas.sent_to.len() >= SEQUENCE_PEERS_MAX => Err(Error::Busy(format!(
                "{} numbers events for {SEQUENCE_PEERS_MAX} peers and no more; none is sent to {peer}",
                self.config.node_id
            ))),
            None => Ok(1),
        }
    }

    /// Adds an event, numbered by [`Core::next_seq_to`] and encoded, to
    /// the outbox, with its peer's counter in the same write: the number is
    /// durable exactly when the event is, and the event is relayed only
    /// once durable, so a number a peer may have applied is never given to
    /// another event, whatever a crash or a power loss takes.
    fn push_event(&mut self, event: Event, value: Vec<u8>, ops: &mut Vec<Op>) {
        let seq = self.sagas.next_outbox_seq;
        self.sagas.next_outbox_seq += 1;
        let destination = event.destination().clone();
        assert_eq!(event.seq, self.next_seq_to(&destination).unwrap_or(0), "an event numbered out of turn");
        ops.push(Op::Put(sent_key(&destination), encode_u64(event.seq)));
        self.sagas.sent_to.insert(destination.clone(), event.seq);
        ops.push(Op::Put(outbox_key(seq), value));
        self.sagas.outbox_by_destination.entry(destination).or_default().insert(seq);
        self.sagas.outbox.insert(seq, event);
        self.sagas.debug_assert_outbox_index();
    }

    /// Stores a transfer's record, already encoded (and stamped: see
    /// [`Transfer::stamped`]).
    fn put_transfer(&mut self, saga: &Id, transfer: Transfer, value: Vec<u8>, ops: &mut Vec<Op>) {
        let key = transfer_key(saga);
        ops.push(Op::Put(key.clone(), value));
        if let (true, Some(ended_at_ms)) = (transfer.state.is_collectable(), transfer.ended_at_ms) {
            self.sagas.transfers_by_end.insert((ended_at_ms, saga.clone()));
        }
        let before = self.sagas.transfers.get(saga).cloned();
        self.sagas.count_transfer(before.as_ref(), &transfer);
        self.sagas.transfers.insert(saga.clone(), transfer);
    }

    /// Deletes, at most `limit` records at once: the barriers of sagas the
    /// saga watermark of their coordinator incarnation has passed (those
    /// sagas sent their last step here: no wait), and the transfers that
    /// ended `idempotency_retention_ms` or more before `now_ms`. Costs what
    /// it deletes (and the parked debits it sets aside until their release).
    pub fn collect_sagas(&mut self, now_ms: u64, idempotency_retention_ms: u64, limit: usize) -> Effects {
        let mut ops = Vec::new();
        let incarnations: Vec<((Id, u64), u64)> = self
            .sagas
            .saga_watermarks
            .iter()
            .filter(|(incarnation, _)| self.sagas.barriers_by_place.contains_key(*incarnation))
            .map(|(incarnation, watermark)| (incarnation.clone(), *watermark))
            .collect();
        for (incarnation, watermark) in incarnations {
            loop {
                if ops.len() >= limit {
                    return Effects { ops, durability: Durability::Buffered };
                }
                let Some(entries) = self.sagas.barriers_by_place.get(&incarnation) else { break };
                let Some((position, saga, kind)) = entries.first().cloned() else { break };
                if position >= watermark {
                    break;
                }
                let entry = (saga.clone(), kind);
                let place =
                    Some(SagaPlace { coordinator: incarnation.0.clone(), incarnation: incarnation.1, position });
                match self.sagas.barriers.get(&entry) {
                    Some(barrier) if barrier.place == place => {
                        if self.sagas.is_collectable(&saga, kind, barrier) {
                            self.sagas.barriers.remove(&entry);
                            ops.push(Op::Delete(barrier_key(&saga, kind)));
                        }
                        // Otherwise a parked debit not yet released: set
                        // aside until its release puts it back.
                    }
                    // Collected by the retention, or another barrier since.
                    _ => {}
                }
                self.sagas.unindex_barrier(&saga, kind, &place);
            }
        }
        while ops.len() < limit {
            let Some((ended_at_ms, saga)) = self.sagas.transfers_by_end.first().cloned() else { break };
            if ended_at_ms.saturating_add(idempotency_retention_ms) > now_ms {
                break;
            }
            self.sagas.transfers_by_end.pop_first();
            if self.sagas.transfers.get(&saga).is_some_and(|t| t.state.is_collectable()) {
                let transfer = self.sagas.transfers.remove(&saga).expect("looked up above");
                debug_assert!(transfer.state.is_terminal());
                ops.push(Op::Delete(transfer_key(&saga)));
            }
        }
        Effects { ops, durability: Durability::Buffered }
    }

    /// Starts a choreographed transfer here, at the source. `Err` is bad
    /// input; a refusal is a REJECTED transfer. A saga id this node still
    /// remembers gets its transfer back, unchanged, if the request is the
    /// same transfer (a retry), and FAILED_PRECONDITION naming what differs
    /// if it is not (the id was reused by mistake). A saga id is remembered
    /// while its transfer is in flight or parked, and for the idempotency
    /// retention after it ended ([`Core::collect_sagas`]); after that it
    /// starts a new transfer. A new transfer is refused (RESOURCE_EXHAUSTED,
    /// nothing changes) while the outbox holds [`OUTBOX_MAX`] events, or
    /// [`TRANSFERS_IN_FLIGHT_MAX`] transfers are in flight, or
    /// [`TRANSFERS_MAX`] transfer records are held. `trace_parent` goes
    /// with the debit event ([`Event::trace_parent`]).
    pub fn start_transfer(
        &mut self,
        saga: Id,
        from: AccountId,
        to: AccountId,
        amount: Amount,
        target: Id,
        trace_parent: String,
        now_ms: u64,
    ) -> Result<(Transfer, Effects), Error> {
        if let Some(existing) = self.sagas.transfers.get(&saga) {
            let differs: Vec<String> = [
                (existing.from != from).then(|| format!("from_account {from}, not {}", existing.from)),
                (existing.to != to).then(|| format!("to_account {to}, not {}", existing.to)),
                (existing.amount != amount).then(|| format!("amount {amount}, not {}", existing.amount)),
                (existing.target != target).then(|| format!("target_participant {target}, not {}", existing.target)),
            ]
            .into_iter()
            .flatten()
            .collect();
            if !differs.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "saga_id {saga} was used on {} for another transfer, remembered for the idempotency retention after it ends: this request has {}; nothing changed",
                    self.config.node_id,
                    differs.join(", ")
                )));
            }
            return Ok((existing.clone(), Effects { ops: Vec::new(), durability: Durability::Lazy }));
        }
        tandem::domain::transfer_legs(from, to, amount)?;
        if !self.accounts.contains_key(&from) {
            return Err(Error::NotFound(format!("account {from} does not exist on {}", self.config.node_id)));
        }
        let node = &self.config.node_id;
        let sagas = &self.sagas;
        if sagas.outbox.len() >= OUTBOX_MAX {
            return Err(Error::Busy(format!(
                "the outbox of {node} holds {} events, its most ({OUTBOX_MAX}): transfer {saga} was not started; try again once its peers have taken them",
                sagas.outbox.len()
            )));
        }
        if sagas.in_flight >= TRANSFERS_IN_FLIGHT_MAX {
            return Err(Error::Busy(format!(
                "{node} has {} choreographed transfers in flight, its most ({TRANSFERS_IN_FLIGHT_MAX}): transfer {saga} was not started; try again once they are answered",
                sagas.in_flight
            )));
        }
        if sagas.transfers.len() >= TRANSFERS_MAX {
            return Err(Error::Busy(format!(
                "{node} remembers {} transfers, its most ({TRANSFERS_MAX}), until their idempotency retention ends: transfer {saga} was not started",
                sagas.transfers.len()
            )));
        }
        let mut ops = Vec::new();
        if let Some((_, reason)) = self.cannot_debit(from, amount) {
            let transfer =
                Transfer { state: TransferState::Rejected(reason), from, to, amount, target, ended_at_ms: None }
                    .stamped(now_ms);
            let value = encode_transfer(&transfer)?;
            self.put_transfer(&saga, transfer.clone(), value, &mut ops);
            return Ok((transfer, Effects { ops, durability: Durability::Lazy }));
        }
        let seq = self.next_seq_to(&target)?;
        let event = Event {
            version: EVENT_VERSION,
            id: format!("{saga}:debited"),
            kind: EventKind::TransferDebited,
            saga: saga.clone(),
            from,
            to,
            amount,
            source: self.config.node_id.clone(),
            target: target.clone(),
            reason: String::new(),
            seq,
            trace_parent,
        };
        let transfer = Transfer { state: TransferState::Debited, from, to, amount, target, ended_at_ms: None };
        // Both records encoded before anything changes.
        let (event_value, transfer_value) = (encode_event(&event)?, encode_transfer(&transfer)?);
        ops.push(self.change_posted(from, -amount));
        self.push_event(event, event_value, &mut ops);
        self.put_transfer(&saga, transfer.clone(), transfer_value, &mut ops);
        Ok((transfer, Effects { ops, durability: Durability::Fsync }))
    }

    pub fn transfer(&self, saga: &Id) -> Option<&Transfer> {
        self.sagas.transfers.get(saga)
    }

    /// Applies one event from a peer. Returns whether it was a duplicate and,
    /// if a transfer started here reached a terminal state, its id. The
    /// event is checked ([`Event::check`]) and its effects decided, and
    /// every record encoded, before anything changes.
    pub fn deliver_event(&mut self, event: Event, now_ms: u64) -> Result<((bool, Option<Id>), Effects), Error> {
        event.check()?;
        if event.destination() != &self.config.node_id {
            return Err(Error::InvalidInput(format!(
                "event {} is for {}, not {}",
                event.id,
                event.destination(),
                self.config.node_id
            )));
        }
        let node = &self.config.node_id;
        let sender = event.sender().clone();
        let duplicate = || Ok(((true, None), Effects { ops: Vec::new(), durability: Durability::Lazy }));
        if event.seq == 0 {
            // From an older node: its inbox record drops a duplicate.
            if self.sagas.inbox.contains(&event.id) {
                return duplicate();
            }
            if self.sagas.inbox.len() >= INBOX_MAX {
                return Err(Error::Busy(format!(
                    "the inbox of {node} holds {INBOX_MAX} unnumbered events, its most; event {} waits until older ones are collected",
                    event.id
                )));
            }
        } else {
            let applied = self.sagas.applied_from.get(&sender);
            if applied.is_some_and(|applied| applied.has(event.seq)) {
                return duplicate();
            }
            let contiguous = applied.map_or(0, |applied| applied.contiguous);
            if event.seq - contiguous > SEQUENCE_AHEAD_MAX {
                return Err(Error::Busy(format!(
                    "event {} is number {} from {sender}, more than {SEQUENCE_AHEAD_MAX} past {contiguous}, the last {node} applied with none missing: it is held back until the events before it are applied",
                    event.id, event.seq
                )));
            }
            if applied.is_none() && self.sagas.applied_from.len() >= SEQUENCE_PEERS_MAX {
                return Err(Error::Busy(format!(
                    "{node} keeps what it applied of {SEQUENCE_PEERS_MAX} peers and no more; event {} from {sender} is refused",
                    event.id
                )));
            }
        }
        let mut ops = Vec::new();
        let mut finished = None;
        match event.kind {
            EventKind::TransferDebited => {
                let (kind, reason) = match self.cannot_credit(event.to, event.amount) {
                    None => (EventKind::TransferCredited, String::new()),
                    Some((_, reason)) => (EventKind::TransferRejected, reason),
                };
                let suffix = if kind == EventKind::TransferCredited { "credited" } else { "rejected" };
                // The answer carries the debit's trace context, as the
                // driver handed it in (its own span's).
                let answer = Event {
                    version: EVENT_VERSION,
                    id: format!("{}:{suffix}", event.saga),
                    kind,
                    reason,
                    seq: self.next_seq_to(&sender)?,
                    ..event.clone()
                };
                let value = encode_event(&answer)?;
                if kind == EventKind::TransferCredited {
                    ops.push(self.change_posted(event.to, event.amount));
                }
                self.push_event(answer, value, &mut ops);
            }
            EventKind::TransferCredited | EventKind::TransferRejected => {
                let Some(transfer) = self.sagas.transfers.get(&event.saga).cloned() else {
                    return Err(Error::NotFound(format!("no transfer {} started here", event.saga)));
                };
                // An answer is about the transfer started here: the same
                // accounts, amount and target, or it is not an answer to it.
                if (event.from, event.to, event.amount, &event.target)
                    != (transfer.from, transfer.to, transfer.amount, &transfer.target)
                {
                    return Err(Error::InvalidInput(format!(
                        "event {} does not match transfer {}: {} from {} to {} on {}, not {} from {} to {} on {}",
                        event.id,
                        event.saga,
                        event.amount,
                        event.from,
                        event.to,
                        event.target,
                        transfer.amount,
                        transfer.from,
                        transfer.to,
                        transfer.target
                    )));
                }
                if transfer.state == TransferState::Debited {
                    let (mut refund, mut park) = (false, false);
                    let state = if event.kind == EventKind::TransferCredited {
                        TransferState::Completed
                    } else if self.cannot_credit(transfer.from, transfer.amount).is_none() {
                        refund = true;
                        TransferState::Compensated(event.reason.clone())
                    } else {
                        // The refund cannot be applied: park the money. If
                        // the suspense account cannot hold it either, the
                        // event is refused unapplied (nothing changed yet):
                        // the peer's relay retries it until an operator has
                        // released parked money; the transfer stays DEBITED.
                        if self.sagas.suspense.checked_add(transfer.amount).is_none() {
                            return Err(Error::Busy(format!(
                                "the suspense account of {} holds {} and cannot park {} more for {}; release parked transfers (ResolveParkedTransfer)",
                                self.config.node_id, self.sagas.suspense, transfer.amount, event.saga
                            )));
                        }
                        park = true;
                        TransferState::DeadLettered(clip_text(
                            &format!(
                                "{}; the refund to account {} failed, {} parked in suspense",
                                event.reason, transfer.from, transfer.amount
                            ),
                            REASON_STORED_LEN_MAX,
                        ))
                    };
                    let (from, amount) = (transfer.from, transfer.amount);
                    let updated = Transfer { state, ..transfer }.stamped(now_ms);
                    let value = encode_transfer(&updated)?;
                    if refund {
                        ops.push(self.change_posted(from, amount));
                    }
                    if park {
                        self.sagas.suspense += amount;
                        ops.push(self.suspense_put());
                    }
                    self.put_transfer(&event.saga, updated, value, &mut ops);
                    finished = Some(event.saga.clone());
                }
            }
        }
        if event.seq == 0 {
            let key = inbox_key(&event.id);
            ops.push(Op::Put(key.clone(), Vec::new()));
            self.sagas.inbox.insert(event.id);
            self.finished.push_back((now_ms, Retained::Key(key)));
        } else {
            // In the same write as the event's effects: applied exactly
            // when its number is recorded.
            let applied = self.sagas.applied_from.entry(sender.clone()).or_default();
            applied.insert(event.seq);
            ops.push(Op::Put(applied_key(&sender), encode_applied(applied)));
        }
        Ok(((false, finished), Effects { ops, durability: Durability::Fsync }))
    }

    /// Outbox events on disk and not yet delivered, oldest first: the
    /// whole outbox, cloned, for tests (the relay takes one peer's next
    /// events from the index: [`Core::outbox_batch`]).
    #[cfg(test)]
    pub(crate) fn outbox(&self) -> Vec<(u64, Event)> {
        self.sagas.outbox.range(..self.sagas.outbox_durable_end).map(|(seq, e)| (*seq, e.clone())).collect()
    }

    /// The participants that outbox events on disk wait for, in order.
    pub fn outbox_destinations(&self) -> Vec<Id> {
        let durable_end = self.sagas.outbox_durable_end;
        self.sagas
            .outbox_by_destination
            .iter()
            .filter(|(_, seqs)| seqs.first().is_some_and(|first| *first < durable_end))
            .map(|(destination, _)| destination.clone())
            .collect()
    }

    /// The outbox events on disk for `destination` from sequence `from_seq`
    /// on, oldest first, at most `max`: what the relay sends that peer next.
    /// Costs what it returns, whatever the outbox holds for other peers.
    pub fn outbox_batch(&self, destination: &Id, from_seq: u64, max: usize) -> Vec<(u64, Event)> {
        let Some(seqs) = self.sagas.outbox_by_destination.get(destination) else { return Vec::new() };
        seqs.range(from_seq..self.sagas.outbox_durable_end.max(from_seq))
            .take(max)
            .map(|seq| {
                let event = &self.sagas.outbox[seq];
                debug_assert_eq!(event.destination(), destination);
                (*seq, event.clone())
            })
            .collect()
    }

    /// The sequence the next outbox event will get.
    pub fn outbox_end(&self) -> u64 {
        self.sagas.next_outbox_seq
    }

    /// Whether some outbox event is not yet known to be on disk (written,
    /// but the fsync that covers it has not been seen by the relay).
    pub fn outbox_awaits_durability(&self) -> bool {
        self.sagas.outbox_durable_end < self.sagas.next_outbox_seq
    }

    /// Every outbox event below `end` is on disk.
    pub fn mark_outbox_durable(&mut self, end: u64) {
        self.sagas.outbox_durable_end = self.sagas.outbox_durable_end.max(end);
    }

    /// The peer acknowledged these outbox events: forget them.
    pub fn outbox_delivered(&mut self, seqs: &[u64]) -> Effects {
        let sagas = &mut self.sagas;
        let mut ops = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let Some(event) = sagas.outbox.remove(seq) else { continue };
            let destination = event.destination();
            let by_destination = sagas.outbox_by_destination.get_mut(destination).expect("the index holds the outbox");
            assert!(by_destination.remove(seq), "outbox event {seq} was not in the index for {destination}");
            if by_destination.is_empty() {
                sagas.outbox_by_destination.remove(destination);
            }
            ops.push(Op::Delete(outbox_key(*seq)));
        }
        sagas.debug_assert_outbox_index();
        Effects { ops, durability: Durability::Buffered }
    }

    pub fn outbox_len(&self) -> usize {
        self.sagas.outbox.len()
    }

    /// Choreographed transfers started here whose refund could not be
    /// applied: their money waits in the suspense account (dead letters).
    pub fn parked_transfers(&self) -> Vec<(Id, Transfer)> {
        let mut parked: Vec<(Id, Transfer)> = self
            .sagas
            .transfers
            .iter()
            .filter(|(_, t)| matches!(t.state, TransferState::DeadLettered(_)))
            .map(|(saga, t)| (saga.clone(), t.clone()))
            .collect();
        parked.sort_by(|a, b| a.0.cmp(&b.0));
        parked
    }

    /// An operator releases a parked transfer's money from suspense to
    /// `to_account` (`None`: the transfer's source account), in one write
    /// of the balance, the suspense and the transfer, now RESOLVED; its
    /// reason ends with `decision` (who and why,
    /// [`tandem::trust::operator_decision`]).
    pub fn resolve_parked_transfer(
        &mut self,
        saga: &Id,
        to_account: Option<AccountId>,
        decision: &str,
        now_ms: u64,
    ) -> Result<(Transfer, Effects), Error> {
        let node = self.config.node_id.clone();
        let transfer = self
            .sagas
            .transfers
            .get(saga)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no transfer {saga} started on {node}")))?;
        let TransferState::DeadLettered(reason) = &transfer.state else {
            return Err(Error::InvalidInput(format!("{saga} is not a parked transfer ({:?})", transfer.state)));
        };
        let to = to_account.unwrap_or(transfer.from);
        if let Some((_, why)) = self.cannot_credit(to, transfer.amount) {
            return Err(Error::InvalidInput(format!(
                "cannot release {saga}'s {} to account {to}: {why}",
                transfer.amount
            )));
        }
        // The suspense account holds every parked transfer; if it holds
        // less (a node whose suspense was drained before releases were
        // checked), this node's records disagree: refuse, change nothing.
        if self.sagas.suspense < transfer.amount {
            return Err(Error::Fatal(format!(
                "the suspense account of {node} holds {}, less than the {} that {saga} parked there; its records disagree, and nothing was released",
                self.sagas.suspense, transfer.amount
            )));
        }
        let state = TransferState::Resolved(clip_text(
            &format!("{reason}; released to account {to} {decision}"),
            REASON_STORED_LEN_MAX,
        ));
        let resolved = Transfer { state, ..transfer }.stamped(now_ms);
        let value = encode_transfer(&resolved)?;
        self.sagas.suspense -= resolved.amount;
        let mut ops = vec![self.suspense_put(), self.change_posted(to, resolved.amount)];
        self.put_transfer(saga, resolved.clone(), value, &mut ops);
        Ok((resolved, Effects { ops, durability: Durability::Fsync }))
    }

    /// Transfers started here and not yet terminal.
    pub fn transfers_in_flight(&self) -> usize {
        debug_assert_eq!(
            self.sagas.in_flight,
            self.sagas.transfers.values().filter(|t| !t.state.is_terminal()).count()
        );
        self.sagas.in_flight
    }

    /// Transfer records held: in flight, parked, or kept for the
    /// idempotency retention.
    pub fn transfer_count(&self) -> usize {
        self.sagas.transfers.len()
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
