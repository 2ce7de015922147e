//! Revoked and expired certificates: a revocation list set on a running node closes the live
//! connections it names at once and refuses them from then on (members and clients alike);
//! a connection whose peer's certificate expires is closed when it does, not at the next
//! handshake.

mod support;

use std::time::{Duration, SystemTime};

use phalanx_transport::certs::{CertAuthority, ClientIdentity};
use phalanx_transport::{codes, Client, ConnectError, Revocations, Transport, TransportConfig, TransportEvent};
use support::*;

#[tokio::test]
async fn revoking_a_member_closes_its_connection_at_once_and_refuses_it_after() {
    init_tracing();
    let dir = cluster(3);
    let (server, mut events) = node(dir.path(), 0).await;
    let (one, mut one_events) = node(dir.path(), 1).await;
    let (two, _two_events) = node(dir.path(), 2).await;
    one.connect(server.local_addr(), Some(0)).await.expect("node 1 connects");
    two.connect(server.local_addr(), Some(0)).await.expect("node 2 connects");
    wait_peer_up(&mut events, 1).await;
    wait_peer_up(&mut events, 2).await;

    server.set_revocations(Revocations::parse(["node-1"]).expect("list"));
    let (event, _) = wait_for(&mut events, "node 1 closed as revoked", |e| {
        matches!(e, TransportEvent::Rejected { code: codes::REVOKED, peer: Some(1), .. })
    })
    .await;
    let TransportEvent::Rejected { reason, .. } = event else { unreachable!() };
    assert!(reason.contains("node-1 is on the revocation list"), "{reason}");
    wait_for(&mut events, "node 1 down", |e| matches!(e, TransportEvent::PeerDown { peer: 1, .. })).await;
    assert_eq!(server.peers(), vec![2], "node 2 is not revoked and stays");

    // Node 1 learns it was closed, then dials again: refused at the handshake.
    let (event, _) =
        wait_for(&mut one_events, "node 1 to see the close", |e| matches!(e, TransportEvent::PeerDown { peer: 0, .. }))
            .await;
    let TransportEvent::PeerDown { reason, .. } = event else { unreachable!() };
    assert!(reason.contains("revoked"), "node 1 is told why: {reason}");
    let err = one.connect(server.local_addr(), Some(0)).await.expect_err("a revoked node connected");
    assert!(matches!(err, ConnectError::Refused { code: codes::REVOKED, .. } | ConnectError::Lost { .. }), "{err}");
    wait_rejected(&mut events, codes::REVOKED).await;
    assert_eq!(server.peers(), vec![2]);

    // Lifted: node 1 is a member again.
    server.set_revocations(Revocations::default());
    one.connect(server.local_addr(), Some(0)).await.expect("node 1 is back");
    wait_peer_up(&mut events, 1).await;
    for t in [one, two, server] {
        t.shutdown().await;
    }
}

/// A revocation that arrives while a connection the peer closed as a duplicate waits for its
/// replacement (which the revocation then refuses at its hello) reports the peer down at once
/// and as revoked — not a hello timeout later as a swap of duplicate connections. The race of
/// a SIGHUP with the duplicate connections of a cluster's start-up.
#[tokio::test]
async fn a_revocation_while_a_duplicate_awaits_its_replacement_reports_the_peer_revoked_at_once() {
    init_tracing();
    let dir = cluster(2);
    let mut config = config(dir.path(), 0);
    // Longer than the test's guard: without the revocation ending the wait, the peer would be
    // reported down only after it, and the test fails.
    config.hello_timeout_ms = 2 * HANG_GUARD.as_millis() as u64;
    let (server, mut events) = Transport::bind(config).await.expect("bind");
    let raw = RawClient::node(identity(dir.path(), 1));
    let (_endpoint, conn) = raw.connect(server.local_addr(), 0).await.expect("handshake");
    good_raw_hello(&conn, 1).await;
    wait_peer_up(&mut events, 1).await;
    // Node 1 keeps "another" connection and closes this one as a duplicate: the server waits
    // for the replacement to finish its hello.
    conn.close(quinn::VarInt::from_u32(codes::DUPLICATE), b"duplicate connection; the other one is kept");
    // Until the server has seen the close, its link would be closed as revoked directly.
    let seen = async {
        while !server.peers().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, seen).await.expect("the server never saw the close");

    let revoked_at = std::time::Instant::now();
    server.set_revocations(Revocations::parse(["node-1"]).expect("list"));
    let (event, skipped) =
        wait_for(&mut events, "node 1 down", |e| matches!(e, TransportEvent::PeerDown { peer: 1, .. })).await;
    let TransportEvent::PeerDown { reason, .. } = event else { unreachable!() };
    assert!(reason.contains("revoked") && reason.contains("node-1 is on the revocation list"), "{reason}");
    assert!(
        revoked_at.elapsed() < HANG_GUARD / 2,
        "reported {:?} after the revocation; skipped {skipped:?}",
        revoked_at.elapsed()
    );
    assert!(server.peers().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn revoking_a_client_closes_its_connection_and_refuses_the_next() {
    init_tracing();
    let dir = cluster(1);
    let (server, mut events) = node(dir.path(), 0).await;
    let identity = ClientIdentity::load(dir.path()).expect("client");
    let client = Client::connect(&identity, server.local_addr(), Duration::from_secs(5)).await.expect("connect");

    server.set_revocations(Revocations::parse(["client-admin"]).expect("list"));
    // The open connection is closed: a request on it fails.
    let asked = match client.request::<_, String>(&"jobs".to_owned()).await {
        Ok(mut answers) => answers.next().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(asked.is_err(), "a revoked client got an answer");
    // A new one is refused.
    if let Ok(again) = Client::connect(&identity, server.local_addr(), Duration::from_secs(5)).await {
        let asked = match again.request::<_, String>(&"jobs".to_owned()).await {
            Ok(mut answers) => answers.next().await.map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(asked.is_err(), "a revoked client was served");
    }
    let (_, before) = wait_rejected(&mut events, codes::REVOKED).await;
    assert!(!before.iter().any(|e| matches!(e, TransportEvent::ClientRequest { .. })), "{before:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_connection_is_closed_when_the_peers_certificate_expires() {
    init_tracing();
    let dir = cluster(2);
    let ca = CertAuthority::load(dir.path()).expect("cluster CA");
    let now = SystemTime::now();
    // Valid for two more seconds (certificate times have one-second resolution).
    let short = ca
        .issue_node_cert(1, now - Duration::from_secs(60), now + Duration::from_secs(2))
        .expect("issue")
        .identity(cluster_ca_root(dir.path()));
    let (server, mut events) = node(dir.path(), 0).await;
    let (one, _one_events) =
        Transport::bind(TransportConfig::new(short, "127.0.0.1:0".parse().expect("addr"))).await.expect("bind");
    one.connect(server.local_addr(), Some(0)).await.expect("valid for now");
    wait_peer_up(&mut events, 1).await;
    let (event, _) = wait_for(&mut events, "node 1's certificate to expire", |e| {
        matches!(e, TransportEvent::PeerDown { peer: 1, .. })
    })
    .await;
    let TransportEvent::PeerDown { reason, .. } = event else { unreachable!() };
    assert!(reason.contains("certificate expired"), "{reason}");
    assert!(SystemTime::now() >= now + Duration::from_secs(1), "closed before the certificate expired");
    assert_eq!(server.stats().rejected_with(codes::CERT_EXPIRED), 1);
    one.shutdown().await;
    server.shutdown().await;
}

/// A certificate of the cluster's CA naming a node outside the configured cluster (node 5 of
/// a 3-node cluster) never becomes a member: refused at the handshake with `NOT_A_MEMBER`.
#[tokio::test]
async fn a_node_id_outside_the_configured_cluster_is_refused() {
    init_tracing();
    let dir = cluster(6);
    let mut config = config(dir.path(), 0);
    config.members = Some(3);
    let (server, mut events) = Transport::bind(config).await.expect("bind");
    let (five, _five_events) = node(dir.path(), 5).await;
    let err = five.connect(server.local_addr(), Some(0)).await.expect_err("node 5 joined a 3-node cluster");
    assert!(
        matches!(err, ConnectError::Refused { code: codes::NOT_A_MEMBER, .. } | ConnectError::Lost { .. }),
        "{err}"
    );
    let (event, _) = wait_for(&mut events, "node 5 refused", |e| {
        matches!(e, TransportEvent::Rejected { code: codes::NOT_A_MEMBER, .. })
    })
    .await;
    let TransportEvent::Rejected { reason, .. } = event else { unreachable!() };
    assert!(reason.contains("node 5 is not a member of this 3-node cluster"), "{reason}");
    assert!(server.peers().is_empty());
    // A member's id is welcome.
    let (two, _two_events) = node(dir.path(), 2).await;
    two.connect(server.local_addr(), Some(0)).await.expect("node 2 connects");
    wait_peer_up(&mut events, 2).await;
    for t in [two, five, server] {
        t.shutdown().await;
    }
}
