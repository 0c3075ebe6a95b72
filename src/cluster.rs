//! A local cluster of the real binaries: one `coordinator` and N
//! `participant` processes on loopback, each with its own port and data
//! directory. Used by the bench and by the cluster tests.
//!
//! Participant `i` (named `p{i+1}`) owns the accounts
//! `i * accounts_per_participant .. (i + 1) * accounts_per_participant`,
//! and the cluster opens all of them but `unopened_accounts`.
//! A node is ready when it has printed `listening on ADDR` and its
//! `grpc.health.v1` check answers SERVING, within a deadline. A node can be
//! killed (SIGKILL), restarted on the same port and data directory, paused
//! (SIGSTOP) and resumed (SIGCONT). Every child is killed when the cluster is
//! dropped, so a failing test leaves no process behind.
//!
//! With `ClusterSpec::proxied_links`, every directed link between two nodes
//! (c1→pi, pi→c1, pi→pj) goes through its own [`LinkProxy`]: the node's
//! flag names the proxy's address, the proxy forwards to the peer's fixed
//! address, so a link can be delayed or cut (see [`crate::proxy`]) and a
//! restarted node is reached through the same proxy. The bench's clients and
//! the health checks talk to the nodes directly, never through a proxy.
//!
//! Links are mutual TLS unless `ClusterSpec::insecure`: each start makes a
//! throw-away CA ([`LocalCa`]) and writes in `DATA_DIR/tls/` the CA
//! (`ca.pem`), each node's certificate and key (`c1.pem`/`c1.key`,
//! `p1.pem`/`p1.key`, ...; `tandem://coordinator/c1`,
//! `tandem://participant/p1`), the bench's client (`client.pem`/`.key`,
//! `tandem://client/bench`) and its operator (`operator.pem`/`.key`,
//! `tandem://operator/bench`). The proxies pass the TLS bytes unchanged.
//! Tests that must speak as some other caller mint one with
//! [`Cluster::identity`]; the CA's key stays in memory.

use crate::local_ca::LocalCa;
use crate::pb::coordinator_client::CoordinatorClient;
use crate::pb::participant_client::ParticipantClient;
use crate::proxy::LinkProxy;
use crate::tls::{Security, TlsFlags};
use crate::trust::{Caller, Role};
use crate::{pb, Error};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

/// Most accounts opened by one call.
const OPEN_CHUNK: u64 = 50_000;

#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Where the `coordinator` and `participant` binaries are.
    pub bin_dir: PathBuf,
    /// Parent of every node's data directory and log file.
    pub data_dir: PathBuf,
    pub participants: usize,
    pub accounts_per_participant: u64,
    pub initial_balance: i64,
    pub log_level: String,
    pub coordinator_args: Vec<String>,
    pub participant_args: Vec<String>,
    pub ready_timeout: Duration,
    /// Route every link between two nodes through its own [`LinkProxy`], so
    /// that links can be delayed and cut.
    pub proxied_links: bool,
    /// Accounts in a participant's range that the cluster does not open: the
    /// coordinator's directory routes them to that participant, which does
    /// not have them (for tests of that case). [`ClusterSpec::total_money`]
    /// leaves them out; [`Cluster::accounts`] does not, so the bench's
    /// workloads and checker must not run on a cluster that has any.
    pub unopened_accounts: std::collections::BTreeSet<u64>,
    /// Plaintext links and no certificates (the nodes run with
    /// `--insecure`); by default every link is mutual TLS.
    pub insecure: bool,
    /// Every node serves its metrics (`--http-addr 127.0.0.1:0`); false:
    /// none records any.
    pub metrics: bool,
}

impl ClusterSpec {
    pub fn new(bin_dir: PathBuf, data_dir: PathBuf) -> ClusterSpec {
        ClusterSpec {
            bin_dir,
            data_dir,
            participants: 2,
            accounts_per_participant: 100,
            initial_balance: 1_000,
            log_level: "warn".into(),
            coordinator_args: Vec::new(),
            participant_args: Vec::new(),
            ready_timeout: Duration::from_secs(20),
            proxied_links: false,
            unopened_accounts: Default::default(),
            insecure: false,
            metrics: true,
        }
    }

    pub fn total_money(&self) -> i64 {
        let opened = self.accounts_per_participant * self.participants as u64;
        let unopened = self.unopened_accounts.iter().filter(|a| **a < opened).count() as u64;
        self.initial_balance * (opened - unopened) as i64
    }
}

/// The directory of the binaries built beside the running executable:
/// `target/<profile>/` for a test (which runs from `target/<profile>/deps/`)
/// or for the bench itself.
pub fn default_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running executable");
    let dir = exe.parent().expect("an executable lives in a directory").to_path_buf();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().expect("deps has a parent").to_path_buf()
    } else {
        dir
    }
}

/// Which node of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeRef {
    Coordinator,
    Participant(usize),
}

impl fmt::Display for NodeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeRef::Coordinator => f.write_str("c1"),
            NodeRef::Participant(i) => write!(f, "p{}", i + 1),
        }
    }
}

pub struct NodeProcess {
    pub node: NodeRef,
    pub addr: SocketAddr,
    binary: PathBuf,
    args: Vec<String>,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// `https` or `http`.
    scheme: &'static str,
    /// Who asks whether the node is healthy (the cluster's client).
    probe: Security,
    child: Option<Child>,
    pub paused: bool,
    /// Where the process serves its metrics (`--http-addr`, a port the
    /// kernel picked at its last start).
    pub http_addr: Option<SocketAddr>,
    /// Extra environment of the process, from its next start on (tests arm
    /// crash points with it: see [`crate::crash`]).
    pub env: Vec<(String, String)>,
}

impl NodeProcess {
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|child| child.id())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    async fn spawn(&mut self, ready_timeout: Duration) -> Result<(), Error> {
        assert!(self.child.is_none(), "{} is already running", self.node);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| Error::Fatal(format!("cannot open {}: {e}", self.log_path.display())))?;
        let mut command = Command::new(&self.binary);
        // A node reads TANDEM_COORDINATOR_* / TANDEM_PARTICIPANT_* for the
        // flags it is not given (see tandem::config): the cluster's nodes are
        // what their arguments say, not what the caller's shell holds.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("TANDEM_COORDINATOR_") || key.starts_with("TANDEM_PARTICIPANT_") {
                command.env_remove(key.as_ref());
            }
        }
        let mut child = command
            .args(&self.args)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                Error::Fatal(format!(
                    "cannot start {} ({e}); build the binaries first: cargo build --release --workspace",
                    self.binary.display()
                ))
            })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let deadline = Instant::now() + ready_timeout;
        let mut lines = BufReader::new(stdout).lines();
        // `http on ADDR` (its metrics), then `listening on ADDR`.
        let mut http_addr = None;
        let announced = tokio::time::timeout(ready_timeout, async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) if line.starts_with("http on ") => http_addr = line[8..].trim().parse().ok(),
                    other => return other,
                }
            }
        })
        .await;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        match announced {
            Ok(Ok(Some(line))) if line.starts_with("listening on") => self.http_addr = http_addr,
            other => {
                let _ = child.start_kill();
                return Err(Error::Unavailable(format!(
                    "{} did not start ({other:?}); see {}",
                    self.node,
                    self.log_path.display()
                )));
            }
        }
        self.child = Some(child);
        self.paused = false;
        wait_serving(&self.url(), &self.probe, deadline).await.map_err(|e| {
            Error::Unavailable(format!("{} is not healthy: {e}; see {}", self.node, self.log_path.display()))
        })
    }

    /// SIGKILL, and reap the process.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                signal(&child, libc::SIGCONT);
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.paused = false;
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if self.paused {
            signal(&child, libc::SIGCONT);
            self.paused = false;
        }
        signal(&child, libc::SIGTERM);
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = child.start_kill();
                child.wait().await.ok()
            }
        }
    }

    pub fn pause(&mut self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGSTOP);
            self.paused = true;
        }
    }

    pub fn resume(&mut self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGCONT);
            self.paused = false;
        }
    }

    /// `Some(status)` if the process exited on its own.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid this process spawned and has not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
    }
}

/// Polls `grpc.health.v1` at `url`, as `security`, until it answers SERVING
/// or `deadline`.
pub async fn wait_serving(url: &str, security: &Security, deadline: Instant) -> Result<(), Error> {
    let channel = crate::server::channel(url, security)?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: String::new() });
        request.set_timeout(Duration::from_millis(500));
        match client.check(request).await {
            Ok(response)
                if response.get_ref().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 =>
            {
                return Ok(())
            }
            Ok(response) => last = format!("status {}", response.get_ref().status),
            Err(status) => last = status.message().to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(Error::Timeout(last))
}

/// Where [`free_port`] looks first: below Linux's default ephemeral range
/// (32768 to 60999), which the kernel hands to outgoing connections and to
/// binds on port 0.
const CLUSTER_PORTS: std::ops::Range<u16> = 20_000..32_768;

/// A port free now for a node to listen on. The node binds it only later,
/// in its own process, so the port is drawn at random from
/// [`CLUSTER_PORTS`]: one from the ephemeral range (what binding port 0
/// gives) can be taken meanwhile by any outgoing connection on the machine
/// (a bench's or another test's cluster making hundreds), and the node then
/// fails to start. Falls back to port 0 if none of the draws is free.
pub fn free_port() -> Result<u16, Error> {
    use std::hash::{BuildHasher, Hasher};
    let span = (CLUSTER_PORTS.end - CLUSTER_PORTS.start) as u64;
    for attempt in 0..64u64 {
        // std's per-process random keys, mixed with the attempt: no
        // dependency needed for a port draw.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(attempt);
        let port = CLUSTER_PORTS.start + (hasher.finish() % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Unavailable(format!("cannot find a free port: {e}")))?;
    Ok(listener.local_addr().map_err(|e| Error::Unavailable(e.to_string()))?.port())
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub coordinator: NodeProcess,
    pub participants: Vec<NodeProcess>,
    /// The proxy of each directed link `(from, to)`, when the links are
    /// proxied; empty otherwise.
    links: BTreeMap<(NodeRef, NodeRef), LinkProxy>,
    /// The cluster's CA (`None` when insecure).
    ca: Option<LocalCa>,
    /// The bench's client and operator identities.
    client: Security,
    operator: Security,
}

impl Cluster {
    /// Starts the coordinator and the participants, waits until each is
    /// healthy, and opens the accounts.
    pub async fn start(spec: ClusterSpec) -> Result<Cluster, Error> {
        assert!(spec.participants > 0 && spec.accounts_per_participant > 0);
        std::fs::create_dir_all(&spec.data_dir)
            .map_err(|e| Error::Fatal(format!("cannot create {}: {e}", spec.data_dir.display())))?;
        for binary in ["coordinator", "participant"] {
            if !spec.bin_dir.join(binary).exists() {
                return Err(Error::NotFound(format!(
                    "{} is missing; build the binaries first: cargo build --release --workspace",
                    spec.bin_dir.join(binary).display()
                )));
            }
        }
        let trust = ClusterTrust::make(&spec)?;
        let scheme = trust.client.scheme();
        let coordinator_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse().expect("valid address");
        let mut participants = Vec::new();
        let mut shards = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..spec.participants {
            addrs.push(format!("127.0.0.1:{}", free_port()?).parse::<SocketAddr>().expect("valid address"));
        }
        let mut links = BTreeMap::new();
        if spec.proxied_links {
            let nodes: Vec<(NodeRef, SocketAddr)> = std::iter::once((NodeRef::Coordinator, coordinator_addr))
                .chain(addrs.iter().enumerate().map(|(i, addr)| (NodeRef::Participant(i), *addr)))
                .collect();
            for (from, _) in &nodes {
                for (to, to_addr) in &nodes {
                    if from != to {
                        let proxy = LinkProxy::start(*to_addr).await.map_err(|e| {
                            Error::Unavailable(format!("cannot start the proxy of the link {from}->{to}: {e}"))
                        })?;
                        links.insert((*from, *to), proxy);
                    }
                }
            }
            assert_eq!(links.len(), nodes.len() * (nodes.len() - 1), "one proxy per directed link");
        }
        // The URL `from` uses to reach `to` at `addr`: its link's proxy, or
        // `to` itself.
        let url = |from: NodeRef, to: NodeRef, addr: SocketAddr| match links.get(&(from, to)) {
            Some(proxy) => format!("{scheme}://{}", proxy.local_addr()),
            None => format!("{scheme}://{addr}"),
        };
        for (i, addr) in addrs.iter().copied().enumerate() {
            let node = NodeRef::Participant(i);
            let first = i as u64 * spec.accounts_per_participant;
            shards.push(format!(
                "{node}={}@{first}..{}",
                url(NodeRef::Coordinator, node, addr),
                first + spec.accounts_per_participant
            ));
            let data_dir = spec.data_dir.join(node.to_string());
            let mut args = vec![
                "--accounts".into(),
                format!("{first}..{}", first + spec.accounts_per_participant),
                "--listen".into(),
                addr.to_string(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--node-id".into(),
                node.to_string(),
                "--coordinator".into(),
                format!("c1={}", url(node, NodeRef::Coordinator, coordinator_addr)),
                "--log-level".into(),
                spec.log_level.clone(),
                // Every node shares this machine's cores: one worker each
                // avoids the runtimes waking each other's idle workers.
                "--worker-threads".into(),
                "1".into(),
            ];
            if spec.metrics {
                args.extend(["--http-addr".into(), "127.0.0.1:0".into()]);
            }
            args.extend(trust.flags(node));
            // Every participant knows every other (choreographed sagas send
            // events between them); its entry for itself stays direct.
            for (j, peer_addr) in addrs.iter().copied().enumerate() {
                let peer = NodeRef::Participant(j);
                args.push("--peer".into());
                args.push(format!("{peer}={}", url(node, peer, peer_addr)));
            }
            args.extend(spec.participant_args.iter().cloned());
            participants.push(NodeProcess {
                node,
                addr,
                binary: spec.bin_dir.join("participant"),
                args,
                log_path: spec.data_dir.join(format!("{node}.log")),
                data_dir,
                scheme,
                probe: trust.client.clone(),
                child: None,
                paused: false,
                http_addr: None,
                env: Vec::new(),
            });
        }
        let data_dir = spec.data_dir.join("c1");
        let mut args = vec![
            "--listen".into(),
            coordinator_addr.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--node-id".into(),
            "c1".into(),
            "--log-level".into(),
            spec.log_level.clone(),
            "--worker-threads".into(),
            "1".into(),
        ];
        if spec.metrics {
            args.extend(["--http-addr".into(), "127.0.0.1:0".into()]);
        }
        args.extend(trust.flags(NodeRef::Coordinator));
        for shard in shards {
            args.push("--participant".into());
            args.push(shard);
        }
        args.extend(spec.coordinator_args.iter().cloned());
        let coordinator = NodeProcess {
            node: NodeRef::Coordinator,
            addr: coordinator_addr,
            binary: spec.bin_dir.join("coordinator"),
            args,
            log_path: spec.data_dir.join("c1.log"),
            data_dir,
            scheme,
            probe: trust.client.clone(),
            child: None,
            paused: false,
            http_addr: None,
            env: Vec::new(),
        };
        let ClusterTrust { ca, client, operator, .. } = trust;
        let mut cluster = Cluster { spec, coordinator, participants, links, ca, client, operator };
        for i in 0..cluster.participants.len() {
            cluster.participants[i].spawn(cluster.spec.ready_timeout).await?;
        }
        cluster.coordinator.spawn(cluster.spec.ready_timeout).await?;
        cluster.open_accounts().await?;
        Ok(cluster)
    }

    async fn open_accounts(&self) -> Result<(), Error> {
        for (i, participant) in self.participants.iter().enumerate() {
            let mut client = ParticipantClient::new(crate::server::channel(&participant.url(), &self.operator)?)
                .max_encoding_message_size(64 * 1024 * 1024);
            let first = i as u64 * self.spec.accounts_per_participant;
            let end = first + self.spec.accounts_per_participant;
            let mut start = first;
            while start < end {
                let stop = (start + OPEN_CHUNK).min(end);
                let accounts: Vec<_> = (start..stop)
                    .filter(|account| !self.spec.unopened_accounts.contains(account))
                    .map(|account| pb::NewAccount { account, initial_balance: self.spec.initial_balance })
                    .collect();
                if accounts.is_empty() {
                    start = stop;
                    continue;
                }
                match client.open_accounts(pb::OpenAccountsRequest { accounts }).await {
                    Ok(_) => {}
                    // Reopening a kept cluster: the accounts are there.
                    Err(status) if status.code() == tonic::Code::AlreadyExists => return Ok(()),
                    Err(status) => return Err(Error::from(status)),
                }
                start = stop;
            }
        }
        Ok(())
    }

    pub fn node(&mut self, node: NodeRef) -> &mut NodeProcess {
        match node {
            NodeRef::Coordinator => &mut self.coordinator,
            NodeRef::Participant(i) => &mut self.participants[i],
        }
    }

    pub fn nodes(&self) -> Vec<NodeRef> {
        let mut nodes = vec![NodeRef::Coordinator];
        nodes.extend((0..self.participants.len()).map(NodeRef::Participant));
        nodes
    }

    /// The participant that owns `account`.
    pub fn owner(&self, account: u64) -> NodeRef {
        NodeRef::Participant((account / self.spec.accounts_per_participant) as usize)
    }

    /// Every account id of the cluster, in order.
    pub fn accounts(&self) -> std::ops::Range<u64> {
        0..self.spec.accounts_per_participant * self.participants.len() as u64
    }

    /// The bench's client identity (`tandem://client/bench`): transfers,
    /// lookups, audits.
    pub fn client(&self) -> &Security {
        &self.client
    }

    /// The bench's operator identity (`tandem://operator/bench`): accounts,
    /// balances, resolutions.
    pub fn operator(&self) -> &Security {
        &self.operator
    }

    /// A new certificate of this cluster's CA for `role`/`name`, for a test
    /// that speaks as a node or as a caller the cluster does not know
    /// ([`Security::Insecure`] when the cluster is).
    pub fn identity(&self, role: Role, name: &str) -> Result<Security, Error> {
        match &self.ca {
            Some(ca) => ca.security(role, name),
            None => Ok(Security::Insecure),
        }
    }

    /// A channel to `url` as `who`.
    pub fn channel(&self, url: &str, who: &Security) -> Result<Channel, Error> {
        crate::server::channel(url, who)
    }

    pub fn coordinator_client(&self, who: &Security) -> Result<CoordinatorClient<Channel>, Error> {
        Ok(CoordinatorClient::new(crate::server::channel(&self.coordinator.url(), who)?)
            .max_decoding_message_size(64 * 1024 * 1024))
    }

    pub fn participant_client(&self, i: usize, who: &Security) -> Result<ParticipantClient<Channel>, Error> {
        Ok(ParticipantClient::new(crate::server::channel(&self.participants[i].url(), who)?)
            .max_decoding_message_size(64 * 1024 * 1024))
    }

    /// Where the CA and the certificates are (`None` when insecure).
    pub fn tls_dir(&self) -> Option<PathBuf> {
        self.ca.as_ref().map(|_| self.spec.data_dir.join(TLS_DIR))
    }

    pub async fn kill(&mut self, node: NodeRef) {
        self.node(node).kill().await;
    }

    /// SIGKILL the node and delete its data directory: a disk lost. Its
    /// next [`Cluster::restart`] starts it on an empty one.
    pub async fn lose_disk(&mut self, node: NodeRef) -> Result<(), Error> {
        let process = self.node(node);
        process.kill().await;
        match std::fs::remove_dir_all(&process.data_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Fatal(format!("cannot delete {}: {e}", process.data_dir.display()))),
        }
    }

    pub async fn restart(&mut self, node: NodeRef) -> Result<(), Error> {
        let timeout = self.spec.ready_timeout;
        let process = self.node(node);
        process.kill().await;
        process.spawn(timeout).await
    }

    /// Nodes that exited without being told to, with their exit status.
    pub fn crashed(&mut self) -> Vec<(NodeRef, std::process::ExitStatus)> {
        let mut crashed = Vec::new();
        for node in self.nodes() {
            if let Some(status) = self.node(node).exited() {
                crashed.push((node, status));
            }
        }
        crashed
    }

    /// SIGTERM to every node (participants first), SIGKILL after 5 s.
    pub async fn stop(&mut self) {
        for node in self.nodes().into_iter().rev() {
            self.node(node).stop(Duration::from_secs(5)).await;
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.spec.data_dir
    }

    /// The proxy of the directed link `from` → `to`; `None` when the links
    /// are not proxied, or `from == to`.
    pub fn link(&self, from: NodeRef, to: NodeRef) -> Option<&LinkProxy> {
        self.links.get(&(from, to))
    }

    /// Both directions of the link between `a` and `b`.
    ///
    /// Panics if the links are not proxied or there is no such link: a link
    /// fault on a cluster started without `proxied_links` is a bug of the
    /// caller.
    fn both_directions(&self, a: NodeRef, b: NodeRef) -> [&LinkProxy; 2] {
        assert!(self.spec.proxied_links, "link {a}-{b}: the cluster was started without proxied_links");
        let one = |from, to| self.link(from, to).unwrap_or_else(|| panic!("there is no link {from}->{to}"));
        [one(a, b), one(b, a)]
    }

    /// Every chunk sent either way between `a` and `b` is held `delay` (one
    /// way: a round trip between them gains twice it).
    pub fn set_link_delay(&self, a: NodeRef, b: NodeRef, delay: Duration) {
        for proxy in self.both_directions(a, b) {
            proxy.set_delay(delay);
        }
    }

    /// Closes every connection between `a` and `b`, both ways, and refuses
    /// new ones until [`Cluster::heal_link`].
    pub fn cut_link(&self, a: NodeRef, b: NodeRef) {
        for proxy in self.both_directions(a, b) {
            proxy.cut();
        }
    }

    /// Closes the connections `from` opens to `to` and refuses new ones
    /// until [`Cluster::heal_link`]; the other way (`to` calling `from`)
    /// still works.
    pub fn cut_link_one_way(&self, from: NodeRef, to: NodeRef) {
        self.one_direction(from, to).cut();
    }

    /// Makes the connections `from` opens to `to` silent (bytes vanish,
    /// nothing is closed, new connections are never answered) until
    /// [`Cluster::heal_link`]; the other way still works.
    pub fn black_hole_link(&self, from: NodeRef, to: NodeRef) {
        self.one_direction(from, to).black_hole();
    }

    fn one_direction(&self, from: NodeRef, to: NodeRef) -> &LinkProxy {
        assert!(self.spec.proxied_links, "link {from}->{to}: the cluster was started without proxied_links");
        self.link(from, to).unwrap_or_else(|| panic!("there is no link {from}->{to}"))
    }

    /// No delay, connections allowed, both ways between `a` and `b`.
    pub fn heal_link(&self, a: NodeRef, b: NodeRef) {
        for proxy in self.both_directions(a, b) {
            proxy.heal();
        }
    }
}

/// The folder of the data directory with the cluster's certificates.
pub const TLS_DIR: &str = "tls";

/// The certificates of one cluster start: written in `DATA_DIR/tls/`, each
/// node's flags naming its files.
struct ClusterTrust {
    ca: Option<LocalCa>,
    dir: PathBuf,
    client: Security,
    operator: Security,
}

impl ClusterTrust {
    fn make(spec: &ClusterSpec) -> Result<ClusterTrust, Error> {
        let dir = spec.data_dir.join(TLS_DIR);
        if spec.insecure {
            return Ok(ClusterTrust { ca: None, dir, client: Security::Insecure, operator: Security::Insecure });
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::Fatal(format!("cannot create {}: {e}", dir.display())))?;
        let ca = LocalCa::new("tandem local cluster CA")?;
        let ca_file = ca.write_ca(&dir)?;
        let mut nodes = vec![NodeRef::Coordinator];
        nodes.extend((0..spec.participants).map(NodeRef::Participant));
        for node in nodes {
            let role = match node {
                NodeRef::Coordinator => Role::Coordinator,
                NodeRef::Participant(_) => Role::Participant,
            };
            ca.issue(&Caller::new(role, &node.to_string())?)?.write(&dir, &node.to_string())?;
        }
        let load = |role: Role, stem: &str| -> Result<Security, Error> {
            let files = ca.issue(&Caller::new(role, "bench")?)?.write(&dir, stem)?;
            let flags = TlsFlags {
                tls_cert: Some(files.cert),
                tls_key: Some(files.key),
                tls_ca: Some(ca_file.clone()),
                insecure: false,
            };
            flags.security()
        };
        let client = load(Role::Client, "client")?;
        let operator = load(Role::Operator, "operator")?;
        Ok(ClusterTrust { ca: Some(ca), dir, client, operator })
    }

    /// The security flags of `node`.
    fn flags(&self, node: NodeRef) -> Vec<String> {
        if self.ca.is_none() {
            return vec!["--insecure".into()];
        }
        let file = |name: String| self.dir.join(name).display().to_string();
        vec![
            "--tls-cert".into(),
            file(format!("{node}.pem")),
            "--tls-key".into(),
            file(format!("{node}.key")),
            "--tls-ca".into(),
            file("ca.pem".into()),
        ]
    }
}
