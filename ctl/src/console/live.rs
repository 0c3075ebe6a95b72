//! The console's live figures: commits per second, the latency of
//! committed transfers (p50, p99) and the transactions in flight, from the
//! coordinator's Prometheus endpoint (`docs/metrics.md`).
//!
//! A task scrapes it every second ([`scrape_every_second`]) and keeps the
//! last [`SNAPSHOTS_KEPT`] scrapes; the figures are over the window they
//! span (about five seconds): the rate is the counter's increase over the
//! window's duration, and a quantile is read from the histogram's bucket
//! increases as Prometheus's `histogram_quantile` reads it (linear within
//! the bucket the rank falls in; a rank in the `+Inf` bucket is shown as
//! the largest finite bound). A counter that goes down means the
//! coordinator restarted: the window starts again. Nothing here can grow:
//! the snapshots are a bounded queue, a scrape at most 16 MiB.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem::metrics::{parse, scrape, sum, Sample};
use tandem::tls::Security;

/// Scrapes kept: the window of the figures is their span.
pub const SNAPSHOTS_KEPT: usize = 6;

/// How often the coordinator is scraped.
pub const SCRAPE_INTERVAL_MS: u64 = 1_000;

/// The deadline of one scrape.
const SCRAPE_TIMEOUT_MS: u64 = 2_000;

const COMMITTED: &str = "tandem_transactions_committed_total";
const DURATION_BUCKET: &str = "tandem_transaction_duration_seconds_bucket";
const IN_FLIGHT: &str = "tandem_transactions_in_flight";

/// What one scrape said.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub at: Instant,
    /// Transactions committed since the coordinator started.
    pub committed: f64,
    /// Committed transfers' durations: (upper bound in seconds, count at
    /// or below it), ascending, `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
    pub in_flight: f64,
}

impl Snapshot {
    pub fn from_samples(at: Instant, samples: &[Sample]) -> Snapshot {
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for sample in samples.iter().filter(|s| s.name == DURATION_BUCKET && s.labels.contains("outcome=\"committed\""))
        {
            let Some(bound) = label(&sample.labels, "le").and_then(|le| match le {
                "+Inf" => Some(f64::INFINITY),
                le => le.parse::<f64>().ok(),
            }) else {
                continue;
            };
            // Summed over the other labels (how it committed).
            match buckets.iter_mut().find(|(b, _)| *b == bound) {
                Some((_, count)) => *count += sample.value,
                None => buckets.push((bound, sample.value)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Snapshot { at, committed: sum(samples, COMMITTED, &[]), buckets, in_flight: sum(samples, IN_FLIGHT, &[]) }
    }
}

/// The value of `key` in a sample's labels (`a="x",le="0.5"`).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let end = labels[start..].find('"')? + start;
    Some(&labels[start..end])
}

/// The `q` quantile (0 to 1) of the observations between two cumulative
/// bucket lists, in seconds; `None` when nothing was observed.
pub fn quantile(q: f64, before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let increase: Vec<(f64, f64)> = after
        .iter()
        .map(|(bound, count)| {
            let old = before.iter().find(|(b, _)| b == bound).map_or(0.0, |(_, c)| *c);
            (*bound, (count - old).max(0.0))
        })
        .collect();
    let total = increase.last().map(|(_, count)| *count)?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (bound, count) in &increase {
        if *count >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            if *count <= below {
                return Some(*bound);
            }
            return Some(lower + (bound - lower) * (rank - below) / (count - below));
        }
        (lower, below) = (*bound, *count);
    }
    Some(lower)
}

/// The figures the overview shows, as text for a person (the same text in
/// the page and in `/live.json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figures {
    pub commits_per_s: String,
    pub p50: String,
    pub p99: String,
    pub in_flight: String,
    /// What the figures cover, or why there are none.
    pub note: String,
}

#[derive(Default)]
struct State {
    snapshots: VecDeque<Snapshot>,
    last_error: Option<String>,
}

pub struct Live {
    configured: bool,
    state: Mutex<State>,
}

impl Live {
    pub fn new(configured: bool) -> Live {
        Live { configured, state: Mutex::new(State::default()) }
    }

    /// Keeps a scrape; a counter that went down (a restart) starts the
    /// window again.
    pub fn record(&self, snapshot: Snapshot) {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.snapshots.back().is_some_and(|last| snapshot.committed < last.committed) {
            state.snapshots.clear();
        }
        if state.snapshots.len() == SNAPSHOTS_KEPT {
            state.snapshots.pop_front();
        }
        state.snapshots.push_back(snapshot);
        state.last_error = None;
    }

    pub fn failed(&self, error: String) {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).last_error = Some(error);
    }

    pub fn figures(&self) -> Figures {
        let none = |note: String| Figures {
            commits_per_s: "-".into(),
            p50: "-".into(),
            p99: "-".into(),
            in_flight: "-".into(),
            note,
        };
        if !self.configured {
            return none("no live figures: start the console with --coordinator-metrics URL".into());
        }
        let state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(error) = &state.last_error {
            return none(format!("the coordinator's metrics do not answer: {error}"));
        }
        let (Some(first), Some(last)) = (state.snapshots.front(), state.snapshots.back()) else {
            return none("waiting for the first scrape of the coordinator's metrics".into());
        };
        let in_flight = format!("{}", last.in_flight);
        let window_s = last.at.duration_since(first.at).as_secs_f64();
        if state.snapshots.len() < 2 || window_s <= 0.0 {
            return Figures { in_flight, ..none("waiting for a second scrape".into()) };
        }
        let ms = |seconds: Option<f64>| seconds.map_or("-".to_string(), |s| format!("{:.2} ms", s * 1_000.0));
        Figures {
            commits_per_s: format!("{:.1}", (last.committed - first.committed).max(0.0) / window_s),
            p50: ms(quantile(0.5, &first.buckets, &last.buckets)),
            p99: ms(quantile(0.99, &first.buckets, &last.buckets)),
            in_flight,
            note: format!("over the last {window_s:.1} s"),
        }
    }
}

impl Figures {
    pub fn to_json(&self) -> String {
        // Five strings: always serializes.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

/// Scrapes the coordinator's metrics at `addr` every second, for as long
/// as the console runs.
pub async fn scrape_every_second(live: Arc<Live>, addr: String, security: Security) {
    let mut every = tokio::time::interval(Duration::from_millis(SCRAPE_INTERVAL_MS));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match scrape(&addr, &security, Duration::from_millis(SCRAPE_TIMEOUT_MS)).await {
            Ok(text) => live.record(Snapshot::from_samples(Instant::now(), &parse(&text))),
            Err(error) => live.failed(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "\
# TYPE tandem_transactions_committed_total counter
tandem_transactions_committed_total{how=\"parallel\"} 90
tandem_transactions_committed_total{how=\"one_phase\"} 10
tandem_transactions_in_flight 3
tandem_transaction_duration_seconds_bucket{outcome=\"committed\",how=\"parallel\",le=\"0.001\"} 40
tandem_transaction_duration_seconds_bucket{outcome=\"committed\",how=\"parallel\",le=\"0.002\"} 80
tandem_transaction_duration_seconds_bucket{outcome=\"committed\",how=\"parallel\",le=\"+Inf\"} 90
tandem_transaction_duration_seconds_bucket{outcome=\"committed\",how=\"one_phase\",le=\"0.001\"} 10
tandem_transaction_duration_seconds_bucket{outcome=\"committed\",how=\"one_phase\",le=\"0.002\"} 10
tandem_transaction_duration_seconds_bucket{outcome=\"committed\",how=\"one_phase\",le=\"+Inf\"} 10
tandem_transaction_duration_seconds_bucket{outcome=\"aborted\",how=\"parallel\",le=\"0.001\"} 500
";

    #[test]
    fn a_scrape_sums_the_committed_counters_and_buckets() {
        let snapshot = Snapshot::from_samples(Instant::now(), &parse(SCRAPE));
        assert_eq!(snapshot.committed, 100.0);
        assert_eq!(snapshot.in_flight, 3.0);
        assert_eq!(snapshot.buckets, vec![(0.001, 50.0), (0.002, 90.0), (f64::INFINITY, 100.0)]);
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_prometheus() {
        let after = [(0.001, 50.0), (0.002, 90.0), (f64::INFINITY, 100.0)];
        // Rank 50 of 100: the top of the first bucket.
        assert_eq!(quantile(0.5, &[], &after), Some(0.001));
        // Rank 70: halfway through the second.
        let p70 = quantile(0.7, &[], &after).unwrap();
        assert!((p70 - 0.0015).abs() < 1e-12, "{p70}");
        // Rank 99 is in +Inf: the largest finite bound.
        assert_eq!(quantile(0.99, &[], &after), Some(0.002));
        // Only the increase counts.
        let before = [(0.001, 50.0), (0.002, 50.0), (f64::INFINITY, 50.0)];
        let p50 = quantile(0.5, &before, &after).unwrap();
        assert!(p50 > 0.001 && p50 < 0.002, "{p50}");
        assert_eq!(quantile(0.5, &after, &after), None);
        assert_eq!(quantile(0.5, &[], &[]), None);
    }

    #[test]
    fn figures_cover_the_window_and_a_restart_starts_it_again() {
        let live = Live::new(true);
        assert!(live.figures().note.contains("waiting"));
        let start = Instant::now();
        let at = |s: u64, committed: f64| Snapshot {
            at: start + Duration::from_secs(s),
            committed,
            buckets: vec![(0.001, committed), (f64::INFINITY, committed)],
            in_flight: 2.0,
        };
        live.record(at(0, 100.0));
        live.record(at(2, 300.0));
        let figures = live.figures();
        assert_eq!((figures.commits_per_s.as_str(), figures.in_flight.as_str()), ("100.0", "2"));
        assert_eq!(figures.p50, "0.50 ms");
        for s in 3..20 {
            live.record(at(s, 300.0 + 10.0 * s as f64));
        }
        assert_eq!(live.state.lock().unwrap().snapshots.len(), SNAPSHOTS_KEPT);
        assert_eq!(live.figures().commits_per_s, "10.0");
        live.record(at(21, 5.0));
        assert_eq!(live.state.lock().unwrap().snapshots.len(), 1, "a restart starts the window again");
        live.failed("refused".into());
        assert!(live.figures().note.contains("refused"));
        assert!(Live::new(false).figures().note.contains("--coordinator-metrics"));
    }
}
