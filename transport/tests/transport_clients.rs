//! The client API's transport: a client certificate (`client-<name>`) on the client ALPN gets
//! its requests delivered and answered; it can never join as a member; a node certificate
//! cannot use the client API; certificates of another CA are refused by TLS. Every refusal
//! is checked on the server's side (TLS 1.3 lets a refused client finish its handshake).

mod support;

use std::time::{Duration, SystemTime};

use phalanx_transport::certs::{CertAuthority, ClientIdentity, DEFAULT_CLIENT_NAME};
use phalanx_transport::{codes, Client, ClientError, NodeIdentity, TransportEvent};
use support::*;

const TIMEOUT: Duration = Duration::from_secs(5);

fn client_identity(dir: &std::path::Path) -> ClientIdentity {
    ClientIdentity::load(dir).expect("client identity")
}

#[tokio::test]
async fn a_client_request_is_delivered_and_answered_on_its_stream() {
    init_tracing();
    let dir = cluster(1);
    let (server, mut events) = node(dir.path(), 0).await;
    let client = Client::connect(&client_identity(dir.path()), server.local_addr(), TIMEOUT).await.expect("connect");
    assert_eq!(client.node(), 0, "the node's id comes from its certificate");

    let ask = async {
        let mut answers = client.request::<_, String>(&("jobs".to_owned(), 7u64)).await.expect("request");
        let mut got = Vec::new();
        while let Some(answer) = answers.next().await.expect("answer") {
            got.push(answer);
        }
        got
    };
    let serve = async {
        let (event, before) =
            wait_for(&mut events, "ClientRequest", |e| matches!(e, TransportEvent::ClientRequest { .. })).await;
        assert_only_admitted(&before, None);
        let TransportEvent::ClientRequest { client, request, mut reply, .. } = event else { unreachable!() };
        assert_eq!(client, DEFAULT_CLIENT_NAME);
        let frame = phalanx_transport::decode::<(String, u64)>(&request, &phalanx_transport::CLIENT_REQUEST_LIMITS)
            .expect("decode");
        assert_eq!(frame.header, ("jobs".to_owned(), 7));
        reply.send(&"first".to_owned()).await.expect("send");
        reply.send(&"second".to_owned()).await.expect("send");
        reply.finish();
    };
    let (got, ()) = tokio::join!(ask, serve);
    assert_eq!(got, ["first", "second"]);
    assert!(server.peers().is_empty(), "a client is never a peer");
    client.close().await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_certificate_cannot_join_as_a_member() {
    init_tracing();
    let dir = cluster(2);
    let (server, mut events) = node(dir.path(), 0).await;
    let client = client_identity(dir.path());
    // The client's certificate and key, presented as if it were node 1 on the member ALPN.
    let posing = NodeIdentity { id: 1, cert_chain: client.cert_chain, key: client.key, ca_roots: client.ca_roots };
    if let Ok((_endpoint, conn)) = RawClient::node(posing).connect(server.local_addr(), 0).await {
        let hello = raw_hello(&conn, &hello_frame(1, phalanx_transport::PROTOCOL_VERSION)).await;
        assert!(hello.is_err(), "the server answered a client's member hello: {hello:?}");
    }
    let (event, before) =
        wait_for(&mut events, "Rejected", |e| matches!(e, TransportEvent::Rejected { code: codes::NO_NODE_ID, .. }))
            .await;
    assert_only_admitted(&before, None);
    let TransportEvent::Rejected { reason, peer, .. } = event else { unreachable!() };
    assert_eq!(peer, None);
    assert!(reason.contains("client-admin") && reason.contains("cannot join as a member"), "{reason}");
    assert!(server.peers().is_empty());
    server.shutdown().await;
}

/// `identity` dials the client API and sends a request; the server must refuse it with
/// `code` and never deliver the request.
async fn client_api_refuses(dir: &std::path::Path, identity: ClientIdentity, code: u32) {
    let (server, mut events) = node(dir, 0).await;
    match Client::connect(&identity, server.local_addr(), TIMEOUT).await {
        Ok(client) => {
            let asked = match client.request::<_, String>(&"submit".to_owned()).await {
                Ok(mut answers) => answers.next().await.map(|_| ()),
                Err(e) => Err(e),
            };
            let err = asked.expect_err("a refused client got an answer");
            assert!(matches!(err, ClientError::Refused { .. } | ClientError::Lost { .. }), "{err}");
        }
        Err(err) => assert!(matches!(err, ClientError::Connect { .. }), "{err}"),
    }
    let (_, before) = wait_rejected(&mut events, code).await;
    assert!(
        !before.iter().any(|e| matches!(e, TransportEvent::ClientRequest { .. } | TransportEvent::PeerUp { .. })),
        "a refused client got through: {before:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_node_certificate_cannot_use_the_client_api() {
    init_tracing();
    let dir = cluster(2);
    let node1 = identity(dir.path(), 1);
    let posing = ClientIdentity {
        name: "node-1".into(),
        cert_chain: node1.cert_chain,
        key: node1.key,
        ca_roots: node1.ca_roots,
    };
    client_api_refuses(dir.path(), posing, codes::NOT_A_CLIENT).await;
}

#[tokio::test]
async fn a_client_certificate_of_another_ca_is_refused() {
    init_tracing();
    let dir = cluster(1);
    let foreign = CertAuthority::new().expect("foreign CA");
    let now = SystemTime::now();
    let (cert, key) = foreign
        .issue_client_cert("admin", now - Duration::from_secs(60), now + Duration::from_secs(3600))
        .expect("issue");
    let ca = std::fs::read(dir.path().join("ca.pem")).expect("cluster ca");
    // It trusts the cluster CA (so it would verify the node): only the node's check stops it.
    let identity = ClientIdentity::from_pem(cert.as_bytes(), key.as_bytes(), &ca).expect("identity");
    client_api_refuses(dir.path(), identity, codes::HANDSHAKE_FAILED).await;
}

#[tokio::test]
async fn a_node_certificate_of_another_ca_cannot_submit() {
    init_tracing();
    let dir = cluster(1);
    let foreign = CertAuthority::new().expect("foreign CA");
    let node = issue(&foreign, 0, -60, 3600).identity(cluster_ca_root(dir.path()));
    let posing =
        ClientIdentity { name: "node-0".into(), cert_chain: node.cert_chain, key: node.key, ca_roots: node.ca_roots };
    client_api_refuses(dir.path(), posing, codes::HANDSHAKE_FAILED).await;
}

#[tokio::test]
async fn a_garbage_request_closes_the_client_with_the_codec_code() {
    init_tracing();
    let dir = cluster(1);
    let (server, mut events) = node(dir.path(), 0).await;
    let client = Client::connect(&client_identity(dir.path()), server.local_addr(), TIMEOUT).await.expect("connect");
    // A frame announcing more than the 1 MiB request limit.
    let mut garbage = ((2u32 << 20).to_le_bytes()).to_vec();
    garbage.extend_from_slice(&[1, 0, 0, 0]);
    let raw = client_raw_request(&client, &garbage).await;
    assert!(raw.is_err(), "a garbage request was answered: {raw:?}");
    let (_, before) = wait_rejected(&mut events, phalanx_transport::DecodeError::CODE_OVERSIZE).await;
    assert!(!before.iter().any(|e| matches!(e, TransportEvent::ClientRequest { .. })));
    server.shutdown().await;
}

/// Sends raw bytes as a request (bypassing the encoder) and reads the first answer.
async fn client_raw_request(client: &Client, bytes: &[u8]) -> Result<Option<String>, ClientError> {
    client.request_raw::<String>(bytes.to_vec()).await?.next().await
}
