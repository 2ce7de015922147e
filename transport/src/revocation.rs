//! Certificates a node no longer accepts: revoked ones (by node id, client name or serial
//! number), and expired ones on connections that outlived them.
//!
//! A [`Revocations`] list is set on a running transport with
//! [`Transport::set_revocations`](crate::Transport::set_revocations): new handshakes
//! presenting a revoked certificate are refused, and live connections (members and clients)
//! presenting one are closed at once with [`codes::REVOKED`](crate::codes::REVOKED). A live
//! connection whose peer's certificate passes its `notAfter` is closed then with
//! [`codes::CERT_EXPIRED`](crate::codes::CERT_EXPIRED): TLS checks validity only at the
//! handshake, and cluster connections live for days.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::certs::{client_name_of, node_id_of, parse_node_name, CLIENT_NAME_PREFIX};

/// One entry of a revocation list, as written in a node's config: `node-3`, `client-ops` or
/// `serial:0a1b2c…` (the certificate's serial number in hex, as `openssl x509 -serial`
/// prints it; case and colons do not matter).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Revoked {
    /// Every certificate of this node id.
    Node(u32),
    /// Every certificate of this client name.
    Client(String),
    /// The certificate with this serial number (lowercase hex, no separators).
    Serial(String),
}

impl fmt::Display for Revoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node(id) => write!(f, "node-{id}"),
            Self::Client(name) => write!(f, "{CLIENT_NAME_PREFIX}{name}"),
            Self::Serial(hex) => write!(f, "serial:{hex}"),
        }
    }
}

/// A revocation entry that is none of `node-<id>`, `client-<name>`, `serial:<hex>`.
#[derive(Debug, thiserror::Error)]
#[error("revocation entry {0:?}: expected node-<id>, client-<name> or serial:<hex>")]
pub struct BadRevocation(pub String);

impl FromStr for Revoked {
    type Err = BadRevocation;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(id) = parse_node_name(s) {
            return Ok(Self::Node(id));
        }
        if let Some(name) = s.strip_prefix(CLIENT_NAME_PREFIX) {
            if crate::certs::valid_client_name(name) {
                return Ok(Self::Client(name.to_owned()));
            }
        }
        if let Some(hex) = s.strip_prefix("serial:") {
            let hex: String = hex.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
            let hex = hex.trim_start_matches('0');
            if !hex.is_empty() && hex.len() <= 40 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Ok(Self::Serial(hex.to_owned()));
            }
        }
        Err(BadRevocation(s.to_owned()))
    }
}

impl TryFrom<String> for Revoked {
    type Error = BadRevocation;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Revoked> for String {
    fn from(r: Revoked) -> Self {
        r.to_string()
    }
}

/// The certificates a node refuses (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revocations {
    entries: BTreeSet<Revoked>,
}

impl Revocations {
    /// The list of `entries`.
    pub fn new(entries: impl IntoIterator<Item = Revoked>) -> Self {
        Self { entries: entries.into_iter().collect() }
    }

    /// Parses entries as written in a config (`node-3`, `client-ops`, `serial:…`).
    pub fn parse<S: AsRef<str>>(entries: impl IntoIterator<Item = S>) -> Result<Self, BadRevocation> {
        Ok(Self::new(entries.into_iter().map(|e| e.as_ref().parse()).collect::<Result<Vec<_>, _>>()?))
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry that revokes every certificate of node `id`, if any (the in-memory
    /// transport has node ids but no certificates).
    pub(crate) fn revoking_node(&self, id: u32) -> Option<&Revoked> {
        self.entries.get(&Revoked::Node(id))
    }

    /// The entry that revokes the certificate `cert_der`, if any.
    pub fn revoking(&self, cert_der: &[u8]) -> Option<&Revoked> {
        if self.entries.is_empty() {
            return None;
        }
        let node = node_id_of(cert_der).map(Revoked::Node);
        let client = client_name_of(cert_der).map(Revoked::Client);
        let serial = serial_of(cert_der).map(Revoked::Serial);
        [node, client, serial].into_iter().flatten().find_map(|r| self.entries.get(&r))
    }
}

/// The serial number of a DER certificate in lowercase hex without leading zeros.
pub fn serial_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let hex: String = cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
    let hex = hex.trim_start_matches('0');
    Some(if hex.is_empty() { "0".to_owned() } else { hex.to_owned() })
}

/// When a DER certificate stops being valid.
pub fn not_after_of(cert_der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    let secs = u64::try_from(secs).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Longest single sleep while waiting for an expiry: the wall clock is read again after it,
/// so a clock that jumps forward closes the connection within this much.
const EXPIRY_RECHECK: Duration = Duration::from_secs(60);

/// Resolves once `not_after` has passed on the wall clock (never for `None`).
pub(crate) async fn expired(not_after: Option<SystemTime>) {
    let Some(not_after) = not_after else { return std::future::pending().await };
    loop {
        match not_after.duration_since(SystemTime::now()) {
            Ok(left) if !left.is_zero() => tokio::time::sleep(left.min(EXPIRY_RECHECK)).await,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::CertAuthority;

    #[test]
    fn entries_parse_and_print_back() {
        for (text, want) in [
            ("node-3", Revoked::Node(3)),
            ("client-ops", Revoked::Client("ops".into())),
            ("serial:0A:1b:2C", Revoked::Serial("a1b2c".into())),
        ] {
            let parsed: Revoked = text.parse().expect(text);
            assert_eq!(parsed, want);
            assert_eq!(parsed.to_string().parse::<Revoked>().expect("round trip"), want);
        }
        for bad in ["node-x", "client-", "serial:", "serial:xyz", "3", ""] {
            assert!(bad.parse::<Revoked>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_list_revokes_by_node_client_or_serial() {
        let ca = CertAuthority::new().expect("ca");
        let now = SystemTime::now();
        let later = now + Duration::from_secs(3600);
        let node3 = ca.issue_node_cert(3, now, later).expect("node");
        let node4 = ca.issue_node_cert(4, now, later).expect("node");
        let (client, _) = ca.issue_client_cert("ops", now, later).expect("client");
        let client = rustls::pki_types::CertificateDer::from_pem_slice(client.as_bytes()).expect("pem");
        use rustls::pki_types::pem::PemObject;

        let list = Revocations::parse(["node-3", "client-ops"]).expect("list");
        assert_eq!(list.revoking(&node3.cert_der), Some(&Revoked::Node(3)));
        assert_eq!(list.revoking(&node4.cert_der), None);
        assert_eq!(list.revoking(&client), Some(&Revoked::Client("ops".into())));

        let serial = serial_of(&node4.cert_der).expect("serial");
        let by_serial = Revocations::parse([format!("serial:{serial}")]).expect("list");
        assert_eq!(by_serial.revoking(&node4.cert_der), Some(&Revoked::Serial(serial)));
        assert_eq!(by_serial.revoking(&node3.cert_der), None, "serials differ");
        assert!(Revocations::default().revoking(&node3.cert_der).is_none());
    }

    #[test]
    fn not_after_is_read_from_the_certificate() {
        let ca = CertAuthority::new().expect("ca");
        let now = SystemTime::now();
        let until = now + Duration::from_secs(7200);
        let cert = ca.issue_node_cert(1, now, until).expect("node");
        let read = not_after_of(&cert.cert_der).expect("not after");
        let gap = until.duration_since(read).unwrap_or_else(|e| e.duration());
        assert!(gap <= Duration::from_secs(1), "{read:?} vs {until:?}");
    }
}
