//! CI's share of the whole-system simulation: a range of seeds of every
//! scenario CI runs (10,000 seeds in all by default; `TANDEM_SIM_SEEDS`
//! sets the total), that the same seed gives the same history byte for
//! byte, and the seeds that once found a bug, kept as regressions.
//!
//! A failing seed prints its violations, its history and the one command
//! that replays it.

use tandem_sim::{run_seed, scenario, SeedReport, SCENARIOS};

/// Seeds CI runs over all its scenarios together.
const CI_SEEDS_TOTAL: u64 = 10_000;

fn seeds_per_scenario() -> u64 {
    let total = std::env::var("TANDEM_SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(CI_SEEDS_TOTAL);
    let scenarios = SCENARIOS.iter().filter(|s| s.in_ci).count() as u64;
    total.div_ceil(scenarios)
}

fn explain(report: &SeedReport) -> String {
    format!(
        "scenario {} seed {} failed:\n  {}\nhistory:\n{}\nreplay: {}",
        report.scenario,
        report.seed,
        report.violations.join("\n  "),
        report.history.join("\n"),
        report.replay_command()
    )
}

/// Runs the CI range of `name`'s seeds; fails on the first violation.
fn seeds_of(name: &str) {
    let scenario = scenario(name).expect("a scenario of the simulation");
    assert!(scenario.in_ci, "{name} is not one CI runs");
    let count = seeds_per_scenario();
    let mut operations = 0;
    for seed in 0..count {
        let report = run_seed(scenario, seed);
        assert!(report.passed(), "{}", explain(&report));
        operations += report.operations;
    }
    // A range of seeds that sent nothing would prove nothing.
    assert!(operations as u64 >= count * 10, "{name}: only {operations} operations over {count} seeds");
    println!("{name}: {count} seeds, {operations} operations, no violation");
}

#[test]
fn calm() {
    seeds_of("calm");
}

#[test]
fn twopc_with_audits_under_every_fault() {
    seeds_of("2pc-audits");
}

#[test]
fn classic_2pc_with_audits_under_every_fault() {
    seeds_of("classic-2pc");
}

#[test]
fn crashes_and_power_losses() {
    seeds_of("crashes");
}

#[test]
fn pauses_and_black_holed_links() {
    seeds_of("network");
}

#[test]
fn failed_fsyncs_and_full_disks() {
    seeds_of("disks");
}

#[test]
fn everything() {
    seeds_of("everything");
}

#[test]
fn a_storm_of_faults() {
    seeds_of("storm");
}

#[test]
fn the_same_seed_gives_the_same_history_byte_for_byte() {
    for name in ["everything", "2pc-audits"] {
        let scenario = scenario(name).expect("a scenario");
        for seed in [3, 11] {
            let first = run_seed(scenario, seed);
            let second = run_seed(scenario, seed);
            assert!(first.history.len() > 20, "{name} seed {seed}: a history this short proves nothing");
            assert_eq!(first.history, second.history, "{name} seed {seed} ran twice differently");
        }
    }
    // And different seeds differ (the seed reaches the run).
    let everything = scenario("everything").expect("a scenario");
    assert_ne!(run_seed(everything, 3).history, run_seed(everything, 4).history);
}

/// The nemesis does what it says: over a few seeds of `everything`, every
/// kind of fault begins in some history, and every history heals.
#[test]
fn the_nemesis_injects_every_kind_of_fault() {
    let everything = scenario("everything").expect("a scenario");
    let histories: Vec<Vec<String>> = (0..20).map(|seed| run_seed(everything, seed).history).collect();
    let begun = |what: &str| histories.iter().flatten().any(|line| line.contains(&format!("nemesis: begin {what}")));
    for kind in [
        "Crash { host: \"c1\"",
        "Pause {",
        "Partition {",
        "OneWay {",
        "FailFsync {",
        "DiskFull {",
        "SlowDisk {",
        "ClockJump {",
    ] {
        assert!(begun(kind), "no seed began {kind}");
    }
    assert!(histories.iter().flatten().any(|line| line.contains("power_loss: true")));
    assert!(histories.iter().all(|h| h.iter().any(|line| line.contains("nemesis: healed"))));
}

/// With the participants' retention (100 ms) far shorter than the faults,
/// nothing may be applied twice: late prepares and commits are recognised
/// by the coordinator's watermarks, saga steps by the saga watermark,
/// choreographed events by their per-peer sequence numbers (issue 11).
/// Before, within a few seeds the checker found a choreographed event
/// credited twice after its inbox id expired (seed 5 did); those seeds
/// are in this range.
#[test]
fn outages_longer_than_every_retention() {
    seeds_of("long-outages");
}

/// One-phase commit under every fault: transfers on one participant are
/// one request each (keyed ones with an intent in the coordinator's log),
/// retried by key, audited, with a retention far shorter than the faults.
#[test]
fn one_phase_commits_under_every_fault() {
    seeds_of("one-phase");
}

/// Transfers sent in TransferBatch calls under every fault, beside
/// transfers sent alone: each item is decided, deduplicated by its key
/// and answered as a Transfer would be.
#[test]
fn batched_transfers_under_every_fault() {
    seeds_of("batched");
}

/// A parallel commit recovered from the coordinator's log and being
/// prepared again may have been committed before the restart and applied
/// at one participant while another still holds it prepared: an audit then
/// is refused (UNAVAILABLE) until its participants have voted again. Seed
/// 504 of `2pc-audits` found an audit that counted neither side.
#[test]
fn an_audit_waits_for_recovered_parallel_commits_to_be_decided() {
    let scenario = scenario("2pc-audits").expect("a scenario");
    let report = run_seed(scenario, 504);
    assert!(report.passed(), "{}", explain(&report));
}
