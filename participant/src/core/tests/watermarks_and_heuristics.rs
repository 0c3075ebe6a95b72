//! Deduplication by watermark (no time window), coordinator incarnations
//! and orphans, and heuristic decisions with their audit trail.

use super::*;

const A: u64 = 0xA;
const B: u64 = 0xB;

fn stamp(incarnation: u64, position: u64, low_watermark: u64) -> Stamp {
    Stamp { incarnation, position, low_watermark, idempotency_key: None }
}

fn prepare(core: &mut Core, disk: &mut Disk, txn: &str, legs: Vec<Leg>, stamp: Stamp, now_ms: u64) -> Vote {
    let (vote, effects) = core.prepare_stamped(id(txn), id("c1"), legs, stamp, now_ms).unwrap();
    disk.apply(&effects);
    vote
}

fn commit(core: &mut Core, disk: &mut Disk, txns: &[&str], stamp: Stamp, now_ms: u64) -> Result<(), Error> {
    let ids: Vec<TxnId> = txns.iter().map(|t| id(t)).collect();
    let (answer, effects) = core.commit_batch_stamped(&ids, Some(&id("c1")), stamp, now_ms);
    disk.apply(&effects);
    answer
}

fn balances(core: &Core) -> (Amount, Amount) {
    (core.account(1).unwrap().posted, core.account(2).unwrap().posted)
}

#[test]
fn a_late_duplicate_below_the_watermark_is_recognised_whatever_its_age_and_its_record_goes_at_once() {
    let (mut core, mut disk) = setup();
    let legs = vec![debit(1, 10), credit(2, 10)];
    assert_eq!(prepare(&mut core, &mut disk, "t1", legs.clone(), stamp(A, 1, 1), 0), Vote::Yes);
    commit(&mut core, &mut disk, &["t1"], stamp(A, 0, 1), 1).unwrap();
    // Above the watermark, the committed record stays however long: a
    // duplicate of its prepare still finds it.
    assert!(core.collect_garbage(u64::MAX / 2).ops.is_empty());
    assert!(core.txn(&id("t1")).is_some());
    // The coordinator's watermark passes t1 (t2's prepare carries it): its
    // record goes at the next collection, with no time window.
    assert_eq!(prepare(&mut core, &mut disk, "t2", vec![debit(1, 5)], stamp(A, 2, 2), 2), Vote::Yes);
    let collected = core.collect_garbage(3);
    assert_eq!(collected.ops, vec![Op::Delete(b"t/t1".to_vec())]);
    disk.apply(&collected);
    // A year later, after a restart, the duplicates of t1 arrive.
    let mut core = restart(&disk, 365 * 24 * 3600 * 1000);
    let now = 365 * 24 * 3600 * 1000 + 1;
    let (vote, effects) = core.prepare_stamped(id("t1"), id("c1"), legs, stamp(A, 1, 1), now).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::Late, ref why) if why.contains("watermark")), "{vote:?}");
    assert!(effects.ops.is_empty(), "a late prepare writes nothing: {effects:?}");
    assert_eq!(core.account(1).unwrap().reserved, 5, "only t2's reservation");
    disk.apply(&effects);
    commit(&mut core, &mut disk, &["t1"], stamp(A, 0, 1), now).unwrap();
    assert_eq!(balances(&core), (90, 10), "t1 applied once");
    // An abort below the watermark leaves no tombstone.
    let effects = core.abort_stamped(&id("t0"), Some(&id("c1")), stamp(A, 1, 0), now).unwrap();
    assert!(effects.ops.is_empty(), "{effects:?}");
    assert!(core.txn(&id("t0")).is_none());
}

#[test]
fn the_watermark_is_written_before_the_deletions_it_allows_and_never_goes_back() {
    let (mut core, mut disk) = setup();
    prepare(&mut core, &mut disk, "t1", vec![debit(1, 10)], stamp(A, 1, 1), 0);
    commit(&mut core, &mut disk, &["t1"], stamp(A, 0, 1), 1).unwrap();
    let (_, effects) = core.prepare_stamped(id("t2"), id("c1"), vec![debit(1, 1)], stamp(A, 2, 2), 2).unwrap();
    assert_eq!(effects.ops.first().map(|op| matches!(op, Op::Put(key, _) if key == b"v/c1")), Some(true));
    disk.apply(&effects);
    // An older message carries an older watermark: it changes nothing.
    let (answer, effects) = core.commit_batch_stamped(&[id("t2")], Some(&id("c1")), stamp(A, 0, 1), 3);
    answer.unwrap();
    assert!(!effects.ops.iter().any(|op| matches!(op, Op::Put(key, _) if key == b"v/c1")));
    assert_eq!(core.coordinator_views()[&id("c1")].low_watermark, 2);
    // A restart reads it back.
    disk.apply(&effects);
    assert_eq!(restart(&disk, 4).coordinator_views()[&id("c1")].low_watermark, 2);
}

#[test]
fn a_new_incarnation_orphans_the_old_ones_prepared_transactions_which_are_never_asked_about_or_presumed_aborted() {
    let (mut core, mut disk) = setup();
    assert_eq!(prepare(&mut core, &mut disk, "a-1", vec![debit(1, 30), credit(2, 30)], stamp(A, 1, 1), 0), Vote::Yes);
    assert_eq!(core.due_queries(10_000, 10), vec![(id("a-1"), id("c1"))]);
    // The coordinator lost its log: it comes back as incarnation B.
    assert_eq!(prepare(&mut core, &mut disk, "b-1", vec![debit(1, 5)], stamp(B, 1, 1), 10_001), Vote::Yes);
    let orphan = core.txn(&id("a-1")).unwrap();
    assert!(core.is_orphan(orphan));
    assert_eq!(core.orphan_count(), 1);
    // Never asked about again (only b-1 is, when due), before or after a restart.
    assert!(core.due_queries(100_000, 10).iter().all(|(txn, _)| txn != &id("a-1")));
    let mut core = restart(&disk, 200_000);
    assert_eq!(core.due_queries(200_000, 10), vec![(id("b-1"), id("c1"))]);
    assert_eq!(core.orphan_count(), 1);
    // Its reservation stays.
    assert_eq!(core.account(1).unwrap().reserved, 35);
    // A late prepare from the retired incarnation votes NO and reserves nothing.
    let (vote, _) = core.prepare_stamped(id("a-2"), id("c1"), vec![debit(1, 1)], stamp(A, 2, 1), 200_001).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::Late, ref why) if why.contains("retired")), "{vote:?}");
    assert_eq!(core.account(1).unwrap().reserved, 35);
    // A late message from A does not make it current again.
    assert_eq!(core.coordinator_views()[&id("c1")].current, B);
}

#[test]
fn an_answer_from_another_incarnation_orphans_the_transaction() {
    let (mut core, mut disk) = setup();
    prepare(&mut core, &mut disk, "a-1", vec![debit(1, 30)], stamp(A, 1, 1), 0);
    disk.apply(&Effects::buffered(core.learn_incarnation(&id("c1"), B).unwrap()));
    assert!(core.is_orphan(core.txn(&id("a-1")).unwrap()));
    assert!(core.due_queries(100_000, 10).is_empty());
    let core = restart(&disk, 5);
    assert!(core.is_orphan(core.txn(&id("a-1")).unwrap()));
}

#[test]
fn an_operator_resolves_an_orphan_and_a_contrary_outcome_later_is_recorded_as_mixed_never_applied_twice() {
    let (mut core, mut disk) = setup();
    prepare(&mut core, &mut disk, "a-1", vec![debit(1, 30), credit(2, 30)], stamp(A, 1, 1), 0);
    disk.apply(&Effects::buffered(core.learn_incarnation(&id("c1"), B).unwrap()));
    // Refused, changing nothing: no reason, an unknown id.
    assert!(matches!(core.resolve_heuristically(&id("a-1"), Decided::Abort, " ", 1), Err(Error::InvalidInput(_))));
    assert!(matches!(core.resolve_heuristically(&id("zz"), Decided::Abort, "ops", 1), Err(Error::NotFound(_))));
    // The operator aborts it: the reservation goes, durably, with the reason.
    let effects = core.resolve_heuristically(&id("a-1"), Decided::Abort, "c1 lost its disk; ticket 42", 5).unwrap();
    assert_eq!(effects.durability, Durability::Fsync);
    disk.apply(&effects);
    assert_eq!(core.account(1).unwrap(), Account { posted: 100, reserved: 0, incoming: 0, closed: false });
    assert_eq!(core.orphan_count(), 0);
    assert!(core.heuristic_excess().is_empty(), "no contrary outcome yet");
    // Decided once: a second decision is refused.
    assert!(matches!(
        core.resolve_heuristically(&id("a-1"), Decided::Commit, "again", 6),
        Err(Error::FailedPrecondition(m)) if m.contains("heuristically")
    ));
    // The old coordinator's commit arrives after all (its disk came back):
    // acknowledged in a batch with others, nothing applied, the hazard recorded.
    prepare(&mut core, &mut disk, "b-1", vec![debit(1, 5), credit(2, 5)], stamp(B, 1, 1), 7);
    commit(&mut core, &mut disk, &["a-1", "b-1"], stamp(A, 0, 1), 8).unwrap();
    assert_eq!(balances(&core), (95, 5), "b-1 applied, a-1 not");
    let record = core.txn(&id("a-1")).unwrap().heuristic.clone().unwrap();
    assert!(record.mixed());
    assert_eq!(record.reason, "c1 lost its disk; ticket 42");
    // The money is accounted for: the excess is what the commit would have
    // moved here, with the opposite sign (account 1 holds 30 more than the
    // outcome gives it, account 2 30 less).
    let excess = core.heuristic_excess();
    assert_eq!(excess, BTreeMap::from([(1, 30), (2, -30)]));
    // A duplicate commit changes nothing; a restart keeps it all.
    commit(&mut core, &mut disk, &["a-1"], stamp(A, 0, 1), 9).unwrap();
    let mut core = restart(&disk, 10);
    assert_eq!(balances(&core), (95, 5));
    assert_eq!(core.heuristic_excess(), excess);
    assert!(core.collect_garbage(u64::MAX / 2).ops.is_empty(), "a heuristic decision is never collected");
}

#[test]
fn a_heuristic_commit_then_the_coordinators_abort_is_mixed_and_a_confirming_outcome_is_not() {
    let (mut core, mut disk) = setup();
    prepare(&mut core, &mut disk, "t1", vec![debit(1, 30)], stamp(A, 1, 1), 0);
    prepare(&mut core, &mut disk, "t2", vec![credit(2, 7)], stamp(A, 2, 1), 0);
    disk.apply(&core.resolve_heuristically(&id("t1"), Decided::Commit, "waited a day", 1).unwrap());
    disk.apply(&core.resolve_heuristically(&id("t2"), Decided::Commit, "waited a day", 1).unwrap());
    assert_eq!(balances(&core), (70, 7));
    disk.apply(&core.abort_stamped(&id("t1"), Some(&id("c1")), stamp(A, 1, 0), 2).unwrap());
    commit(&mut core, &mut disk, &["t2"], stamp(A, 0, 1), 3).unwrap();
    assert_eq!(balances(&core), (70, 7), "nothing applied twice, nothing undone");
    assert!(core.txn(&id("t1")).unwrap().heuristic.as_ref().unwrap().mixed());
    assert!(!core.txn(&id("t2")).unwrap().heuristic.as_ref().unwrap().mixed(), "confirmed");
    assert_eq!(core.heuristic_excess(), BTreeMap::from([(1, -30)]));
    // The prepare of a heuristically decided transaction is refused as late.
    let (vote, _) = core.prepare_stamped(id("t1"), id("c1"), vec![debit(1, 30)], stamp(A, 1, 1), 4).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::Late, _)), "{vote:?}");
}

#[test]
fn only_a_prepared_transaction_can_be_decided_heuristically() {
    let (mut core, mut disk) = setup();
    prepare(&mut core, &mut disk, "t1", vec![debit(1, 30)], stamp(A, 1, 1), 0);
    commit(&mut core, &mut disk, &["t1"], stamp(A, 0, 1), 1).unwrap();
    let refused = core.resolve_heuristically(&id("t1"), Decided::Abort, "oops", 2);
    assert!(matches!(&refused, Err(Error::FailedPrecondition(m)) if m.contains("committed")), "{refused:?}");
    assert_eq!(balances(&core), (70, 0));
}

#[test]
fn unstamped_records_keep_the_time_retention() {
    let (mut core, mut disk) = setup();
    prepare(&mut core, &mut disk, "t1", vec![debit(1, 10)], Stamp::default(), 0);
    commit(&mut core, &mut disk, &["t1"], Stamp::default(), 1).unwrap();
    assert!(core.collect_garbage(500).ops.is_empty());
    assert_eq!(core.collect_garbage(1_001).ops, vec![Op::Delete(b"t/t1".to_vec())]);
}

#[test]
fn the_due_index_reads_only_what_is_due_and_a_coordinator_that_cannot_be_asked_is_skipped_whole() {
    let (mut core, mut disk) = setup();
    for i in 0..50 {
        prepare(&mut core, &mut disk, &format!("t{i}"), vec![debit(1, 1)], stamp(A, i + 1, 1), i);
    }
    let mut looked = 0;
    let due = core.due_queries_where(10_000, 100, |_, _| {
        looked += 1;
        Ask::NotThisCoordinator
    });
    assert!(due.is_empty());
    assert_eq!(looked, 1, "one look for a coordinator that cannot be asked");
    // Only those due by now: prepared at 0..=9, due 500 ms later.
    assert_eq!(core.due_queries(509, 100).len(), 10);
}
