//! The small real jobs the simulation campaigns run.

use phalanx::{JobConfig, PreparedJob};
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;

use crate::invariants::Expected;

/// A job for the simulation and what its fault-free run produces.
pub struct SimJob {
    /// The job's config (what a node is given).
    pub config: JobConfig,
    /// The job.
    pub job: PreparedJob,
    /// Its fault-free result.
    pub expected: Expected,
}

/// Three small jobs covering every model family, several trainers and
/// aggregators, and checkpoints every few steps.
pub fn campaign_jobs() -> Vec<SimJob> {
    let configs = [
        JobConfig {
            model: ModelKind::Softmax.into(),
            dataset: DatasetSource::Iris,
            partitions: 4,
            trainers: 2,
            aggregators: Some(2),
            epochs: Some(3),
            batch_size: Some(16),
            checkpoint_every: 5,
            checkpoint_min_interval_ms: 0,
            ..JobConfig::default()
        },
        JobConfig {
            model: ModelKind::Linear.into(),
            dataset: DatasetSource::Diabetes,
            partitions: 5,
            trainers: 3,
            aggregators: Some(1),
            epochs: Some(2),
            batch_size: Some(32),
            checkpoint_every: 4,
            checkpoint_min_interval_ms: 0,
            ..JobConfig::default()
        },
        JobConfig {
            model: ModelKind::Mlp.into(),
            dataset: DatasetSource::Winequality,
            hidden: 8,
            partitions: 4,
            trainers: 2,
            aggregators: Some(3),
            epochs: Some(1),
            batch_size: Some(128),
            checkpoint_every: 3,
            checkpoint_min_interval_ms: 0,
            ..JobConfig::default()
        },
    ];
    configs
        .into_iter()
        .map(|c| {
            let job = PreparedJob::new(c.clone()).expect("campaign job config is valid");
            let reference = job.reference_params().expect("plain loop runs");
            let expected = Expected {
                model_sha256: phalanx::model_sha256(job.model.as_ref(), &reference),
                params_sha256: phalanx::params_sha256(&reference),
                partition_sizes: job.partitions.sizes(),
                epochs: job.schedule.epochs,
            };
            SimJob { config: c, job, expected }
        })
        .collect()
}
