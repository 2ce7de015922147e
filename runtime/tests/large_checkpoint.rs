//! A 100 MiB checkpoint copy causes no false failure detection: three nodes in this process
//! (a 2-thread runtime, as on a 2-core machine) train a model of 26 Mi parameters (100 MiB of
//! f32, plain SGD: the checkpoint file is that size), checkpointing every step, so every step
//! sends a 100 MiB copy from the coordinator to its replica over QUIC, where it is decoded,
//! written, fsynced and verified. The copies share the connection with the heartbeats (500 ms
//! failure timeout), and the replica's work shares the process with the node loops; all of it
//! stays off the loops, so no node is declared down, and every copy is acknowledged.

mod common;

use std::time::Duration;

use common::wide::{start_nodes, Failures, Wide};
use phalanx::{JobConfig, TaskKind};
use phalanx_actors::optim::OptimizerKind;

/// 100 MiB of f32.
const WIDE: Wide = Wide { params: 100 << 18, step: Duration::ZERO };

fn job() -> JobConfig {
    JobConfig {
        model: "wide".parse().unwrap(),
        dataset: "plane".parse().unwrap(),
        task: Some(TaskKind::Regression),
        // One trainer beside the aggregator: the only large traffic is the checkpoint copies.
        trainers: 1,
        // One range of θ (the default on a cluster is one per node): one 100 MiB file a step.
        aggregators: Some(1),
        partitions: 1,
        batch_size: Some(32),
        epochs: Some(4),
        optimizer: OptimizerKind::Sgd,
        checkpoint_every: 1,
        checkpoint_min_interval_ms: 0,
        ..JobConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_checkpoint_copy_causes_no_false_failure_detection() {
    let (dir, nodes) = start_nodes(3, || WIDE.registries("wide", 32)).await;
    let failures = Failures::watch(&nodes);
    let job = nodes[0].submit(job()).await.expect("accepted");
    let result =
        tokio::time::timeout(Duration::from_secs(300), job.outcome()).await.expect("bounded").expect("finishes");

    let downs = failures.seen();
    assert!(downs.is_empty(), "false failure detection during 100 MiB checkpoint copies: {downs:?}");
    // The copies really went: the replica acknowledged every checkpoint's.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(result.summary.expect("summary written")).unwrap()).unwrap();
    let acknowledged = summary["replication"]["copies_acknowledged"].as_u64().unwrap_or(0);
    assert!(acknowledged >= 3, "100 MiB copies acknowledged: {}", summary["replication"]);
    let checkpoints = dir.path().join("data-1").join("jobs").join(result.id.to_string()).join("checkpoints");
    let copies: Vec<_> = std::fs::read_dir(&checkpoints)
        .map(|d| d.flatten().filter(|e| e.metadata().is_ok_and(|m| m.len() >= 100 << 20)).collect())
        .unwrap_or_default();
    assert!(!copies.is_empty(), "a 100 MiB copy on the replica in {}", checkpoints.display());
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}
