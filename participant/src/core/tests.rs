//! Tests of the participant core: escrow, idempotence, tombstones, and what
//! survives a crash at each point (a crash is modelled by rebuilding the core
//! from the records that reached the disk).

use super::*;
use std::collections::BTreeMap;

/// The records a real store would hold: the ops applied in order.
#[derive(Default, Clone)]
struct Disk(BTreeMap<Vec<u8>, Vec<u8>>);

impl Disk {
    fn apply(&mut self, effects: &Effects) {
        for op in &effects.ops {
            match op {
                Op::Put(key, value) => {
                    self.0.insert(key.clone(), value.clone());
                }
                Op::Delete(key) => {
                    self.0.remove(key);
                }
            }
        }
    }
}

pub(crate) fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

/// Participant p1 of coordinator c1, finished records kept 1 s.
pub(crate) fn config() -> Config {
    Config {
        node_id: id("p1"),
        coordinators: [id("c1")].into_iter().collect(),
        in_doubt_after_ms: 500,
        finished_retention_ms: 1_000,
        owned_accounts: None,
    }
}

/// A core with accounts 1 (100) and 2 (0), already on disk.
fn setup() -> (Core, Disk) {
    let mut core = Core::new(config());
    let mut disk = Disk::default();
    disk.apply(&core.open_accounts(&[(1, 100), (2, 0)]).unwrap());
    (core, disk)
}

fn restart(disk: &Disk, now_ms: u64) -> Core {
    Core::recover(config(), disk.0.clone(), now_ms).unwrap()
}

fn debit(account: AccountId, amount: Amount) -> Leg {
    Leg { account, amount: -amount }
}

fn credit(account: AccountId, amount: Amount) -> Leg {
    Leg { account, amount }
}

#[test]
fn escrow_lets_concurrent_debits_proceed_while_the_available_balance_allows() {
    let (mut core, _) = setup();
    let (vote, effects) = core.prepare(id("t1"), id("c1"), vec![debit(1, 60)], 0).unwrap();
    assert_eq!(vote, Vote::Yes);
    assert_eq!(effects.durability, Durability::Fsync, "a YES vote waits for the fsync of its record");
    assert_eq!(core.prepare(id("t2"), id("c1"), vec![debit(1, 40)], 0).unwrap().0, Vote::Yes);
    let (vote, _) = core.prepare(id("t3"), id("c1"), vec![debit(1, 1)], 0).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::InsufficientFunds, _)), "{vote:?}");
    let account = core.account(1).unwrap();
    assert_eq!((account.posted, account.reserved, account.available()), (100, 100, 0));
    core.abort(&id("t2"), 1).unwrap();
    assert_eq!(core.account(1).unwrap().available(), 40);
}

#[test]
fn incoming_credits_are_not_spendable_before_commit() {
    let (mut core, _) = setup();
    assert_eq!(core.prepare(id("t1"), id("c1"), vec![credit(2, 50)], 0).unwrap().0, Vote::Yes);
    let (vote, _) = core.prepare(id("t2"), id("c1"), vec![debit(2, 10)], 0).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::InsufficientFunds, _)));
    assert_eq!(core.account(2).unwrap().incoming, 50);
    core.commit(&id("t1"), 1).unwrap();
    assert_eq!(core.prepare(id("t3"), id("c1"), vec![debit(2, 10)], 2).unwrap().0, Vote::Yes);
}

#[test]
fn commit_is_applied_exactly_once_whatever_the_number_of_deliveries() {
    let (mut core, _) = setup();
    core.prepare(id("t1"), id("c1"), vec![debit(1, 30), credit(2, 30)], 0).unwrap();
    let first = core.commit(&id("t1"), 1).unwrap();
    assert!(first.durability != Durability::Buffered && !first.ops.is_empty(), "a commit is acknowledged once durable");
    for _ in 0..3 {
        let again = core.commit(&id("t1"), 2).unwrap();
        assert!(again.ops.is_empty());
        assert_eq!(again.durability, Durability::Lazy, "a duplicate's ack also waits for the first write's fsync");
    }
    assert_eq!(core.account(1).unwrap(), Account { posted: 70, reserved: 0, incoming: 0, closed: false });
    assert_eq!(core.account(2).unwrap(), Account { posted: 30, reserved: 0, incoming: 0, closed: false });
    // A late duplicate prepare of a committed transaction reserves nothing.
    assert_eq!(core.prepare(id("t1"), id("c1"), vec![debit(1, 30), credit(2, 30)], 3).unwrap().0, Vote::Yes);
    assert_eq!(core.account(1).unwrap().reserved, 0);
}

#[test]
fn duplicate_prepare_votes_yes_again_without_reserving_twice() {
    let (mut core, _) = setup();
    core.prepare(id("t1"), id("c1"), vec![debit(1, 30)], 0).unwrap();
    let (vote, effects) = core.prepare(id("t1"), id("c1"), vec![debit(1, 30)], 1).unwrap();
    assert_eq!(vote, Vote::Yes);
    assert!(effects.ops.is_empty());
    assert_eq!(effects.durability, Durability::Lazy, "the duplicate YES waits until the first record is durable");
    assert_eq!(core.account(1).unwrap().reserved, 30);
    let (vote, _) = core.prepare(id("t1"), id("c1"), vec![debit(1, 31)], 1).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::ConflictingPrepare, _)));
}

#[test]
fn abort_before_prepare_leaves_a_tombstone_that_refuses_the_late_prepare() {
    let (mut core, _) = setup();
    let effects = core.abort(&id("t1"), 0).unwrap();
    assert_eq!(effects.ops.len(), 1, "the tombstone is written");
    let (vote, _) = core.prepare(id("t1"), id("c1"), vec![debit(1, 10)], 1).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::AlreadyAborted, _)));
    assert_eq!(core.account(1).unwrap().reserved, 0);
    // Duplicated aborts change nothing.
    assert!(core.abort(&id("t1"), 2).unwrap().ops.is_empty());
}

#[test]
fn a_no_vote_is_remembered_so_duplicates_of_the_prepare_stay_no() {
    let (mut core, _) = setup();
    let (vote, _) = core.prepare(id("t1"), id("c1"), vec![debit(1, 500)], 0).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::InsufficientFunds, _)));
    core.open_accounts(&[(3, 1_000)]).unwrap();
    let (vote, _) = core.prepare(id("t1"), id("c1"), vec![debit(1, 500)], 1).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::AlreadyAborted, _)));
}

#[test]
fn commit_and_abort_of_the_other_outcome_are_refused() {
    let (mut core, _) = setup();
    core.prepare(id("t1"), id("c1"), vec![debit(1, 10)], 0).unwrap();
    core.commit(&id("t1"), 1).unwrap();
    assert!(matches!(core.abort(&id("t1"), 2), Err(Error::InvalidInput(_))));
    core.abort(&id("t2"), 2).unwrap();
    assert!(matches!(core.commit(&id("t2"), 3), Err(Error::InvalidInput(_))));
    assert_eq!(core.account(1).unwrap().posted, 90);
}

#[test]
fn a_batched_prepare_judges_each_alone_and_shares_one_fsync() {
    let (mut core, mut disk) = setup();
    let (votes, effects) = core
        .prepare_batch(
            vec![
                Ok((id("t1"), id("c1"), vec![debit(1, 60), credit(2, 60)], Stamp::default())),
                Ok((id("t2"), id("c1"), vec![debit(1, 60), credit(2, 60)], Stamp::default())), // only 40 left available
                Ok((id("t3"), id("c1"), vec![], Stamp::default())),                            // malformed legs
                Err(Error::InvalidInput("a bad id".into())), // malformed before the core
                Ok((id("t1"), id("c1"), vec![debit(1, 60), credit(2, 60)], Stamp::default())), // duplicate
            ],
            0,
        )
        .unwrap();
    assert_eq!(votes.len(), 5);
    assert_eq!(votes[0], Ok(Vote::Yes));
    assert!(matches!(&votes[1], Ok(Vote::No(Refusal::InsufficientFunds, _))), "{:?}", votes[1]);
    assert!(matches!(&votes[2], Err(Error::InvalidInput(_))), "{:?}", votes[2]);
    assert_eq!(votes[3], Err(Error::InvalidInput("a bad id".into())));
    assert_eq!(votes[4], Ok(Vote::Yes), "a duplicate votes YES again");
    assert_eq!(effects.durability, Durability::Fsync, "no YES before its record is fsynced");
    assert_eq!(core.account(1).unwrap().reserved, 60, "reserved once");
    assert!(core.txn(&id("t3")).is_none(), "a malformed prepare changes nothing");
    disk.apply(&effects);
    let core = restart(&disk, 1);
    assert_eq!(core.txn(&id("t1")).unwrap().state, TxnState::Prepared);
    assert_eq!(core.account(1).unwrap().reserved, 60);
}

#[test]
fn a_batched_commit_applies_each_once_and_an_aborted_member_rejects_all_of_it() {
    let (mut core, mut disk) = setup();
    core.prepare(id("t1"), id("c1"), vec![debit(1, 10), credit(2, 10)], 0).unwrap();
    core.prepare(id("t2"), id("c1"), vec![debit(1, 5), credit(2, 5)], 0).unwrap();
    core.abort(&id("t3"), 0).unwrap();
    // t3 was aborted here: the batch is refused whole, t1 stays prepared.
    let (refused, effects) = core.commit_batch(&[id("t1"), id("t3")], 1);
    assert!(matches!(&refused, Err(Error::InvalidInput(message)) if message.contains("t3")), "{refused:?}");
    assert!(effects.ops.is_empty(), "nothing of the batch was applied");
    assert_eq!(core.txn(&id("t1")).unwrap().state, TxnState::Prepared);
    assert_eq!(core.account(1).unwrap(), Account { posted: 100, reserved: 15, incoming: 0, closed: false });
    // A batch with a duplicate and an unknown id (committed and forgotten).
    let (result, effects) = core.commit_batch(&[id("t1"), id("t2"), id("t1"), id("t9")], 2);
    assert_eq!(result, Ok(()));
    assert_eq!(effects.durability, Durability::Lazy, "acknowledged only once an fsync covers it");
    disk.apply(&effects);
    assert_eq!(core.account(1).unwrap(), Account { posted: 85, reserved: 0, incoming: 0, closed: false });
    assert_eq!(core.account(2).unwrap().posted, 15);
    let core = restart(&disk, 3);
    assert_eq!(core.account(1).unwrap().posted, 85, "one write held the whole batch");
    assert_eq!(core.prepared_count(), 0);
}

#[test]
fn an_account_outside_the_owned_range_is_refused_and_none_of_the_request_is_opened() {
    let mut config = config();
    config.owned_accounts = Some(100..200);
    let mut core = Core::new(config);
    let refused = core.open_accounts(&[(150, 10), (200, 10)]);
    assert!(
        matches!(&refused, Err(Error::InvalidInput(m)) if m.contains("200") && m.contains("100..200")),
        "{refused:?}"
    );
    assert!(core.account(150).is_err(), "all or none");
    core.open_accounts(&[(100, 10), (199, 10)]).unwrap();
}

#[test]
fn bad_input_is_an_error_and_changes_nothing() {
    let (mut core, _) = setup();
    assert!(matches!(core.prepare(id("t1"), id("c1"), vec![], 0), Err(Error::InvalidInput(_))));
    assert!(matches!(core.prepare(id("t1"), id("c1"), vec![credit(1, 0)], 0), Err(Error::InvalidInput(_))));
    assert!(matches!(
        core.prepare(id("t1"), id("c1"), vec![debit(1, 1), credit(1, 1)], 0),
        Err(Error::InvalidInput(_))
    ));
    assert!(core.txn(&id("t1")).is_none());
    let (vote, _) = core.prepare(id("t2"), id("c1"), vec![debit(99, 1)], 0).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::UnknownAccount, _)));
    let (vote, _) = core.prepare(id("t3"), id("c9"), vec![debit(1, 1)], 0).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::UnknownCoordinator, _)));
    core.open_accounts(&[(5, i64::MAX)]).unwrap();
    let (vote, _) = core.prepare(id("t4"), id("c1"), vec![credit(5, 1)], 0).unwrap();
    assert!(matches!(vote, Vote::No(Refusal::BalanceOverflow, _)));
    assert!(matches!(core.open_accounts(&[(1, 5)]), Err(Error::AlreadyExists(_))));
    assert!(matches!(core.open_accounts(&[(7, -5)]), Err(Error::InvalidInput(_))));
    assert!(matches!(core.open_accounts(&[(8, 5), (8, 5)]), Err(Error::InvalidInput(_))));
    assert!(core.account(8).is_err(), "a rejected open opens nothing");
    for id_ in [1, 2] {
        let account = core.account(id_).unwrap();
        assert_eq!((account.reserved, account.incoming), (0, 0));
    }
}

#[test]
fn crash_before_the_prepared_record_is_durable_forgets_the_prepare() {
    let (mut core, disk) = setup();
    // The vote was never sent: the record did not reach the disk.
    let _ = core.prepare(id("t1"), id("c1"), vec![debit(1, 10)], 0).unwrap();
    let core = restart(&disk, 10);
    assert!(core.txn(&id("t1")).is_none());
    assert_eq!(core.account(1).unwrap().available(), 100);
}

#[test]
fn crash_after_the_prepared_record_is_durable_keeps_the_reservation_and_asks() {
    let (mut core, mut disk) = setup();
    let (vote, effects) = core.prepare(id("t1"), id("c1"), vec![debit(1, 10), credit(2, 10)], 3).unwrap();
    assert_eq!(vote, Vote::Yes);
    disk.apply(&effects);
    // Crash before or after the vote left: the same state comes back.
    let mut core = restart(&disk, 10);
    assert_eq!(core.txn(&id("t1")).unwrap().state, TxnState::Prepared);
    assert_eq!(core.txn(&id("t1")).unwrap().prepared_at_ms, 3, "in doubt since the vote, not since the restart");
    assert_eq!(core.account(1).unwrap(), Account { posted: 100, reserved: 10, incoming: 0, closed: false });
    assert_eq!(core.account(2).unwrap(), Account { posted: 0, reserved: 0, incoming: 10, closed: false });
    // It asks at once after a restart, then backs off.
    assert_eq!(core.due_queries(10, 100), vec![(id("t1"), id("c1"))]);
    assert!(core.due_queries(10 + QUERY_BACKOFF_INITIAL_MS - 1, 100).is_empty());
    assert_eq!(core.due_queries(10 + QUERY_BACKOFF_INITIAL_MS, 100).len(), 1);
    assert!(core.due_queries(10 + 2 * QUERY_BACKOFF_INITIAL_MS, 100).is_empty(), "the backoff doubled");
    // It never decides alone: however long it waits, the reservation stays.
    assert!(core.collect_garbage(1_000_000).ops.is_empty());
    assert_eq!(core.account(1).unwrap().reserved, 10);
    // When the decision comes, the whole wait counts, the restart included.
    core.commit(&id("t1"), 1_000_003).unwrap();
    assert_eq!(core.longest_in_doubt_ms, 1_000_000);
}

#[test]
fn a_query_the_driver_cannot_send_stays_due_and_a_coordinator_that_answers_again_is_asked_at_once() {
    let (mut core, _) = setup();
    for txn in ["t1", "t2"] {
        assert_eq!(core.prepare(id(txn), id("c1"), vec![debit(1, 10)], 0).unwrap().0, Vote::Yes);
    }
    let due_at = config().in_doubt_after_ms;
    // t2's query cannot be sent now: it stays due, unlike t1's.
    assert_eq!(
        core.due_queries_where(due_at, 10, |txn, _| if txn == &id("t1") { Ask::Yes } else { Ask::NotThis }),
        vec![(id("t1"), id("c1"))]
    );
    assert_eq!(core.due_queries(due_at, 10), vec![(id("t2"), id("c1"))]);
    // Both asked a few times with no answer: their backoffs grew.
    let mut now = due_at;
    for _ in 0..5 {
        now += QUERY_BACKOFF_MAX_MS;
        assert_eq!(core.due_queries(now, 10).len(), 2);
    }
    assert!(core.due_queries(now + QUERY_BACKOFF_INITIAL_MS, 10).is_empty());
    // The coordinator answers again: both are due at once, backoffs reset.
    assert_eq!(core.query_again_now(&id("c1"), now + 1), 2);
    assert_eq!(core.query_again_now(&id("c2"), now + 1), 0, "no transaction of c2's");
    assert_eq!(core.due_queries(now + 1, 10).len(), 2);
    assert_eq!(core.due_queries(now + 1 + QUERY_BACKOFF_INITIAL_MS, 10).len(), 2, "back to the first backoff");
}

#[test]
fn crash_after_applying_a_commit_before_acknowledging_applies_it_once() {
    let (mut core, mut disk) = setup();
    let (_, effects) = core.prepare(id("t1"), id("c1"), vec![debit(1, 10), credit(2, 10)], 0).unwrap();
    disk.apply(&effects);
    let effects = core.commit(&id("t1"), 1).unwrap();
    disk.apply(&effects);
    // The acknowledgement was lost; the coordinator redelivers after the restart.
    let mut core = restart(&disk, 10);
    assert!(core.commit(&id("t1"), 11).unwrap().ops.is_empty());
    assert_eq!(core.account(1).unwrap(), Account { posted: 90, reserved: 0, incoming: 0, closed: false });
    assert_eq!(core.account(2).unwrap(), Account { posted: 10, reserved: 0, incoming: 0, closed: false });
    assert!(core.due_queries(1_000_000, 100).is_empty());
}

#[test]
fn a_lost_abort_record_comes_back_prepared_and_is_resolved_by_asking() {
    let (mut core, mut disk) = setup();
    let (_, effects) = core.prepare(id("t1"), id("c1"), vec![debit(1, 10)], 0).unwrap();
    disk.apply(&effects);
    let abort = core.abort(&id("t1"), 1).unwrap();
    assert_eq!(abort.durability, Durability::Buffered, "an abort need not be fsynced");
    let mut core = restart(&disk, 10);
    assert_eq!(core.due_queries(10, 10).len(), 1);
    core.abort(&id("t1"), 11).unwrap();
    assert_eq!(core.account(1).unwrap().available(), 100);
}

#[test]
fn finished_records_are_collected_after_the_retention() {
    let (mut core, mut disk) = setup();
    let (_, effects) = core.prepare(id("t1"), id("c1"), vec![debit(1, 10)], 0).unwrap();
    disk.apply(&effects);
    disk.apply(&core.commit(&id("t1"), 100).unwrap());
    assert!(core.collect_garbage(500).ops.is_empty());
    let effects = core.collect_garbage(1_100);
    assert_eq!(effects.ops, vec![Op::Delete(b"t/t1".to_vec())]);
    disk.apply(&effects);
    assert!(core.txn(&id("t1")).is_none());
    let core = restart(&disk, 2_000);
    assert_eq!(core.account(1).unwrap().posted, 90);
}

#[test]
fn recovery_refuses_a_corrupt_store_with_an_error_naming_the_record_not_a_panic() {
    let (mut core, mut disk) = setup();
    let (_, effects) = core.prepare(id("t1"), id("c1"), vec![debit(1, 10), credit(2, 10)], 0).unwrap();
    disk.apply(&effects);
    assert!(Core::recover(config(), disk.0.clone(), 1).is_ok());
    let record = disk.0[b"t/t1".as_slice()].clone();
    let mut cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        // Cut inside a field (a cut at a field's end reads as an older record).
        ("t/t1", b"t/t1".to_vec(), record[..record.len() - 3].to_vec()),
        ("t/t1", b"t/t1".to_vec(), [record.clone(), vec![0]].concat()),
        ("t/t1", b"t/t1".to_vec(), vec![9]),
        ("t/bad key", b"t/bad key".to_vec(), record.clone()),
        ("a/", b"a/\x01".to_vec(), 5i64.to_le_bytes().to_vec()),
        ("a/", account_key(1), vec![1, 2, 3]),
        ("a/", account_key(1), [5i64.to_le_bytes().to_vec(), vec![7]].concat()),
        ("b/", b"b/".to_vec(), vec![1, 0]),
        ("m/suspense", b"m/suspense".to_vec(), (-1i64).to_le_bytes().to_vec()),
        ("o/", b"o/1".to_vec(), vec![]),
        ("z/what", b"z/what".to_vec(), vec![]),
    ];
    // A prepared transaction whose legs would overflow the reservations.
    let mut overflow = record.clone();
    // The legs, then the prepare time, incarnation, position and heuristic flag.
    let legs_at = record.len() - (8 + 8 + 8 + 1) - 2 * 16;
    overflow[legs_at + 8..legs_at + 16].copy_from_slice(&(-i64::MAX).to_le_bytes());
    cases.push(("", b"t/t1".to_vec(), overflow));
    for (named, key, value) in cases {
        let mut corrupt = disk.0.clone();
        corrupt.insert(key.clone(), value);
        let refused = Core::recover(config(), corrupt, 1).err();
        assert!(
            matches!(&refused, Some(Error::Fatal(m)) if m.contains(named)),
            "{}: {refused:?}",
            String::from_utf8_lossy(&key)
        );
    }
    // A prepared transaction naming an account that has no record.
    let mut missing = disk.0.clone();
    missing.remove(&account_key(2));
    assert!(matches!(Core::recover(config(), missing, 1), Err(Error::Fatal(m)) if m.contains("account 2")));
}

#[test]
fn batches_out_of_bounds_are_errors_not_panics() {
    let (mut core, _) = setup();
    let many = (0..=PREPARE_BATCH_MAX)
        .map(|i| Ok((id(&format!("t{i}")), id("c1"), vec![debit(1, 1)], Stamp::default())))
        .collect();
    assert!(matches!(core.prepare_batch(many, 0), Err(Error::InvalidInput(_))));
    assert!(matches!(core.prepare_batch(vec![], 0), Err(Error::InvalidInput(_))));
    let ids: Vec<TxnId> = (0..=COMMIT_BATCH_MAX).map(|i| id(&format!("t{i}"))).collect();
    assert!(matches!(core.commit_batch(&ids, 0).0, Err(Error::InvalidInput(_))));
    assert_eq!(core.account(1).unwrap().reserved, 0);
}

#[test]
fn huge_timing_settings_saturate_instead_of_overflowing() {
    let mut config = config();
    config.in_doubt_after_ms = u64::MAX;
    config.finished_retention_ms = u64::MAX;
    let mut core = Core::new(config);
    core.open_accounts(&[(1, 100)]).unwrap();
    core.prepare(id("t1"), id("c1"), vec![debit(1, 10)], 5).unwrap();
    assert!(core.due_queries(u64::MAX - 1, 10).is_empty());
    core.abort(&id("t2"), 6).unwrap();
    assert!(core.collect_garbage(u64::MAX - 1).ops.is_empty(), "not past a retention that saturated");
}

#[cfg(test)]
mod one_phase;
mod watermarks_and_heuristics;

#[test]
fn commits_riding_on_prepares_are_applied_first_in_the_same_write_and_answered_apart() {
    let (mut core, mut disk) = setup();
    disk.apply(&core.prepare(id("t1"), id("c1"), vec![credit(2, 50)], 0).unwrap().1);
    let stamped = |txn: &str, legs: Vec<Leg>| Ok((id(txn), id("c1"), legs, Stamp::default()));
    let c1 = id("c1");
    // The credit committed first is spendable by the prepare after it.
    let t1 = [id("t1")];
    let ((committed, votes), effects) = core
        .commit_then_prepare_batch(Some((&t1, Some(&c1), Stamp::default())), vec![stamped("t2", vec![debit(2, 50)])], 1)
        .unwrap();
    assert_eq!((committed, votes), (Ok(()), vec![Ok(Vote::Yes)]));
    assert_eq!(effects.durability, Durability::Fsync, "the YES waits for the fsync, and the commit with it");
    disk.apply(&effects);
    let recovered = restart(&disk, 2);
    assert_eq!(
        recovered.account(2).unwrap(),
        Account { posted: 50, reserved: 50, incoming: 0, closed: false },
        "one write holds both: the commit and the prepare that spends it"
    );

    // A refused commit refuses no prepare, and is not applied.
    core.abort(&id("t2"), 3).unwrap();
    let t2 = [id("t2")];
    let ((committed, votes), _) = core
        .commit_then_prepare_batch(Some((&t2, Some(&c1), Stamp::default())), vec![stamped("t3", vec![debit(1, 10)])], 4)
        .unwrap();
    assert!(matches!(committed, Err(Error::InvalidInput(_))), "{committed:?}");
    assert_eq!(votes, vec![Ok(Vote::Yes)]);
    assert_eq!(core.account(2).unwrap(), Account { posted: 50, reserved: 0, incoming: 0, closed: false });

    // Prepares out of bounds refuse the whole call before any commit.
    core.prepare(id("t4"), id("c1"), vec![credit(2, 5)], 5).unwrap();
    let t4 = [id("t4")];
    let error = core.commit_then_prepare_batch(Some((&t4, Some(&c1), Stamp::default())), Vec::new(), 6).unwrap_err();
    assert!(matches!(error, Error::InvalidInput(_)), "{error:?}");
    assert_eq!(core.account(2).unwrap().incoming, 5, "t4 is still prepared, not committed");
}
