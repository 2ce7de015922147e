//! Building a job from a config, running it on actors, and the plain
//! single-threaded reference loop that computes the same bits without them.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array2, ArrayView2};
use phalanx_actors::actor::{spawn_job_recording, JobContext, JobHandle, JobOutcome, StepRecord};
use phalanx_actors::checkpoint::CheckpointStore;
use phalanx_actors::data::{self, DataError, DataRegistry, OwnedTargets, Partitions, Prepared, Table, TaskKind};
#[cfg(feature = "fault-injection")]
use phalanx_actors::faults::FaultPlan;
use phalanx_actors::model::{
    self, BatchView, Head, Model, ModelError, ModelIdentity, ModelRegistry, ParamParts, Targets, TensorInfo,
};
use phalanx_actors::net::LocalNet;
use phalanx_actors::optim::{OptimizerSpec, OptimizerState};
use phalanx_actors::protocol::{JobId, JobPlan, Schedule};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::{JobConfig, Resolved};
use crate::error::Error;

/// The models and data sources a job may name: what a node or a [`train_with`](crate::train_with)
/// call can build and load. [`Default`] holds the built-ins. Cheap to clone; each owner has its
/// own (two nodes in one process may host different models).
#[derive(Clone, Debug, Default)]
pub struct Registries {
    /// Models by name.
    pub models: ModelRegistry,
    /// Data sources by name.
    pub data: DataRegistry,
}

/// A job with its data loaded and everything derived from the config.
pub struct PreparedJob {
    /// The config as given.
    pub config: JobConfig,
    /// Defaults filled in.
    pub resolved: Resolved,
    /// Train and held-out rows, standardised.
    pub data: Prepared,
    /// The fixed partitioning of the training rows.
    pub partitions: Arc<Partitions>,
    /// The model.
    pub model: Arc<dyn Model>,
    /// What the model is: a built-in's spec or a registered model's request (hashed into
    /// `config_hash`, written into model files).
    pub model_identity: ModelIdentity,
    /// The optimizer.
    pub optimizer: OptimizerSpec,
    /// SHA-256 (hex) of everything that determines the math: checkpoints of
    /// another job are never loaded.
    pub config_hash: String,
    /// The step schedule.
    pub schedule: Schedule,
}

/// The part of the config that decides the math, hashed into `config_hash`.
#[derive(Serialize)]
struct MathIdentity<'a> {
    dataset: String,
    task: TaskKind,
    test_fraction: f64,
    partitions: u32,
    batch_size: u32,
    epochs: u32,
    seed: u64,
    model: &'a ModelIdentity,
    optimizer: &'a OptimizerSpec,
    train_data_sha256: String,
    /// SHA-256 of θ_0 when it comes from a file (absent otherwise, so that the hashes of jobs
    /// without one stay what they were).
    #[serde(skip_serializing_if = "Option::is_none")]
    init_params_sha256: Option<String>,
    /// How the model lays out its flat vector, where it is not the tensors one after another
    /// (the built-in MLP: chunk by chunk since protocol 8): a checkpoint of the same job from
    /// a build with another layout holds its values at other places, so it must not match.
    #[serde(skip_serializing_if = "Option::is_none")]
    flat_layout: Option<&'static str>,
}

/// [`MathIdentity::flat_layout`] of a model.
fn flat_layout(model: &ModelIdentity) -> Option<&'static str> {
    match model {
        ModelIdentity::Builtin(spec) if spec.kind == phalanx_actors::model::ModelKind::Mlp => Some("mlp-chunks-256"),
        _ => None,
    }
}

fn train_data_sha256(t: &Table) -> String {
    let mut h = Sha256::new();
    for v in t.x.iter() {
        h.update(v.to_le_bytes());
    }
    match &t.y {
        data::Labels::Real(y) => y.iter().for_each(|v| h.update(v.to_le_bytes())),
        data::Labels::Class { labels, .. } => labels.iter().for_each(|v| h.update(v.to_le_bytes())),
    }
    hex::encode(h.finalize())
}

/// `model_sha256` of `model`'s flat parameter vector `params`: the SHA-256 of its values in the
/// order of the model's tensors ([`Model::tensor_order`], the order of `model.safetensors`'
/// `param_order`), so a reader of the model file can check it without knowing the model's flat
/// layout.
pub fn model_sha256(model: &dyn Model, params: &[f32]) -> String {
    params_sha256(&model.tensor_order(params))
}

/// SHA-256 of a parameter vector as it is: its f32 values as little-endian bytes in order. Two
/// runs of one model end with the same bits exactly when their flat vectors hash the same; the
/// published `model_sha256` is [`model_sha256`], over the tensors' order.
pub fn params_sha256(params: &[f32]) -> String {
    let mut h = Sha256::new();
    for v in params {
        h.update(v.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// Bytes a file of initial parameters may have beyond the parameters themselves (its JSON
/// header): bounds what is read before the file is checked.
const INIT_PARAMS_HEADER_SLACK_BYTES: u64 = 1 << 20;

/// Reads θ_0 for `model` from the safetensors file `path` (the job's `init_params`): one F32
/// tensor per tensor of the model's layout, by name and shape, nothing else, every value finite;
/// the values in the tensors' order ([`Model::tensor_order`]).
fn read_init_params(path: &Path, model: &dyn Model) -> Result<Vec<f32>, Error> {
    use safetensors::{Dtype, SafeTensors};
    let bad =
        |reason: String| Error::Field { field: "init_params".into(), reason: format!("{}: {reason}", path.display()) };
    let limit = model.num_params() as u64 * 4 + INIT_PARAMS_HEADER_SLACK_BYTES;
    let size = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?.len();
    if size > limit {
        return Err(bad(format!("{size} bytes, more than the model's {} parameters need", model.num_params())));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let layout = model.layout();
    if let Some(extra) = tensors.names().into_iter().find(|name| !layout.iter().any(|t| t.name == **name)) {
        let names = layout.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
        return Err(bad(format!("tensor `{extra}` is not one of the model's ({names})")));
    }
    let mut params = Vec::with_capacity(model.num_params());
    for t in &layout {
        let view = tensors.tensor(&t.name).map_err(|e| bad(format!("tensor `{}`: {e}", t.name)))?;
        if view.dtype() != Dtype::F32 || view.shape() != t.shape.as_slice() {
            return Err(bad(format!(
                "tensor `{}` is {:?} {:?}, the model needs F32 {:?}",
                t.name,
                view.dtype(),
                view.shape(),
                t.shape
            )));
        }
        let start = params.len();
        params.extend(view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        if let Some(i) = params[start..].iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("tensor `{}` element {i} is {}", t.name, params[start + i])));
        }
    }
    Ok(params)
}

/// A model whose θ_0 is the job's `init_params` file instead of its seeded initialisation;
/// everything else is the wrapped model's.
#[derive(Debug)]
struct FileInit {
    model: Arc<dyn Model>,
    params: Vec<f32>,
}

impl Model for FileInit {
    fn num_params(&self) -> usize {
        self.model.num_params()
    }

    fn layout(&self) -> Vec<TensorInfo> {
        self.model.layout()
    }

    fn init_params(&self, _seed: u64) -> Vec<f32> {
        self.params.clone()
    }

    fn tensor_order<'p>(&self, params: &'p [f32]) -> std::borrow::Cow<'p, [f32]> {
        self.model.tensor_order(params)
    }

    fn flat_order(&self, tensors: Vec<f32>) -> Vec<f32> {
        self.model.flat_order(tensors)
    }

    fn loss_grad(
        &self,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        y: Targets<'_>,
        grad: &mut [f32],
    ) -> Result<f64, ModelError> {
        self.model.loss_grad(params, x, y, grad)
    }

    // Forwarded too: the trait's default would give the same bits, but without the wrapped
    // model's fused pass (the built-in MLP's is twice as fast at 1.2 M parameters).
    fn loss_grad_tree(
        &self,
        params: &[f32],
        batches: &[BatchView<'_>],
        grad: &mut [f32],
    ) -> Result<Vec<f64>, ModelError> {
        self.model.loss_grad_tree(params, batches, grad)
    }

    fn loss_grad_tree_parts(
        &self,
        params: &ParamParts<'_>,
        batches: &[BatchView<'_>],
        grad: &mut [f32],
    ) -> Result<Vec<f64>, ModelError> {
        self.model.loss_grad_tree_parts(params, batches, grad)
    }

    fn loss(&self, params: &[f32], x: ArrayView2<'_, f32>, y: Targets<'_>) -> Result<f64, ModelError> {
        self.model.loss(params, x, y)
    }

    fn predict(&self, params: &[f32], x: ArrayView2<'_, f32>) -> Result<Array2<f32>, ModelError> {
        self.model.predict(params, x)
    }
}

impl PreparedJob {
    /// Validate the config, load and split the data, build the model — with the built-in
    /// models and data sources only (see [`with_registries`](Self::with_registries)).
    pub fn new(config: JobConfig) -> Result<Self, Error> {
        Self::with_registries(config, &ModelRegistry::default(), &DataRegistry::default())
    }

    /// Validate the config, load and split the data through `datasets`, build the model
    /// through `models`. A model or source the registry lacks is [`Error::UnknownModel`] or
    /// [`Error::UnknownDataset`], naming it and what the registry has.
    pub fn with_registries(config: JobConfig, models: &ModelRegistry, datasets: &DataRegistry) -> Result<Self, Error> {
        // A prepared job knows its ranges: unset (a single process, or a spec that did not go
        // through a coordinator's admission) is one.
        let config = JobConfig { aggregators: Some(config.aggregator_count()), ..config };
        config.validate()?;
        let resolved = config.resolve();
        let table = datasets.load(&config.dataset, resolved.task).map_err(|e| match e {
            DataError::UnknownSource { name, known } => Error::UnknownDataset { dataset: name, known },
            other => Error::Data(other),
        })?;
        let data = data::prepare(table, config.seed, config.test_fraction)?;
        let n_train = data.train.len();
        if config.partitions as usize > n_train {
            return Err(Error::Field {
                field: "partitions".into(),
                reason: format!("{} partitions but only {n_train} training rows", config.partitions),
            });
        }
        let partitions = Partitions::new(n_train, config.partitions, resolved.batch_size, config.seed)?;
        let (outputs, head) = match data.train.classes() {
            Some(k) => (k, Head::Classification),
            None => (1, Head::Regression),
        };
        let request = config.model_request(data.train.features(), outputs, head);
        let built = models.build(&request).map_err(|e| match e {
            ModelError::UnknownModel { name, known } => Error::UnknownModel { model: name, known },
            ModelError::InvalidConfig { model, reason } => {
                Error::Field { field: "model_config".into(), reason: format!("model {model}: {reason}") }
            }
            other => Error::Model(other),
        })?;
        let model: Arc<dyn Model> = Arc::from(built.model);
        let model_identity = built.identity;
        let (model, init_params_sha256) = match &config.init_params {
            Some(path) => {
                let tensors = read_init_params(path, model.as_ref())?;
                let sha = params_sha256(&tensors);
                let params = model.flat_order(tensors);
                (Arc::new(FileInit { model, params }) as Arc<dyn Model>, Some(sha))
            }
            None => (model, None),
        };
        if config.aggregator_count() as usize > model.num_params() {
            return Err(Error::Field {
                field: "aggregators".into(),
                reason: format!("{} aggregators for only {} parameters", config.aggregator_count(), model.num_params()),
            });
        }
        let mut optimizer = OptimizerSpec::new(config.optimizer);
        optimizer.lr = resolved.learning_rate;
        optimizer.validate().map_err(|e| Error::Field { field: "learning_rate".into(), reason: e.to_string() })?;
        let schedule = Schedule { steps_per_epoch: partitions.steps_per_epoch, epochs: resolved.epochs };
        for f in &config.fail {
            if f.step >= schedule.total_steps() {
                return Err(Error::Field {
                    field: "fail".into(),
                    reason: format!("{f}: step {} is past the last step {}", f.step, schedule.total_steps() - 1),
                });
            }
        }
        let identity = MathIdentity {
            dataset: config.dataset.to_string(),
            task: resolved.task,
            test_fraction: config.test_fraction,
            partitions: config.partitions,
            batch_size: resolved.batch_size,
            epochs: resolved.epochs,
            seed: config.seed,
            model: &model_identity,
            optimizer: &optimizer,
            train_data_sha256: train_data_sha256(&data.train),
            init_params_sha256,
            flat_layout: flat_layout(&model_identity),
        };
        let config_hash = hex::encode(Sha256::digest(serde_json::to_vec(&identity).expect("plain data serialises")));
        Ok(Self {
            config,
            resolved,
            data,
            partitions: Arc::new(partitions),
            model,
            model_identity,
            optimizer,
            config_hash,
            schedule,
        })
    }

    /// `(offset, len)` of each aggregator's range: `aggregators` contiguous,
    /// near-equal ranges.
    pub fn ranges(&self) -> Vec<(usize, usize)> {
        let n = self.model.num_params();
        let a = self.config.aggregator_count() as usize;
        (0..a).map(|r| (r * n / a, (r + 1) * n / a - r * n / a)).collect()
    }

    /// The supervisor's plan for this job.
    pub fn plan(&self, job: JobId) -> JobPlan {
        let policy = self.config.restart_policy();
        JobPlan {
            job,
            assignment: JobPlan::contiguous(self.config.partitions, self.config.trainers),
            trainers: self.config.trainers,
            ranges: self.ranges(),
            schedule: self.schedule,
            shard_policy: policy,
            trainer_policy: policy,
            aggregator_policy: policy,
        }
    }

    /// The job id every node of a cluster derives from the config hash, so
    /// that their messages agree on which job they belong to.
    pub fn cluster_job_id(&self) -> JobId {
        let bytes = hex::decode(&self.config_hash[..16]).unwrap_or_default();
        bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    }

    /// The shared context of this job's actors in this process. The actors
    /// log in spans under the span current here; `observer` (if any) is told
    /// of restarts, recoveries and checkpoints.
    pub fn context(
        &self,
        job: JobId,
        store: CheckpointStore,
        names: LocalNet,
        net: Arc<dyn phalanx_actors::net::Net>,
        cluster: Option<Arc<dyn phalanx_actors::actor::Cluster>>,
        observer: Option<Arc<dyn phalanx_actors::actor::JobObserver>>,
    ) -> Arc<JobContext> {
        Arc::new(JobContext {
            job,
            plan: self.plan(job),
            model: self.model.clone(),
            train: Arc::new(self.data.train.clone()),
            partitions: self.partitions.clone(),
            optimizer: self.optimizer,
            init_seed: self.config.seed,
            checkpoint_every: self.config.checkpoint_every,
            checkpoint_cadence: std::sync::Mutex::new(phalanx_actors::checkpoint::CheckpointCadence::new(
                self.config.checkpoint_every,
                std::time::Duration::from_millis(self.config.checkpoint_min_interval_ms),
            )),
            store: Arc::new(store),
            config_hash: self.config_hash.clone(),
            #[cfg(feature = "fault-injection")]
            faults: FaultPlan::new(self.config.fail.iter().copied()),
            net,
            names,
            cluster,
            observer,
            span: tracing::Span::current(),
        })
    }

    /// Start the job's actors, checkpointing into `checkpoint_dir`; with
    /// `resume`, continue from the newest complete checkpoint there. The
    /// handle streams every applied step on [`JobHandle::steps`].
    pub async fn spawn(&self, checkpoint_dir: &Path, resume: bool) -> Result<JobHandle, Error> {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let job: JobId = (u64::from(std::process::id()) << 32) | (run & 0xffff_ffff);
        let store = CheckpointStore::open(checkpoint_dir)?;
        let restore = if resume {
            let step = store.newest_complete(&self.config_hash, self.model.num_params())?;
            Some(step.ok_or_else(|| Error::NoCheckpoint { dir: checkpoint_dir.to_path_buf() })?)
        } else {
            None
        };
        let names = LocalNet::new(format!("phalanx-{job:x}"), self.config.trainers);
        let ctx = tracing::info_span!("job", job)
            .in_scope(|| self.context(job, store, names.clone(), Arc::new(names), None, None));
        spawn_job_recording(ctx, restore, 0).await.map_err(|e| Error::Spawn(e.to_string()))
    }

    /// Train with a plain loop — no actors, no messages — computing exactly
    /// what the protocol computes: per step, each partition's summed
    /// gradient, added in the fixed reduction tree over partitions (see
    /// [`phalanx_actors::protocol::reduce`]; written out here as a recursion of its own,
    /// not with the protocol's reducer), divided by the sample count, one
    /// optimizer step. The actors must match it bit for bit; the benchmark
    /// measures their overhead against it.
    pub fn reference_params(&self) -> Result<Vec<f32>, Error> {
        use phalanx_actors::protocol::reduce::Span;
        /// Leave the tree-order sum of `node`'s gradients in `grads[node.lo]`.
        fn tree_sum(node: Span, grads: &mut [Vec<f32>]) {
            let Some((left, right)) = node.split() else { return };
            tree_sum(left, grads);
            tree_sum(right, grads);
            let (head, tail) = grads.split_at_mut(right.lo as usize);
            for (a, b) in head[left.lo as usize].iter_mut().zip(&tail[0]) {
                *a += *b;
            }
        }
        let n = self.model.num_params();
        let mut params = self.model.init_params(self.config.seed);
        let mut opt: OptimizerState = self.optimizer.new_state(n);
        let partitions = self.partitions.count();
        let mut grads = vec![vec![0.0f32; n]; partitions as usize];
        let mut feeds = (0..partitions).map(|p| self.partitions.feed(p)).collect::<Result<Vec<_>, _>>()?;
        for step in 0..self.schedule.total_steps() {
            let (epoch, k) = self.schedule.locate(step);
            let mut samples = 0u64;
            for (feed, grad) in feeds.iter_mut().zip(&mut grads) {
                let rows = feed.batch(epoch, k)?;
                let (x, y) = self.data.train.rows(rows)?;
                let targets = match &y {
                    OwnedTargets::Real(v) => Targets::Real(v),
                    OwnedTargets::Class(v) => Targets::Class(v),
                };
                self.model.loss_grad(&params, x.view(), targets, grad)?;
                samples += x.nrows() as u64;
            }
            if partitions == 0 {
                break;
            }
            tree_sum(Span::root(partitions), &mut grads);
            let sum = &mut grads[0];
            let scale = 1.0f32 / samples as f32;
            sum.iter_mut().for_each(|v| *v *= scale);
            self.optimizer.step(&mut opt, &mut params, sum).expect("state sized for the vector");
        }
        Ok(params)
    }

    /// Quality of `params`: loss on the training rows and the metric on the
    /// held-out rows (R² or accuracy).
    pub fn evaluate(&self, params: &[f32]) -> Result<Evaluation, Error> {
        let train = &self.data.train;
        let test = &self.data.test;
        let final_loss = self.model.loss(params, train.x.view(), targets(train))? / train.len().max(1) as f64;
        let metric = |t: &Table| -> Result<Option<f64>, Error> {
            if t.is_empty() {
                return Ok(None);
            }
            let out = self.model.predict(params, t.x.view())?;
            Ok(Some(match &t.y {
                data::Labels::Real(y) => model::metrics::r2(&out.column(0).to_vec(), y),
                data::Labels::Class { labels, .. } => model::metrics::accuracy(out.view(), labels),
            }))
        };
        let name = match train.task() {
            TaskKind::Regression => "r2",
            TaskKind::Classification => "accuracy",
        };
        let train_value = metric(train)?.unwrap_or(f64::NAN);
        let held_out = metric(test)?;
        let least_squares = match (&train.y, &test.y) {
            (data::Labels::Real(ytr), data::Labels::Real(yte)) if !test.is_empty() => {
                model::metrics::least_squares_r2(train.x.view(), ytr, test.x.view(), yte)
            }
            _ => None,
        };
        Ok(Evaluation {
            final_loss,
            metric: Metric {
                name: name.to_string(),
                value: held_out.unwrap_or(train_value),
                split: if held_out.is_some() { "held-out" } else { "train" }.to_string(),
                train_value,
                least_squares_r2: least_squares,
            },
        })
    }
}

fn targets(t: &Table) -> Targets<'_> {
    match &t.y {
        data::Labels::Real(y) => Targets::Real(y),
        data::Labels::Class { labels, .. } => Targets::Class(labels),
    }
}

/// How good a trained model is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    /// Mean loss over the training rows.
    pub final_loss: f64,
    /// The metric.
    pub metric: Metric,
}

/// A quality metric: R² for regression, accuracy for classification.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Metric {
    /// `r2` or `accuracy`.
    pub name: String,
    /// Its value on `split`.
    pub value: f64,
    /// `held-out` (or `train` when nothing was held out).
    pub split: String,
    /// Its value on the training rows.
    pub train_value: f64,
    /// Regression only: held-out R² of closed-form least squares on the same split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub least_squares_r2: Option<f64>,
}

/// A finished job: the outcome, its quality and timing.
pub struct TrainReport {
    /// What the actors produced.
    pub outcome: JobOutcome,
    /// Quality of the final parameters.
    pub evaluation: Evaluation,
    /// Wall time of the run.
    pub duration: std::time::Duration,
    /// The per-step history written while it ran (`history.csv`), if any.
    pub history: Option<std::path::PathBuf>,
}

/// Wait for a running job's outcome, reporting progress to `on_progress`
/// (the latest state, at most once per applied step) and every applied step,
/// in order, to `on_step` (when the job streams them, see [`JobHandle::steps`]).
pub async fn await_job(
    mut handle: JobHandle,
    mut on_progress: impl FnMut(&phalanx_actors::actor::Progress),
    mut on_step: impl FnMut(&StepRecord),
) -> Result<JobOutcome, Error> {
    let mut steps = handle.steps.take();
    let mut progress = handle.progress.clone();
    let finish = handle.finish();
    tokio::pin!(finish);
    Ok(loop {
        tokio::select! {
            // Steps first: the supervisor waits while too many are unread.
            biased;
            Some(record) = next_step(&mut steps) => on_step(&record),
            r = &mut finish => {
                // The supervisor sent every step before its outcome.
                if let Some(rx) = steps.as_mut() {
                    while let Ok(record) = rx.try_recv() {
                        on_step(&record);
                    }
                }
                break r?;
            }
            changed = progress.changed() => match changed {
                Ok(()) => on_progress(&progress.borrow_and_update()),
                // The supervisor is gone; its outcome is already on the way.
                Err(_) => {
                    let r = (&mut finish).await;
                    if let Some(rx) = steps.as_mut() {
                        while let Ok(record) = rx.try_recv() {
                            on_step(&record);
                        }
                    }
                    break r?;
                }
            },
        }
    })
}

/// The next step record, or never when there is no stream (or it ended).
async fn next_step(steps: &mut Option<tokio::sync::mpsc::Receiver<StepRecord>>) -> Option<StepRecord> {
    match steps {
        Some(rx) => match rx.recv().await {
            Some(record) => Some(record),
            None => {
                *steps = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Run a prepared job to the end on actors in this process, reporting
/// progress to `on_progress` whenever a step is applied. With `config.out`
/// set, every applied step is written to `OUT/history.csv` as it happens
/// (continued on `resume`, started afresh otherwise).
pub async fn run(
    job: &PreparedJob,
    checkpoint_dir: &Path,
    resume: bool,
    mut on_progress: impl FnMut(&phalanx_actors::actor::Progress),
) -> Result<TrainReport, Error> {
    let mut history = match &job.config.out {
        Some(out) => Some(crate::output::HistoryWriter::open(&out.join(crate::output::HISTORY_FILE), resume)?),
        None => None,
    };
    let started = Instant::now();
    let handle = job.spawn(checkpoint_dir, resume).await?;
    let outcome = await_job(handle, &mut on_progress, |record| {
        if let Some(h) = history.as_mut() {
            h.record(record);
        }
    })
    .await?;
    let evaluation = job.evaluate(&outcome.params)?;
    let history = history.map(|h| h.path().to_path_buf());
    Ok(TrainReport { outcome, evaluation, duration: started.elapsed(), history })
}

#[cfg(test)]
mod tests {
    use super::*;
    use phalanx_actors::model::ModelKind;
    use safetensors::tensor::{Dtype, TensorView};

    fn mlp(hidden: usize) -> JobConfig {
        JobConfig {
            model: ModelKind::Mlp.into(),
            dataset: data::DatasetSource::Winequality,
            hidden,
            epochs: Some(1),
            ..JobConfig::default()
        }
    }

    /// Writes `tensors` (name, shape, values) as a safetensors file.
    fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let bytes: Vec<Vec<u8>> =
            tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| (name.to_string(), TensorView::new(Dtype::F32, shape.clone(), b).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    /// The tensors of an MLP on winequality (11 features, 6 classes), element `i` of the flat
    /// vector set to `i / 1000`.
    fn mlp_tensors(hidden: usize) -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
        let shapes = [("w1", vec![11, hidden]), ("b1", vec![hidden]), ("w2", vec![hidden, 6]), ("b2", vec![6])];
        let mut next = 0usize;
        shapes
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let values = (next..next + n).map(|i| i as f32 / 1000.0).collect();
                next += n;
                (name, shape, values)
            })
            .collect()
    }

    #[test]
    fn init_params_file_is_theta_0_and_part_of_the_config_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init.safetensors");
        write(&path, &mlp_tensors(4));
        let seeded = PreparedJob::new(mlp(4)).unwrap();
        let job = PreparedJob::new(JobConfig { init_params: Some(path), ..mlp(4) }).unwrap();
        // The file holds the tensors; θ_0 is the model's flat vector of them.
        let want: Vec<f32> = (0..job.model.num_params()).map(|i| i as f32 / 1000.0).collect();
        assert_eq!(job.model.tensor_order(&job.model.init_params(job.config.seed)).into_owned(), want);
        let want = job.model.flat_order(want);
        assert_ne!(seeded.model.init_params(42), want);
        assert_ne!(job.config_hash, seeded.config_hash, "θ_0 is part of the math");
        // The plain loop starts from it too: one epoch moves away from it, and differently from
        // the seeded start.
        let trained = job.reference_params().unwrap();
        assert_ne!(trained, want);
        assert_ne!(trained, seeded.reference_params().unwrap());
    }

    #[test]
    fn a_bad_init_params_file_names_the_field_the_file_and_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init.safetensors");
        let error = |tensors: &[(&str, Vec<usize>, Vec<f32>)]| {
            write(&path, tensors);
            let e =
                PreparedJob::new(JobConfig { init_params: Some(path.clone()), ..mlp(4) }).err().unwrap().to_string();
            assert!(e.contains("`init_params`") && e.contains(&path.display().to_string()), "{e}");
            e
        };
        let e = error(&mlp_tensors(5));
        assert!(e.contains("tensor `w1`") && e.contains("[11, 4]"), "{e}");
        let mut missing = mlp_tensors(4);
        missing.pop();
        assert!(error(&missing).contains("`b2`"));
        let mut extra = mlp_tensors(4);
        extra.push(("w3", vec![1], vec![0.0]));
        assert!(error(&extra).contains("`w3`"));
        let mut nan = mlp_tensors(4);
        nan[1].2[2] = f32::NAN;
        let e = error(&nan);
        assert!(e.contains("tensor `b1` element 2 is NaN"), "{e}");
        std::fs::write(&path, b"not safetensors").unwrap();
        let e = PreparedJob::new(JobConfig { init_params: Some(path.clone()), ..mlp(4) }).err().unwrap().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        let gone = dir.path().join("missing.safetensors");
        let e = PreparedJob::new(JobConfig { init_params: Some(gone.clone()), ..mlp(4) }).err().unwrap().to_string();
        assert!(e.contains("`init_params`") && e.contains(&gone.display().to_string()), "{e}");
    }
}
