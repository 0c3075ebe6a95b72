//! The coordinator's decision log: its records and their keys in RocksDB.
//!
//! - `m/incarnation`: a random nonzero number chosen when the log is
//!   created (or first opened by a version that has incarnations), written
//!   and fsynced with the generation. It names this log: a coordinator
//!   started on an empty data directory under the same node id has another
//!   one, so its participants can tell that the log their in-doubt
//!   transactions were decided in is gone (see `participant.proto`,
//!   PrepareRequest), and it never reuses an id of the lost log: ids carry
//!   the incarnation.
//! - `m/generation`: a counter raised (and fsynced) at every start; it goes
//!   into transaction ids so an id is never reused across restarts.
//! - `m/w/<participant>`: the low watermarks last sent to that participant,
//!   2PC's and the sagas' (see `watermark.rs`), written with an fsync
//!   before they are sent, so that they never go back across a restart.
//! - `d/<txn id>`: a COMMIT decision not yet acknowledged by all its
//!   participants: their ids, the idempotency key and the transaction's
//!   position. Written and fsynced before any COMMIT is sent.
//! - `f/<txn id>`: a finished transaction that is remembered for status
//!   lookups (committed ones, and aborted ones that carried a key), until
//!   its expiry time.
//! - `k/<idempotency key>`: the result given for that key, a fingerprint of
//!   the request so that a key reused for another request is refused, and
//!   its expiry time.
//! - `x/<expiry ms, 8 bytes big-endian><record key>`: the expiry index, in
//!   the order of expiry: one empty record per `k/` or `f/` record written,
//!   so that garbage collection reads only the records that are due (see
//!   `collect_garbage` in `node.rs`), and memory does not grow with the
//!   number kept. A `k/` record rewritten later (a key reused past its
//!   retention) has an index entry per write; the record's own expiry says
//!   which one deletes it.
//! - `i/<txn id>`: the intent of a keyed one-phase transaction (see
//!   `core.rs`): its idempotency key, its participant, its position and its
//!   legs. Written and fsynced before its request is sent; deleted in the
//!   write that logs its outcome under the key (`k/`, `f/`). A restart
//!   sends the request of each intent again and logs the answer.
//! - `p/<txn id>`: a transaction committed by parallel commit (see
//!   `core.rs`), from its start until it ends: its idempotency key, its
//!   position, its request's fingerprint and its legs by participant.
//!   Written and fsynced at the same time as its prepares are sent; it is
//!   committed once this record and every prepare are durable. Replaced by
//!   the end record (`f/`, and the key's result `k/`) once every
//!   participant acknowledged its COMMIT; deleted, with an fsync, before
//!   its client hears ABORTED. A restart prepares each one again, or
//!   redelivers its COMMITs if a durable watermark shows it was
//!   acknowledged somewhere.
//! - `s/<saga id>`: an orchestrated saga that is running or dead-lettered:
//!   its transfer, its position, its stage, and why it left its happy path.
//!   The start record is fsynced before the first step; stage changes are
//!   buffered (a lost stage is redone, and steps are idempotent).
//!
//! # Ids and positions
//!
//! A transaction's or saga's id is
//! `{node id}-{incarnation, 16 hex digits}-{generation:06}-{sequence:012}`
//! (at most 24 + 1 + 16 + 1 + 8 + 1 + 13 = 64 characters: a node id has at
//! most 24, a generation at most [`GENERATION_BITS`] bits, a sequence at
//! most [`SEQUENCE_BITS`]). Its position is
//! `generation << SEQUENCE_BITS | sequence`: strictly increasing within an
//! incarnation, across restarts, since the generation is raised (and
//! fsynced) before any id of a start is handed out. A coordinator whose
//! generation would not fit refuses to start (Fatal); one whose sequence
//! would not fit refuses new transactions until it is restarted. Records
//! written before positions have none (read as 0, "not given").
//!
//! # Idempotency keys: by time, not by count
//!
//! `k/` and `f/` records are kept at least the retention
//! (`--idempotency-retention`, default 24 h) from when they were written,
//! by the coordinator's wall clock; past it, a key is answered as new (even
//! before garbage collection deleted its record). A dead letter's key has
//! no expiry while the dead letter is in the log (it is rewritten with one
//! when an operator resolves it). What that guarantee rests on: the wall
//! clock. A clock set back keeps records longer; a clock set forward by
//! more than the retention makes keys expire early.
//!
//! # Known caveats
//!
//! - A log restored from a backup keeps its incarnation: the coordinator
//!   then reuses the ids and positions handed out after the backup was
//!   taken, and its participants cannot tell. Restore a coordinator's log
//!   only together with its participants' stores, or start it empty.
//! - `k/` and `f/` records written before the expiry index existed have
//!   no index entry: they are never collected (a bounded, one-off leak).
//!
//! Every encoder checks each field against its length prefix and fails
//! (before anything is written) on one that does not fit; every decoder
//! checks lengths, refuses short records and trailing bytes, and fails with
//! `Error::Fatal` on a record that does not decode: the log is corrupt, and
//! the coordinator refuses to start from it (naming the record,
//! [`decode_at`]) or answers INTERNAL for it, never guesses and never
//! panics.

use crate::core::{AbortReason, CommitRecord, IntentRecord, Outcome, StagedRecord};
use crate::saga::{Recovery, SagaRecord, SagaSpec, Stage};
use tandem::codec::{corrupt, corrupt_record, Reader, Writer};
use tandem::domain::{Id, Leg, TxnId, LEGS_MAX};
use tandem::store::Op;
use tandem::Error;

pub const GENERATION_KEY: &[u8] = b"m/generation";
pub const INCARNATION_KEY: &[u8] = b"m/incarnation";
pub const WATERMARK_PREFIX: &[u8] = b"m/w/";
pub const EXPIRY_PREFIX: &[u8] = b"x/";
/// Bits of a position that count transactions within one generation.
pub const SEQUENCE_BITS: u32 = 40;
/// Bits of a position that count generations (starts of the coordinator).
pub const GENERATION_BITS: u32 = 64 - SEQUENCE_BITS;
pub const GENERATION_MAX: u64 = (1 << GENERATION_BITS) - 1;
pub const SEQUENCE_MAX: u64 = (1 << SEQUENCE_BITS) - 1;
/// The longest node id, so that an id fits [`tandem::domain::ID_LEN_MAX`].
pub const NODE_ID_LEN_MAX: usize = 24;
const _: () = assert!(
    NODE_ID_LEN_MAX + 1 + 16 + 1 + 8 + 1 + 13 <= tandem::domain::ID_LEN_MAX
        && GENERATION_MAX < 100_000_000
        && SEQUENCE_MAX < 10_000_000_000_000
);
pub const DECISION_PREFIX: &[u8] = b"d/";
pub const FINISHED_PREFIX: &[u8] = b"f/";
pub const KEY_PREFIX: &[u8] = b"k/";
pub const SAGA_PREFIX: &[u8] = b"s/";
pub const INTENT_PREFIX: &[u8] = b"i/";
pub const STAGED_PREFIX: &[u8] = b"p/";

pub fn key(prefix: &[u8], id: &Id) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(id.as_str().as_bytes());
    key
}

/// The id at the end of a log key.
pub fn id_from_key(prefix: &[u8], key: &[u8]) -> Result<Id, Error> {
    tandem::codec::id_from_key(prefix, key).map_err(|e| corrupt_record(key, e))
}

/// Decodes the record stored at `key`; its error names the record.
pub fn decode_at<T>(key: &[u8], value: &[u8], decode: fn(&[u8]) -> Result<T, Error>) -> Result<T, Error> {
    decode(value).map_err(|e| corrupt_record(key, e))
}

/// The generation record: a `u64`.
pub fn decode_generation(bytes: &[u8]) -> Result<u64, Error> {
    let mut r = Reader::new(bytes);
    let generation = r.u64()?;
    r.done()?;
    Ok(generation)
}

/// The incarnation record: a nonzero `u64`.
pub fn decode_incarnation(bytes: &[u8]) -> Result<u64, Error> {
    let mut r = Reader::new(bytes);
    let incarnation = r.u64()?;
    r.done()?;
    if incarnation == 0 {
        return Err(corrupt("an incarnation of 0"));
    }
    Ok(incarnation)
}

/// A watermark record: 2PC's then the sagas'.
pub fn encode_watermarks(two_phase: u64, sagas: u64) -> Vec<u8> {
    let mut w = Writer::new();
    w.u64(two_phase);
    w.u64(sagas);
    w.finish()
}

pub fn decode_watermarks(bytes: &[u8]) -> Result<(u64, u64), Error> {
    let mut r = Reader::new(bytes);
    let two_phase = r.u64()?;
    let sagas = r.u64()?;
    r.done()?;
    Ok((two_phase, sagas))
}

/// A position: the generation above, the sequence below.
pub fn position(generation: u64, sequence: u64) -> Result<u64, Error> {
    if generation > GENERATION_MAX {
        return Err(Error::Fatal(format!(
            "generation {generation} does not fit the {GENERATION_BITS} bits of a position"
        )));
    }
    if sequence > SEQUENCE_MAX {
        return Err(Error::Fatal(format!(
            "sequence {sequence} does not fit the {SEQUENCE_BITS} bits of a position; restart the coordinator to start a new generation"
        )));
    }
    Ok(generation << SEQUENCE_BITS | sequence)
}

/// The id of a transaction or saga (see the module documentation).
pub fn txn_id(node: &Id, incarnation: u64, generation: u64, sequence: u64) -> Result<TxnId, Error> {
    Id::parse("a transaction id", &format!("{node}-{incarnation:016x}-{generation:06}-{sequence:012}"))
}

/// The incarnation an id of `node` carries; `None` for an id that is not
/// one `node` hands out since ids carry incarnations.
pub fn incarnation_of(node: &Id, txn: &TxnId) -> Option<u64> {
    let rest = txn.as_str().strip_prefix(node.as_str())?.strip_prefix('-')?;
    let mut parts = rest.split('-');
    let (incarnation, generation, sequence) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if parts.next().is_some() || incarnation.len() != 16 || !digits(generation) || !digits(sequence) {
        return None;
    }
    u64::from_str_radix(incarnation, 16).ok()
}

/// The expiry index entry of the record at `record_key`.
pub fn expiry_key(expires_ms: u64, record_key: &[u8]) -> Vec<u8> {
    let mut key = EXPIRY_PREFIX.to_vec();
    key.extend_from_slice(&expires_ms.to_be_bytes());
    key.extend_from_slice(record_key);
    key
}

/// The expiry time and the record key of an expiry index entry.
pub fn parse_expiry_key(key: &[u8]) -> Result<(u64, &[u8]), Error> {
    let rest = key
        .strip_prefix(EXPIRY_PREFIX)
        .filter(|rest| rest.len() > 8)
        .ok_or_else(|| corrupt_record(key, corrupt("an expiry index entry without a time and a record key")))?;
    let (time, record_key) = rest.split_at(8);
    Ok((u64::from_be_bytes(time.try_into().expect("8 bytes")), record_key))
}

/// Puts `record_key` with its expiry index entry (none for `expires_ms` 0).
fn put_expiring(ops: &mut Vec<Op>, record_key: Vec<u8>, value: Vec<u8>, expires_ms: u64) {
    if expires_ms != 0 {
        ops.push(Op::Put(expiry_key(expires_ms, &record_key), Vec::new()));
    }
    ops.push(Op::Put(record_key, value));
}

/// Reads the expiry time that ends a record (0: none, a record written
/// before records expired).
fn read_expiry(r: &mut Reader) -> Result<u64, Error> {
    if r.remaining() == 0 {
        return Ok(0);
    }
    r.u64()
}

fn optional_id_text(id: &Option<Id>) -> &str {
    id.as_ref().map(Id::as_str).unwrap_or("")
}

pub fn encode_commit(record: &CommitRecord) -> Result<Vec<u8>, Error> {
    let mut w = Writer::new();
    w.text("an idempotency key", optional_id_text(&record.idempotency_key))?;
    w.count_u8("the number of participants", record.participants.len())?;
    for participant in &record.participants {
        w.text("a participant id", participant.as_str())?;
    }
    w.u64(record.position);
    Ok(w.finish())
}

pub fn decode_commit(bytes: &[u8]) -> Result<CommitRecord, Error> {
    let mut r = Reader::new(bytes);
    let idempotency_key = r.optional_id()?;
    let count = r.byte()? as usize;
    if count == 0 || count > LEGS_MAX {
        return Err(corrupt(format!("a commit decision with {count} participants")));
    }
    let participants = (0..count).map(|_| r.id()).collect::<Result<Vec<_>, _>>()?;
    // Records written before positions end here.
    let position = if r.remaining() == 0 { 0 } else { r.u64()? };
    r.done()?;
    Ok(CommitRecord { participants, idempotency_key, position })
}

/// An intent: the key, the participant, the position, then the legs (a
/// count byte, each an account and an amount).
pub fn encode_intent(record: &IntentRecord) -> Result<Vec<u8>, Error> {
    let mut w = Writer::new();
    w.text("an idempotency key", record.idempotency_key.as_str())?;
    w.text("a participant id", record.participant.as_str())?;
    w.u64(record.position);
    if record.legs.len() > LEGS_MAX {
        return Err(Error::InvalidInput(format!("a transaction has at most {LEGS_MAX} legs")));
    }
    write_legs(&mut w, &record.legs)?;
    Ok(w.finish())
}

/// Legs: a count byte, then each an account and an amount.
fn write_legs(w: &mut Writer, legs: &[Leg]) -> Result<(), Error> {
    w.count_u8("the number of legs", legs.len())?;
    for leg in legs {
        w.u64(leg.account);
        w.i64(leg.amount);
    }
    Ok(())
}

/// `count` legs, each an account and an amount.
fn read_legs(r: &mut Reader, count: usize) -> Result<Vec<Leg>, Error> {
    (0..count).map(|_| Ok(Leg { account: r.u64()?, amount: r.i64()? })).collect()
}

/// Reads an intent; its legs must be the legs of a transaction the
/// coordinator would have begun (valid, summing to zero).
pub fn decode_intent(bytes: &[u8]) -> Result<IntentRecord, Error> {
    let mut r = Reader::new(bytes);
    let idempotency_key = r.id()?;
    let participant = r.id()?;
    let position = r.u64()?;
    let count = r.byte()? as usize;
    if count > LEGS_MAX {
        return Err(corrupt(format!("an intent with {count} legs")));
    }
    let legs = read_legs(&mut r, count)?;
    r.done()?;
    tandem::domain::validate_legs(&legs)
        .and_then(|()| tandem::domain::validate_balanced(&legs))
        .map_err(|e| corrupt(format!("the intent's legs: {e}")))?;
    Ok(IntentRecord { participant, idempotency_key, position, legs })
}

/// A staged record: the key, the position, the fingerprint, then each
/// participant (a count byte) with its legs (a count byte, each an account
/// and an amount).
pub fn encode_staged(record: &StagedRecord) -> Result<Vec<u8>, Error> {
    let mut w = Writer::new();
    w.text("an idempotency key", optional_id_text(&record.idempotency_key))?;
    w.u64(record.position);
    w.u64(record.fingerprint);
    if record.legs.len() > LEGS_MAX || record.legs.values().map(Vec::len).sum::<usize>() > LEGS_MAX {
        return Err(Error::InvalidInput(format!("a transaction has at most {LEGS_MAX} legs")));
    }
    w.count_u8("the number of participants", record.legs.len())?;
    for (participant, legs) in &record.legs {
        w.text("a participant id", participant.as_str())?;
        write_legs(&mut w, legs)?;
    }
    Ok(w.finish())
}

/// Reads a staged record; its legs must be those of a transaction the
/// coordinator would have begun (valid, summing to zero, at least one on
/// each of at least one participant).
pub fn decode_staged(bytes: &[u8]) -> Result<StagedRecord, Error> {
    let mut r = Reader::new(bytes);
    let idempotency_key = r.optional_id()?;
    let position = r.u64()?;
    let fingerprint = r.u64()?;
    let participants = r.byte()? as usize;
    if participants == 0 || participants > LEGS_MAX {
        return Err(corrupt(format!("a staged record with {participants} participants")));
    }
    let mut legs = std::collections::BTreeMap::new();
    let mut all = Vec::new();
    for _ in 0..participants {
        let participant = r.id()?;
        let count = r.byte()? as usize;
        if count == 0 || all.len() + count > LEGS_MAX {
            return Err(corrupt(format!("a staged record with {count} legs on {participant}")));
        }
        let these = read_legs(&mut r, count)?;
        all.extend_from_slice(&these);
        if legs.insert(participant.clone(), these).is_some() {
            return Err(corrupt(format!("a staged record that names {participant} twice")));
        }
    }
    r.done()?;
    tandem::domain::validate_legs(&all)
        .and_then(|()| tandem::domain::validate_balanced(&all))
        .map_err(|e| corrupt(format!("the staged record's legs: {e}")))?;
    Ok(StagedRecord { idempotency_key, position, fingerprint, legs })
}

/// The ops that log a parallel commit's staged record.
pub fn staged_ops(txn: &TxnId, record: &StagedRecord) -> Result<Vec<Op>, Error> {
    Ok(vec![Op::Put(key(STAGED_PREFIX, txn), encode_staged(record)?)])
}

/// The ops that log a parallel commit's abort: its staged record deleted,
/// and with a key, the key's result and a finished record, as
/// [`abort_ops`].
pub fn staged_abort_ops(
    txn: &TxnId,
    idempotency_key: Option<&Id>,
    outcome: &Outcome,
    fingerprint: u64,
    expires_ms: u64,
) -> Result<Vec<Op>, Error> {
    let mut ops = match idempotency_key {
        Some(idem) => abort_ops(txn, idem, outcome, fingerprint, expires_ms)?,
        None => Vec::with_capacity(1),
    };
    ops.push(Op::Delete(key(STAGED_PREFIX, txn)));
    Ok(ops)
}

/// The ops that log a keyed one-phase transaction's intent.
pub fn intent_ops(txn: &TxnId, record: &IntentRecord) -> Result<Vec<Op>, Error> {
    Ok(vec![Op::Put(key(INTENT_PREFIX, txn), encode_intent(record)?)])
}

/// The ops that log a one-phase transaction's outcome: with a key, the
/// key's result and a finished record, the intent deleted in the same
/// write; without one (its client heard the outcome unknown), a finished
/// record for status lookups.
pub fn one_phase_outcome_ops(
    txn: &TxnId,
    idempotency_key: Option<&Id>,
    outcome: &Outcome,
    fingerprint: u64,
    expires_ms: u64,
) -> Result<Vec<Op>, Error> {
    let finished_as = match outcome {
        Outcome::Committed => FinishedAs::Committed,
        Outcome::Aborted(..) => FinishedAs::Aborted,
        other => return Err(Error::InvalidInput(format!("a one-phase transaction cannot end {other:?}"))),
    };
    let mut ops = Vec::with_capacity(5);
    if let Some(idem) = idempotency_key {
        let result = KeyedResult { txn: txn.clone(), outcome: outcome.clone(), fingerprint, expires_ms };
        put_expiring(&mut ops, key(KEY_PREFIX, idem), encode_keyed(&result)?, expires_ms);
        ops.push(Op::Delete(key(INTENT_PREFIX, txn)));
    }
    let finished = Finished {
        outcome: finished_as,
        idempotency_key: idempotency_key.cloned(),
        expires_ms,
        resolution: String::new(),
    };
    put_expiring(&mut ops, key(FINISHED_PREFIX, txn), encode_finished(&finished)?, expires_ms);
    Ok(ops)
}

/// How a remembered transaction or saga ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishedAs {
    Aborted,
    Committed,
    Compensated,
    /// A dead letter an operator resolved.
    Resolved,
}

/// A finished transaction or saga as remembered: its outcome and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub outcome: FinishedAs,
    pub idempotency_key: Option<Id>,
    /// When the record may be deleted (Unix ms; 0: never, a record written
    /// before records expired).
    pub expires_ms: u64,
    /// A resolved dead letter's end: why it was dead-lettered, and who
    /// released its money and why (the operator's certificate and
    /// reason). Empty otherwise; written only when not empty, so records
    /// without it still read.
    pub resolution: String,
}

impl Finished {
    pub fn committed(&self) -> bool {
        self.outcome == FinishedAs::Committed
    }
}

pub fn encode_finished(finished: &Finished) -> Result<Vec<u8>, Error> {
    let mut w = Writer::new();
    w.byte(match finished.outcome {
        FinishedAs::Aborted => 0,
        FinishedAs::Committed => 1,
        FinishedAs::Compensated => 2,
        FinishedAs::Resolved => 3,
    });
    w.text("an idempotency key", optional_id_text(&finished.idempotency_key))?;
    w.u64(finished.expires_ms);
    if !finished.resolution.is_empty() {
        w.text("a resolution", &finished.resolution)?;
    }
    Ok(w.finish())
}

pub fn decode_finished(bytes: &[u8]) -> Result<Finished, Error> {
    let mut r = Reader::new(bytes);
    let outcome = match r.byte()? {
        0 => FinishedAs::Aborted,
        1 => FinishedAs::Committed,
        2 => FinishedAs::Compensated,
        3 => FinishedAs::Resolved,
        other => return Err(corrupt(format!("finished as {other}"))),
    };
    let idempotency_key = r.optional_id()?;
    let expires_ms = read_expiry(&mut r)?;
    let resolution = if r.remaining() == 0 { String::new() } else { r.text()? };
    r.done()?;
    Ok(Finished { outcome, idempotency_key, expires_ms, resolution })
}

/// What an idempotency key maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedResult {
    pub txn: TxnId,
    pub outcome: Outcome,
    pub fingerprint: u64,
    /// When the key may be forgotten (Unix ms; 0: not while its record is
    /// there: a dead letter's, or one written before keys expired).
    pub expires_ms: u64,
}

impl KeyedResult {
    /// Whether the key is past its retention at `now_ms`: then a request
    /// with it is a new one.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && self.expires_ms <= now_ms
    }
}

fn reason_code(reason: AbortReason) -> u8 {
    match reason {
        AbortReason::InsufficientFunds => 1,
        AbortReason::BalanceOverflow => 2,
        AbortReason::UnknownAccount => 3,
        AbortReason::ParticipantUnavailable => 4,
        AbortReason::Refused => 5,
        AbortReason::KeyOfLostIncarnation => 6,
    }
}

fn reason_from_code(code: u8) -> Result<AbortReason, Error> {
    Ok(match code {
        1 => AbortReason::InsufficientFunds,
        2 => AbortReason::BalanceOverflow,
        3 => AbortReason::UnknownAccount,
        4 => AbortReason::ParticipantUnavailable,
        5 => AbortReason::Refused,
        6 => AbortReason::KeyOfLostIncarnation,
        other => return Err(corrupt(format!("abort reason {other}"))),
    })
}

/// A saga's cause, as one byte (0: none).
fn cause_code(cause: Option<AbortReason>) -> u8 {
    cause.map_or(0, reason_code)
}

/// Reads the cause that ends a record; records written before causes were
/// logged end without it.
fn read_cause(r: &mut Reader) -> Result<Option<AbortReason>, Error> {
    if r.remaining() == 0 {
        return Ok(None);
    }
    match r.byte()? {
        0 => Ok(None),
        code => reason_from_code(code).map(Some),
    }
}

pub fn encode_keyed(result: &KeyedResult) -> Result<Vec<u8>, Error> {
    let mut w = Writer::new();
    w.text("a transaction id", result.txn.as_str())?;
    w.u64(result.fingerprint);
    match &result.outcome {
        Outcome::Committed => w.byte(0),
        Outcome::Aborted(reason, message) => {
            w.byte(reason_code(*reason));
            w.text("an outcome's reason", message)?;
        }
        Outcome::Compensated(cause, message) => {
            w.byte(100);
            w.text("an outcome's reason", message)?;
            w.byte(cause_code(*cause));
        }
        Outcome::DeadLettered(cause, message) => {
            w.byte(101);
            w.text("an outcome's reason", message)?;
            w.byte(cause_code(*cause));
        }
    }
    w.u64(result.expires_ms);
    Ok(w.finish())
}

pub fn decode_keyed(bytes: &[u8]) -> Result<KeyedResult, Error> {
    let mut r = Reader::new(bytes);
    let txn = r.id()?;
    let fingerprint = r.u64()?;
    let outcome = match r.byte()? {
        0 => Outcome::Committed,
        100 => {
            let message = r.text()?;
            Outcome::Compensated(read_cause(&mut r)?, message)
        }
        101 => {
            let message = r.text()?;
            Outcome::DeadLettered(read_cause(&mut r)?, message)
        }
        code => Outcome::Aborted(reason_from_code(code)?, r.text()?),
    };
    let expires_ms = read_expiry(&mut r)?;
    r.done()?;
    Ok(KeyedResult { txn, outcome, fingerprint, expires_ms })
}

/// What a request asks for, as its fingerprint tells it apart: the
/// protocol, and for a saga its recovery policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    TwoPhaseCommit,
    Saga(Recovery),
}

/// FNV-1a over the legs in their canonical order, from `hash`.
fn hash_legs(mut hash: u64, legs: &[Leg]) -> u64 {
    let mut sorted = legs.to_vec();
    sorted.sort();
    for leg in sorted {
        for byte in leg.account.to_le_bytes().into_iter().chain(leg.amount.to_le_bytes()) {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A fingerprint of a request: its protocol, its recovery policy (sagas)
/// and its legs in their canonical order (FNV-1a), so that an idempotency
/// key reused for another request (other legs, or the same legs by another
/// protocol or policy) is refused.
pub fn fingerprint(asked: Asked, legs: &[Leg]) -> u64 {
    let tag: u8 = match asked {
        Asked::TwoPhaseCommit => 1,
        Asked::Saga(Recovery::Backward) => 2,
        Asked::Saga(Recovery::Forward) => 3,
    };
    let hash = (FNV_OFFSET ^ tag as u64).wrapping_mul(0x0100_0000_01b3);
    hash_legs(hash, legs)
}

/// The fingerprint records written before [`fingerprint`] covered the
/// protocol held: legs only for 2PC, and the legs mixed with the recovery
/// for sagas (so a backward saga had 2PC's). A key whose record holds it is
/// still recognised (with that old ambiguity) until the record expires.
pub fn legacy_fingerprint(asked: Asked, legs: &[Leg]) -> u64 {
    let legs_only = hash_legs(FNV_OFFSET, legs);
    match asked {
        Asked::TwoPhaseCommit | Asked::Saga(Recovery::Backward) => legs_only,
        Asked::Saga(Recovery::Forward) => legs_only ^ 0x9e37_79b9,
    }
}

/// Whether a key's stored result answers a request with these legs (see
/// [`fingerprint`]); `Err` names the key, and says it was used for another
/// request.
pub fn same_request(key: &Id, earlier: &KeyedResult, asked: Asked, legs: &[Leg]) -> Result<(), Error> {
    if earlier.fingerprint == fingerprint(asked, legs)
        || (earlier.expires_ms == 0 && earlier.fingerprint == legacy_fingerprint(asked, legs))
    {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "idempotency key {key} was used for another request ({}: other legs, protocol or recovery); use a new key for a new request",
        earlier.txn
    )))
}

/// The ops that log a commit decision (and its key's result).
pub fn commit_ops(txn: &TxnId, record: &CommitRecord, fingerprint: u64, expires_ms: u64) -> Result<Vec<Op>, Error> {
    let mut ops = vec![Op::Put(key(DECISION_PREFIX, txn), encode_commit(record)?)];
    if let Some(idem) = &record.idempotency_key {
        let result = KeyedResult { txn: txn.clone(), outcome: Outcome::Committed, fingerprint, expires_ms };
        put_expiring(&mut ops, key(KEY_PREFIX, idem), encode_keyed(&result)?, expires_ms);
    }
    Ok(ops)
}

/// The ops that end a committed transaction: the decision is replaced by a
/// finished record. A parallel commit's (`staged`: its request's
/// fingerprint) replaces its staged record, and logs its key's result here.
pub fn end_ops(
    txn: &TxnId,
    idempotency_key: Option<Id>,
    staged: Option<u64>,
    expires_ms: u64,
) -> Result<Vec<Op>, Error> {
    let mut ops = Vec::with_capacity(4);
    match staged {
        None => ops.push(Op::Delete(key(DECISION_PREFIX, txn))),
        Some(fingerprint) => {
            ops.push(Op::Delete(key(STAGED_PREFIX, txn)));
            if let Some(idem) = &idempotency_key {
                let result = KeyedResult { txn: txn.clone(), outcome: Outcome::Committed, fingerprint, expires_ms };
                put_expiring(&mut ops, key(KEY_PREFIX, idem), encode_keyed(&result)?, expires_ms);
            }
        }
    }
    let finished = Finished { outcome: FinishedAs::Committed, idempotency_key, expires_ms, resolution: String::new() };
    put_expiring(&mut ops, key(FINISHED_PREFIX, txn), encode_finished(&finished)?, expires_ms);
    Ok(ops)
}

/// The ops that log a keyed abort.
pub fn abort_ops(
    txn: &TxnId,
    idem: &Id,
    outcome: &Outcome,
    fingerprint: u64,
    expires_ms: u64,
) -> Result<Vec<Op>, Error> {
    let result = KeyedResult { txn: txn.clone(), outcome: outcome.clone(), fingerprint, expires_ms };
    let mut ops = Vec::with_capacity(4);
    put_expiring(&mut ops, key(KEY_PREFIX, idem), encode_keyed(&result)?, expires_ms);
    let finished = Finished {
        outcome: FinishedAs::Aborted,
        idempotency_key: Some(idem.clone()),
        expires_ms,
        resolution: String::new(),
    };
    put_expiring(&mut ops, key(FINISHED_PREFIX, txn), encode_finished(&finished)?, expires_ms);
    Ok(ops)
}

fn stage_code(stage: Stage) -> u8 {
    match stage {
        Stage::Starting => 1,
        Stage::Debiting => 2,
        Stage::Crediting => 3,
        Stage::CompensatingCredit => 4,
        Stage::CompensatingDebit => 5,
        Stage::Parking => 6,
        Stage::DeadLettered => 7,
        Stage::Releasing => 8,
    }
}

fn stage_from_code(code: u8) -> Result<Stage, Error> {
    Ok(match code {
        1 => Stage::Starting,
        2 => Stage::Debiting,
        3 => Stage::Crediting,
        4 => Stage::CompensatingCredit,
        5 => Stage::CompensatingDebit,
        6 => Stage::Parking,
        7 => Stage::DeadLettered,
        8 => Stage::Releasing,
        other => return Err(corrupt(format!("saga stage {other}"))),
    })
}

pub fn encode_saga(record: &SagaRecord) -> Result<Vec<u8>, Error> {
    let mut w = Writer::new();
    let spec = &record.spec;
    w.byte(stage_code(record.stage));
    w.u64(spec.from);
    w.u64(spec.to);
    w.i64(spec.amount);
    w.text("a participant id", spec.from_participant.as_str())?;
    w.text("a participant id", spec.to_participant.as_str())?;
    w.byte(matches!(spec.recovery, Recovery::Forward) as u8);
    w.text("an idempotency key", optional_id_text(&spec.idempotency_key))?;
    w.u64(spec.fingerprint);
    w.text("a saga's reason", &record.reason)?;
    w.i64(record.parked);
    w.byte(cause_code(record.cause));
    w.u64(spec.position);
    Ok(w.finish())
}

pub fn decode_saga(bytes: &[u8]) -> Result<SagaRecord, Error> {
    let mut r = Reader::new(bytes);
    let stage = stage_from_code(r.byte()?)?;
    let spec = SagaSpec {
        from: r.u64()?,
        to: r.u64()?,
        amount: r.i64()?,
        from_participant: r.id()?,
        to_participant: r.id()?,
        recovery: match r.byte()? {
            0 => Recovery::Backward,
            1 => Recovery::Forward,
            other => return Err(corrupt(format!("saga recovery {other}"))),
        },
        idempotency_key: r.optional_id()?,
        fingerprint: r.u64()?,
        position: 0,
    };
    let reason = r.text()?;
    let parked = r.i64()?;
    let cause = read_cause(&mut r)?;
    // Records written before positions end here.
    let spec = SagaSpec { position: if r.remaining() == 0 { 0 } else { r.u64()? }, ..spec };
    r.done()?;
    if spec.amount <= 0 || parked < 0 || parked > spec.amount {
        return Err(corrupt(format!("a saga of {} with {parked} parked", spec.amount)));
    }
    Ok(SagaRecord { spec, stage, reason, cause, parked, resolution: String::new() })
}

/// The ops that end a saga: its record goes, its outcome (and its key's)
/// is remembered.
pub fn saga_finish_ops(saga: &Id, spec: &SagaSpec, outcome: &Outcome, expires_ms: u64) -> Result<Vec<Op>, Error> {
    let (finished_as, resolution) = match outcome {
        Outcome::Committed => (FinishedAs::Committed, String::new()),
        Outcome::Aborted(..) => (FinishedAs::Aborted, String::new()),
        Outcome::Compensated(..) => (FinishedAs::Compensated, String::new()),
        Outcome::DeadLettered(_, reason) => (FinishedAs::Resolved, reason.clone()),
    };
    let mut ops = vec![Op::Delete(key(SAGA_PREFIX, saga))];
    let finished =
        Finished { outcome: finished_as, idempotency_key: spec.idempotency_key.clone(), expires_ms, resolution };
    put_expiring(&mut ops, key(FINISHED_PREFIX, saga), encode_finished(&finished)?, expires_ms);
    if let Some(idem) = &spec.idempotency_key {
        let result =
            KeyedResult { txn: saga.clone(), outcome: outcome.clone(), fingerprint: spec.fingerprint, expires_ms };
        put_expiring(&mut ops, key(KEY_PREFIX, idem), encode_keyed(&result)?, expires_ms);
    }
    Ok(ops)
}

/// The ops that make a saga a dead letter: its record stays (listed for
/// an operator), its key's outcome is remembered with no expiry while the
/// dead letter is in the log.
pub fn dead_letter_ops(saga: &Id, record: &SagaRecord, outcome: &Outcome) -> Result<Vec<Op>, Error> {
    let mut ops = vec![Op::Put(key(SAGA_PREFIX, saga), encode_saga(record)?)];
    if let Some(idem) = &record.spec.idempotency_key {
        let result = KeyedResult {
            txn: saga.clone(),
            outcome: outcome.clone(),
            fingerprint: record.spec.fingerprint,
            expires_ms: 0,
        };
        ops.push(Op::Put(key(KEY_PREFIX, idem), encode_keyed(&result)?));
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> Id {
        Id::parse("id", text).unwrap()
    }

    #[test]
    fn records_round_trip() {
        let record = CommitRecord {
            participants: vec![id("p1"), id("p2")],
            idempotency_key: Some(id("k")),
            position: 1 << 40 | 7,
        };
        assert_eq!(decode_commit(&encode_commit(&record).unwrap()), Ok(record));
        let record = CommitRecord { participants: vec![id("p1")], idempotency_key: None, position: 0 };
        assert_eq!(decode_commit(&encode_commit(&record).unwrap()), Ok(record));
        let finished = Finished {
            outcome: FinishedAs::Committed,
            idempotency_key: None,
            expires_ms: 5,
            resolution: String::new(),
        };
        assert_eq!(decode_finished(&encode_finished(&finished).unwrap()), Ok(finished));
        for outcome in [
            Outcome::Committed,
            Outcome::Aborted(AbortReason::InsufficientFunds, "poor".into()),
            Outcome::Compensated(Some(AbortReason::UnknownAccount), "refunded".into()),
            Outcome::Compensated(None, "refunded".into()),
            Outcome::DeadLettered(Some(AbortReason::Refused), "parked".into()),
        ] {
            let keyed = KeyedResult { txn: id("t1"), outcome, fingerprint: 42, expires_ms: 1_700_000_000_000 };
            assert_eq!(decode_keyed(&encode_keyed(&keyed).unwrap()), Ok(keyed));
        }
    }

    #[test]
    fn records_written_before_saga_causes_were_logged_still_read() {
        let keyed = KeyedResult {
            txn: id("t1"),
            outcome: Outcome::Compensated(Some(AbortReason::BalanceOverflow), "refunded".into()),
            fingerprint: 42,
            expires_ms: 0,
        };
        // Then records ended before the cause (and the expiry or position
        // that follow it now).
        let bytes = encode_keyed(&keyed).unwrap();
        let old = decode_keyed(&bytes[..bytes.len() - 9]).unwrap();
        assert_eq!(old.outcome, Outcome::Compensated(None, "refunded".into()));
        let with_cause = decode_keyed(&bytes[..bytes.len() - 8]).unwrap();
        assert_eq!((with_cause, old.expires_ms), (keyed, 0));
        let record = SagaRecord { cause: Some(AbortReason::Refused), ..saga_record() };
        let bytes = encode_saga(&record).unwrap();
        let old = decode_saga(&bytes[..bytes.len() - 9]).unwrap();
        let expected_spec = SagaSpec { position: 0, ..record.spec.clone() };
        assert_eq!(old, SagaRecord { cause: None, spec: expected_spec.clone(), ..record.clone() });
        assert_eq!(decode_saga(&bytes[..bytes.len() - 8]), Ok(SagaRecord { spec: expected_spec, ..record }));
    }

    #[test]
    fn records_written_before_positions_and_expiry_still_read() {
        let record = CommitRecord { participants: vec![id("p1")], idempotency_key: None, position: 1 << 40 | 3 };
        let bytes = encode_commit(&record).unwrap();
        assert_eq!(decode_commit(&bytes[..bytes.len() - 8]), Ok(CommitRecord { position: 0, ..record }));
        let finished = Finished {
            outcome: FinishedAs::Aborted,
            idempotency_key: Some(id("k")),
            expires_ms: 77,
            resolution: String::new(),
        };
        let bytes = encode_finished(&finished).unwrap();
        assert_eq!(decode_finished(&bytes[..bytes.len() - 8]), Ok(Finished { expires_ms: 0, ..finished }));
    }

    #[test]
    fn a_resolved_saga_keeps_who_released_its_money_and_why() {
        let finished = Finished {
            outcome: FinishedAs::Resolved,
            idempotency_key: None,
            expires_ms: 77,
            resolution: "refused; resolved by tandem://operator/ann: ticket 7".into(),
        };
        let bytes = encode_finished(&finished).unwrap();
        assert_eq!(decode_finished(&bytes), Ok(finished.clone()));
        // Without one, the record is byte for byte what was written before
        // resolutions were kept.
        let resolution_len = 2 + finished.resolution.len();
        let plain = Finished { resolution: String::new(), ..finished };
        assert_eq!(encode_finished(&plain).unwrap(), bytes[..bytes.len() - resolution_len]);
    }

    fn saga_record() -> SagaRecord {
        SagaRecord {
            spec: SagaSpec {
                from: 1,
                to: 2,
                amount: 30,
                from_participant: id("p1"),
                to_participant: id("p2"),
                recovery: Recovery::Forward,
                idempotency_key: Some(id("k1")),
                fingerprint: 7,
                position: 1 << 40 | 9,
            },
            stage: Stage::CompensatingDebit,
            reason: "the credit was refused".into(),
            cause: Some(AbortReason::UnknownAccount),
            parked: 0,
            resolution: String::new(),
        }
    }

    #[test]
    fn intents_round_trip_and_a_one_phase_outcome_replaces_its_intent() {
        let record = IntentRecord {
            participant: id("p1"),
            idempotency_key: id("k1"),
            position: 1 << 40 | 7,
            legs: vec![Leg { account: 1, amount: -5 }, Leg { account: 2, amount: 5 }],
        };
        let bytes = encode_intent(&record).unwrap();
        assert_eq!(decode_intent(&bytes), Ok(record.clone()));
        let unbalanced = IntentRecord { legs: vec![Leg { account: 1, amount: -5 }], ..record.clone() };
        assert!(matches!(decode_intent(&encode_intent(&unbalanced).unwrap()), Err(Error::Fatal(_))));
        assert!(decode_intent(&bytes[..bytes.len() - 1]).is_err());
        let ops = one_phase_outcome_ops(&id("t1"), Some(&id("k1")), &Outcome::Committed, 9, 77).unwrap();
        assert!(ops.contains(&Op::Delete(key(INTENT_PREFIX, &id("t1")))), "{ops:?}");
        let keyed = ops.iter().find_map(|op| match op {
            Op::Put(k, v) if *k == key(KEY_PREFIX, &id("k1")) => Some(decode_keyed(v).unwrap()),
            _ => None,
        });
        assert_eq!(
            keyed,
            Some(KeyedResult { txn: id("t1"), outcome: Outcome::Committed, fingerprint: 9, expires_ms: 77 })
        );
        // Without a key: only the finished record, for status lookups.
        let ops = one_phase_outcome_ops(&id("t2"), None, &Outcome::Aborted(AbortReason::Refused, "no".into()), 9, 77)
            .unwrap();
        assert!(ops
            .iter()
            .all(|op| matches!(op, Op::Put(k, _) if k.starts_with(FINISHED_PREFIX) || k.starts_with(EXPIRY_PREFIX))));
        assert!(one_phase_outcome_ops(&id("t3"), None, &Outcome::Compensated(None, "x".into()), 9, 77).is_err());
    }

    #[test]
    fn saga_records_round_trip() {
        let record = saga_record();
        assert_eq!(decode_saga(&encode_saga(&record).unwrap()), Ok(record));
        let record = SagaRecord { cause: None, ..saga_record() };
        assert_eq!(decode_saga(&encode_saga(&record).unwrap()), Ok(record));
    }

    #[test]
    fn a_short_or_long_record_is_a_fatal_error_naming_it_not_a_panic() {
        let bytes =
            encode_commit(&CommitRecord { participants: vec![id("p1")], idempotency_key: None, position: 0 }).unwrap();
        let key = key(DECISION_PREFIX, &id("t1"));
        let short = decode_at(&key, &bytes[..bytes.len() - 1], decode_commit);
        assert!(matches!(&short, Err(Error::Fatal(m)) if m.contains("d/t1")), "{short:?}");
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(decode_commit(&long), Err(Error::Fatal(m)) if m.contains("trailing")));
        assert!(decode_commit(&[0, 0, 0]).is_err(), "a decision with no participant");
        assert!(decode_finished(&[9, 0, 0]).is_err());
        assert!(decode_generation(&[1, 2, 3]).is_err());
        assert!(decode_incarnation(&0u64.to_le_bytes()).is_err(), "an incarnation is never 0");
        assert!(id_from_key(FINISHED_PREFIX, b"f/not an id").is_err());
    }

    #[test]
    fn a_reason_too_long_for_its_record_is_an_error_before_anything_is_written() {
        let keyed = KeyedResult {
            txn: id("t1"),
            outcome: Outcome::Compensated(None, "x".repeat(tandem::codec::TEXT_LEN_MAX + 1)),
            fingerprint: 1,
            expires_ms: 0,
        };
        assert!(matches!(encode_keyed(&keyed), Err(Error::InvalidInput(_))));
        assert!(abort_ops(&id("t1"), &id("k1"), &keyed.outcome, 1, 5).is_err());
    }

    #[test]
    fn fingerprints_ignore_leg_order_but_not_amounts() {
        let a = [Leg { account: 1, amount: -5 }, Leg { account: 2, amount: 5 }];
        let b = [a[1], a[0]];
        let c = [Leg { account: 1, amount: -6 }, Leg { account: 2, amount: 6 }];
        let two_pc = Asked::TwoPhaseCommit;
        assert_eq!(fingerprint(two_pc, &a), fingerprint(two_pc, &b));
        assert_ne!(fingerprint(two_pc, &a), fingerprint(two_pc, &c));
    }

    #[test]
    fn fingerprints_tell_the_protocol_and_the_recovery_apart() {
        let legs = [Leg { account: 1, amount: -5 }, Leg { account: 2, amount: 5 }];
        let asked = [Asked::TwoPhaseCommit, Asked::Saga(Recovery::Backward), Asked::Saga(Recovery::Forward)];
        for (i, a) in asked.iter().enumerate() {
            for b in &asked[i + 1..] {
                assert_ne!(fingerprint(*a, &legs), fingerprint(*b, &legs), "{a:?} and {b:?}");
            }
        }
        let key = id("k1");
        let earlier = KeyedResult {
            txn: id("t1"),
            outcome: Outcome::Committed,
            fingerprint: fingerprint(Asked::TwoPhaseCommit, &legs),
            expires_ms: 9,
        };
        assert_eq!(same_request(&key, &earlier, Asked::TwoPhaseCommit, &legs), Ok(()));
        let refused = same_request(&key, &earlier, Asked::Saga(Recovery::Backward), &legs);
        assert!(
            matches!(&refused, Err(Error::FailedPrecondition(m)) if m.contains("k1") && m.contains("another request"))
        );
        // A record written before fingerprints covered the protocol.
        let legacy =
            KeyedResult { fingerprint: legacy_fingerprint(Asked::TwoPhaseCommit, &legs), expires_ms: 0, ..earlier };
        assert_eq!(same_request(&key, &legacy, Asked::TwoPhaseCommit, &legs), Ok(()));
    }

    #[test]
    fn ids_carry_the_incarnation_and_positions_go_up() {
        let node = id("c-1");
        let txn = txn_id(&node, 0xfeed, 3, 42).unwrap();
        assert_eq!(txn.as_str(), "c-1-000000000000feed-000003-000000000042");
        assert_eq!(incarnation_of(&node, &txn), Some(0xfeed));
        assert_eq!(incarnation_of(&id("c"), &txn), None, "another node's id");
        assert_eq!(incarnation_of(&node, &id("c-1-000003-000000000042")), None, "an id from before incarnations");
        let longest = txn_id(&id(&"n".repeat(NODE_ID_LEN_MAX)), u64::MAX, GENERATION_MAX, SEQUENCE_MAX).unwrap();
        assert_eq!(incarnation_of(&id(&"n".repeat(NODE_ID_LEN_MAX)), &longest), Some(u64::MAX));
        assert!(position(3, 42).unwrap() < position(3, 43).unwrap());
        assert!(position(3, SEQUENCE_MAX).unwrap() < position(4, 1).unwrap());
        assert!(matches!(position(GENERATION_MAX + 1, 1), Err(Error::Fatal(_))));
        assert!(matches!(position(1, SEQUENCE_MAX + 1), Err(Error::Fatal(_))));
        let entry = expiry_key(77, b"k/a");
        let (time, record) = parse_expiry_key(&entry).unwrap();
        assert_eq!((time, record), (77, &b"k/a"[..]));
        assert!(expiry_key(1, b"k/z") < expiry_key(256, b"k/a"), "the index is in order of expiry");
    }
}
