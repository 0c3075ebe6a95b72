//! The whole of tandem in a deterministic simulation.
//!
//! The other simulations (`coordinator/tests/simulation.rs`,
//! `saga_simulation.rs`) prove the protocol cores. This one runs what the
//! binaries run: the coordinator's and the participants' `Node`s, with
//! their batching queues, call slots, retry loops, deadlines, the audit,
//! the decision-query loop, garbage collection and the outbox relay,
//! and their real tonic services, over turmoil's simulated network, on
//! disks in memory ([`tandem::store::memory::MemoryDisk`]) and tokio's
//! simulated clock. Only the seams differ from production: the network
//! ([`tandem::net::Network`]) and the disk ([`tandem::store::Disk`]); links
//! are plaintext (mutual TLS is proved by the cluster tests, and would
//! cost most of a seed's time here).
//!
//! One seed is one run, in two phases (as TigerBeetle's VOPR and
//! FoundationDB's simulator do):
//! - **safety**: seeded clients send transfers by 2PC, orchestrated and
//!   choreographed sagas, retrying with their idempotency keys, and audit;
//!   the nemesis ([`nemesis`]) crashes nodes (process crash or power loss)
//!   and restarts them, pauses them, cuts links both ways or one way, fails
//!   fsyncs and fills disks; message latency varies per seed;
//! - **liveness**: the faults stop, and within a bounded simulated time
//!   every in-doubt transaction must resolve and every outcome be learnt.
//!
//! Then the bench's own checker ([`tandem_bench::check`]) accounts for
//! every account exactly: every acknowledged commit applied once on every
//! participant, every definite failure nowhere, money conserved (suspense
//! included), no reservation or transfer left in flight, no available
//! balance below zero; audits under 2PC must be exact.
//!
//! Everything that decides what happens is seeded: turmoil's network (its
//! latencies and the order hosts run in), the clients, the nemesis. The
//! same seed gives the same history, byte for byte (a test checks it), so
//! a failing seed replays with one command, printed with the violation.
//!
//! What it cannot model: a node's CPU (work takes no simulated time), the
//! timers of a paused node (they still run while its links hold), TLS,
//! RocksDB's own behaviour (the memory disk keeps RocksDB's contract, not
//! its code), a jump of the monotonic clock (there is none to model), and a
//! wall-clock jump while a node runs (a participant reads its wall clock
//! once, at start: the nemesis jumps it across a restart).

pub mod client;
pub mod hosts;
pub mod nemesis;
pub mod net;

use hosts::{Clocks, Disks, Topology, CLIENT};
use nemesis::{Fault, FaultKind, Nemesis, Scripted};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem::rng::SplitMix64;
use tandem::store::memory::MemoryDisk;
use tandem_bench::scenario::Protocol;
use tandem_coordinator::core::{CommitProtocol, OnePhaseCommit};

/// What a seed runs: its workload and its faults.
#[derive(Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub faults: &'static [FaultKind],
    pub protocols: &'static [Protocol],
    /// Whether the client audits (only exact under 2PC alone).
    pub audits: bool,
    pub workers: usize,
    pub ops_per_worker: usize,
    /// Mean time between two faults.
    pub fault_interval_ms: u64,
    /// How long participants keep finished records, tombstones and inbox
    /// ids (production: 300 s).
    pub finished_retention_ms: u64,
    /// Whether CI runs it among its 10,000 seeds: a scenario that shows a
    /// known open problem is run by hand until its fix lands; a scripted
    /// one has its own test.
    pub in_ci: bool,
    /// Faults placed by hand (with or without random ones).
    pub script: &'static [Scripted],
    /// The (source, target) participant indexes the transfers go between
    /// (`None`: any two accounts).
    pub legs: Option<&'static [(usize, usize)]>,
    /// When the faults stop (the liveness phase begins).
    pub faults_until_ms: u64,
    /// How the coordinator commits transactions over several participants.
    pub commit_protocol: CommitProtocol,
    /// Which transactions on one participant it commits in one phase.
    pub one_phase_commit: OnePhaseCommit,
}

/// What most scenarios share; each names what it changes.
const BASE: Scenario = Scenario {
    name: "",
    about: "",
    faults: &[],
    protocols: ALL_PROTOCOLS,
    audits: false,
    workers: 3,
    ops_per_worker: 16,
    fault_interval_ms: 700,
    finished_retention_ms: RETENTION_MS,
    in_ci: true,
    script: &[],
    legs: None,
    faults_until_ms: 6_000,
    commit_protocol: CommitProtocol::Parallel,
    one_phase_commit: OnePhaseCommit::Auto,
};

const ALL_PROTOCOLS: &[Protocol] = &[Protocol::TwoPhaseCommit, Protocol::Orchestrated, Protocol::Choreographed];
const ALL_FAULTS: &[FaultKind] = &[
    FaultKind::Crash,
    FaultKind::Pause,
    FaultKind::Partition,
    FaultKind::OneWay,
    FaultKind::FailFsync,
    FaultKind::DiskFull,
    FaultKind::SlowDisk,
    FaultKind::ClockJump,
];

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "calm",
        about: "every protocol, no faults: the baseline every other scenario departs from",
        ..BASE
    },
    Scenario {
        name: "2pc-audits",
        about: "2PC alone with audits in a loop, under every fault: audits must be exact",
        faults: ALL_FAULTS,
        protocols: &[Protocol::TwoPhaseCommit],
        audits: true,
        ..BASE
    },
    Scenario {
        name: "crashes",
        about: "every protocol; nodes crash (process or power loss) and restart, some with their wall clock jumped",
        faults: &[FaultKind::Crash, FaultKind::ClockJump],
        ..BASE
    },
    Scenario {
        name: "network",
        about: "every protocol; nodes pause, links black-hole both ways or one way",
        faults: &[FaultKind::Pause, FaultKind::Partition, FaultKind::OneWay],
        ..BASE
    },
    Scenario {
        name: "disks",
        about: "every protocol; fsyncs fail, disks fill up or slow down",
        faults: &[FaultKind::FailFsync, FaultKind::DiskFull, FaultKind::SlowDisk],
        ..BASE
    },
    Scenario { name: "everything", about: "every protocol under every fault", faults: ALL_FAULTS, fault_interval_ms: 500, ..BASE },
    Scenario {
        name: "storm",
        about: "every protocol under every fault, a fault every 200 ms on average, five clients",
        faults: ALL_FAULTS,
        fault_interval_ms: 200,
        workers: 5,
        ..BASE
    },
    Scenario {
        name: "long-outages",
        about: "every protocol under every fault, with the participants' retention (100 ms) far shorter than the faults: no deduplication may rest on it (late prepares, commits, saga steps and events are recognised by watermarks and sequence numbers)",
        faults: ALL_FAULTS,
        fault_interval_ms: 500,
        finished_retention_ms: 100,
        ..BASE
    },
    Scenario {
        name: "classic-2pc",
        about: "2PC alone with classic commit (the decision logged after every vote, not in parallel with the prepares), with audits, under every fault: every other scenario runs parallel commit, the coordinator's default",
        faults: ALL_FAULTS,
        protocols: &[Protocol::TwoPhaseCommit],
        audits: true,
        commit_protocol: CommitProtocol::Classic,
        ..BASE
    },
    Scenario {
        name: "one-phase",
        about: "2PC alone, three transfers in four on one participant (one-phase commit, keyed ones too: one request, no decision record; keyed ones log an intent), with audits, under every fault, the participants' retention (100 ms) far shorter than the faults: every key's retries get its one answer, and nothing is applied twice",
        faults: ALL_FAULTS,
        protocols: &[Protocol::TwoPhaseCommit],
        audits: true,
        fault_interval_ms: 500,
        finished_retention_ms: 100,
        legs: Some(&[(0, 0), (1, 1), (2, 2), (0, 1)]),
        one_phase_commit: OnePhaseCommit::Always,
        ..BASE
    },
    Scenario {
        name: "batched",
        about: "2PC alone, half the transfers through a batching client (TransferBatch calls shared by six clients, a duplicate now and then in the same batch), with audits, under every fault: each transfer in a batch is decided and answered as if alone",
        faults: ALL_FAULTS,
        protocols: &[Protocol::TwoPhaseCommit, Protocol::TwoPhaseCommitBatched],
        audits: true,
        workers: 6,
        ..BASE
    },
    Scenario {
        name: "audit-while-paused",
        about: "scripted: p3 paused for 5 s while audits loop and 2PC transfers run between p1 and p2, which must not wait for the audits",
        protocols: &[Protocol::TwoPhaseCommit],
        audits: true,
        in_ci: false,
        script: &[Scripted { from_ms: 500, until_ms: 5_500, fault: Fault::Pause { host: "p3" } }],
        legs: Some(&[(0, 1), (1, 0)]),
        ..BASE
    },
    Scenario {
        name: "coordinator-paused",
        about: "scripted: the coordinator paused for 9 s, far longer than the participants' decision-query deadline, with 2PC transfers in flight",
        protocols: &[Protocol::TwoPhaseCommit],
        in_ci: false,
        script: &[Scripted { from_ms: 1_000, until_ms: 10_000, fault: Fault::Pause { host: "c1" } }],
        faults_until_ms: 10_000,
        ..BASE
    },
    Scenario {
        name: "relay-peer-down",
        about: "scripted: p3 black-holed from p1 for 14.5 s while choreographed transfers go from p1 to p2 and to p3; those to p2 must not wait",
        protocols: &[Protocol::Choreographed],
        in_ci: false,
        script: &[Scripted { from_ms: 500, until_ms: 15_000, fault: Fault::Partition { a: "p1", b: "p3" } }],
        legs: Some(&[(0, 1), (0, 2)]),
        faults_until_ms: 15_000,
        ..BASE
    },
];

/// The participants' retention in the CI scenarios: longer than any fault
/// they inject (at most `nemesis::FAULT_MS_MAX`) plus the liveness phase.
const RETENTION_MS: u64 = 30_000;

pub fn scenario(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// When the nemesis starts its random faults.
const FAULTS_FROM_MS: u64 = 200;
/// Longest the participants may take to settle (nothing prepared, reserved,
/// in flight or undelivered) after the faults stop. Over 700 seeds the
/// longest was 3.8 s (the median 50 ms): a dead connection is noticed
/// within 3 s (`tandem::server::KEEPALIVE_*`), a relay backs off at most
/// 2 s, a decision query waits at most 1 s.
const LIVENESS_BOUND_MS: u64 = 10_000;
/// Longest a seed may run in simulated time: the liveness bound (the
/// checker settles within 30 s and resolves outcomes within 60 s more).
const SIMULATED_S_MAX: u64 = 150;

/// The history of one seed: every client call and answer, every fault, the
/// checker's findings, each with its simulated time. Clones share it.
#[derive(Clone, Default)]
pub struct History(Arc<Mutex<Vec<String>>>);

impl History {
    pub fn log(&self, at: Duration, line: String) {
        let stamped = format!("{:>9.3}s {line}", at.as_secs_f64());
        self.0.lock().expect("history lock").push(stamped);
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().expect("history lock").clone()
    }
}

/// What one seed found.
#[derive(Debug)]
pub struct SeedReport {
    pub scenario: &'static str,
    pub seed: u64,
    pub violations: Vec<String>,
    pub history: Vec<String>,
    pub operations: usize,
    pub simulated: Duration,
    /// Every client operation, with its final outcome and when it started
    /// and ended (simulated microseconds).
    pub entries: Vec<tandem_bench::workload::HistoryEntry>,
    /// When the faults stopped, and when the checker found every
    /// participant settled afterwards (no prepared transfer, reservation,
    /// transfer in flight or undelivered event).
    pub healed_at: Duration,
    pub settled_at: Option<Duration>,
}

impl SeedReport {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The one command that runs this seed again and prints its history.
    pub fn replay_command(&self) -> String {
        format!("cargo run --release -p tandem-sim -- --scenario {} --seed {} --history", self.scenario, self.seed)
    }
}

/// Runs `scenario` with `seed`.
pub fn run_seed(scenario: &'static Scenario, seed: u64) -> SeedReport {
    let topology = Topology {
        participants: 3,
        accounts_per_participant: 4,
        initial_balance: 100,
        finished_retention_ms: scenario.finished_retention_ms,
    };
    let disks = Disks(topology.node_names().into_iter().map(|name| (name, MemoryDisk::new())).collect());
    let mut rng = SplitMix64::new(seed);
    let latency_max_ms = [1, 5, 20][rng.below(3) as usize];
    // Every fsync takes this long, so that a crash can fall between a write
    // and its acknowledgement.
    let fsync_latency = Duration::from_micros([0, 100, 1_000, 5_000][rng.below(4) as usize]);
    disks.0.values().for_each(|disk| disk.set_fsync_latency(fsync_latency));
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(SIMULATED_S_MAX))
        .tick_duration(Duration::from_millis(1))
        // The wall clock starts in 2026, not in 1970.
        .epoch(std::time::UNIX_EPOCH + Duration::from_secs(1_780_000_000))
        .min_message_latency(Duration::from_micros(200))
        .max_message_latency(Duration::from_millis(latency_max_ms))
        .build();
    let clocks = Clocks(topology.node_names().into_iter().map(|name| (name, Default::default())).collect());
    hosts::add_nodes(&mut sim, seed, &topology, &disks, &clocks, scenario.commit_protocol, scenario.one_phase_commit);
    let history = History::default();
    history.log(
        Duration::ZERO,
        format!("seed {seed}, scenario {}, latency up to {latency_max_ms} ms, fsync {fsync_latency:?}", scenario.name),
    );
    let heal_at = Duration::from_millis(scenario.faults_until_ms);
    let plan = Arc::new(client::ClientPlan { seed, scenario, topology: topology.clone(), heal_at });
    let outcome = Arc::new(Mutex::new(client::ClientOutcome::default()));
    sim.client(CLIENT, client::run(plan, history.clone(), outcome.clone()));
    let mut nemesis = Nemesis::new(
        seed,
        scenario.faults,
        scenario.script,
        &topology,
        disks,
        clocks,
        fsync_latency,
        Duration::from_millis(FAULTS_FROM_MS),
        heal_at,
        scenario.fault_interval_ms,
    );
    let mut violations = Vec::new();
    loop {
        let now = sim.elapsed();
        nemesis.act(&mut sim, now, &history);
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => {
                violations.push(format!("the simulation stopped at {:?}: {error}", sim.elapsed()));
                break;
            }
        }
    }
    let simulated = sim.elapsed();
    drop(sim);
    let mut outcome = std::mem::take(&mut *outcome.lock().expect("outcome lock"));
    violations.append(&mut outcome.violations);
    match &mut outcome.check {
        Some(check) => violations.append(&mut check.violations),
        None if violations.is_empty() => violations.push("the client never reached the check".into()),
        None => {}
    }
    // Liveness: once the faults stop, everything in doubt resolves, every
    // event is delivered, within a bound of simulated time.
    match outcome.settled_at {
        Some(settled) if settled.saturating_sub(heal_at) <= Duration::from_millis(LIVENESS_BOUND_MS) => {}
        Some(settled) => violations.push(format!(
            "liveness: the participants settled {:?} after the faults stopped (bound: {LIVENESS_BOUND_MS} ms)",
            settled.saturating_sub(heal_at)
        )),
        None if outcome.check.is_some() => violations.push(format!(
            "liveness: the participants had not settled {} s after the faults stopped",
            client::SETTLE_PROBE_MS_MAX / 1000
        )),
        None => {}
    }
    for violation in &violations {
        history.log(simulated, format!("VIOLATION: {violation}"));
    }
    SeedReport {
        scenario: scenario.name,
        seed,
        violations,
        history: history.lines(),
        operations: outcome.operations,
        simulated,
        entries: outcome.entries,
        healed_at: heal_at,
        settled_at: outcome.settled_at,
    }
}
