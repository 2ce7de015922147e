//! A long-lived cluster runs job after job: three nodes embedded in this
//! process start without a job; jobs submitted at any member are forwarded to
//! the coordinator, queued first in first out, and end with the bits of
//! `phalanx::train`. A node leaving during a job, and the coordinator leaving
//! with one job running and one queued, lose neither; each node's scraped
//! `/metrics` counts the recovery with its cause and duration, as its
//! `recovered` event reports it, and the checkpoints it wrote.

use std::time::Duration;

mod common;

use phalanx::{JobConfig, NodeEvent, NodeEventKind, NodeHandle};

/// Bound on any wait: a hang fails the test.
const WAIT: Duration = Duration::from_secs(90);

async fn cluster(dir: &std::path::Path) -> Vec<NodeHandle> {
    // No waiting for the cluster to form: a submission made before there is a
    // coordinator waits for one.
    common::embedded_cluster(dir, |b| b.metrics("127.0.0.1:0".parse().unwrap())).await
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

/// Node `node`'s `/metrics`, scraped over HTTP.
async fn scrape(node: &NodeHandle) -> String {
    let addr = node.metrics_addr().expect("metrics served");
    tokio::task::spawn_blocking(move || common::scrape(addr)).await.unwrap()
}

/// The value of `series` in `text`, or a failure showing the text.
fn metric(text: &str, series: &str) -> f64 {
    common::metric(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

async fn expected(spec: JobConfig) -> String {
    let (job, report) = phalanx::train(spec, |_| {}).await.unwrap();
    phalanx::model_sha256(job.model.as_ref(), &report.outcome.params)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_submitted_at_any_member_run_in_order_to_the_bits_of_train_and_survive_a_lost_node() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path()).await;
    // Job a at a member (forwarded to node 0), job b at the coordinator: b waits for a.
    let a = nodes[1].submit(job(1)).await.expect("accepted");
    let mut a_events = a.progress();
    let b = nodes[0].submit(job(2)).await.expect("accepted");
    assert!(b.id() > a.id(), "ids follow acceptance");
    // A majority holds both (the coordinator among them), in order.
    let listed = nodes[0].jobs().await.unwrap();
    let ids: Vec<u64> = listed.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![a.id(), b.id()], "{listed:?}");
    let mut b_events = b.progress();
    let first = a.outcome().await.expect("job a finishes");
    assert_eq!(first.model_sha256, expected(job(1)).await);
    // Node 1, where job a was submitted, does not coordinate it: it shows the coordinator's
    // steps as `progress`, up to the last one (always reported).
    let last = wait_for(
        &mut a_events,
        |e| matches!(e.kind, NodeEventKind::Progress { step, total_steps, .. } if step == total_steps),
    )
    .await;
    assert!(matches!(last.kind, NodeEventKind::Progress { from: 0, .. }) && last.node == 1, "{last:?}");
    let summary = first.summary.expect("a summary");
    assert!(summary.to_string_lossy().contains(&format!("jobs/{}/summary.json", a.id())), "{summary:?}");
    // Job b started only once job a was over; a node leaves while it trains
    // (from its first step on: b's last step needs node 2's trainer, or its replacement).
    wait_for(&mut b_events, |e| matches!(e.kind, NodeEventKind::Step { .. })).await;
    nodes[2].shutdown().await.unwrap();
    // The coordinator moves node 2's trainer and shards once it is declared down.
    let recovered = wait_for(&mut b_events, |e| matches!(e.kind, NodeEventKind::Recovered { .. })).await;
    let NodeEventKind::Recovered { cause, actors, .. } = &recovered.kind else { unreachable!() };
    assert_eq!((recovered.node, cause.as_str()), (0, "node_lost"), "{recovered:?}");
    assert!(actors.contains(&"trainer 2".to_string()), "{recovered:?}");
    let second = b.outcome().await.expect("job b finishes without node 2");
    assert_eq!(second.model_sha256, expected(job(2)).await);
    // Every recovery event of job b is counted once, with its duration, by cause.
    let mut events = 1;
    loop {
        let e = wait_for(&mut b_events, |e| {
            matches!(e.kind, NodeEventKind::Recovered { .. } | NodeEventKind::JobDone { .. })
        })
        .await;
        match e.kind {
            NodeEventKind::Recovered { .. } => events += 1,
            _ => break,
        }
    }
    let text = scrape(&nodes[0]).await;
    let counted = metric(&text, "phalanx_recoveries_total{node=\"0\",cause=\"node_lost\"}");
    assert_eq!(counted, f64::from(events), "recovered events vs the metric:\n{text}");
    assert_eq!(metric(&text, "phalanx_recovery_duration_seconds_count{node=\"0\"}"), counted, "{text}");
    assert!(metric(&text, "phalanx_recovery_duration_seconds_sum{node=\"0\"}") > 0.0, "{text}");
    assert!(metric(&text, "phalanx_restarts_total{node=\"0\",cause=\"node_lost\"}") >= 2.0, "{text}");
    // Both jobs wrote checkpoints on the coordinator; none failed.
    assert!(metric(&text, "phalanx_checkpoint_duration_seconds_count{node=\"0\"}") >= 2.0, "{text}");
    assert!(!text.contains("phalanx_checkpoint_failures_total{"), "{text}");
    // Bytes by kind: parameters out to the trainers, gradients back, checkpoint copies to the replica.
    for series in [
        "phalanx_network_sent_bytes_total{node=\"0\",kind=\"params\"}",
        "phalanx_network_received_bytes_total{node=\"0\",kind=\"gradients\"}",
        "phalanx_network_sent_bytes_total{node=\"0\",kind=\"checkpoint\"}",
        "phalanx_network_sent_bytes_total{node=\"0\",kind=\"control\"}",
        "phalanx_network_sent_bytes_total{node=\"0\",kind=\"membership\"}",
    ] {
        assert!(metric(&text, series) > 0.0, "{series} in:\n{text}");
    }
    let replica = scrape(&nodes[1]).await;
    assert!(
        metric(&replica, "phalanx_network_received_bytes_total{node=\"1\",kind=\"checkpoint\"}") > 0.0,
        "{replica}"
    );
    for n in &nodes[..2] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_leaving_loses_neither_the_running_nor_the_queued_job() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path()).await;
    let mut events = nodes[1].events();
    // Long enough to be still running when node 0 is gone (a step takes well under a
    // millisecond here): the takeover must find it mid-way.
    let long = JobConfig { epochs: Some(200), ..job(3) };
    let running = nodes[1].submit(long.clone()).await.expect("accepted");
    let queued = nodes[2].submit(job(4)).await.expect("accepted");
    let id = running.id();
    wait_for(&mut events, |e| e.node == 1 && matches!(e.kind, NodeEventKind::Spawn { job, .. } if job == id)).await;
    // The coordinator (node 0, where the running job's aggregators are) goes away.
    nodes[0].shutdown().await.unwrap();
    let takeover = wait_for(&mut events, |e| matches!(e.kind, NodeEventKind::Coordinating { .. })).await;
    assert_eq!(takeover.node, 1, "node 1 takes over: {takeover:?}");
    // Training goes on under node 1: a recovery by takeover, timed from the view that made it coordinator.
    let recovered = wait_for(&mut events, |e| matches!(e.kind, NodeEventKind::Recovered { .. })).await;
    let NodeEventKind::Recovered { job: recovered_job, ref cause, .. } = recovered.kind else { unreachable!() };
    assert_eq!((recovered.node, recovered_job, cause.as_str()), (1, running.id(), "takeover"), "{recovered:?}");
    let first = running.outcome().await.expect("the running job finishes");
    assert_eq!(first.model_sha256, expected(long).await);
    let second = queued.outcome().await.expect("the queued job runs and finishes");
    assert_eq!(second.model_sha256, expected(job(4)).await);
    // The queued job started fresh under node 1: one takeover, not two.
    let text = scrape(&nodes[1]).await;
    assert_eq!(metric(&text, "phalanx_recoveries_total{node=\"1\",cause=\"takeover\"}"), 1.0, "{text}");
    assert_eq!(metric(&text, "phalanx_recovery_duration_seconds_count{node=\"1\"}"), 1.0, "{text}");
    assert!(metric(&text, "phalanx_checkpoint_duration_seconds_count{node=\"1\"}") >= 1.0, "{text}");
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
