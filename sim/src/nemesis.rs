//! The nemesis: seeded faults against the simulated cluster, started and
//! ended between simulation steps, each one logged in the history. It acts
//! only during the fault phase; at its end it heals everything (links
//! repaired, crashed nodes restarted, disks given room) so the liveness
//! phase can demand that every in-doubt transaction resolves.
//!
//! What each fault models:
//! - `Crash`: the process is killed (SIGKILL); the disk keeps its page
//!   cache; with `power_loss`, the machine lost power and every write not
//!   fsynced is gone. The node restarts on the same disk later.
//! - `Pause`: every link of the node holds its messages (they are delivered
//!   when it resumes), as a SIGSTOPped process looks from outside. Unlike
//!   SIGSTOP, the node's own timers still run while it is held.
//! - `Partition`: the link between two hosts drops everything both ways
//!   (a black hole: connections stay open and go silent); `OneWay` drops
//!   one direction only.
//! - `FailFsync`: the node's next fsync fails; `DiskFull`: its disk has
//!   a few KiB left; `SlowDisk`: its fsyncs take 150 ms (every disk's
//!   fsync takes 0, 0.1, 1 or 5 ms otherwise, by seed).
//! - `LoseDisk` (scripted only): the node crashes and its disk is lost
//!   (every record gone, as when its data directory is deleted); it
//!   restarts on the empty disk when the fault ends.
//! - `ClockJump`: the node crashes and restarts with its wall clock moved
//!   by one minute to an hour, forwards or backwards (its timeouts run on
//!   the monotonic clock; the wall clock stamps its records). A participant recovers in process once its disk is
//!   healthy again; a coordinator stays NOT_SERVING, so the nemesis, as a
//!   supervisor would, restarts it when the fault ends.

use crate::hosts::{Clocks, Disks, Topology, CLIENT, COORDINATOR};
use crate::History;
use std::time::Duration;
use tandem::rng::SplitMix64;

/// The kinds of fault a scenario may inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Crash,
    Pause,
    Partition,
    OneWay,
    FailFsync,
    DiskFull,
    SlowDisk,
    ClockJump,
}

/// One fault on named hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Crash {
        host: &'static str,
        power_loss: bool,
    },
    Pause {
        host: &'static str,
    },
    LoseDisk {
        host: &'static str,
    },
    Partition {
        a: &'static str,
        b: &'static str,
    },
    OneWay {
        from: &'static str,
        to: &'static str,
    },
    FailFsync {
        host: &'static str,
    },
    DiskFull {
        host: &'static str,
    },
    SlowDisk {
        host: &'static str,
    },
    /// The node crashes and comes back with its wall clock moved by
    /// `by_ms` (backwards when negative).
    ClockJump {
        host: &'static str,
        by_ms: i64,
    },
}

/// A fault a scenario places by hand: from `from_ms` until `until_ms` of
/// simulated time.
#[derive(Debug, Clone, Copy)]
pub struct Scripted {
    pub from_ms: u64,
    pub until_ms: u64,
    pub fault: Fault,
}

impl Fault {
    fn hosts(&self) -> Vec<&'static str> {
        match self {
            Fault::Crash { host, .. }
            | Fault::Pause { host }
            | Fault::LoseDisk { host }
            | Fault::FailFsync { host }
            | Fault::DiskFull { host }
            | Fault::SlowDisk { host }
            | Fault::ClockJump { host, .. } => vec![*host],
            Fault::Partition { a, b } => vec![*a, *b],
            Fault::OneWay { from, to } => vec![*from, *to],
        }
    }
}

/// Shortest and longest a fault lasts.
const FAULT_MS_MIN: u64 = 100;
const FAULT_MS_MAX: u64 = 4_000;
/// How long an fsync takes on a slow disk.
const SLOW_FSYNC_MS: u64 = 150;
/// Bytes a full disk has left.
const DISK_FULL_ROOM_BYTES: u64 = 2_048;

pub struct Nemesis {
    rng: SplitMix64,
    kinds: Vec<FaultKind>,
    /// Faults placed by hand, not yet begun, in order of their start.
    script: Vec<Scripted>,
    /// Every host that can be faulted: the nodes, and the client for links.
    nodes: Vec<&'static str>,
    disks: Disks,
    clocks: Clocks,
    /// How long an fsync takes on a disk that is not slowed down.
    fsync_latency: Duration,
    /// When the fault phase starts and ends.
    start: Duration,
    heal_at: Duration,
    /// Mean time between two faults starting.
    interval_ms: u64,
    next_fault_at: Duration,
    /// Faults in force and when each ends, in the order they started.
    active: Vec<(Duration, Fault)>,
    healed: bool,
}

impl Nemesis {
    pub fn new(
        seed: u64,
        kinds: &[FaultKind],
        script: &[Scripted],
        topology: &Topology,
        disks: Disks,
        clocks: Clocks,
        fsync_latency: Duration,
        start: Duration,
        heal_at: Duration,
        interval_ms: u64,
    ) -> Nemesis {
        Nemesis {
            rng: SplitMix64::new(seed ^ 0x6e65_6d65_7369_7300),
            kinds: kinds.to_vec(),
            script: {
                let mut script = script.to_vec();
                script.sort_by_key(|s| s.from_ms);
                script
            },
            nodes: topology.node_names(),
            disks,
            clocks,
            fsync_latency,
            start,
            heal_at,
            interval_ms: interval_ms.max(1),
            next_fault_at: start,
            active: Vec::new(),
            healed: kinds.is_empty() && script.is_empty(),
        }
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.rng.below(high - low + 1)
    }

    /// Every host but `host`, the client included: a paused host's links.
    fn others<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'static str> + 'a {
        self.nodes.iter().copied().chain(std::iter::once(CLIENT)).filter(move |other| *other != host)
    }

    fn busy(&self, host: &str) -> bool {
        self.active.iter().any(|(_, fault)| fault.hosts().contains(&host))
    }

    /// Starts and ends faults due at `now`; at the end of the fault phase,
    /// heals everything once.
    pub fn act(&mut self, sim: &mut turmoil::Sim<'_>, now: Duration, history: &History) {
        if self.healed {
            return;
        }
        if now >= self.heal_at {
            for (_, fault) in std::mem::take(&mut self.active) {
                self.end(sim, &fault, history, now);
            }
            history.log(now, "nemesis: healed; faults stop".to_string());
            self.healed = true;
            return;
        }
        while let Some(position) = self.active.iter().position(|(ends, _)| *ends <= now) {
            let (_, fault) = self.active.remove(position);
            self.end(sim, &fault, history, now);
        }
        while self.script.first().is_some_and(|s| Duration::from_millis(s.from_ms) <= now) {
            let scripted = self.script.remove(0);
            self.begin(sim, &scripted.fault, history, now);
            self.active.push((Duration::from_millis(scripted.until_ms), scripted.fault));
        }
        if !self.kinds.is_empty() && now >= self.start && now >= self.next_fault_at {
            self.next_fault_at =
                now + Duration::from_millis(self.between(self.interval_ms / 2, self.interval_ms * 3 / 2));
            if let Some(fault) = self.choose() {
                let lasts = Duration::from_millis(self.between(FAULT_MS_MIN, FAULT_MS_MAX));
                self.begin(sim, &fault, history, now);
                self.active.push((now + lasts, fault));
            }
        }
    }

    /// A fault on hosts that have none in force, or `None` if the one drawn
    /// has no free host.
    fn choose(&mut self) -> Option<Fault> {
        let kind = self.kinds[self.rng.below(self.kinds.len() as u64) as usize];
        let free: Vec<&'static str> = self.nodes.iter().copied().filter(|host| !self.busy(host)).collect();
        if free.is_empty() {
            return None;
        }
        let host = free[self.rng.below(free.len() as u64) as usize];
        // A link's other end: another free node or the client.
        let mut ends: Vec<&'static str> = free.iter().copied().filter(|other| *other != host).collect();
        if !self.busy(CLIENT) {
            ends.push(CLIENT);
        }
        let other = if ends.is_empty() { None } else { Some(ends[self.rng.below(ends.len() as u64) as usize]) };
        Some(match kind {
            FaultKind::Crash => Fault::Crash { host, power_loss: self.rng.chance(50) },
            FaultKind::Pause => Fault::Pause { host },
            FaultKind::Partition => Fault::Partition { a: host, b: other? },
            FaultKind::OneWay if self.rng.chance(50) => Fault::OneWay { from: host, to: other? },
            FaultKind::OneWay => Fault::OneWay { from: other?, to: host },
            FaultKind::FailFsync => Fault::FailFsync { host },
            FaultKind::DiskFull => Fault::DiskFull { host },
            FaultKind::SlowDisk => Fault::SlowDisk { host },
            FaultKind::ClockJump => {
                let by_ms = self.between(60_000, 3_600_000) as i64;
                Fault::ClockJump { host, by_ms: if self.rng.chance(50) { by_ms } else { -by_ms } }
            }
        })
    }

    fn begin(&mut self, sim: &mut turmoil::Sim<'_>, fault: &Fault, history: &History, now: Duration) {
        history.log(now, format!("nemesis: begin {fault:?}"));
        match fault {
            Fault::Crash { host, power_loss } => {
                let disk = self.disks.of(host);
                if *power_loss {
                    disk.power_loss();
                } else {
                    disk.crash_process();
                }
                sim.crash(*host);
            }
            Fault::LoseDisk { host } => {
                self.disks.of(host).lose_everything();
                sim.crash(*host);
            }
            Fault::Pause { host } => self.others(host).for_each(|other| sim.hold(*host, other)),
            Fault::Partition { a, b } => sim.partition(*a, *b),
            Fault::OneWay { from, to } => sim.partition_oneway(*from, *to),
            Fault::FailFsync { host } => self.disks.of(host).fail_next_fsync(),
            Fault::DiskFull { host } => {
                let disk = self.disks.of(host);
                disk.set_capacity_bytes(Some(disk.used_bytes() + DISK_FULL_ROOM_BYTES));
            }
            Fault::SlowDisk { host } => {
                self.disks.of(host).set_fsync_latency(Duration::from_millis(SLOW_FSYNC_MS));
            }
            Fault::ClockJump { host, by_ms } => {
                self.disks.of(host).crash_process();
                sim.crash(*host);
                self.clocks.jump(host, *by_ms);
            }
        }
    }

    fn end(&mut self, sim: &mut turmoil::Sim<'_>, fault: &Fault, history: &History, now: Duration) {
        history.log(now, format!("nemesis: end {fault:?}"));
        match fault {
            Fault::Crash { host, .. } | Fault::ClockJump { host, .. } | Fault::LoseDisk { host } => sim.bounce(*host),
            Fault::Pause { host } => self.others(host).for_each(|other| sim.release(*host, other)),
            Fault::Partition { a, b } => sim.repair(*a, *b),
            Fault::OneWay { from, to } => sim.repair_oneway(*from, *to),
            Fault::SlowDisk { host } => self.disks.of(host).set_fsync_latency(self.fsync_latency),
            Fault::FailFsync { host } | Fault::DiskFull { host } => {
                self.disks.of(host).heal();
                // The coordinator does not reopen its log in process: it is
                // restarted, as its supervisor would on NOT_SERVING.
                if *host == COORDINATOR {
                    self.disks.of(host).crash_process();
                    sim.bounce(*host);
                }
            }
        }
    }
}
