//! A run that survives injected trainer, shard and aggregator failures ends
//! with the same parameter bits as the fault-free run, and applies every
//! sample exactly once.

mod common;

use common::{assert_exactly_once, job, run, sha};
use phalanx::JobConfig;
use phalanx_actors::model::ModelKind;

async fn faulty_run_matches_fault_free(model: ModelKind, trainers: u32, aggregators: u32) {
    let clean = job(model);
    let (_, reference) = run(clean.clone()).await.unwrap();
    assert!(reference.outcome.faults.is_empty());
    let total = {
        let j = phalanx::PreparedJob::new(clean.clone()).unwrap();
        j.schedule.total_steps()
    };
    let faults = vec![
        format!("trainer:1@{}", total / 5).parse().unwrap(),
        format!("shard:2@{}", total / 3).parse().unwrap(),
        format!("aggregator@{}", total / 2 + 3).parse().unwrap(),
        format!("aggregator:{}@{}", aggregators - 1, total * 4 / 5 + 1).parse().unwrap(),
    ];
    let faulty = JobConfig { trainers, aggregators: Some(aggregators), fail: faults, ..clean };
    let (job, report) = run(faulty).await.unwrap();
    assert_eq!(sha(&report), sha(&reference), "{model}: faulty run must end bit-identical to the fault-free run");
    assert_exactly_once(&job, &report);
    let faults = &report.outcome.faults;
    assert_eq!(faults.len(), 4, "{faults:?}");
    for f in faults {
        assert!(f.recovery_ms.is_some(), "every failure recovered: {f:?}");
        assert!(f.reason.contains("injected fault"), "{f:?}");
    }
    let rollbacks = faults.iter().filter(|f| f.rolled_back_to.is_some()).count();
    assert_eq!(rollbacks, 2, "both aggregator failures rolled back to a checkpoint");
    assert_eq!(report.outcome.generation, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linear_regression_survives_failures_bit_identically() {
    faulty_run_matches_fault_free(ModelKind::Linear, 2, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn softmax_regression_survives_failures_bit_identically() {
    faulty_run_matches_fault_free(ModelKind::Softmax, 4, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlp_survives_failures_bit_identically() {
    faulty_run_matches_fault_free(ModelKind::Mlp, 3, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_of_one_trainer_within_the_budget_still_match() {
    let clean = job(ModelKind::Softmax);
    let (_, reference) = run(clean.clone()).await.unwrap();
    let faulty = JobConfig { fail: vec!["trainer:0@15x4".parse().unwrap(), "shard:7@16x3".parse().unwrap()], ..clean };
    let (job, report) = run(faulty).await.unwrap();
    assert_eq!(sha(&report), sha(&reference));
    assert_exactly_once(&job, &report);
    assert_eq!(report.outcome.faults.len(), 7);
}
