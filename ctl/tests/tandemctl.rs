//! tandemctl against a real local cluster: the `coordinator` and
//! `participant` binaries on loopback with mutual TLS, and the built
//! `tandemctl` run as a process with the cluster's operator (or client)
//! certificate, as an operator would run it. Build the node binaries first:
//! `cargo build --release --workspace` (the cluster runs them from
//! target/release).
//!
//! Checked: `status`, `txn get`, `audit`, `balances`, `in-doubt list` on a
//! healthy cluster after a few transfers; a dead letter and a parked
//! transfer made on purpose, listed and resolved; and the failures an
//! operator meets: a client certificate refused (PERMISSION_DENIED, exit
//! 3), a node that cannot be reached (exit 3), a usage error (exit 2).

mod common;

use common::{
    dead_letter, in_doubt, parked_transfer, reopen, start, tandemctl, transfer, wait_committed_everywhere, BALANCE,
};
use tandem::cluster::NodeRef;
use tandem::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_reads_and_resolves_a_real_cluster_with_tandemctl() {
    let (mut cluster, _dir) = start().await;
    let total = cluster.spec.total_money();
    let total_text = total.to_string();
    let mut client = cluster.coordinator_client(cluster.client()).unwrap();

    // A few transfers, the last one across both participants.
    for (from, to, amount) in [(0, 11, 100), (12, 3, 40), (5, 6, 7), (1, 15, 250)] {
        let result = client.transfer(transfer(from, to, amount)).await.unwrap().into_inner();
        assert_eq!(result.outcome, pb::Outcome::Committed as i32, "{result:?}");
    }
    let last = client.transfer(transfer(2, 18, 30)).await.unwrap().into_inner();
    assert_eq!(last.outcome, pb::Outcome::Committed as i32, "{last:?}");

    // txn get: committed on the coordinator and on both participants.
    let view = wait_committed_everywhere(&cluster, &last.txn_id).await;
    assert_eq!(view["txn_id"], last.txn_id.as_str());
    assert!(view["findings"].as_array().unwrap().is_empty(), "{view}");
    let table = tandemctl(&cluster, "operator", &["txn", "get", &last.txn_id]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.contains("coordinator: committed"), "{}", table.stdout);

    // status: every node serving, the coordinator ready, nothing waiting.
    let run = tandemctl(&cluster, "operator", &["--json", "status"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let status = run.json();
    assert_eq!(status["serving"], true, "{status}");
    assert_eq!(status["coordinator"]["ready"], "serving", "{status}");
    assert_eq!(status["coordinator"]["dead_letters"], 0, "{status}");
    for p in status["participants"].as_array().unwrap() {
        assert_eq!((p["liveness"].as_str(), p["reached_by_coordinator"].as_str()), (Some("serving"), Some("serving")));
        assert_eq!(
            (p["accounts"].as_u64(), p["orphaned"].as_u64(), p["parked"].as_u64()),
            (Some(10), Some(0), Some(0))
        );
    }
    let table = tandemctl(&cluster, "operator", &["status"]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.lines().any(|l| l.starts_with("p2 ") && l.contains("serving")), "{}", table.stdout);

    // audit: balanced against the money the cluster opened.
    let run = tandemctl(&cluster, "operator", &["audit", "--json", "--expected-money", &total_text]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let audit = run.json();
    assert_eq!((audit["balanced"].as_bool(), audit["money"].as_i64()), (Some(true), Some(total)), "{audit}");
    // Off by one: found wrong, exit 1.
    let wrong = tandemctl(&cluster, "operator", &["audit", "--expected-money", &(total + 1).to_string()]).await;
    assert_eq!(wrong.code, 1, "{wrong:?}");
    assert!(wrong.stdout.contains("NOT balanced"), "{}", wrong.stdout);

    // balances: the participants' totals sum to the money.
    let run = tandemctl(&cluster, "operator", &["--json", "balances", "--expected-money", &total_text]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let balances = run.json();
    let posted: i64 = balances["participants"].as_array().unwrap().iter().map(|p| p["posted"].as_i64().unwrap()).sum();
    assert_eq!((posted, balances["money"].as_i64()), (total, Some(total)), "{balances}");
    let run = tandemctl(&cluster, "operator", &["--json", "balances", "--account", "18"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let account = run.json();
    assert_eq!(account["holders"][0]["participant"], "p2", "{account}");
    assert_eq!(account["holders"][0]["posted"], BALANCE + 30, "{account}");

    // in-doubt list: nothing in doubt.
    let run = tandemctl(&cluster, "operator", &["--json", "in-doubt", "list"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let listed = run.json();
    for p in listed["participants"].as_array().unwrap() {
        assert_eq!((p["total"].as_u64(), p["prepared"].as_array().map(Vec::len)), (Some(0), Some(0)), "{listed}");
    }
    let table = tandemctl(&cluster, "operator", &["in-doubt", "list"]).await;
    assert!(table.stdout.contains("no transaction in doubt"), "{table:?}");

    // A client certificate may not decide a transaction: PERMISSION_DENIED,
    // exit 3, the node and the RPC named; nothing changes.
    let resolve = ["in-doubt", "resolve", "--participant", "p1", &last.txn_id, "--commit", "--reason", "test"];
    let denied = tandemctl(&cluster, "client", &resolve).await;
    assert_eq!(denied.code, 3, "{denied:?}");
    assert!(
        denied.stderr.contains("PERMISSION_DENIED")
            && denied.stderr.contains("p1")
            && denied.stderr.contains("ResolveInDoubt"),
        "{}",
        denied.stderr
    );
    // The operator may, but this one is not prepared (it committed):
    // FAILED_PRECONDITION or NOT_FOUND, exit 3, nothing changes.
    let refused = tandemctl(&cluster, "operator", &resolve).await;
    assert_eq!(refused.code, 3, "{refused:?}");
    assert!(
        refused.stderr.contains("FAILED_PRECONDITION") || refused.stderr.contains("NOT_FOUND"),
        "{}",
        refused.stderr
    );
    // A usage error: no --reason.
    let usage = tandemctl(&cluster, "operator", &resolve[..resolve.len() - 2]).await;
    assert_eq!(usage.code, 2, "{usage:?}");

    // A transaction in doubt: prepared on p1 (by a stand-in for c1, with
    // c1's name) while c1 is paused, so no decision can come. The operator
    // lists it, and aborts it heuristically, with a reason.
    in_doubt(&mut cluster, "in-doubt-1", (7, -5)).await;
    let run = tandemctl(&cluster, "operator", &["--json", "in-doubt", "list"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let listed = run.json();
    assert_eq!(listed["participants"][0]["total"], 1, "{listed}");
    let held = &listed["participants"][0]["prepared"][0];
    assert_eq!(
        (held["txn_id"].as_str(), held["coordinator_id"].as_str()),
        (Some("in-doubt-1"), Some("c1")),
        "{listed}"
    );
    assert_eq!((held["legs"][0]["account"].as_u64(), held["legs"][0]["amount"].as_i64()), (Some(7), Some(-5)));
    let table = tandemctl(&cluster, "operator", &["in-doubt", "list"]).await;
    assert!(
        table.stdout.lines().any(|l| l.starts_with("p1 ") && l.contains("in-doubt-1") && l.contains("7:-5")),
        "{table:?}"
    );
    let decided = tandemctl(
        &cluster,
        "operator",
        &[
            "--json",
            "in-doubt",
            "resolve",
            "--participant",
            "p1",
            "in-doubt-1",
            "--abort",
            "--reason",
            "test: c1 paused",
        ],
    )
    .await;
    assert_eq!(decided.code, 0, "{decided:?}");
    let decision = decided.json();
    assert_eq!(
        (decision["decision"]["committed"].as_bool(), decision["decision"]["reason"].as_str()),
        (Some(false), Some("test: c1 paused"))
    );
    let run = tandemctl(&cluster, "operator", &["--json", "in-doubt", "list"]).await;
    let listed = run.json();
    assert_eq!(listed["participants"][0]["total"], 0, "{listed}");
    assert_eq!(listed["participants"][0]["heuristic"][0]["txn_id"], "in-doubt-1", "{listed}");
    cluster.node(NodeRef::Coordinator).resume();

    // A dead letter (an orchestrated saga whose refund cannot be applied):
    // listed, refused while its source is closed, resolved once reopened.
    let saga = dead_letter(&mut cluster, (4, 14, 120)).await;
    let run = tandemctl(&cluster, "operator", &["--json", "dead-letters", "list"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let dead = run.json();
    assert_eq!(dead["total"], 1, "{dead}");
    assert_eq!(
        (dead["dead_letters"][0]["saga_id"].as_str(), dead["dead_letters"][0]["amount"].as_i64()),
        (Some(saga.as_str()), Some(120)),
        "{dead}"
    );
    let run = tandemctl(&cluster, "operator", &["--json", "status"]).await;
    assert_eq!(run.code, 1, "a dead letter waits for an operator: {run:?}");
    assert_eq!(run.json()["coordinator"]["dead_letters"], 1);
    // Conservation still holds: the money is in suspense.
    let run = tandemctl(&cluster, "operator", &["--json", "audit", "--expected-money", &total_text]).await;
    assert_eq!((run.code, run.json()["suspense"].as_i64()), (0, Some(120)), "{run:?}");
    let missing = tandemctl(&cluster, "operator", &["dead-letters", "resolve", &saga]).await;
    assert_eq!(missing.code, 2, "a resolve needs --reason: {missing:?}");
    let blank = tandemctl(&cluster, "operator", &["dead-letters", "resolve", &saga, "--reason", " "]).await;
    // Refused before any call, as `in-doubt resolve` refuses it (the
    // coordinator would answer INVALID_ARGUMENT).
    assert_eq!(blank.code, 2, "a blank reason is a usage error: {blank:?}");
    assert!(blank.stderr.contains("--reason"), "{blank:?}");
    let closed =
        tandemctl(&cluster, "operator", &["dead-letters", "resolve", &saga, "--reason", "ticket 7: refund"]).await;
    assert!(closed.code == 1 || closed.code == 3, "the source account is still closed: {closed:?}");
    reopen(&cluster, 0, 4).await;
    let resolved =
        tandemctl(&cluster, "operator", &["--json", "dead-letters", "resolve", &saga, "--reason", "ticket 7: refund"])
            .await;
    assert_eq!(resolved.code, 0, "{resolved:?}");
    assert_eq!(resolved.json()["saga"]["state"], "resolved");
    let run = tandemctl(&cluster, "operator", &["--json", "dead-letters", "list"]).await;
    assert_eq!(run.json()["total"], 0, "{run:?}");

    // A parked transfer (a choreographed transfer whose refund cannot be
    // applied): listed on its source, resolved once the source reopens.
    let parked = parked_transfer(&mut cluster, (6, 16, 55)).await;
    let run = tandemctl(&cluster, "operator", &["--json", "parked", "list"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let listed = run.json();
    assert_eq!(listed["participants"][0]["total"], 1, "{listed}");
    assert_eq!(listed["participants"][0]["parked"][0]["saga_id"], parked.as_str(), "{listed}");
    assert_eq!(listed["participants"][1]["total"], 0, "{listed}");
    // txn get finds it by its saga id on the participant it started on
    // (no coordinator knows a choreographed transfer).
    let run = tandemctl(&cluster, "operator", &["--json", "txn", "get", &parked]).await;
    assert_eq!(run.code, 0, "parked is not wrong, it waits: {run:?}");
    let found = run.json();
    assert_eq!(found["choreographed"].as_array().map(Vec::len), Some(1), "{found}");
    assert_eq!(
        (found["choreographed"][0]["participant"].as_str(), found["choreographed"][0]["state"].as_str()),
        (Some("p1"), Some("dead_lettered")),
        "{found}"
    );
    let table = tandemctl(&cluster, "operator", &["txn", "get", &parked]).await;
    assert!(table.stdout.contains("choreographed transfer, started on p1: dead_lettered"), "{table:?}");
    reopen(&cluster, 0, 6).await;
    let resolve = ["--json", "parked", "resolve", "--participant", "p1", &parked, "--reason", "ticket 8: refund"];
    let resolved = tandemctl(&cluster, "operator", &resolve).await;
    assert_eq!(resolved.code, 0, "{resolved:?}");
    assert_eq!(resolved.json()["transfer"]["state"], "resolved");
    let kept = resolved.json()["transfer"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(kept.ends_with("by tandem://operator/bench: ticket 8: refund"), "who and why are kept: {kept}");
    let run = tandemctl(&cluster, "operator", &["--json", "txn", "get", &parked]).await;
    assert_eq!(run.json()["choreographed"][0]["state"], "resolved", "{run:?}");
    // An id no node knows: nothing choreographed either.
    let run = tandemctl(&cluster, "operator", &["--json", "txn", "get", "never-started"]).await;
    assert_eq!(run.json()["choreographed"], serde_json::json!([]), "{run:?}");

    // All money back in accounts; everything settled.
    let run = tandemctl(&cluster, "operator", &["--json", "audit", "--expected-money", &total_text]).await;
    assert_eq!((run.code, run.json()["suspense"].as_i64()), (0, Some(0)), "{run:?}");
    let run = tandemctl(&cluster, "operator", &["status"]).await;
    assert_eq!(run.code, 0, "{run:?}");

    // A node that cannot be reached: exit 3, naming it and why.
    let unreachable = tokio::process::Command::new(env!("CARGO_BIN_EXE_tandemctl"))
        .args(["--insecure", "--coordinator", "http://127.0.0.1:1", "--timeout-ms", "2000", "audit"])
        .env_remove("TANDEM_PARTICIPANTS")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert_eq!(unreachable.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("http://127.0.0.1:1") && stderr.contains("Audit") && stderr.contains("UNAVAILABLE"),
        "{stderr}"
    );
    // With the certificates, a participant's port that no one serves.
    cluster.kill(NodeRef::Participant(1)).await;
    let run = tandemctl(&cluster, "operator", &["--json", "status"]).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert!(run.stderr.contains("p2") && run.stderr.contains("UNAVAILABLE"), "{}", run.stderr);
    assert_eq!(run.json()["serving"], false);
    // txn get asks p2 two things; it is named once, for the first.
    let run = tandemctl(&cluster, "operator", &["txn", "get", "never-started"]).await;
    assert_eq!(run.code, 3, "{run:?}");
    assert_eq!(run.stderr.matches("UNAVAILABLE").count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("p2") && run.stderr.contains("LookupTransaction"), "{}", run.stderr);
    cluster.stop().await;
}

/// `status` names why the coordinator is not ready, in the coordinator's
/// own words (GetHealth): a participant paused with SIGSTOP, as an
/// operator would meet it; and once it is resumed, nothing is left to say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_why_the_coordinator_is_not_ready_while_a_participant_is_paused() {
    let (mut cluster, _dir) = start().await;
    cluster.participants[1].pause();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let run = tandemctl(&cluster, "operator", &["--json", "status"]).await;
        let status = run.json();
        if status["coordinator"]["ready"] != "serving" && status["coordinator"]["reason"].is_string() {
            assert_ne!(run.code, 0, "a cluster with a node that does not answer is not a clean status: {run:?}");
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the coordinator never said why it is not ready: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let reason = status["coordinator"]["reason"].as_str().unwrap();
    assert!(reason.contains("p2"), "the reason names the paused participant: {status}");
    let table = tandemctl(&cluster, "operator", &["status"]).await;
    assert!(
        table.stdout.contains("the coordinator is not ready") && table.stdout.contains(reason),
        "the table's finding carries the coordinator's words:\n{}",
        table.stdout
    );

    cluster.participants[1].resume();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let run = tandemctl(&cluster, "operator", &["--json", "status"]).await;
        let status = run.json();
        if run.code == 0 && status["coordinator"]["ready"] == "serving" {
            assert!(status["coordinator"]["reason"].is_null(), "no reason once ready: {status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the coordinator never became ready again: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
