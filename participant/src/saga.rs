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
//! # Choreographed transfers
//!
//! No controller: [`Core::start_transfer`] debits the source and puts a
//! `TransferDebited` event in the outbox in the same atomic write. The node's
//! relay delivers outbox events at least once; [`Core::deliver_event`] drops
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
//! the bench's audits measure); at quiescence nothing is in flight.

use crate::core::{account_put, Account, Core, Effects, Refusal, Retained};
use std::collections::{BTreeMap, HashMap, HashSet};
use tandem::domain::{AccountId, Amount, Id};
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

    fn from_code(code: u8) -> StepKind {
        match code {
            b'd' => StepKind::Debit,
            b'c' => StepKind::Credit,
            b'r' => StepKind::Release,
            other => panic!("corrupt barrier key: step {other}"),
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
    /// (a refund asked for after the debit was parked), and for an action
    /// refused by a node that did not record why.
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
}

impl Barrier {
    /// Whether it may go after the retention: its step was compensated, or
    /// the orchestrator said the saga ended.
    fn is_collectable(&self) -> bool {
        self.compensation.is_some() || self.forgotten
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

fn put_text(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u16).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        assert!(self.0.len() >= n, "corrupt saga record: truncated");
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    fn byte(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn text(&mut self) -> String {
        let len = u16::from_le_bytes(self.take(2).try_into().unwrap()) as usize;
        String::from_utf8(self.take(len).to_vec()).expect("corrupt saga record: text")
    }
    fn id(&mut self) -> Id {
        Id::parse("id", &self.text()).expect("corrupt saga record: id")
    }
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
    }
}

fn refusal_from_code(code: u8) -> Option<Refusal> {
    match code {
        0 => None,
        1 => Some(Refusal::InsufficientFunds),
        2 => Some(Refusal::UnknownAccount),
        3 => Some(Refusal::BalanceOverflow),
        4 => Some(Refusal::AlreadyAborted),
        5 => Some(Refusal::UnknownCoordinator),
        6 => Some(Refusal::ConflictingPrepare),
        7 => Some(Refusal::AccountClosed),
        other => panic!("corrupt barrier: refusal {other}"),
    }
}

fn encode_barrier(barrier: &Barrier) -> Vec<u8> {
    let mut out = Vec::new();
    match &barrier.action {
        None => out.push(0),
        Some(ActionResult::Applied) => out.push(1),
        Some(ActionResult::Refused(refusal, reason)) => {
            out.push(3);
            out.push(refusal_code(*refusal));
            put_text(&mut out, reason);
        }
    }
    out.push(match barrier.compensation {
        None => 0,
        Some(Compensation::Refunded) => 1,
        Some(Compensation::Empty) => 2,
        Some(Compensation::Parked) => 3,
    });
    if barrier.forgotten {
        out.push(1);
    }
    out
}

fn decode_barrier(bytes: &[u8]) -> Barrier {
    let mut r = Reader(bytes);
    let action = match r.byte() {
        0 => None,
        1 => Some(ActionResult::Applied),
        // Written before refusals were recorded with their kind.
        2 => Some(ActionResult::Refused(None, r.text())),
        3 => {
            let refusal = refusal_from_code(r.byte());
            Some(ActionResult::Refused(refusal, r.text()))
        }
        other => panic!("corrupt barrier: action {other}"),
    };
    let compensation = match r.byte() {
        0 => None,
        1 => Some(Compensation::Refunded),
        2 => Some(Compensation::Empty),
        3 => Some(Compensation::Parked),
        other => panic!("corrupt barrier: compensation {other}"),
    };
    // Barriers written before sagas could be forgotten end here.
    let forgotten = !r.0.is_empty() && r.byte() == 1;
    Barrier { action, compensation, forgotten }
}

fn encode_transfer(transfer: &Transfer) -> Vec<u8> {
    let mut out = Vec::new();
    let (code, reason) = match &transfer.state {
        TransferState::Debited => (1, ""),
        TransferState::Completed => (2, ""),
        TransferState::Rejected(r) => (3, r.as_str()),
        TransferState::Compensated(r) => (4, r.as_str()),
        TransferState::DeadLettered(r) => (5, r.as_str()),
        TransferState::Resolved(r) => (6, r.as_str()),
    };
    out.push(code);
    put_text(&mut out, reason);
    out.extend_from_slice(&transfer.from.to_le_bytes());
    out.extend_from_slice(&transfer.to.to_le_bytes());
    out.extend_from_slice(&transfer.amount.to_le_bytes());
    put_text(&mut out, transfer.target.as_str());
    out
}

fn decode_transfer(bytes: &[u8]) -> Transfer {
    let mut r = Reader(bytes);
    let code = r.byte();
    let reason = r.text();
    let state = match code {
        1 => TransferState::Debited,
        2 => TransferState::Completed,
        3 => TransferState::Rejected(reason),
        4 => TransferState::Compensated(reason),
        5 => TransferState::DeadLettered(reason),
        6 => TransferState::Resolved(reason),
        other => panic!("corrupt transfer record: state {other}"),
    };
    Transfer { state, from: r.u64(), to: r.u64(), amount: r.i64(), target: r.id() }
}

pub fn encode_event(event: &Event) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&event.version.to_le_bytes());
    put_text(&mut out, &event.id);
    out.push(match event.kind {
        EventKind::TransferDebited => 1,
        EventKind::TransferCredited => 2,
        EventKind::TransferRejected => 3,
    });
    put_text(&mut out, event.saga.as_str());
    out.extend_from_slice(&event.from.to_le_bytes());
    out.extend_from_slice(&event.to.to_le_bytes());
    out.extend_from_slice(&event.amount.to_le_bytes());
    put_text(&mut out, event.source.as_str());
    put_text(&mut out, event.target.as_str());
    put_text(&mut out, &event.reason);
    out
}

pub fn decode_event(bytes: &[u8]) -> Event {
    let mut r = Reader(bytes);
    let version = u32::from_le_bytes(r.take(4).try_into().unwrap());
    let id = r.text();
    let kind = match r.byte() {
        1 => EventKind::TransferDebited,
        2 => EventKind::TransferCredited,
        3 => EventKind::TransferRejected,
        other => panic!("corrupt outbox event: kind {other}"),
    };
    Event {
        version,
        id,
        kind,
        saga: r.id(),
        from: r.u64(),
        to: r.u64(),
        amount: r.i64(),
        source: r.id(),
        target: r.id(),
        reason: r.text(),
    }
}

impl Core {
    /// Rebuilds saga state from one stored record (called by recovery for
    /// every key that is not an account or a 2PC transaction).
    pub(crate) fn recover_saga_record(&mut self, key: &[u8], value: &[u8], now_ms: u64) {
        let sagas = &mut self.sagas;
        if key == SUSPENSE_KEY {
            sagas.suspense = i64::from_le_bytes(value.try_into().expect("corrupt suspense record"));
        } else if let Some(rest) = key.strip_prefix(b"b/") {
            let kind = StepKind::from_code(rest[0]);
            let saga =
                Id::parse("saga", std::str::from_utf8(&rest[2..]).expect("corrupt barrier key")).expect("corrupt");
            let barrier = decode_barrier(value);
            if barrier.is_collectable() {
                self.finished.push_back((now_ms, Retained::Key(key.to_vec())));
            }
            sagas.barriers.insert((saga, kind), barrier);
        } else if let Some(saga) = key.strip_prefix(b"c/") {
            let saga = Id::parse("saga", std::str::from_utf8(saga).expect("corrupt transfer key")).expect("corrupt");
            let transfer = decode_transfer(value);
            if transfer.state.is_collectable() {
                self.finished.push_back((now_ms, Retained::Key(key.to_vec())));
            }
            sagas.transfers.insert(saga, transfer);
        } else if let Some(event_id) = key.strip_prefix(b"i/") {
            sagas.inbox.insert(String::from_utf8(event_id.to_vec()).expect("corrupt inbox key"));
            self.finished.push_back((now_ms, Retained::Key(key.to_vec())));
        } else if let Some(seq) = key.strip_prefix(b"o/") {
            let seq = u64::from_be_bytes(seq.try_into().expect("corrupt outbox key"));
            sagas.outbox.insert(seq, decode_event(value));
            sagas.next_outbox_seq = sagas.next_outbox_seq.max(seq + 1);
            sagas.outbox_durable_end = sagas.next_outbox_seq;
        }
    }

    /// Drops a retained saga record from memory; `true` if its key should be
    /// deleted from the store.
    pub(crate) fn forget_saga_record(&mut self, key: &[u8]) -> bool {
        let sagas = &mut self.sagas;
        if let Some(rest) = key.strip_prefix(b"b/") {
            let kind = StepKind::from_code(rest[0]);
            let Ok(saga) = Id::parse("saga", std::str::from_utf8(&rest[2..]).unwrap_or("")) else { return false };
            // Only a compensated step, or one whose saga the orchestrator
            // said ended, is finished for good. A step whose action ran (or
            // was refused) and has no compensation may still be compensated,
            // or redelivered by an orchestrator that restarts from its log,
            // however late: its barrier is what makes that safe, so it is
            // kept (see "Retention" above).
            let closed = sagas.barriers.get(&(saga.clone(), kind)).is_some_and(Barrier::is_collectable);
            return closed && sagas.barriers.remove(&(saga, kind)).is_some();
        }
        if let Some(saga) = key.strip_prefix(b"c/") {
            let Ok(saga) = Id::parse("saga", std::str::from_utf8(saga).unwrap_or("")) else { return false };
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
                barrier.forgotten = true;
                let key = barrier_key(saga, kind);
                ops.push(Op::Put(key.clone(), encode_barrier(barrier)));
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

    fn change_posted(&mut self, id: AccountId, delta: Amount) -> Op {
        let account: &mut Account = self.accounts.get_mut(&id).expect("checked before");
        account.posted += delta;
        account.assert_invariants(id);
        account_put(id, account)
    }

    /// One step or compensation of an orchestrated saga.
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
        let mut ops = Vec::new();
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
                let refusal = match kind {
                    StepKind::Debit => self.cannot_debit(account, amount),
                    StepKind::Credit => self.cannot_credit(account, amount),
                    StepKind::Release => {
                        if self.sagas.suspense < amount {
                            let why = format!("the suspense account holds {}, less than {amount}", self.sagas.suspense);
                            Some((Refusal::InsufficientFunds, why))
                        } else {
                            self.cannot_credit(account, amount)
                        }
                    }
                };
                match refusal {
                    // A refused release is not recorded: the operator may
                    // fix the account and try again.
                    Some((refusal, reason)) if kind == StepKind::Release => {
                        return lazy(StepOutcome::Refused(Some(refusal), reason), false);
                    }
                    Some((refusal, reason)) => {
                        barrier.action = Some(ActionResult::Refused(Some(refusal), reason.clone()));
                        StepOutcome::Refused(Some(refusal), reason)
                    }
                    None => {
                        match kind {
                            StepKind::Debit => ops.push(self.change_posted(account, -amount)),
                            StepKind::Credit => ops.push(self.change_posted(account, amount)),
                            StepKind::Release => {
                                self.sagas.suspense -= amount;
                                ops.push(self.suspense_put());
                                ops.push(self.change_posted(account, amount));
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
                        barrier.compensation = Some(Compensation::Empty);
                        StepOutcome::EmptyCompensation
                    }
                    Some(ActionResult::Applied) if phase == StepPhase::CompensateToSuspense => {
                        let Some(suspense) = self.sagas.suspense.checked_add(amount) else {
                            let why = "the suspense account would overflow".to_string();
                            return lazy(StepOutcome::Refused(Some(Refusal::BalanceOverflow), why), false);
                        };
                        self.sagas.suspense = suspense;
                        ops.push(self.suspense_put());
                        barrier.compensation = Some(Compensation::Parked);
                        StepOutcome::Applied
                    }
                    Some(ActionResult::Applied) => {
                        let refusal = match kind {
                            StepKind::Debit => self.cannot_credit(account, amount),
                            StepKind::Credit => self.cannot_debit(account, amount),
                            StepKind::Release => unreachable!("refused above"),
                        };
                        if let Some((refusal, reason)) = refusal {
                            // Not recorded: the compensation may be retried.
                            let why = format!("cannot compensate: {reason}");
                            return lazy(StepOutcome::Refused(Some(refusal), why), false);
                        }
                        let delta = if kind == StepKind::Debit { amount } else { -amount };
                        ops.push(self.change_posted(account, delta));
                        barrier.compensation = Some(Compensation::Refunded);
                        StepOutcome::Applied
                    }
                }
            }
        };
        let key_bytes = barrier_key(&saga, kind);
        ops.push(Op::Put(key_bytes.clone(), encode_barrier(&barrier)));
        // Queued for collection once it may go (see "Retention"); a step
        // with no compensation is queued when its saga is forgotten.
        if barrier.is_collectable() {
            self.finished.push_back((now_ms, Retained::Key(key_bytes)));
        }
        self.sagas.barriers.insert(key, barrier);
        let durability = if outcome == StepOutcome::Applied { Durability::Fsync } else { Durability::Lazy };
        Ok((StepAnswer { outcome, duplicate: false }, Effects { ops, durability }))
    }

    fn push_event(&mut self, event: Event, ops: &mut Vec<Op>) {
        let seq = self.sagas.next_outbox_seq;
        self.sagas.next_outbox_seq += 1;
        ops.push(Op::Put(outbox_key(seq), encode_event(&event)));
        self.sagas.outbox.insert(seq, event);
    }

    fn put_transfer(&mut self, saga: &Id, transfer: Transfer, now_ms: u64, ops: &mut Vec<Op>) {
        let key = transfer_key(saga);
        ops.push(Op::Put(key.clone(), encode_transfer(&transfer)));
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
            self.put_transfer(&saga, transfer.clone(), now_ms, &mut ops);
            return Ok((transfer, Effects { ops, durability: Durability::Lazy }));
        }
        ops.push(self.change_posted(from, -amount));
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
        self.push_event(event, &mut ops);
        let transfer = Transfer { state: TransferState::Debited, from, to, amount, target };
        self.put_transfer(&saga, transfer.clone(), now_ms, &mut ops);
        Ok((transfer, Effects { ops, durability: Durability::Fsync }))
    }

    pub fn transfer(&self, saga: &Id) -> Option<&Transfer> {
        self.sagas.transfers.get(saga)
    }

    /// Applies one event from a peer. Returns whether it was a duplicate and,
    /// if a transfer started here reached a terminal state, its id.
    pub fn deliver_event(&mut self, event: Event, now_ms: u64) -> Result<((bool, Option<Id>), Effects), Error> {
        if event.version == 0 {
            return Err(Error::InvalidInput("an event needs a schema version".into()));
        }
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
                    None => {
                        ops.push(self.change_posted(event.to, event.amount));
                        (EventKind::TransferCredited, String::new())
                    }
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
                self.push_event(answer, &mut ops);
            }
            EventKind::TransferCredited | EventKind::TransferRejected => {
                let Some(transfer) = self.sagas.transfers.get(&event.saga).cloned() else {
                    return Err(Error::NotFound(format!("no transfer {} started here", event.saga)));
                };
                if transfer.state == TransferState::Debited {
                    let state = if event.kind == EventKind::TransferCredited {
                        TransferState::Completed
                    } else if self.cannot_credit(transfer.from, transfer.amount).is_none() {
                        ops.push(self.change_posted(transfer.from, transfer.amount));
                        TransferState::Compensated(event.reason.clone())
                    } else {
                        // The refund cannot be applied: park the money. If
                        // the suspense account cannot hold it either, the
                        // event is refused unapplied (nothing changed yet):
                        // the peer's relay retries it until an operator has
                        // released parked money; the transfer stays DEBITED.
                        let Some(suspense) = self.sagas.suspense.checked_add(transfer.amount) else {
                            return Err(Error::Busy(format!(
                                "the suspense account of {} holds {} and cannot park {} more for {}; release parked transfers (ResolveParkedTransfer)",
                                self.config.node_id, self.sagas.suspense, transfer.amount, event.saga
                            )));
                        };
                        self.sagas.suspense = suspense;
                        ops.push(self.suspense_put());
                        TransferState::DeadLettered(format!(
                            "{}; the refund to account {} failed, {} parked in suspense",
                            event.reason, transfer.from, transfer.amount
                        ))
                    };
                    self.put_transfer(&event.saga, Transfer { state, ..transfer }, now_ms, &mut ops);
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
        let ops = seqs
            .iter()
            .filter(|seq| self.sagas.outbox.remove(seq).is_some())
            .map(|seq| Op::Delete(outbox_key(*seq)))
            .collect();
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
        assert!(self.sagas.suspense >= transfer.amount, "the suspense account holds every parked transfer");
        self.sagas.suspense -= transfer.amount;
        let mut ops = vec![self.suspense_put(), self.change_posted(to, transfer.amount)];
        let state = TransferState::Resolved(format!("{reason}; released to account {to} by an operator"));
        let resolved = Transfer { state, ..transfer };
        self.put_transfer(saga, resolved.clone(), now_ms, &mut ops);
        Ok((resolved, Effects { ops, durability: Durability::Fsync }))
    }

    /// Transfers started here and not yet terminal.
    pub fn transfers_in_flight(&self) -> usize {
        self.sagas.transfers.values().filter(|t| !t.state.is_terminal()).count()
    }
}

#[cfg(test)]
mod tests;
