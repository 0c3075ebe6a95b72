//! One-phase commit: a transaction whose legs all live here, judged,
//! posted and made durable in one write; refusals, duplicates, late
//! duplicates below the watermark, and ids of the other protocol.

use super::*;

const A: u64 = 0xA;
const B: u64 = 0xB;

fn stamp(incarnation: u64, position: u64, low_watermark: u64) -> Stamp {
    Stamp { incarnation, position, low_watermark, idempotency_key: None }
}

fn one_phase(core: &mut Core, disk: &mut Disk, txn: &str, legs: Vec<Leg>, stamp: Stamp, now_ms: u64) -> OnePhaseAnswer {
    let (answer, effects) = core.commit_one_phase(id(txn), id("c1"), legs, stamp, now_ms).unwrap();
    disk.apply(&effects);
    answer
}

fn committed() -> OnePhaseAnswer {
    OnePhaseAnswer { outcome: OnePhaseOutcome::Committed, duplicate: false }
}

fn balances(core: &Core) -> (Amount, Amount) {
    (core.account(1).unwrap().posted, core.account(2).unwrap().posted)
}

#[test]
fn an_accepted_one_phase_commit_is_posted_and_recorded_in_one_fsynced_write() {
    let (mut core, _) = setup();
    let (answer, effects) =
        core.commit_one_phase(id("t1"), id("c1"), vec![debit(1, 30), credit(2, 30)], stamp(A, 1, 1), 0).unwrap();
    assert_eq!(answer, committed());
    assert_eq!(effects.durability, Durability::Fsync, "durable before the answer");
    let puts: Vec<&[u8]> = effects
        .ops
        .iter()
        .map(|op| match op {
            Op::Put(key, _) => &key[..2],
            Op::Delete(_) => panic!("a one-phase commit deletes nothing"),
        })
        .collect();
    // The coordinator's view, both accounts and the record: one write.
    assert_eq!(puts, [&b"v/"[..], b"a/", b"a/", b"t/"], "{effects:?}");
    assert_eq!(balances(&core), (70, 30));
    assert_eq!((core.account(1).unwrap().reserved, core.account(2).unwrap().incoming), (0, 0), "nothing held");
    let record = core.txn(&id("t1")).unwrap();
    assert_eq!((record.state, record.position), (TxnState::Committed, 1));
    assert_eq!(record.one_phase, Some(OnePhaseRecord { refusal: None }));
    assert_eq!(core.prepared_count(), 0, "never in doubt");
    assert!(core.due_queries(u64::MAX / 2, 10).is_empty(), "nothing to ask the coordinator");
}

#[test]
fn a_refusal_changes_nothing_but_its_durable_record_and_a_duplicate_gets_the_first_answer() {
    let (mut core, mut disk) = setup();
    let (answer, effects) =
        core.commit_one_phase(id("t1"), id("c1"), vec![debit(1, 500), credit(2, 500)], stamp(A, 1, 1), 0).unwrap();
    let OnePhaseOutcome::Refused(Refusal::InsufficientFunds, reason) = answer.outcome.clone() else {
        panic!("{answer:?}")
    };
    assert!(reason.contains("account 1"), "{reason}");
    // Durable before the answer (an fsync covers it), so that a duplicate
    // can never find this node without it and apply it after all.
    assert_ne!(effects.durability, Durability::Buffered);
    disk.apply(&effects);
    assert_eq!(balances(&core), (100, 0));
    assert_eq!(core.txn(&id("t1")).unwrap().state, TxnState::Aborted);
    // Funds arrive; the duplicate still gets the first answer, after a restart too.
    core.commit_one_phase(id("t0"), id("c1"), vec![credit(1, 1_000)], stamp(A, 2, 1), 1).unwrap();
    let mut core = restart(&disk, 2);
    for _ in 0..2 {
        let (again, effects) =
            core.commit_one_phase(id("t1"), id("c1"), vec![debit(1, 500), credit(2, 500)], stamp(A, 1, 1), 3).unwrap();
        assert_eq!(again, OnePhaseAnswer { outcome: answer.outcome.clone(), duplicate: true });
        assert!(effects.ops.is_empty());
        assert_eq!(effects.durability, Durability::Lazy, "after the first write's fsync");
    }
    assert_eq!(balances(&core), (100, 0));
}

#[test]
fn a_duplicate_of_a_committed_one_is_not_applied_twice_across_a_restart() {
    let (mut core, mut disk) = setup();
    let legs = vec![debit(1, 30), credit(2, 30)];
    assert_eq!(one_phase(&mut core, &mut disk, "t1", legs.clone(), stamp(A, 1, 1), 0), committed());
    let mut core = restart(&disk, 1);
    for now in 2..4 {
        let (again, effects) = core.commit_one_phase(id("t1"), id("c1"), legs.clone(), stamp(A, 1, 1), now).unwrap();
        assert_eq!(again, OnePhaseAnswer { outcome: OnePhaseOutcome::Committed, duplicate: true });
        assert!(effects.ops.is_empty());
        assert_eq!(effects.durability, Durability::Lazy);
    }
    assert_eq!(balances(&core), (70, 30));
}

#[test]
fn a_late_duplicate_below_the_watermark_is_recognised_once_its_record_is_collected() {
    let (mut core, mut disk) = setup();
    let legs = vec![debit(1, 10), credit(2, 10)];
    assert_eq!(one_phase(&mut core, &mut disk, "t1", legs.clone(), stamp(A, 1, 1), 0), committed());
    // Above the watermark the record stays, however long.
    assert!(core.collect_garbage(u64::MAX / 2).ops.is_empty());
    // The watermark passes t1 (t2 carries it): its record goes at once.
    assert_eq!(one_phase(&mut core, &mut disk, "t2", vec![debit(1, 5)], stamp(A, 2, 2), 1), committed());
    let collected = core.collect_garbage(2);
    assert_eq!(collected.ops, vec![Op::Delete(b"t/t1".to_vec())]);
    disk.apply(&collected);
    let mut core = restart(&disk, 10_000_000);
    let (late, effects) = core.commit_one_phase(id("t1"), id("c1"), legs.clone(), stamp(A, 1, 1), 10_000_001).unwrap();
    assert!(
        matches!(&late.outcome, OnePhaseOutcome::Refused(Refusal::Late, why) if why.contains("watermark")),
        "{late:?}"
    );
    assert!(effects.ops.is_empty(), "a late request writes nothing: {effects:?}");
    assert_eq!(balances(&core), (85, 10), "t1 applied once");
    // So is one from a retired incarnation.
    let (answer, _) = core.commit_one_phase(id("t3"), id("c1"), legs.clone(), stamp(B, 1, 1), 10_000_002).unwrap();
    assert_eq!(answer, committed(), "B is new: A retires");
    let (late, _) = core.commit_one_phase(id("t4"), id("c1"), legs, stamp(A, 9, 2), 10_000_003).unwrap();
    assert!(matches!(late.outcome, OnePhaseOutcome::Refused(Refusal::Late, _)), "{late:?}");
}

#[test]
fn one_phase_and_two_phase_ids_never_mix() {
    let (mut core, mut disk) = setup();
    // Prepared by 2PC, then a one-phase request for it: refused, nothing changes.
    let (vote, effects) = core.prepare_stamped(id("t1"), id("c1"), vec![debit(1, 10)], stamp(A, 1, 1), 0).unwrap();
    assert_eq!(vote, Vote::Yes);
    disk.apply(&effects);
    let (answer, effects) = core.commit_one_phase(id("t1"), id("c1"), vec![debit(1, 10)], stamp(A, 1, 1), 1).unwrap();
    assert!(
        matches!(&answer.outcome, OnePhaseOutcome::Refused(Refusal::ProtocolMismatch, why) if why.contains("two-phase")),
        "{answer:?}"
    );
    assert!(effects.ops.is_empty());
    assert_eq!((core.account(1).unwrap().reserved, core.txn(&id("t1")).unwrap().state), (10, TxnState::Prepared));
    // An ABORT's tombstone is a two-phase record too.
    core.abort(&id("t9"), 2).unwrap();
    let (answer, _) = core.commit_one_phase(id("t9"), id("c1"), vec![debit(1, 10)], stamp(A, 9, 1), 3).unwrap();
    assert!(matches!(answer.outcome, OnePhaseOutcome::Refused(Refusal::ProtocolMismatch, _)));
    // Committed in one phase, then a prepare, a COMMIT or an ABORT for it.
    assert_eq!(
        one_phase(&mut core, &mut disk, "t2", vec![debit(1, 20), credit(2, 20)], stamp(A, 2, 1), 4),
        committed()
    );
    let (vote, effects) = core.prepare_stamped(id("t2"), id("c1"), vec![debit(1, 20)], stamp(A, 2, 1), 5).unwrap();
    assert!(matches!(&vote, Vote::No(Refusal::ProtocolMismatch, why) if why.contains("one phase")), "{vote:?}");
    assert!(effects.ops.is_empty());
    assert!(matches!(core.commit(&id("t2"), 6), Err(Error::FailedPrecondition(m)) if m.contains("one phase")));
    let (answer, effects) = core.commit_batch_stamped(&[id("t1"), id("t2")], Some(&id("c1")), stamp(A, 0, 1), 7);
    assert!(matches!(answer, Err(Error::FailedPrecondition(_))));
    assert!(effects.ops.is_empty(), "the batch is refused before t1 is applied");
    assert!(core.abort(&id("t2"), 8).is_err(), "committed here: an abort breaks the protocol");
    assert_eq!(balances(&core), (80, 20), "t2 once; t1 still prepared");
}

#[test]
fn a_one_phase_commit_is_judged_as_a_prepare_is() {
    let (mut core, mut disk) = setup();
    core.open_accounts(&[(3, 0)]).unwrap();
    let cases: Vec<(Id, Vec<Leg>, Refusal)> = vec![
        (id("c1"), vec![debit(1, 10), credit(9, 10)], Refusal::UnknownAccount),
        (id("c9"), vec![debit(1, 10), credit(2, 10)], Refusal::UnknownCoordinator),
        (id("c1"), vec![debit(1, 101), credit(2, 101)], Refusal::InsufficientFunds),
    ];
    for (i, (coordinator, legs, expected)) in cases.into_iter().enumerate() {
        let txn = id(&format!("t{i}"));
        let (answer, effects) = core.commit_one_phase(txn, coordinator, legs, stamp(A, i as u64 + 1, 1), 0).unwrap();
        assert!(matches!(answer.outcome, OnePhaseOutcome::Refused(r, _) if r == expected), "{answer:?}");
        disk.apply(&effects);
    }
    core.set_closed(2, true).unwrap();
    let (answer, _) =
        core.commit_one_phase(id("t8"), id("c1"), vec![debit(1, 5), credit(2, 5)], stamp(A, 8, 1), 0).unwrap();
    assert!(matches!(answer.outcome, OnePhaseOutcome::Refused(Refusal::AccountClosed, _)), "{answer:?}");
    core.set_closed(2, false).unwrap();
    // Escrow: what prepared debits hold is not available to a one-phase debit.
    assert_eq!(core.prepare_stamped(id("p"), id("c1"), vec![debit(1, 95)], stamp(A, 20, 1), 0).unwrap().0, Vote::Yes);
    let (answer, _) =
        core.commit_one_phase(id("t9"), id("c1"), vec![debit(1, 6), credit(2, 6)], stamp(A, 21, 1), 0).unwrap();
    assert!(matches!(answer.outcome, OnePhaseOutcome::Refused(Refusal::InsufficientFunds, _)), "{answer:?}");
    assert_eq!(balances(&core), (100, 0));
    // Bad input is an error, and changes nothing.
    assert!(core.commit_one_phase(id("t10"), id("c1"), vec![], stamp(A, 22, 1), 0).is_err());
    assert!(core.commit_one_phase(id("t10"), id("c1"), vec![debit(1, 0)], stamp(A, 22, 1), 0).is_err());
    assert!(core.txn(&id("t10")).is_none());
    // A key an earlier incarnation's transaction holds here (orphaned).
    let keyed = Stamp { idempotency_key: Some(id("k1")), ..stamp(A, 30, 1) };
    assert_eq!(core.prepare_stamped(id("o1"), id("c1"), vec![debit(1, 1)], keyed, 0).unwrap().0, Vote::Yes);
    let keyed = Stamp { idempotency_key: Some(id("k1")), ..stamp(B, 1, 1) };
    let (answer, _) = core.commit_one_phase(id("t11"), id("c1"), vec![debit(1, 1), credit(2, 1)], keyed, 0).unwrap();
    assert_eq!(answer.outcome, OnePhaseOutcome::Refused(Refusal::KeyOfLostIncarnation, "o1".into()));
}

#[test]
fn a_batch_judges_each_alone_in_one_write_as_durable_as_its_most_demanding() {
    let (mut core, _) = setup();
    let requests = vec![
        Ok((id("t1"), id("c1"), vec![debit(1, 30), credit(2, 30)], stamp(A, 1, 1))),
        Err(Error::InvalidInput("malformed".into())),
        Ok((id("t2"), id("c1"), vec![debit(1, 500), credit(2, 500)], stamp(A, 2, 1))),
        Ok((id("t1"), id("c1"), vec![debit(1, 30), credit(2, 30)], stamp(A, 1, 1))),
    ];
    let (answers, effects) = core.commit_one_phase_batch(requests, 0).unwrap();
    assert_eq!(answers[0], Ok(committed()));
    assert!(answers[1].is_err());
    assert!(matches!(
        &answers[2],
        Ok(OnePhaseAnswer { outcome: OnePhaseOutcome::Refused(Refusal::InsufficientFunds, _), .. })
    ));
    assert_eq!(answers[3], Ok(OnePhaseAnswer { outcome: OnePhaseOutcome::Committed, duplicate: true }));
    assert_eq!(effects.durability, Durability::Fsync);
    assert_eq!(balances(&core), (70, 30));
    assert!(core.commit_one_phase_batch(Vec::new(), 0).is_err(), "1 to ONE_PHASE_BATCH_MAX");
    let too_many = (0..=ONE_PHASE_BATCH_MAX).map(|_| Err(Error::InvalidInput("x".into()))).collect();
    assert!(core.commit_one_phase_batch(too_many, 0).is_err());
}

#[test]
fn one_phase_records_survive_a_restart_and_a_corrupt_one_is_refused() {
    let (mut core, mut disk) = setup();
    one_phase(&mut core, &mut disk, "t1", vec![debit(1, 10), credit(2, 10)], stamp(A, 1, 1), 0);
    one_phase(&mut core, &mut disk, "t2", vec![debit(1, 500)], stamp(A, 2, 1), 0);
    let again = restart(&disk, 5);
    assert_eq!(again.txn(&id("t1")).unwrap().one_phase, Some(OnePhaseRecord { refusal: None }));
    let refused = again.txn(&id("t2")).unwrap().one_phase.clone().unwrap().refusal.unwrap();
    assert_eq!(refused.0, Refusal::InsufficientFunds);
    assert_eq!(balances(&again), (90, 10));
    // A one-phase flag on a prepared record, or a committed one with a refusal: corrupt.
    let bytes = disk.0[&b"t/t1".to_vec()].clone();
    let mut prepared = bytes.clone();
    prepared[0] = 1;
    assert!(decode_txn(&prepared, 0).is_err());
    let mut bad_flag = bytes.clone();
    let flag_at = bytes.len() - 2;
    bad_flag[flag_at] = 2;
    assert!(decode_txn(&bad_flag, 0).is_err());
}

#[test]
fn a_committed_keyed_one_phase_transaction_keeps_its_key_against_a_coordinator_that_lost_its_log() {
    let (mut core, mut disk) = setup();
    let keyed = |incarnation, position| Stamp { idempotency_key: Some(id("k1")), ..stamp(incarnation, position, 1) };
    let legs = vec![debit(1, 10), credit(2, 10)];
    assert_eq!(one_phase(&mut core, &mut disk, "t1", legs.clone(), keyed(A, 5), 0), committed());
    // A refused one keeps none.
    let refused = core.commit_one_phase(id("t2"), id("c1"), vec![debit(1, 900)], keyed(A, 6), 0).unwrap().0;
    assert!(matches!(refused.outcome, OnePhaseOutcome::Refused(Refusal::InsufficientFunds, _)));
    assert_eq!(core.txn(&id("t2")).unwrap().idempotency_key, None);
    // The coordinator lost its log before its client heard: the retry of
    // the key reaches incarnation B, by one phase or by 2PC, after a restart
    // here too: refused, naming t1; the money moved once.
    let mut core = restart(&disk, 1);
    let (retry, effects) = core.commit_one_phase(id("t9"), id("c1"), legs.clone(), keyed(B, 1), 2).unwrap();
    assert_eq!(retry.outcome, OnePhaseOutcome::Refused(Refusal::KeyOfLostIncarnation, "t1".into()));
    disk.apply(&effects);
    let (vote, _) = core.prepare_stamped(id("t8"), id("c1"), vec![debit(1, 10)], keyed(B, 2), 3).unwrap();
    assert_eq!(vote, Vote::No(Refusal::KeyOfLostIncarnation, "t1".into()));
    assert_eq!(balances(&core), (90, 10));
    // Its record (and its key) go after the time retention, as a retired
    // incarnation's records do.
    let collected = core.collect_garbage(2 + config().finished_retention_ms + 1);
    assert!(collected.ops.contains(&Op::Delete(b"t/t1".to_vec())), "{collected:?}");
    let (fresh, _) = core.commit_one_phase(id("t7"), id("c1"), legs, keyed(B, 3), 10_000).unwrap();
    assert_eq!(fresh, committed(), "the key is free again");
    // Within one incarnation the key is the coordinator's to judge.
    let (again, _) =
        core.commit_one_phase(id("t6"), id("c1"), vec![debit(1, 1), credit(2, 1)], keyed(B, 4), 10_001).unwrap();
    assert_eq!(again, committed());
}
