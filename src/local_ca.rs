//! A throw-away certificate authority for a local cluster and the tests.
//!
//! [`crate::cluster::Cluster`] makes one per start, issues every node, the
//! bench's client and its operator a certificate, and writes them in the
//! cluster's data directory (`tls/`), so a local cluster runs over mutual
//! TLS with no set-up. The CA's key stays in memory and dies with the
//! cluster: the files can be used to call the cluster while it runs (see
//! `bench cluster up`), not to mint more identities.
//!
//! Every certificate is ECDSA P-256 and valid for `localhost` and
//! `127.0.0.1`, where the local cluster listens, and names its holder with
//! the SAN URI `tandem://ROLE/NAME`. A real deployment makes its
//! certificates with its own PKI the same way (see the README's "Security
//! model").

use crate::tls::{Credentials, Security};
use crate::trust::{Caller, Role};
use crate::Error;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};

/// The host names every certificate of a local cluster is valid for.
pub const LOCAL_HOSTS: [&str; 2] = ["localhost", "127.0.0.1"];

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Issued {
    pub caller: Caller,
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct LocalCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn rcgen_error(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::Fatal(format!("cannot make {what}: {e}"))
}

impl LocalCa {
    /// A new CA named `name` (its common name; tests make two to check that
    /// one's certificates are refused by the other's nodes).
    pub fn new(name: &str) -> Result<LocalCa, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error("the CA"))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(rcgen_error("the CA's key"))?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(rcgen_error("the CA"))?;
        Ok(LocalCa { issuer })
    }

    /// The CA's certificate, PEM: what every node and client trusts.
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `caller`, valid for [`LOCAL_HOSTS`], for both ends
    /// of a TLS link (a node serves and calls with the same one).
    pub fn issue(&self, caller: &Caller) -> Result<Issued, Error> {
        let what = caller.uri();
        let mut params = CertificateParams::new(LOCAL_HOSTS.iter().map(|h| h.to_string()).collect::<Vec<_>>())
            .map_err(rcgen_error(&what))?;
        params.distinguished_name.push(DnType::CommonName, caller.uri());
        params.subject_alt_names.push(SanType::URI(caller.uri().try_into().map_err(rcgen_error(&what))?));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(rcgen_error(&what))?;
        let certificate = params.signed_by(&key, &self.issuer).map_err(rcgen_error(&what))?;
        Ok(Issued { caller: caller.clone(), cert_pem: certificate.pem(), key_pem: key.serialize_pem() })
    }

    /// The security of a process holding a new certificate for `role`/`name`.
    pub fn security(&self, role: Role, name: &str) -> Result<Security, Error> {
        let issued = self.issue(&Caller::new(role, name)?)?;
        Ok(Security::mutual(Credentials::from_pem(
            issued.cert_pem.into_bytes(),
            issued.key_pem.into_bytes(),
            self.ca_pem().into_bytes(),
        )?))
    }

    /// Writes `ca.pem` in `dir`.
    pub fn write_ca(&self, dir: &Path) -> Result<PathBuf, Error> {
        let path = dir.join("ca.pem");
        write_file(&path, self.ca_pem().as_bytes(), false)?;
        Ok(path)
    }
}

/// The files of one issued certificate.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Issued {
    /// Writes `STEM.pem` and `STEM.key` (readable by this user only) in `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<IssuedFiles, Error> {
        let files = IssuedFiles { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) };
        write_file(&files.cert, self.cert_pem.as_bytes(), false)?;
        write_file(&files.key, self.key_pem.as_bytes(), true)?;
        Ok(files)
    }
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), Error> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = secret;
    let mut file = options.open(path).map_err(|e| Error::Fatal(format!("cannot write {}: {e}", path.display())))?;
    file.write_all(bytes).map_err(|e| Error::Fatal(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_name_their_holder() {
        let ca = LocalCa::new("test CA").unwrap();
        let issued = ca.issue(&Caller::new(Role::Participant, "p7").unwrap()).unwrap();
        let credentials =
            Credentials::from_pem(issued.cert_pem.into_bytes(), issued.key_pem.into_bytes(), ca.ca_pem().into_bytes())
                .unwrap();
        assert_eq!(credentials.caller.uri(), "tandem://participant/p7");
    }
}
