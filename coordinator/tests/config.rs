//! The coordinator binary's configuration: `--config FILE`, environment
//! variables and flags, `--print-config`, on the built binary (the logic
//! itself is tested in `tandem::config`).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_coordinator");

/// The binary with these arguments, and none of the caller's
/// `TANDEM_COORDINATOR_*` variables.
fn coordinator(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).stdin(Stdio::null());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TANDEM_COORDINATOR_") {
            command.env_remove(name);
        }
    }
    command
}

/// Runs it to its end; one that is still running after the deadline (it
/// started serving instead of exiting) is killed and fails the test.
fn finish(mut command: Command) -> Output {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the coordinator starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("its status").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the coordinator did not exit: {:?}", child.wait_with_output());
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

fn config_file(dir: &Path, extra: &str) -> String {
    write(
        &dir.join("c.toml"),
        &format!(
            r#"listen = "127.0.0.1:0"
data-dir = "{}"
participant = ["p1=http://127.0.0.1:7101@0..1000", "p2=http://127.0.0.1:7102@1000..2000"]
prepare_timeout_ms = 5
idempotency-retention = "90m"
one-phase-commit = "off"
commit-protocol = "classic"
insecure = true
{extra}"#,
            dir.join("data").display()
        ),
    )
}

#[test]
fn print_config_shows_the_file_under_the_flags_and_reads_back() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = config_file(dir.path(), "");
    let mut command = coordinator(&["--config", &config, "--prepare-timeout-ms", "77", "--print-config"]);
    command.env("TANDEM_COORDINATOR_ACTIVE_MAX", "12");
    let output = finish(command);
    let printed = text(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    for line in [
        "listen = \"127.0.0.1:0\"  # file",
        "node-id = \"c1\"  # default",
        "participant = [\"p1=http://127.0.0.1:7101@0..1000\", \"p2=http://127.0.0.1:7102@1000..2000\"]  # file",
        "prepare-timeout-ms = 77  # flag",
        "active-max = 12  # env TANDEM_COORDINATOR_ACTIVE_MAX",
        "idempotency-retention = \"90m\"  # file",
        "one-phase-commit = \"off\"  # file",
        "commit-protocol = \"classic\"  # file",
        "insecure = true  # file",
    ] {
        assert!(printed.lines().any(|printed_line| printed_line == line), "no {line:?} in:\n{printed}");
    }
    assert!(!printed.contains("audit-timeout-ms") && !printed.contains("finished-retained-max"), "{printed}");
    assert!(!dir.path().join("data").exists(), "--print-config starts nothing");

    let printed_file = write(&dir.path().join("printed.toml"), &printed);
    let output = finish(coordinator(&["--config", &printed_file, "--print-config"]));
    assert!(output.status.success(), "{output:?}");
    assert_eq!(values(&text(&output.stdout)), values(&printed));
}

#[test]
fn a_gone_setting_in_the_file_is_refused_as_the_gone_flag_is() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = config_file(dir.path(), "audit_timeout_ms = \"500\"\n");
    let output = finish(coordinator(&["--config", &config]));
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(text(&output.stderr).contains("--audit-timeout-ms is gone"), "{output:?}");
    assert!(!dir.path().join("data").exists(), "it started nothing");
}

#[test]
fn a_bad_file_stops_it_with_exit_2() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (extra, expected) in [
        ("prepare-timeout = 5\n", "unknown key `prepare-timeout`; the keys are listen, data-dir,"),
        ("saga_deadline_ms = true\n", "`saga_deadline_ms` invalid value 'true'"),
        ("log-level = { a = 1 }\n", "`log-level` takes a string, a number or a boolean, not a table"),
        ("[tls]\ninsecure = true\n", "unknown key `tls`"),
    ] {
        let config = config_file(dir.path(), extra);
        let output = finish(coordinator(&["--config", &config]));
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{extra:?}: {output:?}");
        assert!(stderr.starts_with(&format!("coordinator: config file {config}: ")), "{stderr}");
        assert!(stderr.contains(expected), "{extra:?}: {stderr:?} lacks {expected:?}");
    }
    // A value of the file that a flag's parser refuses names the file and key.
    let config = config_file(dir.path(), "");
    let config_text = std::fs::read_to_string(&config).expect("read").replace("\"classic\"", "\"fast\"");
    let config = write(Path::new(&config), &config_text);
    let output = finish(coordinator(&["--config", &config]));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        stderr.contains("`commit-protocol` invalid value 'fast'") && stderr.contains("parallel, classic"),
        "{stderr}"
    );
    // A clash between the file and a flag is clap's, with a note on the file.
    let config = config_file(dir.path(), "");
    let output = finish(coordinator(&["--config", &config, "--tls-cert", "a", "--tls-key", "b", "--tls-ca", "c"]));
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(stderr.contains("cannot be used with") && stderr.contains("--insecure"), "{stderr}");
    assert!(stderr.contains(&format!("came from the config file {config}")), "{stderr}");
    assert!(!dir.path().join("data").exists(), "it started nothing");
}

#[test]
fn help_names_the_config_flags() {
    let output = finish(coordinator(&["--help"]));
    let help = text(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    for expected in ["--config <FILE>", "--print-config", "TANDEM_COORDINATOR_PARTICIPANT"] {
        assert!(help.contains(expected), "no {expected} in:\n{help}");
    }
}
