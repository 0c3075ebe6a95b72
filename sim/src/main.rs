//! `sim`: runs seeds of the whole-system simulation (see the library's
//! documentation), one seed to replay it, or many to hunt for bugs.

use clap::Parser;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_sim::{run_seed, scenario, Scenario, SeedReport, SCENARIOS};

#[derive(Parser, Debug)]
#[command(
    name = "sim",
    about = "Runs tandem's real coordinator and participants in a deterministic simulation (simulated network, disks and clock) under a seeded nemesis, and checks every run's history.",
    after_help = "Examples:\n  sim --seeds 1000                 1,000 seeds over every scenario\n  sim --seeds 0                    seeds until interrupted, with seeds per second\n  sim --scenario crashes --seed 7 --history   replay one seed and print its history"
)]
struct Args {
    /// A scenario's name, or `all` (seeds go round the scenarios CI runs).
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Run this one seed (with `--scenario NAME`).
    #[arg(long)]
    seed: Option<u64>,
    /// How many seeds to run (0: until interrupted or a failure).
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed of the range.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Threads running seeds (default: one per core).
    #[arg(long)]
    jobs: Option<usize>,
    /// Print the history of the seed(s) run (always printed for a failure).
    #[arg(long)]
    history: bool,
    /// Go on after a failing seed.
    #[arg(long)]
    keep_going: bool,
    /// Log the nodes' tracing at this level (to stderr, with simulated time).
    #[arg(long)]
    log: Option<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
}

struct SimElapsed;

impl tracing_subscriber::fmt::time::FormatTime for SimElapsed {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write!(w, "{:>9.3}s", turmoil::sim_elapsed().unwrap_or_default().as_secs_f64())
    }
}

fn report_failure(report: &SeedReport) {
    println!("FAILED: scenario {} seed {}", report.scenario, report.seed);
    for violation in &report.violations {
        println!("  violation: {violation}");
    }
    println!("history:");
    for line in &report.history {
        println!("  {line}");
    }
    println!("replay: {}", report.replay_command());
}

fn main() {
    let args = Args::parse();
    if args.list {
        for s in SCENARIOS {
            println!("{:<12} {}", s.name, s.about);
        }
        return;
    }
    if let Some(level) = &args.log {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(level))
            .with_timer(SimElapsed)
            .with_writer(std::io::stderr)
            .init();
    }
    let scenarios: Vec<&'static Scenario> = if args.scenario == "all" {
        SCENARIOS.iter().filter(|s| s.in_ci).collect()
    } else {
        match scenario(&args.scenario) {
            Some(s) => vec![s],
            None => {
                let names: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
                eprintln!("no scenario {:?}; there are: all, {}", args.scenario, names.join(", "));
                std::process::exit(2);
            }
        }
    };
    if let Some(seed) = args.seed {
        if scenarios.len() != 1 {
            eprintln!("--seed replays one scenario: name it with --scenario");
            std::process::exit(2);
        }
        let report = run_seed(scenarios[0], seed);
        if args.history || !report.passed() {
            for line in &report.history {
                println!("{line}");
            }
        }
        if report.passed() {
            println!(
                "scenario {} seed {}: passed ({} operations, {:.1} s simulated)",
                report.scenario,
                seed,
                report.operations,
                report.simulated.as_secs_f64()
            );
        } else {
            report_failure(&report);
            std::process::exit(1);
        }
        return;
    }
    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(0u64));
    let began = Instant::now();
    let forever = args.seeds == 0;
    let threads: Vec<_> = (0..jobs)
        .map(|_| {
            let (next, done, failed, failures, scenarios) =
                (next.clone(), done.clone(), failed.clone(), failures.clone(), scenarios.clone());
            let (first, seeds, keep_going, history) = (args.first, args.seeds, args.keep_going, args.history);
            std::thread::spawn(move || loop {
                if failed.load(Ordering::Relaxed) && !keep_going {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if !forever && i >= seeds {
                    return;
                }
                let scenario = scenarios[(i % scenarios.len() as u64) as usize];
                let report = run_seed(scenario, first + i);
                if !report.passed() {
                    failed.store(true, Ordering::Relaxed);
                    *failures.lock().expect("failures lock") += 1;
                    report_failure(&report);
                } else if history {
                    report.history.iter().for_each(|line| println!("{line}"));
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    let mut last_print = Instant::now();
    while threads.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            let n = done.load(Ordering::Relaxed);
            eprintln!("{n} seeds, {:.1} seeds/s", n as f64 / began.elapsed().as_secs_f64());
        }
    }
    for thread in threads {
        let _ = thread.join();
    }
    let n = done.load(Ordering::Relaxed);
    let failures = *failures.lock().expect("failures lock");
    println!(
        "{n} seeds ({} scenario(s), from seed {}) in {:.1} s: {:.1} seeds/s on {jobs} thread(s); {failures} failed",
        scenarios.len(),
        args.first,
        began.elapsed().as_secs_f64(),
        n as f64 / began.elapsed().as_secs_f64()
    );
    if failures > 0 {
        std::process::exit(1);
    }
}
