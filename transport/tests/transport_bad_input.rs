//! Members that send bad input: each case closes that one connection with the right reason
//! code (seen by the offender), is reported and counted, and the node keeps serving a healthy
//! peer afterwards.

mod support;

use phalanx_transport::certs::{node_id_of, CertAuthority};
use phalanx_transport::codec::PREFIX_BYTES;
use phalanx_transport::{codes, decode, encode, DecodeError, Limits, TransportEvent, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use support::*;

/// The header type the server's caller expects.
#[derive(Debug, Serialize, Deserialize)]
enum Control {
    Heartbeat { epoch: u64 },
    Bye,
}

/// Node 3 (a genuine member) passes the hello, then sends `bytes` on a uni stream.
/// Returns the code the server closed the connection with, as the server reported it and as
/// node 3 saw it.
async fn member_sends(bytes: Vec<u8>, what: &str) -> (u32, u32) {
    init_tracing();
    let dir = cluster(4);
    let (server, mut server_events) = node(dir.path(), 0).await;
    let client = RawClient::node(identity(dir.path(), 3));
    let (_endpoint, conn) = client.connect(server.local_addr(), 0).await.expect("member connects");
    good_raw_hello(&conn, 3).await;
    wait_peer_up(&mut server_events, 3).await;

    send_uni(&conn, &bytes).await;
    let (event, skipped) = wait_for(&mut server_events, what, |e| matches!(e, TransportEvent::Rejected { .. })).await;
    assert!(!skipped.iter().any(|e| matches!(e, TransportEvent::Message { .. })), "{what}: delivered {skipped:?}");
    let TransportEvent::Rejected { peer, code, reason, .. } = event else { unreachable!() };
    assert_eq!(peer, Some(3), "{what}");
    assert!(!reason.is_empty());
    // The node learns of the frame-level violation itself, once, before the rejection.
    let bad: Vec<&TransportEvent> = skipped.iter().filter(|e| matches!(e, TransportEvent::BadFrame { .. })).collect();
    assert!(
        matches!(bad.as_slice(), [TransportEvent::BadFrame { peer: 3, code: c, reason }] if *c == code && !reason.is_empty()),
        "{what}: one BadFrame from node 3 with code {code:#x}, got {skipped:?}"
    );
    assert_eq!(server.stats().bad_frames, 1, "{what}");
    let (down, _) = wait_for(&mut server_events, "PeerDown", |e| matches!(e, TransportEvent::PeerDown { .. })).await;
    assert!(matches!(down, TransportEvent::PeerDown { peer: 3, .. }), "{down:?}");
    let seen_by_offender = close_code(&conn).await.expect("closed with an application code");
    assert_eq!(server.stats().rejected_with(code), 1);

    // The node is unharmed: a healthy member exchanges frames with it.
    let before = healthy_exchange(dir.path(), 1, &server, &mut server_events).await;
    assert_only_admitted(&before, Some(1));
    server.shutdown().await;
    (code, seen_by_offender)
}

/// The code the codec itself gives `bytes` (a stream holding exactly these bytes).
fn codec_code(bytes: &[u8]) -> u32 {
    let mut decoder = phalanx_transport::FrameDecoder::new(Limits::default());
    decoder.push(bytes);
    match decoder.next_frame::<Control>() {
        Err(err) => err.reason_code(),
        // The stream ended before the frame did.
        Ok(None) => DecodeError::CODE_TRUNCATED,
        Ok(Some(frame)) => panic!("valid frame {:?}", frame.header),
    }
}

#[tokio::test]
async fn garbage_on_a_stream_closes_the_connection_with_the_codec_code() {
    let garbage = b"GET / HTTP/1.1\r\nHost: node-0\r\n\r\n".to_vec();
    let expected = codec_code(&garbage);
    assert_eq!(member_sends(garbage, "garbage").await, (expected, expected));
}

#[tokio::test]
async fn an_oversize_length_prefix_is_refused_before_the_body() {
    // 4 prefix bytes announcing 1 GiB, and nothing else: refused from the prefix alone.
    let prefix = (1u32 << 30).to_le_bytes().to_vec();
    assert_eq!(member_sends(prefix, "oversize").await, (DecodeError::CODE_OVERSIZE, DecodeError::CODE_OVERSIZE));
}

#[tokio::test]
async fn a_frame_of_another_version_is_refused() {
    let mut frame = encode(&Control::Bye, &[], &Limits::default()).expect("encode");
    // A node of the previous version (1: one gradient per partition).
    frame[PREFIX_BYTES] = 1;
    let code = DecodeError::CODE_UNSUPPORTED_VERSION;
    assert_eq!(member_sends(frame, "version 1 frame").await, (code, code));
}

#[tokio::test]
async fn a_stream_ending_inside_its_frame_is_truncated() {
    let frame = encode(&Control::Bye, &[1.0; 8], &Limits::default()).expect("encode");
    let code = DecodeError::CODE_TRUNCATED;
    assert_eq!(member_sends(frame[..frame.len() - 5].to_vec(), "truncated").await, (code, code));
}

#[tokio::test]
async fn a_tensor_of_odd_length_is_refused() {
    let mut frame = encode(&Control::Bye, &[1.0], &Limits::default()).expect("encode");
    frame.pop();
    let len = u32::try_from(frame.len() - PREFIX_BYTES).expect("small");
    frame[..PREFIX_BYTES].copy_from_slice(&len.to_le_bytes());
    let code = DecodeError::CODE_BAD_TENSOR_LENGTH;
    assert_eq!(member_sends(frame, "odd tensor").await, (code, code));
}

#[tokio::test]
async fn bytes_after_the_frame_on_its_stream_are_refused() {
    let mut frame = encode(&Control::Bye, &[], &Limits::default()).expect("encode");
    frame.extend_from_slice(b"and more");
    assert_eq!(member_sends(frame, "trailing").await, (codes::STREAM_FRAMING, codes::STREAM_FRAMING));
}

#[tokio::test]
async fn a_frame_with_an_unknown_header_is_rejected_by_the_caller() {
    init_tracing();
    let dir = cluster(4);
    let (server, mut server_events) = node(dir.path(), 0).await;
    let (member, mut member_events) = node(dir.path(), 3).await;
    member.connect(server.local_addr(), Some(0)).await.expect("connect");
    wait_peer_up(&mut server_events, 3).await;

    // A valid envelope around a header the server's type does not know (variant 7).
    #[derive(Serialize)]
    enum Newer {
        _Heartbeat { epoch: u64 },
        _Bye,
        _Two,
        _Three,
        _Four,
        _Five,
        _Six,
        Resize { partitions: u32 },
    }
    let limits = Limits::default();
    member.send(0, encode(&Newer::Resize { partitions: 9 }, &[], &limits).expect("encode")).expect("send");

    let (frame, _) = wait_message(&mut server_events, 3).await;
    let err = decode::<Control>(&frame, &limits).expect_err("unknown variant decoded");
    server.reject(3, err.reason_code(), &err.to_string());

    let (peer, before) = wait_rejected(&mut server_events, DecodeError::CODE_HEADER).await;
    assert_eq!(peer, Some(3));
    // The envelope was valid: the caller decides about the header, and counts it itself.
    assert!(!before.iter().any(|e| matches!(e, TransportEvent::BadFrame { .. })), "{before:?}");
    assert_eq!(server.stats().bad_frames, 0);
    let (down, _) = wait_for(&mut server_events, "PeerDown", |e| matches!(e, TransportEvent::PeerDown { .. })).await;
    assert!(matches!(down, TransportEvent::PeerDown { peer: 3, .. }));
    let (down, _) = wait_for(&mut member_events, "PeerDown", |e| matches!(e, TransportEvent::PeerDown { .. })).await;
    let TransportEvent::PeerDown { reason, .. } = down else { unreachable!() };
    assert!(reason.contains("0x106"), "the member is told why: {reason}");
    assert_eq!(server.stats().rejected_with(DecodeError::CODE_HEADER), 1);

    healthy_exchange(dir.path(), 1, &server, &mut server_events).await;
    member.shutdown().await;
    server.shutdown().await;
}

/// A member completes TLS and sends `hello` as its hello: refused before `PeerUp`.
async fn member_says_hello(hello: Vec<u8>, expected: u32) {
    init_tracing();
    let dir = cluster(6);
    let (server, mut server_events) = node(dir.path(), 0).await;
    let client = RawClient::node(identity(dir.path(), 3));
    let (_endpoint, conn) = client.connect(server.local_addr(), 0).await.expect("TLS succeeds");
    let answer = raw_hello(&conn, &hello).await;
    assert!(answer.is_err(), "the server answered a bad hello: {answer:?}");
    let (peer, before) = wait_rejected(&mut server_events, expected).await;
    assert_eq!(peer, Some(3), "the certificate's id is reported");
    assert_only_admitted(&before, None);
    assert_eq!(close_code(&conn).await, Some(expected));

    let before = healthy_exchange(dir.path(), 1, &server, &mut server_events).await;
    assert_only_admitted(&before, Some(1));
    server.shutdown().await;
}

#[tokio::test]
async fn a_hello_of_another_protocol_version_is_refused() {
    member_says_hello(hello_frame(3, PROTOCOL_VERSION + 1), DecodeError::CODE_UNSUPPORTED_VERSION).await;
}

#[tokio::test]
async fn a_hello_claiming_another_node_id_than_the_certificate_is_refused() {
    // node-3's certificate, "I am node 5" in the hello.
    member_says_hello(hello_frame(5, PROTOCOL_VERSION), codes::ID_MISMATCH).await;
}

#[tokio::test]
async fn garbage_instead_of_a_hello_is_refused() {
    // The current version, then a header length of 4 GiB - 1 and junk.
    let body = [&PROTOCOL_VERSION.to_le_bytes()[..], &[0xff; 14]].concat();
    let garbage = [&(body.len() as u32).to_le_bytes()[..], &body].concat();
    member_says_hello(garbage, DecodeError::CODE_HEADER_TOO_LARGE).await;
}

#[tokio::test]
async fn a_member_that_never_says_hello_is_closed_after_the_hello_timeout() {
    init_tracing();
    let dir = cluster(4);
    let mut config = config(dir.path(), 0);
    config.hello_timeout_ms = 200;
    let (server, mut server_events) = phalanx_transport::Transport::bind(config).await.expect("bind");
    let client = RawClient::node(identity(dir.path(), 3));
    let (_endpoint, conn) = client.connect(server.local_addr(), 0).await.expect("TLS succeeds");
    send_uni(&conn, &encode(&Control::Bye, &[], &Limits::default()).expect("encode")).await;
    let (peer, before) = wait_rejected(&mut server_events, codes::HELLO_FAILED).await;
    assert_eq!(peer, Some(3));
    assert_only_admitted(&before, None);
    assert_eq!(close_code(&conn).await, Some(codes::HELLO_FAILED));
    server.shutdown().await;
}

#[tokio::test]
async fn the_node_id_comes_from_the_certificate_and_a_nameless_certificate_is_refused() {
    init_tracing();
    let dir = cluster(2);
    let (server, mut server_events) = node(dir.path(), 0).await;
    let (member, _member_events) = node(dir.path(), 1).await;
    // Dialling by address alone: the id is read from the server's certificate.
    assert_eq!(member.connect(server.local_addr(), None).await.expect("connect"), 0);
    assert_eq!(node_id_of(&identity(dir.path(), 1).cert_chain[0]), Some(1));
    wait_peer_up(&mut server_events, 1).await;

    // A certificate the cluster CA signed but that names no node.
    let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem");
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.path().join("ca/ca.key")).expect("ca/ca.key"))
        .expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let nameless = phalanx_transport::NodeIdentity {
        id: 9,
        cert_chain: vec![cert.der().clone()],
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        ca_roots: cluster_ca_root(dir.path()),
    };
    let _ = CertAuthority::load(dir.path()).expect("the CA files load");
    let (_endpoint, conn) = RawClient::node(nameless).connect(server.local_addr(), 0).await.expect("TLS succeeds");
    let (peer, _) = wait_rejected(&mut server_events, codes::NO_NODE_ID).await;
    assert_eq!(peer, None);
    assert_eq!(close_code(&conn).await, Some(codes::NO_NODE_ID));
    member.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_second_process_with_this_nodes_id_is_refused() {
    init_tracing();
    let dir = cluster(1);
    let (server, mut server_events) = node(dir.path(), 0).await;
    let (twin, _twin_events) = node(dir.path(), 0).await;
    let err = twin.connect(server.local_addr(), None).await.expect_err("self connect");
    assert!(matches!(err, phalanx_transport::ConnectError::Refused { code: codes::SELF_CONNECT, .. }), "{err}");
    // The server refuses it too (or sees it closed by the twin first): never admitted.
    let (_, before) = wait_for(&mut server_events, "Rejected", |e| matches!(e, TransportEvent::Rejected { .. })).await;
    assert_only_admitted(&before, None);
    assert!(server.peers().is_empty());
    twin.shutdown().await;
    server.shutdown().await;
}
