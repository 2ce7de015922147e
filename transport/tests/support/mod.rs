//! Helpers shared by the transport integration tests: certificates, nodes on loopback,
//! waiting for events (with a timeout only as a hang guard), and raw QUIC clients that
//! misbehave on purpose.
#![allow(dead_code)] // each test file uses a different subset

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use phalanx_transport::certs::{self, CertAuthority, IssuedCert};
use phalanx_transport::codec::PREFIX_BYTES;
use phalanx_transport::{
    tls, Hello, Limits, NodeIdentity, Transport, TransportConfig, TransportEvent, ALPN, PROTOCOL_VERSION,
};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;
use tempfile::TempDir;
use tokio::sync::mpsc::Receiver;

/// Longest wait for anything in these tests; only reached if something hangs.
pub const HANG_GUARD: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("phalanx_transport=info")),
        )
        .with_test_writer()
        .try_init();
}

/// A directory with a cluster CA and certificates for nodes `0..nodes`.
pub fn cluster(nodes: u32) -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    certs::generate(dir.path(), nodes).expect("generate certificates");
    dir
}

pub fn identity(dir: &Path, id: u32) -> NodeIdentity {
    NodeIdentity::load(dir, id).expect("load identity")
}

pub fn config(dir: &Path, id: u32) -> TransportConfig {
    TransportConfig::new(identity(dir, id), "127.0.0.1:0".parse().expect("addr"))
}

pub async fn node(dir: &Path, id: u32) -> (Transport, Receiver<TransportEvent>) {
    Transport::bind(config(dir, id)).await.expect("bind")
}

/// A certificate issued by `ca` for node `id`, valid from `from` to `to` relative to now.
pub fn issue(ca: &CertAuthority, id: u32, from: i64, to: i64) -> IssuedCert {
    let now = SystemTime::now();
    let at = |secs: i64| {
        if secs >= 0 {
            now + Duration::from_secs(secs.unsigned_abs())
        } else {
            now - Duration::from_secs(secs.unsigned_abs())
        }
    };
    ca.issue_node_cert(id, at(from), at(to)).expect("issue certificate")
}

pub fn cluster_ca_root(dir: &Path) -> Vec<CertificateDer<'static>> {
    identity(dir, 0).ca_roots
}

/// The next event, failing the test after [`HANG_GUARD`].
pub async fn next_event(events: &mut Receiver<TransportEvent>) -> TransportEvent {
    tokio::time::timeout(HANG_GUARD, events.recv())
        .await
        .expect("timed out waiting for a transport event")
        .expect("transport event queue closed")
}

/// Receives events until one matches `wanted`; returns it and the events skipped on the way.
pub async fn wait_for(
    events: &mut Receiver<TransportEvent>,
    what: &str,
    mut wanted: impl FnMut(&TransportEvent) -> bool,
) -> (TransportEvent, Vec<TransportEvent>) {
    let mut skipped = Vec::new();
    loop {
        let event = tokio::time::timeout(HANG_GUARD, events.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {skipped:?}"))
            .unwrap_or_else(|| panic!("event queue closed waiting for {what}; saw {skipped:?}"));
        if wanted(&event) {
            return (event, skipped);
        }
        skipped.push(event);
    }
}

pub async fn wait_peer_up(events: &mut Receiver<TransportEvent>, peer: u32) -> Vec<TransportEvent> {
    wait_for(events, "PeerUp", |e| matches!(e, TransportEvent::PeerUp { peer: p, .. } if *p == peer)).await.1
}

/// Waits for a rejection with `code` and returns its peer.
pub async fn wait_rejected(events: &mut Receiver<TransportEvent>, code: u32) -> (Option<u32>, Vec<TransportEvent>) {
    let (event, skipped) = wait_for(
        events,
        &format!("Rejected {code:#x}"),
        |e| matches!(e, TransportEvent::Rejected { code: c, .. } if *c == code),
    )
    .await;
    match event {
        TransportEvent::Rejected { peer, .. } => (peer, skipped),
        _ => unreachable!(),
    }
}

pub async fn wait_message(events: &mut Receiver<TransportEvent>, from: u32) -> (Vec<u8>, Vec<TransportEvent>) {
    let (event, skipped) =
        wait_for(events, "Message", |e| matches!(e, TransportEvent::Message { peer, .. } if *peer == from)).await;
    match event {
        TransportEvent::Message { frame, .. } => (frame.into_vec(), skipped),
        _ => unreachable!(),
    }
}

/// Asserts that `events` admitted no peer but `allowed` and delivered nothing from another.
pub fn assert_only_admitted(events: &[TransportEvent], allowed: Option<u32>) {
    for event in events {
        match event {
            TransportEvent::PeerUp { peer, .. } | TransportEvent::Message { peer, .. } => {
                assert_eq!(Some(*peer), allowed, "a peer was admitted: {event:?}")
            }
            _ => {}
        }
    }
}

/// A healthy node `id` connects to `server` and frames go both ways; returns the server's
/// events seen before the healthy node's frame arrived.
pub async fn healthy_exchange(
    dir: &Path,
    id: u32,
    server: &Transport,
    server_events: &mut Receiver<TransportEvent>,
) -> Vec<TransportEvent> {
    let (healthy, mut healthy_events) = node(dir, id).await;
    let limits = Limits::default();
    let peer = healthy.connect(server.local_addr(), Some(server.node_id())).await.expect("healthy connect");
    assert_eq!(peer, server.node_id());
    healthy.send(peer, phalanx_transport::encode(&"ping", &[1.0, 2.0], &limits).expect("encode")).expect("send");
    let (frame, skipped) = wait_message(server_events, id).await;
    let decoded = phalanx_transport::decode::<String>(&frame, &limits).expect("decode");
    assert_eq!((decoded.header.as_str(), decoded.tensor.as_slice()), ("ping", &[1.0f32, 2.0][..]));
    server.send(id, phalanx_transport::encode(&"pong", &[], &limits).expect("encode")).expect("send back");
    let (frame, _) = wait_message(&mut healthy_events, server.node_id()).await;
    assert_eq!(phalanx_transport::decode::<String>(&frame, &limits).expect("decode").header, "pong");
    healthy.shutdown().await;
    skipped
}

/// How a raw client presents itself.
#[derive(Clone)]
pub struct RawClient {
    /// Certificate chain and key to present; `None`: no client certificate.
    pub identity: Option<NodeIdentity>,
    /// Roots to verify the server with.
    pub roots: Vec<CertificateDer<'static>>,
    pub alpn: Vec<u8>,
}

impl RawClient {
    pub fn node(identity: NodeIdentity) -> Self {
        let roots = identity.ca_roots.clone();
        Self { identity: Some(identity), roots, alpn: ALPN.to_vec() }
    }

    /// Dials `server` (expecting `node-<server_id>`) and completes the QUIC handshake.
    ///
    /// With TLS 1.3 the client's handshake can finish before the server has checked the
    /// client's certificate, so this may succeed even for a client the server refuses.
    pub async fn connect(
        &self,
        server: SocketAddr,
        server_id: u32,
    ) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
        let conn = self.connect_with(&endpoint, server, server_id).await?;
        Ok((endpoint, conn))
    }

    /// [`connect`](Self::connect) from an existing endpoint (so many connections share one
    /// address).
    pub async fn connect_with(
        &self,
        endpoint: &quinn::Endpoint,
        server: SocketAddr,
        server_id: u32,
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        let mut roots = rustls::RootCertStore::empty();
        for root in &self.roots {
            roots.add(root.clone()).expect("root");
        }
        let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots);
        let mut crypto = match &self.identity {
            Some(identity) => builder
                .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
                .expect("client cert"),
            None => builder.with_no_client_auth(),
        };
        crypto.alpn_protocols = vec![self.alpn.clone()];
        let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto).expect("quic config")));
        endpoint.connect_with(config, server, &certs::node_name(server_id)).expect("start connect").await
    }
}

/// A hello frame with any version (in the envelope and the hello) and any claimed id.
pub fn hello_frame(node_id: u32, version: u16) -> Vec<u8> {
    let hello = Hello { protocol_version: version, node_id, incarnation: 0x5eed };
    let mut frame = hello.encode().expect("encode hello");
    frame[PREFIX_BYTES..PREFIX_BYTES + 2].copy_from_slice(&version.to_le_bytes());
    frame
}

/// Sends a hello as a dialler would and returns what came back on the stream, or the error.
pub async fn raw_hello(conn: &quinn::Connection, frame: &[u8]) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(frame).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    recv.read_to_end(1024).await.map_err(|e| e.to_string())
}

/// A valid hello for `node_id`, answered by the server.
pub async fn good_raw_hello(conn: &quinn::Connection, node_id: u32) {
    let answer = raw_hello(conn, &hello_frame(node_id, PROTOCOL_VERSION)).await.expect("server answers the hello");
    assert!(answer.len() > PREFIX_BYTES, "server hello: {answer:?}");
}

/// Sends raw bytes on a new unidirectional stream (errors ignored: the server may already
/// have closed the connection).
pub async fn send_uni(conn: &quinn::Connection, bytes: &[u8]) {
    if let Ok(mut send) = conn.open_uni().await {
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
    }
}

/// The application close code the server closed `conn` with.
pub async fn close_code(conn: &quinn::Connection) -> Option<u32> {
    match tokio::time::timeout(HANG_GUARD, conn.closed()).await.expect("connection never closed") {
        quinn::ConnectionError::ApplicationClosed(close) => u32::try_from(close.error_code.into_inner()).ok(),
        _ => None,
    }
}
