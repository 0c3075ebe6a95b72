//! The coordinator's protocol core: two-phase commit, presumed abort, with
//! parallel commit (the decision's fsync off the client's path) and
//! one-phase commit for transactions on one participant, with no I/O.
//!
//! # The protocol
//!
//! A transaction's legs are split by participant. One whose legs all live
//! on one participant is committed in one phase (see "One-phase commit"
//! below). Otherwise [`Core::begin`] registers it as PREPARING and asks for
//! a prepare to be sent to each participant, all at once. What follows is
//! classic 2PC ([`CommitProtocol::Classic`]); the driver's default,
//! parallel commit, changes where the decision is written (see "Parallel
//! commit" below). Each answer comes back through [`Core::on_vote`]:
//!
//! - any NO (or a prepare that failed or did not answer within its deadline)
//!   aborts the transaction at once: abort messages go to the participants,
//!   the client hears ABORTED with the reason, and the transaction is
//!   forgotten. Nothing is logged for an abort (presumed abort) except when
//!   the client gave an idempotency key: then the outcome is logged before
//!   the client hears it, so a retry gets the same answer.
//! - when every participant voted YES, the COMMIT decision is written to the
//!   log and fsynced ([`Action::PersistCommit`]). Only when that write is
//!   durable ([`Core::on_commit_durable`]) do the COMMIT messages go out and
//!   the client hear COMMITTED.
//! - COMMIT is redelivered to each participant until it acknowledges
//!   ([`Core::on_commit_acked`]). After the last acknowledgement an end record
//!   replaces the decision ([`Action::PersistEnd`]); it need not be synced: if
//!   it is lost, recovery only redelivers commits that are applied once.
//!
//! # Parallel commit
//!
//! Classic 2PC makes the client wait for two fsyncs one after the other:
//! the prepares' (in parallel), then the decision's. Parallel commit
//! ([`CommitProtocol::Parallel`]; CockroachDB's parallel commits and TiKV's
//! async commit do the same) writes what the decision needs *while* the
//! prepares run, and lets the state of the whole system be the decision:
//!
//! - [`Core::begin`] asks for a staged record ([`StagedRecord`]: the
//!   participants with their legs, the position, the key and the request's
//!   fingerprint; `p/` in the log) to be written and fsynced
//!   ([`Action::PersistStaged`]) and for the prepares to be sent, all at
//!   the same time.
//! - **The transaction is committed once its staged record and every
//!   prepare are durable**: the last of [`Core::on_staged_durable`] and the
//!   last YES ([`Core::on_vote`]) moves it to committing, the client hears
//!   COMMITTED and the COMMITs go out. No decision record is written; the
//!   end record replaces the staged one once every participant
//!   acknowledged (and logs the key's result), without an fsync, as in
//!   2PC. A retry of the key meanwhile hears COMMITTED
//!   ([`Core::committed_in_parallel`]).
//! - **An abort is logged before anyone hears it.** A NO, or a prepare that
//!   failed or timed out, decides the abort; but the staged record is
//!   deleted (with the key's result, if keyed), and the deletion fsynced
//!   ([`Action::PersistStagedAbort`], after the staged record's own write
//!   if that was still going: the deletion must follow it in the log),
//!   before the client hears ABORTED, before any ABORT is sent and before
//!   a decision query is answered ABORT (PENDING until then), and the
//!   transaction holds its participants' watermarks until then.
//!
//! Recovery ([`Core::recover_staged`]) finds every staged record whose
//! transaction did not end or abort, and decides each one as follows:
//!
//! - if some participant's durable watermark is above its position, that
//!   participant acknowledged its COMMIT (a staged transaction holds every
//!   participant's watermark until it acknowledges its COMMIT or the abort
//!   is durable, and an abort's deletion is durable before any watermark
//!   that passes it: the watermark's write comes later in the same log and
//!   is fsynced): it was committed, and its COMMITs are redelivered;
//! - otherwise the prepares are sent again, to every participant, and it is
//!   decided as a new one: a participant that holds it prepared or
//!   committed votes YES, one that never got it prepares it now or refuses
//!   it, and **only a refusal aborts it**: a prepare that fails or times out
//!   is sent again (after `PREPARE_RESEND_PAUSE_MS` in the driver), since
//!   the transaction may have been committed before the crash.
//!
//! Why the outcome recovery reaches is the one any client heard:
//!
//! 1. *A client heard COMMITTED* only once the staged record and every
//!    participant's PREPARED record were durable. No ABORT was ever sent
//!    (an abort is decided only while a vote is missing or NO, and then the
//!    commit never happens in that process), so after a crash every
//!    participant still holds it prepared, or committed (a COMMIT reached
//!    it), or forgot it below a durable watermark (it acknowledged the
//!    COMMIT). Recovery then either sees the watermark and redelivers the
//!    COMMITs, or prepares again and hears YES from every participant
//!    (prepared or committed both answer YES), and commits.
//! 2. *A client heard ABORTED* only once the staged record's deletion was
//!    durable: recovery does not see the transaction, and the log's "no
//!    record" is ABORT for every participant that asks (presumed abort).
//!    Its ABORTs went out only after that deletion, so no ABORT is ever on
//!    its way while a restarted coordinator prepares the same transaction
//!    again (such an ABORT could reach a participant after its new YES and
//!    leave the others committing).
//! 3. *No client heard anything*: any outcome is allowed, as long as it is
//!    one. Without a staged record on disk (the crash came before its
//!    write), no COMMIT was ever sent, and presumed abort aborts it
//!    everywhere. With one, recovery decides it once, as above: a
//!    participant that refuses it recorded the refusal, and, should that
//!    record be lost with its cache (a NO vote is not fsynced), it votes
//!    again and is heard again before anything is sent; nothing was sent
//!    to any participant before that decision.
//!
//! A transaction on one participant never needs this (one-phase commit is
//! cheaper still), and a coordinator whose log is lost loses its staged
//! records as it loses its decisions: their participants' prepared
//! transactions are orphaned, as in 2PC (see `participant.proto`).
//!
//! The core simulation (`tests/simulation.rs`) crashes the coordinator and
//! each participant (process crash and power loss) before every step of a
//! parallel commit, keyed and not, and runs half of its seeded chaos runs
//! (reordering, duplicates, losses, crashes, retries) with it; the
//! whole-system simulation (`sim`) runs it in every scenario but
//! `classic-2pc`.
//!
//! # Decision queries
//!
//! A participant that holds a prepared transaction and hears nothing asks
//! ([`Core::query`]): PENDING while votes are being collected or the decision
//! is being written, COMMIT once it is durable, and, for a transaction this
//! core does not hold, whatever the log says, where no record means ABORT.
//! A transaction id is registered before its first prepare is sent and ids
//! are never reused, so once ABORT was answered for an id, it never commits.
//!
//! A query about a transaction of another incarnation of this coordinator
//! (its log was lost, this one is new) is not answered from this log: see
//! [`other_incarnation`].
//!
//! # Recovery
//!
//! A restarted coordinator reads its decision records and calls
//! [`Core::recover`], which resumes the redelivery of each logged commit.
//! Transactions that were preparing when it crashed have no record, so they
//! are aborted: their participants ask and hear ABORT. Keyed one-phase
//! transactions whose intent is logged and whose outcome is not are sent
//! again ([`Core::recover_intents`]); unkeyed ones in flight are forgotten:
//! their participant applied them or not, at most once, and their clients
//! heard no answer.
//!
//! # Positions and low watermarks
//!
//! Each transaction has a position ([`Core::begin`] takes it; the driver
//! hands positions out under this core's lock, see `node.rs`): strictly
//! increasing within the coordinator's incarnation, across restarts. For
//! each participant the core keeps the transactions that still need
//! something from it, ordered by position ([`crate::watermark`]):
//!
//! - from [`Core::begin`] until its vote, a transaction holds every one of
//!   its participants;
//! - once every vote was YES (deciding, then committing), it holds each
//!   participant until that participant acknowledges its COMMIT;
//! - a one-phase transaction holds its participant until its answer is in
//!   (and, with a key, its outcome is logged): see "One-phase commit";
//! - an abort releases every participant at once: the ABORT is sent once
//!   and a participant that misses it asks, and hears ABORT (no record); so
//!   a participant that holds prepared a transaction below its watermark
//!   may take it as aborted, and a late PREPARE below it is refused.
//!
//! The low watermark of a participant is the smallest position among the
//! transactions that hold it, or, with none, the next position. What is
//! sent ([`Core::watermark`]) is the last such value made durable in the
//! log ([`Core::watermarks_due`], [`Core::on_watermarks_durable`]): a
//! restarted coordinator recovers its logged commits with every participant
//! pending again, and a recovered commit below a participant's durable
//! watermark had been acknowledged by it, so it does not hold it again (its
//! COMMIT is still redelivered: a duplicate, or one the participant forgot
//! below the watermark, is acknowledged). So the watermark a participant
//! hears never goes back, across restarts too; the core asserts it.
//!
//! # One-phase commit
//!
//! A transaction whose legs all live on one participant needs no vote: that
//! participant alone can decide it. [`Core::begin`] (when
//! [`Core::commits_in_one_phase`]: by default unless it carries an
//! idempotency key under parallel commit, see below) sends it there once
//! ([`Action::SendOnePhase`]); the participant judges it as it would a
//! prepare, and either posts the legs and records COMMITTED in one write,
//! fsynced before it answers, or refuses and records the refusal (with its
//! reason, durable before it answers) and changes nothing else (see the
//! participant's `core.rs`, `commit_one_phase`). Its answer ends the
//! transaction ([`Core::on_one_phase_answer`]): the client hears it. No
//! PREPARED state exists anywhere, so nobody is ever in doubt, nothing is
//! asked, and there is no COMMIT to deliver.
//!
//! - **Without a key, the coordinator writes nothing.** The transaction
//!   holds its participant's watermark from [`Core::begin`] until the
//!   answer. A request that gets no answer is sent again (with backoff)
//!   until one comes; the participant answers a duplicate with its first
//!   answer. The coordinator cannot abort a one-phase transaction on its
//!   own (the participant decides), so when the client's deadline
//!   (`prepare_timeout_ms`) passes with no answer, the client hears that the
//!   outcome is not known yet ([`Action::ReplyUnknown`]: UNAVAILABLE), where
//!   2PC would have answered ABORTED; the answer, when it comes, is logged
//!   as a finished record for status lookups. That is the one thing a
//!   client sees differently.
//! - **With a key, an intent first.** The hazard: the participant applied
//!   the transaction, and the coordinator crashed before the key's outcome
//!   was durable; the client's retry with the same key would find nothing,
//!   start a new transaction and move the money twice. So the intent
//!   ([`IntentRecord`]: the key, the participant, the position, the legs;
//!   `i/` in the log) is fsynced before the request is sent
//!   ([`Action::PersistIntent`], [`Core::on_intent_durable`]). The
//!   participant's answer goes to the client at once; the outcome is then
//!   logged under the key in one write that deletes the intent
//!   ([`Action::PersistOnePhaseOutcome`], which needs no fsync: see 4), and
//!   only once that is written ([`Core::on_one_phase_logged`]) does the
//!   transaction give up its key and its participant's watermark. Until
//!   then a retry of the key hears the answer given
//!   ([`Core::answered_one_phase`]), or, before the answer, the usual "in
//!   flight, retry" (a key's other uses keep their rules: another request
//!   under it is FAILED_PRECONDITION). A restart reads every intent and
//!   sends its request again ([`Core::recover_intents`]), holding the key
//!   and the watermark, and logs the answer.
//!
//! Why it is exactly-once, across every crash and duplicate:
//!
//! 1. *A participant applies a one-phase transaction at most once, and
//!    answers every delivery with the first outcome.* Its record
//!    (COMMITTED, or ABORTED with the refusal) is durable before any answer
//!    leaves, and stays until the coordinator's watermark passes the
//!    transaction's position; from then on a delivery that finds no record
//!    is below the watermark and refused as late, applying nothing (the
//!    watermark is written before the deletion it allows, so a crash never
//!    keeps the one without the other).
//! 2. *The watermark passes a one-phase transaction only once nothing more
//!    is needed from its participant:* once the answer is in, and, with a
//!    key, once the outcome is durable in the log. So while the coordinator
//!    may still send the request again, the participant still holds the
//!    record, and the request gets the first answer, never "late".
//! 3. *Keyed, the log always says enough.* At every instant one of these
//!    holds: (a) neither intent nor outcome is durable, and no request was
//!    ever sent (the intent is durable before the first one); (b) the
//!    intent is durable: whatever the participant did, a restart sends the
//!    request again and, by 1 and 2, hears the first outcome, which is
//!    what the client may have heard, and logs it; meanwhile the key is in
//!    flight, so no second transaction with it begins; (c) the outcome is
//!    durable under the key (and the intent gone, in the same write): a
//!    retry reads it. A crash in (a) loses nothing that was done, and the
//!    retry starts afresh; in (b) and (c) the key keeps its one answer.
//! 4. *Across restarts the watermark keeps 2.* The watermark passes a
//!    keyed one-phase transaction only after the write that logged its
//!    outcome and deleted its intent; the watermark is written after it,
//!    in the log's one write-ahead log, and fsynced before any participant
//!    hears it, which makes that earlier write durable too (so the
//!    outcome's write needs no fsync of its own, as 2PC's end record
//!    needs none). Until then a power loss keeps the intent, and a restart
//!    asks again a participant that still holds the record. So an intent
//!    on disk is never below its participant's durable watermark:
//!    [`Core::recover_intents`] refuses a log where one is (it is
//!    corrupt), rather than resend a request the participant could take
//!    for late.
//!
//! 5. *A lost log* (a new incarnation) loses the intents with it. A
//!    one-phase transaction its predecessor sent was applied at most once
//!    (a request of a retired incarnation with no record is late), and
//!    the participant keeps a committed one's key with its record (for the
//!    time retention, once the incarnation is retired): a retry of the key
//!    to the new incarnation is refused naming it
//!    ([`AbortReason::KeyOfLostIncarnation`]), as a prepared orphan's is.
//!
//! The coordinator simulation (`tests/simulation.rs`) crashes every node
//! before every step of unkeyed and keyed one-phase transfers (process
//! crashes and power losses), retries the key, and checks that every
//! account holds exactly what the transactions applied once each give,
//! that every answer a key got is the same, and that at most one
//! transaction of a key is applied; its seeded runs mix one-phase and 2PC
//! transfers with losses, duplicates, reordering, retries and collection
//! by watermark. The whole-system simulation runs the same under every
//! fault (`sim`, scenario `one-phase`).
//!
//! **Why the keyed intent is not written in parallel with the request.**
//! Written at the same time, the client would wait for one fsync instead
//! of two; but a crash after the participant applied the transaction and
//! before the intent was durable leaves no trace of it in the log: the
//! restarted coordinator's watermark passes it, the participant collects
//! its record, and the client's retry moves the money twice (the hazard
//! above). A sound one-fsync design needs the participant to keep the key
//! until the coordinator is known to have logged it, across the
//! coordinator's restarts. Keys kept by time at the participant for every
//! keyed transaction would not fit (its records live in memory: a day of
//! keys). What would fit, for a follow-up: the participant keeps the key in
//! a keyed one-phase record (and refuses another transaction with that
//! key while it does, answering the first one's outcome); a restarted
//! coordinator, before its watermark for a participant passes the durable
//! floor it read at start, tells that participant the window of positions
//! whose keys it may not have logged (from that floor to its new
//! generation's first position) and waits for the acknowledgement; the
//! participant keeps the keyed records in such a window for the
//! idempotency retention rather than by watermark (a few per crash). Then
//! the intent is not needed at all, and a keyed one-phase transfer pays
//! one fsync too. It needs a new RPC, keys and leg fingerprints in the
//! participant's records, a new answer ("this key is taken by T, whose
//! outcome is O") and its proof at every crash point; the intent stays
//! sequential until then, and the outcome's write stays off the client's
//! path.
//!
//! **Which way a transaction on one participant goes**
//! ([`OnePhaseCommit`], `--one-phase-commit`). Unkeyed, one-phase is the
//! cheapest there is: one round trip, one fsync. Keyed, it costs two
//! fsyncs in a row, and parallel commit with one participant costs one
//! fsync's time (its staged record's and the prepare's at once) for two
//! more messages and two more writes off the client's path (the lazy
//! COMMIT, which under load rides on a prepare, and the end record). So by
//! default ([`OnePhaseCommit::Auto`]) a keyed transaction on one
//! participant goes by parallel commit, and by one phase only under
//! classic 2PC (whose prepare and decision are two fsyncs in a row as
//! well, with more messages). Measured with the bench's keyed transfers
//! (2026-12-03, the same hour, two runs each): at one client, every
//! transfer on one participant, p50 1.18–1.26 ms in one phase, 1.03–1.07
//! ms by parallel commit; at 64 clients, half the transfers on one
//! participant, 4,195–4,875 commits/s with keyed one-phase and
//! 5,022–5,938 with none (there its separate queue also halved the
//! batches: 2.3 one-phase commits a call beside 4.3 prepares, where the
//! prepares alone go 6.5 a call). `Always` keeps the keyed one-phase
//! path selectable (the whole-system simulation's `one-phase` scenario
//! runs it), and all of the above holds for it unchanged.
//!
//! **The audit.** A one-phase transaction needs nothing from the audit: it
//! is applied in one write at one participant, under the lock its balance
//! reads take, and it moves no money between participants, so an audit
//! sees all of it or none of it, and its sum is exact either way.
//!
//! **Cost per committed transfer** (one transfer alone; batching shares
//! calls and fsyncs between transfers at load, group commit shares
//! fsyncs). Messages count each request and each answer; "lazy" writes
//! are made durable by another write's fsync (or the store's linger), and
//! "buffered" ones need none.
//!
//! | | critical path to the answer | in all |
//! | --- | --- | --- |
//! | 2PC, two participants | 4 messages (1 round trip), 2 sequential fsyncs (prepares in parallel, then the decision) | 8 messages; 3 fsyncs, 2 lazy commits, 1 buffered end record |
//! | parallel commit, two participants | 4 messages (1 round trip), 1 fsync's time (the staged record's in parallel with the prepares') | 8 messages; 3 fsyncs, 2 lazy commits, 1 buffered end record |
//! | 2PC, one participant (one-phase off) | 2 messages, 2 sequential fsyncs (prepare, decision) | 4 messages; 2 fsyncs, 1 lazy commit, 1 buffered end record |
//! | one-phase, no key | 2 messages, 1 fsync (the participant's) | 2 messages; 1 fsync; nothing at the coordinator |
//! | one-phase, keyed | 2 messages, 2 sequential fsyncs (intent, participant) | 2 messages; 2 fsyncs, 1 buffered outcome |
//!
//! A keyed 2PC transfer costs the same as an unkeyed one (the key's result
//! is in the decision's write; a parallel commit's, in its end record).
//! Parallel commit moves no fewer bytes and makes no fewer fsyncs than
//! classic 2PC: it overlaps the coordinator's with the participants', so the
//! client waits for one round trip and the slower of two concurrent fsyncs
//! instead of a round trip and two fsyncs in a row; an aborted transfer
//! pays one more fsync (its staged record's deletion) before its answer. So one-phase halves the fsyncs on an
//! unkeyed transfer's path, halves the messages, and takes the
//! coordinator's write off it; keyed, it keeps two sequential fsyncs but
//! saves the COMMIT round, the commit's write and the end record.
//!
//! # Input
//!
//! Nothing reaches a panic: a transaction id already in use, an empty split
//! of legs, a vote or an acknowledgement for a transaction this core does
//! not hold, or a callback in the wrong phase is refused or ignored, and
//! changes nothing (the property test in `proptests.rs` throws random
//! sequences of them at the core). A reason a participant sends back is
//! clipped to `REASON_LEN_MAX` where the driver receives it, and an
//! outcome's reason to `REASON_STORED_LEN_MAX` here, so every outcome fits
//! the log's records.
//!
//! # Known caveat
//!
//! A coordinator that stays down blocks its prepared participants: they keep
//! the reservations until it comes back. That is the price of 2PC; sagas do
//! not pay it (and pay in isolation instead).

use crate::watermark::Watermarks;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tandem::domain::{Id, Leg, TxnId};
use tandem::Error;

pub type ParticipantId = Id;

/// Why a transaction aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    InsufficientFunds,
    BalanceOverflow,
    UnknownAccount,
    ParticipantUnavailable,
    Refused,
    /// 2PC only: a participant holds the transaction's idempotency key for
    /// a transaction of an earlier incarnation of this coordinator (its log
    /// lost; that transaction orphaned or decided by an operator). The
    /// outcome's text is that earlier transaction's id, and nothing else:
    /// the client hears FAILED_PRECONDITION naming it.
    KeyOfLostIncarnation,
}

impl AbortReason {
    /// The reason as a metric's label.
    pub fn as_str(self) -> &'static str {
        match self {
            AbortReason::InsufficientFunds => "insufficient_funds",
            AbortReason::BalanceOverflow => "balance_overflow",
            AbortReason::UnknownAccount => "unknown_account",
            AbortReason::ParticipantUnavailable => "participant_unavailable",
            AbortReason::Refused => "refused",
            AbortReason::KeyOfLostIncarnation => "key_of_lost_incarnation",
        }
    }
}

/// How a transaction or saga ended, with the reason it did not commit (what
/// its client hears as `abort_reason`) and a sentence for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2PC committed, or a saga completed.
    Committed,
    Aborted(AbortReason, String),
    /// Sagas only: the saga turned back and its debit was refunded (or had
    /// never run). The reason is what turned it back: `None` when that is
    /// unknown (a saga resumed after a crash had lost its logged stage, or
    /// an outcome logged before reasons were).
    Compensated(Option<AbortReason>, String),
    /// Sagas only: the refund failed; the money is parked in suspense. The
    /// reason is what turned the saga back, as for `Compensated`.
    DeadLettered(Option<AbortReason>, String),
}

/// What a participant answered to a prepare, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteResult {
    Yes,
    No(AbortReason, String),
}

/// What the log holds for a transaction whose commit was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRecord {
    pub participants: Vec<ParticipantId>,
    pub idempotency_key: Option<Id>,
    /// The transaction's position (0 in records written before positions).
    pub position: u64,
}

/// How a transaction over several participants is committed (see the
/// essay, "Parallel commit").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitProtocol {
    /// The decision is fsynced after every vote is in, before the client
    /// hears COMMITTED: two sequential fsyncs on the client's path.
    Classic,
    /// A staged record is fsynced while the prepares run; the transaction is
    /// committed once it and every prepare are durable: one fsync's time on
    /// the client's path.
    Parallel,
}

/// Which transactions whose legs all live on one participant are committed
/// in one phase (see the essay, "One-phase commit"); the others go by the
/// [`CommitProtocol`], with one participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnePhaseCommit {
    /// Where it is the faster way: every one without an idempotency key;
    /// a keyed one only under classic 2PC. A keyed one-phase commit fsyncs
    /// its intent before its request goes, two fsyncs in a row, where
    /// parallel commit overlaps its staged record's fsync with the
    /// prepare's (see "Which way a transaction on one participant goes").
    Auto,
    /// Every one, keyed ones with their intent logged first.
    Always,
    /// None: every transaction by the commit protocol.
    Off,
}

impl OnePhaseCommit {
    /// Whether a transaction over `participants` participants, with an
    /// idempotency key or not, is committed in one phase under `protocol`.
    pub fn applies(self, protocol: CommitProtocol, participants: usize, keyed: bool) -> bool {
        participants == 1
            && match self {
                OnePhaseCommit::Always => true,
                OnePhaseCommit::Off => false,
                OnePhaseCommit::Auto => !keyed || protocol == CommitProtocol::Classic,
            }
    }
}

/// What the log holds for a transaction committed by parallel commit from
/// before its outcome is known until it ends (`p/` in the log): enough to
/// prepare it again after a restart, and its key's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedRecord {
    pub idempotency_key: Option<Id>,
    pub position: u64,
    /// The request's fingerprint (`log::fingerprint`), for its key's result.
    /// The core does not compute it: the driver, which has the request,
    /// fills it in before it writes the record, and gives it back with
    /// [`Core::on_staged_durable`].
    pub fingerprint: u64,
    /// The legs, by participant (each with at least one).
    pub legs: BTreeMap<ParticipantId, Vec<Leg>>,
}

/// What the log holds for a keyed one-phase transaction from before its
/// request is sent until its outcome is logged (see the essay): enough to
/// send the same request again after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntentRecord {
    pub participant: ParticipantId,
    pub idempotency_key: Id,
    pub position: u64,
    /// Every leg of the transaction (all on `participant`).
    pub legs: Vec<Leg>,
}

/// What a participant answered to a one-phase commit, as the driver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnePhaseResult {
    /// The legs are posted there, durably.
    Committed,
    /// Refused: nothing changed there, and nothing will.
    Refused(AbortReason, String),
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SendPrepare {
        txn: TxnId,
        position: u64,
        participant: ParticipantId,
        legs: Vec<Leg>,
        /// The client's key, which the participant keeps while prepared
        /// (participant.proto, PrepareRequest.idempotency_key).
        idempotency_key: Option<Id>,
        /// Sent again after a failed one (a recovered parallel commit's):
        /// the driver waits a little first, so that a participant that is
        /// down is not called in a tight loop.
        after_failure: bool,
    },
    /// Write and fsync the commit decision, then call [`Core::on_commit_durable`].
    PersistCommit { txn: TxnId, record: CommitRecord },
    /// Parallel commit: write and fsync the staged record (its fingerprint
    /// filled in by the driver), at the same time as the prepares go out,
    /// then call [`Core::on_staged_durable`].
    PersistStaged { txn: TxnId, record: StagedRecord },
    /// Parallel commit, aborted: delete the staged record (and, with a key,
    /// log the key's result, as [`Action::PersistAbort`] does) and fsync,
    /// then call [`Core::on_abort_durable`]. Only once the staged record is
    /// durable, so that the deletion comes after it in the log.
    PersistStagedAbort { txn: TxnId, idempotency_key: Option<Id>, fingerprint: u64, outcome: Outcome },
    /// Send COMMIT until acknowledged, then call [`Core::on_commit_acked`].
    SendCommit { txn: TxnId, participant: ParticipantId },
    /// Send ABORT once; a participant that misses it asks later.
    SendAbort { txn: TxnId, position: u64, participant: ParticipantId },
    /// Write and fsync a keyed abort's outcome, then call [`Core::on_abort_durable`].
    PersistAbort { txn: TxnId, key: Id, outcome: Outcome },
    /// Answer the client.
    Reply { txn: TxnId, outcome: Outcome },
    /// Replace the decision (or the staged record) with an end record (no
    /// fsync needed), then call [`Core::on_end_durable`]. `staged`: a
    /// parallel commit's request fingerprint: its key's result is logged in
    /// this write (a classic commit's was, with its decision).
    PersistEnd { txn: TxnId, idempotency_key: Option<Id>, staged: Option<u64> },
    /// Keyed one-phase only: write and fsync the intent, then call
    /// [`Core::on_intent_durable`].
    PersistIntent { txn: TxnId, record: IntentRecord },
    /// Send the one-phase commit, again (with backoff) until the participant
    /// answers; give the answer to [`Core::on_one_phase_answer`], and call
    /// [`Core::on_one_phase_overdue`] once the client's deadline passes
    /// with no answer.
    SendOnePhase { txn: TxnId, position: u64, participant: ParticipantId, legs: Vec<Leg>, idempotency_key: Option<Id> },
    /// Tell the client that its transaction's outcome is not known yet.
    ReplyUnknown { txn: TxnId, message: String },
    /// Log a one-phase outcome: under its key (the intent deleted in the
    /// same write), or, unkeyed, as a finished record for status lookups.
    /// Its client may have heard it already. No fsync is needed (the
    /// watermark's own write, later in the log and fsynced before it is
    /// sent, covers it): call [`Core::on_one_phase_logged`] once it is
    /// written.
    PersistOnePhaseOutcome { txn: TxnId, idempotency_key: Option<Id>, outcome: Outcome, legs: Vec<Leg> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Preparing {
        waiting: BTreeSet<ParticipantId>,
    },
    /// Every vote was YES; the decision is being made durable.
    Deciding,
    /// Parallel commit: the prepares and the staged record are on their
    /// way. Committed once every vote was YES and the staged record is
    /// durable ([`ActiveTxn::staged`]).
    Staging {
        waiting: BTreeSet<ParticipantId>,
        /// Resumed after a restart only: each participant's legs, to prepare
        /// again at one that did not answer. Such a transaction may have
        /// been committed before the restart, so only a participant's
        /// refusal aborts it, never a prepare that failed or timed out.
        resend: BTreeMap<ParticipantId, Vec<Leg>>,
    },
    /// Parallel commit, aborted before its staged record was durable: the
    /// abort is logged once it is (the deletion must follow the record).
    AbortingUnstaged {
        outcome: Outcome,
    },
    Committing {
        pending: BTreeSet<ParticipantId>,
    },
    /// A keyed abort whose outcome is being logged.
    Aborting,
    /// Keyed one-phase: the intent is being made durable; nothing is sent.
    Intending {
        legs: Vec<Leg>,
    },
    /// One-phase: the request is out (again until answered). `told_unknown`:
    /// the client heard that the outcome is unknown (its deadline passed,
    /// or this coordinator restarted), so the outcome is logged when known.
    OnePhase {
        legs: Vec<Leg>,
        told_unknown: bool,
    },
    /// One-phase, answered (the client heard it, unless it was told
    /// unknown): the outcome is being logged.
    OnePhaseLogging {
        legs: Vec<Leg>,
        outcome: Outcome,
    },
}

#[derive(Debug, Clone)]
pub struct ActiveTxn {
    pub position: u64,
    pub participants: Vec<ParticipantId>,
    pub idempotency_key: Option<Id>,
    pub phase: Phase,
    /// Parallel commit: the request's fingerprint, once the staged record
    /// is durable (`None` for classic 2PC and one-phase transactions).
    pub staged: Option<u64>,
    /// Resumed from the log after a restart: no client waits for its
    /// outcome (its retry with the key reads the log), so none is replied.
    pub recovered: bool,
}

/// What a participant hears when it asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Abort,
    Pending,
    /// The transaction belongs to another incarnation of this coordinator
    /// (see [`other_incarnation`]): its decision is unknown here.
    UnknownIncarnation,
}

/// Which other incarnation a decision query is about, if any: the one the
/// participant names (`asked`, nonzero), or, when it names none, the one
/// the transaction id carries (`carried`). A transaction of another
/// incarnation was decided, if at all, in a log that is gone: this log's
/// "no record" says nothing about it, so it is never answered ABORT by
/// presumption (it is DECISION_UNKNOWN_INCARNATION, and the participant
/// keeps it for an operator).
pub fn other_incarnation(own: u64, asked: u64, carried: Option<u64>) -> Option<u64> {
    let named = if asked != 0 { Some(asked) } else { carried };
    named.filter(|incarnation| *incarnation != own)
}

pub struct Core {
    active: HashMap<TxnId, ActiveTxn>,
    keys_in_flight: HashMap<Id, TxnId>,
    active_max: usize,
    marks: Watermarks,
    /// Whether a transaction with one participant is committed in one phase
    /// (the default) or by classic 2PC.
    one_phase: OnePhaseCommit,
    /// How transactions over several participants are committed.
    commit_protocol: CommitProtocol,
}

impl Core {
    /// A core that commits single-participant transactions in one phase
    /// ([`OnePhaseCommit::Auto`], which under classic 2PC is all of them),
    /// and the others by classic 2PC.
    pub fn new(active_max: usize) -> Core {
        assert!(active_max > 0);
        Core {
            active: HashMap::new(),
            keys_in_flight: HashMap::new(),
            active_max,
            marks: Watermarks::default(),
            one_phase: OnePhaseCommit::Auto,
            commit_protocol: CommitProtocol::Classic,
        }
    }

    /// Sets how transactions over several participants begun from now on
    /// are committed (classic 2PC unless told; the driver's default is
    /// parallel commit).
    pub fn set_commit_protocol(&mut self, protocol: CommitProtocol) {
        self.commit_protocol = protocol;
    }

    /// Sets which single-participant transactions begun from now on are
    /// committed in one phase (off: every transaction runs by the commit
    /// protocol, as for a comparison).
    pub fn set_one_phase(&mut self, mode: OnePhaseCommit) {
        self.one_phase = mode;
    }

    /// Whether a transaction over `participants` participants, with an
    /// idempotency key or not, is committed in one phase when it begins.
    pub fn commits_in_one_phase(&self, participants: usize, keyed: bool) -> bool {
        self.one_phase.applies(self.commit_protocol, participants, keyed)
    }

    /// Sets where positions start (the first of this process's generation)
    /// and the durable watermarks read back from the log; before
    /// [`Core::recover`].
    pub fn start_positions(&mut self, next_position: u64, floors: BTreeMap<ParticipantId, u64>) {
        self.marks.start(next_position, floors);
    }

    /// The low watermark to send to `participant` (see the essay).
    pub fn watermark(&self, participant: &ParticipantId) -> u64 {
        self.marks.floor(participant)
    }

    /// The watermarks that may rise, to be made durable in the log and then
    /// passed to [`Core::on_watermarks_durable`].
    pub fn watermarks_due(&self) -> Vec<(ParticipantId, u64)> {
        self.marks.due()
    }

    /// These watermarks are durable: they are sent from now on. Each is
    /// asserted to be no lower than the one it replaces.
    pub fn on_watermarks_durable(&mut self, advanced: &[(ParticipantId, u64)]) {
        self.marks.on_durable(advanced)
    }

    /// How many transactions hold `participant`'s watermark.
    pub fn holding_count(&self, participant: &ParticipantId) -> usize {
        self.marks.held_count(participant)
    }

    /// Starts a transaction whose legs are already split by participant (at
    /// least one participant, each with at least one leg), at `position`:
    /// above every position this core was given before, or it is refused.
    pub fn begin(
        &mut self,
        txn: TxnId,
        position: u64,
        legs_by_participant: BTreeMap<ParticipantId, Vec<Leg>>,
        idempotency_key: Option<Id>,
    ) -> Result<Vec<Action>, Error> {
        if legs_by_participant.is_empty() || legs_by_participant.values().any(|legs| legs.is_empty()) {
            return Err(Error::InvalidInput(format!("{txn} needs at least one leg on each of its participants")));
        }
        if legs_by_participant.len() > tandem::domain::LEGS_MAX {
            return Err(Error::InvalidInput(format!(
                "{txn} spans {} participants; a transaction has at most {} legs",
                legs_by_participant.len(),
                tandem::domain::LEGS_MAX
            )));
        }
        if self.active.contains_key(&txn) {
            return Err(Error::AlreadyExists(format!("transaction {txn} is in flight already")));
        }
        if self.active.len() >= self.active_max {
            return Err(Error::Busy(format!(
                "{} transactions are in flight, the most this coordinator takes",
                self.active_max
            )));
        }
        if let Some(key) = &idempotency_key {
            if let Some(other) = self.keys_in_flight.get(key) {
                return Err(Error::Conflict(format!(
                    "a transaction with idempotency key {key} is in flight ({other}); retry to get its outcome"
                )));
            }
        }
        self.marks.register(position)?;
        if let Some(key) = &idempotency_key {
            self.keys_in_flight.insert(key.clone(), txn.clone());
        }
        let participants: Vec<ParticipantId> = legs_by_participant.keys().cloned().collect();
        for participant in &participants {
            self.marks.hold(participant, position, &txn);
        }
        if self.commits_in_one_phase(participants.len(), idempotency_key.is_some()) {
            let (participant, legs) = legs_by_participant.into_iter().next().expect("one participant");
            let (phase, action) = match &idempotency_key {
                // The intent first (see the essay): the request goes once it is durable.
                Some(key) => {
                    let record =
                        IntentRecord { participant, idempotency_key: key.clone(), position, legs: legs.clone() };
                    (Phase::Intending { legs }, Action::PersistIntent { txn: txn.clone(), record })
                }
                None => {
                    let send = Action::SendOnePhase {
                        txn: txn.clone(),
                        position,
                        participant,
                        legs: legs.clone(),
                        idempotency_key: None,
                    };
                    (Phase::OnePhase { legs, told_unknown: false }, send)
                }
            };
            self.active.insert(
                txn,
                ActiveTxn { position, participants, idempotency_key, phase, staged: None, recovered: false },
            );
            return Ok(vec![action]);
        }
        let waiting = participants.iter().cloned().collect();
        let (phase, mut actions) = match self.commit_protocol {
            CommitProtocol::Classic => (Phase::Preparing { waiting }, Vec::new()),
            // The staged record goes first in the list, but its write and
            // the prepares run at the same time (see "Parallel commit").
            CommitProtocol::Parallel => {
                let record = StagedRecord {
                    idempotency_key: idempotency_key.clone(),
                    position,
                    fingerprint: 0,
                    legs: legs_by_participant.clone(),
                };
                let phase = Phase::Staging { waiting, resend: BTreeMap::new() };
                (phase, vec![Action::PersistStaged { txn: txn.clone(), record }])
            }
        };
        actions.extend(legs_by_participant.into_iter().map(|(participant, legs)| Action::SendPrepare {
            txn: txn.clone(),
            position,
            participant,
            legs,
            idempotency_key: idempotency_key.clone(),
            after_failure: false,
        }));
        self.active
            .insert(txn, ActiveTxn { position, phase, participants, idempotency_key, staged: None, recovered: false });
        Ok(actions)
    }

    /// A participant's vote (or the failure of its prepare). Votes for a
    /// transaction that is no longer preparing are ignored.
    pub fn on_vote(&mut self, txn: &TxnId, participant: &ParticipantId, vote: VoteResult) -> Vec<Action> {
        let Some(active) = self.active.get_mut(txn) else {
            return Vec::new();
        };
        let parallel = matches!(active.phase, Phase::Staging { .. });
        if let Phase::Staging { waiting, resend } = &active.phase {
            // A recovered parallel commit: a failed or late prepare is sent
            // again, after a pause; only a refusal aborts it.
            if let (true, VoteResult::No(AbortReason::ParticipantUnavailable, _), Some(legs)) =
                (waiting.contains(participant), &vote, resend.get(participant))
            {
                return vec![Action::SendPrepare {
                    txn: txn.clone(),
                    position: active.position,
                    participant: participant.clone(),
                    legs: legs.clone(),
                    idempotency_key: active.idempotency_key.clone(),
                    after_failure: true,
                }];
            }
        }
        let (Phase::Preparing { waiting } | Phase::Staging { waiting, .. }) = &mut active.phase else {
            return Vec::new();
        };
        if !waiting.remove(participant) {
            return Vec::new(); // a duplicate vote
        }
        match vote {
            // Parallel commit: committed now if the staged record is durable
            // too, or as soon as it is.
            VoteResult::Yes if parallel => {
                if waiting.is_empty() && active.staged.is_some() {
                    return Self::commit_staged(txn, active);
                }
                Vec::new()
            }
            VoteResult::Yes if waiting.is_empty() => {
                active.phase = Phase::Deciding;
                let record = CommitRecord {
                    participants: active.participants.clone(),
                    idempotency_key: active.idempotency_key.clone(),
                    position: active.position,
                };
                vec![Action::PersistCommit { txn: txn.clone(), record }]
            }
            VoteResult::Yes => Vec::new(),
            VoteResult::No(reason, message) => {
                // A participant that voted NO recorded its refusal; every
                // other one is told ABORT, including one whose prepare failed
                // or timed out: that prepare may still arrive, and the abort
                // leaves a tombstone there so it cannot reserve funds.
                let voted_no = reason != AbortReason::ParticipantUnavailable;
                // The outcome goes into the log's records: bounded here too.
                let message = tandem::domain::clip_text(&message, tandem::domain::REASON_STORED_LEN_MAX);
                let outcome = Outcome::Aborted(reason, message);
                let position = active.position;
                if parallel {
                    // The staged record must be deleted, durably, before the
                    // client hears ABORTED and before any ABORT goes out: a
                    // restart that found it would prepare the transaction
                    // again, and an ABORT still on its way could then
                    // overtake a participant's new YES. The watermarks stay
                    // held until then too, so that one that passes the
                    // transaction is never durable before the deletion is
                    // (see the essay). [`Core::on_abort_durable`] sends the
                    // ABORTs.
                    return match active.staged {
                        Some(fingerprint) => vec![Self::log_staged_abort(txn, active, fingerprint, outcome)],
                        None => {
                            active.phase = Phase::AbortingUnstaged { outcome };
                            Vec::new()
                        }
                    };
                }
                let mut actions: Vec<Action> = active
                    .participants
                    .iter()
                    .filter(|p| !(voted_no && *p == participant))
                    .map(|p| Action::SendAbort { txn: txn.clone(), position, participant: p.clone() })
                    .collect();
                // Decided: nothing more is needed from any participant.
                for p in &active.participants {
                    self.marks.release(p, position, txn);
                }
                match active.idempotency_key.clone() {
                    Some(key) => {
                        active.phase = Phase::Aborting;
                        actions.push(Action::PersistAbort { txn: txn.clone(), key, outcome });
                    }
                    None => {
                        self.active.remove(txn);
                        actions.push(Action::Reply { txn: txn.clone(), outcome });
                    }
                }
                actions
            }
        }
    }

    /// The commit decision is durable: tell the client and the participants.
    /// For a transaction that is not deciding (the driver persists a
    /// decision only for one that is), nothing happens.
    pub fn on_commit_durable(&mut self, txn: &TxnId) -> Vec<Action> {
        let Some(active) = self.active.get_mut(txn).filter(|active| active.phase == Phase::Deciding) else {
            tracing::error!(%txn, "a commit decision became durable for a transaction that is not deciding; ignored");
            return Vec::new();
        };
        active.phase = Phase::Committing { pending: active.participants.iter().cloned().collect() };
        let mut actions = vec![Action::Reply { txn: txn.clone(), outcome: Outcome::Committed }];
        actions.extend(
            active.participants.iter().map(|p| Action::SendCommit { txn: txn.clone(), participant: p.clone() }),
        );
        actions
    }

    /// Parallel commit: every prepare and the staged record are durable, so
    /// the transaction is committed: the client hears it and the COMMITs go
    /// out, with no decision record (the staged record and the prepared
    /// records are the decision; its end record replaces the staged one).
    fn commit_staged(txn: &TxnId, active: &mut ActiveTxn) -> Vec<Action> {
        active.phase = Phase::Committing { pending: active.participants.iter().cloned().collect() };
        let mut actions = Vec::with_capacity(1 + active.participants.len());
        if !active.recovered {
            actions.push(Action::Reply { txn: txn.clone(), outcome: Outcome::Committed });
        }
        actions.extend(
            active.participants.iter().map(|p| Action::SendCommit { txn: txn.clone(), participant: p.clone() }),
        );
        actions
    }

    /// Parallel commit, aborted, its staged record durable: the abort is
    /// logged next ([`Core::on_abort_durable`] then tells everyone).
    fn log_staged_abort(txn: &TxnId, active: &mut ActiveTxn, fingerprint: u64, outcome: Outcome) -> Action {
        active.phase = Phase::Aborting;
        Action::PersistStagedAbort {
            txn: txn.clone(),
            idempotency_key: active.idempotency_key.clone(),
            fingerprint,
            outcome,
        }
    }

    /// Parallel commit: the staged record (with this request fingerprint)
    /// is durable. Committed if every vote is in and was YES; an abort
    /// decided meanwhile is logged now. For a transaction that is not
    /// staging, nothing happens.
    pub fn on_staged_durable(&mut self, txn: &TxnId, fingerprint: u64) -> Vec<Action> {
        let Some(active) = self.active.get_mut(txn) else { return Vec::new() };
        match &active.phase {
            Phase::Staging { waiting, .. } if active.staged.is_none() => {
                active.staged = Some(fingerprint);
                if waiting.is_empty() {
                    return Self::commit_staged(txn, active);
                }
                Vec::new()
            }
            Phase::AbortingUnstaged { outcome } => {
                let outcome = outcome.clone();
                active.staged = Some(fingerprint);
                vec![Self::log_staged_abort(txn, active, fingerprint, outcome)]
            }
            _ => {
                tracing::error!(%txn, "a staged record became durable for a transaction that is not staging; ignored");
                Vec::new()
            }
        }
    }

    /// A keyed abort's outcome (or a parallel commit's abort) is durable:
    /// tell the client. For a transaction that is not aborting, nothing
    /// happens.
    pub fn on_abort_durable(&mut self, txn: &TxnId, outcome: Outcome) -> Vec<Action> {
        if !self.active.get(txn).is_some_and(|active| active.phase == Phase::Aborting) {
            tracing::error!(%txn, "a keyed abort became durable for a transaction that is not aborting; ignored");
            return Vec::new();
        }
        let Some(active) = self.active.remove(txn) else { return Vec::new() };
        if let Some(key) = &active.idempotency_key {
            self.keys_in_flight.remove(key);
        }
        // A parallel commit's abort held its watermarks until now (a classic
        // one released them when it was decided: releasing again is a no-op).
        for p in &active.participants {
            self.marks.release(p, active.position, txn);
        }
        let mut actions = Vec::new();
        // A parallel commit's ABORTs go out now that nothing can commit it
        // (to every participant: one that refused it ignores its ABORT).
        if active.staged.is_some() {
            actions.extend(active.participants.iter().map(|p| Action::SendAbort {
                txn: txn.clone(),
                position: active.position,
                participant: p.clone(),
            }));
        }
        if !active.recovered {
            actions.push(Action::Reply { txn: txn.clone(), outcome });
        }
        actions
    }

    pub fn on_commit_acked(&mut self, txn: &TxnId, participant: &ParticipantId) -> Vec<Action> {
        let Some(active) = self.active.get_mut(txn) else {
            return Vec::new();
        };
        let Phase::Committing { pending } = &mut active.phase else {
            return Vec::new();
        };
        if !pending.remove(participant) {
            return Vec::new();
        }
        self.marks.release(participant, active.position, txn);
        if pending.is_empty() {
            return vec![Action::PersistEnd {
                txn: txn.clone(),
                idempotency_key: active.idempotency_key.clone(),
                staged: active.staged,
            }];
        }
        Vec::new()
    }

    /// The end record is durable: the transaction is forgotten. For one that
    /// is not committing with every acknowledgement in, nothing happens.
    pub fn on_end_durable(&mut self, txn: &TxnId) {
        if !self
            .active
            .get(txn)
            .is_some_and(|active| matches!(&active.phase, Phase::Committing { pending } if pending.is_empty()))
        {
            return;
        }
        if let Some(active) = self.active.remove(txn) {
            for p in &active.participants {
                self.marks.release(p, active.position, txn);
            }
            if let Some(key) = &active.idempotency_key {
                self.keys_in_flight.remove(key);
            }
        }
    }

    /// A keyed one-phase transaction's intent is durable: its request goes
    /// out. For one that is not intending, nothing happens.
    pub fn on_intent_durable(&mut self, txn: &TxnId) -> Vec<Action> {
        let Some(active) = self.active.get_mut(txn) else { return Vec::new() };
        let Phase::Intending { legs } = &mut active.phase else {
            tracing::error!(%txn, "an intent became durable for a transaction that is not intending; ignored");
            return Vec::new();
        };
        let legs = std::mem::take(legs);
        let send = Action::SendOnePhase {
            txn: txn.clone(),
            position: active.position,
            participant: active.participants[0].clone(),
            legs: legs.clone(),
            idempotency_key: active.idempotency_key.clone(),
        };
        active.phase = Phase::OnePhase { legs, told_unknown: false };
        vec![send]
    }

    /// The participant answered a one-phase commit: the client hears the
    /// outcome at once (unless it was told unknown); a keyed outcome, and
    /// one its client was told unknown, is logged next, and the
    /// transaction holds its key and its participant's watermark until
    /// that is durable ([`Core::on_one_phase_logged`]); an unkeyed one is
    /// finished. An answer for a transaction that is not waiting for one
    /// (a duplicate), or from another participant, is ignored.
    pub fn on_one_phase_answer(
        &mut self,
        txn: &TxnId,
        participant: &ParticipantId,
        result: OnePhaseResult,
    ) -> Vec<Action> {
        let Some(active) = self.active.get_mut(txn) else { return Vec::new() };
        let Phase::OnePhase { legs, told_unknown } = &mut active.phase else { return Vec::new() };
        if active.participants.first() != Some(participant) {
            return Vec::new();
        }
        let outcome = match result {
            OnePhaseResult::Committed => Outcome::Committed,
            // The outcome goes into the log's records: bounded here too.
            OnePhaseResult::Refused(reason, message) => {
                Outcome::Aborted(reason, tandem::domain::clip_text(&message, tandem::domain::REASON_STORED_LEN_MAX))
            }
        };
        let mut actions = Vec::new();
        if !*told_unknown {
            actions.push(Action::Reply { txn: txn.clone(), outcome: outcome.clone() });
        }
        if active.idempotency_key.is_some() || *told_unknown {
            let legs = std::mem::take(legs);
            actions.push(Action::PersistOnePhaseOutcome {
                txn: txn.clone(),
                idempotency_key: active.idempotency_key.clone(),
                outcome: outcome.clone(),
                legs: legs.clone(),
            });
            active.phase = Phase::OnePhaseLogging { legs, outcome };
        } else {
            let position = active.position;
            self.active.remove(txn);
            self.marks.release(participant, position, txn);
        }
        actions
    }

    /// The client's deadline passed with no answer to a one-phase commit:
    /// it hears that the outcome is unknown (once), and the request keeps
    /// going out until the participant answers. For a transaction that is
    /// not waiting for an answer, or whose client was told already,
    /// nothing happens.
    pub fn on_one_phase_overdue(&mut self, txn: &TxnId) -> Vec<Action> {
        let Some(active) = self.active.get_mut(txn) else { return Vec::new() };
        let Phase::OnePhase { told_unknown, .. } = &mut active.phase else { return Vec::new() };
        if *told_unknown {
            return Vec::new();
        }
        *told_unknown = true;
        let participant = &active.participants[0];
        let retry = if active.idempotency_key.is_some() {
            "retry with the same idempotency key to learn it"
        } else {
            "GetTransaction tells it once known"
        };
        let message = format!(
            "{txn}: {participant} has not answered its one-phase commit in time, so the outcome is not known yet; it is asked again until it answers ({retry})"
        );
        vec![Action::ReplyUnknown { txn: txn.clone(), message }]
    }

    /// A one-phase outcome is written to the log (ahead of any watermark
    /// write that passes it): the transaction is finished, and its key and
    /// its participant's watermark are free. For one whose outcome is not
    /// being logged, nothing happens.
    pub fn on_one_phase_logged(&mut self, txn: &TxnId) {
        if !self.active.get(txn).is_some_and(|active| matches!(active.phase, Phase::OnePhaseLogging { .. })) {
            return;
        }
        if let Some(active) = self.active.remove(txn) {
            for p in &active.participants {
                self.marks.release(p, active.position, txn);
            }
            if let Some(key) = &active.idempotency_key {
                self.keys_in_flight.remove(key);
            }
        }
    }

    /// The one-phase transaction holding `key` whose client heard its
    /// outcome already (being logged), with the outcome and its legs.
    pub fn answered_one_phase(&self, key: &Id) -> Option<(&TxnId, &Outcome, &[Leg])> {
        let txn = self.keys_in_flight.get(key)?;
        match &self.active.get(txn)?.phase {
            Phase::OnePhaseLogging { legs, outcome } => Some((txn, outcome, legs)),
            _ => None,
        }
    }

    /// The parallel commit holding `key` whose client heard COMMITTED (its
    /// COMMITs are being delivered; the key's result is logged with its end
    /// record), with its request's fingerprint.
    pub fn committed_in_parallel(&self, key: &Id) -> Option<(&TxnId, u64)> {
        let txn = self.keys_in_flight.get(key)?;
        let active = self.active.get(txn)?;
        match (&active.phase, active.staged) {
            (Phase::Committing { .. }, Some(fingerprint)) => Some((txn, fingerprint)),
            _ => None,
        }
    }

    /// The answer to a participant's decision query, or `None` when this core
    /// does not hold the transaction and the log must say. A one-phase
    /// transaction is never prepared anywhere: it is PENDING while held
    /// (nothing is decided by its answer), then the log's "no decision".
    pub fn query(&self, txn: &TxnId) -> Option<Decision> {
        self.active.get(txn).map(|active| match active.phase {
            Phase::Preparing { .. } | Phase::Deciding | Phase::Staging { .. } => Decision::Pending,
            Phase::Committing { .. } => Decision::Commit,
            // A parallel commit is aborted for its participants only once
            // its abort is durable (see `on_vote`).
            Phase::Aborting if active.staged.is_some() => Decision::Pending,
            Phase::AbortingUnstaged { .. } => Decision::Pending,
            Phase::Aborting => Decision::Abort,
            Phase::Intending { .. } | Phase::OnePhase { .. } | Phase::OnePhaseLogging { .. } => Decision::Pending,
        })
    }

    /// The transaction running with this idempotency key, if any.
    pub fn key_in_flight(&self, key: &Id) -> Option<&TxnId> {
        self.keys_in_flight.get(key)
    }

    pub fn get(&self, txn: &TxnId) -> Option<&ActiveTxn> {
        self.active.get(txn)
    }

    /// The transactions whose commit is decided (durable) and not yet
    /// acknowledged by every participant: those an audit counts as applied
    /// where it finds them still prepared.
    pub fn committing(&self) -> impl Iterator<Item = &TxnId> {
        self.active.iter().filter(|(_, active)| matches!(active.phase, Phase::Committing { .. })).map(|(txn, _)| txn)
    }

    /// How many parallel commits recovered from the log are being prepared
    /// again: their outcome (perhaps committed, and applied somewhere,
    /// before the restart) is not known yet, so an audit cannot count them.
    pub fn recovered_undecided(&self) -> usize {
        self.active.values().filter(|active| active.recovered && matches!(active.phase, Phase::Staging { .. })).count()
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// Resumes the logged commits of a coordinator that restarted: every
    /// participant of each is told COMMIT again until it acknowledges. A
    /// record without participants, or one for a transaction already held,
    /// is an error (the log is corrupt), and then nothing is resumed. A
    /// commit holds the watermark of each participant whose durable
    /// watermark it is not below (see the essay).
    /// Resumes the keyed one-phase transactions whose intent is logged and
    /// whose outcome is not: each request is sent again until its
    /// participant answers (with the first answer, if it had one), and the
    /// outcome is logged under the key. Each holds its key and its
    /// participant's watermark meanwhile. An intent below its participant's
    /// durable watermark, for a transaction already held, or with a key
    /// already in flight, is an error (the log is corrupt; see the essay),
    /// and then nothing is resumed.
    pub fn recover_intents(&mut self, logged: Vec<(TxnId, IntentRecord)>) -> Result<Vec<Action>, Error> {
        let mut keys = std::collections::HashSet::new();
        for (txn, record) in &logged {
            if self.active.contains_key(txn)
                || self.keys_in_flight.contains_key(&record.idempotency_key)
                || !keys.insert(&record.idempotency_key)
            {
                return Err(Error::Fatal(format!(
                    "the intent of {txn} names a transaction or a key (idempotency key {}) held twice",
                    record.idempotency_key
                )));
            }
            if record.position < self.marks.floor(&record.participant) {
                return Err(Error::Fatal(format!(
                    "the intent of {txn} is at position {}, below the durable watermark {} of {}: its outcome was logged before the watermark passed it",
                    record.position,
                    self.marks.floor(&record.participant),
                    record.participant
                )));
            }
        }
        let mut actions = Vec::new();
        for (txn, record) in logged {
            let IntentRecord { participant, idempotency_key, position, legs } = record;
            self.marks.hold(&participant, position, &txn);
            self.keys_in_flight.insert(idempotency_key.clone(), txn.clone());
            actions.push(Action::SendOnePhase {
                txn: txn.clone(),
                position,
                participant: participant.clone(),
                legs: legs.clone(),
                idempotency_key: Some(idempotency_key.clone()),
            });
            self.active.insert(
                txn,
                ActiveTxn {
                    position,
                    participants: vec![participant],
                    idempotency_key: Some(idempotency_key),
                    // No client waits: the outcome is only logged.
                    phase: Phase::OnePhase { legs, told_unknown: true },
                    staged: None,
                    recovered: true,
                },
            );
        }
        Ok(actions)
    }

    pub fn recover(&mut self, logged: Vec<(TxnId, CommitRecord)>) -> Result<Vec<Action>, Error> {
        for (txn, record) in &logged {
            if record.participants.is_empty() || self.active.contains_key(txn) {
                return Err(Error::Fatal(format!(
                    "the commit decision of {txn} names no participant, or names a transaction held twice"
                )));
            }
        }
        let mut actions = Vec::new();
        for (txn, record) in logged {
            actions.extend(
                record.participants.iter().map(|p| Action::SendCommit { txn: txn.clone(), participant: p.clone() }),
            );
            if let Some(key) = &record.idempotency_key {
                self.keys_in_flight.insert(key.clone(), txn.clone());
            }
            for p in &record.participants {
                self.marks.hold(p, record.position, &txn);
            }
            self.active.insert(
                txn,
                ActiveTxn {
                    position: record.position,
                    phase: Phase::Committing { pending: record.participants.iter().cloned().collect() },
                    participants: record.participants,
                    idempotency_key: record.idempotency_key,
                    staged: None,
                    recovered: true,
                },
            );
        }
        Ok(actions)
    }

    /// Resumes the parallel commits whose staged record is logged and whose
    /// end is not (see "Parallel commit" in the essay). One that a
    /// participant's durable watermark passed was acknowledged there, so it
    /// was committed: its COMMITs are redelivered, as a logged decision's
    /// are. Every other one is prepared again, at every participant, and
    /// decided as a new one is: committed if every participant votes YES
    /// (one that holds it prepared or committed does), aborted, and the
    /// abort logged, if any refuses (one that never prepared it refuses it
    /// durably, or prepares it now). A record without participants or legs,
    /// for a transaction already held, or whose key is held twice, is an
    /// error (the log is corrupt), and then nothing is resumed.
    pub fn recover_staged(&mut self, logged: Vec<(TxnId, StagedRecord)>) -> Result<Vec<Action>, Error> {
        let mut keys = std::collections::HashSet::new();
        for (txn, record) in &logged {
            let key_twice = record
                .idempotency_key
                .as_ref()
                .is_some_and(|key| self.keys_in_flight.contains_key(key) || !keys.insert(key.clone()));
            if record.legs.is_empty()
                || record.legs.values().any(|legs| legs.is_empty())
                || self.active.contains_key(txn)
                || key_twice
            {
                return Err(Error::Fatal(format!(
                    "the staged record of {txn} names no participant or no leg, or a transaction or a key held twice"
                )));
            }
        }
        let mut actions = Vec::new();
        for (txn, record) in logged {
            let StagedRecord { idempotency_key, position, fingerprint, legs } = record;
            let participants: Vec<ParticipantId> = legs.keys().cloned().collect();
            let acknowledged_somewhere = participants.iter().any(|p| position < self.marks.floor(p));
            for p in &participants {
                self.marks.hold(p, position, &txn);
            }
            if let Some(key) = &idempotency_key {
                self.keys_in_flight.insert(key.clone(), txn.clone());
            }
            let phase = if acknowledged_somewhere {
                actions.extend(
                    participants.iter().map(|p| Action::SendCommit { txn: txn.clone(), participant: p.clone() }),
                );
                Phase::Committing { pending: participants.iter().cloned().collect() }
            } else {
                actions.extend(legs.iter().map(|(participant, legs)| Action::SendPrepare {
                    txn: txn.clone(),
                    position,
                    participant: participant.clone(),
                    legs: legs.clone(),
                    idempotency_key: idempotency_key.clone(),
                    after_failure: false,
                }));
                Phase::Staging { waiting: participants.iter().cloned().collect(), resend: legs }
            };
            self.active.insert(
                txn,
                ActiveTxn {
                    position,
                    participants,
                    idempotency_key,
                    phase,
                    staged: Some(fingerprint),
                    recovered: true,
                },
            );
        }
        Ok(actions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> Id {
        Id::parse("id", text).unwrap()
    }

    fn two_participants() -> BTreeMap<ParticipantId, Vec<Leg>> {
        [(id("p1"), vec![Leg { account: 1, amount: -5 }]), (id("p2"), vec![Leg { account: 2, amount: 5 }])]
            .into_iter()
            .collect()
    }

    #[test]
    fn the_commit_goes_out_only_after_the_decision_is_durable() {
        let mut core = Core::new(10);
        let actions = core.begin(id("t1"), 1, two_participants(), None).unwrap();
        assert_eq!(actions.len(), 2);
        assert!(actions.iter().all(|a| matches!(a, Action::SendPrepare { .. })));
        assert_eq!(core.query(&id("t1")), Some(Decision::Pending));
        assert!(core.on_vote(&id("t1"), &id("p1"), VoteResult::Yes).is_empty());
        let actions = core.on_vote(&id("t1"), &id("p2"), VoteResult::Yes);
        assert!(matches!(&actions[..], [Action::PersistCommit { .. }]), "{actions:?}");
        assert_eq!(core.query(&id("t1")), Some(Decision::Pending), "not COMMIT before the decision is durable");
        let actions = core.on_commit_durable(&id("t1"));
        assert_eq!(actions[0], Action::Reply { txn: id("t1"), outcome: Outcome::Committed });
        assert_eq!(actions.iter().filter(|a| matches!(a, Action::SendCommit { .. })).count(), 2);
        assert_eq!(core.query(&id("t1")), Some(Decision::Commit));
        assert!(core.on_commit_acked(&id("t1"), &id("p1")).is_empty());
        assert!(core.on_commit_acked(&id("t1"), &id("p1")).is_empty(), "a duplicate ack is ignored");
        let actions = core.on_commit_acked(&id("t1"), &id("p2"));
        assert!(matches!(&actions[..], [Action::PersistEnd { .. }]));
        core.on_end_durable(&id("t1"));
        assert_eq!(core.query(&id("t1")), None, "finished: the log answers");
        assert_eq!(core.active_count(), 0);
    }

    #[test]
    fn one_no_aborts_at_once_and_later_votes_are_ignored() {
        let mut core = Core::new(10);
        core.begin(id("t1"), 2, two_participants(), None).unwrap();
        let actions = core.on_vote(&id("t1"), &id("p1"), VoteResult::No(AbortReason::InsufficientFunds, "poor".into()));
        assert!(actions.contains(&Action::SendAbort { txn: id("t1"), position: 2, participant: id("p2") }));
        assert!(actions
            .iter()
            .any(|a| matches!(a, Action::Reply { outcome: Outcome::Aborted(AbortReason::InsufficientFunds, _), .. })));
        assert!(!actions.iter().any(|a| matches!(a, Action::PersistCommit { .. } | Action::PersistAbort { .. })));
        assert!(core.on_vote(&id("t1"), &id("p2"), VoteResult::Yes).is_empty());
        assert_eq!(core.query(&id("t1")), None, "no record: presumed abort");
        assert!(
            !actions.contains(&Action::SendAbort { txn: id("t1"), position: 2, participant: id("p1") }),
            "the participant that voted NO recorded it"
        );
    }

    #[test]
    fn a_participant_whose_prepare_timed_out_is_told_abort_too() {
        let mut core = Core::new(10);
        core.begin(id("t1"), 3, two_participants(), None).unwrap();
        let actions =
            core.on_vote(&id("t1"), &id("p1"), VoteResult::No(AbortReason::ParticipantUnavailable, "timeout".into()));
        // Its prepare may still arrive: the abort's tombstone must be there first.
        assert!(
            actions.contains(&Action::SendAbort { txn: id("t1"), position: 3, participant: id("p1") }),
            "{actions:?}"
        );
        assert!(
            actions.contains(&Action::SendAbort { txn: id("t1"), position: 3, participant: id("p2") }),
            "{actions:?}"
        );
    }

    #[test]
    fn a_keyed_abort_is_logged_before_the_reply_and_the_key_is_busy_meanwhile() {
        let mut core = Core::new(10);
        core.begin(id("t1"), 4, two_participants(), Some(id("k1"))).unwrap();
        assert!(matches!(core.begin(id("t2"), 5, two_participants(), Some(id("k1"))), Err(Error::Conflict(_))));
        let actions =
            core.on_vote(&id("t1"), &id("p2"), VoteResult::No(AbortReason::ParticipantUnavailable, "timeout".into()));
        assert!(!actions.iter().any(|a| matches!(a, Action::Reply { .. })));
        let Some(Action::PersistAbort { outcome, .. }) = actions.last().cloned() else { panic!("{actions:?}") };
        assert_eq!(core.query(&id("t1")), Some(Decision::Abort));
        let actions = core.on_abort_durable(&id("t1"), outcome);
        assert!(matches!(&actions[..], [Action::Reply { .. }]));
        assert!(core.begin(id("t3"), 6, two_participants(), Some(id("k1"))).is_ok());
    }

    #[test]
    fn recovery_redelivers_every_logged_commit() {
        let mut core = Core::new(10);
        let record = CommitRecord { participants: vec![id("p1"), id("p2")], idempotency_key: None, position: 0 };
        let actions = core.recover(vec![(id("t1"), record)]).unwrap();
        assert_eq!(
            actions,
            vec![
                Action::SendCommit { txn: id("t1"), participant: id("p1") },
                Action::SendCommit { txn: id("t1"), participant: id("p2") },
            ]
        );
        assert_eq!(core.query(&id("t1")), Some(Decision::Commit));
        core.on_commit_acked(&id("t1"), &id("p1"));
        assert_eq!(core.on_commit_acked(&id("t1"), &id("p2")).len(), 1);
    }

    #[test]
    fn a_reused_id_an_empty_split_and_callbacks_out_of_phase_are_refused_without_a_panic() {
        let mut core = Core::new(10);
        core.begin(id("t1"), 7, two_participants(), Some(id("k1"))).unwrap();
        assert!(matches!(core.begin(id("t1"), 8, two_participants(), None), Err(Error::AlreadyExists(_))));
        assert!(matches!(core.begin(id("t2"), 9, BTreeMap::new(), None), Err(Error::InvalidInput(_))));
        let empty_legs: BTreeMap<_, _> = [(id("p1"), vec![])].into_iter().collect();
        assert!(matches!(core.begin(id("t3"), 10, empty_legs, None), Err(Error::InvalidInput(_))));
        // The decision is not being made yet: a durable callback is ignored.
        assert!(core.on_commit_durable(&id("t1")).is_empty());
        assert!(core.on_abort_durable(&id("t1"), Outcome::Committed).is_empty());
        assert!(core.on_commit_durable(&id("t9")).is_empty());
        assert_eq!(core.query(&id("t1")), Some(Decision::Pending), "unchanged");
        let record = CommitRecord { participants: vec![], idempotency_key: None, position: 0 };
        assert!(core.recover(vec![(id("t7"), record)]).is_err());
        let record = CommitRecord { participants: vec![id("p1")], idempotency_key: None, position: 0 };
        assert!(core.recover(vec![(id("t1"), record)]).is_err(), "t1 is held already");
        assert_eq!(core.active_count(), 1);
    }

    #[test]
    fn a_watermark_waits_for_its_participants_acknowledgement_only_and_never_goes_back() {
        let mut core = Core::new(10);
        core.start_positions(100, BTreeMap::new());
        let (p1, p2) = (id("p1"), id("p2"));
        assert!(matches!(core.begin(id("t0"), 99, two_participants(), None), Err(Error::InvalidInput(_))));
        core.begin(id("t1"), 100, two_participants(), None).unwrap();
        core.begin(id("t2"), 101, two_participants(), None).unwrap();
        assert_eq!(core.watermarks_due(), vec![(p1.clone(), 100), (p2.clone(), 100)]);
        core.on_watermarks_durable(&core.watermarks_due());
        // t2 aborts: it holds nothing more, but t1 is still preparing.
        core.on_vote(&id("t2"), &p1, VoteResult::No(AbortReason::InsufficientFunds, "poor".into()));
        assert!(core.watermarks_due().is_empty());
        core.on_vote(&id("t1"), &p1, VoteResult::Yes);
        core.on_vote(&id("t1"), &p2, VoteResult::Yes);
        core.on_commit_durable(&id("t1"));
        assert!(core.watermarks_due().is_empty(), "committing: both still needed");
        core.on_commit_acked(&id("t1"), &p1);
        assert_eq!(core.watermarks_due(), vec![(p1.clone(), 102)], "p1 acknowledged; p2 did not");
        core.on_watermarks_durable(&core.watermarks_due());
        assert_eq!((core.watermark(&p1), core.watermark(&p2)), (102, 100));
        // Restarted with t1's decision logged: it does not hold p1 again.
        let mut again = Core::new(10);
        again.start_positions(200, [(p1.clone(), 102), (p2.clone(), 100)].into());
        let record = CommitRecord { participants: vec![p1.clone(), p2.clone()], idempotency_key: None, position: 100 };
        let actions = again.recover(vec![(id("t1"), record)]).unwrap();
        assert_eq!(actions.len(), 2, "its COMMIT is redelivered to both");
        assert_eq!((again.holding_count(&p1), again.holding_count(&p2)), (0, 1));
        assert_eq!(again.watermarks_due(), vec![(p1.clone(), 200)]);
        again.on_commit_acked(&id("t1"), &p2);
        assert_eq!(again.watermarks_due(), vec![(p1, 200), (p2, 200)]);
    }

    #[test]
    fn another_incarnation_is_named_by_the_participant_or_else_by_the_id() {
        assert_eq!(other_incarnation(7, 0, None), None);
        assert_eq!(other_incarnation(7, 7, Some(9)), None, "what the participant names wins");
        assert_eq!(other_incarnation(7, 9, None), Some(9));
        assert_eq!(other_incarnation(7, 0, Some(9)), Some(9));
        assert_eq!(other_incarnation(7, 0, Some(7)), None);
    }

    fn one_participant() -> BTreeMap<ParticipantId, Vec<Leg>> {
        [(id("p1"), vec![Leg { account: 1, amount: -5 }, Leg { account: 2, amount: 5 }])].into_iter().collect()
    }

    #[test]
    fn a_transaction_on_one_participant_is_one_request_whose_answer_ends_it_with_nothing_logged() {
        let mut core = Core::new(10);
        core.start_positions(10, BTreeMap::new());
        let actions = core.begin(id("t1"), 10, one_participant(), None).unwrap();
        let [Action::SendOnePhase { participant, legs, idempotency_key: None, position: 10, .. }] = &actions[..] else {
            panic!("{actions:?}")
        };
        assert_eq!((participant, legs.len()), (&id("p1"), 2), "every leg, to its one participant");
        assert_eq!(core.query(&id("t1")), Some(Decision::Pending), "nobody is in doubt about it; nothing is decided");
        assert_eq!(core.holding_count(&id("p1")), 1, "it holds p1's watermark until answered");
        // A 2PC callback for it changes nothing.
        assert!(core.on_vote(&id("t1"), &id("p1"), VoteResult::Yes).is_empty());
        assert!(core.on_commit_durable(&id("t1")).is_empty());
        core.on_end_durable(&id("t1"));
        assert!(
            core.on_one_phase_answer(&id("t1"), &id("p2"), OnePhaseResult::Committed).is_empty(),
            "not its participant"
        );
        let actions = core.on_one_phase_answer(&id("t1"), &id("p1"), OnePhaseResult::Committed);
        assert_eq!(actions, vec![Action::Reply { txn: id("t1"), outcome: Outcome::Committed }], "nothing to log");
        assert_eq!((core.active_count(), core.holding_count(&id("p1"))), (0, 0));
        assert!(core.on_one_phase_answer(&id("t1"), &id("p1"), OnePhaseResult::Committed).is_empty(), "a duplicate");
        assert_eq!(core.watermarks_due(), vec![(id("p1"), 11)]);
        // A refusal ends it the same way.
        core.begin(id("t2"), 11, one_participant(), None).unwrap();
        let refused = OnePhaseResult::Refused(AbortReason::InsufficientFunds, "p1: poor".into());
        let actions = core.on_one_phase_answer(&id("t2"), &id("p1"), refused);
        assert_eq!(
            actions,
            vec![Action::Reply {
                txn: id("t2"),
                outcome: Outcome::Aborted(AbortReason::InsufficientFunds, "p1: poor".into())
            }]
        );
        assert_eq!(core.active_count(), 0);
    }

    #[test]
    fn a_keyed_one_phase_transaction_logs_its_intent_first_and_keeps_its_key_until_its_outcome_is_logged() {
        let mut core = Core::new(10);
        core.start_positions(20, BTreeMap::new());
        let actions = core.begin(id("t1"), 20, one_participant(), Some(id("k1"))).unwrap();
        let [Action::PersistIntent { record, .. }] = &actions[..] else { panic!("{actions:?}") };
        assert_eq!((&record.participant, &record.idempotency_key, record.position), (&id("p1"), &id("k1"), 20));
        assert_eq!(record.legs.len(), 2);
        assert!(matches!(core.begin(id("t2"), 21, one_participant(), Some(id("k1"))), Err(Error::Conflict(_))));
        assert!(core.on_one_phase_answer(&id("t1"), &id("p1"), OnePhaseResult::Committed).is_empty(), "not sent yet");
        let actions = core.on_intent_durable(&id("t1"));
        assert!(matches!(&actions[..], [Action::SendOnePhase { idempotency_key: Some(k), .. }] if *k == id("k1")));
        assert!(core.on_intent_durable(&id("t1")).is_empty(), "once");
        let actions = core.on_one_phase_answer(&id("t1"), &id("p1"), OnePhaseResult::Committed);
        // The client hears it at once; the outcome is logged after.
        assert_eq!(actions[0], Action::Reply { txn: id("t1"), outcome: Outcome::Committed });
        assert!(
            matches!(&actions[1], Action::PersistOnePhaseOutcome { idempotency_key: Some(k), outcome: Outcome::Committed, legs, .. } if *k == id("k1") && legs.len() == 2)
        );
        assert_eq!(core.key_in_flight(&id("k1")), Some(&id("t1")), "held until logged");
        let (txn, outcome, _) = core.answered_one_phase(&id("k1")).unwrap();
        assert_eq!((txn, outcome), (&id("t1"), &Outcome::Committed), "a retry hears the answer");
        assert_eq!(core.holding_count(&id("p1")), 1, "its record at p1 must stay until the outcome is logged");
        core.on_one_phase_logged(&id("t1"));
        assert_eq!((core.key_in_flight(&id("k1")), core.holding_count(&id("p1"))), (None, 0));
        assert_eq!(core.active_count(), 0);
    }

    #[test]
    fn a_one_phase_answer_past_the_deadline_is_logged_for_a_client_that_heard_it_unknown() {
        let mut core = Core::new(10);
        core.begin(id("t1"), 1, one_participant(), None).unwrap();
        let actions = core.on_one_phase_overdue(&id("t1"));
        assert!(
            matches!(&actions[..], [Action::ReplyUnknown { message, .. }] if message.contains("p1")),
            "{actions:?}"
        );
        assert!(core.on_one_phase_overdue(&id("t1")).is_empty(), "told once");
        let actions = core.on_one_phase_answer(&id("t1"), &id("p1"), OnePhaseResult::Committed);
        assert!(
            matches!(
                &actions[..],
                [Action::PersistOnePhaseOutcome { idempotency_key: None, outcome: Outcome::Committed, .. }]
            ),
            "no second answer; logged for status lookups: {actions:?}"
        );
        core.on_one_phase_logged(&id("t1"));
        assert_eq!(core.active_count(), 0);
        // An answer, then a late deadline: nothing.
        core.begin(id("t2"), 2, one_participant(), None).unwrap();
        core.on_one_phase_answer(&id("t2"), &id("p1"), OnePhaseResult::Committed);
        assert!(core.on_one_phase_overdue(&id("t2")).is_empty());
    }

    #[test]
    fn recovered_intents_are_sent_again_and_their_answers_logged_and_a_corrupt_one_is_refused() {
        let intent = |position| IntentRecord {
            participant: id("p1"),
            idempotency_key: id("k1"),
            position,
            legs: vec![Leg { account: 1, amount: -5 }, Leg { account: 2, amount: 5 }],
        };
        let mut core = Core::new(10);
        core.start_positions(100, [(id("p1"), 40)].into());
        let actions = core.recover_intents(vec![(id("t1"), intent(50))]).unwrap();
        assert!(matches!(&actions[..], [Action::SendOnePhase { position: 50, idempotency_key: Some(_), .. }]));
        assert_eq!(core.key_in_flight(&id("k1")), Some(&id("t1")));
        assert_eq!(core.watermarks_due(), vec![(id("p1"), 50)], "held at the intent");
        assert!(core.on_one_phase_overdue(&id("t1")).is_empty(), "no client waits");
        let actions = core.on_one_phase_answer(&id("t1"), &id("p1"), OnePhaseResult::Committed);
        assert!(
            matches!(&actions[..], [Action::PersistOnePhaseOutcome { outcome: Outcome::Committed, .. }]),
            "{actions:?}"
        );
        core.on_one_phase_logged(&id("t1"));
        assert_eq!(core.active_count(), 0);
        // Below the durable watermark, twice, or with a key in flight: corrupt.
        let mut core = Core::new(10);
        core.start_positions(100, [(id("p1"), 40)].into());
        assert!(matches!(core.recover_intents(vec![(id("t1"), intent(39))]), Err(Error::Fatal(_))));
        assert!(core.recover_intents(vec![(id("t1"), intent(50)), (id("t2"), intent(51))]).is_err());
        assert_eq!(core.active_count(), 0, "nothing resumed");
    }

    #[test]
    fn with_one_phase_off_a_transaction_on_one_participant_runs_2pc() {
        let mut core = Core::new(10);
        core.set_one_phase(OnePhaseCommit::Off);
        let actions = core.begin(id("t1"), 1, one_participant(), Some(id("k1"))).unwrap();
        assert!(matches!(&actions[..], [Action::SendPrepare { .. }]), "{actions:?}");
        assert!(matches!(core.on_vote(&id("t1"), &id("p1"), VoteResult::Yes)[..], [Action::PersistCommit { .. }]));
    }

    #[test]
    fn by_default_a_keyed_transaction_on_one_participant_goes_by_parallel_commit_and_an_unkeyed_one_in_one_phase() {
        let begin = |mode, protocol, key: Option<&str>| {
            let mut core = Core::new(10);
            core.set_one_phase(mode);
            core.set_commit_protocol(protocol);
            core.begin(id("t1"), 1, one_participant(), key.map(id)).unwrap()
        };
        use CommitProtocol::{Classic, Parallel};
        use OnePhaseCommit::{Always, Auto};
        // Parallel commit: the staged record's fsync and the prepare's at once.
        let actions = begin(Auto, Parallel, Some("k1"));
        assert!(
            matches!(
                &actions[..],
                [Action::PersistStaged { .. }, Action::SendPrepare { idempotency_key: Some(_), .. }]
            ),
            "{actions:?}"
        );
        assert!(matches!(&begin(Auto, Parallel, None)[..], [Action::SendOnePhase { .. }]));
        // Under classic 2PC one-phase is the faster way, keyed or not.
        assert!(matches!(&begin(Auto, Classic, Some("k1"))[..], [Action::PersistIntent { .. }]));
        assert!(matches!(&begin(Auto, Classic, None)[..], [Action::SendOnePhase { .. }]));
        // Always: keyed ones too, their intent first.
        assert!(matches!(&begin(Always, Parallel, Some("k1"))[..], [Action::PersistIntent { .. }]));
        // Never for two participants.
        let mut core = Core::new(10);
        core.set_one_phase(Always);
        assert!(!core.commits_in_one_phase(2, false));
    }

    #[test]
    fn the_number_of_transactions_in_flight_is_bounded() {
        let mut core = Core::new(1);
        core.begin(id("t1"), 11, two_participants(), None).unwrap();
        assert!(matches!(core.begin(id("t2"), 12, two_participants(), None), Err(Error::Busy(_))));
    }
}
