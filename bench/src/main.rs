//! `bench`: launch a local tandem cluster, drive bank-transfer workloads,
//! inject faults, and compare the protocols side by side.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tandem::cluster::{default_bin_dir, Cluster, ClusterSpec};
use tandem_bench::postgres;
use tandem_bench::report::{self, RunReport};
use tandem_bench::run::{run_protocol, RunOptions};
use tandem_bench::scenario::{self, LoopMode, Protocol, Skew};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "tandem's benchmark harness: local clusters of the real binaries, bank-transfer workloads, faults, invariants, reports"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a scenario: each protocol on a fresh local cluster with the same
    /// seed, then check the invariants and write the report. Exits 1 if an
    /// invariant is violated (the table and report say which), 2 if the run
    /// could not be made (bad scenario, a cluster that does not start).
    Run(RunArgs),
    /// Manage a local cluster by hand.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// List the preset scenarios.
    Scenarios,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// A preset name (see `bench scenarios`) or a TOML file.
    #[arg(long, default_value = "default")]
    scenario: String,
    /// Run only this protocol (repeat for several): 2pc (parallel commit,
    /// the coordinator's default), 2pc-batch (the same 2PC, its clients sending their transfers together in TransferBatch calls, as a batching client library does), 2pc-classic (the coordinator run with
    /// --commit-protocol classic), orchestrated, choreographed, or a
    /// PostgreSQL baseline: postgres-local (one
    /// database, one local transaction), postgres-2pc (a server per
    /// participant, PREPARE TRANSACTION). The baselines need PostgreSQL's
    /// binaries (scripts/setup installs them) and are skipped, with the
    /// reason, without them.
    #[arg(long = "protocol", value_parser = Protocol::parse)]
    protocols: Vec<Protocol>,
    /// Override the measured duration of each protocol's run, in seconds.
    #[arg(long)]
    duration_s: Option<f64>,
    /// Override: closed loop with this many concurrent clients.
    #[arg(long)]
    clients: Option<usize>,
    /// Override: open loop at this many transfers per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Override the number of participants.
    #[arg(long)]
    participants: Option<usize>,
    /// Override the accounts per participant.
    #[arg(long)]
    accounts: Option<u64>,
    /// Override: Zipf-skewed account choice with this exponent.
    #[arg(long)]
    zipf: Option<f64>,
    /// Override the share (0 to 1) of transfers whose two accounts are on
    /// different participants (postgres-2pc always crosses).
    #[arg(long)]
    cross_share: Option<f64>,
    /// Override the seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Drop the scenario's faults.
    #[arg(long)]
    no_faults: bool,
    /// Where results go (default: bench-results/<scenario>-<time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the clusters' data directories after the run.
    #[arg(long)]
    keep_data: bool,
    /// Where the coordinator and participant binaries are (default: beside bench).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Plaintext links without certificates (the nodes run with
    /// --insecure): to measure what TLS costs. By default every link is
    /// mutual TLS with a throw-away CA made for the run.
    #[arg(long)]
    insecure: bool,
    /// Nodes without --http-addr: no metrics recorded nor served, and no
    /// per-transfer table (to measure what the metrics cost).
    #[arg(long)]
    no_metrics: bool,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Start a coordinator and participants, open the accounts, print the
    /// endpoints, and run until Ctrl-C. A node that crashes meanwhile is
    /// reported at once and makes the exit code 1.
    Up(UpOptions),
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tandem::server::init_tracing("warn");
    let args = Args::parse();
    let result = match args.command {
        Command::Run(run) => run_command(run).await,
        Command::Cluster { command: ClusterCommand::Up(options) } => cluster_up(options).await,
        Command::Scenarios => {
            for (name, text) in scenario::PRESETS {
                let description = scenario::Scenario::from_toml(text, name).map(|s| s.description).unwrap_or_default();
                println!("{name:>18}  {description}");
            }
            Ok(true)
        }
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("bench: {error}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run_command(args: RunArgs) -> Result<bool, String> {
    let mut scenario = scenario::resolve(&args.scenario)?;
    if !args.protocols.is_empty() {
        scenario.protocols = args.protocols.clone();
    }
    if let Some(d) = args.duration_s {
        scenario.duration_s = d;
        scenario.faults.retain(|f| f.at_s < d);
    }
    if let Some(c) = args.clients {
        scenario.workload.mode = LoopMode::Closed;
        scenario.workload.clients = c;
    }
    if let Some(r) = args.rate {
        scenario.workload.mode = LoopMode::Open;
        scenario.workload.rate_per_s = r;
    }
    if let Some(p) = args.participants {
        scenario.cluster.participants = p;
    }
    if let Some(a) = args.accounts {
        scenario.cluster.accounts_per_participant = a;
    }
    if let Some(z) = args.zipf {
        scenario.workload.skew = Skew::Zipf;
        scenario.workload.zipf_exponent = z;
    }
    if let Some(share) = args.cross_share {
        scenario.workload.cross_share = Some(share);
    }
    if let Some(s) = args.seed {
        scenario.seed = s;
    }
    if args.no_faults {
        scenario.faults.clear();
    }
    scenario.validate().map_err(|e| format!("after the command-line overrides: {e}"))?;
    let out_dir =
        args.out.unwrap_or_else(|| PathBuf::from("bench-results").join(format!("{}-{}", scenario.name, unix_now())));
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let options = RunOptions {
        out_dir: out_dir.clone(),
        bin_dir: args.bin_dir.unwrap_or_else(default_bin_dir),
        keep_data: args.keep_data,
        progress: true,
        insecure: args.insecure,
        metrics: !args.no_metrics,
    };
    let started_unix_s = unix_now();
    let mut results = Vec::new();
    let (mut baselines, mut skipped) = (Vec::new(), Vec::new());
    for protocol in scenario.protocols.clone() {
        if protocol.is_baseline() {
            // A baseline that cannot run is said and skipped; it does not
            // fail the run.
            match postgres::run(&scenario, protocol, &options).await {
                Ok((result, info)) => {
                    results.push(result);
                    baselines.push(info);
                }
                Err(skip) => {
                    eprintln!("{protocol}: SKIPPED: {}", skip.reason);
                    skipped.push(skip);
                }
            }
            continue;
        }
        eprintln!("{protocol}: starting a fresh cluster");
        results.push(run_protocol(&scenario, protocol, &options).await?);
    }
    let report = RunReport {
        scenario,
        started_unix_s,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        results,
        baselines,
        skipped,
    };
    println!("\n{}", report::table(&report));
    let path = report::write_all(&report, &out_dir)?;
    println!("report: {}", path.display());
    Ok(report.passed())
}

/// `bench cluster up`: the cluster to start and how.
#[derive(clap::Args, Debug)]
struct UpOptions {
    #[arg(long, default_value_t = 2)]
    participants: usize,
    #[arg(long, default_value_t = 1_000)]
    accounts: u64,
    #[arg(long, default_value_t = 1_000_000)]
    initial_balance: i64,
    /// Data directory (default: a fresh one under bench-results/).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep the data directory when stopping.
    #[arg(long)]
    keep_data: bool,
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Log level of the nodes.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Plaintext links without certificates: every caller may make
    /// every call. By default the cluster runs over mutual TLS with a
    /// throw-away CA whose certificates are written in DATA_DIR/tls/.
    #[arg(long)]
    insecure: bool,
    /// Do not start the operator's console (`tandemctl console`, from the
    /// same directory as the nodes' binaries, with the cluster's operator
    /// certificate; it stops with the cluster).
    #[arg(long)]
    no_console: bool,
}

/// The cluster's console: `tandemctl console` as the cluster's operator,
/// on loopback, with the coordinator's metrics for its live figures. The
/// process and the URL (with its token) it printed.
async fn start_console(cluster: &Cluster) -> Result<(tokio::process::Child, String), String> {
    use tokio::io::AsyncBufReadExt;
    let binary = cluster.spec.bin_dir.join("tandemctl");
    if !binary.exists() {
        return Err(format!("{} is missing; build it: cargo build --release --workspace", binary.display()));
    }
    let mut command = tokio::process::Command::new(&binary);
    for variable in ["TANDEM_COORDINATOR", "TANDEM_PARTICIPANTS", "TANDEM_TLS_CERT", "TANDEM_TLS_KEY", "TANDEM_TLS_CA"]
    {
        command.env_remove(variable);
    }
    match cluster.tls_dir() {
        Some(dir) => command
            .arg("--tls-cert")
            .arg(dir.join("operator.pem"))
            .arg("--tls-key")
            .arg(dir.join("operator.key"))
            .arg("--tls-ca")
            .arg(dir.join("ca.pem")),
        None => command.arg("--insecure"),
    };
    command.args(["--coordinator", &cluster.coordinator.url()]);
    for (i, p) in cluster.participants.iter().enumerate() {
        command.arg("--participant").arg(format!("p{}={}", i + 1, p.url()));
    }
    command.arg("console");
    if let Some(http_addr) = cluster.coordinator.http_addr {
        let scheme = if cluster.tls_dir().is_some() { "https" } else { "http" };
        command.args(["--coordinator-metrics", &format!("{scheme}://{http_addr}")]);
    }
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let stdout = child.stdout.take().ok_or("the console's stdout is not piped")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
    // Keep draining its stdout so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    match line {
        Ok(Ok(Some(line))) if line.starts_with("console on ") => Ok((child, line["console on ".len()..].to_string())),
        other => {
            let _ = child.start_kill();
            Err(format!("it did not print its address ({other:?})"))
        }
    }
}

async fn cluster_up(options: UpOptions) -> Result<bool, String> {
    let UpOptions {
        participants,
        accounts,
        initial_balance,
        data_dir,
        keep_data,
        bin_dir,
        log_level,
        insecure,
        no_console,
    } = options;
    if participants == 0 || accounts == 0 || initial_balance < 0 {
        return Err("--participants and --accounts must be positive, --initial-balance not negative".into());
    }
    let data_dir = data_dir.unwrap_or_else(|| PathBuf::from("bench-results").join(format!("cluster-{}", unix_now())));
    let mut spec = ClusterSpec::new(bin_dir.unwrap_or_else(default_bin_dir), data_dir.clone());
    spec.participants = participants;
    spec.accounts_per_participant = accounts;
    spec.initial_balance = initial_balance;
    spec.log_level = log_level;
    spec.insecure = insecure;
    let mut cluster = Cluster::start(spec).await.map_err(|e| e.to_string())?;
    println!("tandem cluster up (data and logs in {}):", data_dir.display());
    println!("  coordinator c1  {}  (pid {})", cluster.coordinator.url(), cluster.coordinator.pid().unwrap_or(0));
    for (i, p) in cluster.participants.iter().enumerate() {
        let first = i as u64 * accounts;
        println!(
            "  participant p{}  {}  accounts {}..{}  (pid {})",
            i + 1,
            p.url(),
            first,
            first + accounts,
            p.pid().unwrap_or(0)
        );
    }
    let addr = cluster.coordinator.addr;
    // Every node's metrics (docs/metrics.md), and how curl reads them.
    let scheme = if cluster.tls_dir().is_some() { "https" } else { "http" };
    let metrics_of = |name: String, http_addr: Option<std::net::SocketAddr>| {
        if let Some(http_addr) = http_addr {
            println!("  metrics of {name:<3} {scheme}://{http_addr}/metrics");
        }
    };
    println!();
    metrics_of("c1".into(), cluster.coordinator.http_addr);
    for (i, p) in cluster.participants.iter().enumerate() {
        metrics_of(format!("p{}", i + 1), p.http_addr);
    }
    // How grpcurl speaks as the bench's client or operator.
    let (client, operator) = match cluster.tls_dir() {
        Some(dir) => {
            let tls = |stem: &str| {
                let d = dir.display();
                format!("-cacert {d}/ca.pem -cert {d}/{stem}.pem -key {d}/{stem}.key")
            };
            println!("\nMutual TLS: the CA and every certificate are in {} (client.pem: tandem://client/bench; operator.pem: tandem://operator/bench)", dir.display());
            println!(
                "  curl --cacert {d}/ca.pem --cert {d}/operator.pem --key {d}/operator.key https://{}/metrics",
                cluster.coordinator.http_addr.map(|a| a.to_string()).unwrap_or_default(),
                d = dir.display()
            );
            (tls("client"), tls("operator"))
        }
        None => {
            println!("\n--insecure: plaintext, every caller may make every call");
            ("-plaintext".to_string(), "-plaintext".to_string())
        }
    };
    println!("\nTry, with grpcurl (reflection is on):");
    println!("  grpcurl {client} -d '{{\"from_account\": 0, \"to_account\": {accounts}, \"amount\": 100}}' {addr} tandem.v1.Coordinator/Transfer");
    println!("  grpcurl {client} -d '{{}}' {addr} tandem.v1.Coordinator/Audit");
    println!("  grpcurl {operator} -d '{{}}' {addr} tandem.v1.Coordinator/ListDeadLetters");
    // The same cluster through tandemctl, as its operator: its flags in the
    // environment, so the commands below paste as they are.
    let participants: Vec<String> =
        cluster.participants.iter().enumerate().map(|(i, p)| format!("p{}={}", i + 1, p.url())).collect();
    println!("\nOr with tandemctl, as the operator (every command explains itself with --help):");
    println!(
        "  export TANDEM_COORDINATOR={} TANDEM_PARTICIPANTS={}",
        cluster.coordinator.url(),
        participants.join(",")
    );
    let tandemctl = cluster.spec.bin_dir.join("tandemctl").display().to_string();
    let tandemctl = match cluster.tls_dir() {
        Some(dir) => {
            let d = dir.display();
            println!(
                "  export TANDEM_TLS_CERT={d}/operator.pem TANDEM_TLS_KEY={d}/operator.key TANDEM_TLS_CA={d}/ca.pem"
            );
            tandemctl
        }
        None => format!("{tandemctl} --insecure"),
    };
    println!("  {tandemctl} status");
    println!("  {tandemctl} audit --expected-money {}", cluster.spec.total_money());
    println!("  {tandemctl} in-doubt list");
    println!("  {tandemctl} dead-letters list");
    println!("  {tandemctl} --json balances");
    let mut console = None;
    if !no_console {
        match start_console(&cluster).await {
            Ok((child, url)) => {
                println!(
                    "\nThe operator's console (this browser only: the token becomes a cookie; --no-console: none):"
                );
                println!("  {url}");
                console = Some(child);
            }
            Err(why) => eprintln!("\nthe console did not start: {why}"),
        }
    }
    println!("\nCtrl-C stops the cluster.");
    let mut check = tokio::time::interval(Duration::from_millis(500));
    let mut crashed = Vec::new();
    loop {
        tokio::select! {
            _ = tandem::server::shutdown_signal() => break,
            _ = check.tick() => {
                for (node, status) in cluster.crashed() {
                    eprintln!("{node} exited: {status}; see {}", cluster.data_dir().join(format!("{node}.log")).display());
                    crashed.push(node);
                }
                if let Some(Ok(Some(status))) = console.as_mut().map(|child| child.try_wait()) {
                    eprintln!("the console exited: {status}");
                    console = None;
                }
            }
        }
    }
    if let Some(mut child) = console.take() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    cluster.stop().await;
    if !crashed.is_empty() {
        // Reported again at the end, and in the exit code: a crashed node is
        // never hidden behind a clean stop.
        eprintln!("nodes that crashed while the cluster was up: {crashed:?}");
    }
    if keep_data {
        println!("stopped; data kept in {}", data_dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&data_dir);
        println!("stopped; data removed");
    }
    Ok(crashed.is_empty())
}

/// mimalloc, as the nodes use: the bench's clients share the machine's two
/// cores with the nodes they measure, so every cycle the client spends in
/// glibc's malloc is taken from the system under test.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
