//! What a run leaves behind: `summary.json` and `model.safetensors`.
//!
//! `model_sha256` is the SHA-256 of the final parameters as little-endian
//! f32 bytes in flat order — the tensors of `model.safetensors` concatenated
//! in the order its `param_order` metadata lists (see [`crate::job::params_sha256`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use phalanx_actors::protocol::FaultRecord;
use serde::Serialize;

use crate::error::Error;
use crate::job::{params_sha256, Metric, PreparedJob, TrainReport};

/// Samples applied in one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EpochSamples {
    /// The epoch.
    pub epoch: u64,
    /// Samples applied in it, all partitions.
    pub total: u64,
    /// Samples applied per partition.
    pub per_partition: Vec<u64>,
    /// True when every partition applied exactly its size.
    pub exactly_once: bool,
}

/// One fault in `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultSummary {
    /// What failed, e.g. `trainer 1`.
    pub what: String,
    /// The role (`trainer`, `shard`, `aggregator`).
    pub role: String,
    /// Its index.
    pub index: u32,
    /// Global step when it failed.
    pub step: u64,
    /// Why it failed.
    pub reason: String,
    /// Milliseconds until the replacement was running.
    pub restart_ms: Option<u64>,
    /// Milliseconds until training progressed again.
    pub recovery_ms: Option<u64>,
    /// Aggregator failures: the checkpoint step the job rolled back to.
    pub rolled_back_to: Option<u64>,
}

impl From<&FaultRecord> for FaultSummary {
    fn from(f: &FaultRecord) -> Self {
        Self {
            what: f.actor.to_string(),
            role: f.actor.role.to_string(),
            index: f.actor.index,
            step: f.step,
            reason: f.reason.clone(),
            restart_ms: f.restart_ms,
            recovery_ms: f.recovery_ms,
            rolled_back_to: f.rolled_back_to,
        }
    }
}

/// The contents of `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Steps run.
    pub steps: u64,
    /// Epochs run.
    pub epochs: u32,
    /// Steps per epoch.
    pub steps_per_epoch: u32,
    /// Mean training loss of the final parameters.
    pub final_loss: f64,
    /// Held-out quality.
    pub metric: Metric,
    /// SHA-256 of the final parameters (see the module docs).
    pub model_sha256: String,
    /// Number of parameters.
    pub num_params: usize,
    /// Per epoch, samples applied (exactly-once ledger).
    pub samples_applied: Vec<EpochSamples>,
    /// Size of every partition.
    pub partition_sizes: Vec<u64>,
    /// Every failure and its recovery.
    pub faults: Vec<FaultSummary>,
    /// Rollbacks to a checkpoint.
    pub rollbacks: u64,
    /// Checkpoints that could not be written (e.g. a full disk); training went
    /// on and the previous complete checkpoint stayed the rollback point.
    pub checkpoint_failures: Vec<phalanx_actors::actor::CheckpointFailure>,
    /// The job.
    pub job: JobEcho,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Training samples applied per second of wall time.
    pub samples_per_sec: f64,
    /// Mean loss per step (by the version it produced).
    pub loss_history: Vec<(u64, f64)>,
}

/// The job as it ran.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobEcho {
    /// Model family.
    pub model: String,
    /// Dataset.
    pub dataset: String,
    /// Partitions.
    pub partitions: u32,
    /// Trainers.
    pub trainers: u32,
    /// Aggregators.
    pub aggregators: u32,
    /// Seed.
    pub seed: u64,
    /// Global batch size.
    pub batch_size: u32,
    /// Optimizer.
    pub optimizer: String,
    /// Learning rate.
    pub learning_rate: f32,
    /// Hash of the math-relevant config (checkpoints carry it).
    pub config_hash: String,
}

impl Summary {
    /// Summarise a finished run.
    pub fn new(job: &PreparedJob, report: &TrainReport) -> Self {
        let sizes = job.partitions.sizes();
        let samples_applied = (0..u64::from(job.schedule.epochs))
            .map(|e| {
                let per = report.outcome.ledger.get(&e).cloned().unwrap_or_else(|| vec![0; sizes.len()]);
                EpochSamples { epoch: e, total: per.iter().sum(), exactly_once: per == sizes, per_partition: per }
            })
            .collect::<Vec<_>>();
        let applied: u64 = samples_applied.iter().map(|e| e.total).sum();
        let secs = report.duration.as_secs_f64().max(1e-9);
        Self {
            steps: job.schedule.total_steps(),
            epochs: job.schedule.epochs,
            steps_per_epoch: job.schedule.steps_per_epoch,
            final_loss: report.evaluation.final_loss,
            metric: report.evaluation.metric.clone(),
            model_sha256: params_sha256(&report.outcome.params),
            num_params: report.outcome.params.len(),
            samples_applied,
            partition_sizes: sizes,
            faults: report.outcome.faults.iter().map(FaultSummary::from).collect(),
            rollbacks: report.outcome.rollbacks,
            checkpoint_failures: report.outcome.checkpoint_failures.clone(),
            job: JobEcho {
                model: job.config.model.to_string(),
                dataset: job.config.dataset.to_string(),
                partitions: job.config.partitions,
                trainers: job.config.trainers,
                aggregators: job.config.aggregators,
                seed: job.config.seed,
                batch_size: job.resolved.batch_size,
                optimizer: job.config.optimizer.to_string(),
                learning_rate: job.resolved.learning_rate,
                config_hash: job.config_hash.clone(),
            },
            duration_ms: report.duration.as_millis() as u64,
            samples_per_sec: applied as f64 / secs,
            loss_history: report.outcome.losses.iter().map(|(s, l)| (*s, *l)).collect(),
        }
    }
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(format!(
        ".tmp-{}-{}",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// Add (or replace) top-level `fields` of `dir/summary.json`, atomically.
pub fn patch_summary(
    dir: &Path,
    fields: impl IntoIterator<Item = (String, serde_json::Value)>,
) -> Result<serde_json::Value, Error> {
    let path = dir.join("summary.json");
    let text = std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let mut summary: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::Encode { what: path.display().to_string(), reason: e.to_string() })?;
    if let Some(map) = summary.as_object_mut() {
        map.extend(fields);
    }
    let bytes = serde_json::to_vec_pretty(&summary)
        .map_err(|e| Error::Encode { what: path.display().to_string(), reason: e.to_string() })?;
    write_atomic(&path, &bytes)?;
    Ok(summary)
}

/// Write `summary.json` and `model.safetensors` into `dir`.
pub fn write_outputs(dir: &Path, job: &PreparedJob, report: &TrainReport) -> Result<Summary, Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let summary = Summary::new(job, report);
    let json = serde_json::to_vec_pretty(&summary).expect("summary serialises");
    write_atomic(&dir.join("summary.json"), &json)?;
    write_atomic(&dir.join("model.safetensors"), &model_safetensors(job, &report.outcome.params, &summary)?)?;
    Ok(summary)
}

/// The final parameters as a safetensors file: one tensor per layer, with
/// metadata naming the flat order, the hash and the feature scaling.
pub fn model_safetensors(job: &PreparedJob, params: &[f32], summary: &Summary) -> Result<Vec<u8>, Error> {
    use safetensors::tensor::{Dtype, TensorView};
    let layout = job.model.layout();
    let bytes: Vec<Vec<u8>> = layout
        .iter()
        .map(|t| {
            let n: usize = t.shape.iter().product();
            params[t.offset..t.offset + n].iter().flat_map(|v| v.to_le_bytes()).collect()
        })
        .collect();
    let mut views = Vec::new();
    for (t, b) in layout.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), b)
            .map_err(|e| Error::Encode { what: format!("model tensor {}", t.name), reason: e.to_string() })?;
        views.push((t.name.clone(), view));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), crate::predict::MODEL_FORMAT.to_string());
    meta.insert("model".to_string(), job.config.model.to_string());
    meta.insert("model_spec".to_string(), serde_json::to_string(job.model.spec()).expect("a spec serialises"));
    if let phalanx_actors::data::Labels::Class { class_names, .. } = &job.data.train.y {
        meta.insert("class_names".to_string(), serde_json::to_string(class_names).expect("strings serialise"));
    }
    meta.insert("param_order".to_string(), layout.iter().map(|t| t.name.clone()).collect::<Vec<_>>().join(","));
    meta.insert("model_sha256".to_string(), summary.model_sha256.clone());
    meta.insert("dataset".to_string(), job.config.dataset.to_string());
    meta.insert("feature_names".to_string(), job.data.train.feature_names.join(","));
    meta.insert("feature_mean".to_string(), serde_json::to_string(&job.data.feature_mean).expect("floats"));
    meta.insert("feature_std".to_string(), serde_json::to_string(&job.data.feature_std).expect("floats"));
    if let Some((m, s)) = job.data.target_scale {
        meta.insert("target_mean".to_string(), m.to_string());
        meta.insert("target_std".to_string(), s.to_string());
    }
    let meta: std::collections::HashMap<String, String> = meta.into_iter().collect();
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Encode { what: "model.safetensors".into(), reason: e.to_string() })
}
