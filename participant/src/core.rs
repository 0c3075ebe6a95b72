//! The participant's protocol core: the ledger of one bank shard and its
//! side of two-phase commit (presumed abort), with no I/O.
//!
//! # The protocol, from here
//!
//! Every call takes the current state and a request, changes the state in
//! memory, and returns the answer together with the [`Op`]s that must reach
//! the store, and whether they must be fsynced before the answer is sent
//! ([`Effects`]). The driver (`node.rs`) submits the ops to the store under
//! the same lock that guards this core, so disk and memory change in the same
//! order, and sends the answer only once the store says the ops are durable.
//!
//! - **Prepare** validates the legs, reserves the debits and promises the
//!   credits, and records the transaction as PREPARED. A YES vote is sent
//!   only after that record is fsynced. A NO vote records an ABORTED
//!   tombstone (unsynced: losing it is safe, the coordinator aborts anyway)
//!   so that duplicates of the prepare keep getting NO.
//! - **Commit** posts the legs, releases the reservation, records COMMITTED,
//!   and is acknowledged only once that record is fsynced: once acknowledged,
//!   the coordinator may forget the transaction, so this node must never ask
//!   again. The record does not force an fsync of its own: it rides on the
//!   next prepare's fsync (the store's lazy durability), so at one client
//!   the next transaction's prepare does not wait behind a commit's fsync.
//! - **Abort** releases the reservation and records ABORTED (unsynced: if it
//!   is lost, the node comes back PREPARED, asks the coordinator, and hears
//!   ABORT). An abort for an unknown transaction leaves an ABORTED tombstone
//!   so a late prepare cannot reserve funds.
//! - **One-phase commit** ([`Core::commit_one_phase`]): a transaction
//!   whose legs all live on this node is sent here once. It is judged as a
//!   prepare is; accepted, its legs are posted and it is recorded
//!   COMMITTED in one write, fsynced before the answer; refused, nothing
//!   changes but an ABORTED record of the refusal (its reason kept), which
//!   an fsync covers before the answer. Either record is stamped like a
//!   2PC record, kept until the coordinator's watermark passes it, and
//!   gives a duplicate the first answer; below the watermark, a request
//!   with no record is late. The ids of the two protocols never mix: a
//!   one-phase request for a two-phase id, and a prepare or COMMIT for a
//!   one-phase id, are refused and change nothing. The coordinator's side,
//!   and why it is exactly-once across its crashes, is in its `core.rs`.
//! - After a YES vote this node never decides alone. A transaction that stays
//!   PREPARED longer than `in_doubt_after_ms` is in doubt:
//!   [`Core::due_queries`] names those to ask the coordinator about, with
//!   exponential backoff per transaction. The driver asks about a bounded
//!   number at once and, of a coordinator that does not answer, one at a
//!   time ([`Core::due_queries_where`]: those it cannot ask about now stay
//!   due); when that coordinator answers again, [`Core::query_again_now`]
//!   makes its transactions due at once. A query that got no answer
//!   decides nothing.
//!
//! # Escrow
//!
//! Funds are reserved, not locked. An account has a `posted` balance, a
//! `reserved` amount held by prepared debits, and an `incoming` amount
//! promised by prepared credits. A debit prepares if `posted - reserved`
//! (the available balance) covers it; concurrent transfers on the same
//! account go on while it does. Incoming credits are not spendable before
//! commit. Invariants, asserted after every change: `0 <= reserved <=
//! posted`, `incoming >= 0`, and `posted + incoming` fits in an `i64` (so a
//! commit can never overflow).
//!
//! # No input reaches a panic
//!
//! Every request is judged before anything changes: a request this core
//! cannot take (malformed, or one whose arithmetic would overflow, or whose
//! record would not fit its codec) is refused with an error and leaves the
//! state as it was. Records are encoded before the state changes, so a
//! record too large for its codec is a refusal, not a half-applied change.
//! The invariant assertions that remain guard against corruption of this
//! node's own memory: no input reaches them (the property test in
//! `proptests.rs` throws random and mutated requests at the core to check
//! that). A stored record that does not decode, or that breaks an
//! invariant, makes [`Core::recover`] fail with a message naming it: the
//! node does not start from a store it cannot read, and never guesses.
//!
//! # Durable records
//!
//! `a/<account: u64 BE>` holds an account's posted balance; `t/<txn id>` holds
//! a transaction's state, coordinator and legs. Reservations are not stored:
//! [`Core::recover`] recomputes them from the PREPARED records.
//!
//! # Deduplication with no time window
//!
//! Every message from a coordinator carries its incarnation, the
//! transaction's position and the coordinator's low watermark for this
//! node (`watermark.rs`). A finished record is deleted once the watermark
//! passes it, and a late duplicate of any age (a prepare or commit with no
//! record, below the watermark or from a retired incarnation) is recognised
//! as late; so the state is a few numbers per coordinator, and no guarantee
//! rests on an outage being short. A coordinator whose log was lost comes
//! back as a new incarnation: the transactions its predecessor left
//! prepared here are orphans, never asked about and never presumed
//! aborted, and an operator decides them (`heuristic.rs`), with an audit
//! trail and the heuristic-mixed hazard reported, never hidden.
//!
//! # Keys that outlive a lost log
//!
//! A client's idempotency key lives in its coordinator's log, and dies with
//! it. So a prepare carries the key, and this node keeps it with the
//! transaction while it is prepared (orphans included) and on a heuristic
//! decision: a retry of the key that reaches the coordinator's next
//! incarnation, while an earlier incarnation's transaction for it is still
//! held here, gets NO ([`Refusal::KeyOfLostIncarnation`], naming that
//! transaction), so the money cannot move twice while an operator decides
//! the first. A transaction committed here in one phase keeps its key for
//! as long as its record is kept (until its coordinator's watermark passes
//! it, or, once that incarnation is retired, for the time retention): a
//! one-phase transaction is never prepared, so that is the only place the
//! key of one answered while its coordinator lost its log survives. Keys
//! of transactions that finished normally otherwise are not kept (the
//! coordinator's log answers for those while it lives): the window that
//! remains is a retry, to a coordinator that lost its log, of a transfer
//! its predecessor finished and whose record here is gone.
//!
//! Records from a coordinator that stamps nothing (an older one) keep the
//! time retention (`finished_retention_ms`): a duplicate of its prepare
//! delayed longer than that would be seen as new.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use tandem::codec::{corrupt, corrupt_record, parse_id, Reader, Writer};
use tandem::domain::{validate_legs, AccountId, Amount, Id, Leg, TxnId, LEGS_MAX};
use tandem::store::{Durability, Op};
use tandem::Error;

/// How long, at first, between two decision queries for one in-doubt transaction.
pub const QUERY_BACKOFF_INITIAL_MS: u64 = 100;
/// The longest wait between two decision queries for one transaction.
pub const QUERY_BACKOFF_MAX_MS: u64 = 5_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Account {
    pub posted: Amount,
    pub reserved: Amount,
    pub incoming: Amount,
    /// A closed account refuses debits, credits and prepares.
    pub closed: bool,
}

impl Account {
    pub fn available(&self) -> Amount {
        self.posted - self.reserved
    }

    /// Why the account breaks the escrow invariants, if it does.
    pub fn check_invariants(&self) -> Result<(), String> {
        if !(self.reserved >= 0 && self.reserved <= self.posted && self.incoming >= 0) {
            return Err(format!("its balances break the escrow invariants: {self:?}"));
        }
        if self.posted.checked_add(self.incoming).is_none() {
            return Err(format!("its balance can overflow on commit: {self:?}"));
        }
        Ok(())
    }

    /// After a change this core made: every input that could break the
    /// invariants was refused before the change, so a failure here is a bug
    /// that corrupted this node's memory (see "No input reaches a panic").
    pub(crate) fn assert_invariants(&self, id: AccountId) {
        if let Err(why) = self.check_invariants() {
            panic!("account {id}: {why}");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnState {
    Prepared,
    Committed,
    Aborted,
}

#[derive(Debug, Clone)]
pub struct Txn {
    pub state: TxnState,
    pub coordinator: Id,
    /// Kept while PREPARED; dropped once finished.
    pub legs: Vec<Leg>,
    /// When this node voted YES, in the core's ms clock; stored with the
    /// record, so that after a restart it still says how long the
    /// transaction has been in doubt (the node's clock continues across
    /// restarts: see `Node::now_ms`).
    pub prepared_at_ms: u64,
    /// The coordinator incarnation and position the transaction was
    /// prepared (or tombstoned) under; 0 when not given (`watermark.rs`).
    pub incarnation: u64,
    pub position: u64,
    /// An operator's heuristic decision, if one was taken (`heuristic.rs`):
    /// then `state` is what it applied, and the legs are kept.
    pub heuristic: Option<Heuristic>,
    /// The client's idempotency key, kept while prepared and on a heuristic
    /// decision (see "Keys that outlive a lost log" above); `None` once
    /// finished normally.
    pub idempotency_key: Option<Id>,
    /// Set when the transaction was committed (or refused) in one phase
    /// ([`Core::commit_one_phase`]): what its first answer was, so that a
    /// duplicate gets it again. `None`: a two-phase transaction.
    pub one_phase: Option<OnePhaseRecord>,
    next_query_ms: u64,
    query_backoff_ms: u64,
}

/// What a one-phase transaction's record keeps of its first answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnePhaseRecord {
    /// `None`: committed (the record is COMMITTED); otherwise why it was
    /// refused (the record is ABORTED).
    pub refusal: Option<(Refusal, String)>,
}

/// How a one-phase commit ended here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnePhaseOutcome {
    /// The legs are posted, durably.
    Committed,
    /// Nothing changed (but the refusal's record, when there is one).
    Refused(Refusal, String),
}

/// The answer to a one-phase commit: its outcome, and whether this delivery
/// was a duplicate (the outcome is the first delivery's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnePhaseAnswer {
    pub outcome: OnePhaseOutcome,
    pub duplicate: bool,
}

/// Where a transaction stands in its coordinator's order, as the
/// coordinator stamped the message that carried it (participant.proto,
/// PrepareRequest fields 4 to 6). All zero from a coordinator that gives
/// none: then this node falls back to its time retention.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    pub incarnation: u64,
    pub position: u64,
    pub low_watermark: u64,
    /// Prepares only: the client's idempotency key, if it gave one.
    pub idempotency_key: Option<Id>,
}

pub use crate::core::heuristic::{Decided, Heuristic};

/// A prepare or a one-phase commit as a batch carries it: the transaction,
/// its coordinator, its legs and its stamp.
pub type StampedRequest = (TxnId, Id, Vec<Leg>, Stamp);

/// Why a prepare got NO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    InsufficientFunds,
    UnknownAccount,
    BalanceOverflow,
    AlreadyAborted,
    UnknownCoordinator,
    ConflictingPrepare,
    AccountClosed,
    /// A prepare below its coordinator's watermark, or from one of its
    /// retired incarnations, with no record here: a late duplicate of a
    /// transaction that is finished.
    Late,
    /// The prepare's idempotency key is held here by a transaction of
    /// another incarnation of its coordinator (orphaned, or decided by an
    /// operator): the vote's text is that earlier transaction's id, and
    /// nothing else.
    KeyOfLostIncarnation,
    /// The transaction id is known here under the other protocol: a
    /// one-phase commit for a transaction prepared (or aborted) here by
    /// two-phase commit, or a prepare for one committed in one phase.
    ProtocolMismatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    Yes,
    No(Refusal, String),
}

/// What the driver must write, and when the answer may be sent. An empty
/// `ops` still goes through the store, so the answer is not sent before the
/// writes queued ahead of it have the durability it asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct Effects {
    pub ops: Vec<Op>,
    pub durability: Durability,
}

impl Effects {
    /// Nothing to write; the answer needs nothing durable.
    fn none() -> Effects {
        Effects { ops: Vec::new(), durability: Durability::Buffered }
    }

    /// Nothing to write, but the answer repeats one that must not be sent
    /// before the earlier write behind it is fsynced (a duplicate YES or
    /// commit acknowledgement whose first write may still be in flight).
    fn after_earlier_writes_are_durable() -> Effects {
        Effects { ops: Vec::new(), durability: Durability::Lazy }
    }

    /// Writes that need no fsync of their own.
    pub(crate) fn buffered(ops: Vec<Op>) -> Effects {
        Effects { ops, durability: Durability::Buffered }
    }

    /// These effects, with `ops` written before their own (what a stamp
    /// taught this node goes first: the watermark is on disk before any
    /// record it lets go is deleted).
    pub(crate) fn with_first(mut self, mut ops: Vec<Op>) -> Effects {
        if !ops.is_empty() {
            ops.append(&mut self.ops);
            self.ops = ops;
        }
        self
    }
}

/// What the resolver says of one due transaction (see
/// [`Core::due_queries_where`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Ask about it now.
    Yes,
    /// Not this one (a query about it is under way).
    NotThis,
    /// None of this coordinator's now (it is not answering, or its room is
    /// used up).
    NotThisCoordinator,
}

/// Most store operations one call can produce, apart from OpenAccounts, GC
/// and batched commits.
pub const OPS_PER_CALL_MAX: usize = tandem::domain::LEGS_MAX + 1;
/// Most transactions in one batched commit (`CommitBatch`).
pub const COMMIT_BATCH_MAX: usize = 1_024;
/// Most prepares in one batch (`PrepareBatch`).
pub const PREPARE_BATCH_MAX: usize = 1_024;
/// Most one-phase commits in one batch (`CommitOnePhaseBatch`).
pub const ONE_PHASE_BATCH_MAX: usize = 1_024;

#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: Id,
    pub coordinators: BTreeSet<Id>,
    pub in_doubt_after_ms: u64,
    pub finished_retention_ms: u64,
    /// The account ids this node owns, as the coordinator's directory says
    /// (`None`: any). An account outside them could be opened here but
    /// never reached by a transfer, so OpenAccounts refuses it.
    pub owned_accounts: Option<std::ops::Range<AccountId>>,
}

pub struct Core {
    pub(crate) config: Config,
    pub(crate) accounts: BTreeMap<AccountId, Account>,
    txns: HashMap<TxnId, Txn>,
    /// Finished records that have no position (saga records, and 2PC
    /// records from a coordinator that stamps none) in the order they
    /// finished, collected after the time retention.
    pub(crate) finished: VecDeque<(u64, Retained)>,
    /// Finished 2PC records with a position, by coordinator, incarnation
    /// and position: collected once their coordinator's watermark passes
    /// them (or their incarnation is retired), with no time window.
    collectable: BTreeMap<(Id, u64, u64), TxnId>,
    /// What this node knows of each coordinator's incarnations and
    /// watermarks (`watermark.rs`).
    pub(crate) coordinator_views: BTreeMap<Id, watermark::CoordinatorView>,
    /// PREPARED transactions (orphans included), by prepare time: what
    /// ListPrepared lists, oldest first.
    prepared_index: BTreeSet<(u64, TxnId)>,
    /// PREPARED transactions that may be asked about (not orphaned, no
    /// heuristic decision), by coordinator and next query time: the
    /// resolver reads only the due ones.
    due: BTreeMap<Id, BTreeSet<(u64, TxnId)>>,
    /// The idempotency keys of the transactions that keep theirs (prepared
    /// ones and heuristic decisions), by coordinator and key.
    keys: HashMap<(Id, Id), TxnId>,
    /// The transactions an operator decided heuristically (kept, never
    /// collected): what ListPrepared and ReadBalances report, read without
    /// a walk over every record.
    pub(crate) heuristic_ids: BTreeSet<TxnId>,
    /// Saga state: barriers, choreographed transfers, inbox, outbox, suspense.
    pub(crate) sagas: crate::saga::SagaState,
    /// The longest a transaction stayed prepared here before its decision
    /// arrived, among those decided since this process started (a restart's
    /// downtime counts: the prepare time is stored).
    pub longest_in_doubt_ms: u64,
}

/// A finished record kept for duplicate detection until its retention ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Retained {
    Txn(TxnId),
    /// Any other record, by its key (barriers, inbox entries, transfers).
    Key(Vec<u8>),
}

pub(crate) fn account_key(account: AccountId) -> Vec<u8> {
    let mut key = b"a/".to_vec();
    key.extend_from_slice(&account.to_be_bytes());
    key
}

/// The stored form of an account: its posted balance, and a closed flag.
pub(crate) fn account_put(id: AccountId, account: &Account) -> Op {
    let mut value = account.posted.to_le_bytes().to_vec();
    value.push(account.closed as u8);
    Op::Put(account_key(id), value)
}

fn txn_key(txn: &TxnId) -> Vec<u8> {
    let mut key = b"t/".to_vec();
    key.extend_from_slice(txn.as_str().as_bytes());
    key
}

/// The stored form of a transaction: state, coordinator id (one-byte
/// length), leg count (one byte, at most [`LEGS_MAX`]), the legs, the
/// prepare time, the incarnation and position, and the heuristic decision
/// (a flag byte, then what the coordinator said, when, and the reason).
/// Fails, before anything is written, on a record that does not fit (it
/// cannot, for a transaction this core accepted).
pub(crate) fn encode_txn(txn: &Txn) -> Result<Vec<u8>, Error> {
    let mut w = Writer::new();
    w.byte(match txn.state {
        TxnState::Prepared => 1u8,
        TxnState::Committed => 2,
        TxnState::Aborted => 3,
    });
    w.short_text("the coordinator id", txn.coordinator.as_str())?;
    if txn.legs.len() > LEGS_MAX {
        return Err(Error::InvalidInput(format!("a transaction has at most {LEGS_MAX} legs")));
    }
    w.count_u8("the number of legs", txn.legs.len())?;
    for leg in &txn.legs {
        w.u64(leg.account);
        w.i64(leg.amount);
    }
    w.u64(txn.prepared_at_ms);
    w.u64(txn.incarnation);
    w.u64(txn.position);
    heuristic::encode(&mut w, txn.heuristic.as_ref())?;
    match &txn.idempotency_key {
        Some(key) => {
            w.byte(1);
            w.short_text("the idempotency key", key.as_str())?;
        }
        None => w.byte(0),
    }
    // A two-phase record ends here (as records written before one-phase
    // commits did); a one-phase one says what its first answer was.
    if let Some(record) = &txn.one_phase {
        w.byte(1);
        match &record.refusal {
            None => w.byte(0),
            Some((refusal, reason)) => {
                w.byte(crate::saga::refusal_code(Some(*refusal)));
                w.text("a one-phase refusal's reason", reason)?;
            }
        }
    }
    Ok(w.finish())
}

/// Reads a transaction record; refuses short records, trailing bytes, and
/// legs a prepare would have refused (a PREPARED record's legs are
/// checked as [`validate_legs`] checks a request's; a finished record has
/// none).
pub(crate) fn decode_txn(bytes: &[u8], now_ms: u64) -> Result<Txn, Error> {
    let mut r = Reader::new(bytes);
    let state = match r.byte()? {
        1 => TxnState::Prepared,
        2 => TxnState::Committed,
        3 => TxnState::Aborted,
        other => return Err(corrupt(format!("state byte {other}"))),
    };
    let coordinator = parse_id(&r.short_text()?)?;
    let leg_count = r.byte()? as usize;
    if leg_count > LEGS_MAX {
        return Err(corrupt(format!("{leg_count} legs; a transaction has at most {LEGS_MAX}")));
    }
    let mut legs = Vec::with_capacity(leg_count);
    for _ in 0..leg_count {
        legs.push(Leg { account: r.u64()?, amount: r.i64()? });
    }
    // Records written before the prepare time was stored end with the legs;
    // those written before stamps and heuristic decisions, with the time.
    let prepared_at_ms = if r.remaining() == 0 { now_ms } else { r.u64()? };
    let (incarnation, position) = if r.remaining() == 0 { (0, 0) } else { (r.u64()?, r.u64()?) };
    let heuristic = if r.remaining() == 0 { None } else { heuristic::decode(&mut r, state)? };
    // Records written before keys were kept end with the heuristic decision.
    let idempotency_key = match if r.remaining() == 0 { 0 } else { r.byte()? } {
        0 => None,
        1 => Some(parse_id(&r.short_text()?)?),
        other => return Err(corrupt(format!("idempotency key flag {other}"))),
    };
    // Two-phase records (and those written before one-phase commits) end
    // with the key.
    let one_phase = if r.remaining() == 0 {
        None
    } else {
        match r.byte()? {
            1 => {}
            other => return Err(corrupt(format!("one-phase flag {other}"))),
        }
        let refusal = match crate::saga::refusal_from_code(r.byte()?)? {
            None => None,
            Some(refusal) => Some((refusal, r.text()?)),
        };
        Some(OnePhaseRecord { refusal })
    };
    r.done()?;
    if let Some(record) = &one_phase {
        let expected = if record.refusal.is_none() { TxnState::Committed } else { TxnState::Aborted };
        // Only a committed one keeps its key.
        if state != expected || heuristic.is_some() || (record.refusal.is_some() && idempotency_key.is_some()) {
            return Err(corrupt(format!(
                "a one-phase record that is {state:?} with refusal {:?}, a heuristic decision or a key",
                record.refusal
            )));
        }
    }
    match state {
        TxnState::Prepared if heuristic.is_some() => {
            return Err(corrupt("a prepared transaction with a heuristic decision"))
        }
        TxnState::Prepared => validate_legs(&legs).map_err(|e| corrupt(format!("its legs: {e}")))?,
        // A heuristic decision keeps its legs: they say what a contrary
        // outcome left unapplied, or applied wrongly.
        TxnState::Committed | TxnState::Aborted if heuristic.is_some() => {
            validate_legs(&legs).map_err(|e| corrupt(format!("its legs: {e}")))?
        }
        TxnState::Committed | TxnState::Aborted if !legs.is_empty() => {
            return Err(corrupt("a finished transaction with legs"))
        }
        TxnState::Committed | TxnState::Aborted => {}
    }
    Ok(Txn {
        state,
        coordinator,
        legs,
        prepared_at_ms,
        incarnation,
        position,
        heuristic,
        idempotency_key,
        one_phase,
        next_query_ms: 0,
        query_backoff_ms: QUERY_BACKOFF_INITIAL_MS,
    })
}

/// Reads an account record: its posted balance and, in records written
/// since accounts can be closed, a closed flag (0 or 1).
/// `id_bytes` is the key after `a/`: the account id, big-endian.
pub(crate) fn decode_account(id_bytes: &[u8], value: &[u8]) -> Result<(AccountId, Account), Error> {
    let id: [u8; 8] = id_bytes.try_into().map_err(|_| corrupt("an account key holds eight bytes after a/"))?;
    let id = AccountId::from_be_bytes(id);
    let mut r = Reader::new(value);
    let posted = r.i64()?;
    let closed = match r.remaining() {
        0 => false,
        _ => match r.byte()? {
            0 => false,
            1 => true,
            other => return Err(corrupt(format!("closed flag {other}"))),
        },
    };
    r.done()?;
    Ok((id, Account { posted, reserved: 0, incoming: 0, closed }))
}

impl Core {
    pub fn new(config: Config) -> Core {
        Core {
            config,
            accounts: BTreeMap::new(),
            txns: HashMap::new(),
            finished: VecDeque::new(),
            collectable: BTreeMap::new(),
            coordinator_views: BTreeMap::new(),
            prepared_index: BTreeSet::new(),
            due: BTreeMap::new(),
            keys: HashMap::new(),
            heuristic_ids: BTreeSet::new(),
            sagas: crate::saga::SagaState::default(),
            longest_in_doubt_ms: 0,
        }
    }

    /// Rebuilds the core from the store's records (every key), recomputing
    /// the reservations of PREPARED transactions. Fails with
    /// [`Error::Fatal`] naming the record on one that does not decode, is
    /// of no known kind, or breaks an invariant: the store is corrupt, and
    /// the node must not start from it (guessing would be worse than
    /// stopping).
    pub fn recover(
        config: Config,
        records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        now_ms: u64,
    ) -> Result<Core, Error> {
        let mut core = Core::new(config);
        // Transactions whose indexes depend on what is read later (a
        // prepared one is an orphan or not by its coordinator's view), or
        // whose order matters (time-retained ones): indexed at the end.
        let mut to_index = Vec::new();
        let records = records.into_iter();
        // Most records are transactions: one allocation, not a rehash of
        // everything read so far at each doubling.
        core.txns.reserve(records.size_hint().0);
        for (key, value) in records {
            core.recover_record(&key, &value, now_ms, &mut to_index).map_err(|e| corrupt_record(&key, e))?;
        }
        let prepared: Vec<TxnId> = to_index
            .iter()
            .filter(|id| core.txns.get(*id).is_some_and(|txn| txn.state == TxnState::Prepared))
            .cloned()
            .collect();
        for txn in prepared {
            let legs = core.txns.get(&txn).map(|t| t.legs.clone()).unwrap_or_default();
            for leg in legs {
                let record = String::from_utf8_lossy(&txn_key(&txn)).into_owned();
                let account = core.accounts.get_mut(&leg.account).ok_or_else(|| {
                    Error::Fatal(format!(
                        "the prepared transaction {record:?} names account {}, which has no record; the node does not start from a store it cannot read",
                        leg.account
                    ))
                })?;
                let changed = if leg.is_debit() {
                    account.reserved.checked_add(-leg.amount).map(|reserved| account.reserved = reserved)
                } else {
                    account.incoming.checked_add(leg.amount).map(|incoming| account.incoming = incoming)
                };
                changed.ok_or_else(|| {
                    Error::Fatal(format!(
                        "the prepared transaction {record:?} overflows the reservations of account {}",
                        leg.account
                    ))
                })?;
            }
        }
        for (id, account) in &core.accounts {
            account.check_invariants().map_err(|why| {
                Error::Fatal(format!(
                    "account {id} (record {:?}) and the prepared transactions on it: {why}; the node does not start from a store it cannot read",
                    tandem::codec::show_key(&account_key(*id))
                ))
            })?;
        }
        // The indexes, once every coordinator's view is read (whether a
        // prepared transaction is an orphan depends on it), in id order
        // (the store's), so that time-retained records are collected in the
        // same order on every run.
        for id in to_index {
            core.index(&id, now_ms);
        }
        Ok(core)
    }

    /// Rebuilds one record (see [`Core::recover`]).
    fn recover_record(
        &mut self,
        key: &[u8],
        value: &[u8],
        now_ms: u64,
        to_index: &mut Vec<TxnId>,
    ) -> Result<(), Error> {
        if let Some(account) = key.strip_prefix(b"a/") {
            let (account, record) = decode_account(account, value)?;
            self.accounts.insert(account, record);
        } else if key.starts_with(b"t/") {
            let txn = tandem::codec::id_from_key(b"t/", key)?;
            let record = decode_txn(value, now_ms)?;
            // Most records, finished and stamped, are indexed at once: by
            // watermark, whatever else is read (see `index`).
            let by_watermark = record.state != TxnState::Prepared
                && record.heuristic.is_none()
                && record.idempotency_key.is_none()
                && record.incarnation != 0
                && record.position != 0;
            if by_watermark {
                self.collectable.insert((record.coordinator.clone(), record.incarnation, record.position), txn.clone());
            } else {
                to_index.push(txn.clone());
            }
            self.txns.insert(txn, record);
        } else if key.starts_with(watermark::VIEW_PREFIX) {
            let coordinator = tandem::codec::id_from_key(watermark::VIEW_PREFIX, key)?;
            self.coordinator_views.insert(coordinator, watermark::decode_view(value)?);
        } else {
            self.recover_saga_record(key, value, now_ms)?;
        }
        Ok(())
    }

    /// Puts a transaction in the indexes its state calls for: prepared ones
    /// in the list and (unless orphaned) among the queries; finished ones
    /// among the records to collect, by watermark when stamped, by time
    /// otherwise; heuristic decisions in none (kept for the operator).
    fn index(&mut self, id: &TxnId, now_ms: u64) {
        let Some(txn) = self.txns.get(id) else { return };
        if let Some(key) = &txn.idempotency_key {
            self.keys.insert((txn.coordinator.clone(), key.clone()), id.clone());
        }
        match txn.state {
            TxnState::Prepared => {
                self.prepared_index.insert((txn.prepared_at_ms, id.clone()));
                if !self.is_orphan(txn) {
                    self.due.entry(txn.coordinator.clone()).or_default().insert((txn.next_query_ms, id.clone()));
                }
            }
            TxnState::Committed | TxnState::Aborted if txn.heuristic.is_some() => {
                self.heuristic_ids.insert(id.clone());
            }
            TxnState::Committed | TxnState::Aborted if txn.incarnation != 0 && txn.position != 0 => {
                self.collectable.insert((txn.coordinator.clone(), txn.incarnation, txn.position), id.clone());
            }
            TxnState::Committed | TxnState::Aborted => self.finished.push_back((now_ms, Retained::Txn(id.clone()))),
        }
    }

    /// Takes a prepared transaction out of the list and the queries (it is
    /// being decided).
    fn unindex_prepared(&mut self, id: &TxnId) {
        let Some(txn) = self.txns.get(id) else { return };
        if let Some(key) = &txn.idempotency_key {
            let entry = (txn.coordinator.clone(), key.clone());
            if self.keys.get(&entry) == Some(id) {
                self.keys.remove(&entry);
            }
        }
        self.prepared_index.remove(&(txn.prepared_at_ms, id.clone()));
        if let Some(due) = self.due.get_mut(&txn.coordinator) {
            due.remove(&(txn.next_query_ms, id.clone()));
        }
    }

    pub fn node_id(&self) -> &Id {
        &self.config.node_id
    }

    /// Phase one, from a coordinator that stamps nothing (see
    /// [`Core::prepare_stamped`]).
    pub fn prepare(
        &mut self,
        txn_id: TxnId,
        coordinator: Id,
        legs: Vec<Leg>,
        now_ms: u64,
    ) -> Result<(Vote, Effects), Error> {
        self.prepare_stamped(txn_id, coordinator, legs, Stamp::default(), now_ms)
    }

    /// Phase one. `Err` is bad input (a gRPC status); a business refusal is
    /// `Ok(Vote::No)`. The stamp first tells this node what it says of the
    /// coordinator (its incarnation, its watermark); a prepare with no
    /// record here that is below the watermark, or from a retired
    /// incarnation, is late and votes NO, reserving nothing.
    pub fn prepare_stamped(
        &mut self,
        txn_id: TxnId,
        coordinator: Id,
        legs: Vec<Leg>,
        stamp: Stamp,
        now_ms: u64,
    ) -> Result<(Vote, Effects), Error> {
        validate_legs(&legs)?;
        let (standing, observed) = self.observe(&coordinator, stamp.incarnation, stamp.low_watermark)?;
        if let Some(existing) = self.txns.get(&txn_id) {
            let (vote, effects) = match existing.state {
                _ if existing.one_phase.is_some() => (
                    Vote::No(
                        Refusal::ProtocolMismatch,
                        format!("{txn_id} was committed or refused here in one phase; a prepare for it is refused"),
                    ),
                    Effects::none(),
                ),
                _ if existing.heuristic.is_some() => (
                    Vote::No(
                        Refusal::Late,
                        format!("{txn_id} was decided here by an operator (heuristically) before this prepare"),
                    ),
                    Effects::none(),
                ),
                TxnState::Prepared if existing.legs == legs => (Vote::Yes, Effects::after_earlier_writes_are_durable()),
                TxnState::Prepared => (
                    Vote::No(Refusal::ConflictingPrepare, format!("{txn_id} was prepared here with other legs")),
                    Effects::none(),
                ),
                // A duplicate of a prepare whose transaction committed since.
                TxnState::Committed => (Vote::Yes, Effects::after_earlier_writes_are_durable()),
                TxnState::Aborted => (
                    Vote::No(Refusal::AlreadyAborted, format!("{txn_id} was aborted here before this prepare")),
                    Effects::none(),
                ),
            };
            return Ok((vote, effects.with_first(observed)));
        }
        if let Some(why) = self.late(&coordinator, standing, stamp.position) {
            return Ok((Vote::No(Refusal::Late, format!("{txn_id}: {why}")), Effects::buffered(observed)));
        }
        if let Some(earlier) = self.key_held_by_another_incarnation(&coordinator, &stamp).cloned() {
            let effects =
                self.finish(txn_id, coordinator, TxnState::Aborted, stamp.incarnation, stamp.position, now_ms)?;
            return Ok((Vote::No(Refusal::KeyOfLostIncarnation, earlier.to_string()), effects.with_first(observed)));
        }
        if let Some(refusal) = self.check_prepare(&coordinator, &legs) {
            // Voting NO is this node's one unilateral decision: remember it.
            let effects =
                self.finish(txn_id, coordinator, TxnState::Aborted, stamp.incarnation, stamp.position, now_ms)?;
            return Ok((Vote::No(refusal.0, refusal.1), effects.with_first(observed)));
        }
        let txn = Txn {
            state: TxnState::Prepared,
            coordinator,
            legs,
            prepared_at_ms: now_ms,
            incarnation: stamp.incarnation,
            position: stamp.position,
            heuristic: None,
            idempotency_key: stamp.idempotency_key,
            one_phase: None,
            next_query_ms: now_ms.saturating_add(self.config.in_doubt_after_ms),
            query_backoff_ms: QUERY_BACKOFF_INITIAL_MS,
        };
        // Encoded before anything changes: a record that does not fit is a
        // refusal, not a half-applied prepare.
        let mut ops = observed;
        ops.push(Op::Put(txn_key(&txn_id), encode_txn(&txn)?));
        self.reserve(&txn.legs);
        self.txns.insert(txn_id.clone(), txn);
        self.index(&txn_id, now_ms);
        Ok((Vote::Yes, Effects { ops, durability: Durability::Fsync }))
    }

    /// Reserves the debits and promises the credits of legs that
    /// [`Core::check_prepare`] accepted.
    fn reserve(&mut self, legs: &[Leg]) {
        for leg in legs {
            let account = self.accounts.get_mut(&leg.account).expect("checked by check_prepare");
            if leg.is_debit() {
                account.reserved += -leg.amount;
            } else {
                account.incoming += leg.amount;
            }
            account.assert_invariants(leg.account);
        }
    }

    /// One-phase commit: a transaction whose legs all live on this node is
    /// judged as a prepare is (the legs, the coordinator, the accounts,
    /// closed ones, the funds, overflow, the key of a lost incarnation),
    /// then posted and recorded COMMITTED in one write, fsynced before the
    /// answer. No PREPARED state exists in between: this node decides, and
    /// nobody is ever in doubt about it. `Err` is bad input (a gRPC status)
    /// and changes nothing.
    ///
    /// - A refusal changes nothing but the ABORTED record of the refusal,
    ///   which is durable (it rides on an fsync) before the answer: the
    ///   coordinator may answer its client ABORTED at once, so a duplicate
    ///   of the request must never find this node without it.
    /// - A duplicate (the same id, committed or refused here in one phase)
    ///   gets the first answer again, with `duplicate`, and changes
    ///   nothing; the record is held until the coordinator's watermark
    ///   passes it (stamped) or the time retention ends (unstamped).
    /// - A request with no record here below the watermark, or from a
    ///   retired incarnation, is late: refused ([`Refusal::Late`]), nothing
    ///   written; it was answered before and its record collected, or its
    ///   coordinator stopped waiting for it.
    /// - An id known here as a two-phase transaction (prepared, decided, or
    ///   a tombstone) is refused ([`Refusal::ProtocolMismatch`]) and
    ///   nothing changes; so is a prepare for an id committed here in one
    ///   phase ([`Core::prepare_stamped`]), and a COMMIT for it
    ///   ([`Core::commit`]).
    pub fn commit_one_phase(
        &mut self,
        txn_id: TxnId,
        coordinator: Id,
        legs: Vec<Leg>,
        stamp: Stamp,
        now_ms: u64,
    ) -> Result<(OnePhaseAnswer, Effects), Error> {
        validate_legs(&legs)?;
        let (standing, observed) = self.observe(&coordinator, stamp.incarnation, stamp.low_watermark)?;
        if let Some(existing) = self.txns.get(&txn_id) {
            let (outcome, duplicate, effects) = match &existing.one_phase {
                // The first answer again, once the write behind it is durable.
                Some(OnePhaseRecord { refusal: None }) => {
                    (OnePhaseOutcome::Committed, true, Effects::after_earlier_writes_are_durable())
                }
                Some(OnePhaseRecord { refusal: Some((refusal, reason)) }) => (
                    OnePhaseOutcome::Refused(*refusal, reason.clone()),
                    true,
                    Effects::after_earlier_writes_are_durable(),
                ),
                None => (
                    OnePhaseOutcome::Refused(
                        Refusal::ProtocolMismatch,
                        format!(
                            "{txn_id} is a two-phase transaction here ({:?}); a one-phase commit for it is refused",
                            existing.state
                        ),
                    ),
                    false,
                    Effects::none(),
                ),
            };
            return Ok((OnePhaseAnswer { outcome, duplicate }, effects.with_first(observed)));
        }
        if let Some(why) = self.late(&coordinator, standing, stamp.position) {
            let outcome = OnePhaseOutcome::Refused(Refusal::Late, format!("{txn_id}: {why}"));
            return Ok((OnePhaseAnswer { outcome, duplicate: false }, Effects::buffered(observed)));
        }
        let refusal = match self.key_held_by_another_incarnation(&coordinator, &stamp) {
            Some(earlier) => Some((Refusal::KeyOfLostIncarnation, earlier.to_string())),
            None => self.check_prepare(&coordinator, &legs),
        };
        let record = Txn {
            state: if refusal.is_none() { TxnState::Committed } else { TxnState::Aborted },
            coordinator,
            legs: Vec::new(),
            prepared_at_ms: now_ms,
            incarnation: stamp.incarnation,
            position: stamp.position,
            heuristic: None,
            // Kept while the record is (see "Keys that outlive a lost log"):
            // a retry of the key sent to the coordinator's next
            // incarnation, should its log be lost, is then refused.
            idempotency_key: if refusal.is_none() { stamp.idempotency_key.clone() } else { None },
            one_phase: Some(OnePhaseRecord { refusal: refusal.clone() }),
            next_query_ms: 0,
            query_backoff_ms: 0,
        };
        // Encoded before anything changes: a record that does not fit is an
        // error, not a half-applied commit.
        let record_op = Op::Put(txn_key(&txn_id), encode_txn(&record)?);
        let (outcome, mut ops, durability) = match refusal {
            Some((refusal, reason)) => (OnePhaseOutcome::Refused(refusal, reason), Vec::new(), Durability::Lazy),
            None => {
                // The arithmetic of a prepare and its commit, checked above.
                self.reserve(&legs);
                (OnePhaseOutcome::Committed, self.post(&legs), Durability::Fsync)
            }
        };
        ops.push(record_op);
        self.txns.insert(txn_id.clone(), record);
        self.index(&txn_id, now_ms);
        Ok((OnePhaseAnswer { outcome, duplicate: false }, Effects { ops, durability }.with_first(observed)))
    }

    /// [`Core::commit_one_phase`] for each of `requests` ([`Core::judge_each`]),
    /// 1 to [`ONE_PHASE_BATCH_MAX`] of them, as one write.
    pub fn commit_one_phase_batch(
        &mut self,
        requests: Vec<Result<StampedRequest, Error>>,
        now_ms: u64,
    ) -> Result<(Vec<Result<OnePhaseAnswer, Error>>, Effects), Error> {
        check_batch_len("requests", requests.len(), ONE_PHASE_BATCH_MAX)?;
        Ok(self.judge_each(requests, now_ms, |core, (txn, coordinator, legs, stamp), now| {
            core.commit_one_phase(txn, coordinator, legs, stamp, now)
        }))
    }

    /// The transaction of another incarnation of `coordinator` that holds
    /// the stamp's idempotency key here, if one does (see "Keys that
    /// outlive a lost log" above).
    fn key_held_by_another_incarnation(&self, coordinator: &Id, stamp: &Stamp) -> Option<&TxnId> {
        let key = stamp.idempotency_key.as_ref()?;
        let earlier = self.keys.get(&(coordinator.clone(), key.clone()))?;
        let holder = self.txns.get(earlier)?;
        (holder.incarnation != stamp.incarnation).then_some(earlier)
    }

    fn check_prepare(&self, coordinator: &Id, legs: &[Leg]) -> Option<(Refusal, String)> {
        if !self.config.coordinators.contains(coordinator) {
            return Some((
                Refusal::UnknownCoordinator,
                format!("coordinator {coordinator} is not one this participant was started with"),
            ));
        }
        for leg in legs {
            let Some(account) = self.accounts.get(&leg.account) else {
                return Some((
                    Refusal::UnknownAccount,
                    format!("account {} does not exist on {}", leg.account, self.config.node_id),
                ));
            };
            if account.closed {
                return Some((Refusal::AccountClosed, format!("account {} is closed", leg.account)));
            }
            if leg.is_debit() {
                if account.available() < -leg.amount {
                    return Some((
                        Refusal::InsufficientFunds,
                        format!(
                            "account {} has {} available, the debit needs {}",
                            leg.account,
                            account.available(),
                            -leg.amount
                        ),
                    ));
                }
            } else if account.posted.checked_add(account.incoming).and_then(|sum| sum.checked_add(leg.amount)).is_none()
            {
                return Some((
                    Refusal::BalanceOverflow,
                    format!("crediting {} to account {} would overflow its balance", leg.amount, leg.account),
                ));
            }
        }
        None
    }

    /// Phase two, COMMIT. Applies the legs once; a duplicate, or a commit
    /// for a transaction whose record was collected (below its watermark,
    /// or past the time retention), changes nothing. A commit for a
    /// transaction an operator decided heuristically applies nothing: it is
    /// recorded beside that decision (`heuristic.rs`).
    pub fn commit(&mut self, txn_id: &TxnId, now_ms: u64) -> Result<Effects, Error> {
        let Some(txn) = self.txns.get(txn_id) else {
            return Ok(Effects::none());
        };
        if txn.heuristic.is_some() {
            return self.coordinator_decided(txn_id, Decided::Commit, now_ms);
        }
        if txn.one_phase.is_some() {
            return Err(one_phase_not_two_phase(txn_id, "a COMMIT"));
        }
        match txn.state {
            TxnState::Committed => return Ok(Effects::after_earlier_writes_are_durable()),
            TxnState::Aborted => {
                return Err(Error::InvalidInput(format!(
                    "{txn_id} is aborted here; a commit for it breaks the protocol"
                )))
            }
            TxnState::Prepared => {}
        }
        let in_doubt_ms = now_ms.saturating_sub(txn.prepared_at_ms);
        let legs = txn.legs.clone();
        let (coordinator, incarnation, position) = (txn.coordinator.clone(), txn.incarnation, txn.position);
        // The record first: if it could not be encoded, nothing has changed.
        let mut effects =
            self.finish(txn_id.clone(), coordinator, TxnState::Committed, incarnation, position, now_ms)?;
        self.longest_in_doubt_ms = self.longest_in_doubt_ms.max(in_doubt_ms);
        let mut ops = self.post(&legs);
        ops.append(&mut effects.ops);
        Ok(Effects { ops, durability: effects.durability })
    }

    /// Judges each item of a batch exactly as `judge` judges it alone, and
    /// merges their writes into one submission as durable as the most
    /// demanding of them (so no answer leaves before the fsync that covers
    /// its own record). An item that arrives as an error (malformed) keeps
    /// it; an item `judge` refuses gets its error and changes nothing.
    pub fn judge_each<I, A>(
        &mut self,
        items: Vec<Result<I, Error>>,
        now_ms: u64,
        judge: impl Fn(&mut Core, I, u64) -> Result<(A, Effects), Error>,
    ) -> (Vec<Result<A, Error>>, Effects) {
        let mut batch = Effects::none();
        let answers = items
            .into_iter()
            .map(|item| {
                let (answer, mut effects) = judge(self, item?, now_ms)?;
                batch.ops.append(&mut effects.ops);
                batch.durability = batch.durability.max(effects.durability);
                Ok(answer)
            })
            .collect();
        (answers, batch)
    }

    /// Phase one for each of `prepares` ([`Core::judge_each`] of
    /// [`Core::prepare_stamped`]), 1 to [`PREPARE_BATCH_MAX`] of them.
    pub fn prepare_batch(
        &mut self,
        prepares: Vec<Result<StampedRequest, Error>>,
        now_ms: u64,
    ) -> Result<(Vec<Result<Vote, Error>>, Effects), Error> {
        check_batch_len("prepares", prepares.len(), PREPARE_BATCH_MAX)?;
        Ok(self.judge_each(prepares, now_ms, |core, (txn, coordinator, legs, stamp), now| {
            core.prepare_stamped(txn, coordinator, legs, stamp, now)
        }))
    }

    /// Phase two, COMMIT, for each of `txn_ids` (see [`Core::commit`]), 1
    /// to [`COMMIT_BATCH_MAX`] of them, as one write. Checked first, so
    /// that a transaction this node aborted rejects the batch before any of
    /// it is applied. The effects are those of the commits applied: they
    /// must be written even when the answer is an error (a commit fails
    /// only before it changes anything, so an error after others were
    /// applied leaves those applied, to be acknowledged again on the
    /// coordinator's redelivery).
    pub fn commit_batch(&mut self, txn_ids: &[TxnId], now_ms: u64) -> (Result<(), Error>, Effects) {
        self.commit_batch_stamped(txn_ids, None, Stamp::default(), now_ms)
    }

    /// [`Core::commit_batch`], with the sending coordinator's stamp (its
    /// incarnation and its watermark for this node), observed first.
    pub fn commit_batch_stamped(
        &mut self,
        txn_ids: &[TxnId],
        coordinator: Option<&Id>,
        stamp: Stamp,
        now_ms: u64,
    ) -> (Result<(), Error>, Effects) {
        if let Err(error) = check_batch_len("txn_ids", txn_ids.len(), COMMIT_BATCH_MAX) {
            return (Err(error), Effects::none());
        }
        if let Some(aborted) = txn_ids.iter().find(
            |id| matches!(self.txns.get(*id), Some(txn) if txn.state == TxnState::Aborted && txn.heuristic.is_none() && txn.one_phase.is_none()),
        ) {
            let error = Error::InvalidInput(format!("{aborted} is aborted here; a commit for it breaks the protocol"));
            return (Err(error), Effects::none());
        }
        if let Some(one_phase) = txn_ids.iter().find(|id| self.txns.get(*id).is_some_and(|txn| txn.one_phase.is_some()))
        {
            return (Err(one_phase_not_two_phase(one_phase, "a COMMIT")), Effects::none());
        }
        let observed = match coordinator {
            Some(coordinator) => match self.observe(coordinator, stamp.incarnation, stamp.low_watermark) {
                Ok((_, ops)) => ops,
                Err(error) => return (Err(error), Effects::none()),
            },
            None => Vec::new(),
        };
        let items = txn_ids.iter().map(Ok).collect();
        let (answers, effects) =
            self.judge_each(items, now_ms, |core, txn_id, now| Ok(((), core.commit(txn_id, now)?)));
        (answers.into_iter().collect(), effects.with_first(observed))
    }

    /// COMMITs that ride on a batch of prepares (`PrepareBatchRequest.commits`):
    /// [`Core::commit_batch_stamped`] first, then [`Core::prepare_batch`],
    /// in one write. The commits' answer stands apart from the votes: a
    /// refused commit refuses no prepare, and the prepares are judged on the
    /// state the commits left (a credit committed first is available to a
    /// debit prepared after it). Fails as a whole, changing nothing, only
    /// when the prepares are too many or none.
    pub fn commit_then_prepare_batch(
        &mut self,
        commits: Option<(&[TxnId], Option<&Id>, Stamp)>,
        prepares: Vec<Result<StampedRequest, Error>>,
        now_ms: u64,
    ) -> Result<((Result<(), Error>, Vec<Result<Vote, Error>>), Effects), Error> {
        check_batch_len("prepares", prepares.len(), PREPARE_BATCH_MAX)?;
        let (committed, mut effects) = match commits {
            Some((txn_ids, coordinator, stamp)) => self.commit_batch_stamped(txn_ids, coordinator, stamp, now_ms),
            None => (Ok(()), Effects::none()),
        };
        let (votes, mut prepared) = self.prepare_batch(prepares, now_ms)?;
        effects.ops.append(&mut prepared.ops);
        effects.durability = effects.durability.max(prepared.durability);
        Ok(((committed, votes), effects))
    }

    /// Phase two, ABORT, from a coordinator that stamps nothing (see
    /// [`Core::abort_stamped`]).
    pub fn abort(&mut self, txn_id: &TxnId, now_ms: u64) -> Result<Effects, Error> {
        self.abort_stamped(txn_id, None, Stamp::default(), now_ms)
    }

    /// Phase two, ABORT. Releases a prepared reservation; leaves a tombstone
    /// for an unknown transaction, unless its stamp shows it late (below
    /// the watermark, or of a retired incarnation: a late prepare of it
    /// votes NO anyway). An abort for a transaction an operator decided
    /// heuristically is recorded beside that decision.
    pub fn abort_stamped(
        &mut self,
        txn_id: &TxnId,
        coordinator: Option<&Id>,
        stamp: Stamp,
        now_ms: u64,
    ) -> Result<Effects, Error> {
        // Only a coordinator this node was started with is believed.
        let coordinator = coordinator.filter(|c| self.config.coordinators.contains(*c)).cloned();
        let (standing, observed) = match &coordinator {
            Some(coordinator) => self.observe(coordinator, stamp.incarnation, 0)?,
            None => (watermark::Standing::Unstamped, Vec::new()),
        };
        let Some(txn) = self.txns.get(txn_id) else {
            if let Some(coordinator) = &coordinator {
                if self.late(coordinator, standing, stamp.position).is_some() {
                    return Ok(Effects::buffered(observed));
                }
            }
            // Abort before prepare: the tombstone makes a late prepare vote NO.
            // With no coordinator given, the tombstone names this node; it
            // never asks.
            let (coordinator, incarnation, position) = match coordinator {
                Some(coordinator) => (coordinator, stamp.incarnation, stamp.position),
                None => (self.config.node_id.clone(), 0, 0),
            };
            let effects = self.finish(txn_id.clone(), coordinator, TxnState::Aborted, incarnation, position, now_ms)?;
            return Ok(effects.with_first(observed));
        };
        if txn.heuristic.is_some() {
            return Ok(self.coordinator_decided(txn_id, Decided::Abort, now_ms)?.with_first(observed));
        }
        match txn.state {
            TxnState::Aborted => return Ok(Effects::buffered(observed)),
            TxnState::Committed => {
                return Err(Error::InvalidInput(format!(
                    "{txn_id} is committed here; an abort for it breaks the protocol"
                )))
            }
            TxnState::Prepared => {}
        }
        let in_doubt_ms = now_ms.saturating_sub(txn.prepared_at_ms);
        let legs = txn.legs.clone();
        let (coordinator, incarnation, position) = (txn.coordinator.clone(), txn.incarnation, txn.position);
        // The record first: if it could not be encoded, nothing has changed.
        let effects = self.finish(txn_id.clone(), coordinator, TxnState::Aborted, incarnation, position, now_ms)?;
        self.longest_in_doubt_ms = self.longest_in_doubt_ms.max(in_doubt_ms);
        self.release(&legs);
        Ok(effects.with_first(observed))
    }

    /// Posts prepared legs: the reserved debits leave their accounts, the
    /// promised credits arrive; returns the accounts' writes.
    fn post(&mut self, legs: &[Leg]) -> Vec<Op> {
        let mut ops = Vec::with_capacity(legs.len() + 1);
        for leg in legs {
            let account = self.accounts.get_mut(&leg.account).expect("a prepared leg's account exists");
            if leg.is_debit() {
                account.reserved -= -leg.amount;
                account.posted -= -leg.amount;
            } else {
                account.incoming -= leg.amount;
                account.posted += leg.amount;
            }
            account.assert_invariants(leg.account);
            ops.push(account_put(leg.account, account));
        }
        ops
    }

    /// Gives back what prepared legs held: the reserved debits and the
    /// promised credits.
    fn release(&mut self, legs: &[Leg]) {
        for leg in legs {
            let account = self.accounts.get_mut(&leg.account).expect("a prepared leg's account exists");
            if leg.is_debit() {
                account.reserved -= -leg.amount;
            } else {
                account.incoming -= leg.amount;
            }
            account.assert_invariants(leg.account);
        }
    }

    /// Records a finished transaction (legs dropped) for garbage collection.
    /// Fails, changing nothing, if its record cannot be encoded.
    fn finish(
        &mut self,
        txn_id: TxnId,
        coordinator: Id,
        state: TxnState,
        incarnation: u64,
        position: u64,
        now_ms: u64,
    ) -> Result<Effects, Error> {
        let txn = Txn {
            state,
            coordinator,
            legs: Vec::new(),
            prepared_at_ms: now_ms,
            incarnation,
            position,
            heuristic: None,
            idempotency_key: None,
            one_phase: None,
            next_query_ms: 0,
            query_backoff_ms: 0,
        };
        let ops = vec![Op::Put(txn_key(&txn_id), encode_txn(&txn)?)];
        self.unindex_prepared(&txn_id);
        self.txns.insert(txn_id.clone(), txn);
        self.index(&txn_id, now_ms);
        // Only a commit must be durable before it is acknowledged. It need not
        // pay for an fsync of its own: it rides on the next prepare's (the
        // WAL is one log), or the store fsyncs for it within its linger.
        let durability = if state == TxnState::Committed { Durability::Lazy } else { Durability::Buffered };
        Ok(Effects { ops, durability })
    }

    /// Opens accounts, all or none.
    ///
    /// Any non-negative balance up to `i64::MAX` is accepted, and the sum of
    /// this node's balances is not bounded here, on purpose: the escrow
    /// invariants hold per account (`posted + incoming` fits, checked on
    /// every credit), and a bound on the node's total checked at opening
    /// would not stay true, since credits from other participants raise it
    /// afterwards. Totals are summed exactly where they are reported
    /// (ReadBalances answers OUT_OF_RANGE when one does not fit an int64),
    /// and the suspense account refuses what it cannot hold.
    pub fn open_accounts(&mut self, accounts: &[(AccountId, Amount)]) -> Result<Effects, Error> {
        if accounts.is_empty() || accounts.len() > tandem::domain::OPEN_ACCOUNTS_MAX {
            return Err(Error::InvalidInput(format!(
                "open between 1 and {} accounts at a time; this request has {}",
                tandem::domain::OPEN_ACCOUNTS_MAX,
                accounts.len()
            )));
        }
        let mut seen = BTreeSet::new();
        for (id, balance) in accounts {
            if *balance < 0 {
                return Err(Error::InvalidInput(format!("account {id}: the initial balance {balance} is negative")));
            }
            if !seen.insert(*id) {
                return Err(Error::InvalidInput(format!("account {id} appears twice in the request")));
            }
            if let Some(owned) = &self.config.owned_accounts {
                if !owned.contains(id) {
                    return Err(Error::InvalidInput(format!(
                        "account {id} is not one of {}'s accounts ({}..{})",
                        self.config.node_id, owned.start, owned.end
                    )));
                }
            }
            if self.accounts.contains_key(id) {
                return Err(Error::AlreadyExists(format!("account {id} exists already on {}", self.config.node_id)));
            }
        }
        let mut ops = Vec::with_capacity(accounts.len());
        for (id, balance) in accounts {
            let account = Account { posted: *balance, reserved: 0, incoming: 0, closed: false };
            ops.push(account_put(*id, &account));
            self.accounts.insert(*id, account);
        }
        Ok(Effects { ops, durability: Durability::Fsync })
    }

    pub fn account(&self, id: AccountId) -> Result<Account, Error> {
        self.accounts
            .get(&id)
            .copied()
            .ok_or_else(|| Error::NotFound(format!("account {id} does not exist on {}", self.config.node_id)))
    }

    pub fn accounts(&self) -> &BTreeMap<AccountId, Account> {
        &self.accounts
    }

    pub fn txn(&self, id: &TxnId) -> Option<&Txn> {
        self.txns.get(id)
    }

    /// Every transaction record held, in no particular order.
    #[cfg(test)]
    pub(crate) fn txns(&self) -> impl Iterator<Item = (&TxnId, &Txn)> {
        self.txns.iter()
    }

    /// Every prepared transaction, oldest first (see [`Core::prepared_at_most`]).
    pub fn prepared(&self) -> Vec<(&TxnId, &Txn)> {
        self.prepared_at_most(usize::MAX)
    }

    /// Prepared (in-doubt) transactions, oldest first, at most `limit`
    /// (orphans included: see [`Core::is_orphan`]).
    pub fn prepared_at_most(&self, limit: usize) -> Vec<(&TxnId, &Txn)> {
        self.prepared_index.iter().take(limit).filter_map(|(_, id)| self.txns.get_key_value(id)).collect()
    }

    pub fn prepared_count(&self) -> usize {
        self.prepared_index.len()
    }

    /// The in-doubt transactions whose decision query is due now, at most
    /// `limit`, with their coordinators. Each one's next query is pushed back
    /// by its backoff, which doubles up to [`QUERY_BACKOFF_MAX_MS`].
    pub fn due_queries(&mut self, now_ms: u64, limit: usize) -> Vec<(TxnId, Id)> {
        self.due_queries_where(now_ms, limit, |_, _| Ask::Yes)
    }

    /// [`Core::due_queries`], of the due transactions that `ask` accepts
    /// (given the transaction and its coordinator; asked once for each due
    /// one, by coordinator and due time, until `limit` are accepted). Only
    /// those accepted have their next query pushed back: one the driver
    /// cannot ask about now (its coordinator is not answering, or a query
    /// about it is still under way) stays due. [`Ask::NotThisCoordinator`]
    /// skips the rest of that coordinator's due transactions, so a
    /// coordinator that is down costs one look per call, not one per
    /// transaction waiting for it. The due ones are read from an index by
    /// due time: the cost follows what is due, not what is held.
    pub fn due_queries_where(
        &mut self,
        now_ms: u64,
        limit: usize,
        mut ask: impl FnMut(&TxnId, &Id) -> Ask,
    ) -> Vec<(TxnId, Id)> {
        let mut chosen: Vec<(TxnId, Id)> = Vec::new();
        for (coordinator, due) in &self.due {
            for (next_query_ms, id) in due.iter() {
                if chosen.len() >= limit || *next_query_ms > now_ms {
                    break;
                }
                match ask(id, coordinator) {
                    Ask::Yes => chosen.push((id.clone(), coordinator.clone())),
                    Ask::NotThis => continue,
                    Ask::NotThisCoordinator => break,
                }
            }
        }
        for (id, coordinator) in &chosen {
            let txn = self.txns.get_mut(id).expect("a due transaction is held");
            let due = self.due.get_mut(coordinator).expect("its coordinator's index exists");
            due.remove(&(txn.next_query_ms, id.clone()));
            txn.next_query_ms = now_ms.saturating_add(txn.query_backoff_ms);
            txn.query_backoff_ms =
                txn.query_backoff_ms.saturating_mul(2).clamp(QUERY_BACKOFF_INITIAL_MS, QUERY_BACKOFF_MAX_MS);
            due.insert((txn.next_query_ms, id.clone()));
        }
        chosen.sort();
        chosen
    }

    /// `coordinator` answers again after it did not: each of its in-doubt
    /// transactions is due at once, with its backoff back to the first one
    /// (what grew while it did not answer says nothing about it now).
    /// Returns how many there are.
    pub fn query_again_now(&mut self, coordinator: &Id, now_ms: u64) -> usize {
        let Some(due) = self.due.get_mut(coordinator) else { return 0 };
        let waiting = std::mem::take(due);
        for (_, id) in &waiting {
            let txn = self.txns.get_mut(id).expect("a due transaction is held");
            txn.next_query_ms = txn.next_query_ms.min(now_ms);
            txn.query_backoff_ms = QUERY_BACKOFF_INITIAL_MS;
            due.insert((txn.next_query_ms, id.clone()));
        }
        waiting.len()
    }

    /// [`Core::collect_garbage_at_most`] 10,000 records.
    pub fn collect_garbage(&mut self, now_ms: u64) -> Effects {
        self.collect_garbage_at_most(now_ms, 10_000)
    }

    /// Deletes finished records that no late message needs any more, at
    /// most `limit`: stamped 2PC records below their coordinator's
    /// watermark, with no time window (those of a retired incarnation after
    /// the retention: an operator may want them as evidence), and
    /// the others (saga records, unstamped 2PC records) older than the
    /// retention. The driver calls it again at once while it returns
    /// `limit` ops, so collection keeps up with the write rate.
    pub fn collect_garbage_at_most(&mut self, now_ms: u64, limit: usize) -> Effects {
        let mut ops = Vec::new();
        let mut passed = Vec::new();
        let retention_ms = self.config.finished_retention_ms;
        for (coordinator, view) in &self.coordinator_views {
            // `below`: the watermark; `finished_by`: records of a retired
            // incarnation are kept for the time retention all the same, as
            // the evidence an operator weighs for its orphans elsewhere
            // (LookupTransaction); positions follow time closely enough
            // that the first young one ends the pass.
            let take = |incarnation: u64, below: u64, finished_by: u64, ops: &mut Vec<Op>, passed: &mut Vec<_>| {
                for (entry, id) in self.collectable.range((coordinator.clone(), incarnation, 0)..) {
                    if ops.len() >= limit || entry.0 != *coordinator || entry.1 != incarnation || entry.2 >= below {
                        break;
                    }
                    if self.txns.get(id).is_some_and(|txn| txn.prepared_at_ms > finished_by) {
                        break;
                    }
                    ops.push(Op::Delete(txn_key(id)));
                    passed.push(entry.clone());
                }
            };
            for retired in &view.retired {
                take(*retired, u64::MAX, now_ms.saturating_sub(retention_ms), &mut ops, &mut passed);
            }
            take(view.current, view.low_watermark, u64::MAX, &mut ops, &mut passed);
        }
        for entry in passed {
            if let Some(id) = self.collectable.remove(&entry) {
                self.forget_txn(&id);
            }
        }
        while let Some((finished_at, _)) = self.finished.front() {
            if finished_at.saturating_add(self.config.finished_retention_ms) > now_ms || ops.len() >= limit {
                break;
            }
            let (_, retained) = self.finished.pop_front().expect("front exists");
            match retained {
                Retained::Txn(txn_id) => {
                    if matches!(self.txns.get(&txn_id), Some(txn) if txn.state != TxnState::Prepared && txn.heuristic.is_none())
                    {
                        self.forget_txn(&txn_id);
                        ops.push(Op::Delete(txn_key(&txn_id)));
                    }
                }
                Retained::Key(key) => {
                    if self.forget_saga_record(&key) {
                        ops.push(Op::Delete(key));
                    }
                }
            }
        }
        Effects { ops, durability: Durability::Buffered }
    }

    /// Drops a collected record from memory, and its key from the keys held.
    fn forget_txn(&mut self, id: &TxnId) {
        let Some(txn) = self.txns.remove(id) else { return };
        if let Some(key) = txn.idempotency_key {
            let entry = (txn.coordinator, key);
            if self.keys.get(&entry) == Some(id) {
                self.keys.remove(&entry);
            }
        }
    }

    /// Closes or reopens an account.
    pub fn set_closed(&mut self, id: AccountId, closed: bool) -> Result<(Account, Effects), Error> {
        let node = self.config.node_id.clone();
        let account = self
            .accounts
            .get_mut(&id)
            .ok_or_else(|| Error::NotFound(format!("account {id} does not exist on {node}")))?;
        account.closed = closed;
        let account = *account;
        Ok((account, Effects { ops: vec![account_put(id, &account)], durability: Durability::Fsync }))
    }
}

/// The error for a two-phase message (`what`) about a transaction that was
/// committed or refused here in one phase: the other protocol's id.
fn one_phase_not_two_phase(txn_id: &TxnId, what: &str) -> Error {
    Error::FailedPrecondition(format!(
        "{txn_id} was committed or refused here in one phase; {what} for it (two-phase commit) is refused"
    ))
}

/// A batch holds 1 to `max` items in its field `field`.
pub fn check_batch_len(field: &str, len: usize, max: usize) -> Result<(), Error> {
    if len == 0 || len > max {
        return Err(Error::InvalidInput(format!("{field}: a batch holds 1 to {max} items, not {len}")));
    }
    Ok(())
}

pub(crate) mod heuristic;
pub(crate) mod watermark;

#[cfg(test)]
pub(crate) mod tests;
