//! The job registry of a cluster on a coordination service lives on the service: a job is
//! accepted once the service holds it (fenced by the coordinator's token), and a cluster that
//! loses every node — every process stops, every data directory is gone — finds its running
//! and queued jobs there when it starts again, runs them to the bits of `phalanx::train`, and
//! numbers new jobs after them; the service keeps each job's newest complete checkpoint and
//! where its copies are, and where its partitions are. On a real etcd and a real ZooKeeper, started here.

use std::path::Path;
use std::time::Duration;

use phalanx::cluster::coordination::servers::{LocalEtcd, LocalZooKeeper};
use phalanx::cluster::coordination::{Coordination, Member, Session, Settings};
use phalanx::cluster::registry::{AssignmentRecord, CheckpointRecord, JobEntry, JobState};
use phalanx::{JobConfig, NodeEventKind, NodeHandle};

mod common;

/// Bound on any wait: a hang fails the test.
const WAIT: Duration = Duration::from_secs(120);

/// Three nodes embedded in this process, on `spec`, with nothing of an earlier cluster: new
/// certificates, ports and data directories under `dir`.
async fn cluster(dir: &Path, spec: &Coordination) -> Vec<NodeHandle> {
    common::embedded_cluster(dir, |b| b.coordination(spec.clone()).coordination_ttl_ms(1000)).await
}

fn job(seed: u64, epochs: u32) -> JobConfig {
    JobConfig { seed, epochs: Some(epochs), trainers: 3, ..JobConfig::default() }
}

async fn expected(spec: JobConfig) -> String {
    let (job, report) = phalanx::train(spec, |_| {}).await.unwrap();
    phalanx::model_sha256(job.model.as_ref(), &report.outcome.params)
}

async fn survives_the_whole_cluster(spec: Coordination) {
    let (long, short) = (job(11, 300), job(12, 20));
    let first = tempfile::tempdir().unwrap();
    let nodes = cluster(first.path(), &spec).await;
    // Accepted: the service holds both (running, or waiting for a slot).
    let a = nodes[1].submit(long.clone()).await.expect("accepted");
    let b = nodes[2].submit(short.clone()).await.expect("accepted");
    assert!(b.id() > a.id());
    // Every node goes, and everything it had on disk with it.
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
    drop(first);

    // A new cluster on the same service.
    let second = tempfile::tempdir().unwrap();
    let nodes = cluster(second.path(), &spec).await;
    let mut events = nodes[0].events();
    let c = nodes[0].submit(job(13, 20)).await.expect("accepted");
    assert!(c.id() > b.id(), "ids go on after the jobs the service kept: {} after {}", c.id(), b.id());
    let mut finished = std::collections::BTreeMap::new();
    while finished.len() < 3 {
        let e = common::wait_for_event(
            &mut events,
            WAIT,
            |e| matches!(&e.kind, NodeEventKind::JobState { state, .. } if state != "queued" && state != "running"),
        )
        .await;
        let NodeEventKind::JobState { job, state, model_sha256, error, .. } = e.kind else { unreachable!() };
        assert_eq!(state, "finished", "job {job}: {error:?}");
        finished.insert(job, model_sha256.unwrap());
    }
    assert_eq!(finished[&a.id()], expected(long).await, "the job that was running");
    assert_eq!(finished[&b.id()], expected(short).await, "the job that was queued");
    assert_eq!(finished[&c.id()], expected(job(13, 20)).await);
    // The new cluster trained them: their outputs are in its own directory.
    for id in [a.id(), b.id()] {
        let summary = second.path().join("out").join("jobs").join(id.to_string()).join("summary.json");
        assert!(summary.is_file(), "{summary:?}");
    }
    let listed = nodes[1].jobs().await.unwrap();
    assert_eq!(listed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![a.id(), b.id(), c.id()], "{listed:?}");
    for n in &nodes {
        n.shutdown().await.unwrap();
    }

    // What the service keeps once every node has stopped (in order): each job's last state, and
    // its newest complete checkpoint with the nodes that hold all of it — the coordinator (node
    // 0) among them.
    let reader = Member { id: 0, incarnation: 1, addr: "127.0.0.1:9".into() };
    let settings = Settings { ttl: Duration::from_secs(2), join_timeout: Duration::from_secs(10), tls: None };
    let (session, _events) = Session::join(&spec, reader, settings).await.unwrap();
    for (id, sha) in &finished {
        let entry: JobEntry =
            serde_json::from_slice(&session.get(&format!("jobs/{id}")).await.unwrap().unwrap()).unwrap();
        assert_eq!(entry.state, JobState::Finished { model_sha256: sha.clone(), summary: entry_summary(&entry) });
        let record = session.get(&format!("checkpoints/{id}")).await.unwrap().expect("a checkpoint record");
        let record: CheckpointRecord = serde_json::from_slice(&record).unwrap();
        assert!(record.step > 0 && record.copies.contains(&0), "job {id}: {record:?}");
        // Where its partitions were: every one on a node of the cluster, each node with some.
        let record = session.get(&format!("assignments/{id}")).await.unwrap().expect("an assignment record");
        let record: AssignmentRecord = serde_json::from_slice(&record).unwrap();
        assert_eq!(record.partitions.len(), phalanx::config::DEFAULT_PARTITIONS as usize, "job {id}: {record:?}");
        let nodes: std::collections::BTreeSet<u32> = record.partitions.iter().copied().collect();
        assert_eq!(nodes, [0, 1, 2].into_iter().collect(), "job {id}: {record:?}");
    }
    session.leave().await.unwrap();
}

fn entry_summary(entry: &JobEntry) -> Option<String> {
    match &entry.state {
        JobState::Finished { summary, .. } => summary.clone(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_accepted_on_etcd_survive_the_whole_cluster() {
    let etcd = LocalEtcd::start(1, None).await.unwrap();
    survives_the_whole_cluster(etcd.spec("/phalanx/registry")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_accepted_on_zookeeper_survive_the_whole_cluster() {
    let zookeeper = LocalZooKeeper::start(None).await.unwrap();
    survives_the_whole_cluster(zookeeper.spec("/phalanx/registry")).await;
}
