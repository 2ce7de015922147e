//! Mutual TLS between nodes: rustls 0.23 with the `aws-lc-rs` provider, TLS 1.3 only,
//! AES-128-GCM preferred ([`provider`]), ALPN [`ALPN`] on both sides, and the cluster CA as
//! the only trust root.
//!
//! * The **server** side requires a client certificate signed by the cluster CA
//!   ([`WebPkiClientVerifier`]); a client without one, with one from another CA, or with an
//!   expired one fails the handshake.
//! * The **client** side verifies the server's certificate against the CA and the name
//!   `node-<j>` of the node it meant to reach. When it dials an address without knowing the
//!   id ([`ANY_NODE_SERVER_NAME`]), it still requires a CA-signed certificate naming exactly
//!   one node, and takes the id from it.
//! * A peer that offers another ALPN fails the handshake on both sides.
//! * No session resumption and no 0-RTT: every connection is a full handshake with both
//!   certificates checked.
//!
//! Nothing here depends on a process-wide default crypto provider: every config is built
//! with [`provider()`] explicitly, so whatever another crate installs as the default changes
//! nothing.

use std::sync::Arc;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::certs::{node_id_of, node_name, ClientIdentity, NodeIdentity};
use crate::codec::ALPN;

/// QUIC ALPN protocol id of client connections (`phalanx submit`, `jobs`, `cancel`,
/// `status`): a node offers it beside [`ALPN`] and serves the client API on it, and only to
/// client certificates (`client-<name>`).
pub const CLIENT_ALPN: &[u8] = b"phalanx-client/1";

/// Server name a client asks for when it dials an address without knowing which node is
/// there. The `.invalid` top-level domain (RFC 2606) guarantees no certificate legitimately
/// carries it; the verifier replaces it with the `node-<i>` name found in the certificate.
pub const ANY_NODE_SERVER_NAME: &str = "any-node.phalanx.invalid";

/// Why a TLS configuration could not be built from a [`NodeIdentity`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A CA certificate could not be added to the trust store.
    #[error("node {node}: cannot trust CA certificate: {source}")]
    BadCaRoot {
        /// The local node.
        node: u32,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The identity has no CA certificate to trust, so no peer could ever be verified.
    #[error("node {node}: the identity has no CA certificate")]
    NoCaRoots {
        /// The local node.
        node: u32,
    },
    /// The certificate verifier could not be built from the CA certificates.
    #[error("node {node}: cannot build the certificate verifier: {source}")]
    Verifier {
        /// The local node.
        node: u32,
        /// rustls's reason.
        source: rustls::server::VerifierBuilderError,
    },
    /// The node's certificate chain or key was refused (for example a key that does not
    /// match the certificate).
    #[error("node {node}: bad certificate or key: {source}")]
    BadIdentity {
        /// The local node.
        node: u32,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// A client identity could not be used (no CA, a bad CA certificate, a key that does
    /// not match its certificate).
    #[error("client {client}: {reason}")]
    Client {
        /// The client's name.
        client: String,
        /// What was wrong.
        reason: String,
    },
    /// The configuration offers no cipher suite QUIC can use.
    #[error("no cipher suite usable by QUIC: {0}")]
    Quic(#[from] NoInitialCipherSuite),
}

/// The crypto provider of every Phalanx TLS config: rustls's `aws-lc-rs` provider, with
/// `TLS13_AES_128_GCM_SHA256` first among its cipher suites.
///
/// rustls lists AES-256-GCM first, and a rustls server follows the client's order, so two
/// nodes would otherwise encrypt every tensor with 14 AES rounds per block instead of 10.
/// AES-128-GCM is the suite every TLS 1.3 and QUIC implementation must offer (RFC 8446
/// §9.1, RFC 9001 §5.3) and what QUIC's own initial packets use. On a cluster's data path
/// sealing and opening is the largest single cost after the model's maths (at 1.2 M parameters
/// on three nodes, a fifth of all CPU time with AES-256). AES-256-GCM and ChaCha20-Poly1305
/// stay offered after it.
///
/// `aws-lc-rs` rather than `ring` (both are in the build: zookeeper-client brings the first):
/// aws-lc's AES-GCM uses 512-bit VAES where the CPU has it, ring's 256-bit. Measured on this
/// project's 2-core machine (AMD EPYC with AVX-512 VAES), AES-128-GCM sealing 25.4 against
/// 12.5 GB/s on 65,000-byte packets (loopback's path MTU), 22.2 against 11.4 on 9,000-byte
/// (jumbo frames), 9.9 against 7.4 on 1,452-byte (Ethernet); opening 23.4 against 11.4, 18.7
/// against 10.8 and 8.5 against 7.7. The bytes on the wire are the same: any peer's AES-GCM
/// reads them.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let first = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    provider.cipher_suites.retain(|suite| suite.suite() != first.suite());
    provider.cipher_suites.insert(0, first);
    Arc::new(provider)
}

/// Installs the `ring` provider as the process default if no default is installed yet.
///
/// Phalanx's own configs never need it; it is for other rustls users in the same process
/// that call `builder()` without a provider and would panic if two providers were compiled
/// in. Calling it again, or after someone else installed a default, does nothing.
pub fn install_default_provider() {
    if CryptoProvider::get_default().is_none() {
        // Losing a race against another installer is fine: some default is then installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The rustls server config of a node: TLS 1.3 only, ALPN `phalanx/8`, and a client
/// certificate signed by the cluster CA required.
pub fn server_config(identity: &NodeIdentity) -> Result<rustls::ServerConfig, TlsError> {
    let node = identity.id;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(identity)?, provider.clone())
        .build()
        .map_err(|source| TlsError::Verifier { node, source })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::BadIdentity { node, source })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|source| TlsError::BadIdentity { node, source })?;
    config.alpn_protocols = vec![ALPN.to_vec(), CLIENT_ALPN.to_vec()];
    // No resumption: every connection presents and verifies certificates afresh, so a
    // certificate that expired since an earlier session is refused. Nodes connect rarely;
    // a full handshake costs about a millisecond.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The rustls client config of a node: TLS 1.3 only, ALPN `phalanx/8`, the node's certificate
/// as client certificate, and the server verified against the cluster CA and the requested
/// `node-<j>` name (see [`ANY_NODE_SERVER_NAME`]).
pub fn client_config(identity: &NodeIdentity) -> Result<rustls::ClientConfig, TlsError> {
    let node = identity.id;
    let provider = provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(roots(identity)?, provider.clone())
        .build()
        .map_err(|source| TlsError::Verifier { node, source })?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::BadIdentity { node, source })?
        // "dangerous" only because it is custom: NodeServerVerifier delegates every check
        // to WebPkiServerVerifier and merely picks the name to check.
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeServerVerifier { webpki }))
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|source| TlsError::BadIdentity { node, source })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// [`server_config`] wrapped for quinn.
pub fn quic_server_config(identity: &NodeIdentity) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = QuicServerConfig::try_from(server_config(identity)?)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// [`client_config`] wrapped for quinn.
pub fn quic_client_config(identity: &NodeIdentity) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = QuicClientConfig::try_from(client_config(identity)?)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// The rustls client config of a cluster client: TLS 1.3, ALPN [`CLIENT_ALPN`], the client
/// certificate, and the node verified against the cluster CA and the `node-<i>` name its
/// certificate carries (a client dials addresses, not ids).
pub fn client_config_for_client(identity: &ClientIdentity) -> Result<rustls::ClientConfig, TlsError> {
    let fail = |reason: String| TlsError::Client { client: identity.name.clone(), reason };
    if identity.ca_roots.is_empty() {
        return Err(fail("the identity has no CA certificate".into()));
    }
    let mut roots = RootCertStore::empty();
    for ca in &identity.ca_roots {
        roots.add(ca.clone()).map_err(|e| fail(format!("cannot trust CA certificate: {e}")))?;
    }
    let provider = provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| fail(format!("cannot build the certificate verifier: {e}")))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| fail(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeServerVerifier { webpki }))
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|e| fail(format!("bad certificate or key: {e}")))?;
    config.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// [`client_config_for_client`] wrapped for quinn.
pub fn quic_client_config_for_client(identity: &ClientIdentity) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = QuicClientConfig::try_from(client_config_for_client(identity)?)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// The server name to dial: `node-<id>` when the peer's id is known, otherwise
/// [`ANY_NODE_SERVER_NAME`].
pub fn server_name(expect: Option<u32>) -> String {
    expect.map_or_else(|| ANY_NODE_SERVER_NAME.to_owned(), node_name)
}

fn roots(identity: &NodeIdentity) -> Result<Arc<RootCertStore>, TlsError> {
    let node = identity.id;
    if identity.ca_roots.is_empty() {
        return Err(TlsError::NoCaRoots { node });
    }
    let mut roots = RootCertStore::empty();
    for ca in &identity.ca_roots {
        roots.add(ca.clone()).map_err(|source| TlsError::BadCaRoot { node, source })?;
    }
    Ok(Arc::new(roots))
}

/// Verifies a server against the cluster CA; for [`ANY_NODE_SERVER_NAME`] it checks the
/// certificate against the `node-<i>` name the certificate itself carries, so the chain,
/// validity and name checks of webpki all still run.
#[derive(Debug)]
struct NodeServerVerifier {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let any_node = matches!(server_name, ServerName::DnsName(name) if name.as_ref() == ANY_NODE_SERVER_NAME);
        if !any_node {
            return self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        }
        let id = node_id_of(end_entity)
            .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))?;
        let name = ServerName::try_from(node_name(id))
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))?;
        self.webpki.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::certs::CertAuthority;

    fn identity(ca: &CertAuthority, id: u32) -> NodeIdentity {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        ca.issue_node_cert(id, now - hour, now + hour).expect("issue").identity(vec![ca.cert_der().clone()])
    }

    #[test]
    fn configs_use_phalanx_alpn_without_resumption_or_early_data() {
        let ca = CertAuthority::new().expect("ca");
        let node = identity(&ca, 0);
        let server = server_config(&node).expect("server config");
        let client = client_config(&node).expect("client config");
        assert_eq!(server.alpn_protocols, vec![ALPN.to_vec(), CLIENT_ALPN.to_vec()]);
        assert_eq!(client.alpn_protocols, vec![ALPN.to_vec()]);
        assert_eq!((server.max_early_data_size, server.send_tls13_tickets), (0, 0), "no 0-RTT, no tickets");
        assert!(!client.enable_early_data);
        assert!(quic_server_config(&node).is_ok());
        assert!(quic_client_config(&node).is_ok());
    }

    /// What `from` has to send, read and processed by `to`.
    fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).expect("writes");
        }
        let mut read = &wire[..];
        while !read.is_empty() {
            to.read_tls(&mut read).expect("reads");
        }
        to.process_new_packets().expect("accepts");
    }

    /// A full in-memory TLS 1.3 handshake between two nodes' configs; the suite they agreed on.
    fn handshake(client: rustls::ClientConfig, server: rustls::ServerConfig) -> rustls::CipherSuite {
        let name = ServerName::try_from(node_name(1)).expect("server name");
        let mut client =
            rustls::Connection::Client(rustls::ClientConnection::new(Arc::new(client), name).expect("client"));
        let mut server = rustls::Connection::Server(rustls::ServerConnection::new(Arc::new(server)).expect("server"));
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                return client.negotiated_cipher_suite().expect("a suite").suite();
            }
            pump(&mut client, &mut server);
            pump(&mut server, &mut client);
        }
        panic!("the handshake did not finish in 10 round trips");
    }

    #[test]
    fn two_nodes_agree_on_aes_128_gcm() {
        let ca = CertAuthority::new().expect("ca");
        let client = client_config(&identity(&ca, 0)).expect("client config");
        let server = server_config(&identity(&ca, 1)).expect("server config");
        assert_eq!(handshake(client, server), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        // aws-lc's implementation of it, not ring's (the same suite id; half the throughput on
        // loopback-sized packets: see `provider`).
        let first = provider().cipher_suites[0];
        let aws_lc = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let (rustls::SupportedCipherSuite::Tls13(first), rustls::SupportedCipherSuite::Tls13(aws_lc)) = (first, aws_lc)
        else {
            panic!("TLS 1.3 suites");
        };
        assert!(std::ptr::eq(first, aws_lc), "the first suite is aws-lc's");
        // The others are still offered, after it.
        let offered: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert!(offered.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384), "{offered:?}");
        assert!(offered.contains(&rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256), "{offered:?}");
    }

    /// A peer on `ring` (a node of an earlier build, another implementation) and a node on
    /// aws-lc agree on AES-128-GCM and read each other's records both ways.
    #[test]
    fn a_ring_peer_reads_and_is_read() {
        use std::io::{Read, Write};
        let ca = CertAuthority::new().expect("ca");
        let node = identity(&ca, 1);
        let ring = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&node).expect("roots"), ring.clone())
            .build()
            .expect("verifier");
        let mut server = rustls::ServerConfig::builder_with_provider(ring)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(node.cert_chain.clone(), node.key.clone_key())
            .expect("server config");
        server.alpn_protocols = vec![ALPN.to_vec()];
        let name = ServerName::try_from(node_name(1)).expect("server name");
        let client = client_config(&identity(&ca, 0)).expect("client config");
        let mut client =
            rustls::Connection::Client(rustls::ClientConnection::new(Arc::new(client), name).expect("client"));
        let mut server = rustls::Connection::Server(rustls::ServerConnection::new(Arc::new(server)).expect("server"));
        while client.is_handshaking() || server.is_handshaking() {
            pump(&mut client, &mut server);
            pump(&mut server, &mut client);
        }
        assert_eq!(
            client.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let send = |from: &mut rustls::Connection, to: &mut rustls::Connection| {
            let mut got = Vec::new();
            for piece in payload.chunks(16_384) {
                from.writer().write_all(piece).expect("written");
                pump(from, to);
                let mut buf = [0u8; 16_384];
                loop {
                    match to.reader().read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("reading: {e}"),
                    }
                }
            }
            assert!(got == payload, "the records came through unchanged");
        };
        send(&mut client, &mut server);
        send(&mut server, &mut client);
    }

    #[test]
    fn an_identity_without_ca_is_refused() {
        let ca = CertAuthority::new().expect("ca");
        let mut node = identity(&ca, 0);
        node.ca_roots.clear();
        assert!(matches!(server_config(&node), Err(TlsError::NoCaRoots { node: 0 })));
    }

    #[test]
    fn any_node_verifier_checks_chain_and_name() {
        let ca = CertAuthority::new().expect("ca");
        let foreign = CertAuthority::new().expect("foreign ca");
        let verifier = NodeServerVerifier {
            webpki: WebPkiServerVerifier::builder_with_provider(roots(&identity(&ca, 0)).expect("roots"), provider())
                .build()
                .expect("verifier"),
        };
        let any = ServerName::try_from(ANY_NODE_SERVER_NAME).expect("name");
        let now = UnixTime::now();
        let good = identity(&ca, 3);
        assert!(verifier.verify_server_cert(&good.cert_chain[0], &[], &any, &[], now).is_ok());
        let named = ServerName::try_from("node-3").expect("name");
        assert!(verifier.verify_server_cert(&good.cert_chain[0], &[], &named, &[], now).is_ok());
        let other = ServerName::try_from("node-4").expect("name");
        assert!(verifier.verify_server_cert(&good.cert_chain[0], &[], &other, &[], now).is_err());
        let stranger = identity(&foreign, 3);
        assert!(verifier.verify_server_cert(&stranger.cert_chain[0], &[], &any, &[], now).is_err());
    }
}
