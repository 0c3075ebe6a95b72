//! A node's configuration from its flags, environment variables and a TOML
//! file, in that order of precedence, over the defaults; `--print-config`
//! prints the result as a file that `--config` reads back.
//!
//! The flags are the schema. Every long flag of a node is a key of the file,
//! spelt as the flag (`data-dir`) or in snake case (`data_dir`), and an
//! environment variable `TANDEM_<NODE>_<FLAG>` (`TANDEM_PARTICIPANT_DATA_DIR`;
//! the node's name in the prefix keeps a participant from taking a
//! coordinator's settings, or `tandemctl`'s `TANDEM_TLS_CERT`, from a shared
//! shell). A value of the file is handed to clap as if it had been typed,
//! so it meets the same value parser, the same required flags and the same
//! conflicts as a flag: there is no second struct to drift from the first.
//!
//! How: the command line is parsed once leniently (a flag that only the file
//! gives is not missing yet) to find `--config` and where each value came
//! from ([`clap::ArgMatches::value_source`]). Each key of the file becomes
//! `--flag=value`, put before what was typed, for every flag that neither
//! the command line nor the environment set; then clap parses that strictly.
//! A flag given on the command line replaces the file's value whole (a
//! repeatable flag's list too).
//!
//! Values: strings, integers (written out in decimal), floats (a ratio
//! such as `trace-sample-ratio = 0.01`), booleans (a switch
//! like `insecure = true`, or a flag that takes true|false), and arrays of
//! those for a repeatable flag (`peer = ["p1=http://...", "p2=http://..."]`;
//! in the environment a repeatable flag's values are comma-separated, and so
//! they are on the command line too: `--peer a,b` is two peers). Tables
//! and dates have no flag to go to: an error, as is an unknown key.
//! Nothing read from the file reaches an `unwrap`: every bad input is an
//! error that names the file and the key.
//!
//! Hidden flags (the coordinator's "gone" ones) are keys too, so a file that
//! still sets one meets the same message as the flag, but they are neither
//! listed nor printed, and have no environment variable.

use clap::builder::BoolishValueParser;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest configuration file read (a node's settings are a few hundred
/// bytes).
pub const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// The flags every node has for its configuration file. Flatten it into the
/// node's arguments and parse them with [`parse`].
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigFlags {
    /// A TOML file of settings. Each key is a flag of this command without
    /// its leading dashes, as written (data-dir) or in snake case (data_dir):
    /// listen = "127.0.0.1:7101", insecure = true, peer = ["p1=URL",
    /// "p2=URL"] for a repeatable flag. Flags, then environment variables,
    /// override it; an unknown key is an error. --print-config writes one.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the configuration this command would run with (flags,
    /// environment, --config and defaults, each value marked with where it
    /// came from), as a file that --config reads, and exit without starting.
    #[arg(long)]
    pub print_config: bool,
}

/// The ids of [`ConfigFlags`]' arguments.
const CONFIG_ID: &str = "config";
const PRINT_CONFIG_ID: &str = "print_config";

/// What the command line asks for.
#[derive(Debug)]
pub enum Parsed<T> {
    /// Start the node with these arguments.
    Run(T),
    /// `--print-config`: print this text (a TOML file) and exit.
    Print(String),
}

/// Why the configuration was refused.
#[derive(Debug)]
pub enum ConfigError {
    /// clap's own: a usage error, or `--help` or `--version` (which exit 0).
    /// `note` says which values came from the file, when some did: clap
    /// names them by their flags.
    Clap { error: clap::Error, note: Option<String> },
    /// The file cannot be read, is not TOML, or holds a key or a value that
    /// no flag takes; or the configuration cannot be printed.
    Invalid(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Clap { error, note: None } => write!(f, "{error}"),
            ConfigError::Clap { error, note: Some(note) } => write!(f, "{error}{note}"),
            ConfigError::Invalid(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// Prints the error as clap would and exits: 0 for `--help` and
    /// `--version`, 2 for a usage error or a bad file.
    pub fn exit(self, name: &str) -> ! {
        match self {
            ConfigError::Clap { error, note } => {
                // If stderr is gone there is no one to tell.
                let _ = error.print();
                if let Some(note) = note {
                    eprintln!("{note}");
                }
                std::process::exit(error.exit_code())
            }
            ConfigError::Invalid(message) => {
                eprintln!("{name}: {message}");
                std::process::exit(2)
            }
        }
    }
}

/// The node's arguments from its command line, environment and `--config`
/// file; prints the configuration and exits for `--print-config`; prints
/// the error and exits 2 on a bad flag or file. `name` is the binary's
/// (`participant`): it names the environment variables and the errors.
pub fn parse<T: clap::Parser>(name: &str) -> T {
    match try_parse_from(name, std::env::args_os()) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Print(text)) => {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
                Ok(()) => std::process::exit(0),
                Err(error) => {
                    eprintln!("{name}: cannot print the configuration: {error}");
                    std::process::exit(1)
                }
            }
        }
        Err(error) => error.exit(name),
    }
}

/// [`parse`] without the exits, on the given command line (its first item
/// is the program's name). The environment is read when this is called.
pub fn try_parse_from<T, I>(name: &str, args: I) -> Result<Parsed<T>, ConfigError>
where
    T: clap::Parser,
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut command = with_env(T::command(), name);
    command.build();
    if command.get_arguments().all(|arg| arg.get_id() != CONFIG_ID)
        || command.get_arguments().all(|arg| arg.get_id() != PRINT_CONFIG_ID)
    {
        return Err(ConfigError::Invalid(format!(
            "{name} has no --config and --print-config: flatten tandem::config::ConfigFlags into its arguments"
        )));
    }
    let clap_error = |error| ConfigError::Clap { error, note: None };

    // Where each value comes from, before the file: missing and
    // conflicting flags are not errors yet (the file may fill them in, and
    // the strict parse below reports what remains). --help and --version
    // still stop here.
    let lenient = command.clone().ignore_errors(true).try_get_matches_from(&args).map_err(clap_error)?;
    let mut inserted: Vec<OsString> = Vec::new();
    let mut from_file: BTreeSet<String> = BTreeSet::new();
    let mut file: Option<PathBuf> = None;
    let path = lenient.try_get_one::<PathBuf>(CONFIG_ID).map_err(|e| ConfigError::Invalid(format!("--config: {e}")))?;
    if let Some(path) = path {
        let table = read_file(path)?;
        let shown = path.display().to_string();
        let settings = settings(&command);
        let find = |key: &str| settings.iter().find(|s| s.long == key || s.long.replace('-', "_") == key);
        let unknown: Vec<String> =
            table.keys().filter(|key| find(key).is_none()).map(|key| format!("`{key}`")).collect();
        if !unknown.is_empty() {
            let keys: Vec<&str> = settings.iter().filter(|s| !s.arg.is_hide_set()).map(|s| s.long).collect();
            return Err(ConfigError::Invalid(format!(
                "config file {shown}: unknown key{} {}; the keys are {} (each also with _ for -)",
                if unknown.len() == 1 { "" } else { "s" },
                unknown.join(", "),
                keys.join(", ")
            )));
        }
        let mut seen: Vec<(&str, &str)> = Vec::new(); // (id, the key as written)
        for (key, value) in &table {
            let Some(setting) = find(key) else { continue };
            let id = setting.arg.get_id().as_str();
            if let Some((_, earlier)) = seen.iter().find(|(seen_id, _)| *seen_id == id) {
                return Err(ConfigError::Invalid(format!(
                    "config file {shown}: `{earlier}` and `{key}` are the same setting; give it once"
                )));
            }
            seen.push((id, key));
            let words = words(setting, value)
                .map_err(|why| ConfigError::Invalid(format!("config file {shown}: `{key}` {why}")))?;
            if matches!(lenient.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
                continue;
            }
            inserted.extend(words.into_iter().map(OsString::from));
            from_file.insert(id.to_string());
        }
        file = Some(path.clone());
    }

    // The file's values go first, as if typed before everything else (after
    // the program's name), so that a trailing `--` or positional stays last.
    let mut strict_args: Vec<OsString> = Vec::with_capacity(args.len() + inserted.len() + 1);
    let mut rest = args.into_iter();
    strict_args.push(rest.next().unwrap_or_else(|| OsString::from(name)));
    strict_args.extend(inserted);
    strict_args.extend(rest);
    let matches = command.clone().try_get_matches_from(strict_args).map_err(|error| {
        let note = file.as_ref().filter(|_| !from_file.is_empty()).map(|path| {
            let keys: Vec<String> = settings(&command)
                .iter()
                .filter(|s| from_file.contains(s.arg.get_id().as_str()))
                .map(|s| format!("--{}", s.long))
                .collect();
            format!("note: {} came from the config file {}", keys.join(", "), path.display())
        });
        ConfigError::Clap { error, note }
    })?;
    let parsed = T::from_arg_matches(&matches).map_err(clap_error)?;
    if matches!(matches.try_get_one::<bool>(PRINT_CONFIG_ID), Ok(Some(true))) {
        return Ok(Parsed::Print(render(&command, &matches, name, &from_file)?));
    }
    Ok(Parsed::Run(parsed))
}

/// Gives every setting its environment variable, `TANDEM_<NAME>_<FLAG>`.
/// A repeatable flag takes a comma-separated list there (and so on the
/// command line: `--peer a,b` is `--peer a --peer b`); a switch takes
/// true/false, yes/no, on/off or 1/0.
fn with_env(command: Command, name: &str) -> Command {
    let prefix = format!("TANDEM_{}_", env_word(name));
    command.mut_args(|arg| {
        let takes_env = arg.get_env().is_none() && !arg.is_hide_set() && arg.get_id() != PRINT_CONFIG_ID;
        let Some(var) = arg.get_long().filter(|_| takes_env && is_setting_action(&arg)).map(env_word) else {
            return arg;
        };
        let arg = match arg.get_action() {
            ArgAction::Append => arg.value_delimiter(','),
            ArgAction::SetTrue | ArgAction::SetFalse => arg.value_parser(BoolishValueParser::new()),
            _ => arg,
        };
        // The names in --help, not what this shell happens to hold.
        arg.env(format!("{prefix}{var}")).hide_env_values(true)
    })
}

fn env_word(text: &str) -> String {
    text.to_ascii_uppercase().replace('-', "_")
}

fn is_setting_action(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Set | ArgAction::Append | ArgAction::SetTrue | ArgAction::SetFalse)
}

/// A flag that a file may set.
struct Setting<'a> {
    arg: &'a Arg,
    long: &'a str,
}

/// Every long flag that takes a value or is a switch, in the command's
/// order, but --config and --print-config (and --help and --version, which
/// are neither).
fn settings(command: &Command) -> Vec<Setting<'_>> {
    command
        .get_arguments()
        .filter(|arg| arg.get_id() != CONFIG_ID && arg.get_id() != PRINT_CONFIG_ID && is_setting_action(arg))
        .filter_map(|arg| Some(Setting { arg, long: arg.get_long()? }))
        .collect()
}

/// Reads and parses the file, at most [`CONFIG_FILE_BYTES_MAX`] of it.
fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let bad = |why: String| ConfigError::Invalid(format!("config file {}: {why}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let mut bytes = Vec::new();
    // Read one byte past the bound to tell a file of exactly the bound
    // from a longer one (its length from metadata may be 0: a pipe).
    file.take(CONFIG_FILE_BYTES_MAX + 1).read_to_end(&mut bytes).map_err(|e| bad(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > CONFIG_FILE_BYTES_MAX {
        return Err(bad(format!("larger than {CONFIG_FILE_BYTES_MAX} bytes")));
    }
    let text = String::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8 text: {e}")))?;
    text.parse::<toml::Table>().map_err(|e| bad(format!("not TOML: {}", e.to_string().trim_end())))
}

/// The words that `value` puts on the command line for the flag: `--flag`
/// for a switch set away from its default (none for one left at it), and
/// `--flag=VALUE` for each value of any other. The error follows the key.
fn words(setting: &Setting, value: &toml::Value) -> Result<Vec<String>, String> {
    let switch = || vec![format!("--{}", setting.long)];
    match (setting.arg.get_action(), value) {
        (ArgAction::SetTrue, toml::Value::Boolean(on)) => Ok(if *on { switch() } else { vec![] }),
        (ArgAction::SetFalse, toml::Value::Boolean(on)) => Ok(if *on { vec![] } else { switch() }),
        (ArgAction::SetTrue | ArgAction::SetFalse, other) => {
            Err(format!("is a switch: give true or false, not {}", kind(other)))
        }
        (ArgAction::Append, toml::Value::Array(items)) => items.iter().map(|item| word(setting, item)).collect(),
        (_, toml::Value::Array(_)) => Err("takes one value, not an array (only a repeatable flag does)".to_string()),
        (_, other) => Ok(vec![word(setting, other)?]),
    }
}

/// `--flag=VALUE`, once the flag's own value parser took VALUE: a bad value
/// is reported with the file and the key, not as a flag the user never
/// typed. (clap runs a parser only inside a command: this one holds the
/// flag alone, so that the flags it requires or conflicts with are not
/// checked yet.)
fn word(setting: &Setting, value: &toml::Value) -> Result<String, String> {
    let text = scalar(value)?;
    let word = format!("--{}={text}", setting.long);
    let mut alone = Arg::new(setting.arg.get_id().clone())
        .long(setting.long.to_string())
        .action(ArgAction::Set)
        .value_parser(setting.arg.get_value_parser().clone());
    if let Some(names) = setting.arg.get_value_names() {
        alone = alone.value_names(names.iter().cloned());
    }
    let probe = Command::new("config").no_binary_name(true).arg(alone);
    if let Err(error) = probe.try_get_matches_from([&word]) {
        // clap's message, without its "error: " and its "try --help".
        let message = error.to_string();
        let message = message.split("\n\n").next().unwrap_or_default();
        return Err(message.strip_prefix("error: ").unwrap_or(message).to_string());
    }
    Ok(word)
}

/// A string, a number or a boolean, as it would be typed.
fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(text) => Ok(text.clone()),
        toml::Value::Integer(number) => Ok(number.to_string()),
        toml::Value::Float(number) => Ok(number.to_string()),
        toml::Value::Boolean(on) => Ok(on.to_string()),
        other => Err(format!("takes a string, a number or a boolean, not {}", kind(other))),
    }
}

fn kind(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table (keys are flat: data-dir = ..., not [section]s)",
    }
}

/// The effective configuration as TOML, every setting in the command's
/// order with where its value came from; a setting with no value is a
/// comment. Hidden flags are left out.
fn render(
    command: &Command,
    matches: &ArgMatches,
    name: &str,
    from_file: &BTreeSet<String>,
) -> Result<String, ConfigError> {
    let mut out = format!(
        "# The configuration of this {name} (--print-config), as --config reads it.\n\
         # Precedence: flags, then environment variables, then the config file, then defaults.\n"
    );
    for setting in settings(command).iter().filter(|s| !s.arg.is_hide_set()) {
        let id = setting.arg.get_id().as_str();
        let key = setting.long;
        let source = match matches.value_source(id) {
            _ if from_file.contains(id) => "file".to_string(),
            Some(ValueSource::CommandLine) => "flag".to_string(),
            Some(ValueSource::EnvVariable) => {
                format!("env {}", setting.arg.get_env().map(|var| var.to_string_lossy()).unwrap_or_default())
            }
            Some(ValueSource::DefaultValue) => "default".to_string(),
            _ => "not set".to_string(),
        };
        let raw: Vec<String> = match matches.get_raw(id) {
            None => vec![],
            Some(values) => values
                .map(|value| {
                    value
                        .to_str()
                        .map(str::to_string)
                        .ok_or_else(|| ConfigError::Invalid(format!("cannot print --{key}: its value is not UTF-8")))
                })
                .collect::<Result<_, _>>()?,
        };
        let value = match setting.arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => match matches.try_get_one::<bool>(id) {
                Ok(Some(on)) => Some(toml::Value::Boolean(*on)),
                _ => None,
            },
            ArgAction::Append => {
                Some(toml::Value::Array(raw.into_iter().map(|value| typed(setting.arg, value)).collect()))
            }
            _ => raw.into_iter().next().map(|value| typed(setting.arg, value)),
        };
        match value {
            Some(value) => out.push_str(&format!("{key} = {value}  # {source}\n")),
            None => out.push_str(&format!("# {key} is not set\n")),
        }
    }
    Ok(out)
}

/// A value as TOML: an integer, a float or a boolean where the flag parses into one
/// and the text is one (`idempotency-retention`'s "24h" stays a string).
fn typed(arg: &Arg, value: String) -> toml::Value {
    use std::any::TypeId;
    let type_id = arg.get_value_parser().type_id();
    let integers = [
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
        TypeId::of::<i8>(),
        TypeId::of::<i16>(),
        TypeId::of::<i32>(),
        TypeId::of::<i64>(),
        TypeId::of::<isize>(),
    ];
    if integers.iter().any(|integer| type_id == *integer) {
        if let Ok(number) = value.parse::<i64>() {
            return toml::Value::Integer(number);
        }
    }
    if type_id == TypeId::of::<bool>() {
        if let Ok(on) = value.parse::<bool>() {
            return toml::Value::Boolean(on);
        }
    }
    if type_id == TypeId::of::<f64>() {
        if let Ok(number) = value.parse::<f64>() {
            return toml::Value::Float(number);
        }
    }
    toml::Value::String(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::TlsFlags;
    use std::net::SocketAddr;

    /// A node's arguments in small: each kind of flag a node has.
    #[derive(clap::Parser, Debug, Clone)]
    #[command(version)]
    struct TestArgs {
        /// An address, with a default.
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: SocketAddr,
        /// Required, and no default.
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "n1")]
        node_id: String,
        /// Repeatable, required.
        #[arg(long = "coordinator", required = true)]
        coordinators: Vec<String>,
        /// Repeatable, optional.
        #[arg(long = "peer")]
        peers: Vec<String>,
        #[arg(long, default_value_t = 500)]
        timeout_ms: u64,
        /// Parsed into a number from a string with a unit.
        #[arg(long, default_value = "24h", value_parser = crate::clock::parse_duration_ms)]
        retention: u64,
        #[arg(long)]
        worker_threads: Option<usize>,
        #[arg(long, default_value_t = true, action = ArgAction::Set)]
        one_phase_commit: bool,
        /// A float.
        #[arg(long, default_value_t = 1.0)]
        sample_ratio: f64,
        /// Gone: refused by the node when given.
        #[arg(long, hide = true)]
        gone_ms: Option<String>,
        #[command(flatten)]
        tls: TlsFlags,
        #[command(flatten)]
        config: ConfigFlags,
    }

    /// The fields that the configuration sets (the struct less its
    /// ConfigFlags), to compare two parses.
    fn settings_of(args: &TestArgs) -> String {
        let mut args = args.clone();
        args.config = ConfigFlags::default();
        format!("{args:?}")
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
        std::io::Write::write_all(&mut file, text.as_bytes()).expect("written");
        file
    }

    fn run(name: &str, args: &[&str]) -> Result<TestArgs, ConfigError> {
        match try_parse_from::<TestArgs, _>(name, std::iter::once("node").chain(args.iter().copied()))? {
            Parsed::Run(args) => Ok(args),
            Parsed::Print(text) => panic!("printed instead of running:\n{text}"),
        }
    }

    fn print(name: &str, args: &[&str]) -> String {
        let args = std::iter::once("node").chain(args.iter().copied()).chain(["--print-config"]);
        match try_parse_from::<TestArgs, _>(name, args) {
            Ok(Parsed::Print(text)) => text,
            Ok(Parsed::Run(_)) => panic!("ran instead of printing"),
            Err(error) => panic!("refused: {error}"),
        }
    }

    fn invalid(result: Result<TestArgs, ConfigError>) -> String {
        match result {
            Err(ConfigError::Invalid(message)) => message,
            other => panic!("expected a refused file, got {other:?}"),
        }
    }

    fn path(file: &tempfile::NamedTempFile) -> &str {
        file.path().to_str().expect("a UTF-8 temporary path")
    }

    const FULL: &str = r#"
listen = "127.0.0.1:7999"
data-dir = "/var/lib/tandem/n7"
node_id = "n7"
coordinator = ["c1=http://127.0.0.1:7100", "c2=http://127.0.0.1:7200"]
peer = "p1=http://127.0.0.1:7101"
timeout-ms = 42
retention = "90m"
worker-threads = 3
one-phase-commit = false
sample-ratio = 0.25
insecure = true
"#;

    #[test]
    fn the_files_values_are_used() {
        let config = file(FULL);
        let args = run("cfgtest-used", &["--config", path(&config)]).expect("parsed");
        assert_eq!(args.listen, "127.0.0.1:7999".parse::<SocketAddr>().expect("an address"));
        assert_eq!(args.data_dir, PathBuf::from("/var/lib/tandem/n7"));
        assert_eq!(args.node_id, "n7", "the snake-case key");
        assert_eq!(args.coordinators, ["c1=http://127.0.0.1:7100", "c2=http://127.0.0.1:7200"]);
        assert_eq!(args.peers, ["p1=http://127.0.0.1:7101"], "one string for a repeatable flag");
        assert_eq!(args.timeout_ms, 42);
        assert_eq!(args.retention, 90 * 60_000, "through the flag's own value parser");
        assert_eq!(args.worker_threads, Some(3));
        assert!(!args.one_phase_commit);
        assert!(args.tls.insecure);
        assert_eq!(args.config.config.as_deref(), Some(config.path()));
    }

    #[test]
    fn a_file_fills_in_required_flags_and_the_rest_keep_their_defaults() {
        let config = file("data_dir = \"/d\"\ncoordinator = [\"c1=http://h:1\"]\n");
        let args = run("cfgtest-defaults", &["--config", path(&config)]).expect("parsed");
        assert_eq!(args.data_dir, PathBuf::from("/d"));
        assert_eq!(args.timeout_ms, 500);
        assert_eq!(args.retention, 24 * 3_600_000);
        assert!(args.one_phase_commit);
        assert!(!args.tls.insecure);
        assert!(args.peers.is_empty());
        // Without the file, the same command line lacks its required flags.
        match run("cfgtest-defaults", &[]) {
            Err(ConfigError::Clap { error, note: None }) => {
                assert_eq!(error.kind(), clap::error::ErrorKind::MissingRequiredArgument)
            }
            other => panic!("expected clap's missing-argument error, got {other:?}"),
        }
    }

    #[test]
    fn a_flag_beats_the_file() {
        let config = file(FULL);
        let args = run(
            "cfgtest-flag",
            &[
                "--timeout-ms",
                "7",
                "--config",
                path(&config),
                "--coordinator",
                "c9=http://h:9",
                "--one-phase-commit=true",
            ],
        )
        .expect("parsed");
        assert_eq!(args.timeout_ms, 7);
        assert_eq!(args.coordinators, ["c9=http://h:9"], "a repeated flag replaces the file's list whole");
        assert!(args.one_phase_commit);
        assert_eq!(args.node_id, "n7", "the flags given replace only themselves");
    }

    #[test]
    fn the_environment_beats_the_file_and_a_flag_beats_the_environment() {
        // Variables of this test's own node name: no other test reads them.
        std::env::set_var("TANDEM_CFGTEST_ENV_TIMEOUT_MS", "9");
        std::env::set_var("TANDEM_CFGTEST_ENV_PEER", "p7=http://h:7,p8=http://h:8");
        std::env::set_var("TANDEM_CFGTEST_ENV_NODE_ID", "from-env");
        std::env::set_var("TANDEM_CFGTEST_ENV_INSECURE", "0");
        let config = file(FULL);
        let args = run("cfgtest-env", &["--config", path(&config), "--node-id", "from-flag"]).expect("parsed");
        assert_eq!(args.timeout_ms, 9);
        assert_eq!(args.peers, ["p7=http://h:7", "p8=http://h:8"], "comma-separated in the environment");
        assert!(!args.tls.insecure, "the environment's 0 beats the file's true");
        assert_eq!(args.node_id, "from-flag");
        assert_eq!(args.retention, 90 * 60_000, "the file still gives what the environment does not");
        let printed = print("cfgtest-env", &["--config", path(&config), "--node-id", "from-flag"]);
        assert!(printed.contains("timeout-ms = 9  # env TANDEM_CFGTEST_ENV_TIMEOUT_MS\n"), "{printed}");
        assert!(printed.contains("node-id = \"from-flag\"  # flag\n"), "{printed}");
        assert!(printed.contains("retention = \"90m\"  # file\n"), "{printed}");
    }

    #[test]
    fn an_unknown_key_is_refused_with_the_keys_there_are() {
        let config = file("data-dir = \"/d\"\ntimeout = 5\nlisten_addr = \"x\"\n");
        let message = invalid(run("cfgtest-unknown", &["--config", path(&config)]));
        assert!(message.contains(path(&config)), "{message}");
        assert!(message.contains("unknown keys `listen_addr`, `timeout`;"), "{message}");
        assert!(message.contains("timeout-ms"), "lists the keys there are: {message}");
        assert!(!message.contains("gone-ms"), "hidden flags are not offered: {message}");
        for key in ["config", "print-config", "help", "version"] {
            let config = file(&format!("{key} = true\n"));
            let message = invalid(run("cfgtest-unknown", &["--config", path(&config)]));
            assert!(message.contains(&format!("unknown key `{key}`")), "{message}");
        }
    }

    #[test]
    fn a_hidden_flag_is_a_key_so_that_the_node_refuses_it_as_the_flag() {
        let config = file("data-dir = \"/d\"\ncoordinator = [\"c\"]\ngone_ms = \"5\"\n");
        let args = run("cfgtest-gone", &["--config", path(&config)]).expect("parsed");
        assert_eq!(args.gone_ms.as_deref(), Some("5"));
        let printed = print("cfgtest-gone", &["--config", path(&config)]);
        assert!(!printed.contains("gone-ms") && !printed.contains("gone_ms"), "{printed}");
    }

    #[test]
    fn a_wrong_type_or_value_is_refused_naming_the_file_and_key() {
        let cases = [
            ("insecure = \"yes\"", "`insecure` is a switch: give true or false, not a string"),
            ("timeout-ms = \"soon\"", "`timeout-ms` invalid value 'soon' for '--timeout-ms <TIMEOUT_MS>'"),
            ("timeout-ms = -1", "`timeout-ms` invalid value '-1'"),
            ("timeout-ms = 1.5", "`timeout-ms` invalid value '1.5'"),
            ("sample-ratio = \"most\"", "`sample-ratio` invalid value 'most'"),
            ("retention = \"5 minutes\"", "\"5 minutes\" has no unit"),
            ("listen = true", "`listen` invalid value 'true'"),
            ("data-dir = [\"/a\", \"/b\"]", "`data-dir` takes one value, not an array"),
            ("peer = [\"p1=x\", {a = 1}]", "`peer` takes a string, a number or a boolean, not a table"),
            ("peer = [[\"p1=x\"]]", "not an array"),
            ("one-phase-commit = \"maybe\"", "`one-phase-commit` invalid value 'maybe'"),
            ("[tls]\ncert = \"x\"", "unknown key `tls`"),
            ("node-id = 1979-05-27", "not a date"),
            ("data-dir = \"/a\"\ndata_dir = \"/b\"", "`data-dir` and `data_dir` are the same setting"),
        ];
        for (text, expected) in cases {
            let config = file(text);
            let message = invalid(run("cfgtest-types", &["--config", path(&config)]));
            assert!(message.starts_with(&format!("config file {}: ", path(&config))), "{message}");
            assert!(message.contains(expected), "{text:?}: {message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn an_unreadable_or_oversized_or_malformed_file_is_refused() {
        let message = invalid(run("cfgtest-files", &["--config", "/nonexistent/tandem.toml"]));
        assert!(message.starts_with("config file /nonexistent/tandem.toml: cannot open"), "{message}");
        let message = invalid(run("cfgtest-files", &["--config", "/dev/zero"]));
        assert!(message.contains(&format!("larger than {CONFIG_FILE_BYTES_MAX} bytes")), "{message}");
        let config = file("data-dir = \"/d\"\ntimeout-ms = \n");
        let message = invalid(run("cfgtest-files", &["--config", path(&config)]));
        assert!(message.contains("not TOML") && message.contains("line 2"), "{message}");
        let config = file("data-dir = \"\u{0}\"");
        invalid(run("cfgtest-files", &["--config", path(&config)]));
        // A file of exactly the bound is read; one byte more is not.
        let head = "data-dir = \"/d\"\ncoordinator = [\"c\"]\n#";
        let padding = CONFIG_FILE_BYTES_MAX as usize - head.len();
        let at_bound = file(&format!("{head}{}", "#".repeat(padding)));
        run("cfgtest-files", &["--config", path(&at_bound)]).expect("a file of the largest size is read");
        let over = file(&format!("{head}{}", "#".repeat(padding + 1)));
        let message = invalid(run("cfgtest-files", &["--config", path(&over)]));
        assert!(message.contains("larger than"), "{message}");
    }

    #[test]
    fn a_conflict_involving_the_file_names_the_files_values() {
        let config = file("data-dir = \"/d\"\ncoordinator = [\"c\"]\ninsecure = true\n");
        let result =
            run("cfgtest-conflict", &["--config", path(&config), "--tls-cert", "a", "--tls-key", "b", "--tls-ca", "c"]);
        match result {
            Err(ConfigError::Clap { error, note: Some(note) }) => {
                assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict);
                assert!(note.contains("--insecure") && note.contains(path(&config)), "{note}");
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn the_printed_configuration_reads_back_to_the_same_arguments() {
        std::env::set_var("TANDEM_CFGTEST_PRINT_WORKER_THREADS", "2");
        let config = file(FULL);
        let flags =
            ["--config", path(&config), "--peer", "p2=http://h:2", "--peer", "p3=http://h:3", "--listen", "[::1]:0"];
        let first = run("cfgtest-print", &flags).expect("parsed");
        let printed = print("cfgtest-print", &flags);
        assert!(printed.contains("peer = [\"p2=http://h:2\", \"p3=http://h:3\"]  # flag\n"), "{printed}");
        assert!(printed.contains("timeout-ms = 42  # file\n"), "an integer: {printed}");
        assert!(printed.contains("one-phase-commit = false  # file\n"), "a boolean: {printed}");
        assert!(printed.contains("sample-ratio = 0.25  # file\n"), "a float: {printed}");
        assert!(printed.contains("insecure = true  # file\n"), "a switch: {printed}");
        assert!(printed.contains("worker-threads = 2  # env TANDEM_CFGTEST_PRINT_WORKER_THREADS\n"), "{printed}");
        assert!(printed.contains("# tls-cert is not set\n"), "{printed}");
        assert!(!printed.contains("print-config =") && !printed.contains("\nconfig ="), "{printed}");
        assert!(!printed.contains("gone-ms"), "{printed}");

        // Read back by another node name (no environment), it gives the
        // same arguments, and prints the same values.
        let again = file(&printed);
        let second = run("cfgtest-print-back", &["--config", path(&again)]).expect("the printed file is accepted");
        assert_eq!(settings_of(&second), settings_of(&first));
        let values = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split("  # ").next().unwrap_or(l).to_string())
                .collect()
        };
        let reprinted = print("cfgtest-print-back", &["--config", path(&again)]);
        assert_eq!(values(&reprinted), values(&printed));
        assert!(reprinted.contains("worker-threads = 2  # file\n"), "{reprinted}");

        // Defaults alone print and read back too.
        let defaults = print("cfgtest-print-back", &["--data-dir", "/d", "--coordinator", "c=http://h"]);
        assert!(defaults.contains("retention = \"24h\"  # default\n"), "{defaults}");
        assert!(defaults.contains("peer = []  # not set\n"), "{defaults}");
        let defaults_file = file(&defaults);
        let from_defaults = run("cfgtest-print-back", &["--config", path(&defaults_file)]).expect("accepted");
        let direct = run("cfgtest-print-back", &["--data-dir", "/d", "--coordinator", "c=http://h"]).expect("parsed");
        assert_eq!(settings_of(&from_defaults), settings_of(&direct));
    }

    #[test]
    fn help_and_version_pass_through() {
        for flag in ["--help", "--version"] {
            match try_parse_from::<TestArgs, _>("cfgtest-help", ["node", flag]) {
                Err(ConfigError::Clap { error, .. }) => assert_eq!(error.exit_code(), 0, "{flag}"),
                other => panic!("{flag}: {other:?}"),
            }
        }
        let mut command = with_env(<TestArgs as clap::CommandFactory>::command(), "cfgtest-help");
        let help = command.render_long_help().to_string();
        assert!(help.contains("--config <FILE>") && help.contains("--print-config"), "{help}");
        assert!(help.contains("TANDEM_CFGTEST_HELP_DATA_DIR"), "{help}");
    }

    #[test]
    fn a_command_without_config_flags_is_refused() {
        #[derive(clap::Parser, Debug)]
        struct Bare {
            #[arg(long)]
            x: Option<u32>,
        }
        match try_parse_from::<Bare, _>("cfgtest-bare", ["node"]) {
            Err(ConfigError::Invalid(message)) => assert!(message.contains("ConfigFlags"), "{message}"),
            other => panic!("{other:?}"),
        }
    }
}
