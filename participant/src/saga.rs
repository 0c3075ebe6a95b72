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
//! from an index by destination ([`Core::outbox_batch`]), so that a peer
//! that is down holds up no other; [`Core::deliver_event`] drops
//! a duplicate through the inbox (an `i/<event id>` record written with the
//! event's effects), credits the target and answers `TransferCredited`, or
//! `TransferRejected`, on which the source refunds (or, if the refund cannot
//! be applied, parks the money in suspense: a dead letter). Each event has a
//! schema version; readers accept every version whose kind they know.
//!
//! # Retention
//!
//! Finished records are deleted after the node's retention
//! (`finished_retention_ms`), with one exception: the barrier of a step
//! whose action ran or was refused and that has no compensation is kept for
//! good. This node cannot tell a completed saga from one whose orchestrator
//! is still waiting (for a participant that is down, or to restart), and
//! deleting that barrier would turn a late refund into an empty
//! compensation (money lost) or a redelivered action into a second one.
//! So the orchestrator tells its participants when a saga has ended (its
//! outcome durable in its log): [`Core::forget_sagas`] marks the saga's
//! barriers, and they go after the retention counted from then (a step of
//! the saga still on its way meets its barrier until then). A saga whose
//! forget never arrives (the orchestrator crashed before sending it) keeps
//! its barriers: a leak, never a double step. Inbox and transfer records
//! follow the retention (a parked transfer waits for its operator): a
//! redelivery later than that (a link cut for longer) would be applied
//! again, the same caveat as for 2PC records (`core.rs`).
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

    /// Whether `barrier`, of `saga`, may go after the retention: its step
    /// was refunded or had nothing to undo, or the orchestrator said the
    /// saga ended. A debit parked in suspense waits for its release as well
    /// (the orchestrator forgets a dead letter only once it is resolved, but
    /// a forget that came first must not take away what allows the release).
    fn is_collectable(&self, saga: &Id, barrier: &Barrier) -> bool {
        match barrier.compensation {
            Some(Compensation::Parked) => barrier.forgotten && self.released(saga),
            Some(Compensation::Refunded | Compensation::Empty) => true,
            None => barrier.forgotten,
        }
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
    transfers: HashMap<Id, Transfer>,
    inbox: HashSet<String>,
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

fn refusal_code(refusal: Option<Refusal>) -> u8 {
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
    }
}

fn refusal_from_code(code: u8) -> Result<Option<Refusal>, Error> {
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
        other => return Err(corrupt(format!("barrier refusal {other}"))),
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
    // written before amounts were stored end after the flag.
    let (forgotten, amount) = match r.remaining() {
        0 => (false, None),
        1 => (flag(r.byte()?)?, None),
        _ => (flag(r.byte()?)?, Some(positive(r.i64()?)?)),
    };
    r.done()?;
    Ok(Barrier { action, compensation, forgotten, amount })
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
    let transfer = Transfer { state, from: r.u64()?, to: r.u64()?, amount: positive(r.i64()?)?, target: r.id()? };
    r.done()?;
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
    };
    r.done()?;
    Ok(event)
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
            sagas.barriers.insert((saga, kind), barrier);
        } else if key.starts_with(b"c/") {
            let saga = tandem::codec::id_from_key(b"c/", key)?;
            let transfer = decode_transfer(value)?;
            if transfer.state.is_collectable() {
                self.finished.push_back((now_ms, Retained::Key(key.to_vec())));
            }
            sagas.transfers.insert(saga, transfer);
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
            let closed = sagas.barriers.get(&(saga.clone(), kind)).is_some_and(|b| sagas.is_collectable(&saga, b));
            return closed && sagas.barriers.remove(&(saga, kind)).is_some();
        }
        if key.starts_with(b"c/") {
            let Ok(saga) = tandem::codec::id_from_key(b"c/", key) else { return false };
            if sagas.transfers.get(&saga).is_some_and(|t| t.state.is_collectable()) {
                sagas.transfers.remove(&saga);
                return true;
            }
            return false;
        }
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

    /// One step or compensation of an orchestrated saga. What it does is
    /// decided, and its barrier encoded, before anything changes: a refusal
    /// or an error leaves the state as it was.
    pub fn saga_step(
        &mut self,
        saga: Id,
        kind: StepKind,
        phase: StepPhase,
        account: AccountId,
        amount: Amount,
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
        let mut barrier = existing.unwrap_or_default();
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
        // Queued for collection once it may go (see "Retention"); a step
        // with no compensation is queued when its saga is forgotten.
        if self.sagas.is_collectable(&saga, &barrier) {
            self.finished.push_back((now_ms, Retained::Key(key_bytes)));
        }
        self.sagas.barriers.insert(key, barrier);
        let durability = if outcome == StepOutcome::Applied { Durability::Fsync } else { Durability::Lazy };
        Ok((StepAnswer { outcome, duplicate: false }, Effects { ops, durability }))
    }

    /// Adds an event, already encoded, to the outbox.
    fn push_event(&mut self, event: Event, value: Vec<u8>, ops: &mut Vec<Op>) {
        let seq = self.sagas.next_outbox_seq;
        self.sagas.next_outbox_seq += 1;
        ops.push(Op::Put(outbox_key(seq), value));
        self.sagas.outbox_by_destination.entry(event.destination().clone()).or_default().insert(seq);
        self.sagas.outbox.insert(seq, event);
        self.sagas.debug_assert_outbox_index();
    }

    /// Stores a transfer's record, already encoded.
    fn put_transfer(&mut self, saga: &Id, transfer: Transfer, value: Vec<u8>, now_ms: u64, ops: &mut Vec<Op>) {
        let key = transfer_key(saga);
        ops.push(Op::Put(key.clone(), value));
        if transfer.state.is_collectable() {
            self.finished.push_back((now_ms, Retained::Key(key)));
        }
        self.sagas.transfers.insert(saga.clone(), transfer);
    }

    /// Starts a choreographed transfer here, at the source. `Err` is bad
    /// input; a refusal is a REJECTED transfer. A saga id this node still
    /// remembers gets its transfer back, unchanged, if the request is the
    /// same transfer (a retry), and INVALID_ARGUMENT naming what differs if
    /// it is not (the id was reused by mistake).
    pub fn start_transfer(
        &mut self,
        saga: Id,
        from: AccountId,
        to: AccountId,
        amount: Amount,
        target: Id,
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
                return Err(Error::InvalidInput(format!(
                    "saga_id {saga} was used on {} for another transfer: this request has {}",
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
        let mut ops = Vec::new();
        if let Some((_, reason)) = self.cannot_debit(from, amount) {
            let transfer = Transfer { state: TransferState::Rejected(reason), from, to, amount, target };
            let value = encode_transfer(&transfer)?;
            self.put_transfer(&saga, transfer.clone(), value, now_ms, &mut ops);
            return Ok((transfer, Effects { ops, durability: Durability::Lazy }));
        }
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
        };
        let transfer = Transfer { state: TransferState::Debited, from, to, amount, target };
        // Both records encoded before anything changes.
        let (event_value, transfer_value) = (encode_event(&event)?, encode_transfer(&transfer)?);
        ops.push(self.change_posted(from, -amount));
        self.push_event(event, event_value, &mut ops);
        self.put_transfer(&saga, transfer.clone(), transfer_value, now_ms, &mut ops);
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
        if self.sagas.inbox.contains(&event.id) {
            return Ok(((true, None), Effects { ops: Vec::new(), durability: Durability::Lazy }));
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
                let answer = Event {
                    version: EVENT_VERSION,
                    id: format!("{}:{suffix}", event.saga),
                    kind,
                    reason,
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
                    let updated = Transfer { state, ..transfer };
                    let value = encode_transfer(&updated)?;
                    if refund {
                        ops.push(self.change_posted(from, amount));
                    }
                    if park {
                        self.sagas.suspense += amount;
                        ops.push(self.suspense_put());
                    }
                    self.put_transfer(&event.saga, updated, value, now_ms, &mut ops);
                    finished = Some(event.saga.clone());
                }
            }
        }
        let key = inbox_key(&event.id);
        ops.push(Op::Put(key.clone(), Vec::new()));
        self.sagas.inbox.insert(event.id);
        self.finished.push_back((now_ms, Retained::Key(key)));
        Ok(((false, finished), Effects { ops, durability: Durability::Fsync }))
    }

    /// Outbox events on disk and not yet delivered, oldest first.
    pub fn outbox(&self) -> Vec<(u64, Event)> {
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
    /// of the balance, the suspense and the transfer, now RESOLVED.
    pub fn resolve_parked_transfer(
        &mut self,
        saga: &Id,
        to_account: Option<AccountId>,
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
            &format!("{reason}; released to account {to} by an operator"),
            REASON_STORED_LEN_MAX,
        ));
        let resolved = Transfer { state, ..transfer };
        let value = encode_transfer(&resolved)?;
        self.sagas.suspense -= resolved.amount;
        let mut ops = vec![self.suspense_put(), self.change_posted(to, resolved.amount)];
        self.put_transfer(saga, resolved.clone(), value, now_ms, &mut ops);
        Ok((resolved, Effects { ops, durability: Durability::Fsync }))
    }

    /// Transfers started here and not yet terminal.
    pub fn transfers_in_flight(&self) -> usize {
        self.sagas.transfers.values().filter(|t| !t.state.is_terminal()).count()
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
