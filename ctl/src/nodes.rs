//! Which nodes tandemctl talks to, as whom, and how one call's failure is
//! reported.
//!
//! The operator names the nodes (`--coordinator URL`, `--participant
//! NAME=URL`): no RPC lists the coordinator's directory, so tandemctl cannot
//! discover the participants. Every call carries the `--timeout-ms`
//! deadline, and a failure becomes an [`RpcError`] naming the node, its URL,
//! the RPC and the gRPC code and message, never a panic: whatever a node
//! answers, tandemctl prints it and exits 3.
//!
//! Channels are made by the library (`tandem::server::channel`), the same
//! code every node uses, so TLS is configured exactly as the nodes expect
//! (the URL's scheme must match: `https://` with certificates, `http://`
//! with `--insecure`).

use serde::Serialize;
use std::fmt;
use std::time::Duration;
use tandem::pb::coordinator_client::CoordinatorClient;
use tandem::pb::participant_client::ParticipantClient;
use tandem::tls::Security;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

/// Largest answer decoded (64 MiB as the bench's clients allow; a list
/// answer holds at most 1,000 records).
pub const DECODED_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Longest reason an operator may give with a decision (the nodes refuse
/// a longer one: INVALID_ARGUMENT).
pub const REASON_BYTES_MAX: usize = 4_096;

/// A decision's reason as the nodes take it: 1 to [`REASON_BYTES_MAX`]
/// bytes, not only blanks.
pub fn check_reason(reason: &str) -> Result<(), UsageError> {
    if reason.trim().is_empty() {
        return Err(UsageError("--reason: say who decided and why (it is stored with the decision)".into()));
    }
    if reason.len() > REASON_BYTES_MAX {
        return Err(UsageError(format!("--reason: {} bytes; the most is {REASON_BYTES_MAX}", reason.len())));
    }
    Ok(())
}

/// The label of the coordinator in output and errors (its id is not known
/// to tandemctl: nothing in the API returns it).
pub const COORDINATOR_LABEL: &str = "coordinator";

/// One node as the operator named it.
#[derive(Debug, Clone)]
pub struct Node {
    /// `coordinator`, or the participant's name as given (its id in the
    /// coordinator's directory, e.g. `p1`).
    pub name: String,
    pub url: String,
    channel: Channel,
}

/// Everything a command may call.
pub struct Nodes {
    coordinator: Option<Node>,
    pub participants: Vec<Node>,
    pub timeout: Duration,
}

/// A mistake in what the operator gave (exit 2), before any call.
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Nodes {
    /// Makes a lazily connecting channel per node: nothing is dialled
    /// until a command calls.
    pub fn new(
        coordinator_url: Option<&str>,
        participants: &[String],
        security: &Security,
        timeout: Duration,
    ) -> Result<Nodes, UsageError> {
        let channel = |url: &str, flag: &str| {
            tandem::server::channel(url, security).map_err(|e| UsageError(format!("{flag}: {e}")))
        };
        let coordinator = match coordinator_url {
            Some(url) => {
                Some(Node { name: COORDINATOR_LABEL.into(), url: url.into(), channel: channel(url, "--coordinator")? })
            }
            None => None,
        };
        let mut named = Vec::new();
        for given in participants {
            let (name, url) = given.split_once('=').ok_or_else(|| {
                UsageError(format!("--participant {given:?}: give NAME=URL, e.g. p1=https://127.0.0.1:7101"))
            })?;
            tandem::domain::Id::parse("the participant's name", name)
                .map_err(|e| UsageError(format!("--participant {given:?}: {e}")))?;
            if named.iter().any(|n: &Node| n.name == name) {
                return Err(UsageError(format!("--participant {name} is given twice")));
            }
            named.push(Node { name: name.into(), url: url.into(), channel: channel(url, "--participant")? });
        }
        Ok(Nodes { coordinator, participants: named, timeout })
    }

    /// The coordinator, or a usage error saying how to name it.
    pub fn coordinator(&self) -> Result<&Node, UsageError> {
        self.coordinator.as_ref().ok_or_else(|| {
            UsageError("this command asks the coordinator: give --coordinator URL (or TANDEM_COORDINATOR)".into())
        })
    }

    pub fn coordinator_if_given(&self) -> Option<&Node> {
        self.coordinator.as_ref()
    }

    /// The participants, or a usage error if none was named.
    pub fn participants(&self) -> Result<&[Node], UsageError> {
        if self.participants.is_empty() {
            return Err(UsageError(
                "this command asks the participants: give --participant NAME=URL for each (or TANDEM_PARTICIPANTS, \
                 comma-separated)"
                    .into(),
            ));
        }
        Ok(&self.participants)
    }

    /// The participant named `name`.
    pub fn participant(&self, name: &str) -> Result<&Node, UsageError> {
        self.participants.iter().find(|node| node.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.participants.iter().map(|node| node.name.as_str()).collect();
            UsageError(format!(
                "no participant {name:?} was given; give --participant {name}=URL (given: {})",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ))
        })
    }

    /// A request carrying the deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        request(self.timeout, message)
    }
}

impl Node {
    pub fn coordinator_client(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.channel.clone()).max_decoding_message_size(DECODED_BYTES_MAX)
    }

    pub fn participant_client(&self) -> ParticipantClient<Channel> {
        ParticipantClient::new(self.channel.clone()).max_decoding_message_size(DECODED_BYTES_MAX)
    }

    pub fn health_client(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }

    /// The error of `rpc` on this node.
    pub fn failed(&self, rpc: &'static str, status: &tonic::Status) -> RpcError {
        RpcError {
            node: self.name.clone(),
            url: self.url.clone(),
            rpc,
            code: code_name(status.code()),
            message: status_message(status),
        }
    }
}

/// A call that failed: the node could not be reached, or it answered an
/// error status.
#[derive(Debug, Clone, Serialize)]
pub struct RpcError {
    pub node: String,
    pub url: String,
    pub rpc: &'static str,
    /// The gRPC code's canonical name, e.g. `PERMISSION_DENIED`.
    pub code: &'static str,
    pub message: String,
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}) {}: {}: {}", self.node, self.url, self.rpc, self.code, self.message)
    }
}

/// The status's message, with the causes of a transport error (connection
/// refused, a TLS handshake refused, ...), which tonic keeps as its source.
fn status_message(status: &tonic::Status) -> String {
    let mut message = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    if message.is_empty() {
        message.push_str("(no message)");
    }
    message
}

/// The canonical name of a gRPC code, as grpcurl and the gRPC docs print it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Starts `call` on every node at once (before the returned future is
/// awaited) and gives the answers in the nodes' order, so output is
/// deterministic whatever answers first.
pub fn on_each<T, F, Fut>(
    nodes: &[Node],
    call: F,
) -> impl std::future::Future<Output = Vec<(Node, Result<T, RpcError>)>>
where
    F: Fn(Node) -> Fut,
    Fut: std::future::Future<Output = Result<T, RpcError>> + Send + 'static,
    T: Send + 'static,
{
    let calls: Vec<_> = nodes.iter().map(|node| (node.clone(), tokio::spawn(call(node.clone())))).collect();
    async move {
        let mut answers = Vec::with_capacity(calls.len());
        for (node, call) in calls {
            let answer = match call.await {
                Ok(answer) => answer,
                // A bug of tandemctl's, not the node's: say so rather than hide it.
                Err(joined) => Err(RpcError {
                    node: node.name.clone(),
                    url: node.url.clone(),
                    rpc: "(tandemctl)",
                    code: "INTERNAL",
                    message: format!("tandemctl's call failed: {joined}"),
                }),
            };
            answers.push((node, answer));
        }
        answers
    }
}

/// A request carrying `timeout` as its deadline.
pub fn request<T>(timeout: Duration, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// The RPCs tandemctl makes, named as in errors and in the trust policy
/// (`tandem::trust::POLICY`, without its leading '/').
pub mod rpc {
    pub const HEALTH_CHECK: &str = "grpc.health.v1.Health/Check";
    pub const GET_TRANSACTION: &str = "tandem.v1.Coordinator/GetTransaction";
    pub const AUDIT: &str = "tandem.v1.Coordinator/Audit";
    pub const LIST_DEAD_LETTERS: &str = "tandem.v1.Coordinator/ListDeadLetters";
    pub const RESOLVE_DEAD_LETTER: &str = "tandem.v1.Coordinator/ResolveDeadLetter";
    pub const LOOKUP_TRANSACTION: &str = "tandem.v1.Participant/LookupTransaction";
    pub const LIST_PREPARED: &str = "tandem.v1.Participant/ListPrepared";
    pub const RESOLVE_IN_DOUBT: &str = "tandem.v1.Participant/ResolveInDoubt";
    pub const LIST_PARKED_TRANSFERS: &str = "tandem.v1.Participant/ListParkedTransfers";
    pub const RESOLVE_PARKED_TRANSFER: &str = "tandem.v1.Participant/ResolveParkedTransfer";
    pub const GET_TRANSFER_STATUS: &str = "tandem.v1.Participant/GetTransferStatus";
    pub const READ_BALANCES: &str = "tandem.v1.Participant/ReadBalances";
    pub const GET_BALANCE: &str = "tandem.v1.Participant/GetBalance";
}
