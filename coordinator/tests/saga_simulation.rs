//! The saga orchestrator's core and the participants' cores in one
//! deterministic simulation: the orchestrator is crashed before every step
//! of a saga, on the happy path, in the middle of a compensation and on the
//! way to a dead letter, and restarted from its saga log. Two crash kinds:
//! a process crash keeps every record written (buffered writes are in the
//! WAL), a machine crash keeps only fsynced ones (the start record), so the
//! saga restarts from an earlier stage and every step it redoes must be a
//! duplicate or a hanging step.
//!
//! After each run: the saga is terminal, money is conserved (suspense
//! included), and the balances match the outcome exactly (nothing applied
//! twice).

use std::collections::{BTreeMap, VecDeque};
use tandem::domain::Id;
use tandem::store::Op;
use tandem_coordinator::core::{AbortReason, Outcome};
use tandem_coordinator::saga::{
    Recovery, Retry, SagaAction, SagaCore, SagaRecord, SagaSpec, StepKind, StepPhase, StepResult,
};
use tandem_participant::core::{Config, Core as Participant, Refusal};
use tandem_participant::saga::{StepKind as PKind, StepOutcome, StepPhase as PPhase};

fn id(text: &str) -> Id {
    Id::parse("id", text).unwrap()
}

struct Node {
    core: Participant,
    disk: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Node {
    fn new(name: &str, accounts: &[(u64, i64)]) -> Node {
        let mut core = Participant::new(config(name));
        let effects = core.open_accounts(accounts).unwrap();
        let mut node = Node { core, disk: BTreeMap::new() };
        node.write(&effects.ops);
        node
    }

    fn write(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    self.disk.insert(k.clone(), v.clone());
                }
                Op::Delete(k) => {
                    self.disk.remove(k);
                }
            }
        }
    }
}

fn config(name: &str) -> Config {
    Config {
        node_id: id(name),
        coordinators: [id("c1")].into_iter().collect(),
        in_doubt_after_ms: 500,
        finished_retention_ms: u64::MAX / 4,
        owned_accounts: None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Crash {
    /// Every record written survives.
    Process,
    /// Only fsynced records survive.
    Machine,
}

/// What the saga does, and how the participants refuse.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// Debit and credit succeed.
    Happy,
    /// The target is closed: the credit is refused and the debit refunded.
    CreditRefused,
    /// The target and, after the debit, the source are closed: the refund is
    /// refused and the money parked in suspense.
    RefundRefused,
}

struct World {
    orchestrator: SagaCore,
    /// The saga log as written (a process crash keeps all of it).
    log: BTreeMap<Id, SagaRecord>,
    /// The saga log as of the last fsync (a machine crash keeps only this:
    /// the WAL is one log, so an fsync makes every earlier write durable).
    durable_log: BTreeMap<Id, SagaRecord>,
    /// Whether the saga's start record was ever written.
    started: bool,
    p1: Node,
    p2: Node,
    pending: VecDeque<SagaAction>,
    outcome: Option<Outcome>,
    plan: Plan,
    /// The step (counted from 0 over every step sent) whose answer is lost
    /// after the participant applied it.
    lose_answer_of_step: Option<usize>,
    steps_sent: usize,
    trace: Vec<String>,
}

impl World {
    fn new(plan: Plan) -> World {
        let mut p2 = Node::new("p2", &[(1_001, 0)]);
        if !matches!(plan, Plan::Happy) {
            let (_, effects) = p2.core.set_closed(1_001, true).unwrap();
            p2.write(&effects.ops);
        }
        let mut world = World {
            orchestrator: SagaCore::new(10),
            log: BTreeMap::new(),
            durable_log: BTreeMap::new(),
            started: false,
            p1: Node::new("p1", &[(1, 100)]),
            p2,
            pending: VecDeque::new(),
            outcome: None,
            plan,
            lose_answer_of_step: None,
            steps_sent: 0,
            trace: Vec::new(),
        };
        let spec = SagaSpec {
            from: 1,
            to: 1_001,
            amount: 30,
            from_participant: id("p1"),
            to_participant: id("p2"),
            recovery: Recovery::Backward,
            idempotency_key: None,
            fingerprint: 0,
            position: 1,
        };
        world.pending.extend(world.orchestrator.begin(id("s1"), spec).unwrap());
        world
    }

    fn run_one(&mut self) -> bool {
        let Some(action) = self.pending.pop_front() else { return false };
        self.trace.push(format!("{action:?}"));
        match action {
            SagaAction::Persist { saga, record, fsync } => {
                let started = record.stage == tandem_coordinator::saga::Stage::Starting;
                self.log.insert(saga.clone(), record);
                if fsync {
                    self.durable_log = self.log.clone();
                    self.started = true;
                }
                if started {
                    self.pending.extend(self.orchestrator.on_started(&saga));
                }
            }
            SagaAction::Step { saga, position, participant, kind, phase, account, amount, retry } => {
                let node = if participant.as_str() == "p1" { &mut self.p1 } else { &mut self.p2 };
                let pkind = match kind {
                    StepKind::Debit => PKind::Debit,
                    StepKind::Credit => PKind::Credit,
                    StepKind::Release => PKind::Release,
                };
                let pphase = match phase {
                    StepPhase::Action => PPhase::Action,
                    StepPhase::Compensation => PPhase::Compensation,
                    StepPhase::CompensateToSuspense => PPhase::CompensateToSuspense,
                };
                let (answer, effects) = node.core.saga_step(saga.clone(), pkind, pphase, account, amount, 0).unwrap();
                node.write(&effects.ops);
                // After the debit, the source closes (RefundRefused).
                if matches!(self.plan, Plan::RefundRefused) && kind == StepKind::Debit && phase == StepPhase::Action {
                    let (_, effects) = self.p1.core.set_closed(1, true).unwrap();
                    self.p1.write(&effects.ops);
                }
                self.steps_sent += 1;
                if self.lose_answer_of_step == Some(self.steps_sent - 1) {
                    // The driver's retries all time out: a budgeted step
                    // counts as exhausted (effect unknown), an unbudgeted
                    // one is sent again.
                    self.trace.push("  its answer is lost".into());
                    if retry == Retry::Forever {
                        let again =
                            SagaAction::Step { saga, position, participant, kind, phase, account, amount, retry };
                        self.pending.push_front(again);
                    } else {
                        let lost = StepResult::Exhausted("no answer".into());
                        self.pending.extend(self.orchestrator.on_step(&saga, kind, phase, lost));
                    }
                    return true;
                }
                let result = match answer.outcome {
                    StepOutcome::Applied => StepResult::Applied,
                    StepOutcome::EmptyCompensation => StepResult::Empty,
                    StepOutcome::Refused(refusal, reason) => {
                        let why = match refusal {
                            Some(Refusal::InsufficientFunds) => AbortReason::InsufficientFunds,
                            Some(Refusal::BalanceOverflow) => AbortReason::BalanceOverflow,
                            Some(Refusal::UnknownAccount) => AbortReason::UnknownAccount,
                            _ => AbortReason::Refused,
                        };
                        StepResult::Refused(why, reason)
                    }
                    StepOutcome::HangingIgnored => StepResult::Hanging,
                };
                self.pending.extend(self.orchestrator.on_step(&saga, kind, phase, result));
            }
            SagaAction::Finish { saga, outcome, .. } => {
                self.log.remove(&saga);
                self.outcome = Some(outcome);
            }
            SagaAction::DeadLetter { saga, record, outcome } => {
                self.log.insert(saga, record);
                self.outcome = Some(outcome);
            }
            SagaAction::ResolveReply { .. } => {}
        }
        true
    }

    fn crash_orchestrator(&mut self, crash: Crash) {
        self.trace.push(format!("crash ({crash:?})"));
        self.pending.clear();
        if crash == Crash::Machine {
            // Buffered stage records are lost; the fsynced start record stays
            // (as the stage it was written with).
            self.log = self.durable_log.clone();
        }
        // A process that had already answered the client keeps that outcome;
        // the log decides what it does next.
        self.orchestrator = SagaCore::new(10);
        let logged = self.log.iter().map(|(id, record)| (id.clone(), record.clone())).collect();
        self.pending.extend(self.orchestrator.recover(logged));
    }

    fn run_to_end(&mut self) {
        for _ in 0..1_000 {
            if !self.run_one() {
                return;
            }
        }
        panic!("the saga did not end:\n{}", self.trace.join("\n"));
    }

    fn check(&self, label: &str) {
        let context = || format!("{label}\n{}", self.trace.join("\n"));
        let source = self.p1.core.account(1).unwrap().posted;
        let target = self.p2.core.account(1_001).unwrap().posted;
        let suspense = self.p1.core.suspense() + self.p2.core.suspense();
        assert_eq!(source + target + suspense, 100, "money not conserved: {}", context());
        let terminal_in_log = self.log.values().all(|r| r.stage == tandem_coordinator::saga::Stage::DeadLettered);
        assert!(terminal_in_log, "the saga is not terminal: {}", context());
        // The balances say what the client heard.
        let heard = match &self.outcome {
            None => (100, 0, 0),
            Some(Outcome::Committed) => (70, 30, 0),
            Some(Outcome::Aborted(..) | Outcome::Compensated(..)) => (100, 0, 0),
            Some(Outcome::DeadLettered(..)) => (70, 0, 30),
        };
        assert_eq!((source, target, suspense), heard, "outcome {:?}: {}", self.outcome, context());
        if self.lose_answer_of_step.is_some() {
            // A lost answer may turn the saga onto another path.
            return;
        }
        // Balances match the outcome exactly: nothing applied twice.
        let expected = match self.plan {
            // The orchestrator crashed before the start record was written:
            // the saga never began (the client heard nothing and may retry).
            _ if !self.started => (100, 0, 0),
            Plan::Happy => (70, 30, 0),
            Plan::CreditRefused => (100, 0, 0),
            Plan::RefundRefused => (70, 0, 30),
        };
        assert_eq!((source, target, suspense), expected, "{}", context());
        // What a restarted participant reads back is what it holds.
        for node in [&self.p1, &self.p2] {
            let reloaded = Participant::recover(config(node.core.node_id().as_str()), node.disk.clone(), 0)
                .expect("the disk holds only records the core wrote");
            assert_eq!(reloaded.accounts(), node.core.accounts(), "{}", context());
            assert_eq!(reloaded.suspense(), node.core.suspense(), "{}", context());
        }
    }
}

#[test]
fn an_orchestrator_crash_before_any_step_of_any_saga_path_ends_terminal_and_exact() {
    for plan in [Plan::Happy, Plan::CreditRefused, Plan::RefundRefused] {
        let mut reference = World::new(plan);
        reference.run_to_end();
        reference.check(&format!("{plan:?} without a crash"));
        let steps = reference.trace.len();
        for crash in [Crash::Process, Crash::Machine] {
            for crash_before in 0..=steps {
                let mut world = World::new(plan);
                for _ in 0..crash_before {
                    world.run_one();
                }
                world.crash_orchestrator(crash);
                world.run_to_end();
                world.check(&format!("{plan:?}, {crash:?} crash before step {crash_before}"));
            }
        }
    }
}

#[test]
fn two_crashes_in_the_middle_of_a_compensation_still_end_exact() {
    let mut world = World::new(Plan::RefundRefused);
    let mut crashes = 0;
    while world.run_one() {
        let compensating = world.trace.last().is_some_and(|t| t.contains("Compensation") || t.contains("Suspense"));
        if compensating && crashes < 2 {
            crashes += 1;
            world.crash_orchestrator(if crashes == 1 { Crash::Process } else { Crash::Machine });
        }
    }
    assert_eq!(crashes, 2, "the run did reach the compensation twice");
    world.check("two crashes mid-compensation");
    assert!(matches!(world.outcome, Some(Outcome::DeadLettered(..))), "{:?}", world.outcome);
}

#[test]
fn a_step_applied_whose_answer_is_lost_still_ends_exact_on_every_path() {
    for plan in [Plan::Happy, Plan::CreditRefused, Plan::RefundRefused] {
        let mut reference = World::new(plan);
        reference.run_to_end();
        let steps = reference.steps_sent;
        for lost in 0..steps {
            let mut world = World::new(plan);
            world.lose_answer_of_step = Some(lost);
            world.run_to_end();
            world.check(&format!("{plan:?}, the answer of step {lost} lost"));
        }
    }
}
