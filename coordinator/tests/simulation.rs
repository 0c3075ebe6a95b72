//! Both protocol cores, coordinator and participants, wired together in one
//! deterministic simulation: no sockets, no sleeps, no disks. Messages are
//! steps in a queue; a crash drops a node's volatile state and rebuilds it
//! from what reached its "disk"; lost messages become the failures the real
//! driver would see (a prepare that fails is a NO vote; a commit that fails
//! is redelivered). A participant's disk keeps its unsynced writes apart: a
//! process crash keeps them (the OS has them), a power loss drops them, so
//! the records the protocol writes without an fsync (NO votes, tombstones,
//! aborts) are shown to be safe to lose.
//!
//! Two kinds of test:
//! - every crash point of one transfer: for each step of the failure-free
//!   run and each node, crash that node just before that step, restart it,
//!   heal, and check the invariants;
//! - many seeded runs of concurrent transfers with reordering, duplication,
//!   loss and crashes at random. A failing seed is printed with the command
//!   that reruns it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use tandem::domain::{AccountId, Amount, Id, Leg, TxnId};
use tandem::rng::SplitMix64 as Rng;
use tandem::store::{Durability, Op};
use tandem_coordinator::core::{AbortReason, Action, CommitRecord, Core as Coordinator, Decision, Outcome, VoteResult};
use tandem_participant::core::{Config, Core as Participant, Effects, TxnState, Vote};

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

#[derive(Debug, Clone)]
enum Request {
    Prepare(Vec<Leg>),
    Commit,
    Abort,
}

#[derive(Debug, Clone)]
enum Step {
    /// A coordinator action waiting to be carried out.
    Act(Action),
    /// A request on its way to a participant.
    Deliver {
        participant: Id,
        txn: TxnId,
        request: Request,
    },
    /// A participant's answer on its way to the coordinator.
    Vote {
        participant: Id,
        txn: TxnId,
        vote: VoteResult,
    },
    CommitAck {
        participant: Id,
        txn: TxnId,
    },
}

impl Step {
    /// The node whose crash loses this step, and what the loss turns into.
    fn node(&self) -> Option<&Id> {
        match self {
            Step::Act(_) => None,
            Step::Deliver { participant, .. }
            | Step::Vote { participant, .. }
            | Step::CommitAck { participant, .. } => Some(participant),
        }
    }
}

struct ParticipantNode {
    core: Participant,
    /// What an fsync made durable.
    disk: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Written but not fsynced yet (in the OS's cache): survives a process
    /// crash, lost in a power loss.
    unsynced: Vec<Op>,
}

impl ParticipantNode {
    /// Carries out a core's effects as the store does: a buffered write
    /// waits in the cache; a synced one (or a lazy one, which the real node
    /// answers only once an fsync covers it) makes everything before it
    /// durable too.
    fn write(&mut self, effects: &Effects) {
        self.unsynced.extend(effects.ops.iter().cloned());
        if effects.durability != Durability::Buffered {
            self.sync();
        }
    }

    /// What a restarted process would read: the disk and the cache.
    fn image(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut image = self.disk.clone();
        apply_ops(&mut image, self.unsynced.iter().cloned());
        image
    }

    fn sync(&mut self) {
        apply_ops(&mut self.disk, self.unsynced.drain(..));
    }
}

fn apply_ops(records: &mut BTreeMap<Vec<u8>, Vec<u8>>, ops: impl IntoIterator<Item = Op>) {
    for op in ops {
        match op {
            Op::Put(key, value) => {
                records.insert(key, value);
            }
            Op::Delete(key) => {
                records.remove(&key);
            }
        }
    }
}

fn participant_config(name: &str) -> Config {
    Config {
        node_id: id(name),
        coordinators: [id("c1")].into_iter().collect(),
        in_doubt_after_ms: 0,
        finished_retention_ms: u64::MAX / 4,
        owned_accounts: None,
    }
}

struct World {
    coordinator: Coordinator,
    /// The coordinator's durable log: commit decisions not yet ended, and
    /// ended commits.
    decisions: BTreeMap<TxnId, CommitRecord>,
    ended: BTreeSet<TxnId>,
    participants: BTreeMap<Id, ParticipantNode>,
    /// Which participant owns which account.
    owners: BTreeMap<AccountId, Id>,
    steps: VecDeque<Step>,
    replies: BTreeMap<TxnId, Outcome>,
    transactions: BTreeMap<TxnId, Vec<Leg>>,
    initial_total: Amount,
    now_ms: u64,
    log: Vec<String>,
    /// Unsynced participant writes lost in power losses.
    writes_lost: usize,
}

impl World {
    /// `participants` nodes, each with `accounts_each` accounts of `balance`.
    fn new(participants: usize, accounts_each: u64, balance: Amount) -> World {
        let mut world = World {
            coordinator: Coordinator::new(10_000),
            decisions: BTreeMap::new(),
            ended: BTreeSet::new(),
            participants: BTreeMap::new(),
            owners: BTreeMap::new(),
            steps: VecDeque::new(),
            replies: BTreeMap::new(),
            transactions: BTreeMap::new(),
            initial_total: 0,
            now_ms: 0,
            log: Vec::new(),
            writes_lost: 0,
        };
        for p in 0..participants {
            let name = format!("p{}", p + 1);
            let mut node = ParticipantNode {
                core: Participant::new(participant_config(&name)),
                disk: BTreeMap::new(),
                unsynced: Vec::new(),
            };
            let accounts: Vec<(AccountId, Amount)> =
                (0..accounts_each).map(|a| (p as u64 * 1_000 + a, balance)).collect();
            let effects = node.core.open_accounts(&accounts).unwrap();
            node.write(&effects);
            for (account, _) in &accounts {
                world.owners.insert(*account, id(&name));
            }
            world.initial_total += balance * accounts_each as i64;
            world.participants.insert(id(&name), node);
        }
        world
    }

    fn begin(&mut self, txn: &str, legs: Vec<Leg>) {
        let mut by_participant: BTreeMap<Id, Vec<Leg>> = BTreeMap::new();
        for leg in &legs {
            by_participant.entry(self.owners[&leg.account].clone()).or_default().push(*leg);
        }
        self.transactions.insert(id(txn), legs);
        // Positions go up with every transaction begun, as the driver's do.
        let position = self.transactions.len() as u64;
        let actions = self.coordinator.begin(id(txn), position, by_participant, None).unwrap();
        self.steps.extend(actions.into_iter().map(Step::Act));
    }

    /// Carries out one step.
    fn run_step(&mut self, step: Step) {
        self.now_ms += 1;
        self.log.push(format!("{step:?}"));
        match step {
            Step::Act(action) => self.act(action),
            Step::Deliver { participant, txn, request } => {
                let now = self.now_ms;
                let node = self.participants.get_mut(&participant).unwrap();
                match request {
                    Request::Prepare(legs) => {
                        let (vote, effects) = node.core.prepare(txn.clone(), id("c1"), legs, now).unwrap();
                        node.write(&effects);
                        let vote = match vote {
                            Vote::Yes => VoteResult::Yes,
                            Vote::No(_, reason) => VoteResult::No(AbortReason::Refused, reason),
                        };
                        self.steps.push_back(Step::Vote { participant, txn, vote });
                    }
                    Request::Commit => {
                        let effects = node.core.commit(&txn, now).unwrap();
                        node.write(&effects);
                        self.steps.push_back(Step::CommitAck { participant, txn });
                    }
                    Request::Abort => {
                        let effects = node.core.abort(&txn, now).unwrap();
                        node.write(&effects);
                    }
                }
            }
            Step::Vote { participant, txn, vote } => {
                let actions = self.coordinator.on_vote(&txn, &participant, vote);
                self.steps.extend(actions.into_iter().map(Step::Act));
            }
            Step::CommitAck { participant, txn } => {
                let actions = self.coordinator.on_commit_acked(&txn, &participant);
                self.steps.extend(actions.into_iter().map(Step::Act));
            }
        }
    }

    fn act(&mut self, action: Action) {
        match action {
            Action::SendPrepare { txn, participant, legs, .. } => {
                self.steps.push_back(Step::Deliver { participant, txn, request: Request::Prepare(legs) })
            }
            Action::PersistCommit { txn, record } => {
                self.decisions.insert(txn.clone(), record);
                let actions = self.coordinator.on_commit_durable(&txn);
                self.steps.extend(actions.into_iter().map(Step::Act));
            }
            Action::SendCommit { txn, participant } => {
                self.steps.push_back(Step::Deliver { participant, txn, request: Request::Commit })
            }
            Action::SendAbort { txn, participant, .. } => {
                self.steps.push_back(Step::Deliver { participant, txn, request: Request::Abort })
            }
            Action::PersistAbort { txn, outcome, .. } => {
                let actions = self.coordinator.on_abort_durable(&txn, outcome);
                self.steps.extend(actions.into_iter().map(Step::Act));
            }
            Action::Reply { txn, outcome } => {
                assert!(self.replies.insert(txn.clone(), outcome).is_none(), "{txn} answered twice");
            }
            Action::PersistEnd { txn, .. } => {
                assert!(self.decisions.remove(&txn).is_some(), "{txn} ended without a decision");
                self.ended.insert(txn.clone());
                self.coordinator.on_end_durable(&txn);
            }
        }
    }

    /// What the real driver sees when a step is lost with its node: a lost
    /// prepare or vote is a failed prepare (NO); a lost commit or its ack is
    /// redelivered; a lost abort is only lost.
    fn lose(&mut self, step: Step) {
        self.log.push(format!("lost {step:?}"));
        match step {
            Step::Deliver { participant, txn, request: Request::Prepare(_) } | Step::Vote { participant, txn, .. } => {
                let vote = VoteResult::No(AbortReason::ParticipantUnavailable, "lost".into());
                self.steps.push_back(Step::Vote { participant, txn, vote });
            }
            Step::Deliver { participant, txn, request: Request::Commit } | Step::CommitAck { participant, txn } => {
                self.steps.push_back(Step::Act(Action::SendCommit { txn, participant }));
            }
            Step::Deliver { request: Request::Abort, .. } => {}
            Step::Act(_) => unreachable!("coordinator actions are not lost in transit"),
        }
    }

    /// The participant's process dies (SIGKILL): what it wrote survives in
    /// the OS's cache, even unsynced.
    fn crash_participant(&mut self, name: &Id) {
        self.participants.get_mut(name).unwrap().sync();
        self.restart_participant(name, "crash");
    }

    /// The participant's machine loses power: its unsynced writes are gone.
    fn power_loss(&mut self, name: &Id) {
        let node = self.participants.get_mut(name).unwrap();
        self.writes_lost += node.unsynced.len();
        node.unsynced.clear();
        self.restart_participant(name, "power loss");
    }

    fn restart_participant(&mut self, name: &Id, how: &str) {
        self.log.push(format!("{how} {name}"));
        let (mine, others): (Vec<Step>, Vec<Step>) = self.steps.drain(..).partition(|step| step.node() == Some(name));
        self.steps = others.into();
        for step in mine {
            self.lose(step);
        }
        let node = self.participants.get_mut(name).unwrap();
        node.core = Participant::recover(participant_config(name.as_str()), node.disk.clone(), self.now_ms)
            .expect("the disk holds only records the core wrote");
    }

    fn crash_coordinator(&mut self) {
        self.log.push("crash c1".into());
        // Its pending actions and the answers on their way to it are gone;
        // requests already on the wire to participants still arrive.
        self.steps.retain(|step| matches!(step, Step::Deliver { .. }));
        self.coordinator = Coordinator::new(10_000);
        let logged: Vec<_> = self.decisions.iter().map(|(t, r)| (t.clone(), r.clone())).collect();
        let actions = self.coordinator.recover(logged).expect("the log holds only records the core wrote");
        self.steps.extend(actions.into_iter().map(Step::Act));
    }

    /// The decision a participant hears when it asks, as `Node::decision`
    /// gives it: an ended transaction is answered ABORT (every participant
    /// acknowledged its commit durably, so none can be in doubt about it;
    /// the chaos runs check that claim).
    fn decision(&self, txn: &TxnId) -> Decision {
        match self.coordinator.query(txn) {
            Some(decision) => decision,
            None if self.decisions.contains_key(txn) => Decision::Commit,
            None => Decision::Abort,
        }
    }

    /// Runs every step, then lets participants resolve what is in doubt by
    /// asking, until nothing moves.
    fn heal(&mut self) {
        for _round in 0..100 {
            while let Some(step) = self.steps.pop_front() {
                self.run_step(step);
            }
            self.now_ms += 1_000_000;
            let mut asked = false;
            let names: Vec<Id> = self.participants.keys().cloned().collect();
            for name in names {
                let now = self.now_ms;
                let due = self.participants.get_mut(&name).unwrap().core.due_queries(now, usize::MAX);
                for (txn, _) in due {
                    asked = true;
                    let decision = self.decision(&txn);
                    let now = self.now_ms;
                    let node = self.participants.get_mut(&name).unwrap();
                    let effects = match decision {
                        Decision::Commit => node.core.commit(&txn, now).unwrap(),
                        Decision::Abort => node.core.abort(&txn, now).unwrap(),
                        Decision::Pending | Decision::UnknownIncarnation => continue,
                    };
                    node.write(&effects);
                }
            }
            if !asked && self.steps.is_empty() {
                return;
            }
        }
        panic!("the world did not settle:\n{}", self.log.join("\n"));
    }

    /// Money conserved, nothing reserved, no negative balance, every
    /// transaction all or nothing, every COMMITTED reply applied, every
    /// ABORTED one not.
    fn check_invariants(&self) {
        let context = || self.log.join("\n");
        let mut total = 0;
        for (name, node) in &self.participants {
            for (account, balance) in node.core.accounts() {
                assert_eq!(
                    (balance.reserved, balance.incoming),
                    (0, 0),
                    "{name}/{account} holds a reservation\n{}",
                    context()
                );
                assert!(balance.posted >= 0, "{name}/{account} is negative\n{}", context());
                total += balance.posted;
            }
            assert_eq!(node.core.prepared_count(), 0, "{name} is still in doubt\n{}", context());
            // What survives a restart is the same as what is in memory.
            let reloaded = Participant::recover(participant_config(name.as_str()), node.image(), 0)
                .expect("the disk holds only records the core wrote");
            assert_eq!(reloaded.accounts(), node.core.accounts(), "{name}: memory and disk differ\n{}", context());
        }
        assert_eq!(total, self.initial_total, "money was created or destroyed\n{}", context());
        for (txn, legs) in &self.transactions {
            let owners: BTreeSet<&Id> = legs.iter().map(|leg| &self.owners[&leg.account]).collect();
            let committed_at: Vec<bool> = owners
                .iter()
                .map(|p| matches!(self.participants[*p].core.txn(txn), Some(t) if t.state == TxnState::Committed))
                .collect();
            let all = committed_at.iter().all(|c| *c);
            let none = committed_at.iter().all(|c| !*c);
            assert!(all || none, "{txn} is half committed: {committed_at:?}\n{}", context());
            match self.replies.get(txn) {
                Some(Outcome::Committed) => assert!(all, "{txn} was answered COMMITTED but not applied\n{}", context()),
                Some(Outcome::Aborted(..)) => assert!(none, "{txn} was answered ABORTED but applied\n{}", context()),
                Some(other) => panic!("2PC answered a saga outcome: {other:?}"),
                None => {}
            }
            assert!(self.decisions.is_empty(), "decisions left without an end record\n{}", context());
        }
    }
}

fn transfer(from: AccountId, to: AccountId, amount: Amount) -> Vec<Leg> {
    vec![Leg { account: from, amount: -amount }, Leg { account: to, amount }]
}

/// The steps of one failure-free two-participant transfer.
fn failure_free_step_count() -> usize {
    let mut world = World::new(2, 1, 100);
    world.begin("t1", transfer(0, 1_000, 30));
    let mut count = 0;
    while let Some(step) = world.steps.pop_front() {
        world.run_step(step);
        count += 1;
    }
    world.check_invariants();
    assert_eq!(world.replies.get(&id("t1")), Some(&Outcome::Committed));
    count
}

#[test]
fn every_crash_point_of_one_transfer_heals_to_all_or_nothing() {
    let steps = failure_free_step_count();
    assert!(steps >= 9, "prepare x2, votes x2, persist, commit x2, acks x2, end...: got {steps}");
    let mut outcomes = BTreeMap::new();
    for crash_before in 0..=steps {
        for victim in ["c1", "p1", "p2"] {
            let mut world = World::new(2, 1, 100);
            world.begin("t1", transfer(0, 1_000, 30));
            for _ in 0..crash_before {
                let Some(step) = world.steps.pop_front() else {
                    break;
                };
                world.run_step(step);
            }
            if victim == "c1" {
                world.crash_coordinator();
            } else {
                world.crash_participant(&id(victim));
            }
            world.heal();
            world.check_invariants();
            let committed = world.participants[&id("p1")].core.account(0).unwrap().posted == 70;
            outcomes.insert((crash_before, victim), committed);
        }
    }
    // Sanity of the enumeration itself: early crashes abort, late ones commit.
    // After both SendPrepare actions (steps 0 and 1), the prepares are on the
    // wire: a participant that crashes then loses its prepare, which aborts.
    assert!(!outcomes[&(2, "p1")], "a participant that crashed with its prepare in flight aborts the transfer");
    assert!(outcomes[&(0, "p1")], "a participant that restarted before its prepare was sent still commits");
    assert_eq!(outcomes[&(steps, "c1")], true, "a crash after the end record keeps the commit");
    assert!(outcomes.values().any(|c| *c) && outcomes.values().any(|c| !*c));
}

#[test]
fn coordinator_crash_before_the_decision_is_durable_aborts_by_presumption() {
    let mut world = World::new(2, 1, 100);
    world.begin("t1", transfer(0, 1_000, 30));
    // Run until the decision is about to be written.
    while !matches!(world.steps.front(), Some(Step::Act(Action::PersistCommit { .. }))) {
        let step = world.steps.pop_front().unwrap();
        world.run_step(step);
    }
    assert_eq!(world.participants[&id("p1")].core.prepared_count(), 1, "p1 is prepared and in doubt");
    world.crash_coordinator();
    assert_eq!(world.decision(&id("t1")), Decision::Abort);
    world.heal();
    world.check_invariants();
    assert_eq!(world.participants[&id("p1")].core.account(0).unwrap().posted, 100);
    assert!(world.replies.is_empty(), "the client heard nothing");
}

#[test]
fn coordinator_crash_after_the_decision_is_durable_before_any_commit_is_sent_finishes_it() {
    let mut world = World::new(2, 1, 100);
    world.begin("t1", transfer(0, 1_000, 30));
    // Run until the decision is durable and the first COMMIT is about to go.
    while !matches!(world.steps.front(), Some(Step::Act(Action::SendCommit { .. }))) {
        let step = world.steps.pop_front().unwrap();
        world.run_step(step);
    }
    assert!(!world.steps.iter().any(|s| matches!(s, Step::Deliver { request: Request::Commit, .. })));
    world.crash_coordinator();
    assert_eq!(world.decision(&id("t1")), Decision::Commit, "the logged decision survives");
    world.heal();
    world.check_invariants();
    assert_eq!(world.participants[&id("p1")].core.account(0).unwrap().posted, 70);
    assert_eq!(world.participants[&id("p2")].core.account(1_000).unwrap().posted, 130);
}

#[test]
fn coordinator_crash_after_every_acknowledgement_before_the_end_record_redelivers_harmlessly() {
    let mut world = World::new(2, 1, 100);
    world.begin("t1", transfer(0, 1_000, 30));
    while !matches!(world.steps.front(), Some(Step::Act(Action::PersistEnd { .. }))) {
        let step = world.steps.pop_front().unwrap();
        world.run_step(step);
    }
    assert_eq!(world.participants[&id("p2")].core.account(1_000).unwrap().posted, 130, "both applied");
    world.crash_coordinator();
    // The decision record is still there: the restarted coordinator sends
    // COMMIT again, and each participant acknowledges without applying twice.
    assert_eq!(world.decision(&id("t1")), Decision::Commit);
    world.heal();
    world.check_invariants();
    assert!(world.ended.contains(&id("t1")), "the end record is written after the redelivery");
    assert_eq!(world.participants[&id("p1")].core.account(0).unwrap().posted, 70);
    assert_eq!(world.participants[&id("p2")].core.account(1_000).unwrap().posted, 130);
}

#[test]
fn coordinator_crash_in_the_middle_of_the_fan_out_finishes_the_commit() {
    let mut world = World::new(2, 1, 100);
    world.begin("t1", transfer(0, 1_000, 30));
    // Run until the first commit has been applied by a participant.
    loop {
        let step = world.steps.pop_front().unwrap();
        let was_commit = matches!(step, Step::Deliver { request: Request::Commit, .. });
        world.run_step(step);
        if was_commit {
            break;
        }
    }
    assert_eq!(world.replies.get(&id("t1")), Some(&Outcome::Committed));
    world.crash_coordinator();
    assert_eq!(world.decision(&id("t1")), Decision::Commit);
    world.heal();
    world.check_invariants();
    assert_eq!(world.participants[&id("p2")].core.account(1_000).unwrap().posted, 130);
}

#[test]
fn duplicated_late_and_reordered_messages_change_nothing() {
    let mut world = World::new(2, 1, 100);
    world.begin("t1", transfer(0, 1_000, 30));
    let mut delivered = Vec::new();
    while let Some(step) = world.steps.pop_front() {
        if let Step::Deliver { .. } = &step {
            delivered.push(step.clone());
        }
        world.run_step(step);
    }
    // Every request again, in reverse order, long after the end.
    for step in delivered.into_iter().rev() {
        if let Step::Deliver { participant, txn, request } = step {
            let now = world.now_ms;
            let node = world.participants.get_mut(&participant).unwrap();
            let effects = match request {
                Request::Prepare(legs) => {
                    let (vote, effects) = node.core.prepare(txn, id("c1"), legs, now).unwrap();
                    assert_eq!(vote, Vote::Yes, "a late duplicate prepare of a committed transaction");
                    effects
                }
                Request::Commit => node.core.commit(&txn, now).unwrap(),
                Request::Abort => unreachable!(),
            };
            assert!(effects.ops.is_empty(), "a duplicate wrote something");
        }
    }
    world.check_invariants();
    assert_eq!(world.participants[&id("p1")].core.account(0).unwrap().posted, 70);
}

#[test]
fn an_abort_that_overtakes_its_prepare_wins() {
    let mut world = World::new(2, 1, 100);
    // p2 has no account 1_005: it votes NO; the abort to p1 overtakes p1's prepare.
    world.begin("t1", transfer(0, 1_000, 30));
    let prepare_p1 = world
        .steps
        .iter()
        .position(|s| matches!(s, Step::Act(Action::SendPrepare { participant, .. }) if participant.as_str() == "p1"))
        .unwrap();
    let held = world.steps.remove(prepare_p1).unwrap();
    world.steps.push_front(Step::Vote {
        participant: id("p2"),
        txn: id("t1"),
        vote: VoteResult::No(AbortReason::Refused, "no".into()),
    });
    // Drop p2's real prepare so the NO above is its only vote.
    world
        .steps
        .retain(|s| !matches!(s, Step::Act(Action::SendPrepare { participant, .. }) if participant.as_str() == "p2"));
    while let Some(step) = world.steps.pop_front() {
        world.run_step(step);
    }
    assert!(matches!(world.replies.get(&id("t1")), Some(Outcome::Aborted(..))));
    // The late prepare arrives after the abort's tombstone.
    world.run_step(held);
    while let Some(step) = world.steps.pop_front() {
        world.run_step(step);
    }
    assert_eq!(world.participants[&id("p1")].core.account(0).unwrap().reserved, 0);
    world.heal();
    world.check_invariants();
}

/// One seeded run: concurrent transfers, random order, duplicates, losses
/// and crashes.
fn chaos(seed: u64) -> (usize, usize, usize, usize) {
    let mut rng = Rng::new(seed);
    let mut world = World::new(3, 4, 50);
    let accounts: Vec<AccountId> = world.owners.keys().copied().collect();
    let mut started = 0;
    let transactions = 40;
    let mut steps_run = 0;
    let mut crashes = 0;
    while (started < transactions || !world.steps.is_empty()) && steps_run < 20_000 {
        steps_run += 1;
        if started < transactions && rng.chance(20) {
            let from = accounts[rng.below(accounts.len() as u64) as usize];
            let mut to = accounts[rng.below(accounts.len() as u64) as usize];
            if to == from {
                to = accounts[(accounts.iter().position(|a| *a == from).unwrap() + 1) % accounts.len()];
            }
            world.begin(&format!("t{started}"), transfer(from, to, 1 + rng.below(40) as i64));
            started += 1;
            continue;
        }
        if world.steps.is_empty() {
            continue;
        }
        let roll = rng.below(100);
        if roll < 2 {
            crashes += 1;
            world.crash_coordinator();
        } else if roll < 5 {
            crashes += 1;
            let victim = id(&format!("p{}", 1 + rng.below(3)));
            if rng.chance(50) {
                world.power_loss(&victim);
            } else {
                world.crash_participant(&victim);
            }
        } else {
            // Reordering: take any step, not only the oldest.
            let at = rng.below(world.steps.len() as u64) as usize;
            let step = world.steps.remove(at).unwrap();
            if matches!(step, Step::Deliver { .. }) && rng.chance(5) {
                world.steps.push_back(step.clone()); // duplicated in the network
            }
            if step.node().is_some() && rng.chance(3) {
                world.lose(step);
            } else {
                world.run_step(step);
            }
        }
    }
    world.heal();
    world.check_invariants();
    let committed = world.replies.values().filter(|o| **o == Outcome::Committed).count();
    let applied = world
        .transactions
        .keys()
        .filter(|t| {
            world.participants.values().any(|p| matches!(p.core.txn(t), Some(x) if x.state == TxnState::Committed))
        })
        .count();
    (committed, applied, crashes, world.writes_lost)
}

#[test]
fn seeded_chaos_keeps_every_invariant() {
    let seeds: u64 = std::env::var("TANDEM_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let (mut committed, mut applied, mut crashes, mut lost) = (0, 0, 0, 0);
    for seed in 0..seeds {
        let result = std::panic::catch_unwind(|| chaos(seed));
        if let Ok((c, a, k, l)) = result {
            committed += c;
            applied += a;
            crashes += k;
            lost += l;
        }
        if let Err(panic) = result {
            eprintln!(
                "seed {seed} failed; rerun it alone with: TANDEM_SIM_SEED={seed} cargo test --release -p tandem-coordinator --test simulation one_seed"
            );
            std::panic::resume_unwind(panic);
        }
    }
    // The runs did exercise the protocol: commits, unanswered commits,
    // crashes, and unsynced writes lost to power losses.
    eprintln!(
        "{seeds} seeds: {committed} answered COMMITTED, {applied} applied, {crashes} crashes, {lost} unsynced writes lost"
    );
    assert!(committed > 0 && applied > committed && crashes > seeds as usize);
    assert!(lost > 0, "no power loss dropped a write: the unsynced records were not exercised");
}

#[test]
fn one_seed() {
    // Reruns one seed of the chaos test (TANDEM_SIM_SEED), by default seed 7.
    let seed = std::env::var("TANDEM_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    chaos(seed);
}
