//! Cluster certificates: one CA, one certificate per node, node ids carried in the certificates.
//!
//! Every node holds a certificate signed by the cluster CA whose subject alternative names
//! contain exactly one DNS name `node-<id>`. That name *is* the node's identity: the TLS layer
//! checks it against the CA, and [`node_id_of`] reads it back from the peer's certificate, so a
//! node cannot claim another node's id without that node's key.
//!
//! Files, all PEM, as [`generate`] writes them: one directory per node and one for the
//! client, each self-contained (its certificate, its key, the CA certificate), and the CA's
//! key apart from all of them, so a node's directory can be shipped to its machine alone.
//!
//! | file | content |
//! |---|---|
//! | `ca.pem` | the CA certificate (the trust root of every node and client) |
//! | `ca/ca.pem`, `ca/ca.key` | the CA certificate and private key (0600): only needed to issue more certificates; keep it off the nodes |
//! | `node-<i>/node.pem` | node `i`'s certificate, signed by the CA, naming `node-<i>` (and any extra names asked for) |
//! | `node-<i>/node.key` | node `i`'s private key (PKCS #8), mode 0600 |
//! | `node-<i>/ca.pem` | the CA certificate |
//! | `client/client.pem`, `client/client.key`, `client/ca.pem` | the client certificate (`client-admin`): may submit and query jobs, never a member |
//!
//! A node is started with either the whole directory (`--certs DIR`, it picks `node-<id>/`)
//! or its own (`--certs DIR/node-3`). Directories of the earlier flat layout
//! (`node-<i>.pem`, `node-<i>.key`, `client.pem`, `client.key` and `ca.key` beside `ca.pem`)
//! still load.
//!
//! A client certificate carries one DNS name `client-<name>` and no `node-<i>`: the client
//! API ([`ClientIdentity`], [`crate::client`]) takes it, membership never does.
//!
//! ```
//! use phalanx_transport::certs::{self, NodeIdentity};
//!
//! let dir = tempfile::tempdir()?;
//! certs::generate(dir.path(), 2)?;
//! let node1 = NodeIdentity::load(dir.path(), 1)?;
//! assert_eq!(node1.id, 1);
//! assert_eq!(certs::node_id_of(&node1.cert_chain[0]), Some(1));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

/// File name of the CA certificate inside a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside the CA directory ([`CA_DIR`]).
pub const CA_KEY_FILE: &str = "ca.key";

/// The directory, inside a certificate directory, holding the CA's certificate and key.
pub const CA_DIR: &str = "ca";

/// The directory, inside a certificate directory, holding the client's files.
pub const CLIENT_DIR: &str = "client";

/// File name of a node's certificate inside its directory (`node-<i>/node.pem`).
pub const NODE_CERT_FILE: &str = "node.pem";
/// File name of a node's private key inside its directory (`node-<i>/node.key`).
pub const NODE_KEY_FILE: &str = "node.key";

/// Prefix of the DNS name that carries a node id: node 3 is `node-3`.
pub const NODE_NAME_PREFIX: &str = "node-";

/// Prefix of the DNS name that carries a client's name: client `admin` is `client-admin`.
pub const CLIENT_NAME_PREFIX: &str = "client-";

/// The name [`generate`] gives its client certificate.
pub const DEFAULT_CLIENT_NAME: &str = "admin";

/// File name of the client certificate inside a certificate directory.
pub const CLIENT_CERT_FILE: &str = "client.pem";
/// File name of the client's private key inside a certificate directory.
pub const CLIENT_KEY_FILE: &str = "client.key";

/// Longest client name (after the prefix).
pub const MAX_CLIENT_NAME_BYTES: usize = 64;

/// How far back [`generate`] dates `not_before`, so clocks a little behind still accept it.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60 * 60);

/// How long the node certificates from [`generate`] stay valid.
pub const NODE_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How long the CA certificate from [`CertAuthority::new`] stays valid.
pub const CA_CERT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// File permissions of private keys: readable and writable by the owner only.
#[cfg(unix)]
const PRIVATE_KEY_MODE: u32 = 0o600;

/// Why certificates could not be generated, written or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file or directory could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was attempted: "read", "write", "create directory".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file is not valid PEM, or holds no item of the expected kind.
    #[error("{path} holds no valid {expected}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the file should hold: "certificate", "private key".
        expected: &'static str,
        /// The PEM parser's error.
        source: pem::Error,
    },
    /// A node certificate does not name the node it was loaded for.
    #[error("{path} is not a certificate of node {expected} (it names {found:?})")]
    WrongNodeId {
        /// The certificate file.
        path: PathBuf,
        /// The node id asked for.
        expected: u32,
        /// The node id in the certificate, `None` if it carries no single `node-<i>` name.
        found: Option<u32>,
    },
    /// The CA files do not form a usable CA (certificate and key that rcgen cannot use).
    #[error("cannot use the CA in {path}: {source}")]
    BadCa {
        /// The CA certificate or key file.
        path: PathBuf,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A validity bound is not representable in a certificate.
    #[error("validity bound {at:?} is out of range for a certificate")]
    Validity {
        /// The bound.
        at: SystemTime,
    },
    /// A client certificate does not carry exactly one `client-<name>` (or also names a node).
    #[error("{path} is not a client certificate (it must name one client-<name> and no node)")]
    NotAClient {
        /// The certificate file.
        path: PathBuf,
    },
    /// A client name that is empty, too long, or has characters other than `A-Za-z0-9_-`.
    #[error("invalid client name {name:?}: 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'")]
    BadClientName {
        /// The name asked for.
        name: String,
    },
    /// rcgen could not build or sign a certificate.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The DNS name carrying node `id`'s identity: `node-<id>`.
///
/// ```
/// assert_eq!(phalanx_transport::certs::node_name(3), "node-3");
/// ```
pub fn node_name(id: u32) -> String {
    format!("{NODE_NAME_PREFIX}{id}")
}

/// Parses a DNS name of the form `node-<id>`; only the canonical spelling (no sign, no
/// leading zeros) counts, so no two names map to the same id.
///
/// ```
/// use phalanx_transport::certs::parse_node_name;
///
/// assert_eq!(parse_node_name("node-12"), Some(12));
/// assert_eq!(parse_node_name("node-012"), None);
/// assert_eq!(parse_node_name("localhost"), None);
/// ```
pub fn parse_node_name(name: &str) -> Option<u32> {
    let id: u32 = name.strip_prefix(NODE_NAME_PREFIX)?.parse().ok()?;
    (node_name(id) == name).then_some(id)
}

/// The node id named by a certificate (DER): its single `node-<i>` DNS subject alternative
/// name.
///
/// `None` if the bytes are not a certificate, or it names no node, or it names several
/// different nodes (such a certificate could pose as either, so it identifies none). This
/// only reads the name: whether the certificate is genuine is the TLS layer's check.
pub fn node_id_of(cert_der: &[u8]) -> Option<u32> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|name| match name {
        GeneralName::DNSName(dns) => parse_node_name(dns),
        _ => None,
    });
    let first = ids.next()?;
    ids.all(|id| id == first).then_some(first)
}

/// Whether `name` is a valid client name: 1 to [`MAX_CLIENT_NAME_BYTES`] of `A-Za-z0-9_-`.
pub fn valid_client_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CLIENT_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The client name in a DER certificate: its one `client-<name>` DNS name, if it carries
/// exactly one and names no node. A certificate naming a node is never a client's.
///
/// ```
/// use phalanx_transport::certs::{client_name_of, CertAuthority};
/// use std::time::{Duration, SystemTime};
///
/// let ca = CertAuthority::new()?;
/// let now = SystemTime::now();
/// let (cert, _key) = ca.issue_client_cert("ops", now, now + Duration::from_secs(60))?;
/// let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes())?;
/// assert_eq!(client_name_of(&der).as_deref(), Some("ops"));
/// # use rustls::pki_types::pem::PemObject;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn client_name_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut clients = Vec::new();
    for name in &san.value.general_names {
        if let GeneralName::DNSName(dns) = name {
            if parse_node_name(dns).is_some() {
                return None;
            }
            if let Some(client) = dns.strip_prefix(CLIENT_NAME_PREFIX) {
                clients.push(client);
            }
        }
    }
    match clients.as_slice() {
        [one] if valid_client_name(one) => Some((*one).to_owned()),
        _ => None,
    }
}

/// A node certificate and its private key, as issued by a [`CertAuthority`].
pub struct IssuedCert {
    /// The node id the certificate names.
    pub id: u32,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    key_pem: String,
    key_der: PrivatePkcs8KeyDer<'static>,
}

// Not derived: the private key must not end up in a log line.
impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert").field("id", &self.id).finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// The private key, PEM (PKCS #8).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The private key, DER.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone_key())
    }

    /// Writes the node's directory `dir/node-<id>/`: `node.pem`, `node.key` (mode 0600) and
    /// the CA certificate `ca_pem` as `ca.pem`.
    pub fn write(&self, dir: &Path, ca_pem: &str) -> Result<(), CertError> {
        let own = dir.join(node_name(self.id));
        create_dir(&own)?;
        write_file(&own.join(NODE_CERT_FILE), self.cert_pem.as_bytes(), false)?;
        write_file(&own.join(NODE_KEY_FILE), self.key_pem.as_bytes(), true)?;
        write_file(&own.join(CA_CERT_FILE), ca_pem.as_bytes(), false)
    }

    /// This certificate as a node identity that trusts `ca_roots`.
    ///
    /// Tests use it to build misbehaving nodes: a certificate from a foreign CA presented
    /// to a cluster, or an expired one.
    pub fn identity(&self, ca_roots: Vec<CertificateDer<'static>>) -> NodeIdentity {
        NodeIdentity { id: self.id, cert_chain: vec![self.cert_der.clone()], key: self.key_der(), ca_roots }
    }
}

/// A certificate authority that issues node certificates.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

// Not derived: the CA key must not end up in a log line.
impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority").finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// A new CA with a fresh ECDSA P-256 key, valid from an hour ago for ten years.
    pub fn new() -> Result<Self, CertError> {
        let now = SystemTime::now();
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Phalanx cluster CA");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = certificate_time(now - CLOCK_SKEW_ALLOWANCE)?;
        params.not_after = certificate_time(now + CA_CERT_VALIDITY)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert_pem: cert.pem(), cert_der: cert.der().clone(), issuer: Issuer::new(params, key) })
    }

    /// Loads the CA from `dir/ca.pem` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        // The CA directory itself, a certificate directory holding it, or the flat layout.
        let dir = if dir.join(CA_KEY_FILE).is_file() { dir.to_path_buf() } else { dir.join(CA_DIR) };
        let dir = dir.as_path();
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_to_string(&cert_path)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|source| CertError::Pem {
            path: cert_path.clone(),
            expected: "certificate",
            source,
        })?;
        let key = KeyPair::from_pem(&read_to_string(&key_path)?)
            .map_err(|source| CertError::BadCa { path: key_path.clone(), source })?;
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|source| CertError::BadCa { path: cert_path, source })?;
        Ok(Self { issuer, cert_pem, cert_der })
    }

    /// Writes `dir/ca.pem` and `dir/ca.key` (mode 0600), creating `dir` if needed.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        let ca = dir.join(CA_DIR);
        create_dir(&ca)?;
        write_file(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), false)?;
        write_file(&ca.join(CA_CERT_FILE), self.cert_pem.as_bytes(), false)?;
        write_file(&ca.join(CA_KEY_FILE), self.issuer.key().serialize_pem().as_bytes(), true)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER: the trust root to put in [`NodeIdentity::ca_roots`].
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues a certificate for node `id` with a fresh key, valid from `not_before` to
    /// `not_after`.
    ///
    /// Its subject alternative names are `node-<id>`, `localhost` and `127.0.0.1`; it may
    /// authenticate both as a client and as a server. Any validity window is accepted, so
    /// tests can issue certificates that are already expired.
    pub fn issue_node_cert(
        &self,
        id: u32,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CertError> {
        self.issue_node_cert_named(id, &[], not_before, not_after)
    }

    /// [`issue_node_cert`](Self::issue_node_cert) with extra names besides `node-<id>`
    /// (host names or IP addresses, for tools that check them; nodes only check `node-<id>`).
    pub fn issue_node_cert_named(
        &self,
        id: u32,
        extra_names: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CertError> {
        let name = node_name(id);
        let names: Vec<String> = std::iter::once(name.clone()).chain(extra_names.iter().cloned()).collect();
        let mut params = CertificateParams::new(names)?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, name);
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = certificate_time(not_before)?;
        params.not_after = certificate_time(not_after)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            id,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }
    /// Issues a client certificate for `name` (DNS name `client-<name>`, client
    /// authentication only), valid from `not_before` to `not_after`. Returns the certificate
    /// and its private key, both PEM.
    pub fn issue_client_cert(
        &self,
        name: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, String), CertError> {
        if !valid_client_name(name) {
            return Err(CertError::BadClientName { name: name.to_owned() });
        }
        let dns = format!("{CLIENT_NAME_PREFIX}{name}");
        let mut params = CertificateParams::new(vec![dns.clone()])?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, dns);
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = certificate_time(not_before)?;
        params.not_after = certificate_time(not_after)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues a client certificate for `name` valid for [`NODE_CERT_VALIDITY`] and writes the
    /// client's directory `dir/client/`: `client.pem`, `client.key` (0600), `ca.pem`.
    pub fn write_client_cert(&self, dir: &Path, name: &str) -> Result<(), CertError> {
        let now = SystemTime::now();
        let (cert, key) = self.issue_client_cert(name, now - CLOCK_SKEW_ALLOWANCE, now + NODE_CERT_VALIDITY)?;
        let own = dir.join(CLIENT_DIR);
        create_dir(&own)?;
        write_file(&own.join(CLIENT_CERT_FILE), cert.as_bytes(), false)?;
        write_file(&own.join(CLIENT_KEY_FILE), key.as_bytes(), true)?;
        write_file(&own.join(CA_CERT_FILE), self.cert_pem.as_bytes(), false)
    }
}

/// Writes a fresh CA and certificates for nodes `0..nodes` into `dir` (created if missing):
/// `ca.pem`, `ca.key`, `node-<i>.pem`, `node-<i>.key`, and the client certificate
/// `client.pem`/`client.key` (client [`DEFAULT_CLIENT_NAME`]). Existing files are overwritten.
///
/// Node certificates are valid from an hour ago ([`CLOCK_SKEW_ALLOWANCE`]) to a year ahead
/// ([`NODE_CERT_VALIDITY`]).
pub fn generate(dir: &Path, nodes: u32) -> Result<(), CertError> {
    generate_named(dir, nodes, &std::collections::BTreeMap::new())
}

/// [`generate`] with extra names (host names, IP addresses) for some nodes' certificates.
pub fn generate_named(
    dir: &Path,
    nodes: u32,
    extra_names: &std::collections::BTreeMap<u32, Vec<String>>,
) -> Result<(), CertError> {
    let ca = CertAuthority::new()?;
    ca.write(dir)?;
    let now = SystemTime::now();
    for id in 0..nodes {
        let extra = extra_names.get(&id).map(Vec::as_slice).unwrap_or_default();
        ca.issue_node_cert_named(id, extra, now - CLOCK_SKEW_ALLOWANCE, now + NODE_CERT_VALIDITY)?
            .write(dir, ca.cert_pem())?;
    }
    ca.write_client_cert(dir, DEFAULT_CLIENT_NAME)
}

/// Where node `id`'s files are under `dir`: its own directory `dir/node-<id>/`, `dir` itself
/// if it is a node directory, or the flat layout (`dir/node-<id>.pem`).
fn node_files(dir: &Path, id: u32) -> (PathBuf, PathBuf, PathBuf) {
    let own = dir.join(node_name(id));
    if own.join(NODE_CERT_FILE).is_file() {
        return (own.join(NODE_CERT_FILE), own.join(NODE_KEY_FILE), own.join(CA_CERT_FILE));
    }
    if dir.join(NODE_CERT_FILE).is_file() {
        return (dir.join(NODE_CERT_FILE), dir.join(NODE_KEY_FILE), dir.join(CA_CERT_FILE));
    }
    let name = node_name(id);
    (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")), dir.join(CA_CERT_FILE))
}

/// Where the client's files are under `dir`: `dir/client/`, else `dir` itself.
fn client_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let own = dir.join(CLIENT_DIR);
    let dir = if own.join(CLIENT_CERT_FILE).is_file() { own } else { dir.to_path_buf() };
    (dir.join(CLIENT_CERT_FILE), dir.join(CLIENT_KEY_FILE), dir.join(CA_CERT_FILE))
}

/// What a client of the cluster (`phalanx submit`, `jobs`, `cancel`, `status`) presents: a
/// client certificate (`client-<name>`), its key, and the cluster CA it trusts.
pub struct ClientIdentity {
    /// The client's name, from its certificate.
    pub name: String,
    /// The client certificate first, then any intermediates.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The client's private key.
    pub key: PrivateKeyDer<'static>,
    /// The CA certificates the client trusts the nodes by.
    pub ca_roots: Vec<CertificateDer<'static>>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            ca_roots: self.ca_roots.clone(),
        }
    }
}

// Not derived: the private key must not end up in a log line.
impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity").field("name", &self.name).finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// Loads `client.pem`, `client.key` and `ca.pem` from `dir/client/` (or from `dir` itself),
    /// checking that the certificate is a client's.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let (cert_path, key_path, ca_path) = client_files(dir);
        let cert = read(&cert_path)?;
        let (key, ca) = (read(&key_path)?, read(&ca_path)?);
        Self::parse((&cert_path, &cert), (&key_path, &key), (&ca_path, &ca))
    }

    /// The same from PEM bytes in memory.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<Self, CertError> {
        let (cert, key, ca) = (Path::new("<memory: cert>"), Path::new("<memory: key>"), Path::new("<memory: ca>"));
        Self::parse((cert, cert_pem), (key, key_pem), (ca, ca_pem))
    }

    fn parse(cert: (&Path, &[u8]), key: (&Path, &[u8]), ca: (&Path, &[u8])) -> Result<Self, CertError> {
        let cert_chain = parse_certs(cert.0, cert.1)?;
        let name = cert_chain
            .first()
            .and_then(|c| client_name_of(c))
            .ok_or_else(|| CertError::NotAClient { path: cert.0.to_owned() })?;
        let (key, ca_roots) = parse_key_and_roots(key, ca)?;
        Ok(Self { name, cert_chain, key, ca_roots })
    }
}

/// Everything a node needs to take part in mutual TLS: its id, its certificate chain and key,
/// and the cluster CA it trusts.
pub struct NodeIdentity {
    /// The node id, as named by the certificate (`node-<id>`).
    pub id: u32,
    /// The node's certificate first, then any intermediates.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The node's private key.
    pub key: PrivateKeyDer<'static>,
    /// The CA certificates this node trusts; peers must present a certificate they signed.
    pub ca_roots: Vec<CertificateDer<'static>>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            ca_roots: self.ca_roots.clone(),
        }
    }
}

// Not derived: the private key must not end up in a log line.
impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("id", &self.id)
            .field("cert_chain", &self.cert_chain.len())
            .field("ca_roots", &self.ca_roots.len())
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// Loads node `id` from its directory: `dir/node-<id>/` (`node.pem`, `node.key`,
    /// `ca.pem`), or `dir` itself when it is that directory, or the flat layout
    /// (`dir/node-<id>.pem`, `dir/node-<id>.key`, `dir/ca.pem`).
    ///
    /// Fails naming the file if one is missing or unparseable, or if the certificate does not
    /// name node `id`. Whether the certificate is signed by the CA and still valid is checked
    /// by the peers during the handshake, not here.
    pub fn load(dir: &Path, id: u32) -> Result<Self, CertError> {
        let (cert_path, key_path, ca_path) = node_files(dir, id);
        let cert = read(&cert_path)?;
        // The certificate first: a wrong one is named before a missing key is.
        let found = parse_certs(&cert_path, &cert)?.first().and_then(|c| node_id_of(c));
        if found != Some(id) {
            return Err(CertError::WrongNodeId { path: cert_path, expected: id, found });
        }
        let (key, ca) = (read(&key_path)?, read(&ca_path)?);
        Self::parse(id, (&cert_path, &cert), (&key_path, &key), (&ca_path, &ca))
    }

    /// Node `id` from PEM bytes in memory (its certificate chain, its key, the CA
    /// certificates it trusts), e.g. from a secret store. Errors name the part as
    /// `<memory: cert>`, `<memory: key>` or `<memory: ca>`.
    pub fn from_pem(id: u32, cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<Self, CertError> {
        let (cert, key, ca) = (Path::new("<memory: cert>"), Path::new("<memory: key>"), Path::new("<memory: ca>"));
        Self::parse(id, (cert, cert_pem), (key, key_pem), (ca, ca_pem))
    }

    fn parse(id: u32, cert: (&Path, &[u8]), key: (&Path, &[u8]), ca: (&Path, &[u8])) -> Result<Self, CertError> {
        let cert_chain = parse_certs(cert.0, cert.1)?;
        let found = cert_chain.first().and_then(|c| node_id_of(c));
        if found != Some(id) {
            return Err(CertError::WrongNodeId { path: cert.0.to_owned(), expected: id, found });
        }
        let (key, ca_roots) = parse_key_and_roots(key, ca)?;
        Ok(Self { id, cert_chain, key, ca_roots })
    }
}

/// A private key and the CA certificates to trust, each `(where it came from, PEM)`.
#[allow(clippy::type_complexity)]
fn parse_key_and_roots(
    key: (&Path, &[u8]),
    ca: (&Path, &[u8]),
) -> Result<(PrivateKeyDer<'static>, Vec<CertificateDer<'static>>), CertError> {
    let parsed = PrivateKeyDer::from_pem_slice(key.1).map_err(|source| CertError::Pem {
        path: key.0.to_owned(),
        expected: "private key",
        source,
    })?;
    Ok((parsed, parse_certs(ca.0, ca.1)?))
}

/// `at` as a certificate time; `OffsetDateTime::from` would panic out of range.
fn certificate_time(at: SystemTime) -> Result<OffsetDateTime, CertError> {
    let out_of_range = || CertError::Validity { at };
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => OffsetDateTime::UNIX_EPOCH.checked_add(after.try_into().map_err(|_| out_of_range())?),
        Err(before) => {
            OffsetDateTime::UNIX_EPOCH.checked_sub(before.duration().try_into().map_err(|_| out_of_range())?)
        }
    }
    .ok_or_else(out_of_range)
}

/// All certificates of PEM `bytes` (from `path`); at least one.
fn parse_certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem_error = |source| CertError::Pem { path: path.to_owned(), expected: "certificate", source };
    let certs = CertificateDer::pem_slice_iter(bytes).collect::<Result<Vec<_>, _>>().map_err(pem_error)?;
    if certs.is_empty() {
        return Err(pem_error(pem::Error::NoItemsFound));
    }
    Ok(certs)
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Io { action: "read", path: path.to_owned(), source })
}

fn read_to_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io { action: "read", path: path.to_owned(), source })
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io { action: "create directory", path: dir.to_owned(), source })
}

/// Writes `bytes` to `path`; a secret is created with mode 0600 and narrowed to 0600 if the
/// file already existed with wider permissions.
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CertError> {
    let io_error = |source| CertError::Io { action: "write", path: path.to_owned(), source };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(PRIVATE_KEY_MODE);
        // `mode` only applies to a file that does not exist yet.
        if path.exists() {
            fs::set_permissions(path, fs::Permissions::from_mode(PRIVATE_KEY_MODE)).map_err(io_error)?;
        }
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(io_error)?;
    file.write_all(bytes).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_name_their_node_and_load_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        generate(dir.path(), 3).expect("generate");
        for id in 0..3 {
            let identity = NodeIdentity::load(dir.path(), id).expect("load");
            assert_eq!(identity.id, id);
            assert_eq!(node_id_of(&identity.cert_chain[0]), Some(id));
            assert_eq!(identity.ca_roots.len(), 1);
        }
        assert!(CertAuthority::load(dir.path()).is_ok());
        let client = ClientIdentity::load(dir.path()).expect("client");
        assert_eq!(client.name, DEFAULT_CLIENT_NAME);
        assert_eq!(node_id_of(&client.cert_chain[0]), None, "a client certificate names no node");
    }

    #[test]
    fn client_names_are_checked() {
        let ca = CertAuthority::new().expect("ca");
        let now = SystemTime::now();
        for bad in ["", "a b", "x/y", &"n".repeat(65)] {
            let err = ca.issue_client_cert(bad, now, now + Duration::from_secs(60)).unwrap_err();
            assert!(matches!(err, CertError::BadClientName { .. }), "{bad:?}: {err}");
        }
        // A node certificate is no client's, nor is one naming a node and a client.
        let node = ca.issue_node_cert(1, now, now + Duration::from_secs(60)).expect("issue");
        assert_eq!(client_name_of(&node.cert_der), None);
        let params = CertificateParams::new(vec!["client-x".to_string(), "node-2".to_string()]).expect("params");
        let key = KeyPair::generate().expect("key");
        let both = params.self_signed(&key).expect("sign");
        assert_eq!(client_name_of(both.der()), None);
        let dir = tempfile::tempdir().expect("temp dir");
        generate(dir.path(), 1).expect("generate");
        fs::copy(dir.path().join("node-0/node.pem"), dir.path().join("client/client.pem")).expect("copy");
        let err = ClientIdentity::load(dir.path()).unwrap_err();
        assert!(matches!(err, CertError::NotAClient { .. }) && err.to_string().contains("client.pem"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        generate(dir.path(), 1).expect("generate");
        for file in ["ca/ca.key", "node-0/node.key", "client/client.key"] {
            let mode = fs::metadata(dir.path().join(file)).expect("key exists").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }

    #[test]
    fn load_names_the_missing_or_broken_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        generate(dir.path(), 1).expect("generate");
        let err = NodeIdentity::load(dir.path(), 4).unwrap_err();
        assert!(err.to_string().contains("node-4.pem"), "{err}");

        fs::write(dir.path().join("node-0/node.key"), "not pem").expect("write");
        let err = NodeIdentity::load(dir.path(), 0).unwrap_err();
        assert!(matches!(err, CertError::Pem { .. }) && err.to_string().contains("node-0/node.key"), "{err}");

        fs::create_dir(dir.path().join("node-9")).expect("mkdir");
        fs::copy(dir.path().join("node-0/node.pem"), dir.path().join("node-9/node.pem")).expect("copy");
        let err = NodeIdentity::load(dir.path(), 9).unwrap_err();
        assert!(matches!(err, CertError::WrongNodeId { expected: 9, found: Some(0), .. }), "{err}");
    }

    #[test]
    fn each_node_gets_a_directory_of_its_own_without_the_ca_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let extra =
            std::collections::BTreeMap::from([(1, vec!["gpu-box-1.example".to_string(), "10.0.0.7".to_string()])]);
        generate_named(dir.path(), 2, &extra).expect("generate");
        for id in 0..2 {
            let own = dir.path().join(node_name(id));
            let mut files: Vec<String> = fs::read_dir(&own)
                .expect("node dir")
                .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
                .collect();
            files.sort();
            assert_eq!(files, ["ca.pem", "node.key", "node.pem"], "node {id} holds only its own files");
            // Started with its own directory or the whole one, a node loads the same identity.
            let alone = NodeIdentity::load(&own, id).expect("load from its own directory");
            let whole = NodeIdentity::load(dir.path(), id).expect("load from the whole directory");
            assert_eq!(alone.cert_chain, whole.cert_chain);
            // It names only what was asked: node-<id>, plus node 1's extra names.
            let (_, cert) = x509_parser::parse_x509_certificate(&alone.cert_chain[0]).expect("x509");
            let names: Vec<String> = cert
                .subject_alternative_name()
                .expect("san")
                .expect("san present")
                .value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::DNSName(d) => d.to_string(),
                    GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                    other => format!("{other:?}"),
                })
                .collect();
            let want: Vec<String> = if id == 1 {
                vec!["node-1".into(), "gpu-box-1.example".into(), "ip:[10, 0, 0, 7]".into()]
            } else {
                vec!["node-0".into()]
            };
            assert_eq!(names, want);
        }
        assert!(dir.path().join("ca/ca.key").is_file() && !dir.path().join("ca.key").exists());
        assert!(CertAuthority::load(dir.path()).is_ok() && CertAuthority::load(&dir.path().join("ca")).is_ok());
        assert_eq!(ClientIdentity::load(&dir.path().join("client")).expect("client dir").name, DEFAULT_CLIENT_NAME);
    }

    #[test]
    fn the_flat_layout_of_earlier_versions_still_loads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = CertAuthority::new().expect("ca");
        let now = SystemTime::now();
        let cert = ca.issue_node_cert(2, now - CLOCK_SKEW_ALLOWANCE, now + Duration::from_secs(60)).expect("issue");
        write_file(&dir.path().join("node-2.pem"), cert.cert_pem.as_bytes(), false).expect("write");
        write_file(&dir.path().join("node-2.key"), cert.key_pem().as_bytes(), true).expect("write");
        write_file(&dir.path().join(CA_CERT_FILE), ca.cert_pem().as_bytes(), false).expect("write");
        write_file(&dir.path().join(CA_KEY_FILE), ca.issuer.key().serialize_pem().as_bytes(), true).expect("write");
        assert_eq!(NodeIdentity::load(dir.path(), 2).expect("flat node files").id, 2);
        assert!(CertAuthority::load(dir.path()).is_ok(), "ca.key beside ca.pem");
    }

    #[test]
    fn node_id_comes_from_the_single_node_name() {
        let ca = CertAuthority::new().expect("ca");
        let now = SystemTime::now();
        let cert = ca.issue_node_cert(41, now, now + Duration::from_secs(60)).expect("issue");
        assert_eq!(node_id_of(&cert.cert_der), Some(41));
        assert_eq!(node_id_of(b"not a certificate"), None);

        // A certificate naming two nodes identifies neither.
        let params = CertificateParams::new(vec!["node-1".to_string(), "node-2".to_string()]).expect("params");
        let key = KeyPair::generate().expect("key");
        let twin = params.self_signed(&key).expect("sign");
        assert_eq!(node_id_of(twin.der()), None);
    }
}
