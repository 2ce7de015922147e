//! A poison partition exhausts the restart budget and fails the job with an
//! error naming the actor, its partitions and the step — no endless loop,
//! no hang.

mod common;

use common::{job, run};
use phalanx::JobConfig;
use phalanx_actors::model::ModelKind;

async fn poisoned(spec: &str) -> String {
    let config = JobConfig { fail: vec![spec.parse().unwrap()], max_restarts: 3, ..job(ModelKind::Softmax) };
    match run(config).await {
        Ok(_) => panic!("{spec}: a poison step must fail the job"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_shard_fails_the_job_naming_partition_and_step() {
    let e = poisoned("shard:2@12x*").await;
    assert!(e.contains("shard 2 (partition 2)"), "{e}");
    assert!(e.contains("failed 4 times"), "{e}");
    assert!(e.contains("injected fault shard:2@12x*"), "{e}");
    assert!(e.contains("at step 12"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_trainer_fails_the_job_naming_its_partitions() {
    let e = poisoned("trainer:1@5x*").await;
    assert!(e.contains("trainer 1 (partitions 4, 5, 6, 7)"), "{e}");
    assert!(e.contains("at step 5"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_aggregator_fails_the_job_naming_its_parameter_range() {
    let e = poisoned("aggregator@21x*").await;
    assert!(e.contains("aggregator 0 (parameters 0..15)"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_within_the_budget_do_not_escalate() {
    let config = JobConfig { fail: vec!["shard:2@12x3".parse().unwrap()], max_restarts: 3, ..job(ModelKind::Softmax) };
    let (_, report) = run(config).await.unwrap();
    assert_eq!(report.outcome.faults.len(), 3);
}
