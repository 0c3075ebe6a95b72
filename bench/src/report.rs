//! What a run leaves behind: a table in the terminal, `results.json`, a
//! history file per protocol, plots (SVG, and PNG when a font is found) and
//! `report.md` that gathers them.

use crate::postgres::{BaselineInfo, Skipped};
use crate::run::ProtocolResult;
use crate::scenario::Scenario;
use plotters::prelude::*;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub scenario: Scenario,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix_s: u64,
    pub cores: usize,
    pub results: Vec<ProtocolResult>,
    /// How each PostgreSQL baseline that ran was set up.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub baselines: Vec<BaselineInfo>,
    /// Baselines that could not run, and why (they do not fail the run).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
}

impl RunReport {
    pub fn passed(&self) -> bool {
        self.results.iter().all(|r| r.passed())
    }
}

fn ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// The table a person reads at a glance.
pub fn table(report: &RunReport) -> String {
    let mut out = String::new();
    let s = &report.scenario;
    let _ = writeln!(
        out,
        "scenario {}: {} | {} s per protocol, {:?} loop, {} clients, {} participants x {} accounts, seed {}{}",
        s.name,
        s.description,
        s.duration_s,
        s.workload.mode,
        s.workload.clients,
        s.cluster.participants,
        s.cluster.accounts_per_participant,
        s.seed,
        s.workload.cross_share.map(|c| format!(", cross share {c}")).unwrap_or_default()
    );
    // The calibration of the first tandem protocol: a baseline has no gRPC
    // round trip and no floor.
    if let Some(first) = report.results.iter().find(|r| !r.protocol.is_baseline()) {
        let _ = writeln!(
            out,
            "calibration: fsync p50 {:.0} us, gRPC round trip p50 {:.0} us (latency floors below use these); \
             two fsyncs at once on this disk (two participants preparing) p50 {:.0} us",
            first.calibration.fsync_p50_us, first.calibration.rtt_p50_us, first.calibration.fsync_pair_p50_us
        );
    } else if let Some(first) = report.results.first() {
        let _ = writeln!(
            out,
            "calibration: fsync p50 {:.0} us; two fsyncs at once on this disk p50 {:.0} us",
            first.calibration.fsync_p50_us, first.calibration.fsync_pair_p50_us
        );
    }
    let _ = writeln!(out);
    let header = [
        "protocol",
        "commits/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "floor ms",
        "p50/floor",
        "aborted",
        "unknown",
        "audits wrong",
        "in-doubt max",
        "recovery",
        "invariants",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in &report.results {
        let aborted: u64 = r.outcomes.iter().filter(|(k, _)| k.starts_with("aborted")).map(|(_, v)| v).sum();
        let unknown: u64 =
            r.outcomes.iter().filter(|(k, _)| *k == "timed_out" || *k == "unknown").map(|(_, v)| v).sum();
        let recovery = r
            .faults
            .iter()
            .map(|f| f.recovery_ms.map(|ms| format!("{ms:.0} ms")).unwrap_or_else(|| "never".into()))
            .collect::<Vec<_>>()
            .join(",");
        rows.push(vec![
            r.protocol.to_string(),
            format!("{:.0}", r.commits_per_s),
            ms(r.latency.p50_ms),
            ms(r.latency.p90_ms),
            ms(r.latency.p99_ms),
            ms(r.latency.p999_ms),
            ms(r.latency.max_ms),
            if r.protocol.is_baseline() { "-".into() } else { ms(r.floor_ms) },
            if r.protocol.is_baseline() {
                "-".into()
            } else {
                format!("{:.2}", if r.floor_ms > 0.0 { r.latency.p50_ms / r.floor_ms } else { 0.0 })
            },
            aborted.to_string(),
            unknown.to_string(),
            format!("{}/{}", r.audits.wrong_total, r.audits.reads),
            format!("{} ms", r.in_doubt.max_ms),
            if recovery.is_empty() { "-".into() } else { recovery },
            if r.passed() { "OK".into() } else { "VIOLATED".into() },
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|c| rows.iter().map(|row| row[c].len()).max().unwrap_or(0)).collect();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(
                |(c, cell)| {
                    if c == 0 {
                        format!("{cell:<w$}", w = widths[c])
                    } else {
                        format!("{cell:>w$}", w = widths[c])
                    }
                },
            )
            .collect();
        let _ = writeln!(out, "{}", line.join("  "));
        if i == 0 {
            let _ = writeln!(out, "{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
        }
    }
    // Every outcome the clients heard, as they heard it (an unknown one is
    // asked again after the run; the history file holds what it came to).
    let _ = writeln!(out);
    let name_width = report.results.iter().map(|r| r.protocol.name().len()).max().unwrap_or(0).max(13);
    for r in &report.results {
        let outcomes: Vec<String> = r
            .outcomes
            .iter()
            .filter(|(_, count)| **count > 0)
            .map(|(outcome, count)| format!("{} {count}", outcome.replace('_', " ")))
            .collect();
        let _ = writeln!(out, "{:>name_width$}: {}", r.protocol.to_string(), outcomes.join(", "));
    }
    efficiency_table(&mut out, report);
    audit_alternation_lines(&mut out, report, name_width);
    if !report.baselines.is_empty() || !report.skipped.is_empty() {
        let _ = writeln!(out);
    }
    for b in &report.baselines {
        let _ = writeln!(
            out,
            "{:>name_width$}: PostgreSQL {}, {} server{} ({}), {} session{}, fsync and synchronous_commit on; \
             PostgreSQL round trip p50 {:.0} us{}",
            b.protocol.to_string(),
            b.server_version,
            b.servers,
            if b.servers == 1 { "" } else { "s" },
            if b.servers == 1 {
                "every account in one database".to_string()
            } else {
                "one per participant".to_string()
            },
            b.sessions,
            if b.sessions == 1 { "" } else { "s" },
            b.round_trip_p50_us,
            if b.finished_after_run > 0 {
                format!("; {} prepared transactions finished after the run", b.finished_after_run)
            } else {
                String::new()
            }
        );
        for note in &b.notes {
            let _ = writeln!(out, "{:>name_width$}  {note}", "");
        }
    }
    for skipped in &report.skipped {
        let _ = writeln!(out, "{:>name_width$}: SKIPPED: {}", skipped.protocol.to_string(), skipped.reason);
    }
    let with_faults: Vec<&ProtocolResult> = report.results.iter().filter(|r| !r.faults.is_empty()).collect();
    if !with_faults.is_empty() {
        let _ = writeln!(out);
        for r in with_faults {
            let _ = writeln!(
                out,
                "{:>name_width$}: p50/p99 {} / {} ms outside fault windows, {} / {} ms inside ({} commits inside)",
                r.protocol.to_string(),
                ms(r.latency_outside_faults.p50_ms),
                ms(r.latency_outside_faults.p99_ms),
                ms(r.latency_in_faults.p50_ms),
                ms(r.latency_in_faults.p99_ms),
                r.latency_in_faults.count
            );
            if r.faults.len() > 1 {
                for fault in &r.faults {
                    let _ = writeln!(
                        out,
                        "{:>name_width$}  {}-{:.1} s: p50/p99 {} / {} ms ({} commits)",
                        "",
                        fault_label(fault),
                        fault.healed_at_s,
                        ms(fault.latency.p50_ms),
                        ms(fault.latency.p99_ms),
                        fault.latency.count
                    );
                }
            }
            for fault in r.faults.iter().filter(|f| f.error.is_some()) {
                let error = fault.error.as_deref().unwrap_or_default();
                let _ = writeln!(out, "{:>name_width$}  fault {} s FAILED: {error}", "", fault_label(fault));
            }
        }
    }
    for r in &report.results {
        for violation in r.check.violations.iter().chain(r.crashed_nodes.iter()) {
            let _ = writeln!(out, "VIOLATION {}: {violation}", r.protocol);
        }
        if r.protocol.is_two_phase_commit() && r.audits.wrong_total > 0 {
            let _ = writeln!(out, "VIOLATION 2pc: {} audits saw a wrong total", r.audits.wrong_total);
        }
    }
    // What an operator had to decide: orphans of a coordinator that lost
    // its disk, and any heuristic decision a coordinator later contradicted.
    for r in &report.results {
        if r.faults.iter().any(|f| f.kind == crate::scenario::FaultKind::LoseDisk) {
            let _ = writeln!(
                out,
                "{}: {} orphans of the lost coordinator incarnation, resolved by the operator:",
                r.protocol,
                r.orphans.len()
            );
            for line in r.orphans.iter().take(ORPHAN_LINES_MAX) {
                let _ = writeln!(out, "  {line}");
            }
            if r.orphans.len() > ORPHAN_LINES_MAX {
                let _ = writeln!(out, "  ... and {} more (results.json)", r.orphans.len() - ORPHAN_LINES_MAX);
            }
        }
        for mixed in r.check.heuristic.iter().filter(|h| h.contains("MIXED")) {
            let _ = writeln!(out, "HEURISTIC {}: {mixed}", r.protocol);
        }
    }
    out
}

/// With alternating audits: each protocol's commits/s in the windows with
/// audits against those without, measured in the same run.
fn audit_alternation_lines(out: &mut String, report: &RunReport, name_width: usize) {
    let measured: Vec<(&ProtocolResult, &crate::run::AuditAlternation)> =
        report.results.iter().filter_map(|r| Some((r, r.audit_alternation.as_ref()?))).collect();
    let Some((_, first)) = measured.first() else { return };
    let _ = writeln!(
        out,
        "\naudits every {} ms in half of the {} ms windows (after one to warm up: with, without, without, with, \
         ...; the first {} ms of each not counted); commits/s:",
        report.scenario.workload.audit_interval_ms,
        first.window_ms,
        first.window_ms / 5
    );
    for (r, a) in measured {
        let _ = writeln!(
            out,
            "{:>name_width$}: {:.0} with audits ({} windows, {} audits), {:.0} without ({} windows): {:.3} of it \
             (within each pair of windows: median {:.2}, {:.2} to {:.2})",
            r.protocol.to_string(),
            a.with_audits_per_s,
            a.windows_with_audits,
            r.audits.reads,
            a.without_audits_per_s,
            a.windows_without,
            a.ratio,
            a.pair_ratio_median,
            a.pair_ratio_min,
            a.pair_ratio_max
        );
    }
}

/// Per committed transfer, what the nodes' counters show (`counters.rs`):
/// the protocol's efficiency, measured.
fn efficiency_table(out: &mut String, report: &RunReport) {
    let rows: Vec<&ProtocolResult> = report.results.iter().filter(|r| !r.protocol.is_baseline()).collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nper committed transfer, from the nodes' counters (cpu: user and system time of the processes; batch: mean requests per call):");
    let header = [
        "protocol",
        "fsyncs c1",
        "fsyncs parts",
        "calls",
        "bytes written",
        "cpu c1 us",
        "cpu parts us",
        "store group",
        "batch",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in rows {
        match (&r.efficiency, &r.efficiency_missing) {
            (Some(e), _) => {
                let batches: Vec<String> = [
                    ("prepare", e.prepare_batch_mean),
                    ("commit", e.commit_batch_mean),
                    ("1pc", e.one_phase_batch_mean),
                    ("step", e.step_batch_mean),
                ]
                .iter()
                .filter(|(_, mean)| *mean > 0.0)
                .map(|(queue, mean)| format!("{queue} {mean:.1}"))
                .collect();
                table.push(vec![
                    r.protocol.to_string(),
                    format!("{:.2}", e.coordinator_fsyncs),
                    format!("{:.2}", e.participant_fsyncs),
                    format!("{:.2}", e.calls),
                    format!("{:.0}", e.bytes_written),
                    format!("{:.0}", e.coordinator_cpu_us),
                    format!("{:.0}", e.participant_cpu_us),
                    format!("{:.1}", e.store_group_mean),
                    if batches.is_empty() { "-".into() } else { batches.join(", ") },
                ]);
            }
            (None, why) => {
                let mut row = vec![r.protocol.to_string()];
                row.extend((1..header.len()).map(|_| "-".to_string()));
                row[header.len() - 1] = format!("not measured: {}", why.as_deref().unwrap_or("no counters"));
                table.push(row);
            }
        }
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0)).collect();
    for (i, row) in table.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, cell)| {
                if c == 0 || c == header.len() - 1 {
                    format!("{cell:<w$}", w = widths[c])
                } else {
                    format!("{cell:>w$}", w = widths[c])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        if i == 0 {
            let _ = writeln!(out, "{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  "));
        }
    }
}

/// Most orphan lines the table lists (all are in `results.json`).
const ORPHAN_LINES_MAX: usize = 20;

/// "kill p1 at 3.0": what a fault line starts with.
fn fault_label(fault: &crate::run::AppliedFault) -> String {
    format!("{} {} at {:.1}", fault.kind.name(), fault.node, fault.at_s)
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

type DrawResult = Result<(), String>;

fn latency_over_time<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    report: &RunReport,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let duration = report.scenario.duration_s;
    let max = report.results.iter().flat_map(|r| r.timeline.iter().map(|p| p.p99_ms)).fold(1.0_f64, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption("latency of committed transfers over time (p50 solid, p99 thin; faults shaded)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..duration, (0.05..max).log_scale())
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("seconds").y_desc("ms (log)").draw().map_err(|e| e.to_string())?;
    for fault in &report.scenario.faults {
        let end = (fault.at_s + fault.duration_s).min(duration);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(fault.at_s, 0.05), (end, max)],
                RGBColor(255, 200, 120).mix(0.35).filled(),
            )))
            .map_err(|e| e.to_string())?;
    }
    for (i, r) in report.results.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        // A bucket without commits has no latency: the line breaks there
        // rather than drawing a slope across the gap.
        let p50 = segments(r.timeline.iter().map(|p| (p.t_s, p.p50_ms)));
        let p99 = segments(r.timeline.iter().map(|p| (p.t_s, p.p99_ms)));
        for (k, segment) in p50.into_iter().enumerate() {
            let drawn = chart
                .draw_series(LineSeries::new(segment, color.stroke_width(2)).point_size(1))
                .map_err(|e| e.to_string())?;
            if k == 0 {
                drawn
                    .label(format!("{} p50", r.protocol))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
        }
        for segment in p99 {
            chart.draw_series(LineSeries::new(segment, color.mix(0.6).stroke_width(1))).map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Splits a series at its zero values into runs of positive ones.
fn segments(points: impl Iterator<Item = (f64, f64)>) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for (x, y) in points {
        if y > 0.0 {
            out.last_mut().expect("never empty").push((x, y));
        } else if !out.last().expect("never empty").is_empty() {
            out.push(Vec::new());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

fn throughput_over_time<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    report: &RunReport,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let duration = report.scenario.duration_s;
    let max =
        report.results.iter().flat_map(|r| r.timeline.iter().map(|p| p.commits_per_s)).fold(10.0_f64, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption("commits per second over time (100 ms buckets; faults shaded)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..duration, 0.0..max)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("seconds").y_desc("commits/s").draw().map_err(|e| e.to_string())?;
    for fault in &report.scenario.faults {
        let end = (fault.at_s + fault.duration_s).min(duration);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(fault.at_s, 0.0), (end, max)],
                RGBColor(255, 200, 120).mix(0.35).filled(),
            )))
            .map_err(|e| e.to_string())?;
    }
    for (i, r) in report.results.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(r.timeline.iter().map(|p| (p.t_s, p.commits_per_s)), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(r.protocol.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn percentiles<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, report: &RunReport) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let labels = ["p50", "p90", "p99", "p99.9", "max"];
    let max = report.results.iter().map(|r| r.latency.max_ms).fold(1.0_f64, f64::max) * 2.0;
    let n = report.results.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption("latency percentiles of committed transfers, with each protocol's floor (dashed)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..labels.len() as f64, (0.05..max).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(labels.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < labels.len() {
                labels[i].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("ms (log)")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, r) in report.results.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let values = [r.latency.p50_ms, r.latency.p90_ms, r.latency.p99_ms, r.latency.p999_ms, r.latency.max_ms];
        let width = 0.8 / n as f64;
        chart
            .draw_series(values.iter().enumerate().map(|(k, v)| {
                let x0 = k as f64 + 0.1 + i as f64 * width;
                Rectangle::new([(x0, 0.05), (x0 + width * 0.9, v.max(0.05))], color.filled())
            }))
            .map_err(|e| e.to_string())?
            .label(if r.protocol.is_baseline() {
                format!("{} (a baseline: no floor)", r.protocol)
            } else {
                format!("{} (floor {:.2} ms)", r.protocol, r.floor_ms)
            })
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        if r.protocol.is_baseline() {
            continue;
        }
        let floor = r.floor_ms.max(0.05);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, floor), (labels.len() as f64, floor)],
                6,
                4,
                color.stroke_width(1),
            ))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Registers a system TrueType font for the plots' text (plotters lays text
/// out with it, for SVG too); `false` if none is found.
fn register_png_font() -> bool {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REGISTERED.get_or_init(|| {
        for path in [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
        ] {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Writes one plot as SVG (always) and PNG (when a font is available).
macro_rules! plot {
    ($dir:expr, $name:expr, $report:expr, $draw:ident) => {{
        let svg_path = $dir.join(format!("{}.svg", $name));
        if !register_png_font() {
            return Err("no TrueType font found to lay out the plots' text; install fonts-dejavu-core".into());
        }
        $draw(SVGBackend::new(&svg_path, (1000, 500)).into_drawing_area(), $report)?;
        let png_path = $dir.join(format!("{}.png", $name));
        let png_written = register_png_font()
            && $draw(BitMapBackend::new(&png_path, (1000, 500)).into_drawing_area(), $report).is_ok();
        (svg_path, png_written.then_some(png_path))
    }};
}

/// Writes `results.json`, the plots and `report.md` into `dir`; returns the
/// report's path.
pub fn write_all(report: &RunReport, dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("results.json"), json).map_err(|e| e.to_string())?;
    let plots = [
        ("latency-over-time", plot!(dir, "latency-over-time", report, latency_over_time)),
        ("throughput-over-time", plot!(dir, "throughput-over-time", report, throughput_over_time)),
        ("percentiles", plot!(dir, "percentiles", report, percentiles)),
    ];
    let mut md = String::new();
    let _ = writeln!(md, "# tandem bench: {}\n", report.scenario.name);
    let _ = writeln!(md, "{}\n", report.scenario.description);
    let _ =
        writeln!(md, "Result: **{}**\n", if report.passed() { "every invariant held" } else { "INVARIANTS VIOLATED" });
    let _ = writeln!(md, "```\n{}```\n", table(report));
    for (name, (svg, png)) in &plots {
        let file = png.as_ref().unwrap_or(svg).file_name().unwrap().to_string_lossy().to_string();
        let _ = writeln!(md, "## {name}\n\n![{name}]({file})\n");
        let _ = writeln!(md, "SVG: [{0}]({0})\n", svg.file_name().unwrap().to_string_lossy());
    }
    let _ = writeln!(md, "## How to read this\n");
    let _ = writeln!(
        md,
        "- *floor* is the latency the protocol's critical path cannot beat on this machine, from the calibration \
         measured in the same run (2PC by parallel commit: two gRPC round trips and one fsync; classic 2PC: two and two; each saga: three and three). \
         *p50/floor* near 1 means the implementation adds little on top of the hardware. On a local cluster the \
         participants share one disk, so their parallel prepare fsyncs cost the calibration's \"two fsyncs at \
         once\", more than one: that difference is the machine's, not the protocol's.\n\
         - *unknown* counts calls that failed or timed out during faults; after the run each is asked again with \
         its idempotency key and gets its real outcome, so the invariant check accounts for every cent.\n\
         - *audits wrong* counts audit reads whose total differed from the money in the system: 2PC must show 0.\n\
         - With `workload.audit_alternate_ms`, audits run in half of the windows only (after one to warm up, \
         in blocks of with, without, without, with, so that a steady drift weighs on both alike), and the \
         commits/s of the windows with audits are set against those without, in the same run.\n\
         - *in-doubt max* is the longest a participant held a prepared transfer without knowing its outcome.\n\
         - *recovery* is how long after the fault healed the throughput came back to half its earlier level.\n\
         - Per-operation records are in the history files; everything above is in `results.json`."
    );
    if report.results.iter().any(|r| r.protocol.is_baseline()) || !report.skipped.is_empty() {
        let _ = writeln!(
            md,
            "- `postgres-local` and `postgres-2pc` are baselines, not tandem: the same transfers (same accounts, \
             seed, clients and overdrafts) on PostgreSQL servers the bench started on throw-away data, with fsync \
             and synchronous_commit on. `postgres-local` holds every account in one database, one local \
             transaction per transfer; `postgres-2pc` runs one server per participant and every transfer crosses \
             two of them (PREPARE TRANSACTION on both, then COMMIT PREPARED), with the bench as a coordinator \
             that logs no decision. Their floor is \"-\": PostgreSQL's critical path is not tandem's. Their \
             audits read every server's total at once, one snapshot per server."
        );
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md).map_err(|e| e.to_string())?;
    Ok(path)
}
