//! Only members talk: clients without a cluster certificate, with a foreign or expired one,
//! or with another ALPN are never admitted and nothing they send is delivered. With TLS 1.3
//! the client's own handshake may well succeed, so every check is on the server's side.

mod support;

use std::path::Path;

use phalanx_transport::certs::{CertAuthority, NodeIdentity};
use phalanx_transport::{codes, encode, ConnectError, Limits, Transport, TransportConfig, TransportEvent};
use support::*;

/// A bad client with its own Transport dials the server: the server reports a failed
/// handshake, never admits it, and still serves a healthy node afterwards.
async fn transport_client_is_refused(dir: &Path, bad_identity: NodeIdentity) {
    let (server, mut server_events) = node(dir, 0).await;
    let (bad, mut bad_events) =
        Transport::bind(TransportConfig::new(bad_identity, "127.0.0.1:0".parse().expect("addr"))).await.expect("bind");

    let err = bad.connect(server.local_addr(), Some(0)).await.expect_err("bad client connected");
    assert!(matches!(err, ConnectError::Lost { .. } | ConnectError::Handshake { .. }), "unexpected error: {err}");
    let (peer, before) = wait_server_refused(&mut server_events).await;
    assert_eq!(peer, None, "a refused certificate identifies nobody");
    assert_only_admitted(&before, None);
    assert!(bad.peers().is_empty());
    assert!(bad_events.try_recv().is_err(), "the bad client saw an event: {:?}", bad_events.try_recv());

    let before = healthy_exchange(dir, 1, &server, &mut server_events).await;
    assert_only_admitted(&before, Some(1));
    assert_eq!(server.stats().rejected_with(codes::HANDSHAKE_FAILED), 1);
    bad.shutdown().await;
    server.shutdown().await;
}

/// Waits for the server's report of a failed handshake and checks that the server refused
/// the client, rather than the client giving up on the server (which would prove nothing).
async fn wait_server_refused(
    events: &mut tokio::sync::mpsc::Receiver<TransportEvent>,
) -> (Option<u32>, Vec<TransportEvent>) {
    let (event, before) =
        wait_for(events, "Rejected", |e| matches!(e, TransportEvent::Rejected { code: codes::HANDSHAKE_FAILED, .. }))
            .await;
    let TransportEvent::Rejected { peer, reason, .. } = event else { unreachable!() };
    assert!(!reason.contains("aborted by peer"), "the client gave up, the server did not refuse: {reason}");
    (peer, before)
}

#[tokio::test]
async fn a_certificate_from_a_foreign_ca_is_refused() {
    init_tracing();
    let dir = cluster(2);
    let foreign = CertAuthority::new().expect("foreign CA");
    // Node 7's certificate from another CA, while trusting the cluster CA (so it would happily
    // verify the server): only the server's check can stop it.
    let identity = issue(&foreign, 7, -3600, 3600).identity(cluster_ca_root(dir.path()));
    transport_client_is_refused(dir.path(), identity).await;
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    init_tracing();
    let dir = cluster(2);
    let ca = CertAuthority::load(dir.path()).expect("cluster CA");
    let identity = issue(&ca, 5, -2 * 86_400, -86_400).identity(cluster_ca_root(dir.path()));
    transport_client_is_refused(dir.path(), identity).await;
}

#[tokio::test]
async fn the_server_also_refuses_to_be_a_client_of_an_expired_node() {
    init_tracing();
    let dir = cluster(1);
    let ca = CertAuthority::load(dir.path()).expect("cluster CA");
    let expired = issue(&ca, 1, -2 * 86_400, -86_400).identity(cluster_ca_root(dir.path()));
    let (stale, _stale_events) =
        Transport::bind(TransportConfig::new(expired, "127.0.0.1:0".parse().expect("addr"))).await.expect("bind");
    let (server, _server_events) = node(dir.path(), 0).await;
    let err = server.connect(stale.local_addr(), Some(1)).await.expect_err("expired server accepted");
    assert!(matches!(err, ConnectError::Handshake { .. }), "{err}");
    assert!(server.peers().is_empty());
    stale.shutdown().await;
    server.shutdown().await;
}

/// A raw QUIC client that may complete its side of the handshake tries to send a valid hello
/// and a valid frame; the server must admit nothing.
async fn raw_client_is_refused(dir: &Path, client: RawClient) {
    let (server, mut server_events) = node(dir, 0).await;

    if let Ok((_endpoint, conn)) = client.connect(server.local_addr(), 0).await {
        // TLS 1.3: the client believes it is connected. Everything it sends must go nowhere.
        let hello = raw_hello(&conn, &hello_frame(3, phalanx_transport::PROTOCOL_VERSION)).await;
        assert!(hello.is_err(), "server answered the hello of a refused client: {hello:?}");
        send_uni(&conn, &encode(&"let me in", &[1.0], &Limits::default()).expect("encode")).await;
    }
    let (peer, before) = wait_server_refused(&mut server_events).await;
    assert_eq!(peer, None);
    assert_only_admitted(&before, None);

    let before = healthy_exchange(dir, 1, &server, &mut server_events).await;
    assert_only_admitted(&before, Some(1));
    assert_eq!(server.stats().frames_in, 1, "only the healthy node's frame arrived");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    init_tracing();
    let dir = cluster(2);
    let client = RawClient { identity: None, roots: cluster_ca_root(dir.path()), alpn: b"phalanx/8".to_vec() };
    raw_client_is_refused(dir.path(), client).await;
}

#[tokio::test]
async fn a_client_with_another_alpn_is_refused() {
    init_tracing();
    let dir = cluster(4);
    let mut client = RawClient::node(identity(dir.path(), 3));
    client.alpn = b"h3".to_vec();
    raw_client_is_refused(dir.path(), client).await;
}

#[tokio::test]
async fn a_raw_client_with_a_foreign_certificate_is_refused() {
    init_tracing();
    let dir = cluster(2);
    let foreign = CertAuthority::new().expect("foreign CA");
    let identity = issue(&foreign, 3, -3600, 3600).identity(cluster_ca_root(dir.path()));
    raw_client_is_refused(dir.path(), RawClient::node(identity)).await;
}

#[tokio::test]
async fn nothing_a_refused_client_sends_is_ever_delivered() {
    // The same as above, but the server's event stream is checked to the end of its life.
    init_tracing();
    let dir = cluster(1);
    let (server, mut server_events) = node(dir.path(), 0).await;
    let client = RawClient { identity: None, roots: cluster_ca_root(dir.path()), alpn: b"phalanx/8".to_vec() };
    if let Ok((_endpoint, conn)) = client.connect(server.local_addr(), 0).await {
        send_uni(&conn, &encode(&"early data", &[], &Limits::default()).expect("encode")).await;
    }
    wait_server_refused(&mut server_events).await;
    server.shutdown().await;
    drop(server);
    // The queue closes once every task of the server has ended: nothing is left running.
    let mut rest = Vec::new();
    while let Some(event) = tokio::time::timeout(HANG_GUARD, server_events.recv()).await.expect("server tasks linger") {
        rest.push(event);
    }
    assert!(
        rest.iter().all(|e| !matches!(e, TransportEvent::PeerUp { .. } | TransportEvent::Message { .. })),
        "{rest:?}"
    );
}

/// One address opens far more connections than the node has handshake slots, each holding
/// its slot (a valid certificate, then no hello); a member dialling from elsewhere still gets
/// in at once, since one address may hold only a few slots.
#[tokio::test]
async fn a_handshake_flood_from_one_address_does_not_keep_members_out() {
    init_tracing();
    let dir = cluster(4);
    let mut server_config = config(dir.path(), 0);
    // The flood's slots stay held for the whole test (no hello ever comes).
    server_config.hello_timeout_ms = 60_000;
    let (server, mut events) = Transport::bind(server_config).await.expect("bind");

    // Node 3's certificate from one endpoint (one address), 3 × the node's handshake slots.
    let flooder = RawClient::node(identity(dir.path(), 3));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let flood = 3 * phalanx_transport::MAX_PENDING_HANDSHAKES;
    let mut held = Vec::new();
    let mut dials = tokio::task::JoinSet::new();
    for _ in 0..flood {
        let (flooder, endpoint, addr) = (flooder.clone(), endpoint.clone(), server.local_addr());
        dials.spawn(async move { flooder.connect_with(&endpoint, addr, 0).await });
    }
    while let Some(dialled) = dials.join_next().await {
        if let Ok(Ok(conn)) = dialled {
            held.push(conn);
        }
    }
    wait_rejected(&mut events, codes::OVERLOADED).await;

    // A member from another address: admitted while the flood still holds its slots.
    let (member, _member_events) = node(dir.path(), 1).await;
    member.connect(server.local_addr(), Some(0)).await.expect("the member gets in despite the flood");
    wait_peer_up(&mut events, 1).await;
    let refused = server.stats().rejected_with(codes::OVERLOADED);
    assert!(
        refused >= (flood - phalanx_transport::MAX_HANDSHAKES_PER_ADDRESS) as u64,
        "the flood beyond its per-address share was refused: {refused} of {flood}"
    );
    drop(held);
    member.shutdown().await;
    server.shutdown().await;
}
