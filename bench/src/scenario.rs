//! Scenarios: what a bench run does, read from a TOML file (presets live in
//! `bench/scenarios/`) and overridable from the command line.
//!
//! A scenario names the protocols to compare, the cluster, the workload and
//! a schedule of faults. Every field has a default, so an empty file is a
//! valid scenario. A bad file is refused with a message that names the field
//! and says what is wrong; unknown fields are refused too (a typo must not
//! silently run another experiment).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// 2PC as the coordinator runs it by default: parallel commit (and one
    /// phase for a transfer on one participant).
    #[serde(rename = "2pc")]
    TwoPhaseCommit,
    /// The same 2PC, its clients sending their transfers through a
    /// batching client (`workload::TransferBatcher`): the concurrent
    /// transfers of the clients that share a channel go to the coordinator
    /// together in TransferBatch calls, each still decided alone.
    #[serde(rename = "2pc-batch")]
    TwoPhaseCommitBatched,
    /// 2PC with the decision logged after the votes (`--commit-protocol
    /// classic`), to compare with parallel commit in the same run.
    #[serde(rename = "2pc-classic")]
    TwoPhaseCommitClassic,
    /// Saga orchestrated by the coordinator (backward recovery).
    Orchestrated,
    /// Saga choreographed by the participants (outbox, inbox).
    Choreographed,
    /// Baseline, not tandem: the same transfers in one local transaction of
    /// one PostgreSQL database that holds every account (see
    /// [`crate::postgres`]).
    PostgresLocal,
    /// Baseline, not tandem: the same transfers over one PostgreSQL server
    /// per participant, with PREPARE TRANSACTION and COMMIT PREPARED; every
    /// transfer crosses two servers.
    #[serde(rename = "postgres-2pc")]
    PostgresTwoPhase,
}

impl Protocol {
    /// Every protocol the bench knows: tandem's, then the baselines.
    pub const ALL: &'static [Protocol] = &[
        Protocol::TwoPhaseCommit,
        Protocol::TwoPhaseCommitBatched,
        Protocol::TwoPhaseCommitClassic,
        Protocol::Orchestrated,
        Protocol::Choreographed,
        Protocol::PostgresLocal,
        Protocol::PostgresTwoPhase,
    ];
    /// tandem's own protocols: what a scenario runs when it names none.
    pub const TANDEM: &'static [Protocol] =
        &[Protocol::TwoPhaseCommit, Protocol::Orchestrated, Protocol::Choreographed];

    pub fn name(&self) -> &'static str {
        match self {
            Protocol::TwoPhaseCommit => "2pc",
            Protocol::TwoPhaseCommitBatched => "2pc-batch",
            Protocol::TwoPhaseCommitClassic => "2pc-classic",
            Protocol::Orchestrated => "orchestrated",
            Protocol::Choreographed => "choreographed",
            Protocol::PostgresLocal => "postgres-local",
            Protocol::PostgresTwoPhase => "postgres-2pc",
        }
    }

    /// tandem's 2PC, by either commit protocol: its audits must be exact.
    pub fn is_two_phase_commit(&self) -> bool {
        matches!(self, Protocol::TwoPhaseCommit | Protocol::TwoPhaseCommitBatched | Protocol::TwoPhaseCommitClassic)
    }

    /// A baseline runs the workload against PostgreSQL, not tandem.
    pub fn is_baseline(&self) -> bool {
        matches!(self, Protocol::PostgresLocal | Protocol::PostgresTwoPhase)
    }

    pub fn parse(text: &str) -> Result<Protocol, String> {
        Protocol::ALL.iter().copied().find(|p| p.name() == text).ok_or_else(|| {
            format!(
                "unknown protocol {text:?}; known: {}",
                Protocol::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
            )
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    /// Run one after the other, each on a fresh cluster with the same seed.
    pub protocols: Vec<Protocol>,
    pub duration_s: f64,
    pub seed: u64,
    pub cluster: ClusterSection,
    pub workload: WorkloadSection,
    #[serde(rename = "fault")]
    pub faults: Vec<Fault>,
}

impl Default for Scenario {
    fn default() -> Scenario {
        Scenario {
            name: "custom".into(),
            description: String::new(),
            protocols: Protocol::TANDEM.to_vec(),
            duration_s: 10.0,
            seed: 42,
            cluster: ClusterSection::default(),
            workload: WorkloadSection::default(),
            faults: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    pub participants: usize,
    pub accounts_per_participant: u64,
    pub initial_balance: i64,
    /// Passed to the coordinator as is, e.g. ["--prepare-timeout-ms", "500"].
    pub coordinator_args: Vec<String>,
    pub participant_args: Vec<String>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            participants: 2,
            accounts_per_participant: 10_000,
            initial_balance: 1_000_000,
            coordinator_args: Vec::new(),
            participant_args: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoopMode {
    /// `clients` concurrent clients, each starting a transfer when its last
    /// one ends.
    Closed,
    /// Transfers start at `rate_per_s`, whatever the answers; latency counts
    /// from the intended start, so queueing is not hidden.
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Skew {
    Uniform,
    Zipf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadSection {
    pub mode: LoopMode,
    pub clients: usize,
    pub rate_per_s: f64,
    /// Most transfers in flight in open loop; past it a start is counted as
    /// dropped (the system is overloaded).
    pub in_flight_max: usize,
    pub skew: Skew,
    pub zipf_exponent: f64,
    pub amount_min: i64,
    pub amount_max: i64,
    /// Share of transfers (0..1) that ask for more than any account holds,
    /// and so must abort for lack of funds.
    pub overdraft_share: f64,
    /// Share of transfers (0..1) whose two accounts live on different
    /// participants. Unset, both accounts are drawn independently (by
    /// `skew`), so with `uniform` about (n - 1)/n of them cross: a half with
    /// two participants. `postgres-2pc` crosses always, whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_share: Option<f64>,
    /// How often the audit reader reads every balance; 0 turns it off.
    pub audit_interval_ms: u64,
    /// Audits in half of the windows of this many milliseconds only, so
    /// that one run measures its throughput with audits against without,
    /// the machine's drift shared by both: after a first window to warm up,
    /// blocks of four windows with audits, without, without, with; the
    /// report gives the commits/s of each kind and their ratio
    /// (`run::AuditAlternation`). 0, the default: audits throughout. Needs
    /// `audit_interval_ms`, and room for the warm-up and one block.
    pub audit_alternate_ms: u64,
    /// Deadline of one client call.
    pub call_timeout_ms: u64,
}

impl Default for WorkloadSection {
    fn default() -> Self {
        WorkloadSection {
            mode: LoopMode::Closed,
            clients: 16,
            rate_per_s: 1_000.0,
            in_flight_max: 1_024,
            skew: Skew::Uniform,
            zipf_exponent: 1.0,
            amount_min: 1,
            amount_max: 100,
            overdraft_share: 0.0,
            cross_share: None,
            audit_interval_ms: 250,
            audit_alternate_ms: 0,
            call_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL the node; restart it on the same data after `duration_s`.
    Kill,
    /// SIGSTOP the node; SIGCONT after `duration_s`.
    Pause,
    /// Hold every message between `node` and `peer`, both ways, `delay_ms`
    /// (one way: a round trip between them gains twice it); no delay after
    /// `duration_s`. Goes through the cluster's link proxies.
    Delay,
    /// Cut the link between `node` and `peer`, both ways: open connections
    /// are closed, new ones refused; healed after `duration_s`. Goes
    /// through the cluster's link proxies.
    Cut,
    /// Cut one way only: the connections `node` opens to `peer` are closed
    /// and new ones refused, while `peer` still reaches `node` (a
    /// participant can still ask its coordinator, say).
    CutOneWay,
    /// Make the connections `node` opens to `peer` silent, one way: they
    /// stay open, every byte on them vanishes, new ones are never answered;
    /// only deadlines tell. At the heal the silent connections are closed.
    BlackHole,
    /// The coordinator (`c1` only) loses its disk: SIGKILL, its data
    /// directory deleted, restarted on an empty one after `duration_s`, as
    /// a new incarnation. What its predecessor left in doubt is orphaned on
    /// the participants; after the run the bench resolves the orphans as an
    /// operator would (`operator.rs`) and lists them in the report. 2PC and
    /// choreographed sagas only: an orchestrated saga's log is lost with
    /// the disk, and nothing resolves its half-done sagas yet.
    LoseDisk,
}

impl FaultKind {
    /// A fault of one link between two nodes, rather than of one node.
    pub fn is_link_fault(&self) -> bool {
        matches!(self, FaultKind::Delay | FaultKind::Cut | FaultKind::CutOneWay | FaultKind::BlackHole)
    }

    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Delay => "delay",
            FaultKind::Cut => "cut",
            FaultKind::CutOneWay => "cut-one-way",
            FaultKind::BlackHole => "black-hole",
            FaultKind::LoseDisk => "lose-disk",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub kind: FaultKind,
    /// "c1" (the coordinator) or "p1", "p2", ...; for a link fault, one end
    /// of the link.
    pub node: String,
    /// The other end of the link, for the link faults (`delay`, `cut`,
    /// `cut-one-way`, `black-hole`: required there, refused for `kill` and
    /// `pause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// One-way delay of the link, 1 to 10,000 ms; for `delay` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Seconds after the start of the measured run.
    pub at_s: f64,
    /// How long the fault lasts.
    pub duration_s: f64,
}

/// Most delay a `delay` fault may set, one way.
pub const FAULT_DELAY_MS_MAX: u64 = 10_000;

impl Fault {
    /// What the fault acts on, for the one-fault-at-a-time rule: the node,
    /// or the link (its two ends in order, so that c1-p1 and p1-c1 are one
    /// link).
    fn target(&self) -> String {
        match &self.peer {
            Some(peer) if self.kind.is_link_fault() => {
                let (a, b) = if self.node <= *peer { (&self.node, peer) } else { (peer, &self.node) };
                format!("link {a}-{b}")
            }
            _ => self.node.clone(),
        }
    }
}

impl Scenario {
    pub fn from_toml(text: &str, origin: &str) -> Result<Scenario, String> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
        scenario.validate().map_err(|e| format!("{origin}: {e}"))?;
        Ok(scenario)
    }

    /// True if a fault acts on a link: the cluster must then route its
    /// links through proxies.
    pub fn needs_proxied_links(&self) -> bool {
        self.faults.iter().any(|f| f.kind.is_link_fault())
    }

    pub fn load(path: &Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Scenario::from_toml(&text, &path.display().to_string())
    }

    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.protocols.is_empty() {
            return Err("protocols: name at least one".into());
        }
        if !(self.duration_s > 0.0 && self.duration_s <= 3_600.0) {
            return Err(format!("duration_s = {}: must be in (0, 3600]", self.duration_s));
        }
        let c = &self.cluster;
        if c.participants == 0 || c.participants > 16 {
            return Err(format!("cluster.participants = {}: must be 1 to 16", c.participants));
        }
        if c.accounts_per_participant < 2 || c.accounts_per_participant > 10_000_000 {
            return Err(format!(
                "cluster.accounts_per_participant = {}: must be 2 to 10,000,000",
                c.accounts_per_participant
            ));
        }
        if c.initial_balance <= 0 {
            return Err(format!("cluster.initial_balance = {}: must be positive", c.initial_balance));
        }
        let total = (c.initial_balance as i128) * (c.accounts_per_participant as i128) * (c.participants as i128);
        if total > i64::MAX as i128 / 2 {
            return Err("cluster: the total money overflows; lower initial_balance or the account count".into());
        }
        let w = &self.workload;
        if w.mode == LoopMode::Closed && (w.clients == 0 || w.clients > 4_096) {
            return Err(format!("workload.clients = {}: must be 1 to 4096", w.clients));
        }
        if w.mode == LoopMode::Open && !(w.rate_per_s > 0.0 && w.rate_per_s <= 1_000_000.0) {
            return Err(format!("workload.rate_per_s = {}: must be in (0, 1000000] in open loop", w.rate_per_s));
        }
        if w.in_flight_max == 0 {
            return Err("workload.in_flight_max: must be positive".into());
        }
        if w.skew == Skew::Zipf && !(w.zipf_exponent > 0.0 && w.zipf_exponent <= 5.0) {
            return Err(format!("workload.zipf_exponent = {}: must be in (0, 5]", w.zipf_exponent));
        }
        if w.amount_min <= 0 || w.amount_max < w.amount_min {
            return Err(format!(
                "workload.amount_min = {}, amount_max = {}: need 0 < amount_min <= amount_max",
                w.amount_min, w.amount_max
            ));
        }
        if !(0.0..=1.0).contains(&w.overdraft_share) {
            return Err(format!("workload.overdraft_share = {}: must be in [0, 1]", w.overdraft_share));
        }
        if let Some(share) = w.cross_share {
            if !(0.0..=1.0).contains(&share) {
                return Err(format!("workload.cross_share = {share}: must be in [0, 1]"));
            }
            if share > 0.0 && c.participants < 2 {
                return Err(format!(
                    "workload.cross_share = {share}: a transfer can cross participants only if there are two or more \
                     (cluster.participants = 1)"
                ));
            }
        }
        if self.protocols.contains(&Protocol::PostgresTwoPhase) && c.participants < 2 {
            return Err(
                "protocols: postgres-2pc needs cluster.participants >= 2 (every transfer crosses two servers)".into()
            );
        }
        if w.call_timeout_ms == 0 {
            return Err("workload.call_timeout_ms: must be positive".into());
        }
        if w.audit_alternate_ms > 0 {
            if w.audit_interval_ms == 0 {
                return Err(format!(
                    "workload.audit_alternate_ms = {}: alternates audits with none, so it needs audit_interval_ms > 0",
                    w.audit_alternate_ms
                ));
            }
            if !(AUDIT_ALTERNATE_MS_MIN..=AUDIT_ALTERNATE_MS_MAX).contains(&w.audit_alternate_ms) {
                return Err(format!(
                    "workload.audit_alternate_ms = {}: must be 0 (off) or {AUDIT_ALTERNATE_MS_MIN} to \
                     {AUDIT_ALTERNATE_MS_MAX}",
                    w.audit_alternate_ms
                ));
            }
            if (w.audit_alternate_ms * 5) as f64 > self.duration_s * 1_000.0 {
                return Err(format!(
                    "workload.audit_alternate_ms = {}: the run ({} s) must hold five windows (one to warm up, two \
                     with audits and two without)",
                    w.audit_alternate_ms, self.duration_s
                ));
            }
        }
        let valid_node = |name: &str| {
            name == "c1"
                || name
                    .strip_prefix('p')
                    .filter(|n| !n.starts_with('0') && !n.starts_with('+'))
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|n| n >= 1 && n <= c.participants)
        };
        for (i, fault) in self.faults.iter().enumerate() {
            let at = format!("fault[{i}]");
            let kind = fault.kind.name();
            if !valid_node(&fault.node) {
                return Err(format!("{at}.node = {:?}: must be \"c1\" or \"p1\"..\"p{}\"", fault.node, c.participants));
            }
            match (&fault.peer, fault.kind.is_link_fault()) {
                (None, true) => {
                    return Err(format!(
                        "{at}.peer: a {kind} fault needs the other end of the link, e.g. peer = \"p2\""
                    ))
                }
                (Some(peer), true) if !valid_node(peer) => {
                    return Err(format!("{at}.peer = {peer:?}: must be \"c1\" or \"p1\"..\"p{}\"", c.participants));
                }
                (Some(peer), true) if *peer == fault.node => {
                    return Err(format!("{at}.peer = {peer:?}: must differ from node; a link joins two nodes"));
                }
                (Some(peer), false) => {
                    return Err(format!(
                        "{at}.peer = {peer:?}: only link faults take a peer; a {kind} fault acts on its node"
                    ));
                }
                _ => {}
            }
            match (fault.delay_ms, fault.kind) {
                (None, FaultKind::Delay) => {
                    return Err(format!("{at}.delay_ms: a delay fault needs it (1 to {FAULT_DELAY_MS_MAX})"))
                }
                (Some(ms), FaultKind::Delay) if !(1..=FAULT_DELAY_MS_MAX).contains(&ms) => {
                    return Err(format!("{at}.delay_ms = {ms}: must be 1 to {FAULT_DELAY_MS_MAX}"));
                }
                (Some(ms), kind) if kind != FaultKind::Delay => {
                    return Err(format!("{at}.delay_ms = {ms}: only delay faults take it, not {}", kind.name()));
                }
                _ => {}
            }
            if fault.kind == FaultKind::LoseDisk {
                if fault.node != "c1" {
                    return Err(format!(
                        "{at}.node = {:?}: only the coordinator (\"c1\") can lose its disk; a participant's disk is its ledger",
                        fault.node
                    ));
                }
                if self.protocols.contains(&Protocol::Orchestrated) {
                    return Err(format!(
                        "{at}: a lose-disk fault cannot run with the orchestrated protocol (its saga log is lost with the disk and nothing resolves its half-done sagas yet); use protocols = [\"2pc\", \"choreographed\"]"
                    ));
                }
            }
            if !(fault.at_s >= 0.0 && fault.at_s < self.duration_s) {
                return Err(format!("{at}.at_s = {}: must be within the run (0 to {})", fault.at_s, self.duration_s));
            }
            if !(fault.duration_s > 0.0) {
                return Err(format!("{at}.duration_s = {}: must be positive", fault.duration_s));
            }
        }
        // One fault per node and one per link at a time; a node fault and a
        // fault of a link of that node may overlap.
        let mut windows: Vec<(String, f64, f64)> =
            self.faults.iter().map(|f| (f.target(), f.at_s, f.at_s + f.duration_s)).collect();
        windows.sort_by(|a, b| a.partial_cmp(b).unwrap());
        for pair in windows.windows(2) {
            if pair[0].0 == pair[1].0 && pair[1].1 < pair[0].2 {
                let what = if pair[0].0.starts_with("link ") { "link" } else { "node" };
                return Err(format!("faults on {} overlap in time; one fault per {what} at a time", pair[0].0));
            }
        }
        Ok(())
    }
}

/// Bounds of `workload.audit_alternate_ms`: a window shorter than the
/// lowest is mostly its uncounted start (`run::AuditAlternation`), one
/// longer than the highest no longer shares the machine's drift.
pub const AUDIT_ALTERNATE_MS_MIN: u64 = 200;
pub const AUDIT_ALTERNATE_MS_MAX: u64 = 60_000;

/// Names of the presets shipped in `bench/scenarios/`, with their text.
pub const PRESETS: &[(&str, &str)] = &[
    ("default", include_str!("../scenarios/default.toml")),
    ("no-faults", include_str!("../scenarios/no-faults.toml")),
    ("coordinator-crash", include_str!("../scenarios/coordinator-crash.toml")),
    ("pause", include_str!("../scenarios/pause.toml")),
    ("smoke", include_str!("../scenarios/smoke.toml")),
    ("partition", include_str!("../scenarios/partition.toml")),
    ("black-hole", include_str!("../scenarios/black-hole.toml")),
    ("lost-coordinator-disk", include_str!("../scenarios/lost-coordinator-disk.toml")),
    ("vs-postgres", include_str!("../scenarios/vs-postgres.toml")),
    ("vs-postgres-1", include_str!("../scenarios/vs-postgres-1.toml")),
    ("audit-cost", include_str!("../scenarios/audit-cost.toml")),
];

/// A preset by name, or a file by path.
pub fn resolve(name_or_path: &str) -> Result<Scenario, String> {
    if let Some((name, text)) = PRESETS.iter().find(|(name, _)| *name == name_or_path) {
        return Scenario::from_toml(text, &format!("preset {name}"));
    }
    let path = Path::new(name_or_path);
    if path.exists() {
        return Scenario::load(path);
    }
    Err(format!(
        "{name_or_path:?} is neither a preset ({}) nor a file",
        PRESETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_validates() {
        for (name, text) in PRESETS {
            Scenario::from_toml(text, name).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn protocols_parse_by_name_and_the_baselines_are_named_but_not_run_by_default() {
        for protocol in Protocol::ALL {
            assert_eq!(Protocol::parse(protocol.name()), Ok(*protocol));
            let text = format!("protocols = [\"{}\"]", protocol.name());
            assert_eq!(Scenario::from_toml(&text, "t").unwrap().protocols, [*protocol]);
        }
        assert!(Protocol::parse("postgres").unwrap_err().contains("postgres-local"));
        assert!(Scenario::default().protocols.iter().all(|p| !p.is_baseline()));
        let scenario = Scenario::from_toml("[workload]\ncross_share = 0.25", "t").unwrap();
        assert_eq!(scenario.workload.cross_share, Some(0.25));
        assert_eq!(Scenario::default().workload.cross_share, None, "unset keeps the independent draw");
        let vs = resolve("vs-postgres").unwrap();
        assert_eq!(
            vs.protocols,
            [
                Protocol::TwoPhaseCommit,
                Protocol::TwoPhaseCommitBatched,
                Protocol::TwoPhaseCommitClassic,
                Protocol::PostgresLocal,
                Protocol::PostgresTwoPhase
            ]
        );
        assert_eq!(vs.workload.cross_share, Some(1.0));
        assert!(vs.faults.is_empty());
    }

    #[test]
    fn an_empty_file_is_the_default_scenario() {
        assert_eq!(Scenario::from_toml("", "empty").unwrap(), Scenario::default());
    }

    fn rejected(text: &str) -> String {
        Scenario::from_toml(text, "test.toml").expect_err(text)
    }

    #[test]
    fn bad_scenarios_are_rejected_with_a_message_naming_the_problem() {
        assert!(rejected("durration_s = 5").contains("durration_s"), "unknown fields are refused");
        assert!(rejected("duration_s = -1").contains("duration_s"));
        assert!(rejected("protocols = [\"3pc\"]").contains("3pc"));
        assert!(rejected("protocols = []").contains("protocols"));
        assert!(rejected("[workload]\nclients = 0").contains("clients"));
        assert!(rejected("[workload]\namount_min = 10\namount_max = 5").contains("amount_max"));
        assert!(rejected("[workload]\noverdraft_share = 1.5").contains("overdraft_share"));
        assert!(rejected("[workload]\nmode = \"sideways\"").contains("sideways"));
        assert!(rejected("[cluster]\nparticipants = 0").contains("participants"));
        assert!(rejected("[workload]\ncross_share = 1.5").contains("workload.cross_share = 1.5"));
        assert!(rejected("[workload]\ncross_share = -0.1").contains("workload.cross_share"));
        let message = rejected("[cluster]\nparticipants = 1\n[workload]\ncross_share = 0.5");
        assert!(message.contains("workload.cross_share") && message.contains("participants"), "{message}");
        let message = rejected("protocols = [\"postgres-2pc\"]\n[cluster]\nparticipants = 1");
        assert!(message.contains("postgres-2pc") && message.contains("participants"), "{message}");
        let message = rejected("protocols = [\"postgres\"]");
        assert!(message.contains("postgres"), "{message}");
        let fault = |body: &str| format!("duration_s = 10\n[[fault]]\n{body}");
        assert!(rejected(&fault("kind = \"kill\"\nnode = \"p9\"\nat_s = 1\nduration_s = 1")).contains("p9"));
        assert!(rejected(&fault("kind = \"kill\"\nnode = \"p1\"\nat_s = 11\nduration_s = 1")).contains("at_s"));
        assert!(rejected(&fault("kind = \"explode\"\nnode = \"p1\"\nat_s = 1\nduration_s = 1")).contains("explode"));
        assert!(rejected(&fault("kind = \"kill\"\nnode = \"p1\"\nat_s = 1")).contains("duration_s"));
        let overlapping = "duration_s = 10\n[[fault]]\nkind = \"kill\"\nnode = \"p1\"\nat_s = 1\nduration_s = 3\n[[fault]]\nkind = \"pause\"\nnode = \"p1\"\nat_s = 2\nduration_s = 1";
        assert!(rejected(overlapping).contains("overlap"));
        // Only the coordinator loses its disk, and not under orchestrated sagas.
        let lose = "kind = \"lose-disk\"\nat_s = 1\nduration_s = 1";
        let on_p1 = format!("protocols = [\"2pc\"]\n{}", fault(&format!("node = \"p1\"\n{lose}")));
        assert!(rejected(&on_p1).contains("only the coordinator"));
        let with_sagas = format!("protocols = [\"orchestrated\"]\n{}", fault(&format!("node = \"c1\"\n{lose}")));
        assert!(rejected(&with_sagas).contains("orchestrated"));
        let fine = format!("protocols = [\"2pc\"]\n{}", fault(&format!("node = \"c1\"\n{lose}")));
        assert_eq!(Scenario::from_toml(&fine, "test.toml").unwrap().faults[0].kind, FaultKind::LoseDisk);

        // Link faults: peer and delay_ms.
        let link = |kind: &str, extra: &str| {
            fault(&format!("kind = \"{kind}\"\nnode = \"c1\"\n{extra}at_s = 1\nduration_s = 1"))
        };
        let message = rejected(&link("cut", ""));
        assert!(message.contains("fault[0].peer") && message.contains("needs"), "{message}");
        let message = rejected(&link("delay", "delay_ms = 20\n"));
        assert!(message.contains("fault[0].peer") && message.contains("needs"), "{message}");
        let message = rejected(&link("cut", "peer = \"p9\"\n"));
        assert!(message.contains("peer") && message.contains("p9"), "{message}");
        let message = rejected(&link("cut", "peer = \"p01\"\n"));
        assert!(message.contains("peer") && message.contains("p01"), "{message}");
        let message = rejected(&link("cut", "peer = \"c1\"\n"));
        assert!(message.contains("peer") && message.contains("differ"), "{message}");
        let message = rejected(&link("kill", "peer = \"p1\"\n"));
        assert!(message.contains("peer") && message.contains("kill"), "{message}");
        let message = rejected(&link("pause", "peer = \"p1\"\n"));
        assert!(message.contains("peer") && message.contains("pause"), "{message}");
        let message = rejected(&link("delay", "peer = \"p1\"\n"));
        assert!(message.contains("delay_ms") && message.contains("needs"), "{message}");
        let message = rejected(&link("delay", "peer = \"p1\"\ndelay_ms = 0\n"));
        assert!(message.contains("delay_ms = 0") && message.contains("10000"), "{message}");
        let message = rejected(&link("delay", "peer = \"p1\"\ndelay_ms = 10001\n"));
        assert!(message.contains("delay_ms = 10001"), "{message}");
        let message = rejected(&link("delay", "peer = \"p1\"\ndelay_ms = -5\n"));
        assert!(message.contains("delay_ms"), "{message}");
        let message = rejected(&link("cut", "peer = \"p1\"\ndelay_ms = 20\n"));
        assert!(message.contains("delay_ms") && message.contains("cut"), "{message}");
        let message = rejected(&link("kill", "delay_ms = 20\n"));
        assert!(message.contains("delay_ms") && message.contains("kill"), "{message}");
        let message = rejected(&link("reroute", "peer = \"p1\"\n"));
        assert!(message.contains("reroute"), "{message}");

        // One fault per link at a time, whichever end is named first.
        let two = |first: &str, second: &str| {
            format!("duration_s = 10\n[[fault]]\n{first}\nat_s = 1\nduration_s = 3\n[[fault]]\n{second}\nat_s = 2\nduration_s = 1")
        };
        let message = rejected(&two(
            "kind = \"delay\"\nnode = \"c1\"\npeer = \"p1\"\ndelay_ms = 20",
            "kind = \"cut\"\nnode = \"p1\"\npeer = \"c1\"",
        ));
        assert!(message.contains("overlap") && message.contains("link c1-p1"), "{message}");
        // Different links, or a node fault and a fault of one of its links,
        // may overlap.
        let fine = [
            two("kind = \"cut\"\nnode = \"c1\"\npeer = \"p1\"", "kind = \"cut\"\nnode = \"p1\"\npeer = \"p2\""),
            two("kind = \"cut\"\nnode = \"c1\"\npeer = \"p1\"", "kind = \"kill\"\nnode = \"p1\""),
            two("kind = \"pause\"\nnode = \"p1\"", "kind = \"delay\"\nnode = \"p1\"\npeer = \"p2\"\ndelay_ms = 5"),
        ];
        for text in fine {
            let scenario = Scenario::from_toml(&text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
            assert!(scenario.needs_proxied_links());
        }
        assert!(!Scenario::from_toml(&fault("kind = \"kill\"\nnode = \"p1\"\nat_s = 1\nduration_s = 1"), "t")
            .unwrap()
            .needs_proxied_links());
        assert!(rejected("this is not toml").contains("test.toml"));

        // Alternating audits need audits, a window in bounds, and room.
        let alternate = |interval: u64, window: u64| {
            format!("duration_s = 8\n[workload]\naudit_interval_ms = {interval}\naudit_alternate_ms = {window}")
        };
        let message = rejected(&alternate(0, 1_000));
        assert!(message.contains("audit_alternate_ms") && message.contains("audit_interval_ms"), "{message}");
        assert!(rejected(&alternate(50, 100)).contains("200 to 60000"));
        assert!(rejected(&alternate(50, 60_001)).contains("200 to 60000"));
        assert!(rejected(&alternate(50, 1_601)).contains("five windows"));
        let fine = Scenario::from_toml(&alternate(50, 1_600), "test.toml").unwrap();
        assert_eq!(fine.workload.audit_alternate_ms, 1_600);
    }
}
