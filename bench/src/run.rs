//! One bench run: for each protocol of the scenario, a fresh local cluster,
//! calibration, the workload with audit readers and an in-doubt sampler
//! beside it, the fault schedule, then the invariant check.

use crate::calibrate::{self, Calibration};
use crate::check::{self, CheckReport};
use crate::counters::{self, Efficiency};
use crate::operator;
use crate::scenario::{FaultKind, Protocol, Scenario};
use crate::workload::{self, Recorder, Target, BUCKET_MS};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::cluster::{Cluster, ClusterSpec, NodeRef};
use tandem::pb;
use tandem::tls::Security;

/// A fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct AppliedFault {
    pub kind: FaultKind,
    pub node: String,
    /// The other end of the link, for a link fault.
    pub peer: Option<String>,
    /// The one-way delay set, for a delay fault.
    pub delay_ms: Option<u64>,
    pub at_s: f64,
    pub healed_at_s: f64,
    /// From the heal until throughput is back to half its level before the
    /// fault; `None` if it never came back within the run.
    pub recovery_ms: Option<f64>,
    pub error: Option<String>,
    /// Latency of the transfers committed that started inside this window.
    pub latency: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditStats {
    pub reads: u64,
    /// Reads whose total differed from the money in the system.
    pub wrong_total: u64,
    /// Reads that failed (unavailable, timed out).
    pub failed: u64,
}

/// What audits cost, from one run whose audits alternate
/// (`workload.audit_alternate_ms`): the commits/s of the windows with
/// audits against those without.
///
/// The first window warms the cluster up: no audits, not counted. Then the
/// windows go in blocks of four, with audits, without, without, with
/// (ABBA), so that a steady drift of the machine over the run weighs on
/// both kinds alike, where plain alternation would charge it to one. A
/// committed transfer counts in the window its answer came in; the first
/// fifth of every window is left out (a transfer answered then may have
/// waited under the window before it, and an audit begun at the end of
/// that window may still be reading), and so is a last window the run
/// does not fill.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditAlternation {
    pub window_ms: u64,
    pub windows_with_audits: u64,
    pub windows_without: u64,
    pub with_audits_per_s: f64,
    pub without_audits_per_s: f64,
    /// `with_audits_per_s / without_audits_per_s`: 1 when audits cost
    /// nothing.
    pub ratio: f64,
    /// The same ratio within each pair of neighbouring windows (AB, then
    /// BA): the lowest, the median and the highest, to show how much the
    /// machine moved within the run (a second the host took away shows in
    /// one pair, and the median is the figure it moves least).
    pub pair_ratio_min: f64,
    pub pair_ratio_median: f64,
    pub pair_ratio_max: f64,
}

/// Whether audits run `elapsed_ms` into the run: always without
/// alternation (`alternate_ms` 0); else not in the first window (the
/// warm-up), then in the first and last window of each block of four
/// (see [`AuditAlternation`]).
pub(crate) fn audits_run_at(elapsed_ms: u64, alternate_ms: u64) -> bool {
    if alternate_ms == 0 {
        return true;
    }
    let window = elapsed_ms / alternate_ms;
    window > 0 && matches!((window - 1) % 4, 0 | 3)
}

/// When an audit reader reads: every `audit_interval_ms` of the
/// scenario's workload, in the windows [`audits_run_at`] opens, until the
/// run stops.
pub(crate) struct AuditSchedule {
    interval: Duration,
    alternate_ms: u64,
    start: Instant,
    stop: Arc<AtomicBool>,
}

impl AuditSchedule {
    /// `start`: when the run's workload began.
    pub(crate) fn of(workload: &crate::scenario::WorkloadSection, start: Instant, stop: Arc<AtomicBool>) -> Self {
        AuditSchedule {
            interval: Duration::from_millis(workload.audit_interval_ms),
            alternate_ms: workload.audit_alternate_ms,
            start,
            stop,
        }
    }

    /// Waits until the next audit is due; `false` once the run stopped.
    pub(crate) async fn next(&self) -> bool {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            tokio::time::sleep(self.interval).await;
            if audits_run_at(self.start.elapsed().as_millis() as u64, self.alternate_ms) {
                return true;
            }
        }
    }
}

/// The commits/s with audits against without ([`AuditAlternation`]);
/// `None` without alternation or without a whole window of each kind.
pub(crate) fn audit_alternation(
    history: &[workload::HistoryEntry],
    alternate_ms: u64,
    duration_s: f64,
) -> Option<AuditAlternation> {
    if alternate_ms == 0 {
        return None;
    }
    let window_us = alternate_ms * 1_000;
    let uncounted_us = window_us / 5;
    // The whole windows after the warm-up.
    let windows = ((duration_s * 1e6) as u64 / window_us).saturating_sub(1);
    let audited = |window: u64| audits_run_at((window + 1) * alternate_ms, alternate_ms);
    let windows_with_audits = (0..windows).filter(|w| audited(*w)).count() as u64;
    let windows_without = windows - windows_with_audits;
    if windows_with_audits == 0 || windows_without == 0 {
        return None;
    }
    let mut commits = vec![0u64; windows as usize];
    for entry in history.iter().filter(|e| e.outcome == workload::OpOutcome::Committed) {
        let Some(window) = (entry.end_us / window_us).checked_sub(1) else { continue };
        if window >= windows || entry.end_us % window_us < uncounted_us {
            continue;
        }
        commits[window as usize] += 1;
    }
    let (mut with_audits, mut without) = (0u64, 0u64);
    for (window, count) in commits.iter().enumerate() {
        if audited(window as u64) {
            with_audits += count;
        } else {
            without += count;
        }
    }
    // AB, BA, AB, ...: the pair's audited window first or second.
    let mut pair_ratios: Vec<f64> = commits
        .chunks_exact(2)
        .enumerate()
        .map(|(pair, counts)| {
            let (a, b) = if pair % 2 == 0 { (counts[0], counts[1]) } else { (counts[1], counts[0]) };
            if b > 0 {
                a as f64 / b as f64
            } else {
                0.0
            }
        })
        .collect();
    pair_ratios.sort_by(f64::total_cmp);
    let pair_ratio_median = match pair_ratios.len() {
        0 => 0.0,
        n if n % 2 == 1 => pair_ratios[n / 2],
        n => (pair_ratios[n / 2 - 1] + pair_ratios[n / 2]) / 2.0,
    };
    let counted_s = (window_us - uncounted_us) as f64 / 1e6;
    let with_audits_per_s = with_audits as f64 / (windows_with_audits as f64 * counted_s);
    let without_audits_per_s = without as f64 / (windows_without as f64 * counted_s);
    Some(AuditAlternation {
        window_ms: alternate_ms,
        windows_with_audits,
        windows_without,
        with_audits_per_s,
        without_audits_per_s,
        ratio: if without_audits_per_s > 0.0 { with_audits_per_s / without_audits_per_s } else { 0.0 },
        pair_ratio_min: pair_ratios.first().copied().unwrap_or(0.0),
        pair_ratio_median,
        pair_ratio_max: pair_ratios.last().copied().unwrap_or(0.0),
    })
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct InDoubtStats {
    /// Longest time a transaction was seen prepared without a decision.
    pub max_ms: u64,
    /// Most prepared transactions seen at once over all participants.
    pub max_count: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(histogram: &hdrhistogram::Histogram<u64>) -> Percentiles {
        let q = |q: f64| if histogram.is_empty() { 0.0 } else { histogram.value_at_quantile(q) as f64 / 1_000.0 };
        Percentiles {
            count: histogram.len(),
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: if histogram.is_empty() { 0.0 } else { histogram.max() as f64 / 1_000.0 },
        }
    }
}

/// Per bucket of the run: commits/s and latency percentiles.
#[derive(Debug, Clone, Serialize)]
pub struct TimelinePoint {
    pub t_s: f64,
    pub commits_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProtocolResult {
    pub protocol: Protocol,
    pub duration_s: f64,
    pub calibration: Calibration,
    /// The latency floor of this protocol's critical path on this machine.
    pub floor_ms: f64,
    pub commits_per_s: f64,
    pub outcomes: std::collections::BTreeMap<String, u64>,
    pub latency: Percentiles,
    pub latency_in_faults: Percentiles,
    pub latency_outside_faults: Percentiles,
    pub timeline: Vec<TimelinePoint>,
    pub faults: Vec<AppliedFault>,
    pub audits: AuditStats,
    /// With alternating audits: their cost in this run.
    pub audit_alternation: Option<AuditAlternation>,
    pub in_doubt: InDoubtStats,
    pub check: CheckReport,
    /// After a lose-disk fault: each orphan the operator resolved, how and
    /// why (`operator.rs`), or why it could not be.
    pub orphans: Vec<String>,
    pub crashed_nodes: Vec<String>,
    pub history_file: PathBuf,
    /// Per committed transfer, from the nodes' counters (`counters.rs`);
    /// `None` for a baseline, or with `efficiency_missing` saying why not.
    pub efficiency: Option<Efficiency>,
    pub efficiency_missing: Option<String>,
}

impl ProtocolResult {
    pub fn passed(&self) -> bool {
        self.check.passed()
            && self.crashed_nodes.is_empty()
            // A fault that could not be applied (a node that would not
            // restart) means the run did not test what it says.
            && self.faults.iter().all(|f| f.error.is_none())
            && (!self.protocol.is_two_phase_commit() || self.audits.wrong_total == 0)
    }
}

fn node_ref(name: &str) -> NodeRef {
    if name == "c1" {
        NodeRef::Coordinator
    } else {
        NodeRef::Participant(name[1..].parse::<usize>().expect("validated node name") - 1)
    }
}

/// Runs the fault schedule against the cluster; heals whatever is still
/// broken at the end of the run.
async fn run_faults(mut cluster: Cluster, scenario: Scenario, start: Instant) -> (Cluster, Vec<AppliedFault>) {
    let mut events: Vec<(f64, usize, bool)> = Vec::new();
    for (i, fault) in scenario.faults.iter().enumerate() {
        events.push((fault.at_s, i, true));
        events.push(((fault.at_s + fault.duration_s).min(scenario.duration_s), i, false));
    }
    // In time order; at the same instant, ends before beginnings, so that a
    // fault that starts when another on the same node or link ends is not
    // healed at once.
    events.sort_by(|a, b| (a.0, a.2, a.1).partial_cmp(&(b.0, b.2, b.1)).unwrap());
    let mut applied: Vec<AppliedFault> = scenario
        .faults
        .iter()
        .map(|f| AppliedFault {
            kind: f.kind,
            node: f.node.clone(),
            peer: f.peer.clone(),
            delay_ms: f.delay_ms,
            at_s: f.at_s,
            healed_at_s: 0.0,
            recovery_ms: None,
            error: None,
            latency: Percentiles::default(),
        })
        .collect();
    for (at_s, i, begins) in events {
        tokio::time::sleep_until((start + Duration::from_secs_f64(at_s)).into()).await;
        let fault = &scenario.faults[i];
        let node = node_ref(&fault.node);
        // Validated: a link fault names its peer.
        let peer = || node_ref(fault.peer.as_deref().expect("a link fault has a peer"));
        let now_s = start.elapsed().as_secs_f64();
        match (fault.kind, begins) {
            (FaultKind::Kill, true) => {
                cluster.kill(node).await;
                applied[i].at_s = now_s;
            }
            (FaultKind::LoseDisk, true) => {
                if let Err(error) = cluster.lose_disk(node).await {
                    applied[i].error = Some(format!("the disk could not be lost: {error}"));
                }
                applied[i].at_s = now_s;
            }
            (FaultKind::Kill | FaultKind::LoseDisk, false) => {
                if let Err(error) = cluster.restart(node).await {
                    applied[i].error = Some(format!("restart failed: {error}"));
                }
                applied[i].healed_at_s = start.elapsed().as_secs_f64();
            }
            (FaultKind::Pause, true) => {
                cluster.node(node).pause();
                applied[i].at_s = now_s;
            }
            (FaultKind::Pause, false) => {
                cluster.node(node).resume();
                applied[i].healed_at_s = now_s;
            }
            (FaultKind::Delay, true) => {
                let delay_ms = fault.delay_ms.expect("a delay fault has delay_ms");
                cluster.set_link_delay(node, peer(), Duration::from_millis(delay_ms));
                applied[i].at_s = now_s;
            }
            (FaultKind::Cut, true) => {
                cluster.cut_link(node, peer());
                applied[i].at_s = now_s;
            }
            (FaultKind::CutOneWay, true) => {
                cluster.cut_link_one_way(node, peer());
                applied[i].at_s = now_s;
            }
            (FaultKind::BlackHole, true) => {
                cluster.black_hole_link(node, peer());
                applied[i].at_s = now_s;
            }
            (FaultKind::Delay | FaultKind::Cut | FaultKind::CutOneWay | FaultKind::BlackHole, false) => {
                cluster.heal_link(node, peer());
                applied[i].healed_at_s = now_s;
            }
        }
    }
    (cluster, applied)
}

/// Reads every balance through the coordinator's audit, again and again,
/// and counts totals that differ from the money in the system.
async fn audit_reader(cluster_url: String, who: Security, expected: i64, schedule: AuditSchedule) -> AuditStats {
    let mut stats = AuditStats::default();
    let Ok(channel) = tandem::server::channel(&cluster_url, &who) else { return stats };
    let mut client = pb::coordinator_client::CoordinatorClient::new(channel);
    while schedule.next().await {
        let mut request = tonic::Request::new(pb::AuditRequest { include_accounts: false });
        request.set_timeout(Duration::from_secs(3));
        match client.audit(request).await {
            Ok(response) => {
                stats.reads += 1;
                let audit = response.get_ref();
                // What heuristic-mixed decisions left in the wrong accounts
                // is still the bank's money (see AuditResponse).
                if audit.total_posted + audit.total_suspense - audit.total_heuristic_excess != expected {
                    stats.wrong_total += 1;
                }
            }
            Err(_) => stats.failed += 1,
        }
    }
    stats
}

/// Samples the participants' prepared transfers.
async fn in_doubt_sampler(urls: Vec<String>, who: Security, stop: Arc<AtomicBool>) -> InDoubtStats {
    let mut stats = InDoubtStats::default();
    let clients: Vec<_> = urls
        .iter()
        .filter_map(|url| tandem::server::channel(url, &who).ok())
        .map(pb::participant_client::ParticipantClient::new)
        .collect();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut count = 0;
        for client in &clients {
            let mut request = tonic::Request::new(pb::ListPreparedRequest { limit: 1_000 });
            request.set_timeout(Duration::from_millis(500));
            if let Ok(response) = client.clone().list_prepared(request).await {
                let listed = response.into_inner();
                count += listed.total;
                // Those still in doubt, and the longest one already decided
                // (one that was in doubt across a restart is only seen so:
                // the node is down while it waits).
                let still_in_doubt = listed.prepared.iter().map(|p| p.prepared_for_ms).max().unwrap_or(0);
                stats.max_ms = stats.max_ms.max(still_in_doubt).max(listed.longest_in_doubt_ms);
            }
        }
        stats.max_count = stats.max_count.max(count);
    }
    stats
}

/// Latency percentiles of the committed transfers whose start (µs into the
/// run) `started` accepts.
pub(crate) fn committed_latency(history: &[workload::HistoryEntry], started: impl Fn(u64) -> bool) -> Percentiles {
    let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("valid bounds");
    for entry in history.iter().filter(|e| e.outcome == workload::OpOutcome::Committed && started(e.start_us)) {
        histogram.saturating_record((entry.end_us - entry.start_us).max(1));
    }
    Percentiles::of(&histogram)
}

/// Commits and latency per bucket of [`BUCKET_MS`], from the history.
pub(crate) fn timeline(recorder: &Recorder, duration_s: f64) -> Vec<TimelinePoint> {
    let buckets = ((duration_s * 1_000.0) / BUCKET_MS as f64).ceil() as usize;
    let mut histograms: Vec<hdrhistogram::Histogram<u64>> = (0..buckets)
        .map(|_| hdrhistogram::Histogram::new_with_bounds(1, 120_000_000, 2).expect("valid bounds"))
        .collect();
    for entry in recorder.history.iter().filter(|e| e.outcome == workload::OpOutcome::Committed) {
        // By completion: a commit counts in the throughput when it is
        // answered (one that hangs through a fault counts after it).
        let bucket = (entry.end_us / 1_000 / BUCKET_MS) as usize;
        if let Some(histogram) = histograms.get_mut(bucket) {
            histogram.saturating_record((entry.end_us - entry.start_us).max(1));
        }
    }
    histograms
        .iter()
        .enumerate()
        .map(|(i, h)| TimelinePoint {
            t_s: (i as u64 * BUCKET_MS) as f64 / 1_000.0,
            commits_per_s: h.len() as f64 * 1_000.0 / BUCKET_MS as f64,
            p50_ms: if h.is_empty() { 0.0 } else { h.value_at_quantile(0.5) as f64 / 1_000.0 },
            p99_ms: if h.is_empty() { 0.0 } else { h.value_at_quantile(0.99) as f64 / 1_000.0 },
        })
        .collect()
}

/// How long after `healed_at_s` the throughput came back to half of its
/// level before `fault_at_s`.
fn recovery_ms(timeline: &[TimelinePoint], fault_at_s: f64, healed_at_s: f64) -> Option<f64> {
    let before: Vec<f64> = timeline
        .iter()
        .filter(|p| p.t_s >= 0.5 && p.t_s + BUCKET_MS as f64 / 1_000.0 <= fault_at_s)
        .map(|p| p.commits_per_s)
        .collect();
    if before.is_empty() {
        return None;
    }
    let level = before.iter().sum::<f64>() / before.len() as f64;
    timeline
        .iter()
        .find(|p| p.t_s >= healed_at_s - BUCKET_MS as f64 / 1_000.0 && p.commits_per_s >= level / 2.0)
        .map(|p| ((p.t_s - healed_at_s).max(0.0)) * 1_000.0)
}

pub struct RunOptions {
    pub out_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub keep_data: bool,
    pub progress: bool,
    /// Plaintext links, no certificates (to measure what TLS costs).
    pub insecure: bool,
    /// Nodes serve their metrics (the per-transfer table needs them).
    pub metrics: bool,
}

pub async fn run_protocol(
    scenario: &Scenario,
    protocol: Protocol,
    options: &RunOptions,
) -> Result<ProtocolResult, String> {
    let data_dir = options.out_dir.join(format!("cluster-{protocol}"));
    let _ = std::fs::remove_dir_all(&data_dir);
    let mut spec = ClusterSpec::new(options.bin_dir.clone(), data_dir.clone());
    spec.participants = scenario.cluster.participants;
    spec.accounts_per_participant = scenario.cluster.accounts_per_participant;
    spec.initial_balance = scenario.cluster.initial_balance;
    spec.coordinator_args = scenario.cluster.coordinator_args.clone();
    if protocol == Protocol::TwoPhaseCommitClassic {
        spec.coordinator_args.extend(["--commit-protocol".to_string(), "classic".to_string()]);
    }
    spec.participant_args = scenario.cluster.participant_args.clone();
    spec.proxied_links = scenario.needs_proxied_links();
    spec.insecure = options.insecure;
    spec.metrics = options.metrics;
    let cluster = Cluster::start(spec).await.map_err(|e| format!("{protocol}: the cluster did not start: {e}"))?;

    let (fsync_p50_us, fsync_pair_p50_us) = calibrate::fsync_p50_us(&options.out_dir)?;
    let calibration = Calibration {
        fsync_p50_us,
        fsync_pair_p50_us,
        rtt_p50_us: calibrate::rtt_p50_us(
            &mut cluster.participant_client(0, cluster.client()).map_err(|e| e.to_string())?,
            0,
        )
        .await?,
    };
    let floor_ms = calibration.floor_us(protocol) / 1_000.0;

    let participant_urls: Vec<String> = cluster.participants.iter().map(|p| p.url()).collect();
    let target = Target::new(
        &cluster.coordinator.url(),
        &participant_urls,
        cluster.spec.accounts_per_participant,
        scenario.workload.clients,
        cluster.client(),
    )
    .map_err(|e| e.to_string())?;
    let target = if protocol == Protocol::TwoPhaseCommitBatched {
        target.batched(Duration::from_millis(scenario.workload.call_timeout_ms))
    } else {
        target
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(in_doubt_sampler(
        cluster.participants.iter().map(|p| p.url()).collect(),
        cluster.operator().clone(),
        stop.clone(),
    ));
    let progress = Arc::new(AtomicUsize::new(0));
    let bar = options.progress.then(|| progress_bar(protocol, scenario.duration_s, progress.clone()));

    let mut cluster = cluster;
    let counted_before = counters::snapshot(&mut cluster).await;
    let start = Instant::now();
    let auditor = (scenario.workload.audit_interval_ms > 0).then(|| {
        tokio::spawn(audit_reader(
            cluster.coordinator.url(),
            cluster.client().clone(),
            cluster.spec.total_money(),
            AuditSchedule::of(&scenario.workload, start, stop.clone()),
        ))
    });
    let faults = tokio::spawn(run_faults(cluster, scenario.clone(), start));
    let mut recorder = workload::drive(scenario, protocol, &target, start, progress).await;
    let (mut cluster, mut applied) = faults.await.map_err(|e| format!("the fault task failed: {e}"))?;
    let counted_after = counters::snapshot(&mut cluster).await;
    counted_after.write(&options.out_dir, protocol.name())?;
    stop.store(true, Ordering::Relaxed);
    if let Some(bar) = bar {
        let _ = bar.await;
    }
    let audits = match auditor {
        Some(task) => task.await.unwrap_or_default(),
        None => AuditStats::default(),
    };
    let in_doubt = sampler.await.unwrap_or_default();
    let crashed_nodes: Vec<String> =
        cluster.crashed().into_iter().map(|(node, status)| format!("{node} exited on its own: {status}")).collect();

    // Latency inside and outside the fault windows (as they were applied),
    // from what the clients saw, before the check resolves the unknown
    // outcomes.
    let windows_us: Vec<(u64, u64)> =
        applied.iter().map(|f| ((f.at_s * 1e6) as u64, (f.healed_at_s * 1e6) as u64)).collect();
    let inside = |start_us: u64, (from, to): (u64, u64)| start_us >= from && start_us < to;
    let latency_in_faults = committed_latency(&recorder.history, |s| windows_us.iter().any(|w| inside(s, *w)));
    let latency_outside_faults = committed_latency(&recorder.history, |s| !windows_us.iter().any(|w| inside(s, *w)));
    let audit_alternation =
        audit_alternation(&recorder.history, scenario.workload.audit_alternate_ms, scenario.duration_s);
    for (fault, window) in applied.iter_mut().zip(&windows_us) {
        fault.latency = committed_latency(&recorder.history, |s| inside(s, *window));
    }
    // A coordinator that lost its disk left orphans: an operator resolves
    // them before the check (which waits for nothing to be held).
    let mut orphans = Vec::new();
    let mut orphan_failure = None;
    if scenario.faults.iter().any(|f| f.kind == FaultKind::LoseDisk) {
        let resolved = match check::LedgerView::of(&cluster) {
            Ok(view) => match operator::wait_for_orphans(&view, Duration::from_secs(30)).await {
                Ok(()) => operator::resolve_orphans(&view, &recorder.history).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(format!("cannot reach the cluster: {e}")),
        };
        match resolved {
            Ok(lines) => orphans = lines,
            Err(e) => orphan_failure = Some(format!("orphans not resolved: {e}")),
        }
    }
    let mut check = check::check(&cluster, &mut recorder.history).await;
    check.violations.extend(orphan_failure);
    cluster.stop().await;

    let timeline = timeline(&recorder, scenario.duration_s);
    for fault in &mut applied {
        fault.recovery_ms = recovery_ms(&timeline, fault.at_s, fault.healed_at_s);
    }
    let history_file = options.out_dir.join(format!("history-{protocol}.jsonl"));
    write_history(&history_file, &recorder)?;
    if !options.keep_data {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    let committed = recorder.outcomes.get(&workload::OpOutcome::Committed).copied().unwrap_or(0);
    let (efficiency, efficiency_missing) = match counters::efficiency(&counted_before, &counted_after, committed) {
        Ok(efficiency) => (Some(efficiency), None),
        Err(why) => (None, Some(why)),
    };
    Ok(ProtocolResult {
        protocol,
        duration_s: scenario.duration_s,
        calibration,
        floor_ms,
        commits_per_s: committed as f64 / scenario.duration_s,
        outcomes: recorder
            .outcomes
            .iter()
            .map(|(k, v)| (serde_json::to_value(k).unwrap().as_str().unwrap().to_string(), *v))
            .collect(),
        latency: Percentiles::of(&recorder.overall),
        latency_in_faults,
        latency_outside_faults,
        timeline,
        faults: applied,
        audits,
        audit_alternation,
        in_doubt,
        check,
        orphans,
        crashed_nodes,
        history_file,
        efficiency,
        efficiency_missing,
    })
}

pub(crate) fn write_history(path: &Path, recorder: &Recorder) -> Result<(), String> {
    use std::io::Write;
    let file = std::fs::File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for entry in &recorder.history {
        serde_json::to_writer(&mut out, entry).map_err(|e| e.to_string())?;
        out.write_all(b"\n").map_err(|e| e.to_string())?;
    }
    out.flush().map_err(|e| e.to_string())
}

/// A progress line on stderr, updated twice a second, while the run lasts.
/// The task ends with the run.
pub(crate) fn progress_bar(protocol: Protocol, duration_s: f64, ops: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    use std::io::IsTerminal;
    let interactive = std::io::stderr().is_terminal();
    let started = Instant::now();
    let task = tokio::spawn(async move {
        let mut last_ops = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let elapsed = started.elapsed().as_secs_f64().min(duration_s);
            let done = ops.load(Ordering::Relaxed);
            let width = 30;
            let filled = ((elapsed / duration_s) * width as f64) as usize;
            let line = format!(
                "{protocol:>13} [{}{}] {elapsed:4.1}/{duration_s:.0} s  {done} ops  {:.0} ops/s",
                "#".repeat(filled),
                "-".repeat(width - filled.min(width)),
                (done - last_ops) as f64 * 2.0
            );
            last_ops = done;
            if interactive {
                eprint!("\r{line}\x1b[K");
            } else if (elapsed * 2.0) as u64 % 4 == 0 {
                eprintln!("{line}");
            }
            if elapsed >= duration_s {
                if interactive {
                    eprintln!();
                }
                return;
            }
        }
    });
    task
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Protocol;
    use crate::workload::{HistoryEntry, OpOutcome};

    fn answered_at(end_us: u64, outcome: OpOutcome) -> HistoryEntry {
        HistoryEntry {
            protocol: Protocol::TwoPhaseCommit,
            client: 0,
            key: String::new(),
            from: 0,
            to: 1,
            amount: 1,
            start_us: end_us.saturating_sub(500),
            end_us,
            outcome,
            txn_id: String::new(),
            detail: String::new(),
        }
    }

    #[test]
    fn audits_run_after_a_warm_up_window_in_blocks_of_with_without_without_with() {
        let audited: Vec<bool> = (0..10).map(|window| audits_run_at(window * 1_000 + 500, 1_000)).collect();
        assert_eq!(audited, [false, true, false, false, true, true, false, false, true, true]);
        assert!(!audits_run_at(999, 1_000) && audits_run_at(1_000, 1_000) && audits_run_at(1_999, 1_000));
        assert!(!audits_run_at(2_000, 1_000));
        assert!((0..10_000).step_by(7).all(|elapsed_ms| audits_run_at(elapsed_ms, 0)), "0: audits throughout");
    }

    #[test]
    fn the_alternation_counts_commits_by_the_window_of_their_answer_past_its_first_fifth() {
        // 1 s windows over 5.5 s: the warm-up, then A B B A, the half
        // window at the end not counted.
        let mut history = Vec::new();
        for window in 0..6u64 {
            // Past the first fifth: 30 commits in a window with audits, 40
            // without (the rate the alternation must find; the warm-up's
            // and the last half window's never count), and one aborted
            // transfer that never counts.
            let counted = if audits_run_at(window * 1_000, 1_000) { 30 } else { 40 };
            for i in 0..counted {
                history.push(answered_at(window * 1_000_000 + 200_000 + i * 10_000, OpOutcome::Committed));
            }
            history.push(answered_at(window * 1_000_000 + 500_000, OpOutcome::AbortedInsufficientFunds));
            // In the first fifth: left out, whatever its kind.
            for i in 0..50 {
                history.push(answered_at(window * 1_000_000 + i * 1_000, OpOutcome::Committed));
            }
        }
        let alternation = audit_alternation(&history, 1_000, 5.5).unwrap();
        assert_eq!((alternation.windows_with_audits, alternation.windows_without), (2, 2));
        // 30 commits in 0.8 counted seconds of each window with audits.
        assert!((alternation.with_audits_per_s - 37.5).abs() < 1e-9, "{alternation:?}");
        assert!((alternation.without_audits_per_s - 50.0).abs() < 1e-9, "{alternation:?}");
        assert!((alternation.ratio - 0.75).abs() < 1e-9, "{alternation:?}");
        assert_eq!(
            (alternation.pair_ratio_min, alternation.pair_ratio_median, alternation.pair_ratio_max),
            (0.75, 0.75, 0.75)
        );

        // A window without audits that ran slow (20 commits in the second
        // pair's first window) shows in the spread.
        history.retain(|e| !(e.end_us >= 3_200_000 && e.end_us < 3_400_000));
        let alternation = audit_alternation(&history, 1_000, 5.5).unwrap();
        let spread = (alternation.pair_ratio_min, alternation.pair_ratio_median, alternation.pair_ratio_max);
        assert_eq!(spread, (0.75, 1.125, 1.5), "{alternation:?}");

        assert_eq!(audit_alternation(&history, 0, 5.5), None, "no alternation");
        assert_eq!(audit_alternation(&history, 1_000, 2.5), None, "no whole window without audits");
    }
}
