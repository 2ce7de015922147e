//! The embedding API: three nodes started with `Node::builder()` in this one
//! process (each with its own events, metrics and actor names), one of them
//! with its identity given as PEM bytes in memory, train a job to the same
//! bits as `phalanx::train`; their typed events stream in order; `/metrics`
//! is scraped over real HTTP while the job runs; shutdown returns and says
//! `stopped`.

use std::io::{Read, Write};
use std::time::Duration;

mod common;

use phalanx::{JobConfig, Node, NodeEvent, NodeEventKind, NodeHandle};
use phalanx_transport::certs::NodeIdentity;

/// Bound on any wait: a hang fails the test.
const WAIT: Duration = Duration::from_secs(60);

fn job() -> JobConfig {
    JobConfig { epochs: Some(30), trainers: 3, ..JobConfig::default() }
}

/// `GET /metrics` over a plain TCP connection.
fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics server");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

async fn wait_for(
    events: &mut (impl tokio_stream::Stream<Item = NodeEvent> + Unpin),
    want: impl Fn(&NodeEvent) -> bool,
) -> NodeEvent {
    common::wait_for_event(events, WAIT, want).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_embedded_nodes_train_to_the_bits_of_train_and_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    phalanx_transport::certs::generate(&certs, 3).unwrap();
    let ports = common::free_udp_ports(3);
    let addr = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], ports[i]));
    let out = dir.path().join("out");
    let mut nodes: Vec<NodeHandle> = Vec::new();
    let mut streams = Vec::new();
    for i in 0..3u32 {
        let seeds = (0..3).filter(|j| *j != i as usize).map(addr).collect();
        let mut builder = Node::builder()
            .id(i)
            .listen(addr(i as usize))
            .seeds(seeds)
            .data_dir(dir.path().join(format!("data-{i}")))
            .job(job())
            .out(&out)
            .metrics("127.0.0.1:0".parse().unwrap());
        builder = if i == 2 {
            let read = |name: &str| std::fs::read(certs.join(name)).unwrap();
            let identity =
                NodeIdentity::from_pem(2, &read("node-2/node.pem"), &read("node-2/node.key"), &read("ca.pem")).unwrap();
            builder.identity(identity)
        } else {
            builder.certs_dir(&certs)
        };
        let node = builder.start().await.expect("node starts");
        // Subscribed before the last member starts: the job (which waits for
        // every member) cannot have begun yet.
        streams.push(node.events());
        nodes.push(node);
    }
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!((n.id(), n.local_addr()), (i as u32, addr(i)));
    }
    let mut streams = streams.into_iter();
    let (mut events0, mut events1) = (streams.next().unwrap(), streams.next().unwrap());

    // Training runs: node 0 coordinates; scrape its metrics mid-job.
    wait_for(&mut events0, |e| matches!(e.kind, NodeEventKind::Step { step, .. } if step >= 40)).await;
    let metrics = nodes[0].metrics_addr().expect("metrics served");
    let text = tokio::task::spawn_blocking(move || scrape(metrics)).await.unwrap();
    assert!(text.contains("phalanx_build_info"), "{text}");
    assert!(text.contains("phalanx_members{node=\"0\"} 3"), "{text}");
    assert!(!text.contains("phalanx_steps_applied_total{node=\"0\"} 0\n"), "steps are counted: {text}");

    let done = wait_for(&mut events1, |e| matches!(e.kind, NodeEventKind::JobDone { .. })).await;
    let NodeEventKind::JobDone { model_sha256, from, .. } = done.kind else { unreachable!() };
    assert_eq!(from, 0, "node 0 coordinated");
    let (prepared, reference) = phalanx::train(job(), |_| {}).await.unwrap();
    assert_eq!(model_sha256, phalanx::model_sha256(prepared.model.as_ref(), &reference.outcome.params));
    let steps = reference.outcome.losses.keys().max().copied().unwrap_or(0);
    assert!(steps > 0);
    // Every step the coordinator applied is counted in its own registry, none in the others'.
    let own = nodes[0].metrics().encode();
    assert!(own.contains("phalanx_takeovers_total{node=\"0\",kind=\"scratch\"} 1"), "{own}");
    let other = nodes[1].metrics().encode();
    assert!(other.contains("phalanx_steps_applied_total{node=\"1\"} 0"), "{other}");

    // Graceful shutdown: each returns, and says so on its stream.
    for n in &nodes {
        let mut events = n.events();
        n.shutdown().await.expect("clean shutdown");
        wait_for(&mut events, |e| matches!(e.kind, NodeEventKind::Stopped)).await;
        n.shutdown().await.expect("shutdown is idempotent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_start_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    phalanx_transport::certs::generate(&certs, 2).unwrap();
    // Node 1's certificate given to node 0.
    let e = Node::builder().id(0).certs_dir(&certs).nodes(2).identity({
        let read = |name: &str| std::fs::read(certs.join(name)).unwrap();
        NodeIdentity::from_pem(1, &read("node-1/node.pem"), &read("node-1/node.key"), &read("ca.pem")).unwrap()
    });
    let err = e.start().await.unwrap_err().to_string();
    assert!(err.contains("identity") && err.contains("node 1") && err.contains("node 0"), "{err}");
    // No identity at all.
    let err = Node::builder().id(0).start().await.unwrap_err().to_string();
    assert!(err.contains("certs"), "{err}");
    // The address is taken.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let err = Node::builder()
        .id(0)
        .nodes(2)
        .certs_dir(&certs)
        .listen(taken.local_addr().unwrap())
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("listen"), "{err}");
}
