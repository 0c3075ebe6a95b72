//! Who may call what: a role for every caller, and one table that says which
//! roles may make each RPC.
//!
//! tandem moves money, so a node must not obey whoever reaches its port.
//! Every link is mutual TLS (see [`crate::tls`]): a server accepts a
//! connection only from a caller whose certificate chains to the CA it was
//! given, and the caller's certificate says who it is, as a SAN URI
//! `tandem://ROLE/NAME` (for example `tandem://coordinator/c1`). The roles:
//!
//! - `client`: moves money and looks it up (Transfer, TransferBatch, Execute,
//!   GetTransaction, Audit; StartTransfer and GetTransferStatus on a
//!   participant; GetBalance);
//! - `coordinator`: the 2PC calls (Prepare, Commit, Abort and their
//!   batches), the saga steps, ReadBalances and ListPrepared on a
//!   participant, and only at the participants that were configured with
//!   it, by name (`--coordinator NAME=URL`);
//! - `participant`: the choreography events (DeliverEvent(s)) at its
//!   configured peers (`--peer NAME=URL`), and the decision query
//!   (QueryDecision) at a coordinator whose directory names it;
//! - `operator`: everything that opens, closes or resolves by hand
//!   (OpenAccounts, SetAccountClosed, dead letters, parked transfers,
//!   heuristic decisions on in-doubt transactions: ResolveInDoubt), and
//!   the read-only calls that such a resolution needs (balances, in-doubt
//!   transactions, transaction and transfer status).
//!
//! Health and reflection are open to every authenticated caller. An RPC that
//! is not in [`POLICY`] is refused: a new RPC is closed until someone decides
//! who may make it (a test checks that every RPC of the protos has a row).
//!
//! The check runs in a `tower` layer in front of every service
//! ([`AuthorizeLayer`]), before the request is decoded, so a refused call
//! reaches no handler and changes nothing; it is answered PERMISSION_DENIED
//! with a message naming the RPC, who may make it, and who asked. The caller
//! is put in the request's extensions ([`Caller`]) for the handlers' logs.
//!
//! With `--insecure` there are no certificates and so no callers to tell
//! apart: every caller may make every call. That is for development on a
//! machine whose ports no one else can reach, never for money.

use crate::domain::Id;
use crate::Error;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::CertificateDer;

/// The URI scheme of a caller's identity in its certificate's SAN.
pub const URI_SCHEME: &str = "tandem://";

/// What a caller may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Client,
    Coordinator,
    Participant,
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Client, Role::Coordinator, Role::Participant, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Coordinator => "coordinator",
            Role::Participant => "participant",
            Role::Operator => "operator",
        }
    }

    pub fn parse(text: &str) -> Result<Role, Error> {
        Role::ALL.into_iter().find(|role| role.as_str() == text).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{text:?} is not a role; the roles are client, coordinator, participant, operator"
            ))
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is calling, as its certificate says: `tandem://ROLE/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Caller {
    pub role: Role,
    /// A node's id (`c1`, `p2`), or any name for a client or an operator.
    pub name: Id,
}

impl Caller {
    pub fn new(role: Role, name: &str) -> Result<Caller, Error> {
        Ok(Caller { role, name: Id::parse("caller name", name)? })
    }

    /// The SAN URI that names this caller in a certificate.
    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}", self.role, self.name)
    }

    /// Parses `tandem://ROLE/NAME`.
    pub fn parse_uri(uri: &str) -> Result<Caller, Error> {
        let bad = |why: String| {
            Error::InvalidInput(format!("{uri:?} is not a tandem identity ({why}); expected {URI_SCHEME}ROLE/NAME"))
        };
        let rest = uri.strip_prefix(URI_SCHEME).ok_or_else(|| bad(format!("it does not start with {URI_SCHEME}")))?;
        let (role, name) = rest.split_once('/').ok_or_else(|| bad("no '/' after the role".into()))?;
        Caller::new(Role::parse(role).map_err(|e| bad(e.to_string()))?, name).map_err(|e| bad(e.to_string()))
    }

    /// The caller a DER certificate names: its one SAN URI with the
    /// `tandem://` scheme. None, a malformed one, or two are refused (a
    /// certificate that names two identities names none for sure).
    pub fn from_certificate(der: &[u8]) -> Result<Caller, Error> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| Error::InvalidInput(format!("the certificate cannot be parsed: {e}")))?;
        let names = certificate.subject_alternative_name().map_err(|e| {
            Error::InvalidInput(format!("the certificate's subject alternative names are malformed: {e}"))
        })?;
        let mut found = None;
        for name in names.iter().flat_map(|names| names.value.general_names.iter()) {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if uri.starts_with(URI_SCHEME) {
                    if found.is_some() {
                        return Err(Error::InvalidInput(
                            "the certificate names more than one tandem:// identity".into(),
                        ));
                    }
                    found = Some(Caller::parse_uri(uri)?);
                }
            }
        }
        found.ok_or_else(|| {
            Error::InvalidInput(format!(
                "the certificate names no tandem identity (a subject alternative name URI {URI_SCHEME}ROLE/NAME)"
            ))
        })
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// One kind of caller allowed to make an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Any caller with a certificate of the CA (health, reflection).
    Authenticated,
    /// Any caller with this role.
    Role(Role),
    /// A coordinator this node was configured with, by name.
    ConfiguredCoordinator,
    /// A participant this node was configured with, by name: a peer of a
    /// participant, or a participant in a coordinator's directory.
    ConfiguredParticipant,
}

impl fmt::Display for Who {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Who::Authenticated => f.write_str("any authenticated caller"),
            Who::Role(role) => write!(f, "the {role} role"),
            Who::ConfiguredCoordinator => f.write_str("the coordinators this node was configured with"),
            Who::ConfiguredParticipant => f.write_str("the participants this node was configured with"),
        }
    }
}

const CLIENT: Who = Who::Role(Role::Client);
const OPERATOR: Who = Who::Role(Role::Operator);
const COORDINATOR: Who = Who::ConfiguredCoordinator;
const PARTICIPANT: Who = Who::ConfiguredParticipant;

/// Every RPC a tandem server serves, by gRPC path, and who may make it.
/// A path that is not here is refused.
pub const POLICY: &[(&str, &[Who])] = &[
    // The coordinator.
    ("/tandem.v1.Coordinator/Transfer", &[CLIENT]),
    ("/tandem.v1.Coordinator/TransferBatch", &[CLIENT]),
    ("/tandem.v1.Coordinator/Execute", &[CLIENT]),
    ("/tandem.v1.Coordinator/GetTransaction", &[CLIENT, OPERATOR]),
    ("/tandem.v1.Coordinator/Audit", &[CLIENT, OPERATOR]),
    ("/tandem.v1.Coordinator/QueryDecision", &[PARTICIPANT]),
    ("/tandem.v1.Coordinator/ListDeadLetters", &[OPERATOR]),
    ("/tandem.v1.Coordinator/ResolveDeadLetter", &[OPERATOR]),
    // A participant: two-phase commit, and one-phase commit.
    ("/tandem.v1.Participant/Prepare", &[COORDINATOR]),
    ("/tandem.v1.Participant/PrepareBatch", &[COORDINATOR]),
    ("/tandem.v1.Participant/Commit", &[COORDINATOR]),
    ("/tandem.v1.Participant/CommitBatch", &[COORDINATOR]),
    ("/tandem.v1.Participant/Abort", &[COORDINATOR]),
    ("/tandem.v1.Participant/CommitOnePhase", &[COORDINATOR]),
    ("/tandem.v1.Participant/CommitOnePhaseBatch", &[COORDINATOR]),
    // Accounts and balances.
    ("/tandem.v1.Participant/OpenAccounts", &[OPERATOR]),
    ("/tandem.v1.Participant/SetAccountClosed", &[OPERATOR]),
    ("/tandem.v1.Participant/GetBalance", &[CLIENT, OPERATOR]),
    ("/tandem.v1.Participant/ReadBalances", &[COORDINATOR, OPERATOR]),
    ("/tandem.v1.Participant/ListPrepared", &[COORDINATOR, OPERATOR]),
    // Orchestrated sagas.
    ("/tandem.v1.Participant/SagaStep", &[COORDINATOR]),
    ("/tandem.v1.Participant/SagaStepBatch", &[COORDINATOR]),
    ("/tandem.v1.Participant/ForgetSagas", &[COORDINATOR]),
    // Choreographed sagas.
    ("/tandem.v1.Participant/StartTransfer", &[CLIENT]),
    ("/tandem.v1.Participant/GetTransferStatus", &[CLIENT, OPERATOR]),
    ("/tandem.v1.Participant/ListParkedTransfers", &[OPERATOR]),
    ("/tandem.v1.Participant/ResolveParkedTransfer", &[OPERATOR]),
    ("/tandem.v1.Participant/ResolveInDoubt", &[OPERATOR]),
    ("/tandem.v1.Participant/LookupTransaction", &[OPERATOR]),
    ("/tandem.v1.Participant/DeliverEvent", &[PARTICIPANT]),
    ("/tandem.v1.Participant/DeliverEvents", &[PARTICIPANT]),
    // Health, in words (GetHealth) and as the standard service.
    ("/tandem.v1.Coordinator/GetHealth", &[Who::Authenticated]),
    ("/tandem.v1.Participant/GetHealth", &[Who::Authenticated]),
    ("/grpc.health.v1.Health/Check", &[Who::Authenticated]),
    ("/grpc.health.v1.Health/Watch", &[Who::Authenticated]),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", &[Who::Authenticated]),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &[Who::Authenticated]),
];

/// The names a node was configured with: who [`Who::ConfiguredCoordinator`]
/// and [`Who::ConfiguredParticipant`] mean on this node.
#[derive(Debug, Clone, Default)]
pub struct Configured {
    pub coordinators: BTreeSet<Id>,
    pub participants: BTreeSet<Id>,
}

/// Decides whether a caller may make a call on this node. Cheap to clone.
#[derive(Clone)]
pub struct Authorizer {
    inner: Arc<AuthorizerInner>,
}

struct AuthorizerInner {
    /// `false` under `--insecure`: every call is allowed.
    enforced: bool,
    configured: Configured,
    policy: BTreeMap<&'static str, &'static [Who]>,
    /// The callers of the certificate chains seen lately (see
    /// [`Authorizer::caller_of`]).
    recent: Mutex<Vec<(Arc<Vec<CertificateDer<'static>>>, Result<Caller, String>)>>,
}

/// Most certificate chains whose caller is remembered; about one per open
/// connection is needed.
pub const RECENT_CALLERS_MAX: usize = 256;

impl Authorizer {
    /// Checks every call against [`POLICY`] and `configured`.
    pub fn enforcing(configured: Configured) -> Authorizer {
        Authorizer::new(true, configured)
    }

    /// Allows every call: `--insecure`, where no caller has a certificate.
    pub fn allowing_all() -> Authorizer {
        Authorizer::new(false, Configured::default())
    }

    /// What a node with `security` enforces: the policy under mutual TLS,
    /// nothing under `--insecure` (no caller has a certificate to check).
    pub fn for_node(security: &crate::tls::Security, configured: Configured) -> Authorizer {
        match security {
            crate::tls::Security::Mutual(_) => Authorizer::enforcing(configured),
            crate::tls::Security::Insecure => Authorizer::allowing_all(),
        }
    }

    fn new(enforced: bool, configured: Configured) -> Authorizer {
        let policy: BTreeMap<_, _> = POLICY.iter().copied().collect();
        assert_eq!(policy.len(), POLICY.len(), "an RPC has two rows in the policy");
        Authorizer { inner: Arc::new(AuthorizerInner { enforced, configured, policy, recent: Mutex::new(Vec::new()) }) }
    }

    /// Whether `caller` (`None`: no certificate) may call `path`; the
    /// PERMISSION_DENIED status to answer if not.
    pub fn check(&self, path: &str, caller: Option<&Caller>) -> Result<(), tonic::Status> {
        if !self.inner.enforced {
            return Ok(());
        }
        let rpc = path.strip_prefix('/').unwrap_or(path);
        let Some(allowed) = self.inner.policy.get(path) else {
            return Err(tonic::Status::permission_denied(format!("{rpc} is not an RPC anyone may call here")));
        };
        let Some(caller) = caller else {
            return Err(tonic::Status::permission_denied(format!(
                "{rpc}: the caller presented no certificate naming a tandem identity"
            )));
        };
        let configured = &self.inner.configured;
        let passes = |who: &Who| match who {
            Who::Authenticated => true,
            Who::Role(role) => caller.role == *role,
            Who::ConfiguredCoordinator => {
                caller.role == Role::Coordinator && configured.coordinators.contains(&caller.name)
            }
            Who::ConfiguredParticipant => {
                caller.role == Role::Participant && configured.participants.contains(&caller.name)
            }
        };
        if allowed.iter().any(passes) {
            return Ok(());
        }
        let names = |set: &BTreeSet<Id>| set.iter().map(Id::as_str).collect::<Vec<_>>().join(", ");
        let whom: Vec<String> = allowed
            .iter()
            .map(|who| match who {
                Who::ConfiguredCoordinator => format!("{who} ({})", names(&configured.coordinators)),
                Who::ConfiguredParticipant => format!("{who} ({})", names(&configured.participants)),
                other => other.to_string(),
            })
            .collect();
        Err(tonic::Status::permission_denied(format!("{rpc} is for {}; the caller is {caller}", whom.join(" or "))))
    }

    /// The caller a connection's certificate chain names (its first
    /// certificate is the caller's own). Parsing a certificate costs
    /// microseconds and every call on a connection carries the same chain,
    /// so the answer is remembered by the chain's allocation: tonic shares
    /// one `Arc` among all the calls of a connection. Keeping that `Arc`
    /// keeps the allocation alive, so its address cannot be reused by
    /// another connection's chain while it is remembered.
    fn caller_of(&self, chain: &Arc<Vec<CertificateDer<'static>>>) -> Result<Caller, String> {
        let mut recent = self.inner.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, caller)) = recent.iter().find(|(known, _)| Arc::ptr_eq(known, chain)) {
            return caller.clone();
        }
        let caller = match chain.first() {
            Some(certificate) => Caller::from_certificate(certificate).map_err(|e| e.to_string()),
            None => Err("the caller presented no certificate".to_string()),
        };
        if recent.len() >= RECENT_CALLERS_MAX {
            drop(recent.remove(0));
        }
        recent.push((chain.clone(), caller.clone()));
        caller
    }
}

/// An operator's decision as it is stored and logged: who made it (the
/// certificate's identity, which the [`Authorize`] layer put in the
/// request's extensions; "an unauthenticated operator" on a cluster
/// without TLS) and why. The reason is required: 1 to
/// [`REASON_STORED_LEN_MAX`](crate::domain::REASON_STORED_LEN_MAX) bytes.
pub fn operator_decision(extensions: &tonic::Extensions, reason: &str) -> Result<String, Error> {
    if reason.trim().is_empty() {
        return Err(Error::InvalidInput("reason is required: who decided and why".into()));
    }
    crate::domain::check_text_len("reason", reason, crate::domain::REASON_STORED_LEN_MAX)?;
    let who = match extensions.get::<Caller>() {
        Some(caller) => caller.uri(),
        None => "an unauthenticated operator".to_string(),
    };
    Ok(format!("by {who}: {reason}"))
}

/// The `tower` layer that puts an [`Authorizer`] in front of every service
/// of a server.
#[derive(Clone)]
pub struct AuthorizeLayer {
    authorizer: Authorizer,
}

impl AuthorizeLayer {
    pub fn new(authorizer: Authorizer) -> AuthorizeLayer {
        AuthorizeLayer { authorizer }
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner, authorizer: self.authorizer.clone() }
    }
}

/// See [`AuthorizeLayer`].
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    authorizer: Authorizer,
}

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let caller = if self.authorizer.inner.enforced {
            match request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|tls| tls.peer_certs()) {
                Some(chain) => match self.authorizer.caller_of(&chain) {
                    Ok(caller) => Some(caller),
                    Err(why) => {
                        let status = tonic::Status::permission_denied(format!(
                            "{}: {why}",
                            request.uri().path().trim_start_matches('/')
                        ));
                        return Box::pin(std::future::ready(Ok(status.into_http())));
                    }
                },
                None => None,
            }
        } else {
            None
        };
        if let Err(status) = self.authorizer.check(request.uri().path(), caller.as_ref()) {
            tracing::debug!(path = request.uri().path(), caller = ?caller, "refused: {}", status.message());
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        if let Some(caller) = caller {
            request.extensions_mut().insert(caller);
        }
        // The usual tower dance: call the service that was made ready, leave
        // a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uri: &str) -> Caller {
        Caller::parse_uri(uri).unwrap()
    }

    fn participant_p1() -> Authorizer {
        let id = |s: &str| Id::parse("name", s).unwrap();
        Authorizer::enforcing(Configured { coordinators: [id("c1")].into(), participants: [id("p1"), id("p2")].into() })
    }

    #[test]
    fn identities_parse_from_uris_and_bad_ones_are_refused() {
        assert_eq!(caller("tandem://coordinator/c1"), Caller::new(Role::Coordinator, "c1").unwrap());
        assert_eq!(caller("tandem://operator/alice").uri(), "tandem://operator/alice");
        for bad in [
            "tandem://king/c1",
            "tandem://coordinator/",
            "tandem://coordinator",
            "https://coordinator/c1",
            "tandem://client/a b",
            "tandem://client/a/b",
        ] {
            assert!(Caller::parse_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_rpc_of_the_protos_has_a_row_and_every_row_an_rpc() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let mut served = BTreeSet::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    served.insert(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
        assert!(served.len() > 20, "{served:?}");
        for path in &served {
            assert!(POLICY.iter().any(|(p, _)| p == path), "{path} has no row in the policy: who may call it?");
        }
        for (path, _) in POLICY.iter().filter(|(p, _)| p.starts_with("/tandem.")) {
            assert!(served.contains(*path), "{path} is in the policy but no service serves it");
        }
    }

    #[test]
    fn configured_names_and_roles_decide() {
        let auth = participant_p1();
        let prepare = "/tandem.v1.Participant/Prepare";
        assert!(auth.check(prepare, Some(&caller("tandem://coordinator/c1"))).is_ok());
        let denied = auth.check(prepare, Some(&caller("tandem://coordinator/c2"))).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("(c1)") && denied.message().contains("tandem://coordinator/c2"),
            "{denied:?}"
        );
        assert!(auth.check(prepare, Some(&caller("tandem://participant/c1"))).is_err());
        assert!(auth.check(prepare, Some(&caller("tandem://operator/c1"))).is_err());
        assert!(auth.check(prepare, None).is_err());
        let deliver = "/tandem.v1.Participant/DeliverEvents";
        assert!(auth.check(deliver, Some(&caller("tandem://participant/p2"))).is_ok());
        assert!(auth.check(deliver, Some(&caller("tandem://participant/p3"))).is_err());
        assert!(auth.check(deliver, Some(&caller("tandem://coordinator/c1"))).is_err());
        let open = "/tandem.v1.Participant/OpenAccounts";
        assert!(auth.check(open, Some(&caller("tandem://operator/anyone"))).is_ok());
        assert!(auth.check(open, Some(&caller("tandem://client/anyone"))).is_err());
        let health = "/grpc.health.v1.Health/Check";
        assert!(auth.check(health, Some(&caller("tandem://client/x"))).is_ok());
        assert!(auth.check(health, None).is_err());
        // Not in the table: refused, whoever asks.
        assert!(auth.check("/tandem.v1.Participant/Nope", Some(&caller("tandem://operator/root"))).is_err());
        // --insecure: no certificates, everything goes.
        assert!(Authorizer::allowing_all().check(prepare, None).is_ok());
    }
}
