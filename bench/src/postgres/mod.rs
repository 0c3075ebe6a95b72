//! Baselines: the bench's own workload against PostgreSQL, in the same run,
//! so that tandem is compared with what its users would pick instead.
//!
//! - `postgres-local`: every account in one table of one database; a
//!   transfer is one local transaction (the single database a bank would
//!   start with).
//! - `postgres-2pc`: one PostgreSQL server per participant, each holding
//!   that participant's accounts; a transfer debits on its source's server
//!   and credits on its target's, with PREPARE TRANSACTION on both and then
//!   COMMIT PREPARED (ROLLBACK PREPARED on a refusal). Every transfer
//!   crosses two servers, whatever the scenario's `cross_share` says: a
//!   transfer within one server would be a local transaction, which
//!   `postgres-local` already measures.
//!
//! Why two servers (two clusters) and not two databases of one server: two
//! databases of one server share one WAL and its group commit, so their two
//! PREPAREs would reach the disk in one flush. Two tandem participants each
//! flush their own log; two servers each flush their own WAL. That is the
//! honest analogue of two participants, on the same one disk as tandem's.
//!
//! The same workload: the same accounts (ids, count, initial balance), the
//! same seeded chooser (so with the same `cross_share` the same transfers
//! in the same order), the same clients and loop, overdrafts that must
//! abort (`UPDATE ... WHERE id = $2 AND balance >= $1` touching no row),
//! the same history entries and outcomes, audits while the workload runs
//! (each server's sum read at once; across two servers they are two
//! snapshots, and the report counts the totals that come out wrong), and
//! the same check at the end: every account's balance, read from
//! PostgreSQL, must equal its initial balance plus the committed transfers,
//! money must be conserved, and nothing may stay prepared.
//!
//! What differs, and is said where it shows: no faults (the scenario's
//! faults act on tandem's nodes; a baseline runs without them), no floor
//! (PostgreSQL's critical path is not tandem's: the report shows "-"), an
//! outcome the client did not learn cannot be asked again (no idempotency
//! record: the check reports it as a violation; without faults there is
//! none), and the 2PC coordinator is the bench, with no durable decision
//! log (see [`client`]).
//!
//! The bench starts the servers itself (see [`server`]) when PostgreSQL's
//! binaries are installed, and otherwise skips the baseline with the
//! reason; a skipped baseline does not fail the run.

pub mod client;
pub mod server;

use crate::calibrate::{self, Calibration};
use crate::check::CheckReport;
use crate::run::{self, AuditStats, InDoubtStats, Percentiles, ProtocolResult, RunOptions};
use crate::scenario::{LoopMode, Protocol, Scenario};
use crate::workload::{self, HistoryEntry, OpOutcome};
use client::PgClient;
use serde::Serialize;
use server::{Installation, Servers, Settings};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most sessions (connections to each server) a baseline opens; past it,
/// clients wait for a free one, as behind any connection pool.
pub const SESSIONS_MAX: usize = 256;
/// Connections beyond the sessions: set-up, audits, the in-doubt sampler,
/// the check.
const CONNECTIONS_SPARE: usize = 10;

/// How a baseline ran: what a reader needs to weigh its figures.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineInfo {
    pub protocol: Protocol,
    /// `SHOW server_version`.
    pub server_version: String,
    pub bin_dir: PathBuf,
    pub servers: usize,
    pub sessions: usize,
    /// p50 of `SELECT 1` (a prepared statement), one at a time: the
    /// PostgreSQL round trip on loopback, measured before the workload.
    pub round_trip_p50_us: f64,
    /// The share of transfers that crossed two servers (or participants).
    pub cross_share: Option<f64>,
    /// Prepared transactions finished after the run (a COMMIT PREPARED owed
    /// by a decision, or a ROLLBACK PREPARED of one never decided).
    pub finished_after_run: usize,
    pub notes: Vec<String>,
}

/// A baseline that did not run, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub protocol: Protocol,
    pub reason: String,
}

/// What the accounts look like on the servers: server `i` holds
/// `accounts` of participant `i`, or every account when there is one.
struct Layout {
    servers: usize,
    accounts_per_server: u64,
    accounts: u64,
    initial_balance: i64,
}

impl Layout {
    fn range(&self, server: usize) -> std::ops::Range<u64> {
        let first = server as u64 * self.accounts_per_server;
        first..(first + self.accounts_per_server).min(self.accounts)
    }

    fn total(&self) -> i64 {
        self.initial_balance * self.accounts as i64
    }
}

/// Runs `protocol` (a baseline) over the scenario's workload on fresh
/// PostgreSQL servers; `Err` when it must be skipped (no PostgreSQL, or it
/// cannot start), with the reason.
pub async fn run(
    scenario: &Scenario,
    protocol: Protocol,
    options: &RunOptions,
) -> Result<(ProtocolResult, BaselineInfo), Skipped> {
    assert!(protocol.is_baseline());
    let skip = |reason: String| Skipped { protocol, reason };
    let installation = Installation::find().map_err(skip)?;

    let mut scenario = scenario.clone();
    let mut notes = Vec::new();
    if protocol == Protocol::PostgresTwoPhase && scenario.workload.cross_share != Some(1.0) {
        notes.push(format!(
            "every transfer crosses two servers (the scenario's cross_share is {}; set it to 1 to compare like with like)",
            scenario.workload.cross_share.map(|s| s.to_string()).unwrap_or_else(|| "unset".into())
        ));
        scenario.workload.cross_share = Some(1.0);
    }
    if !scenario.faults.is_empty() {
        notes.push("the scenario's faults act on tandem's nodes; this baseline ran without them".into());
    }
    let per_participant = scenario.cluster.accounts_per_participant;
    let accounts = per_participant * scenario.cluster.participants as u64;
    let layout = match protocol {
        Protocol::PostgresTwoPhase => Layout {
            servers: scenario.cluster.participants,
            accounts_per_server: per_participant,
            accounts,
            initial_balance: scenario.cluster.initial_balance,
        },
        _ => Layout {
            servers: 1,
            accounts_per_server: accounts,
            accounts,
            initial_balance: scenario.cluster.initial_balance,
        },
    };
    let sessions = match scenario.workload.mode {
        LoopMode::Closed => scenario.workload.clients,
        LoopMode::Open => scenario.workload.in_flight_max,
    }
    .clamp(1, SESSIONS_MAX);
    match scenario.workload.mode {
        LoopMode::Closed if sessions < scenario.workload.clients => notes.push(format!(
            "{sessions} sessions for {} clients: a client waits for a free one (as behind a connection pool)",
            scenario.workload.clients
        )),
        LoopMode::Open => {
            notes.push(format!("open loop: {sessions} sessions; a transfer waits for a free one, inside its latency"))
        }
        LoopMode::Closed => {}
    }
    let settings = Settings {
        max_connections: sessions + CONNECTIONS_SPARE,
        max_prepared_transactions: if protocol == Protocol::PostgresTwoPhase {
            sessions + CONNECTIONS_SPARE
        } else {
            0
        },
    };
    eprintln!("{protocol}: starting {} PostgreSQL server(s) from {}", layout.servers, installation.bin_dir.display());
    let data_dir = options.out_dir.join(format!("cluster-{protocol}"));
    let mut servers = Servers::start(&installation, &data_dir, layout.servers, &settings)
        .await
        .map_err(|e| skip(format!("PostgreSQL did not start: {e}")))?;
    notes.extend(servers.notes.iter().cloned());
    let ports: Vec<u16> = servers.servers.iter().map(|s| s.port).collect();
    let prepared = async {
        let version = load_accounts(&ports, &layout).await?;
        let pool = PgClient::new(
            protocol,
            ports.clone(),
            layout.accounts_per_server,
            scenario.workload.call_timeout_ms,
            sessions,
        );
        pool.connect_all().await?;
        let round_trip = round_trip_p50_us(ports[0]).await?;
        Ok::<_, String>((version, pool, round_trip))
    };
    let (server_version, pool, round_trip_p50_us) = match prepared.await {
        Ok(prepared) => prepared,
        Err(error) => {
            servers.stop(options.keep_data).await;
            return Err(skip(format!("PostgreSQL started but the baseline could not be set up: {error}")));
        }
    };
    let calibration = match calibrate::fsync_p50_us(&options.out_dir) {
        Ok((fsync_p50_us, fsync_pair_p50_us)) => Calibration { fsync_p50_us, fsync_pair_p50_us, rtt_p50_us: 0.0 },
        Err(error) => {
            servers.stop(options.keep_data).await;
            return Err(skip(format!("the calibration failed: {error}")));
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let sampler =
        (protocol == Protocol::PostgresTwoPhase).then(|| tokio::spawn(in_doubt_sampler(ports.clone(), stop.clone())));
    let progress = Arc::new(AtomicUsize::new(0));
    let bar = options.progress.then(|| run::progress_bar(protocol, scenario.duration_s, progress.clone()));
    let start = Instant::now();
    let auditor = (scenario.workload.audit_interval_ms > 0).then(|| {
        tokio::spawn(audit_reader(
            ports.clone(),
            layout.total(),
            run::AuditSchedule::of(&scenario.workload, start, stop.clone()),
        ))
    });
    let mut recorder = workload::drive_with(&scenario, protocol, |_| pool.clone(), start, progress).await;
    stop.store(true, Ordering::Relaxed);
    if let Some(bar) = bar {
        let _ = bar.await;
    }
    let audits = match auditor {
        Some(task) => task.await.unwrap_or_default(),
        None => AuditStats::default(),
    };
    let in_doubt = match sampler {
        Some(task) => task.await.unwrap_or_default(),
        None => InDoubtStats::default(),
    };
    let latency_outside_faults = run::committed_latency(&recorder.history, |_| true);
    let audit_alternation =
        run::audit_alternation(&recorder.history, scenario.workload.audit_alternate_ms, scenario.duration_s);
    let (check, finished_after_run) = check(&ports, &layout, &mut recorder.history, &pool.unfinished_commits()).await;
    let crashed_nodes = servers.exited();
    servers.stop(options.keep_data).await;

    let history_file = options.out_dir.join(format!("history-{protocol}.jsonl"));
    // A history that cannot be written is reported as a violation rather
    // than dropping the figures of a run that did happen.
    let mut check = check;
    if let Err(error) = run::write_history(&history_file, &recorder) {
        check.violations.push(error);
    }
    let committed = recorder.outcomes.get(&OpOutcome::Committed).copied().unwrap_or(0);
    let result = ProtocolResult {
        protocol,
        duration_s: scenario.duration_s,
        calibration,
        floor_ms: calibration.floor_us(protocol) / 1_000.0,
        commits_per_s: committed as f64 / scenario.duration_s,
        outcomes: recorder
            .outcomes
            .iter()
            .map(|(k, v)| (serde_json::to_value(k).unwrap().as_str().unwrap().to_string(), *v))
            .collect(),
        latency: Percentiles::of(&recorder.overall),
        latency_in_faults: Percentiles::default(),
        latency_outside_faults,
        timeline: run::timeline(&recorder, scenario.duration_s),
        faults: Vec::new(),
        audits,
        audit_alternation,
        in_doubt,
        check,
        orphans: Vec::new(),
        crashed_nodes,
        efficiency: None,
        efficiency_missing: None,
        history_file,
    };
    let info = BaselineInfo {
        protocol,
        server_version,
        bin_dir: installation.bin_dir,
        servers: layout.servers,
        sessions,
        round_trip_p50_us,
        cross_share: scenario.workload.cross_share,
        finished_after_run,
        notes,
    };
    Ok((result, info))
}

/// Creates and fills each server's `accounts` table; returns the servers'
/// version.
async fn load_accounts(ports: &[u16], layout: &Layout) -> Result<String, String> {
    let mut version = String::new();
    for (server, port) in ports.iter().enumerate() {
        let fail = |e: tokio_postgres::Error| format!("server {}: {e}", server + 1);
        let client = server::connect(*port).await.map_err(fail)?;
        let range = layout.range(server);
        // The CHECK asserts what the debit's WHERE keeps true.
        client
            .batch_execute(&format!(
                "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
                 INSERT INTO accounts SELECT g, {} FROM generate_series({}, {}) AS g;",
                layout.initial_balance,
                range.start,
                range.end - 1
            ))
            .await
            .map_err(fail)?;
        // Statistics for the planner, and a checkpoint so that the load's
        // writes are not flushed during the measured run.
        client.batch_execute("VACUUM ANALYZE accounts").await.map_err(fail)?;
        client.batch_execute("CHECKPOINT").await.map_err(fail)?;
        if version.is_empty() {
            let row = client.query_one("SHOW server_version", &[]).await.map_err(fail)?;
            version = row.get::<_, String>(0);
        }
    }
    Ok(version)
}

/// p50 of `SELECT 1` on one connection, one at a time.
async fn round_trip_p50_us(port: u16) -> Result<f64, String> {
    let client = server::connect(port).await.map_err(|e| e.to_string())?;
    let statement = client.prepare("SELECT 1").await.map_err(|e| e.to_string())?;
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3).expect("valid histogram");
    for i in 0..350 {
        let began = Instant::now();
        client.query_one(&statement, &[]).await.map_err(|e| e.to_string())?;
        if i >= 50 {
            histogram.record(began.elapsed().as_micros().max(1) as u64).expect("in range");
        }
    }
    Ok(histogram.value_at_quantile(0.5) as f64)
}

/// Reads every server's total at once, again and again, and counts totals
/// that differ from the money in the system. One server reads one
/// snapshot; two servers read two.
async fn audit_reader(ports: Vec<u16>, expected: i64, schedule: run::AuditSchedule) -> AuditStats {
    let mut stats = AuditStats::default();
    let mut clients = Vec::new();
    for port in &ports {
        match server::connect(*port).await {
            Ok(client) => clients.push(client),
            Err(_) => return stats,
        }
    }
    const SUM: &str = "SELECT coalesce(sum(balance), 0)::bigint FROM accounts";
    while schedule.next().await {
        let reads = clients.iter().map(|c| c.query_one(SUM, &[]));
        let read = tokio::time::timeout(Duration::from_secs(3), futures_util::future::join_all(reads)).await;
        match read {
            Ok(rows) if rows.iter().all(|r| r.is_ok()) => {
                stats.reads += 1;
                let total: i64 = rows.into_iter().map(|r| r.expect("checked").get::<_, i64>(0)).sum();
                if total != expected {
                    stats.wrong_total += 1;
                }
            }
            _ => stats.failed += 1,
        }
    }
    stats
}

/// Samples the prepared transactions of every server: how many at once,
/// and the oldest.
async fn in_doubt_sampler(ports: Vec<u16>, stop: Arc<AtomicBool>) -> InDoubtStats {
    let mut stats = InDoubtStats::default();
    let mut clients = Vec::new();
    for port in &ports {
        if let Ok(client) = server::connect(*port).await {
            clients.push(client);
        }
    }
    const PREPARED: &str = "SELECT count(*)::bigint, \
         coalesce(max(extract(epoch FROM now() - prepared)) * 1000, 0)::bigint FROM pg_prepared_xacts";
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut count = 0;
        for client in &clients {
            if let Ok(row) = client.query_one(PREPARED, &[]).await {
                count += row.get::<_, i64>(0).max(0) as u64;
                stats.max_ms = stats.max_ms.max(row.get::<_, i64>(1).max(0) as u64);
            }
        }
        stats.max_count = stats.max_count.max(count);
    }
    stats
}

/// The check after the run, as [`crate::check`] does it for tandem:
/// finish what is still prepared (a decided commit is committed, anything
/// else rolled back: presumed abort), then account for every account from
/// the history. Returns the report and how many prepared transactions were
/// finished.
async fn check(
    ports: &[u16],
    layout: &Layout,
    history: &mut [HistoryEntry],
    unfinished_commits: &[(usize, String)],
) -> (CheckReport, usize) {
    let began = Instant::now();
    let mut report = CheckReport { expected_total: layout.total(), ..Default::default() };
    let mut finished = 0;
    let mut clients = Vec::new();
    for (server, port) in ports.iter().enumerate() {
        match server::connect(*port).await {
            Ok(client) => clients.push(client),
            Err(error) => {
                report.violations.push(format!("PostgreSQL server {}: cannot connect: {error}", server + 1));
                return (report, finished);
            }
        }
    }
    for (server, client) in clients.iter().enumerate() {
        let gids = match client.query("SELECT gid FROM pg_prepared_xacts ORDER BY gid", &[]).await {
            Ok(rows) => rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(),
            Err(error) => {
                report.violations.push(format!("server {}: cannot list prepared transactions: {error}", server + 1));
                continue;
            }
        };
        for gid in gids {
            let decided = unfinished_commits.iter().any(|(s, g)| *s == server && *g == gid);
            let verb = if decided { "COMMIT" } else { "ROLLBACK" };
            match client.batch_execute(&format!("{verb} PREPARED '{gid}'")).await {
                Ok(()) => finished += 1,
                Err(error) => {
                    report.violations.push(format!("server {}: {verb} PREPARED '{gid}': {error}", server + 1))
                }
            }
        }
        match client.query_one("SELECT count(*)::bigint FROM pg_prepared_xacts", &[]).await {
            Ok(row) if row.get::<_, i64>(0) == 0 => {}
            Ok(row) => report.violations.push(format!(
                "not settled: server {} still holds {} prepared transactions",
                server + 1,
                row.get::<_, i64>(0)
            )),
            Err(error) => report.violations.push(format!("server {}: {error}", server + 1)),
        }
    }
    report.settle_ms = began.elapsed().as_millis() as u64;

    let mut expected: BTreeMap<u64, i64> = (0..layout.accounts).map(|a| (a, layout.initial_balance)).collect();
    for entry in history.iter() {
        match entry.outcome {
            OpOutcome::Committed => {
                report.committed += 1;
                *expected.get_mut(&entry.from).expect("a known account") -= entry.amount;
                *expected.get_mut(&entry.to).expect("a known account") += entry.amount;
            }
            OpOutcome::TimedOut | OpOutcome::Unknown if report.violations.len() < 50 => {
                report.violations.push(format!(
                    "{}: outcome unknown ({}); a PostgreSQL baseline keeps no idempotency record to ask again",
                    entry.key, entry.detail
                ));
            }
            _ => {}
        }
    }
    let mut seen = 0u64;
    for (server, client) in clients.iter().enumerate() {
        let rows = match client.query("SELECT id, balance FROM accounts ORDER BY id", &[]).await {
            Ok(rows) => rows,
            Err(error) => {
                report.violations.push(format!("server {}: cannot read balances: {error}", server + 1));
                continue;
            }
        };
        let range = layout.range(server);
        for row in rows {
            let (id, balance) = (row.get::<_, i64>(0), row.get::<_, i64>(1));
            seen += 1;
            report.total_posted += balance;
            let account = u64::try_from(id).unwrap_or(u64::MAX);
            if !range.contains(&account) {
                report.violations.push(format!("server {}: account {id} is not one of its own", server + 1));
                continue;
            }
            let want = expected.get(&account).copied().unwrap_or(0);
            if balance != want && report.violations.len() < 50 {
                let suspects = crate::check::suspects(history, account, balance - want);
                report.violations.push(format!(
                    "account {account} on server {}: balance {balance} but the committed transfers say {want}{suspects}",
                    server + 1
                ));
            }
            if balance < 0 {
                report.violations.push(format!("account {account}: balance {balance} below zero"));
            }
        }
    }
    if seen != layout.accounts {
        report.violations.push(format!("{} accounts exist, {seen} were read", layout.accounts));
    }
    if report.total_posted != report.expected_total {
        report.violations.push(format!(
            "money not conserved: {} in the accounts, {} expected",
            report.total_posted, report.expected_total
        ));
    }
    (report, finished)
}
