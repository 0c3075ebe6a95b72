//! Property tests of the participant core (2PC and sagas together) and of
//! every record decoder it reads at start.
//!
//! - Random and mutated requests (prepares, commits, aborts, one-phase
//!   commits, batches, saga
//!   steps and compensations with any amount, releases, choreographed
//!   transfers, events relayed from the outbox and then mutated or forged,
//!   operator resolutions, garbage collection, restarts) never panic, and
//!   after each one the bank invariants hold: every account keeps its
//!   escrow invariants (no negative available balance), its reservations
//!   are exactly those of the prepared transactions, money changes only as
//!   the answers say it moved (counting the suspense account), the suspense
//!   account holds exactly what parked transfers and parked debits put
//!   there, and memory equals what recovery rebuilds from the records
//!   written (nothing half applied).
//! - Random bytes, and valid records mutated (cut, lengthened, a byte
//!   changed), never panic a decoder or `Core::recover`; what decodes
//!   encodes again, and a recovered core keeps its invariants.
//!
//! The case counts are modest so the tests run in seconds. A failure prints
//! the seed and the minimal case; proptest also saves it under
//! `proptest-regressions/` and replays it first on the next run.

use super::*;
use crate::core::{Core, TxnState};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use tandem::domain::{Leg, TxnId, REASON_LEN_MAX};

use crate::core::tests::{config, id};

#[derive(Debug, Clone)]
enum Change {
    Nothing,
    Amount(i64),
    Reason(usize),
    Kind(EventKind),
    Version(u32),
    Id(String),
    Accounts(u64, u64),
    /// Another sequence number: out of order, unnumbered, far ahead.
    Seq(u64),
}

#[derive(Debug, Clone)]
enum Request {
    Open(Vec<(u64, i64)>),
    Prepare(u8, bool, Vec<(u64, i64)>),
    PrepareBatch(Vec<(u8, Vec<(u64, i64)>)>),
    Commit(u8),
    CommitBatch(Vec<u8>),
    Abort(u8),
    /// A one-phase commit: its transaction, whether its coordinator is
    /// known, its legs, and, stamped, the watermark it carries (incarnation
    /// 7, position: the transaction's number + 1).
    OnePhase(u8, bool, Vec<(u64, i64)>, Option<u64>),
    OnePhaseBatch(Vec<(u8, Vec<(u64, i64)>)>),
    SetClosed(u64, bool),
    Step(u8, StepKind, StepPhase, u64, i64),
    /// A step whose request carries coordinator c1, incarnation 7, the
    /// saga's position (its number + 1) and this saga watermark.
    OrderedStep(u8, StepKind, StepPhase, u64, i64, u64),
    Forget(Vec<u8>),
    Start(u8, u64, u64, i64, bool),
    Relay(usize, Change),
    Forged(EventKind, u8, u64, u64, i64, usize, String),
    Resolve(u8, Option<u64>),
    Deliver(Event),
    /// A saga's debit of account 4, then its parking in suspense.
    Park(u8),
    /// A saga's debit of account 4, then its refund.
    Refund(u8),
    /// A choreographed transfer to an account that does not exist, whose
    /// refund fails (the source is closed meanwhile): a dead letter.
    DeadLetter(u8),
    Delivered(usize),
    Collect(u64),
    Restart,
}

fn account() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 1..=4u64, 1 => Just(9u64)]
}

fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => 1..=150i64,
        1 => Just(0i64),
        1 => -100..0i64,
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
        1 => any::<i64>(),
    ]
}

fn legs() -> impl Strategy<Value = Vec<(u64, i64)>> {
    proptest::collection::vec((account(), amount()), 0..4)
}

fn reason_len() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0..20usize, 1 => Just(REASON_LEN_MAX), 1 => Just(REASON_LEN_MAX + 1), 1 => Just(70_000usize)]
}

fn event_kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![Just(EventKind::TransferDebited), Just(EventKind::TransferCredited), Just(EventKind::TransferRejected)]
}

fn step_kind() -> impl Strategy<Value = StepKind> {
    prop_oneof![Just(StepKind::Debit), Just(StepKind::Credit), Just(StepKind::Release)]
}

fn step_phase() -> impl Strategy<Value = StepPhase> {
    prop_oneof![Just(StepPhase::Action), Just(StepPhase::Compensation), Just(StepPhase::CompensateToSuspense)]
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => Just(Change::Nothing),
        1 => amount().prop_map(Change::Amount),
        1 => reason_len().prop_map(Change::Reason),
        1 => event_kind().prop_map(Change::Kind),
        1 => (0..3u32).prop_map(Change::Version),
        1 => prop_oneof![Just(String::new()), Just("x".repeat(200)), Just("a b".to_string()), Just("s0:x".to_string())]
            .prop_map(Change::Id),
        1 => (account(), account()).prop_map(|(a, b)| Change::Accounts(a, b)),
        1 => prop_oneof![Just(0u64), 1..8u64, Just(SEQUENCE_AHEAD_MAX + 1), any::<u64>()].prop_map(Change::Seq),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        2 => proptest::collection::vec((account(), prop_oneof![0..=300i64, Just(i64::MAX), Just(-1i64)]), 0..3)
            .prop_map(Request::Open),
        3 => (0..6u8, prop::bool::weighted(0.9), legs()).prop_map(|(t, c, l)| Request::Prepare(t, c, l)),
        1 => proptest::collection::vec((0..6u8, legs()), 0..4).prop_map(Request::PrepareBatch),
        2 => (0..6u8).prop_map(Request::Commit),
        1 => proptest::collection::vec(0..6u8, 0..4).prop_map(Request::CommitBatch),
        2 => (0..6u8).prop_map(Request::Abort),
        3 => (0..8u8, prop::bool::weighted(0.9), legs(), proptest::option::weighted(0.7, 0..10u64))
            .prop_map(|(t, c, l, w)| Request::OnePhase(t, c, l, w)),
        1 => proptest::collection::vec((0..8u8, legs()), 0..4).prop_map(Request::OnePhaseBatch),
        3 => (account(), any::<bool>()).prop_map(|(a, c)| Request::SetClosed(a, c)),
        // Mostly the saga's own amount (so compensations and releases match
        // their steps), sometimes any amount (forged).
        8 => (0..8u8, step_kind(), step_phase(), account(), proptest::option::weighted(0.15, amount()))
            .prop_map(|(s, k, p, a, m)| Request::Step(s, k, p, a, m.unwrap_or(10 * (s as i64 % 3 + 1)))),
        4 => (0..8u8, step_kind(), step_phase(), account(), proptest::option::weighted(0.15, amount()), prop_oneof![3 => Just(0u64), 1 => 0..10u64])
            .prop_map(|(s, k, p, a, m, w)| Request::OrderedStep(s, k, p, a, m.unwrap_or(10 * (s as i64 % 3 + 1)), w)),
        1 => proptest::collection::vec(0..8u8, 0..3).prop_map(Request::Forget),
        3 => (0..4u8, account(), account(), prop_oneof![4 => Just(20i64), 1 => amount()], prop::bool::weighted(0.8))
            .prop_map(|(s, f, t, m, own)| Request::Start(s, f, t, m, own)),
        4 => (any::<usize>(), change()).prop_map(|(i, c)| Request::Relay(i, c)),
        2 => (event_kind(), 0..4u8, account(), account(), amount(), reason_len(),
              prop_oneof![Just("s1:credited".to_string()), Just("f:1".to_string()), Just(String::new())])
            .prop_map(|(k, s, f, t, m, r, e)| Request::Forged(k, s, f, t, m, r, e)),
        3 => (0..4u8, prop::option::of(account())).prop_map(|(s, a)| Request::Resolve(s, a)),
        1 => (0..8u8).prop_map(Request::Park),
        1 => (0..8u8).prop_map(Request::Refund),
        1 => (0..4u8).prop_map(Request::DeadLetter),
        2 => (0..8u8, account()).prop_map(|(s, a)| Request::Step(s, StepKind::Release, StepPhase::Action, a, 10 * (s as i64 % 3 + 1))),
        1 => any::<usize>().prop_map(Request::Delivered),
        1 => (0..3_000u64).prop_map(Request::Collect),
        1 => Just(Request::Restart),
    ]
}

fn to_legs(legs: &[(u64, i64)]) -> Vec<Leg> {
    legs.iter().map(|&(account, amount)| Leg { account, amount }).collect()
}

fn txn(n: u8) -> TxnId {
    id(&format!("t{n}"))
}

fn saga(n: u8) -> Id {
    id(&format!("s{n}"))
}

/// Money on this node: posted balances and the suspense account.
fn money(core: &Core) -> i128 {
    core.accounts().values().map(|a| a.posted as i128).sum::<i128>() + core.suspense() as i128
}

/// What recovery must rebuild: every durable fact of the core.
#[derive(Debug, PartialEq)]
struct Image {
    accounts: BTreeMap<AccountId, Account>,
    suspense: Amount,
    txns: BTreeMap<TxnId, (TxnState, Id, Vec<Leg>, u64)>,
    barriers: BTreeMap<(Id, StepKind), Barrier>,
    transfers: BTreeMap<Id, Transfer>,
    inbox: BTreeSet<String>,
    outbox: BTreeMap<u64, Event>,
    sent_to: BTreeMap<Id, u64>,
    applied_from: BTreeMap<Id, Applied>,
    saga_watermarks: BTreeMap<(Id, u64), u64>,
}

fn image(core: &Core) -> Image {
    Image {
        accounts: core.accounts().clone(),
        suspense: core.suspense(),
        txns: core
            .txns()
            .map(|(id, t)| (id.clone(), (t.state, t.coordinator.clone(), t.legs.clone(), t.prepared_at_ms)))
            .collect(),
        barriers: core.sagas.barriers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        transfers: core.sagas.transfers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        inbox: core.sagas.inbox.iter().cloned().collect(),
        outbox: core.sagas.outbox.clone(),
        sent_to: core.sagas.sent_to.clone(),
        applied_from: core.sagas.applied_from.clone(),
        saga_watermarks: core.sagas.saga_watermarks.clone(),
    }
}

/// What the requests came to, to show the property test reaches the
/// states that matter (releases, parkings, dead letters, resolutions).
#[derive(Default, Debug)]
struct Reached {
    applied: BTreeMap<String, u32>,
    dead_letters: u32,
    resolved: u32,
    committed: u32,
    one_phase: u32,
    credited: u32,
    refused: u32,
}

struct Bank {
    reached: Reached,
    core: Core,
    disk: BTreeMap<Vec<u8>, Vec<u8>>,
    now_ms: u64,
    /// Money as the answers say it moved.
    expected: i128,
}

impl Bank {
    fn new() -> Bank {
        let mut bank = Bank {
            reached: Reached::default(),
            core: Core::new(config()),
            disk: BTreeMap::new(),
            now_ms: 1,
            expected: 0,
        };
        let opened = bank.core.open_accounts(&[(1, 100), (2, 50), (3, 0), (4, 1_000)]);
        bank.write(opened);
        bank.expected = 1_150;
        bank
    }

    /// Applies the effects of an accepted request, as the driver does
    /// (and, once they are durable, lets the outbox relay them).
    fn write<T>(&mut self, result: Result<T, Error>) -> Option<T>
    where
        T: HasEffects,
    {
        let Ok(value) = result else {
            self.reached.refused += 1;
            return None;
        };
        for op in &value.effects().ops {
            match op {
                tandem::store::Op::Put(k, v) => {
                    self.disk.insert(k.clone(), v.clone());
                }
                tandem::store::Op::Delete(k) => {
                    self.disk.remove(k);
                }
            }
        }
        self.core.mark_outbox_durable(self.core.outbox_end());
        Some(value)
    }

    fn run(&mut self, request: Request) {
        // Shorthands for several requests, each run (and checked) alone.
        match request {
            Request::Park(s) => {
                let amount = 10 * (s as i64 % 3 + 1);
                self.run(Request::Step(s, StepKind::Debit, StepPhase::Action, 4, amount));
                self.run(Request::Step(s, StepKind::Debit, StepPhase::CompensateToSuspense, 4, amount));
            }
            Request::Refund(s) => {
                let amount = 10 * (s as i64 % 3 + 1);
                self.run(Request::Step(s, StepKind::Debit, StepPhase::Action, 4, amount));
                self.run(Request::Step(s, StepKind::Debit, StepPhase::Compensation, 4, amount));
            }
            Request::DeadLetter(s) => {
                self.run(Request::Start(s, 4, 9, 20, true));
                self.run(Request::SetClosed(4, true));
                for _ in 0..2 {
                    let oldest = self.core.outbox().len().saturating_sub(1);
                    self.run(Request::Relay(oldest, Change::Nothing));
                }
                self.run(Request::SetClosed(4, false));
            }
            _ => self.run_one(request),
        }
    }

    fn run_one(&mut self, request: Request) {
        self.now_ms += 7;
        let now = self.now_ms;
        let prepared_before: Vec<(TxnId, i128)> = self
            .core
            .prepared()
            .into_iter()
            .map(|(id, t)| (id.clone(), t.legs.iter().map(|l| l.amount as i128).sum()))
            .collect();
        let transfers_before = self.core.sagas.transfers.clone();
        let outbox_end_before = self.core.outbox_end();
        match request {
            Request::Open(accounts) => {
                let sum: i128 = accounts.iter().map(|(_, b)| *b as i128).sum();
                let result = self.core.open_accounts(&accounts);
                if self.write(result).is_some() {
                    self.expected += sum;
                }
            }
            Request::Prepare(t, known, legs) => {
                let coordinator = if known { id("c1") } else { id("c9") };
                let result = self.core.prepare(txn(t), coordinator, to_legs(&legs), now);
                self.write(result);
            }
            Request::PrepareBatch(items) => {
                let items = items
                    .iter()
                    .map(|(t, legs)| Ok((txn(*t), id("c1"), to_legs(legs), crate::core::Stamp::default())))
                    .collect();
                {
                    let result = self.core.prepare_batch(items, now);
                    self.write(result)
                };
            }
            Request::Commit(t) => {
                {
                    let result = self.core.commit(&txn(t), now);
                    self.write(result)
                };
            }
            Request::CommitBatch(ts) => {
                let ids: Vec<TxnId> = ts.iter().map(|t| txn(*t)).collect();
                let (_, effects) = self.core.commit_batch(&ids, now);
                self.write(Ok(effects));
            }
            Request::Abort(t) => {
                {
                    let result = self.core.abort(&txn(t), now);
                    self.write(result)
                };
            }
            Request::OnePhase(t, known, legs, watermark) => {
                let coordinator = if known { id("c1") } else { id("c9") };
                let stamp = match watermark {
                    Some(low_watermark) => crate::core::Stamp {
                        incarnation: 7,
                        position: t as u64 + 1,
                        low_watermark,
                        idempotency_key: None,
                    },
                    None => crate::core::Stamp::default(),
                };
                let result = self.core.commit_one_phase(txn(t), coordinator, to_legs(&legs), stamp, now);
                if let Some((answer, _)) = self.write(result) {
                    self.one_phase_moved(&answer, &legs);
                }
            }
            Request::OnePhaseBatch(items) => {
                let requests = items
                    .iter()
                    .map(|(t, legs)| Ok((txn(*t), id("c1"), to_legs(legs), crate::core::Stamp::default())))
                    .collect();
                let result = self.core.commit_one_phase_batch(requests, now);
                if let Some((answers, _)) = self.write(result) {
                    for (answer, (_, legs)) in answers.iter().zip(&items) {
                        if let Ok(answer) = answer {
                            self.one_phase_moved(answer, legs);
                        }
                    }
                }
            }
            Request::SetClosed(account, closed) => {
                {
                    let result = self.core.set_closed(account, closed);
                    self.write(result)
                };
            }
            Request::Step(..) | Request::OrderedStep(..) => {
                let (s, kind, phase, account, amount, order) = match request {
                    Request::Step(s, kind, phase, account, amount) => (s, kind, phase, account, amount, None),
                    Request::OrderedStep(s, kind, phase, account, amount, low_watermark) => {
                        let order =
                            StepOrder { coordinator: id("c1"), incarnation: 7, position: s as u64 + 1, low_watermark };
                        (s, kind, phase, account, amount, Some(order))
                    }
                    _ => unreachable!(),
                };
                let answer = {
                    let result = self.core.saga_step_ordered(saga(s), kind, phase, account, amount, order, now);
                    self.write(result)
                };
                if let Some((StepAnswer { outcome: StepOutcome::Applied, duplicate: false }, _)) = answer {
                    *self.reached.applied.entry(format!("{kind:?} {phase:?}")).or_default() += 1;
                    self.expected += match (kind, phase) {
                        (StepKind::Debit, StepPhase::Action) | (StepKind::Credit, StepPhase::Compensation) => {
                            -(amount as i128)
                        }
                        (StepKind::Credit, StepPhase::Action)
                        | (StepKind::Debit, StepPhase::Compensation)
                        | (StepKind::Debit, StepPhase::CompensateToSuspense) => amount as i128,
                        _ => 0,
                    };
                }
            }
            Request::Forget(sagas) => {
                let sagas: Vec<Id> = sagas.iter().map(|s| saga(*s)).collect();
                let (_, effects) = self.core.forget_sagas(&sagas, now);
                self.write(Ok(effects));
            }
            Request::Start(s, from, to, amount, to_self) => {
                let target = if to_self { id("p1") } else { id("p2") };
                let existed = self.core.transfer(&saga(s)).is_some();
                let started = {
                    let result = self.core.start_transfer(saga(s), from, to, amount, target, String::new(), now);
                    self.write(result)
                };
                if let Some((transfer, _)) = started {
                    if !existed && transfer.state == TransferState::Debited {
                        self.expected -= amount as i128;
                    }
                }
            }
            Request::Relay(pick, change) => {
                let outbox = self.core.outbox();
                if outbox.is_empty() {
                    return self.check();
                }
                let (_, mut event) = outbox[pick % outbox.len()].clone();
                match change {
                    Change::Nothing => {}
                    Change::Amount(amount) => event.amount = amount,
                    Change::Reason(len) => event.reason = "r".repeat(len),
                    Change::Kind(kind) => event.kind = kind,
                    Change::Version(version) => event.version = version,
                    Change::Id(text) => event.id = text,
                    Change::Accounts(from, to) => (event.from, event.to) = (from, to),
                    Change::Seq(seq) => event.seq = seq,
                }
                self.deliver(event, now);
            }
            Request::Forged(kind, s, from, to, amount, reason, event_id) => {
                let event = Event {
                    version: 1,
                    id: event_id,
                    kind,
                    saga: saga(s),
                    from,
                    to,
                    amount,
                    source: id("p1"),
                    target: id("p1"),
                    reason: "f".repeat(reason),
                    seq: 0,
                    trace_parent: String::new(),
                };
                self.deliver(event, now);
            }
            Request::Resolve(s, to) => {
                let result = self.core.resolve_parked_transfer(&saga(s), to, "by tandem://operator/t: test", now);
                if self.write(result).is_some() {
                    self.reached.resolved += 1;
                }
            }
            Request::Deliver(event) => self.deliver(event, now),
            Request::Park(_) | Request::Refund(_) | Request::DeadLetter(_) => {
                unreachable!("run as the requests they stand for")
            }
            Request::Delivered(pick) => {
                let outbox = self.core.outbox();
                if let Some((seq, _)) = outbox.get(pick % outbox.len().max(1)) {
                    let effects = self.core.outbox_delivered(&[*seq]);
                    self.write(Ok(effects));
                }
            }
            Request::Collect(ms) => {
                self.now_ms += ms;
                let effects = self.core.collect_garbage(self.now_ms);
                self.write(Ok(effects));
                let effects = self.core.collect_sagas(self.now_ms, 2_000, 3);
                self.write(Ok(effects));
            }
            Request::Restart => {
                let recovered = Core::recover(config(), self.disk.clone(), self.now_ms);
                let recovered = recovered.unwrap_or_else(|e| panic!("the core wrote records it cannot read: {e}"));
                assert_eq!(image(&recovered), image(&self.core), "memory and disk disagree: something half applied");
                self.core = recovered;
                self.core.mark_outbox_durable(self.core.outbox_end());
            }
        }
        // Commits move the money their legs say.
        for (txn, sum) in prepared_before {
            if self.core.txn(&txn).is_some_and(|t| t.state == TxnState::Committed) {
                self.reached.committed += 1;
                self.expected += sum;
            }
        }
        // A credited event, a refund and a parking move the transfer's money.
        let credited = self
            .core
            .sagas
            .outbox
            .range(outbox_end_before..)
            .filter(|(_, e)| e.kind == EventKind::TransferCredited)
            .map(|(_, e)| e.amount as i128)
            .sum::<i128>();
        self.expected += credited;
        self.reached.credited += (credited > 0) as u32;
        for (saga, after) in &self.core.sagas.transfers {
            let was_debited = transfers_before.get(saga).is_some_and(|t| t.state == TransferState::Debited);
            if was_debited && matches!(after.state, TransferState::DeadLettered(_)) {
                self.reached.dead_letters += 1;
            }
            if was_debited && matches!(after.state, TransferState::Compensated(_) | TransferState::DeadLettered(_)) {
                self.expected += after.amount as i128;
            }
        }
        self.check();
    }

    /// A one-phase commit applied now moves the money its legs say.
    fn one_phase_moved(&mut self, answer: &crate::core::OnePhaseAnswer, legs: &[(u64, i64)]) {
        if answer.outcome == crate::core::OnePhaseOutcome::Committed && !answer.duplicate {
            self.reached.one_phase += 1;
            self.expected += legs.iter().map(|(_, amount)| *amount as i128).sum::<i128>();
        }
    }

    fn deliver(&mut self, event: Event, now: u64) {
        {
            let result = self.core.deliver_event(event, now);
            self.write(result)
        };
    }

    fn check(&self) {
        let mut reserved: BTreeMap<AccountId, i128> = BTreeMap::new();
        let mut incoming: BTreeMap<AccountId, i128> = BTreeMap::new();
        for (_, txn) in self.core.prepared() {
            for leg in &txn.legs {
                let held = if leg.is_debit() { &mut reserved } else { &mut incoming };
                *held.entry(leg.account).or_default() += (leg.amount as i128).abs();
            }
        }
        for (id, account) in self.core.accounts() {
            assert_eq!(account.check_invariants(), Ok(()), "account {id}");
            assert!(account.available() >= 0, "account {id}: {account:?}");
            assert_eq!(account.reserved as i128, reserved.get(id).copied().unwrap_or(0), "account {id} reserved");
            assert_eq!(account.incoming as i128, incoming.get(id).copied().unwrap_or(0), "account {id} incoming");
        }
        assert_eq!(money(&self.core), self.expected, "money moved other than the answers said");
        assert_eq!(
            self.core.suspense() as i128,
            self.core.parked_known_total(),
            "the suspense account holds other than what was parked"
        );
        // The relay's per-peer view is the outbox, cut by destination.
        let outbox = self.core.outbox();
        let mut by_destination = Vec::new();
        for destination in self.core.outbox_destinations() {
            by_destination.extend(self.core.outbox_batch(&destination, 0, usize::MAX));
        }
        by_destination.sort_by_key(|(seq, _)| *seq);
        assert_eq!(by_destination, outbox, "the relay's batches and the outbox disagree");
    }
}

/// What a core call returns alongside its answer.
trait HasEffects {
    fn effects(&self) -> &Effects;
}

impl HasEffects for Effects {
    fn effects(&self) -> &Effects {
        self
    }
}

impl<T> HasEffects for (T, Effects) {
    fn effects(&self) -> &Effects {
        &self.1
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_and_mutated_requests_keep_the_bank_invariants(requests in proptest::collection::vec(request(), 1..60)) {
        let mut bank = Bank::new();
        for request in requests {
            bank.run(request);
        }
        bank.run(Request::Restart);
    }
}

#[test]
fn the_random_requests_reach_the_states_that_matter() {
    // The same generator as the property test, with a fixed seed: long
    // runs must reach releases, parkings, refunds, dead letters and
    // resolutions, or the property above would hold vacuously.
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut total = Reached::default();
    for _ in 0..64 {
        let mut bank = Bank::new();
        for _ in 0..60 {
            bank.run(request().new_tree(&mut runner).unwrap().current());
        }
        bank.run(Request::Restart);
        for (step, count) in bank.reached.applied {
            *total.applied.entry(step).or_default() += count;
        }
        total.dead_letters += bank.reached.dead_letters;
        total.resolved += bank.reached.resolved;
        total.committed += bank.reached.committed;
        total.one_phase += bank.reached.one_phase;
        total.credited += bank.reached.credited;
        total.refused += bank.reached.refused;
    }
    for step in [
        (StepKind::Debit, StepPhase::Action),
        (StepKind::Credit, StepPhase::Action),
        (StepKind::Debit, StepPhase::Compensation),
        (StepKind::Credit, StepPhase::Compensation),
        (StepKind::Debit, StepPhase::CompensateToSuspense),
        (StepKind::Release, StepPhase::Action),
    ] {
        let step = format!("{:?} {:?}", step.0, step.1);
        assert!(total.applied.get(&step).copied().unwrap_or(0) > 0, "never applied {step}: {total:?}");
    }
    assert!(total.dead_letters > 0 && total.resolved > 0 && total.committed > 0 && total.credited > 0, "{total:?}");
    assert!(total.one_phase > 0, "no one-phase commit applied: {total:?}");
    eprintln!("{total:?}");
}

/// Valid records of every kind the participant stores, with their keys.
fn valid_records() -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut bank = Bank::new();
    for request in [
        Request::Prepare(1, true, vec![(1, -10), (2, 10)]),
        Request::Prepare(2, true, vec![(1, -10)]),
        Request::Commit(2),
        Request::Abort(3),
        Request::OnePhase(4, true, vec![(1, -5), (2, 5)], Some(0)),
        Request::OnePhase(5, true, vec![(1, -5_000), (2, 5_000)], None),
        Request::Step(1, StepKind::Debit, StepPhase::Action, 4, 30),
        Request::Step(1, StepKind::Debit, StepPhase::CompensateToSuspense, 4, 30),
        Request::Step(2, StepKind::Credit, StepPhase::Action, 3, 5),
        Request::Step(3, StepKind::Debit, StepPhase::Action, 3, 999),
        Request::Start(1, 4, 3, 20, true),
        Request::Start(2, 4, 3, 20, false),
        Request::Relay(0, Change::Nothing),
        // A barrier with its saga's place, and a saga watermark.
        Request::OrderedStep(4, StepKind::Credit, StepPhase::Action, 3, 5, 2),
    ] {
        bank.run(request);
    }
    for prefix in [&b"q/"[..], b"w/", b"s/", b"c/", b"b/", b"o/"] {
        assert!(bank.disk.keys().any(|key| key.starts_with(prefix)), "no {prefix:?} record to mutate");
    }
    bank.disk.into_iter().collect()
}

#[derive(Debug, Clone)]
enum Mutation {
    Cut(usize),
    Extend(Vec<u8>),
    Set(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Cut),
        proptest::collection::vec(any::<u8>(), 1..10).prop_map(Mutation::Extend),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
    ]
}

fn mutate(bytes: &[u8], mutation: &Mutation) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    match mutation {
        Mutation::Cut(at) => bytes.truncate(at % (bytes.len() + 1)),
        Mutation::Extend(more) => bytes.extend_from_slice(more),
        Mutation::Set(at, byte) if !bytes.is_empty() => {
            let at = at % bytes.len();
            bytes[at] = *byte;
        }
        Mutation::Set(..) => {}
    }
    bytes
}

/// Every decoder the participant uses at start, on `bytes`: no panic, and
/// what decodes encodes again.
fn decode_everything(bytes: &[u8]) {
    if let Ok(txn) = crate::core::decode_txn(bytes, 5) {
        crate::core::encode_txn(&txn).unwrap();
    }
    let _ = crate::core::decode_account(bytes, bytes);
    if let Ok(barrier) = decode_barrier(bytes) {
        encode_barrier(&barrier).unwrap();
    }
    if let Ok(transfer) = decode_transfer(bytes) {
        encode_transfer(&transfer).unwrap();
    }
    if let Ok(event) = decode_event(bytes) {
        encode_event(&event).unwrap();
    }
    let _ = parse_barrier_key(bytes);
    if let Ok(applied) = decode_applied(bytes) {
        assert_eq!(decode_applied(&encode_applied(&applied)), Ok(applied));
    }
    let _ = parse_watermark_key(bytes);
    let _ = decode_u64(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        decode_everything(&bytes);
    }

    #[test]
    fn mutated_records_never_panic_a_decoder_or_the_recovery(
        picks in proptest::collection::vec((any::<usize>(), mutation(), any::<bool>()), 1..4),
        junk in proptest::option::of((proptest::collection::vec(any::<u8>(), 0..12), proptest::collection::vec(any::<u8>(), 0..24))),
    ) {
        let mut records: BTreeMap<Vec<u8>, Vec<u8>> = valid_records().into_iter().collect();
        let keys: Vec<Vec<u8>> = records.keys().cloned().collect();
        for (pick, mutation, of_key) in &picks {
            let key = keys[pick % keys.len()].clone();
            let value = records.remove(&key).unwrap_or_default();
            decode_everything(&mutate(&value, mutation));
            if *of_key {
                records.insert(mutate(&key, mutation), value);
            } else {
                records.insert(key, mutate(&value, mutation));
            }
        }
        if let Some((key, value)) = junk {
            records.insert(key, value);
        }
        if let Ok(core) = Core::recover(config(), records, 5) {
            for (id, account) in core.accounts() {
                prop_assert_eq!(account.check_invariants(), Ok(()), "account {}", id);
            }
        }
    }

    #[test]
    fn random_wire_events_are_refused_or_read_without_a_panic(
        version in 0..3u32,
        kind in 0..5i32,
        event_id in prop_oneof![Just(String::new()), Just("s1:debited".to_string()), "[ -~]{0,140}"],
        saga_id in prop_oneof![Just("s1".to_string()), "[ -~]{0,70}"],
        amount in amount(),
        reason in reason_len(),
        sequence in prop_oneof![Just(0u64), Just(1), any::<u64>()],
    ) {
        let wire = tandem::pb::ChoreographyEvent {
            version,
            event_id,
            kind,
            saga_id,
            from_account: 1,
            to_account: 2,
            amount,
            source_participant: "p2".into(),
            target_participant: "p1".into(),
            reason: "r".repeat(reason),
            sequence,
            trace_parent: String::new(),
        };
        if let Ok(event) = crate::node::event_from_pb(&wire) {
            prop_assert!(event.check().is_ok());
            let mut bank = Bank::new();
            bank.run(Request::Deliver(event));
        }
    }
}
