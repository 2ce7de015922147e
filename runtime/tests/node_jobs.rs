//! A long-lived cluster runs job after job: three nodes embedded in this
//! process start without a job; jobs submitted at any member are forwarded to
//! the coordinator, queued first in first out, and end with the bits of
//! `phalanx::train`. A node leaving during a job, and the coordinator leaving
//! with one job running and one queued, lose neither.

use std::time::Duration;

mod common;

use phalanx::{JobConfig, Node, NodeEvent, NodeEventKind, NodeHandle};

/// Bound on any wait: a hang fails the test.
const WAIT: Duration = Duration::from_secs(90);

async fn cluster(dir: &std::path::Path) -> Vec<NodeHandle> {
    let certs = dir.join("certs");
    phalanx_transport::certs::generate(&certs, 3).unwrap();
    let ports = common::free_udp_ports(3);
    let addr = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], ports[i]));
    let mut nodes = Vec::new();
    for i in 0..3u32 {
        let seeds = (0..3).filter(|j| *j != i as usize).map(addr).collect();
        let node = Node::builder()
            .id(i)
            .listen(addr(i as usize))
            .seeds(seeds)
            .certs_dir(&certs)
            .data_dir(dir.join(format!("data-{i}")))
            .out(dir.join("out"))
            .start()
            .await
            .expect("node starts");
        nodes.push(node);
    }
    // No waiting for the cluster to form: a submission made before there is a
    // coordinator waits for one.
    nodes
}

async fn wait_for(
    events: &mut (impl tokio_stream::Stream<Item = NodeEvent> + Unpin),
    want: impl Fn(&NodeEvent) -> bool,
) -> NodeEvent {
    common::wait_for_event(events, WAIT, want).await
}

fn job(seed: u64) -> JobConfig {
    JobConfig { seed, epochs: Some(40), trainers: 3, ..JobConfig::default() }
}

async fn expected(spec: JobConfig) -> String {
    let (_, report) = phalanx::train(spec, |_| {}).await.unwrap();
    phalanx::params_sha256(&report.outcome.params)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_submitted_at_any_member_run_in_order_to_the_bits_of_train_and_survive_a_lost_node() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path()).await;
    // Job a at a member (forwarded to node 0), job b at the coordinator: b waits for a.
    let a = nodes[1].submit(job(1)).await.expect("accepted");
    let b = nodes[0].submit(job(2)).await.expect("accepted");
    assert!(b.id() > a.id(), "ids follow acceptance");
    // A majority holds both (the coordinator among them), in order.
    let listed = nodes[0].jobs().await.unwrap();
    let ids: Vec<u64> = listed.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![a.id(), b.id()], "{listed:?}");
    let mut b_events = b.progress();
    let first = a.outcome().await.expect("job a finishes");
    assert_eq!(first.model_sha256, expected(job(1)).await);
    let summary = first.summary.expect("a summary");
    assert!(summary.to_string_lossy().contains(&format!("jobs/{}/summary.json", a.id())), "{summary:?}");
    // Job b started only once job a was over; a node leaves while it trains.
    wait_for(&mut b_events, |e| matches!(e.kind, NodeEventKind::Step { step, .. } if step >= 100)).await;
    nodes[2].shutdown().await.unwrap();
    let second = b.outcome().await.expect("job b finishes without node 2");
    assert_eq!(second.model_sha256, expected(job(2)).await);
    for n in &nodes[..2] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_leaving_loses_neither_the_running_nor_the_queued_job() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path()).await;
    let running = nodes[1].submit(job(3)).await.expect("accepted");
    let queued = nodes[2].submit(job(4)).await.expect("accepted");
    let mut events = nodes[1].events();
    wait_for(&mut events, |e| e.node == 1 && matches!(e.kind, NodeEventKind::Spawn { .. })).await;
    // The coordinator (node 0, where the running job's aggregators are) goes away.
    nodes[0].shutdown().await.unwrap();
    let takeover = wait_for(&mut events, |e| matches!(e.kind, NodeEventKind::Coordinating { .. })).await;
    assert_eq!(takeover.node, 1, "node 1 takes over: {takeover:?}");
    let first = running.outcome().await.expect("the running job finishes");
    assert_eq!(first.model_sha256, expected(job(3)).await);
    let second = queued.outcome().await.expect("the queued job runs and finishes");
    assert_eq!(second.model_sha256, expected(job(4)).await);
    for n in &nodes[1..] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_job_spec_is_refused_with_the_field_before_it_reaches_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path()).await;
    let bad = JobConfig { partitions: 0, ..JobConfig::default() };
    let err = nodes[1].submit(bad).await.unwrap_err().to_string();
    assert!(err.contains("partitions"), "{err}");
    assert!(nodes[0].jobs().await.unwrap().is_empty(), "nothing was queued");
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}
