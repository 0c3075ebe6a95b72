//! Throw-away PostgreSQL servers for the baselines: found on this machine,
//! initialised into a fresh data directory, started on a free loopback port,
//! stopped and deleted at the end.
//!
//! `initdb` and `postgres` refuse to run as root. When the bench runs as
//! root (as it does on CI here), both run as an unprivileged account,
//! `postgres` (Debian's `postgresql` package creates it), through
//! `Command::uid`/`gid` (the child drops root's supplementary groups too),
//! and the data directories are made that account's. That account must
//! reach the directory: when a parent of the run's output directory is
//! private to root, the servers live in a directory under `$TMPDIR`
//! instead, and the bench says so.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

/// The role the bench connects as (made by initdb, trusted on loopback).
pub const USER: &str = "bench";
/// Where Debian installs each major version: `<here>/<version>/bin`.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";
/// Overrides where `initdb` and `postgres` are looked for.
pub const BIN_DIR_VAR: &str = "TANDEM_POSTGRES_BIN_DIR";
/// The account PostgreSQL runs as when the bench is root.
const UNPRIVILEGED_USER: &str = "postgres";
/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast shutdown may take before the server is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Tries at a free port (another process may take the one picked).
const PORT_ATTEMPTS: usize = 3;
/// A unix socket's path must fit in `sun_path` (108 bytes on Linux).
const SOCKET_PATH_MAX: usize = 100;

/// PostgreSQL's programs on this machine.
#[derive(Debug, Clone)]
pub struct Installation {
    pub bin_dir: PathBuf,
}

impl Installation {
    /// `$TANDEM_POSTGRES_BIN_DIR` if set, else the newest
    /// `/usr/lib/postgresql/<version>/bin` that has `initdb` and `postgres`.
    /// The error says where it looked and how to install them.
    pub fn find() -> Result<Installation, String> {
        let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
        if let Some(dir) = std::env::var_os(BIN_DIR_VAR) {
            let dir = PathBuf::from(dir);
            return if has_both(&dir) {
                Ok(Installation { bin_dir: dir })
            } else {
                Err(format!("{BIN_DIR_VAR}={} has no initdb and postgres", dir.display()))
            };
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_ROOT)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .filter(|(_, bin)| has_both(bin))
            .collect();
        versions.sort();
        match versions.pop() {
            Some((_, bin_dir)) => Ok(Installation { bin_dir }),
            None => Err(format!(
                "PostgreSQL's binaries are not installed (no {DEBIAN_ROOT}/<version>/bin with initdb and postgres; \
                 ./scripts/setup installs Debian's postgresql package, or set {BIN_DIR_VAR})"
            )),
        }
    }
}

/// Who runs PostgreSQL's programs.
#[derive(Debug, Clone, Copy)]
enum RunAs {
    /// This process's own user (not root).
    Me,
    /// An unprivileged account, because this process is root.
    User { uid: u32, gid: u32 },
}

impl RunAs {
    fn find() -> Result<RunAs, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(RunAs::Me);
        }
        let id = |flag: &str| -> Option<u32> {
            let out = std::process::Command::new("id").args([flag, UNPRIVILEGED_USER]).output().ok()?;
            String::from_utf8(out.stdout).ok()?.trim().parse().ok().filter(|_| out.status.success())
        };
        match (id("-u"), id("-g")) {
            (Some(uid), Some(gid)) => Ok(RunAs::User { uid, gid }),
            _ => Err(format!(
                "the bench runs as root, which initdb and postgres refuse, and there is no user {UNPRIVILEGED_USER:?} \
                 to run them as (Debian's postgresql package creates it)"
            )),
        }
    }

    fn apply(&self, command: &mut std::process::Command) {
        if let RunAs::User { uid, gid } = *self {
            command.uid(uid).gid(gid);
        }
    }

    /// Makes `path` the account's, so that it may write there.
    fn own(&self, path: &Path) -> Result<(), String> {
        match *self {
            RunAs::Me => Ok(()),
            RunAs::User { uid, gid } => std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| format!("cannot give {} to {UNPRIVILEGED_USER}: {e}", path.display())),
        }
    }

    /// True if the account can create files in `dir` (every parent
    /// traversable, `dir` writable).
    fn can_write(&self, dir: &Path) -> bool {
        let mut probe = std::process::Command::new("test");
        probe.arg("-w").arg(dir).arg("-a").arg("-x").arg(dir);
        self.apply(&mut probe);
        probe.status().is_ok_and(|s| s.success())
    }
}

/// What every server of a baseline is started with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Connections the bench will open, audits and checks included.
    pub max_connections: usize,
    /// Transactions that may sit prepared at once (PREPARE TRANSACTION is
    /// refused when this is 0, PostgreSQL's default).
    pub max_prepared_transactions: usize,
}

/// One running server.
pub struct Server {
    child: tokio::process::Child,
    pub port: u16,
    pub data_dir: PathBuf,
}

/// The servers of one baseline run, in order (the first holds the
/// accounts of participant 1, and so on), and the directory they live in.
pub struct Servers {
    pub servers: Vec<Server>,
    pub dir: PathBuf,
    /// Said to the person running the bench (e.g. where the data went).
    pub notes: Vec<String>,
}

/// A port for a server started later: drawn outside the ephemeral range,
/// as the cluster's nodes' ports are (see `tandem::cluster::free_port`).
fn free_port() -> Result<u16, String> {
    tandem::cluster::free_port().map_err(|e| format!("no free port: {e}"))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

/// Connects to a server as the bench's role.
pub async fn connect(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port).user(USER).dbname("postgres").connect_timeout(Duration::from_secs(2));
    let (client, connection) = config.connect(NoTls).await?;
    // The connection's task ends when the client is dropped or the link fails.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl Servers {
    /// Initialises one data directory (initdb) in `wanted_dir` (or under
    /// `$TMPDIR` when PostgreSQL's account cannot reach it), copies it for
    /// each further server, and starts `count` servers on free loopback
    /// ports. On an error, whatever started is stopped and deleted.
    pub async fn start(
        installation: &Installation,
        wanted_dir: &Path,
        count: usize,
        settings: &Settings,
    ) -> Result<Servers, String> {
        assert!(count >= 1);
        let run_as = RunAs::find()?;
        let mut notes = Vec::new();
        let dir = Self::make_dir(run_as, wanted_dir, &mut notes)?;
        let mut servers = Servers { servers: Vec::new(), dir: dir.clone(), notes };
        match servers.start_in(installation, run_as, count, settings).await {
            Ok(()) => Ok(servers),
            Err(error) => {
                servers.stop(false).await;
                Err(error)
            }
        }
    }

    fn make_dir(run_as: RunAs, wanted: &Path, notes: &mut Vec<String>) -> Result<PathBuf, String> {
        let _ = std::fs::remove_dir_all(wanted);
        std::fs::create_dir_all(wanted).map_err(|e| format!("cannot create {}: {e}", wanted.display()))?;
        let wanted = wanted.canonicalize().map_err(|e| format!("{}: {e}", wanted.display()))?;
        run_as.own(&wanted)?;
        if run_as.can_write(&wanted) {
            return Ok(wanted);
        }
        let _ = std::fs::remove_dir_all(&wanted);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let name = wanted.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let fallback = std::env::temp_dir().join(format!("tandem-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&fallback).map_err(|e| format!("cannot create {}: {e}", fallback.display()))?;
        run_as.own(&fallback)?;
        if !run_as.can_write(&fallback) {
            let _ = std::fs::remove_dir_all(&fallback);
            return Err(format!(
                "user {UNPRIVILEGED_USER} can write neither in {} nor in {}",
                wanted.display(),
                fallback.display()
            ));
        }
        notes.push(format!(
            "user {UNPRIVILEGED_USER} cannot reach {} (a parent directory is private), so the data is in {}",
            wanted.display(),
            fallback.display()
        ));
        Ok(fallback)
    }

    async fn start_in(
        &mut self,
        installation: &Installation,
        run_as: RunAs,
        count: usize,
        settings: &Settings,
    ) -> Result<(), String> {
        // One initdb, copied: initdb takes most of a second, a copy a fifth.
        // --no-sync: the template need not survive a power loss; the
        // servers themselves run with fsync on.
        let first = self.dir.join("pg1");
        let mut initdb = std::process::Command::new(installation.bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&first)
            .args(["-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
            .current_dir(&self.dir);
        run_as.apply(&mut initdb);
        let out = initdb.output().map_err(|e| format!("cannot run initdb: {e}"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(format!("initdb failed ({}): {}", out.status, stderr.trim()));
        }
        for i in 2..=count {
            let copy = self.dir.join(format!("pg{i}"));
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg(&first)
                .arg(&copy)
                .status()
                .map_err(|e| format!("cannot run cp: {e}"))?;
            if !status.success() {
                return Err(format!("cannot copy {} to {}: cp {status}", first.display(), copy.display()));
            }
        }
        for i in 1..=count {
            let server = self.start_one(installation, run_as, i, settings).await?;
            self.servers.push(server);
        }
        Ok(())
    }

    async fn start_one(
        &self,
        installation: &Installation,
        run_as: RunAs,
        i: usize,
        settings: &Settings,
    ) -> Result<Server, String> {
        let data_dir = self.dir.join(format!("pg{i}"));
        let log_path = self.dir.join(format!("pg{i}.log"));
        let mut last_error = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let socket_dir = if data_dir.as_os_str().len() + ".s.PGSQL.65535".len() < SOCKET_PATH_MAX {
                data_dir.to_string_lossy().to_string()
            } else {
                // Too long for a unix socket; the bench connects over TCP anyway.
                String::new()
            };
            let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
            let mut command = std::process::Command::new(installation.bin_dir.join("postgres"));
            command
                .arg("-D")
                .arg(&data_dir)
                .arg("-p")
                .arg(port.to_string())
                .args(["-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("unix_socket_directories={socket_dir}"))
                // Durability as tandem's: every commit (and every PREPARE
                // TRANSACTION) is on disk before it is acknowledged.
                .args(["-c", "fsync=on", "-c", "synchronous_commit=on", "-c", "full_page_writes=on"])
                .arg("-c")
                .arg(format!("max_connections={}", settings.max_connections))
                .arg("-c")
                .arg(format!("max_prepared_transactions={}", settings.max_prepared_transactions))
                .current_dir(&self.dir)
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log);
            run_as.apply(&mut command);
            let mut command = tokio::process::Command::from(command);
            // If the bench stops early (an error, a panic), the server goes
            // with it: its backends exit when the postmaster dies.
            command.kill_on_drop(true);
            let mut child = command.spawn().map_err(|e| format!("cannot start postgres: {e}"))?;
            let began = Instant::now();
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last_error = format!("postgres exited ({status}) while starting: {}", log_tail(&log_path));
                    break;
                }
                if connect(port).await.is_ok() {
                    return Ok(Server { child, port, data_dir });
                }
                if began.elapsed() > START_TIMEOUT {
                    let _ = child.kill().await;
                    return Err(format!(
                        "postgres did not accept connections within {} s: {}",
                        START_TIMEOUT.as_secs(),
                        log_tail(&log_path)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            if !last_error.contains("already in use") {
                break;
            }
        }
        Err(last_error)
    }

    /// The servers that exited on their own, one line each.
    pub fn exited(&mut self) -> Vec<String> {
        let mut exited = Vec::new();
        for (i, server) in self.servers.iter_mut().enumerate() {
            if let Ok(Some(status)) = server.child.try_wait() {
                exited.push(format!("PostgreSQL server {} exited on its own: {status}", i + 1));
            }
        }
        exited
    }

    /// Stops every server (a fast shutdown: SIGINT, then SIGKILL after a
    /// while) and deletes the data unless `keep_data`.
    pub async fn stop(&mut self, keep_data: bool) {
        for server in &mut self.servers {
            if let Some(pid) = server.child.id() {
                // SAFETY: signalling our own child, whose pid is still ours
                // (it has not been waited for).
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGINT);
                }
            }
            if tokio::time::timeout(STOP_TIMEOUT, server.child.wait()).await.is_err() {
                let _ = server.child.kill().await;
            }
        }
        self.servers.clear();
        if !keep_data {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
