//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cluster;

use std::time::Duration;

use phalanx::{JobConfig, PreparedJob, TrainReport};
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;

/// A bound on any single job in the tests: a hang fails the test instead of CI.
pub const JOB_BOUND: Duration = Duration::from_secs(120);

/// A small job of each model family on a real dataset.
pub fn job(model: ModelKind) -> JobConfig {
    let (dataset, epochs) = match model {
        ModelKind::Linear => (DatasetSource::Diabetes, 10),
        ModelKind::Softmax => (DatasetSource::Iris, 10),
        ModelKind::Mlp => (DatasetSource::Winequality, 3),
    };
    JobConfig { model, dataset, epochs: Some(epochs), checkpoint_every: 10, seed: 7, ..JobConfig::default() }
}

/// Prepare and run a job on actors, with a temporary checkpoint directory.
pub async fn run(config: JobConfig) -> Result<(PreparedJob, TrainReport), phalanx::Error> {
    let dir = tempfile::tempdir().expect("temp dir");
    run_in(config, dir.path(), false).await
}

/// Prepare and run a job checkpointing into `dir`.
pub async fn run_in(
    config: JobConfig,
    dir: &std::path::Path,
    resume: bool,
) -> Result<(PreparedJob, TrainReport), phalanx::Error> {
    let job = PreparedJob::new(config)?;
    let report = tokio::time::timeout(JOB_BOUND, phalanx::job::run(&job, dir, resume, |_| {}))
        .await
        .expect("job finished within the bound")?;
    Ok((job, report))
}

/// SHA-256 of the final parameters.
pub fn sha(report: &TrainReport) -> String {
    phalanx::params_sha256(&report.outcome.params)
}

/// Every partition applied exactly its size in every epoch.
pub fn assert_exactly_once(job: &PreparedJob, report: &TrainReport) {
    let sizes = job.partitions.sizes();
    assert_eq!(report.outcome.ledger.len() as u32, job.schedule.epochs, "one ledger entry per epoch");
    for (epoch, applied) in &report.outcome.ledger {
        assert_eq!(applied, &sizes, "epoch {epoch}: samples applied per partition vs partition sizes");
    }
}
