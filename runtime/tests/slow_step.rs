//! A training step of two seconds causes no false failure detection: three nodes in this
//! process (a 2-thread runtime, as on a 2-core machine) train a user model whose every
//! gradient takes 2 s of CPU. The trainers would hold every tokio worker for the whole
//! step, and with them the node loops and their heartbeats (500 ms failure timeout), if the
//! computation ran on the workers; it runs off them, so no node is declared down and the job
//! finishes. (Its bits are the plain loop's like any job's: not recomputed here, where every
//! gradient costs 2 s.)

mod common;

use std::time::Duration;

use common::wide::{start_nodes, Failures, Wide};
use phalanx::{JobConfig, PreparedJob, TaskKind};

/// A model large enough to count as one (see `phalanx_actors::actor::OFFLOAD_PARAMS`) whose
/// every gradient takes 2 s.
const SLOW: Wide = Wide { params: 1 << 17, step: Duration::from_secs(2) };

fn job() -> JobConfig {
    JobConfig {
        model: "slow".parse().unwrap(),
        dataset: "plane".parse().unwrap(),
        task: Some(TaskKind::Regression),
        trainers: 3,
        partitions: 3,
        // Two or three steps; each trainer computes 2 s per step.
        batch_size: Some(32),
        epochs: Some(1),
        checkpoint_every: 0,
        ..JobConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_second_step_causes_no_false_failure_detection() {
    let (_dir, nodes) = start_nodes(3, || SLOW.registries("slow", 96)).await;
    let failures = Failures::watch(&nodes);
    let job = nodes[0].submit(job()).await.expect("accepted");
    let result =
        tokio::time::timeout(Duration::from_secs(120), job.outcome()).await.expect("bounded").expect("finishes");

    let (models, data) = SLOW.registries("slow", 96);
    let prepared = PreparedJob::with_registries(self::job(), &models, &data).expect("job");
    assert!(prepared.schedule.steps_per_epoch >= 2, "several long steps");
    assert_eq!(result.model_sha256.len(), 64);

    // The job is over and every node still up: nothing was declared down while it ran.
    let downs = failures.seen();
    assert!(downs.is_empty(), "false failure detection during 2 s steps: {downs:?}");
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}
