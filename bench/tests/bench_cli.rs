//! The `bench` binary end to end: the short `smoke` scenario (every
//! protocol, a participant SIGKILLed and restarted) runs on real processes,
//! its invariants hold, and its report files are produced and well formed;
//! a bad scenario file is refused with a message that names the problem.

use std::path::Path;
use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bench"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_smoke_scenario_runs_with_a_participant_kill_and_every_invariant_holds() {
    let out = tempfile::tempdir().unwrap();
    let output = bench().args(["run", "--scenario", "smoke", "--out"]).arg(out.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed ({:?}):\n{stdout}\n{stderr}", output.status);
    assert!(stdout.contains("invariants") && stdout.contains("report:"), "{stdout}");

    let results: serde_json::Value = serde_json::from_str(&read(&out.path().join("results.json"))).unwrap();
    let protocols = results["results"].as_array().unwrap();
    let names: Vec<&str> = protocols.iter().map(|r| r["protocol"].as_str().unwrap()).collect();
    assert_eq!(names, ["2pc", "orchestrated", "choreographed"]);
    for result in protocols {
        let name = result["protocol"].as_str().unwrap();
        assert_eq!(result["check"]["violations"].as_array().unwrap().len(), 0, "{name}: {}", result["check"]);
        assert!(result["outcomes"]["committed"].as_u64().unwrap() > 0, "{name} committed nothing");
        let fault = &result["faults"][0];
        assert_eq!(fault["node"], "p1");
        assert!(fault["healed_at_s"].as_f64().unwrap() > fault["at_s"].as_f64().unwrap(), "{name}: {fault}");
        assert!(fault["error"].is_null(), "{name}: the restart failed: {fault}");
        assert!(result["floor_ms"].as_f64().unwrap() > 0.0);
        // The history has one line per operation, each a JSON object.
        let history = read(Path::new(result["history_file"].as_str().unwrap()));
        let lines: Vec<serde_json::Value> = history.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let counted: u64 = result["outcomes"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
        assert_eq!(lines.len() as u64, counted, "{name}");
        assert!(lines.iter().all(|l| l["protocol"] == name && l["end_us"].as_u64() >= l["start_us"].as_u64()));
    }
    assert_eq!(protocols[0]["audits"]["wrong_total"], 0, "2PC audits never see a wrong total");
    assert!(protocols[0]["audits"]["reads"].as_u64().unwrap() > 0);

    let report = read(&out.path().join("report.md"));
    assert!(report.contains("every invariant held"), "{report}");
    for plot in ["latency-over-time", "throughput-over-time", "percentiles"] {
        let svg = read(&out.path().join(format!("{plot}.svg")));
        assert!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"), "{plot}.svg is not a whole SVG");
        assert!(report.contains(&format!("{plot}.svg")), "report.md links {plot}.svg");
        let png = std::fs::read(out.path().join(format!("{plot}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{plot}.png is a PNG");
    }
}

#[test]
fn a_bad_scenario_file_is_refused_with_a_message_that_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        ("[workload]\nclients = 0\n", "clients"),
        ("duration_s = 5\n[[fault]]\nkind = \"kill\"\nnode = \"p7\"\nat_s = 1\nduration_s = 1\n", "p7"),
        ("durationn_s = 5\n", "durationn_s"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let output = bench().args(["run", "--scenario"]).arg(&path).arg("--out").arg(dir.path()).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text} was accepted");
        assert!(stderr.contains(expected) && stderr.contains("bad.toml"), "{text}: {stderr}");
    }
    let output = bench().args(["run", "--scenario", "no-such-preset"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("neither a preset"));
}

/// Sends `signal` (a `kill` option such as `-INT`) to `pid`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// Starts `bench cluster up`, reads what it prints until it is ready, and
/// returns the child, the coordinator's URL and each participant's pid.
fn cluster_up(data_dir: &Path) -> (std::process::Child, String, Vec<u32>) {
    use std::io::BufRead;
    let mut child = bench()
        .args(["cluster", "up", "--participants", "2", "--accounts", "10", "--data-dir"])
        .arg(data_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut coordinator, mut pids) = (String::new(), Vec::new());
    for line in lines.by_ref() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.trim_start().starts_with("coordinator c1") {
            coordinator = words[2].to_string();
        }
        if line.trim_start().starts_with("participant p") {
            pids.push(words.last().unwrap().trim_end_matches(')').parse().unwrap());
        }
        if line.contains("Ctrl-C stops the cluster") {
            break;
        }
    }
    // Keep draining stdout, so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    assert!(coordinator.starts_with("https://") && pids.len() == 2, "{coordinator} {pids:?}");
    (child, coordinator, pids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_up_serves_transfers_and_reports_a_crashed_node() {
    use tandem::pb;
    let dir = tempfile::tempdir().unwrap();
    // A clean run: the printed endpoint serves a transfer; Ctrl-C stops it.
    let (mut child, coordinator, _) = cluster_up(&dir.path().join("clean"));
    // Over mutual TLS, as the client whose certificate the cluster wrote.
    let tls = dir.path().join("clean").join("tls");
    let flags = tandem::tls::TlsFlags {
        tls_cert: Some(tls.join("client.pem")),
        tls_key: Some(tls.join("client.key")),
        tls_ca: Some(tls.join("ca.pem")),
        insecure: false,
    };
    let channel = tandem::server::channel(&coordinator, &flags.security().unwrap()).unwrap();
    let mut client = pb::coordinator_client::CoordinatorClient::new(channel);
    let request = pb::TransferRequest { from_account: 0, to_account: 10, amount: 100, ..Default::default() };
    let result = client.transfer(request).await.unwrap().into_inner();
    assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    signal(child.id(), "-INT");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!dir.path().join("clean").exists(), "the data is removed without --keep-data");

    // A participant that dies is reported, and the exit code says so.
    let (mut child, _, pids) = cluster_up(&dir.path().join("crash"));
    signal(pids[0], "-KILL");
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    signal(child.id(), "-INT");
    let output = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        (status, stderr)
    })
    .await
    .unwrap();
    assert_eq!(output.0.code(), Some(1), "{}", output.1);
    assert!(output.1.contains("p1 exited"), "{}", output.1);
}

/// Runs `protocols` of the scenario `text` (written to a file in `out`),
/// checks that the run succeeded with no violation and every fault applied,
/// and returns each protocol's result from results.json.
fn run_scenario_without_violations(out: &Path, text: &str, protocols: &[&str]) -> Vec<serde_json::Value> {
    let scenario = out.join("scenario.toml");
    std::fs::write(&scenario, text).unwrap();
    let mut command = bench();
    command.arg("run");
    for protocol in protocols {
        command.args(["--protocol", protocol]);
    }
    let output = command.arg("--scenario").arg(&scenario).arg("--out").arg(out.join("results")).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed ({:?}):\n{stdout}\n{stderr}", output.status);
    let results: serde_json::Value = serde_json::from_str(&read(&out.join("results").join("results.json"))).unwrap();
    let results = results["results"].as_array().unwrap().clone();
    for result in &results {
        let name = result["protocol"].as_str().unwrap();
        assert_eq!(result["check"]["violations"].as_array().unwrap().len(), 0, "{name}: {}", result["check"]);
        for fault in result["faults"].as_array().unwrap() {
            assert!(fault["error"].is_null(), "{name}: {fault}");
        }
    }
    results
}

#[test]
fn link_faults_slow_and_cut_links_in_an_open_loop_zipf_run_and_every_invariant_holds() {
    let out = tempfile::tempdir().unwrap();
    let results = run_scenario_without_violations(
        out.path(),
        r#"
name = "links"
description = "open loop, Zipf, link c1-p1 delayed, link p1-p2 cut"
duration_s = 3
seed = 11

[cluster]
participants = 2
accounts_per_participant = 100
initial_balance = 10000
coordinator_args = ["--prepare-timeout-ms", "500", "--call-timeout-ms", "500"]

[workload]
mode = "open"
rate_per_s = 200
skew = "zipf"
zipf_exponent = 1.1
audit_interval_ms = 200

[[fault]]
kind = "delay"
node = "c1"
peer = "p1"
delay_ms = 25
at_s = 0.5
duration_s = 1

[[fault]]
kind = "cut"
node = "p1"
peer = "p2"
at_s = 1.5
duration_s = 1
"#,
        &["2pc", "choreographed"],
    );
    for result in &results {
        let name = result["protocol"].as_str().unwrap();
        if name == "2pc" {
            // Through the delayed link a prepare to p1 takes 50 ms more
            // (25 ms each way): the transfers that started in that window
            // and committed are that slow at the median (most touch p1).
            let delayed = &result["faults"][0]["latency"];
            assert!(delayed["count"].as_u64().unwrap() > 0, "{result}");
            assert!(delayed["p50_ms"].as_f64().unwrap() >= 50.0, "the delay did not slow the link: {delayed}");
            assert_eq!(result["audits"]["wrong_total"], 0);
            // No node restarted: the counters give the cost per transfer,
            // CPU time included.
            let efficiency = &result["efficiency"];
            assert!(efficiency["coordinator_fsyncs"].as_f64().unwrap() > 0.0, "{efficiency}");
            assert!(efficiency["coordinator_cpu_us"].as_f64().unwrap() > 0.0, "{efficiency}");
            assert!(efficiency["participant_cpu_us"].as_f64().unwrap() > 0.0, "{efficiency}");
        }
    }
}

#[test]
fn a_black_holed_and_a_one_way_cut_link_leave_every_invariant_holding() {
    let out = tempfile::tempdir().unwrap();
    let results = run_scenario_without_violations(
        out.path(),
        r#"
name = "silent"
description = "link c1->p1 black-holed, then p1->p2 cut one way"
duration_s = 4
seed = 12

[cluster]
participants = 2
accounts_per_participant = 100
initial_balance = 10000
coordinator_args = ["--prepare-timeout-ms", "300", "--call-timeout-ms", "300"]

[workload]
clients = 4
audit_interval_ms = 200

[[fault]]
kind = "black-hole"
node = "c1"
peer = "p1"
at_s = 0.5
duration_s = 1

[[fault]]
kind = "cut-one-way"
node = "p1"
peer = "p2"
at_s = 2
duration_s = 1
"#,
        &["2pc", "choreographed"],
    );
    for result in &results {
        let name = result["protocol"].as_str().unwrap();
        if name == "2pc" {
            // Prepares to p1 fall into the black hole: their transfers abort
            // when the prepare deadline passes (nothing fails fast).
            assert!(result["outcomes"]["aborted_other"].as_u64().unwrap_or(0) > 0, "{result}");
            assert_eq!(result["audits"]["wrong_total"], 0);
        }
    }
}

#[test]
fn a_coordinator_that_loses_its_disk_leaves_orphans_that_the_operator_resolves_and_nothing_moves_twice() {
    let out = tempfile::tempdir().unwrap();
    // The link c1-p1 is slow while c1 loses its disk, so that transactions
    // are in doubt when it does: their prepares reached p2 at once and p1
    // 50 ms later, and no decision follows.
    let results = run_scenario_without_violations(
        out.path(),
        r#"
name = "lost-disk"
description = "c1's data directory deleted mid-run"
protocols = ["2pc"]
duration_s = 4
seed = 13

[cluster]
participants = 2
accounts_per_participant = 100
initial_balance = 10000

[workload]
clients = 8
audit_interval_ms = 200

[[fault]]
kind = "delay"
node = "c1"
peer = "p1"
delay_ms = 50
at_s = 0.5
duration_s = 2

[[fault]]
kind = "lose-disk"
node = "c1"
at_s = 1.5
duration_s = 0.5
"#,
        &["2pc"],
    );
    let result = &results[0];
    // The check passed (no violation): every account equals its initial
    // balance plus the transfers committed, each once; nothing is held.
    let orphans: Vec<&str> = result["orphans"].as_array().unwrap().iter().map(|o| o.as_str().unwrap()).collect();
    assert!(!orphans.is_empty(), "transactions were in doubt when c1 lost its disk: {result}");
    for orphan in &orphans {
        assert!(
            orphan.contains(" orphan c1-") && (orphan.contains(" committed: ") || orphan.contains(" aborted: ")),
            "{orphan}"
        );
    }
    // While orphans are held (one may be committed elsewhere), audits
    // refuse instead of showing a total they cannot vouch for.
    assert_eq!(result["audits"]["wrong_total"], 0, "{}", result["audits"]);
    assert!(result["audits"]["failed"].as_u64().unwrap() > 0, "{}", result["audits"]);
    let report = read(&out.path().join("results").join("report.md"));
    assert!(report.contains("orphans of the lost coordinator incarnation, resolved by the operator"), "{report}");
}

#[test]
fn clients_that_batch_their_transfers_send_them_in_transfer_batch_calls_and_every_invariant_holds_across_a_kill() {
    let out = tempfile::tempdir().unwrap();
    let results = run_scenario_without_violations(
        out.path(),
        r#"
name = "batched"
description = "2pc-batch, p1 killed and restarted"
duration_s = 3
seed = 13

[cluster]
participants = 2
accounts_per_participant = 100
initial_balance = 10000

[workload]
clients = 32
overdraft_share = 0.05
audit_interval_ms = 200
audit_alternate_ms = 500

[[fault]]
kind = "kill"
node = "p1"
at_s = 1
duration_s = 1
"#,
        &["2pc-batch"],
    );
    let result = &results[0];
    assert_eq!(result["protocol"], "2pc-batch");
    assert!(result["outcomes"]["committed"].as_u64().unwrap() > 100, "{result}");
    assert!(result["outcomes"]["aborted_insufficient_funds"].as_u64().unwrap() > 0, "{result}");
    assert_eq!(result["audits"]["wrong_total"], 0);
    // The transfers went in batches: TransferBatch calls, fewer than the
    // transfers, and no Transfer call.
    let metrics = read(&out.path().join("results").join("metrics-2pc-batch-c1.prom"));
    let calls = |method: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("tandem_rpc_requests_total") && l.contains(&format!("method=\"{method}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let batches = calls("/tandem.v1.Coordinator/TransferBatch");
    assert!(batches > 0, "{metrics}");
    assert!(batches < result["outcomes"]["committed"].as_u64().unwrap(), "{batches} calls");
    assert_eq!(calls("/tandem.v1.Coordinator/Transfer"), 0);

    // Audits ran in half of the half seconds (after one to warm up: with,
    // without, without, with, with): the report sets the commits/s of those
    // windows against the others'.
    let alternation = &result["audit_alternation"];
    assert_eq!(alternation["window_ms"], 500, "{alternation}");
    assert_eq!(
        (alternation["windows_with_audits"].as_u64(), alternation["windows_without"].as_u64()),
        (Some(3), Some(2))
    );
    assert!(alternation["with_audits_per_s"].as_f64().unwrap() > 0.0, "{alternation}");
    assert!(alternation["without_audits_per_s"].as_f64().unwrap() > 0.0, "{alternation}");
    assert!(result["audits"]["reads"].as_u64().unwrap() > 0);
    let report = read(&out.path().join("results").join("report.md"));
    assert!(report.contains("audits every 200 ms in half of the 500 ms windows"), "{report}");
}
