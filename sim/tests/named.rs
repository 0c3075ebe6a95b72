//! The driver problems a review of the nodes named, each proved in the
//! whole-system simulation with scripted faults, over a few seeds of
//! workload. Simulated time is deterministic, so the bounds below are
//! exact properties of the code, not measurements of this machine.

use std::time::Duration;
use tandem_bench::workload::OpOutcome;
use tandem_sim::{run_seed, scenario, SeedReport};

const SEEDS: u64 = 12;

fn run(name: &str, seed: u64) -> SeedReport {
    let report = run_seed(scenario(name).expect("a scenario"), seed);
    assert!(
        report.passed(),
        "{name} seed {seed}: {:?}\n{}\nreplay: {}",
        report.violations,
        report.history.join("\n"),
        report.replay_command()
    );
    report
}

fn latency(entry: &tandem_bench::workload::HistoryEntry) -> Duration {
    Duration::from_micros(entry.end_us - entry.start_us)
}

/// Participants left in doubt by a coordinator paused past their decision
/// queries' deadline resolve soon after it answers again.
#[test]
fn in_doubt_participants_resolve_soon_after_a_paused_coordinator_answers() {
    const RESOLVE_BOUND: Duration = Duration::from_secs(3);
    let mut longest = Duration::ZERO;
    for seed in 0..SEEDS {
        let report = run("coordinator-paused", seed);
        let settled = report.settled_at.expect("settled");
        longest = longest.max(settled.saturating_sub(report.healed_at));
        assert!(
            settled.saturating_sub(report.healed_at) <= RESOLVE_BOUND,
            "seed {seed}: settled {:?} after the coordinator resumed\n{}",
            settled.saturating_sub(report.healed_at),
            report.history.join("\n")
        );
    }
    println!("the participants settled at most {longest:?} after the coordinator resumed");
}

/// With one peer down for long, choreographed transfers to the others are
/// not held up, and those to the peer complete soon after it is back.
#[test]
fn a_peer_down_for_long_holds_up_only_its_own_events() {
    const TRANSFER_BOUND: Duration = Duration::from_millis(500);
    const CATCH_UP_BOUND: Duration = Duration::from_secs(3);
    let (mut slowest_to_p2, mut longest_catch_up) = (Duration::ZERO, Duration::ZERO);
    for seed in 0..SEEDS {
        let report = run("relay-peer-down", seed);
        let to_p2 = |to: u64| (4..8).contains(&to);
        for entry in report.entries.iter().filter(|e| to_p2(e.to)) {
            slowest_to_p2 = slowest_to_p2.max(latency(entry));
            assert!(
                entry.outcome == OpOutcome::Committed && latency(entry) <= TRANSFER_BOUND
                    || entry.outcome == OpOutcome::AbortedInsufficientFunds,
                "seed {seed}: {} to p2 took {:?} and ended {:?}\n{}",
                entry.key,
                latency(entry),
                entry.outcome,
                report.history.join("\n")
            );
        }
        let settled = report.settled_at.expect("settled");
        longest_catch_up = longest_catch_up.max(settled.saturating_sub(report.healed_at));
        assert!(
            settled.saturating_sub(report.healed_at) <= CATCH_UP_BOUND,
            "seed {seed}: settled {:?} after p3 came back\n{}",
            settled.saturating_sub(report.healed_at),
            report.history.join("\n")
        );
    }
    println!("slowest transfer to p2: {slowest_to_p2:?}; settled at most {longest_catch_up:?} after the link healed");
}
/// An audit that cannot read a paused participant gives up quickly, and
/// holds up no commit meanwhile: 2PC transfers between the two
/// participants that answer finish as if nothing were paused.
#[test]
fn an_audit_does_not_stall_commits_while_a_participant_is_paused() {
    const COMMIT_WAIT_BOUND: Duration = Duration::from_millis(400);
    let mut longest = Duration::ZERO;
    for seed in 0..SEEDS {
        let report = run("audit-while-paused", seed);
        longest = longest.max(report.entries.iter().map(latency).max().unwrap_or_default());
        for entry in &report.entries {
            assert!(
                entry.outcome.is_definite() && latency(entry) <= COMMIT_WAIT_BOUND,
                "seed {seed}: {} took {:?} and ended {:?}\n{}",
                entry.key,
                latency(entry),
                entry.outcome,
                report.history.join("\n")
            );
        }
    }
    println!("the longest transfer while p3 was paused and audits ran took {longest:?}");
}
