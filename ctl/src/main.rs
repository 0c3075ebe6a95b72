//! `tandemctl`: the operator's command line for a running tandem cluster.
//!
//! It asks the nodes' own gRPC API, as the operator (mutual TLS with an
//! operator certificate, `tandem://operator/NAME`; some reads are open to a
//! client certificate too), and prints a table for a person or, with
//! `--json`, one JSON document for a script. It holds no state and changes
//! nothing but what its `resolve` commands ask a node to change.
//!
//! Why a tool and not grpcurl: the answers an operator needs are spread
//! over several RPCs and nodes (a transaction's fate is the coordinator's
//! record plus every participant's; "is anything stuck" is health,
//! readiness, orphans, dead letters and parked transfers), and its exit
//! code says whether all is well (see [`report`]).
//!
//! Layout: [`nodes`] names the nodes and turns a failed call into an
//! error naming node and RPC; one module per concern builds a view
//! ([`status`], [`txn`], [`in_doubt`], [`suspense`], [`ledger`]);
//! [`table`] renders it for people; [`report`] holds the exit codes;
//! [`console`] serves the same views as web pages, with the resolve
//! actions.

mod console;
mod in_doubt;
mod ledger;
mod nodes;
mod report;
mod status;
mod suspense;
mod table;
mod txn;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use nodes::{Nodes, UsageError};
use report::{Report, EXIT_USAGE};
use std::process::ExitCode;
use std::time::Duration;
use tandem::tls::TlsFlags;

/// Longest deadline one call may be given.
const TIMEOUT_MS_MAX: u64 = 600_000;

/// Most rows a list prints by default.
const LIST_LIMIT_DEFAULT: u32 = 100;

#[derive(Parser, Debug)]
#[command(
    name = "tandemctl",
    version,
    about = "The operator's command line for a running tandem cluster",
    long_about = "The operator's command line for a running tandem cluster: health, one transaction's fate on every \
                  node, in-doubt transactions, dead letters, parked transfers, balances, the audit.\n\n\
                  It talks to the nodes' gRPC API with mutual TLS, as the certificate given (--tls-cert: an operator \
                  certificate, tandem://operator/NAME; `status`, `txn get` and `audit` partly work with a client \
                  certificate). Node flags go before the command; the environment can hold them: TANDEM_COORDINATOR, \
                  TANDEM_PARTICIPANTS (NAME=URL,NAME=URL), TANDEM_TLS_CERT, TANDEM_TLS_KEY, TANDEM_TLS_CA.\n\n\
                  Exit codes: 0 all is well; 1 the command ran and found something wrong (each command's --help \
                  says what); 2 usage error; 3 a node could not be reached or answered an error (stderr names the \
                  node, the RPC, the gRPC code and message; what the other nodes answered is still printed)."
)]
struct Cli {
    /// The coordinator's URL (https://HOST:PORT; http:// with --insecure).
    #[arg(long, value_name = "URL", env = "TANDEM_COORDINATOR")]
    coordinator: Option<String>,
    /// A participant as NAME=URL, NAME being its id in the coordinator's
    /// directory (e.g. p1=https://127.0.0.1:7101); repeat for each.
    #[arg(long = "participant", value_name = "NAME=URL", env = "TANDEM_PARTICIPANTS", value_delimiter = ',')]
    participants: Vec<String>,
    #[command(flatten)]
    tls: TlsFlags,
    /// Deadline of each call, in milliseconds.
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    timeout_ms: u64,
    /// Print one JSON document instead of a table (the same fields, whole:
    /// no text is cut).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Each node's health and the coordinator's readiness, and what waits
    /// for an operator.
    ///
    /// Liveness ("" on every node), the coordinator's readiness
    /// (tandem.v1.Coordinator.ready: it reaches every participant) and its
    /// view of each participant named (tandem.v1.Participant/NAME); per
    /// participant: accounts, prepared transactions and the oldest's age,
    /// orphans, heuristic-mixed decisions, parked transfers, suspense; the
    /// coordinator's dead letters.
    ///
    /// Exit 1 if a node or the readiness is not SERVING, the coordinator
    /// does not know a participant named, or something waits for an
    /// operator (orphans, heuristic-mixed decisions, dead letters, parked
    /// transfers); 3 if a node could not be reached.
    ///
    /// Certificate: health needs any certificate of the cluster's CA; the
    /// counts need an operator's (ReadBalances, ListPrepared,
    /// ListParkedTransfers, ListDeadLetters).
    Status,
    /// One transaction.
    Txn {
        #[command(subcommand)]
        command: TxnCommand,
    },
    /// Transactions prepared on the participants whose outcome is not known
    /// yet, and heuristic decisions.
    InDoubt {
        #[command(subcommand)]
        command: InDoubtCommand,
    },
    /// Orchestrated sagas whose refund failed; their money waits in a
    /// participant's suspense account.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
    /// Choreographed transfers whose refund failed; their money waits in
    /// the source participant's suspense account.
    Parked {
        #[command(subcommand)]
        command: ParkedCommand,
    },
    /// Each participant's totals (posted, reserved, incoming, suspense,
    /// heuristic excess), or one account's balance.
    ///
    /// Each participant is read at its own instant, so while transfers run
    /// the sum can show one half applied; `audit` reads a consistent cut.
    /// With --expected-money, exit 1 if posted + suspense - heuristic
    /// excess differs.
    ///
    /// Certificate: operator (ReadBalances); --account works with a client
    /// certificate too (GetBalance).
    Balances {
        /// Only this account: every participant named is asked (tandemctl
        /// does not know the directory's ranges); exit 1 if none has it.
        #[arg(long, value_name = "N")]
        account: Option<u64>,
        /// The money the system should hold (what was opened), to compare
        /// with.
        #[arg(long, value_name = "N", conflicts_with = "account")]
        expected_money: Option<i128>,
    },
    /// The coordinator's consistent audit of every balance on every
    /// participant.
    ///
    /// Money = posted + suspense - heuristic excess, at a cut where exactly
    /// the decided commits are applied (see coordinator.proto, Audit).
    /// Exit 1 if it differs from --expected-money, or if heuristic-mixed
    /// decisions left an excess; 3 if the audit was refused (a participant
    /// not answering in time: UNAVAILABLE; orphans held:
    /// FAILED_PRECONDITION).
    ///
    /// Certificate: operator or client (Audit).
    Audit {
        /// The money the system should hold (what was opened); without it
        /// `balanced` is null: nothing in the API records that figure.
        #[arg(long, value_name = "N")]
        expected_money: Option<i128>,
    },
    /// Serve the operator's console: a web page for a browser on this
    /// machine, with the same views as these commands and the resolve
    /// actions.
    ///
    /// It prints `console on http://ADDR/?token=TOKEN` and serves until
    /// Ctrl-C: open that URL (the token, random per start, becomes an
    /// HttpOnly cookie; a request without it is refused, 403). Pages: the
    /// overview (live commits/s and latency from the coordinator's metrics,
    /// nodes' health, transactions in doubt with their age, what waits for
    /// an operator), a lookup by transaction or saga id, dead letters and
    /// parked transfers with their resolve forms (a reason is required).
    /// Nothing is loaded from elsewhere: it works without internet.
    ///
    /// It calls the nodes as the certificate given, like every command
    /// (operator: every page and action work).
    Console(console::ConsoleArgs),
}

#[derive(Subcommand, Debug)]
enum TxnCommand {
    /// What the coordinator (GetTransaction) and every participant
    /// (LookupTransaction) know of one transaction or orchestrated saga;
    /// for a choreographed transfer's saga id, its state on the participant
    /// it started on (GetTransferStatus).
    ///
    /// UNKNOWN on the coordinator: no record (presumed aborted, or finished
    /// and collected); on a participant: never prepared there, or finished
    /// and collected. Exit 1 if the records disagree (one participant
    /// committed, another aborted; a participant against the decision), or
    /// one is orphaned or heuristic-mixed.
    ///
    /// Certificate: operator (LookupTransaction is operator only;
    /// GetTransaction is open to clients too).
    Get {
        /// The transaction id (as Transfer answered it), or a saga id
        /// (orchestrated or choreographed).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum InDoubtCommand {
    /// Each participant's prepared transactions (oldest first, with their
    /// age, orphans marked) and every heuristic decision held (ListPrepared).
    ///
    /// A prepared transaction is normally decided within milliseconds; an
    /// old one, or an orphan (its coordinator lost its log), waits for an
    /// operator: see `in-doubt resolve`.
    ///
    /// Certificate: operator (ListPrepared).
    List {
        /// At most this many prepared transactions per participant (1 to
        /// 1000; ListPrepared's own limit).
        #[arg(long, default_value_t = LIST_LIMIT_DEFAULT)]
        limit: u32,
    },
    /// Force one prepared transaction on one participant to commit or
    /// abort: a heuristic decision (ResolveInDoubt), stored with the reason
    /// and never collected.
    ///
    /// Look first (`tandemctl txn get ID`): if another participant committed
    /// it, commit it here too. If the coordinator later delivers the other
    /// outcome, the transaction becomes heuristic-mixed, and the audit
    /// reports its excess. A transaction not prepared there is refused
    /// (FAILED_PRECONDITION; NOT_FOUND when unknown): exit 3.
    ///
    /// Certificate: operator only (ResolveInDoubt).
    #[command(group(clap::ArgGroup::new("outcome").required(true).args(["commit", "abort"])))]
    Resolve {
        /// The participant, by its name in --participant NAME=URL.
        #[arg(long, value_name = "NAME")]
        participant: String,
        /// The transaction id.
        id: String,
        /// Apply its legs here.
        #[arg(long)]
        commit: bool,
        /// Release them.
        #[arg(long)]
        abort: bool,
        /// Who decided and why (stored with the decision; 1 to 4,096 bytes).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum DeadLettersCommand {
    /// The coordinator's dead letters, oldest saga first: saga, accounts,
    /// amount, the participant whose suspense holds it, and why
    /// (ListDeadLetters), and how many there are in all.
    ///
    /// Certificate: operator only.
    List {
        /// At most this many (1 to 1000; ListDeadLetters's own limit).
        #[arg(long, default_value_t = LIST_LIMIT_DEFAULT)]
        limit: u32,
    },
    /// Move a dead letter's money from suspense to an account, and mark it
    /// RESOLVED (ResolveDeadLetter), with the operator's reason.
    ///
    /// Exit 1 if the answer is not RESOLVED (e.g. the account is still
    /// closed; the answer says why). The coordinator keeps the reason and
    /// the operator's identity in the saga's record.
    ///
    /// Certificate: operator only.
    Resolve {
        /// The saga id.
        id: String,
        /// Where the money goes: an account on the suspense participant
        /// (default: the saga's source account, which must be open).
        #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
        to_account: u64,
        /// Who decided and why (stored with the record; 1 to 4,096 bytes).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum ParkedCommand {
    /// Each participant's parked choreographed transfers, in saga id
    /// order: id, state, why (ListParkedTransfers), and how many each
    /// holds in all.
    ///
    /// Certificate: operator only.
    List {
        /// At most this many per participant (1 to 1000;
        /// ListParkedTransfers's own limit).
        #[arg(long, default_value_t = LIST_LIMIT_DEFAULT)]
        limit: u32,
    },
    /// Release a parked transfer's money from suspense to an account, and
    /// mark it RESOLVED (ResolveParkedTransfer), with the operator's
    /// reason.
    ///
    /// Exit 1 if the answer is not RESOLVED. A transfer that is not parked
    /// is refused (INVALID_ARGUMENT; NOT_FOUND when unknown): exit 3. The
    /// participant keeps the reason and the operator's identity in the
    /// transfer's record.
    ///
    /// Certificate: operator only.
    Resolve {
        /// The participant that holds it (the transfer's source), by its
        /// name in --participant NAME=URL.
        #[arg(long, value_name = "NAME")]
        participant: String,
        /// The transfer's saga id.
        id: String,
        /// Where the money goes: an account on that participant (default:
        /// the transfer's source account, which must be open).
        #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
        to_account: u64,
        /// Who decided and why (stored with the record; 1 to 4,096 bytes).
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
}

/// The command line, with environment fallbacks for the certificate paths
/// (the shared [`TlsFlags`] have none; a node's variables carry its binary's
/// name, `TANDEM_PARTICIPANT_TLS_CERT`, so it never takes these).
fn parse() -> Cli {
    let command = Cli::command()
        .mut_arg("tls_cert", |arg| arg.env("TANDEM_TLS_CERT"))
        .mut_arg("tls_key", |arg| arg.env("TANDEM_TLS_KEY"))
        .mut_arg("tls_ca", |arg| arg.env("TANDEM_TLS_CA"));
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

async fn run(cli: Cli) -> Result<Report, UsageError> {
    if cli.timeout_ms == 0 || cli.timeout_ms > TIMEOUT_MS_MAX {
        return Err(UsageError(format!("--timeout-ms {}: give 1 to {TIMEOUT_MS_MAX}", cli.timeout_ms)));
    }
    let security = cli.tls.security().map_err(|e| UsageError(e.to_string()))?;
    let nodes =
        Nodes::new(cli.coordinator.as_deref(), &cli.participants, &security, Duration::from_millis(cli.timeout_ms))?;
    match cli.command {
        Command::Status => status::run(&nodes).await,
        Command::Txn { command: TxnCommand::Get { id } } => txn::get(&nodes, &id).await,
        Command::InDoubt { command: InDoubtCommand::List { limit } } => in_doubt::list(&nodes, limit).await,
        Command::InDoubt { command: InDoubtCommand::Resolve { participant, id, commit, abort, reason } } => {
            debug_assert!(commit != abort, "clap's group makes them exclusive and required");
            in_doubt::resolve(&nodes, &participant, &id, commit && !abort, &reason).await
        }
        Command::DeadLetters { command: DeadLettersCommand::List { limit } } => {
            suspense::list_dead_letters(&nodes, limit).await
        }
        Command::DeadLetters { command: DeadLettersCommand::Resolve { id, to_account, reason } } => {
            suspense::resolve_dead_letter(&nodes, &id, to_account, &reason).await
        }
        Command::Parked { command: ParkedCommand::List { limit } } => suspense::list_parked(&nodes, limit).await,
        Command::Parked { command: ParkedCommand::Resolve { participant, id, to_account, reason } } => {
            suspense::resolve_parked(&nodes, &participant, &id, to_account, &reason).await
        }
        Command::Console(args) => console::run(nodes, security, args).await,
        Command::Balances { account: Some(account), .. } => ledger::account(&nodes, account).await,
        Command::Balances { account: None, expected_money } => ledger::balances(&nodes, expected_money).await,
        Command::Audit { expected_money } => ledger::audit(&nodes, expected_money).await,
    }
}

fn main() -> ExitCode {
    let cli = parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tandemctl: cannot start its runtime: {e}");
            return ExitCode::from(report::EXIT_RPC_FAILED);
        }
    };
    let report = match runtime.block_on(run(cli)) {
        Ok(report) => report,
        Err(usage) => {
            eprintln!("tandemctl: {usage}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let out = if json { &report.json } else { &report.text };
    if !out.is_empty() {
        println!("{}", out.trim_end());
    }
    if !json {
        for finding in &report.findings {
            println!("attention: {finding}");
        }
    }
    for error in &report.errors {
        eprintln!("tandemctl: {error}");
    }
    ExitCode::from(report.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodes::rpc;
    use tandem::trust::{Role, Who, POLICY};

    /// Who may make `rpc`, by the trust policy.
    fn allowed(rpc: &str, role: Role) -> bool {
        let path = format!("/{rpc}");
        let (_, who) = POLICY.iter().find(|(p, _)| *p == path).unwrap_or_else(|| panic!("{path} has no policy row"));
        who.iter().any(|w| *w == Who::Role(role) || *w == Who::Authenticated)
    }

    /// The help says which certificate each command needs; this holds it
    /// to the trust policy.
    #[test]
    fn every_rpc_tandemctl_makes_is_open_to_the_operator_and_the_help_says_who_else() {
        let every = [
            rpc::HEALTH_CHECK,
            // `status` asks a node that is not serving why.
            "tandem.v1.Coordinator/GetHealth",
            "tandem.v1.Participant/GetHealth",
            rpc::GET_TRANSACTION,
            rpc::AUDIT,
            rpc::LIST_DEAD_LETTERS,
            rpc::RESOLVE_DEAD_LETTER,
            rpc::LOOKUP_TRANSACTION,
            rpc::LIST_PREPARED,
            rpc::RESOLVE_IN_DOUBT,
            rpc::LIST_PARKED_TRANSFERS,
            rpc::RESOLVE_PARKED_TRANSFER,
            rpc::GET_TRANSFER_STATUS,
            rpc::READ_BALANCES,
            rpc::GET_BALANCE,
        ];
        for rpc in every {
            assert!(allowed(rpc, Role::Operator), "{rpc} is not open to the operator");
        }
        // What the help says a client certificate can do.
        for rpc in [rpc::HEALTH_CHECK, rpc::GET_TRANSACTION, rpc::AUDIT, rpc::GET_BALANCE] {
            assert!(allowed(rpc, Role::Client), "{rpc}: the help says a client may");
        }
        // What it says only an operator can do.
        for rpc in [
            rpc::LOOKUP_TRANSACTION,
            rpc::RESOLVE_IN_DOUBT,
            rpc::LIST_DEAD_LETTERS,
            rpc::RESOLVE_DEAD_LETTER,
            rpc::LIST_PARKED_TRANSFERS,
            rpc::RESOLVE_PARKED_TRANSFER,
        ] {
            assert!(!allowed(rpc, Role::Client), "{rpc}: the help says operator only");
        }
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
