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
//! Every decoder checks lengths and panics on a record that does not decode:
//! the log is corrupt and the coordinator must stop, not guess.

use crate::core::{AbortReason, CommitRecord, Outcome};
use crate::saga::{Recovery, SagaRecord, SagaSpec, Stage};
use tandem::domain::{Id, Leg, TxnId};
use tandem::store::Op;

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

pub fn id_from_key(prefix: &[u8], key: &[u8]) -> Id {
    let text = std::str::from_utf8(&key[prefix.len()..]).expect("corrupt log key");
    Id::parse("log key", text).expect("corrupt log key")
}

struct Writer(Vec<u8>);

impl Writer {
    fn text(&mut self, text: &str) {
        assert!(text.len() <= u16::MAX as usize);
        self.0.extend_from_slice(&(text.len() as u16).to_le_bytes());
        self.0.extend_from_slice(text.as_bytes());
    }
    fn byte(&mut self, byte: u8) {
        self.0.push(byte);
    }
    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    fn i64(&mut self, value: i64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        assert!(self.0.len() >= n, "corrupt log record: truncated");
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }
    fn text(&mut self) -> String {
        let len = u16::from_le_bytes(self.take(2).try_into().unwrap()) as usize;
        String::from_utf8(self.take(len).to_vec()).expect("corrupt log record: text")
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
    fn done(&self) {
        assert!(self.0.is_empty(), "corrupt log record: {} trailing bytes", self.0.len());
    }
}

fn optional_id(text: String) -> Option<Id> {
    (!text.is_empty()).then(|| Id::parse("id", &text).expect("corrupt log record: id"))
}

pub fn encode_commit(record: &CommitRecord) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.text(record.idempotency_key.as_ref().map(Id::as_str).unwrap_or(""));
    w.byte(u8::try_from(record.participants.len()).expect("at most 16 participants"));
    for participant in &record.participants {
        w.text(participant.as_str());
    }
    w.0
}

pub fn decode_commit(bytes: &[u8]) -> CommitRecord {
    let mut r = Reader(bytes);
    let idempotency_key = optional_id(r.text());
    let count = r.byte() as usize;
    let participants = (0..count).map(|_| Id::parse("participant", &r.text()).expect("corrupt log record")).collect();
    r.done();
    CommitRecord { participants, idempotency_key }
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

pub fn encode_finished(finished: &Finished) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.byte(match finished.outcome {
        FinishedAs::Aborted => 0,
        FinishedAs::Committed => 1,
        FinishedAs::Compensated => 2,
        FinishedAs::Resolved => 3,
    });
    w.text(finished.idempotency_key.as_ref().map(Id::as_str).unwrap_or(""));
    w.0
}

pub fn decode_finished(bytes: &[u8]) -> Finished {
    let mut r = Reader(bytes);
    let outcome = match r.byte() {
        0 => FinishedAs::Aborted,
        1 => FinishedAs::Committed,
        2 => FinishedAs::Compensated,
        3 => FinishedAs::Resolved,
        other => panic!("corrupt log record: finished as {other}"),
    };
    let idempotency_key = optional_id(r.text());
    r.done();
    Finished { outcome, idempotency_key }
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

fn reason_from_code(code: u8) -> AbortReason {
    match code {
        1 => AbortReason::InsufficientFunds,
        2 => AbortReason::BalanceOverflow,
        3 => AbortReason::UnknownAccount,
        4 => AbortReason::ParticipantUnavailable,
        5 => AbortReason::Refused,
        other => panic!("corrupt log record: abort reason {other}"),
    }
}

/// A saga's cause, as one byte (0: none).
fn cause_code(cause: Option<AbortReason>) -> u8 {
    cause.map_or(0, reason_code)
}

/// Reads the cause that ends a record; records written before causes were
/// logged end without it.
fn read_cause(r: &mut Reader) -> Option<AbortReason> {
    if r.0.is_empty() {
        return None;
    }
    match r.byte() {
        0 => None,
        code => Some(reason_from_code(code)),
    }
}

pub fn encode_keyed(result: &KeyedResult) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.text(result.txn.as_str());
    w.u64(result.fingerprint);
    match &result.outcome {
        Outcome::Committed => w.byte(0),
        Outcome::Aborted(reason, message) => {
            w.byte(reason_code(*reason));
            w.text(message);
        }
        Outcome::Compensated(cause, message) => {
            w.byte(100);
            w.text(message);
            w.byte(cause_code(*cause));
        }
        Outcome::DeadLettered(cause, message) => {
            w.byte(101);
            w.text(message);
            w.byte(cause_code(*cause));
        }
    }
    w.0
}

pub fn decode_keyed(bytes: &[u8]) -> KeyedResult {
    let mut r = Reader(bytes);
    let txn = Id::parse("txn", &r.text()).expect("corrupt log record");
    let fingerprint = r.u64();
    let outcome = match r.byte() {
        0 => Outcome::Committed,
        100 => {
            let message = r.text();
            Outcome::Compensated(read_cause(&mut r), message)
        }
        101 => {
            let message = r.text();
            Outcome::DeadLettered(read_cause(&mut r), message)
        }
        code => Outcome::Aborted(reason_from_code(code), r.text()),
    };
    r.done();
    KeyedResult { txn, outcome, fingerprint }
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
pub fn commit_ops(txn: &TxnId, record: &CommitRecord, fingerprint: u64) -> Vec<Op> {
    let mut ops = vec![Op::Put(key(DECISION_PREFIX, txn), encode_commit(record))];
    if let Some(idem) = &record.idempotency_key {
        let result = KeyedResult { txn: txn.clone(), outcome: Outcome::Committed, fingerprint };
        ops.push(Op::Put(key(KEY_PREFIX, idem), encode_keyed(&result)));
    }
    ops
}

/// The ops that end a committed transaction: the decision is replaced by a
/// finished record.
pub fn end_ops(txn: &TxnId, idempotency_key: Option<Id>) -> Vec<Op> {
    vec![
        Op::Delete(key(DECISION_PREFIX, txn)),
        Op::Put(
            key(FINISHED_PREFIX, txn),
            encode_finished(&Finished { outcome: FinishedAs::Committed, idempotency_key }),
        ),
    ]
}

/// The ops that log a keyed abort.
pub fn abort_ops(txn: &TxnId, idem: &Id, outcome: &Outcome, fingerprint: u64) -> Vec<Op> {
    let result = KeyedResult { txn: txn.clone(), outcome: outcome.clone(), fingerprint };
    vec![
        Op::Put(key(KEY_PREFIX, idem), encode_keyed(&result)),
        Op::Put(
            key(FINISHED_PREFIX, txn),
            encode_finished(&Finished { outcome: FinishedAs::Aborted, idempotency_key: Some(idem.clone()) }),
        ),
    ]
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

fn stage_from_code(code: u8) -> Stage {
    match code {
        1 => Stage::Starting,
        2 => Stage::Debiting,
        3 => Stage::Crediting,
        4 => Stage::CompensatingCredit,
        5 => Stage::CompensatingDebit,
        6 => Stage::Parking,
        7 => Stage::DeadLettered,
        8 => Stage::Releasing,
        other => panic!("corrupt saga record: stage {other}"),
    }
}

pub fn encode_saga(record: &SagaRecord) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    let spec = &record.spec;
    w.byte(stage_code(record.stage));
    w.u64(spec.from);
    w.u64(spec.to);
    w.i64(spec.amount);
    w.text(spec.from_participant.as_str());
    w.text(spec.to_participant.as_str());
    w.byte(matches!(spec.recovery, Recovery::Forward) as u8);
    w.text(spec.idempotency_key.as_ref().map(Id::as_str).unwrap_or(""));
    w.u64(spec.fingerprint);
    w.text(&record.reason);
    w.i64(record.parked);
    w.byte(cause_code(record.cause));
    w.0
}

pub fn decode_saga(bytes: &[u8]) -> SagaRecord {
    let mut r = Reader(bytes);
    let stage = stage_from_code(r.byte());
    let spec = SagaSpec {
        from: r.u64(),
        to: r.u64(),
        amount: r.i64(),
        from_participant: Id::parse("participant", &r.text()).expect("corrupt saga record"),
        to_participant: Id::parse("participant", &r.text()).expect("corrupt saga record"),
        recovery: if r.byte() == 1 { Recovery::Forward } else { Recovery::Backward },
        idempotency_key: optional_id(r.text()),
        fingerprint: r.u64(),
    };
    let reason = r.text();
    let parked = r.i64();
    let cause = read_cause(&mut r);
    r.done();
    SagaRecord { spec, stage, reason, cause, parked }
}

/// The ops that end a saga: its record goes, its outcome (and its key's)
/// is remembered.
pub fn saga_finish_ops(saga: &Id, spec: &SagaSpec, outcome: &Outcome) -> Vec<Op> {
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
            encode_finished(&Finished { outcome: finished_as, idempotency_key: spec.idempotency_key.clone() }),
        ),
    ];
    if let Some(idem) = &spec.idempotency_key {
        let result = KeyedResult { txn: saga.clone(), outcome: outcome.clone(), fingerprint: spec.fingerprint };
        ops.push(Op::Put(key(KEY_PREFIX, idem), encode_keyed(&result)));
    }
    ops
}

/// The ops that make a saga a dead letter: its record stays (listed for
/// an operator), its key's outcome is remembered.
pub fn dead_letter_ops(saga: &Id, record: &SagaRecord, outcome: &Outcome) -> Vec<Op> {
    let mut ops = vec![Op::Put(key(SAGA_PREFIX, saga), encode_saga(record))];
    if let Some(idem) = &record.spec.idempotency_key {
        let result = KeyedResult { txn: saga.clone(), outcome: outcome.clone(), fingerprint: record.spec.fingerprint };
        ops.push(Op::Put(key(KEY_PREFIX, idem), encode_keyed(&result)));
    }
    ops
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
        assert_eq!(decode_commit(&encode_commit(&record)), record);
        let record = CommitRecord { participants: vec![id("p1")], idempotency_key: None };
        assert_eq!(decode_commit(&encode_commit(&record)), record);
        let finished = Finished { outcome: FinishedAs::Committed, idempotency_key: None };
        assert_eq!(decode_finished(&encode_finished(&finished)), finished);
        for outcome in [
            Outcome::Committed,
            Outcome::Aborted(AbortReason::InsufficientFunds, "poor".into()),
            Outcome::Compensated(Some(AbortReason::UnknownAccount), "refunded".into()),
            Outcome::Compensated(None, "refunded".into()),
            Outcome::DeadLettered(Some(AbortReason::Refused), "parked".into()),
        ] {
            let keyed = KeyedResult { txn: id("t1"), outcome, fingerprint: 42 };
            assert_eq!(decode_keyed(&encode_keyed(&keyed)), keyed);
        }
    }

    #[test]
    fn records_written_before_saga_causes_were_logged_still_read() {
        let keyed = KeyedResult {
            txn: id("t1"),
            outcome: Outcome::Compensated(Some(AbortReason::BalanceOverflow), "refunded".into()),
            fingerprint: 42,
        };
        let bytes = encode_keyed(&keyed);
        let old = decode_keyed(&bytes[..bytes.len() - 1]);
        assert_eq!(old.outcome, Outcome::Compensated(None, "refunded".into()));
        let record = SagaRecord { cause: Some(AbortReason::Refused), ..saga_record() };
        let bytes = encode_saga(&record);
        assert_eq!(decode_saga(&bytes[..bytes.len() - 1]), SagaRecord { cause: None, ..record });
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
        assert_eq!(decode_saga(&encode_saga(&record)), record);
        let record = SagaRecord { cause: None, ..saga_record() };
        assert_eq!(decode_saga(&encode_saga(&record)), record);
    }

    #[test]
    #[should_panic(expected = "corrupt log record")]
    fn a_truncated_record_stops_the_coordinator() {
        let bytes = encode_commit(&CommitRecord { participants: vec![id("p1")], idempotency_key: None });
        decode_commit(&bytes[..bytes.len() - 1]);
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
