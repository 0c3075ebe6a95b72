//! The participant binary's configuration: `--config FILE`, environment
//! variables and flags, `--print-config`, on the built binary (the logic
//! itself is tested in `tandem::config`).

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_participant");

/// The binary with these arguments, and none of the caller's
/// `TANDEM_PARTICIPANT_*` variables.
fn participant(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TANDEM_PARTICIPANT_") {
            command.env_remove(name);
        }
    }
    command
}

/// Runs it to its end; one that is still running after the deadline (it
/// started serving instead of exiting) is killed and fails the test.
fn finish(mut command: Command) -> Output {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the participant starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("its status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the participant did not exit: {:?}", child.wait_with_output());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("its output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The printed settings without their comments.
fn values(printed: &str) -> Vec<String> {
    printed
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.split("  # ").next().unwrap_or(line).to_string())
        .collect()
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).expect("the file is written");
    path.to_str().expect("a UTF-8 path").to_string()
}

#[test]
fn print_config_shows_the_file_under_the_environment_under_the_flags_and_reads_back() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data_dir = dir.path().join("data");
    let config = write(
        &dir.path().join("p.toml"),
        &format!(
            r#"# a participant
listen = "127.0.0.1:7301"
data-dir = "{}"
node_id = "p7"
coordinator = ["c1=http://127.0.0.1:7300"]
peer = ["p7=http://127.0.0.1:7301", "p8=http://127.0.0.1:7302"]
in-doubt-after-ms = 250
accounts = "0..1000"
insecure = true
"#,
            data_dir.display()
        ),
    );
    let mut command = participant(&["--config", &config, "--print-config", "--node-id", "p8"]);
    command.env("TANDEM_PARTICIPANT_IN_DOUBT_AFTER_MS", "300");
    let output = finish(command);
    let printed = text(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    for line in [
        "listen = \"127.0.0.1:7301\"  # file",
        &format!("data-dir = \"{}\"  # file", data_dir.display()),
        "node-id = \"p8\"  # flag",
        "coordinator = [\"c1=http://127.0.0.1:7300\"]  # file",
        "peer = [\"p7=http://127.0.0.1:7301\", \"p8=http://127.0.0.1:7302\"]  # file",
        "in-doubt-after-ms = 300  # env TANDEM_PARTICIPANT_IN_DOUBT_AFTER_MS",
        "accounts = \"0..1000\"  # file",
        "idempotency-retention = \"24h\"  # default",
        "store-free-min-mb = 64  # default",
        "log-level = \"info\"  # default",
        "insecure = true  # file",
        "# worker-threads is not set",
        "# tls-cert is not set",
    ] {
        assert!(printed.lines().any(|printed_line| printed_line == line), "no {line:?} in:\n{printed}");
    }
    assert!(!data_dir.exists(), "--print-config starts nothing");

    // What it printed is a config file that gives the same configuration.
    let printed_file = write(&dir.path().join("printed.toml"), &printed);
    let output = finish(participant(&["--config", &printed_file, "--print-config"]));
    assert!(output.status.success(), "{output:?}");
    assert_eq!(values(&text(&output.stdout)), values(&printed));
}

#[test]
fn a_config_file_starts_a_node() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = write(
        &dir.path().join("p.toml"),
        &format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ncoordinator = [\"c1=http://127.0.0.1:1\"]\ninsecure = true\n",
            dir.path().join("data").display()
        ),
    );
    let mut child = participant(&["--config", &config, "--log-level", "warn"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the participant starts");
    let stdout = child.stdout.take().expect("its stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = sender.send(line);
    });
    let line = receiver.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("a line within 30 s");
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line:?}");
    assert!(dir.path().join("data").is_dir(), "the data directory is the file's");
}

#[test]
fn an_unknown_key_or_a_wrong_type_stops_it_with_exit_2() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data_dir = dir.path().join("data");
    let head =
        format!("data-dir = \"{}\"\ncoordinator = [\"c1=http://127.0.0.1:1\"]\ninsecure = true\n", data_dir.display());
    for (body, expected) in [
        ("in-doubt-after = 5\n", "unknown key `in-doubt-after`; the keys are listen, data-dir,"),
        ("insecure_ = true\n", "unknown key `insecure_`"),
        ("store-free-min-mb = \"lots\"\n", "`store-free-min-mb` invalid value 'lots'"),
        ("peer = \"p1=http://h:1\"\npeer_ = 1\n", "unknown key `peer_`"),
        ("accounts = [\"0..10\"]\n", "`accounts` takes one value, not an array"),
    ] {
        let config = write(&dir.path().join("bad.toml"), &format!("{head}{body}"));
        let output = finish(participant(&["--config", &config]));
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{body:?}: {output:?}");
        assert!(stderr.starts_with(&format!("participant: config file {config}: ")), "{stderr}");
        assert!(stderr.contains(expected), "{body:?}: {stderr:?} lacks {expected:?}");
        assert!(output.stdout.is_empty() && !data_dir.exists(), "it started nothing");
    }
    let output = finish(participant(&["--config", "/nonexistent/p.toml"]));
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(text(&output.stderr).contains("config file /nonexistent/p.toml: cannot open"), "{output:?}");
}

#[test]
fn help_names_the_config_flags_and_the_variables() {
    let output = finish(participant(&["--help"]));
    let help = text(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    for expected in ["--config <FILE>", "--print-config", "TANDEM_PARTICIPANT_DATA_DIR", "TANDEM_PARTICIPANT_CONFIG"] {
        assert!(help.contains(expected), "no {expected} in:\n{help}");
    }
}
