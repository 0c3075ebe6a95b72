//! The coordinator's decision log: its records and their keys in RocksDB.
//!
//! - `m/generation`: a counter raised (and fsynced) at every start; it goes
//!   into transaction ids so an id is never reused across restarts.
//! - `d/<txn id>`: a COMMIT decision not yet acknowledged by all its
//!   participants: their ids and the idempotency key. Written and fsynced
//!   before any COMMIT is sent.
//! - `f/<txn id>`: a finished transaction that is remembered for status
//!   lookups (committed ones, and aborted ones that carried a key). Kept up to
//!   a count, oldest removed first; ids sort by generation then sequence, so
//!   key order is age order.
//! - `k/<idempotency key>`: the result given for that key, and a fingerprint
//!   of the request so that a key reused for another request is refused.
//! - `s/<saga id>`: an orchestrated saga that is running or dead-lettered:
//!   its transfer, its stage, and why it left its happy path. The start record is fsynced before the
//!   first step; stage changes are buffered (a lost stage is redone, and
//!   steps are idempotent).
//!
//! Every encoder checks each field against its length prefix and fails
//! (before anything is written) on one that does not fit; every decoder
//! checks lengths, refuses short records and trailing bytes, and fails with
//! `Error::Fatal` on a record that does not decode: the log is corrupt, and
//! the coordinator refuses to start from it (naming the record,
//! [`decode_at`]) or answers INTERNAL for it, never guesses and never
//! panics.

use crate::core::{AbortReason, CommitRecord, Outcome};
use crate::saga::{Recovery, SagaRecord, SagaSpec, Stage};
use tandem::codec::{corrupt, corrupt_record, Reader, Writer};
use tandem::domain::{Id, Leg, TxnId, LEGS_MAX};
use tandem::store::Op;
use tandem::Error;

pub const GENERATION_KEY: &[u8] = b"m/generation";
pub const DECISION_PREFIX: &[u8] = b"d/";
pub const FINISHED_PREFIX: &[u8] = b"f/";
pub const KEY_PREFIX: &[u8] = b"k/";
pub const SAGA_PREFIX: &[u8] = b"s/";

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
    r.done()?;
    Ok(CommitRecord { participants, idempotency_key })
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
    r.done()?;
    Ok(Finished { outcome, idempotency_key })
}

/// What an idempotency key maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedResult {
    pub txn: TxnId,
    pub outcome: Outcome,
    pub fingerprint: u64,
}

fn reason_code(reason: AbortReason) -> u8 {
    match reason {
        AbortReason::InsufficientFunds => 1,
        AbortReason::BalanceOverflow => 2,
        AbortReason::UnknownAccount => 3,
        AbortReason::ParticipantUnavailable => 4,
        AbortReason::Refused => 5,
    }
}

fn reason_from_code(code: u8) -> Result<AbortReason, Error> {
    Ok(match code {
        1 => AbortReason::InsufficientFunds,
        2 => AbortReason::BalanceOverflow,
        3 => AbortReason::UnknownAccount,
        4 => AbortReason::ParticipantUnavailable,
        5 => AbortReason::Refused,
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
    r.done()?;
    Ok(KeyedResult { txn, outcome, fingerprint })
}

/// A fingerprint of a request's legs (FNV-1a over their canonical order), so
/// an idempotency key reused for a different request is refused.
pub fn fingerprint(legs: &[Leg]) -> u64 {
    let mut sorted = legs.to_vec();
    sorted.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for leg in sorted {
        for byte in leg.account.to_le_bytes().into_iter().chain(leg.amount.to_le_bytes()) {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The ops that log a commit decision (and its key's result).
pub fn commit_ops(txn: &TxnId, record: &CommitRecord, fingerprint: u64) -> Result<Vec<Op>, Error> {
    let mut ops = vec![Op::Put(key(DECISION_PREFIX, txn), encode_commit(record)?)];
    if let Some(idem) = &record.idempotency_key {
        let result = KeyedResult { txn: txn.clone(), outcome: Outcome::Committed, fingerprint };
        ops.push(Op::Put(key(KEY_PREFIX, idem), encode_keyed(&result)?));
    }
    Ok(ops)
}

/// The ops that end a committed transaction: the decision is replaced by a
/// finished record.
pub fn end_ops(txn: &TxnId, idempotency_key: Option<Id>) -> Result<Vec<Op>, Error> {
    Ok(vec![
        Op::Delete(key(DECISION_PREFIX, txn)),
        Op::Put(
            key(FINISHED_PREFIX, txn),
            encode_finished(&Finished { outcome: FinishedAs::Committed, idempotency_key })?,
        ),
    ])
}

/// The ops that log a keyed abort.
pub fn abort_ops(txn: &TxnId, idem: &Id, outcome: &Outcome, fingerprint: u64) -> Result<Vec<Op>, Error> {
    let result = KeyedResult { txn: txn.clone(), outcome: outcome.clone(), fingerprint };
    Ok(vec![
        Op::Put(key(KEY_PREFIX, idem), encode_keyed(&result)?),
        Op::Put(
            key(FINISHED_PREFIX, txn),
            encode_finished(&Finished { outcome: FinishedAs::Aborted, idempotency_key: Some(idem.clone()) })?,
        ),
    ])
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
    };
    let reason = r.text()?;
    let parked = r.i64()?;
    let cause = read_cause(&mut r)?;
    r.done()?;
    if spec.amount <= 0 || parked < 0 || parked > spec.amount {
        return Err(corrupt(format!("a saga of {} with {parked} parked", spec.amount)));
    }
    Ok(SagaRecord { spec, stage, reason, cause, parked })
}

/// The ops that end a saga: its record goes, its outcome (and its key's)
/// is remembered.
pub fn saga_finish_ops(saga: &Id, spec: &SagaSpec, outcome: &Outcome) -> Result<Vec<Op>, Error> {
    let finished_as = match outcome {
        Outcome::Committed => FinishedAs::Committed,
        Outcome::Aborted(..) => FinishedAs::Aborted,
        Outcome::Compensated(..) => FinishedAs::Compensated,
        Outcome::DeadLettered(..) => FinishedAs::Resolved,
    };
    let mut ops = vec![
        Op::Delete(key(SAGA_PREFIX, saga)),
        Op::Put(
            key(FINISHED_PREFIX, saga),
            encode_finished(&Finished { outcome: finished_as, idempotency_key: spec.idempotency_key.clone() })?,
        ),
    ];
    if let Some(idem) = &spec.idempotency_key {
        let result = KeyedResult { txn: saga.clone(), outcome: outcome.clone(), fingerprint: spec.fingerprint };
        ops.push(Op::Put(key(KEY_PREFIX, idem), encode_keyed(&result)?));
    }
    Ok(ops)
}

/// The ops that make a saga a dead letter: its record stays (listed for
/// an operator), its key's outcome is remembered.
pub fn dead_letter_ops(saga: &Id, record: &SagaRecord, outcome: &Outcome) -> Result<Vec<Op>, Error> {
    let mut ops = vec![Op::Put(key(SAGA_PREFIX, saga), encode_saga(record)?)];
    if let Some(idem) = &record.spec.idempotency_key {
        let result = KeyedResult { txn: saga.clone(), outcome: outcome.clone(), fingerprint: record.spec.fingerprint };
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
        let record = CommitRecord { participants: vec![id("p1"), id("p2")], idempotency_key: Some(id("k")) };
        assert_eq!(decode_commit(&encode_commit(&record).unwrap()), Ok(record));
        let record = CommitRecord { participants: vec![id("p1")], idempotency_key: None };
        assert_eq!(decode_commit(&encode_commit(&record).unwrap()), Ok(record));
        let finished = Finished { outcome: FinishedAs::Committed, idempotency_key: None };
        assert_eq!(decode_finished(&encode_finished(&finished).unwrap()), Ok(finished));
        for outcome in [
            Outcome::Committed,
            Outcome::Aborted(AbortReason::InsufficientFunds, "poor".into()),
            Outcome::Compensated(Some(AbortReason::UnknownAccount), "refunded".into()),
            Outcome::Compensated(None, "refunded".into()),
            Outcome::DeadLettered(Some(AbortReason::Refused), "parked".into()),
        ] {
            let keyed = KeyedResult { txn: id("t1"), outcome, fingerprint: 42 };
            assert_eq!(decode_keyed(&encode_keyed(&keyed).unwrap()), Ok(keyed));
        }
    }

    #[test]
    fn records_written_before_saga_causes_were_logged_still_read() {
        let keyed = KeyedResult {
            txn: id("t1"),
            outcome: Outcome::Compensated(Some(AbortReason::BalanceOverflow), "refunded".into()),
            fingerprint: 42,
        };
        let bytes = encode_keyed(&keyed).unwrap();
        let old = decode_keyed(&bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(old.outcome, Outcome::Compensated(None, "refunded".into()));
        let record = SagaRecord { cause: Some(AbortReason::Refused), ..saga_record() };
        let bytes = encode_saga(&record).unwrap();
        assert_eq!(decode_saga(&bytes[..bytes.len() - 1]), Ok(SagaRecord { cause: None, ..record }));
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
            },
            stage: Stage::CompensatingDebit,
            reason: "the credit was refused".into(),
            cause: Some(AbortReason::UnknownAccount),
            parked: 0,
        }
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
        let bytes = encode_commit(&CommitRecord { participants: vec![id("p1")], idempotency_key: None }).unwrap();
        let key = key(DECISION_PREFIX, &id("t1"));
        let short = decode_at(&key, &bytes[..bytes.len() - 1], decode_commit);
        assert!(matches!(&short, Err(Error::Fatal(m)) if m.contains("d/t1")), "{short:?}");
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(decode_commit(&long), Err(Error::Fatal(m)) if m.contains("trailing")));
        assert!(decode_commit(&[0, 0, 0]).is_err(), "a decision with no participant");
        assert!(decode_finished(&[9, 0, 0]).is_err());
        assert!(decode_generation(&[1, 2, 3]).is_err());
        assert!(id_from_key(FINISHED_PREFIX, b"f/not an id").is_err());
    }

    #[test]
    fn a_reason_too_long_for_its_record_is_an_error_before_anything_is_written() {
        let keyed = KeyedResult {
            txn: id("t1"),
            outcome: Outcome::Compensated(None, "x".repeat(tandem::codec::TEXT_LEN_MAX + 1)),
            fingerprint: 1,
        };
        assert!(matches!(encode_keyed(&keyed), Err(Error::InvalidInput(_))));
        assert!(abort_ops(&id("t1"), &id("k1"), &keyed.outcome, 1).is_err());
    }

    #[test]
    fn fingerprints_ignore_leg_order_but_not_amounts() {
        let a = [Leg { account: 1, amount: -5 }, Leg { account: 2, amount: 5 }];
        let b = [a[1], a[0]];
        let c = [Leg { account: 1, amount: -6 }, Leg { account: 2, amount: 6 }];
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }
}
