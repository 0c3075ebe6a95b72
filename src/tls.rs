//! How a process secures its links: mutual TLS with its own certificate and
//! the CA of the cluster, or, only when asked with `--insecure`, plaintext.
//!
//! One [`Security`] per process serves both directions: a node presents the
//! same certificate when it serves (the server side of TLS) and when it
//! calls another node (the client side), so its certificate carries both
//! extended key usages and names it once, `tandem://ROLE/NAME` (see
//! [`crate::trust`]). The certificate must also be valid for the host name
//! or IP address its callers dial: with TLS on, URLs are `https://HOST:PORT`
//! and HOST is checked against the certificate's DNS or IP names.
//!
//! The flags ([`TlsFlags`]) are the same on every binary. Without
//! certificates and without `--insecure`, a binary refuses to start: there
//! is no silent fallback to plaintext. With `--insecure` it logs a warning;
//! every caller may then make every call.
//!
//! Certificates are read once at start. Reloading them on SIGHUP is not
//! done: tonic 0.14 builds its rustls configuration from
//! `ServerTlsConfig`/`ClientTlsConfig` once, when the server or the channel
//! is made, and offers no hook to swap it. To rotate, restart the node with
//! the new files (a participant or coordinator restart is safe: recovery
//! resumes what was in flight).

use crate::trust::{Caller, Role};
use crate::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest certificate, key or CA file read (a PEM chain of a few
/// certificates is a few KiB).
pub const PEM_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// What a process presents and trusts.
#[derive(Clone)]
pub struct Credentials {
    /// Its certificate chain, PEM, its own certificate first.
    pub cert_pem: Vec<u8>,
    /// The private key of its certificate, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
    /// The CA certificates its peers' certificates must chain to, PEM.
    pub ca_pem: Vec<u8>,
    /// Who its certificate says it is.
    pub caller: Caller,
}

impl Credentials {
    /// Checks that the certificate names a tandem identity and that the CA
    /// holds at least one certificate; rustls checks the rest (the key
    /// matches, the chain) when the server or channel is made.
    pub fn from_pem(cert_pem: Vec<u8>, key_pem: Vec<u8>, ca_pem: Vec<u8>) -> Result<Credentials, Error> {
        let first = first_certificate_der(&cert_pem)
            .ok_or_else(|| Error::InvalidInput("the certificate file holds no PEM CERTIFICATE".into()))?;
        let caller = Caller::from_certificate(&first)?;
        if first_certificate_der(&ca_pem).is_none() {
            return Err(Error::InvalidInput("the CA file holds no PEM CERTIFICATE".into()));
        }
        if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY-----") {
            return Err(Error::InvalidInput("the key file holds no PEM PRIVATE KEY".into()));
        }
        Ok(Credentials { cert_pem, key_pem, ca_pem, caller })
    }

    /// Reads the three PEM files.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Credentials, Error> {
        let read = |what: &str, path: &Path| -> Result<Vec<u8>, Error> {
            let bad = |why: String| Error::InvalidInput(format!("{what} {}: {why}", path.display()));
            let size = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?.len();
            if size > PEM_FILE_BYTES_MAX {
                return Err(bad(format!("{size} bytes; the most is {PEM_FILE_BYTES_MAX}")));
            }
            std::fs::read(path).map_err(|e| bad(e.to_string()))
        };
        let (cert_pem, key_pem, ca_pem) = (read("--tls-cert", cert)?, read("--tls-key", key)?, read("--tls-ca", ca)?);
        Credentials::from_pem(cert_pem, key_pem, ca_pem)
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", cert.display())))
    }
}

/// The DER bytes of the first `CERTIFICATE` block of a PEM text.
fn first_certificate_der(pem: &[u8]) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem).next()?.ok().map(|der| der.to_vec())
}

/// Mutual TLS, or plaintext.
#[derive(Clone)]
pub enum Security {
    /// Every link is TLS; both ends present a certificate of the CA.
    Mutual(Arc<Credentials>),
    /// Plaintext, no certificates: every caller may make every call.
    /// Development only.
    Insecure,
}

impl std::fmt::Debug for Security {
    /// Names the identity, never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Mutual(credentials) => write!(f, "Mutual({})", credentials.caller),
            Security::Insecure => f.write_str("Insecure"),
        }
    }
}

impl Security {
    pub fn mutual(credentials: Credentials) -> Security {
        Security::Mutual(Arc::new(credentials))
    }

    /// Who this process is, by its certificate (`None` when insecure).
    pub fn caller(&self) -> Option<&Caller> {
        match self {
            Security::Mutual(credentials) => Some(&credentials.caller),
            Security::Insecure => None,
        }
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Security::Mutual(_) => "https",
            Security::Insecure => "http",
        }
    }

    /// Checks that the certificate names this node as it was started
    /// (`--node-id`): a coordinator `c1` must hold `tandem://coordinator/c1`,
    /// or its participants would refuse it.
    pub fn check_node(&self, role: Role, node_id: &str) -> Result<(), Error> {
        let Some(caller) = self.caller() else { return Ok(()) };
        if caller.role != role || caller.name.as_str() != node_id {
            return Err(Error::InvalidInput(format!(
                "the certificate names {caller}, but this {role} is {node_id}: it needs {}",
                Caller::new(role, node_id)?.uri()
            )));
        }
        Ok(())
    }
}

/// The security flags of every tandem binary.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsFlags {
    /// This process's certificate (PEM; a chain may follow it). It names the
    /// process with a subject alternative name URI tandem://ROLE/NAME and is
    /// valid for the host names that callers dial.
    #[arg(long, value_name = "PEM", requires_all = ["tls_key", "tls_ca"], conflicts_with = "insecure")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_ca"], conflicts_with = "insecure")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate(s) that every peer's certificate must chain to
    /// (PEM).
    #[arg(long, value_name = "PEM", requires_all = ["tls_cert", "tls_key"], conflicts_with = "insecure")]
    pub tls_ca: Option<PathBuf>,
    /// Plaintext, without certificates: every caller may make every call,
    /// and URLs are http://. For development on a machine no one else can
    /// reach; never for real money.
    #[arg(long)]
    pub insecure: bool,
}

impl TlsFlags {
    /// The security these flags ask for. Without certificates and without
    /// --insecure, an error that says what to give.
    pub fn security(&self) -> Result<Security, Error> {
        if self.insecure {
            tracing::warn!(
                "--insecure: plaintext links, no certificates; every caller may make every call. Development only."
            );
            return Ok(Security::Insecure);
        }
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Security::mutual(Credentials::load(cert, key, ca)?)),
            _ => Err(Error::InvalidInput(
                "no certificate: give --tls-cert, --tls-key and --tls-ca (this process's certificate naming \
                 tandem://ROLE/NAME, its key, and the CA of the cluster), or --insecure for plaintext links \
                 that trust every caller (development only)"
                    .into(),
            )),
        }
    }
}
