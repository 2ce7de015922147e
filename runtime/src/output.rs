//! What a run leaves behind: `summary.json`, `history.csv` and `model.safetensors`.
//!
//! `model_sha256` is the SHA-256 of the final parameters as little-endian
//! f32 bytes in the tensors' order — the tensors of `model.safetensors` concatenated
//! in the order its `param_order` metadata lists (see [`crate::job::model_sha256`]).
//!
//! `summary.json` stays the same size whatever the number of steps: final
//! figures, the exactly-once verdict folded over the epochs (counts and the
//! first failing epoch), faults, and a downsampled loss curve. Every step
//! goes to `history.csv` next to it as it is applied ([`HistoryWriter`]):
//!
//! ```text
//! step,epoch,loss,samples_per_sec,t_ms
//! 1,0,1.7912,,1764500000123
//! 2,0,1.7530,41250.0,1764500000124
//! ```
//!
//! `step` is the parameter version the step produced, `epoch` the epoch of the
//! step, `loss` its mean training loss, `samples_per_sec` the throughput over
//! the last [`RATE_WINDOW`] steps (empty for the first), `t_ms` milliseconds
//! since the Unix epoch (the clock of the nodes' events). A run that rolls
//! back or is taken over appends the recomputed steps again, so a step can
//! appear more than once; the last row of a step is the one that counted.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use phalanx_actors::actor::StepRecord;
use phalanx_actors::model::kernel;
use phalanx_actors::protocol::{FaultRecord, Ledger};
use serde::Serialize;

use crate::error::Error;
use crate::job::{Metric, PreparedJob, TrainReport};

/// Name of the per-step history, next to `summary.json`.
pub const HISTORY_FILE: &str = "history.csv";
/// The history's header row: its columns.
pub const HISTORY_HEADER: &str = "step,epoch,loss,samples_per_sec,t_ms";
/// Steps the history's `samples_per_sec` column averages over.
pub const RATE_WINDOW: usize = 32;

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

/// The exactly-once verdict of a run, folded over its epochs: the size does
/// not depend on the number of epochs. Epoch `e` was applied exactly once
/// when `exactly_once` holds, or when `e` is before `first_failing.epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SamplesApplied {
    /// Epochs of the job.
    pub epochs: u64,
    /// Epochs in which every partition applied exactly its size.
    pub exactly_once_epochs: u64,
    /// True when every epoch of the job was applied exactly once.
    pub exactly_once: bool,
    /// Samples applied, all epochs and partitions.
    pub total: u64,
    /// Samples applied per partition, summed over the epochs.
    pub per_partition: Vec<u64>,
    /// Samples a partition applied fewer times than its size, summed over epochs and partitions.
    pub lost: u64,
    /// Samples a partition applied more often than its size, summed over epochs and partitions.
    pub duplicated: u64,
    /// The first epoch not applied exactly once, and what its partitions applied.
    pub first_failing: Option<EpochSamples>,
}

impl SamplesApplied {
    /// The verdict of `ledger` for a job of `epochs` epochs over partitions of `sizes`.
    pub fn new(ledger: &Ledger, sizes: &[u64], epochs: u64) -> Self {
        let mut all = ledger.clone();
        // An epoch still open at the end was not finished: judge it as it stands.
        all.close_before(u64::MAX, sizes);
        let c = &all.closed;
        let mut per_partition = c.per_partition.clone();
        per_partition.resize(per_partition.len().max(sizes.len()), 0);
        let row = |epoch: u64, per_partition: Vec<u64>| EpochSamples {
            epoch,
            total: per_partition.iter().sum(),
            exactly_once: per_partition == sizes,
            per_partition,
        };
        let mut first_failing = c.first_inexact.clone().map(|(e, per)| row(e, per));
        let mut lost = c.lost;
        // Epochs never applied at all (the ledger counts them in order).
        if c.epochs < epochs {
            lost += (epochs - c.epochs) * sizes.iter().sum::<u64>();
            if first_failing.is_none() {
                first_failing = Some(row(c.epochs, vec![0; sizes.len()]));
            }
        }
        let exactly_once_epochs = c.exact.min(epochs);
        Self {
            epochs,
            exactly_once_epochs,
            exactly_once: c.epochs == epochs && c.exact == epochs,
            total: per_partition.iter().sum(),
            per_partition,
            lost,
            duplicated: c.duplicated,
            first_failing,
        }
    }
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
    /// How it was lost: `actor_failed`, `start_failed`, `spawn_timeout`, `node_lost`.
    pub cause: String,
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
            cause: f.cause.to_string(),
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
    /// Samples applied, with the exactly-once verdict folded over the epochs.
    pub samples_applied: SamplesApplied,
    /// Size of every partition.
    pub partition_sizes: Vec<u64>,
    /// Every failure and its recovery.
    pub faults: Vec<FaultSummary>,
    /// Rollbacks to a checkpoint.
    pub rollbacks: u64,
    /// Checkpoints that could not be written (e.g. a full disk); training went
    /// on and the previous complete checkpoint stayed the rollback point. The
    /// first few, with their reasons.
    pub checkpoint_failures: Vec<phalanx_actors::actor::CheckpointFailure>,
    /// Checkpoints that could not be written, counted.
    pub checkpoint_failures_total: u64,
    /// The job.
    pub job: JobEcho,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Training samples applied per second of wall time.
    pub samples_per_sec: f64,
    /// Mean loss per step (by the version it produced), downsampled to at most
    /// [`phalanx_actors::protocol::LOSS_POINTS`] + 1 evenly spaced steps, the
    /// last step included. Every step is in `history`.
    pub loss_history: Vec<(u64, f64)>,
    /// The per-step history (`history.csv`, relative to this file when next to
    /// it), if it was written.
    pub history: Option<String>,
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
    /// The kernel fingerprint the model was computed with (16 hex digits; see
    /// `phalanx_actors::model::kernel`): equal fingerprints, equal bits.
    pub kernel: String,
    /// What decides the kernel on the machine that wrote this summary (architecture and
    /// CPU features), for people comparing runs.
    pub kernel_cpu: String,
}

impl Summary {
    /// Summarise a finished run.
    pub fn new(job: &PreparedJob, report: &TrainReport) -> Self {
        let sizes = job.partitions.sizes();
        let samples_applied = SamplesApplied::new(&report.outcome.ledger, &sizes, u64::from(job.schedule.epochs));
        let applied = samples_applied.total;
        let secs = report.duration.as_secs_f64().max(1e-9);
        Self {
            steps: job.schedule.total_steps(),
            epochs: job.schedule.epochs,
            steps_per_epoch: job.schedule.steps_per_epoch,
            final_loss: report.evaluation.final_loss,
            metric: report.evaluation.metric.clone(),
            model_sha256: crate::model_sha256(job.model.as_ref(), &report.outcome.params),
            num_params: report.outcome.params.len(),
            samples_applied,
            partition_sizes: sizes,
            faults: report.outcome.faults.iter().map(FaultSummary::from).collect(),
            rollbacks: report.outcome.rollbacks,
            checkpoint_failures: report.outcome.checkpoint_failures.clone(),
            checkpoint_failures_total: report.outcome.checkpoint_failures_total,
            job: JobEcho {
                model: job.config.model.to_string(),
                dataset: job.config.dataset.to_string(),
                partitions: job.config.partitions,
                trainers: job.config.trainers,
                aggregators: job.config.aggregator_count(),
                seed: job.config.seed,
                batch_size: job.resolved.batch_size,
                optimizer: job.config.optimizer.to_string(),
                learning_rate: job.resolved.learning_rate,
                config_hash: job.config_hash.clone(),
                kernel: kernel::fingerprint().to_string(),
                kernel_cpu: kernel::description().to_string(),
            },
            duration_ms: report.duration.as_millis() as u64,
            samples_per_sec: applied as f64 / secs,
            loss_history: report.outcome.losses.iter().map(|(s, l)| (*s, *l)).collect(),
            history: report.history.as_ref().map(|p| p.to_string_lossy().into_owned()),
        }
    }
}

/// Appends every applied step to `history.csv` as it happens (see the module
/// docs for the columns), one `write` per row, so the file is complete up to
/// the last step even when the process is killed, and concurrent appenders
/// (a coordinator and its successor) never tear a row.
pub struct HistoryWriter {
    path: PathBuf,
    file: std::fs::File,
    row: String,
    /// `(when, samples)` of the last [`RATE_WINDOW`] steps.
    window: VecDeque<(Instant, u64)>,
    /// One reading of both clocks, to turn step instants into Unix time.
    clock: (Instant, u64),
    failed: bool,
}

impl HistoryWriter {
    /// Start the history at `path` afresh, or with `append` continue it (a
    /// resumed run, a coordinator taking over). Writes the header into an
    /// empty file.
    pub fn open(path: &Path, append: bool) -> Result<Self, Error> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
        }
        // Always O_APPEND, also for a fresh history: every row then lands at
        // the end of the file whoever else appends. A coordinator that wakes
        // from a pause after its successor took over would otherwise write at
        // its own stale offset, over the successor's rows.
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        if !append {
            file.set_len(0).map_err(io)?;
        }
        if file.metadata().map_err(io)?.len() == 0 {
            file.write_all(format!("{HISTORY_HEADER}\n").as_bytes()).map_err(io)?;
        }
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            row: String::with_capacity(96),
            window: VecDeque::with_capacity(RATE_WINDOW + 1),
            clock: (Instant::now(), unix_ms),
            failed: false,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one step. A write error is logged once and ends the history;
    /// training goes on.
    pub fn record(&mut self, r: &StepRecord) {
        if self.failed {
            return;
        }
        self.window.push_back((r.at, r.samples));
        while self.window.len() > RATE_WINDOW {
            self.window.pop_front();
        }
        let t_ms = match r.at.checked_duration_since(self.clock.0) {
            Some(d) => self.clock.1 + d.as_millis() as u64,
            None => self.clock.1.saturating_sub(self.clock.0.duration_since(r.at).as_millis() as u64),
        };
        self.row.clear();
        let _ = write!(self.row, "{},{},{},", r.step, r.epoch, r.loss);
        if let (Some((first, _)), Some((last, _))) = (self.window.front(), self.window.back()) {
            let secs = last.saturating_duration_since(*first).as_secs_f64();
            // The oldest entry only marks the start of the window.
            let samples: u64 = self.window.iter().skip(1).map(|(_, n)| n).sum();
            if secs > 0.0 {
                let _ = write!(self.row, "{:.1}", samples as f64 / secs);
            }
        }
        let _ = writeln!(self.row, ",{t_ms}");
        if let Err(e) = self.file.write_all(self.row.as_bytes()) {
            tracing::warn!(path = %self.path.display(), step = r.step, "history not written further: {e}");
            self.failed = true;
        }
    }
}

/// One row of `history.csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryRow {
    /// The parameter version the step produced.
    pub step: u64,
    /// The epoch of the step.
    pub epoch: u32,
    /// Mean training loss of the step.
    pub loss: f64,
    /// Samples per second over the last [`RATE_WINDOW`] steps (none for the first).
    pub samples_per_sec: Option<f64>,
    /// Milliseconds since the Unix epoch.
    pub t_ms: u64,
}

/// Read a whole `history.csv` (for plots and tests; it holds one row per
/// step applied, so mind the size of long runs). Errors name the file and line.
pub fn read_history(path: &Path) -> Result<Vec<HistoryRow>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let bad = |line: usize, reason: String| Error::Encode { what: format!("{}:{line}", path.display()), reason };
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header == HISTORY_HEADER => {}
        other => return Err(bad(1, format!("expected the header {HISTORY_HEADER:?}, found {:?}", other.map(|l| l.1)))),
    }
    lines
        .map(|(i, line)| {
            let cols: Vec<&str> = line.split(',').collect();
            let [step, epoch, loss, rate, t_ms] = cols.as_slice() else {
                return Err(bad(i + 1, format!("expected 5 columns, found {}", cols.len())));
            };
            let num = |name: &str, text: &str| bad(i + 1, format!("{name} {text:?} is not a number"));
            Ok(HistoryRow {
                step: step.parse().map_err(|_| num("step", step))?,
                epoch: epoch.parse().map_err(|_| num("epoch", epoch))?,
                loss: loss.parse().map_err(|_| num("loss", loss))?,
                samples_per_sec: match *rate {
                    "" => None,
                    r => Some(r.parse().map_err(|_| num("samples_per_sec", r))?),
                },
                t_ms: t_ms.parse().map_err(|_| num("t_ms", t_ms))?,
            })
        })
        .collect()
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

/// Points plotted at most: a million-step history is thinned evenly.
const PLOT_POINTS: usize = 2_000;

/// Draw `dir/loss.svg` from `dir/history.csv`: loss and samples/s per step,
/// `marks` (step, label: faults, recoveries) as vertical lines. Nothing to
/// draw without a history.
pub fn write_loss_svg(dir: &Path, marks: &[(u64, String)]) -> Result<(), Error> {
    let history = dir.join(HISTORY_FILE);
    if !history.is_file() {
        return Ok(());
    }
    let rows = read_history(&history)?;
    let stride = rows.len().div_ceil(PLOT_POINTS).max(1);
    let points: Vec<crate::plot::RunPoint> = rows
        .iter()
        .step_by(stride)
        .map(|r| crate::plot::RunPoint { step: r.step, loss: r.loss, throughput: r.samples_per_sec })
        .collect();
    let path = dir.join("loss.svg");
    crate::plot::plot_run(&path, "loss and samples / s per step", "samples / s", &points, marks)
        .map_err(|reason| Error::Encode { what: path.display().to_string(), reason })
}

/// Write `summary.json` and `model.safetensors` into `dir` (`history.csv`
/// was written while the job ran).
pub fn write_outputs(dir: &Path, job: &PreparedJob, report: &TrainReport) -> Result<Summary, Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let mut summary = Summary::new(job, report);
    // Next to the summary: name it relative, as a script beside it reads it.
    if let Some(path) = &report.history {
        if path.parent() == Some(dir) {
            summary.history = path.file_name().map(|n| n.to_string_lossy().into_owned());
        }
    }
    let json = serde_json::to_vec_pretty(&summary).expect("summary serialises");
    write_atomic(&dir.join("summary.json"), &json)?;
    write_atomic(&dir.join("model.safetensors"), &model_safetensors(job, &report.outcome.params, &summary)?)?;
    let marks: Vec<(u64, String)> = summary.faults.iter().map(|f| (f.step, f.what.clone())).collect();
    // The plot is a view of the history, not a result: a history it cannot
    // read (edited by hand, a disk that filled) costs the plot, not the job.
    if let Err(e) = write_loss_svg(dir, &marks) {
        tracing::warn!(dir = %dir.display(), "loss.svg not drawn: {e}");
    }
    Ok(summary)
}

/// The final parameters as a safetensors file: one tensor per layer, with
/// metadata naming the flat order, the hash and the feature scaling.
pub fn model_safetensors(job: &PreparedJob, params: &[f32], summary: &Summary) -> Result<Vec<u8>, Error> {
    use phalanx_actors::model::ModelIdentity;
    use safetensors::tensor::{Dtype, TensorView};
    let layout = job.model.layout();
    let params = job.model.tensor_order(params);
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
    match &job.model_identity {
        // The key Python readers (and files from before registries) know.
        ModelIdentity::Builtin(spec) => {
            meta.insert("model_spec".to_string(), serde_json::to_string(spec).expect("a spec serialises"));
        }
        ModelIdentity::Registered(request) => {
            meta.insert("model_request".to_string(), serde_json::to_string(request).expect("a request serialises"));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64) -> StepRecord {
        StepRecord { step, epoch: 0, loss: 0.5, samples: 8, generation: 0, at: Instant::now() }
    }

    /// A coordinator that started the history, was paused, and wakes after its
    /// successor appended rows: its next row goes after theirs, not over them.
    #[test]
    fn a_stale_writer_appends_after_a_successors_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HISTORY_FILE);
        let mut first = HistoryWriter::open(&path, false).unwrap();
        first.record(&step(1));
        let mut successor = HistoryWriter::open(&path, true).unwrap();
        for s in 2..40 {
            successor.record(&step(s));
        }
        first.record(&step(2));
        let rows = read_history(&path).unwrap();
        let steps: Vec<u64> = rows.iter().map(|r| r.step).collect();
        assert_eq!(steps, [vec![1], (2..40).collect(), vec![2]].concat());
        // A fresh history still starts empty.
        drop((first, successor));
        let mut again = HistoryWriter::open(&path, false).unwrap();
        again.record(&step(7));
        assert_eq!(read_history(&path).unwrap().iter().map(|r| r.step).collect::<Vec<_>>(), vec![7]);
    }
}
