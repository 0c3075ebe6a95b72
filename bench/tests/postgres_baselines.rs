//! The PostgreSQL baselines on a real PostgreSQL that the bench starts
//! itself: each runs the workload for a moment, commits transfers, refuses
//! overdrafts, and its check passes. Skipped, with the reason printed, only
//! when PostgreSQL's binaries are not installed. And without them, `bench
//! run` says why a baseline is skipped and does not fail. The three take
//! about 5 s of wall time on this 2-core machine, quiet (2026-12-02): 1 s
//! of workload per baseline, the rest initdb, starting, checking and
//! stopping the servers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tandem_bench::postgres::{self, server::Installation};
use tandem_bench::run::RunOptions;
use tandem_bench::scenario::{Protocol, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_baselines_commit_refuse_overdrafts_and_their_check_passes() {
    if let Err(reason) = Installation::find() {
        eprintln!("SKIPPED the PostgreSQL baselines' test: {reason}");
        return;
    }
    let began = Instant::now();
    let out = tempfile::tempdir().unwrap();
    let mut scenario = Scenario {
        duration_s: 1.0,
        protocols: vec![Protocol::PostgresLocal, Protocol::PostgresTwoPhase],
        ..Scenario::default()
    };
    scenario.cluster.accounts_per_participant = 100;
    scenario.cluster.initial_balance = 10_000;
    scenario.workload.clients = 8;
    scenario.workload.overdraft_share = 0.05;
    scenario.workload.cross_share = Some(0.5);
    scenario.workload.audit_interval_ms = 50;
    scenario.validate().unwrap();
    let options = RunOptions {
        out_dir: out.path().to_path_buf(),
        bin_dir: PathBuf::from("unused by the baselines"),
        keep_data: false,
        progress: false,
        insecure: false,
        metrics: true,
    };
    for protocol in scenario.protocols.clone() {
        let (result, info) = postgres::run(&scenario, protocol, &options).await.unwrap_or_else(|skipped| {
            panic!("PostgreSQL is installed, yet {protocol} was skipped: {}", skipped.reason)
        });
        assert!(result.check.passed(), "{protocol}: {:#?}", result.check.violations);
        assert!(result.passed(), "{protocol}: {:?}", result.crashed_nodes);
        let outcome = |name: &str| result.outcomes.get(name).copied().unwrap_or(0);
        assert!(outcome("committed") > 50, "{protocol}: {:?}", result.outcomes);
        assert!(outcome("aborted_insufficient_funds") > 0, "{protocol} refused no overdraft: {:?}", result.outcomes);
        assert_eq!(outcome("aborted_other") + outcome("unknown") + outcome("timed_out"), 0, "{:?}", result.outcomes);
        assert_eq!(result.check.committed, outcome("committed"));
        assert_eq!(result.check.total_posted, 2 * 100 * 10_000, "money conserved");
        assert_eq!(result.floor_ms, 0.0, "a baseline has no floor");
        assert!(result.audits.reads > 0, "{protocol}: audits ran: {:?}", result.audits);

        let history = std::fs::read_to_string(&result.history_file).unwrap();
        let entries: Vec<serde_json::Value> = history.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let counted: u64 = result.outcomes.values().sum();
        assert_eq!(entries.len() as u64, counted);
        let crossing = entries.iter().filter(|e| e["from"].as_u64().unwrap() / 100 != e["to"].as_u64().unwrap() / 100);
        let crossing = crossing.count();
        match protocol {
            Protocol::PostgresLocal => {
                assert_eq!(info.servers, 1);
                // The scenario's share: about half cross participants.
                assert!(crossing * 4 > entries.len() && crossing * 4 < entries.len() * 3, "{crossing}");
                assert_eq!(result.audits.wrong_total, 0, "one database: every audit is one snapshot");
            }
            _ => {
                assert_eq!(info.servers, 2);
                assert_eq!(crossing, entries.len(), "postgres-2pc crosses always");
                assert!(info.notes.iter().any(|n| n.contains("every transfer crosses")), "{:?}", info.notes);
                assert!(result.in_doubt.max_count <= 2 * 8, "{:?}", result.in_doubt);
            }
        }
        assert!(info.round_trip_p50_us > 0.0 && info.server_version.chars().next().unwrap().is_ascii_digit());
        assert!(!out.path().join(format!("cluster-{protocol}")).exists(), "the data directory is deleted");
    }
    eprintln!("the PostgreSQL baselines' test took {:.1} s", began.elapsed().as_secs_f64());
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn without_postgresql_the_baselines_are_skipped_with_the_reason_and_the_run_does_not_fail() {
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["run", "--scenario", "vs-postgres", "--protocol", "postgres-local", "--protocol", "postgres-2pc"])
        .args(["--duration-s", "0.5", "--out"])
        .arg(out.path())
        .env(postgres::server::BIN_DIR_VAR, "/nonexistent/postgresql/bin")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "a skipped baseline does not fail the run:\n{stdout}\n{stderr}");
    for protocol in ["postgres-local", "postgres-2pc"] {
        assert!(stdout.contains(&format!("{protocol}: SKIPPED")), "{stdout}");
        assert!(stderr.contains(&format!("{protocol}: SKIPPED")), "{stderr}");
    }
    assert!(stdout.contains("/nonexistent/postgresql/bin has no initdb and postgres"), "the reason: {stdout}");
    let results: serde_json::Value = serde_json::from_str(&read(&out.path().join("results.json"))).unwrap();
    assert_eq!(results["skipped"].as_array().unwrap().len(), 2, "{results}");
    assert_eq!(results["results"].as_array().unwrap().len(), 0);
}

#[test]
fn a_bad_cross_share_on_the_command_line_is_refused_naming_the_field() {
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["run", "--scenario", "vs-postgres", "--cross-share", "1.5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("workload.cross_share = 1.5"), "{stderr}");
}
