//! Job configuration: a TOML file, flags on top, validation with errors
//! that name the field.

use std::path::{Path, PathBuf};

use phalanx_actors::data::{DatasetSource, TaskKind};
use phalanx_actors::faults::FaultSpec;
use phalanx_actors::model::{Head, ModelConfig, ModelKind, ModelName, ModelRequest};
use phalanx_actors::optim::OptimizerKind;
use phalanx_actors::protocol::RestartPolicy;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Partitions when none are given: enough to spread over a few trainers,
/// few enough that each partition's batch is not tiny.
pub const DEFAULT_PARTITIONS: u32 = 8;
/// Held-out share of the rows used for the reported metric.
pub const DEFAULT_TEST_FRACTION: f64 = 0.2;
/// Hidden units of the built-in MLP.
pub const DEFAULT_HIDDEN: usize = 64;
/// Checkpoint interval in steps.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 20;
/// At most one checkpoint per this many milliseconds of training (see
/// [`JobConfig::checkpoint_min_interval_ms`]).
pub const DEFAULT_CHECKPOINT_MIN_INTERVAL_MS: u64 = 500;

/// Where a cluster runs a job's aggregators (see [`JobConfig::aggregator_placement`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AggregatorPlacement {
    /// Every range on the coordinator's node.
    Coordinator,
    /// Range `r` on node `r mod N` (the next live node while that one is down). The default:
    /// with one range per node (the default number of aggregators on a cluster) each node
    /// applies and sends its own share of θ, as in a ring all-reduce, instead of one node
    /// carrying every gradient and every parameter.
    #[default]
    Spread,
}

/// A training job. Every field has a default that trains well; a TOML file
/// uses the same names (`batch_size`, `checkpoint_every`, …).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    /// Model: a name in the model registry of whoever runs the job — the built-ins `linear`,
    /// `softmax` and `mlp`, or a model registered with
    /// [`ModelRegistry::register`](phalanx_actors::model::ModelRegistry::register).
    pub model: ModelName,
    /// A registered model's own settings (a `[model_config]` table in a job file), handed to
    /// its factory as [`ModelRequest::config`]. The built-in models take none: the MLP's width
    /// is [`hidden`](Self::hidden).
    pub model_config: Option<ModelConfig>,
    /// Data: `diabetes`, `iris`, `winequality`, `csv:PATH[:TARGET]`, or a source registered in
    /// a [`DataRegistry`](phalanx_actors::data::DataRegistry) (`NAME` or `NAME:ARG`).
    pub dataset: DatasetSource,
    /// Regression or classification; when absent, the built-in dataset's, else what a built-in
    /// model implies (linear: regression; softmax, mlp: classification). A registered model
    /// on a CSV or registered dataset needs it.
    pub task: Option<TaskKind>,
    /// Trainer actors (deployment only: does not change the result).
    pub trainers: u32,
    /// Aggregator actors, each owning a contiguous range of θ (deployment only). Absent: one
    /// per node of the cluster with the spread placement (the default; its configured size,
    /// fixed when the job enters the cluster), else one, and one in a single process
    /// ([`aggregator_count`](Self::aggregator_count)).
    pub aggregators: Option<u32>,
    /// Where a cluster runs the aggregators (deployment only): `spread` (the default: range `r`
    /// on node `r mod N`, moving to the next live node when that one is down, so each node
    /// applies and sends its own share of θ) or `coordinator` (all beside the job's supervisor:
    /// a failure of any other node then costs no rollback, since every aggregator survives it).
    pub aggregator_placement: AggregatorPlacement,
    /// Data partitions P (part of the math: fixed for the job).
    pub partitions: u32,
    /// Seed of the split, the partitions, the batches and the initial θ.
    pub seed: u64,
    /// Epochs; the model's default when absent.
    pub epochs: Option<u32>,
    /// Global batch size; the model's default when absent.
    pub batch_size: Option<u32>,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Learning rate; the optimizer's and model's default when absent.
    pub learning_rate: Option<f32>,
    /// Hidden units of the built-in MLP.
    pub hidden: usize,
    /// Initial θ from a safetensors file instead of the seeded initialisation: one F32 tensor per
    /// tensor of the model's layout, by name and shape (a `model.safetensors` of an earlier run
    /// works). Every node that hosts the job reads it, so give a path all of them can read. Its
    /// values are part of the math (hashed into the config hash).
    pub init_params: Option<PathBuf>,
    /// Share of rows held out for the metric.
    pub test_fraction: f64,
    /// Checkpoint every K steps (0: only the final one).
    pub checkpoint_every: u64,
    /// ...but at most one checkpoint per this many milliseconds of training, and per 50 times
    /// the time the last checkpoint took to write (0: every `checkpoint_every` steps exactly).
    /// Checkpoints are taken at the multiples of `checkpoint_every × 2^k` steps, the least
    /// such stride that lasts that long at the measured step time (the final state is always
    /// written), so a model that steps in microseconds is not paced by the disk, a large
    /// model's writes stay a small share of the run, and ranges on different nodes still take
    /// the same steps (the strides nest). Not part of the math:
    /// the model's bits do not depend on it.
    pub checkpoint_min_interval_ms: u64,
    /// Injected faults, e.g. `trainer:1@20` (actor panics). Only a build with the cargo
    /// feature `fault-injection` runs them; a default build refuses a job that names one.
    /// The field is in every build so that a job reads and travels the same.
    pub fail: Vec<FaultSpec>,
    /// Output directory.
    pub out: Option<PathBuf>,
    /// Resume from the newest complete checkpoint in `out/checkpoints`.
    pub resume: bool,
    /// Restarts allowed per actor within `restart_window_ms`.
    pub max_restarts: u32,
    /// The restart-intensity window in milliseconds.
    pub restart_window_ms: u64,
}

impl Default for JobConfig {
    fn default() -> Self {
        let policy = RestartPolicy::default();
        Self {
            model: ModelKind::Softmax.into(),
            model_config: None,
            dataset: DatasetSource::Iris,
            task: None,
            trainers: 2,
            aggregators: None,
            aggregator_placement: AggregatorPlacement::default(),
            partitions: DEFAULT_PARTITIONS,
            seed: 42,
            epochs: None,
            batch_size: None,
            optimizer: OptimizerKind::Adam,
            learning_rate: None,
            hidden: DEFAULT_HIDDEN,
            init_params: None,
            test_fraction: DEFAULT_TEST_FRACTION,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            checkpoint_min_interval_ms: DEFAULT_CHECKPOINT_MIN_INTERVAL_MS,
            fail: Vec::new(),
            out: None,
            resume: false,
            max_restarts: policy.max_restarts,
            restart_window_ms: policy.window_ms,
        }
    }
}

/// Hyper-parameters that were left to defaults, chosen per model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resolved {
    /// Epochs.
    pub epochs: u32,
    /// Global batch size.
    pub batch_size: u32,
    /// Learning rate.
    pub learning_rate: f32,
    /// Regression or classification.
    pub task: TaskKind,
}

impl JobConfig {
    /// Read a TOML job file. Unknown fields and wrong types are errors that
    /// name the file, the field and the line.
    pub fn from_toml_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_toml_str(&text).map_err(|e| match e {
            Error::Config { reason, .. } => Error::Config { file: Some(path.to_path_buf()), reason },
            other => other,
        })
    }

    /// Parse TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, Error> {
        toml::from_str::<JobConfig>(text).map_err(|e| Error::Config { file: None, reason: one_line(&e.to_string()) })
    }

    /// The task: as given, else the built-in dataset's, else what a built-in model implies
    /// (classification when nothing says: [`validate`](Self::validate) rejects that job).
    pub fn task(&self) -> TaskKind {
        self.implied_task().unwrap_or(TaskKind::Classification)
    }

    /// The task as given, else the built-in dataset's, else a built-in model's.
    fn implied_task(&self) -> Option<TaskKind> {
        self.task.or_else(|| self.dataset.builtin_task()).or_else(|| {
            self.model.builtin().map(|kind| match kind {
                ModelKind::Linear => TaskKind::Regression,
                ModelKind::Softmax | ModelKind::Mlp => TaskKind::Classification,
            })
        })
    }

    /// Fill in the defaults that depend on the model (a registered model: 40 epochs, batches
    /// of 32, learning rate 0.01 with Adam, else 0.05).
    pub fn resolve(&self) -> Resolved {
        let (epochs, batch_size, lr) = match (self.model.builtin(), self.optimizer) {
            (Some(ModelKind::Linear), OptimizerKind::Adam) => (40, 32, 0.02),
            (Some(ModelKind::Linear), _) => (40, 32, 0.05),
            (Some(ModelKind::Softmax), OptimizerKind::Adam) => (40, 16, 0.05),
            (Some(ModelKind::Softmax), _) => (40, 16, 0.1),
            (Some(ModelKind::Mlp), OptimizerKind::Adam) => (40, 64, 0.005),
            (Some(ModelKind::Mlp), _) => (40, 64, 0.05),
            (None, OptimizerKind::Adam) => (40, 32, 0.01),
            (None, _) => (40, 32, 0.05),
        };
        Resolved {
            epochs: self.epochs.unwrap_or(epochs),
            batch_size: self.batch_size.unwrap_or(batch_size),
            learning_rate: self.learning_rate.unwrap_or(lr),
            task: self.task(),
        }
    }

    /// The number of aggregators a single process runs: [`aggregators`](Self::aggregators), or
    /// one when it is unset (a cluster sets it to its size when it accepts the job).
    pub fn aggregator_count(&self) -> u32 {
        self.aggregators.unwrap_or(1)
    }

    /// Check what can be checked without the data.
    pub fn validate(&self) -> Result<(), Error> {
        let field = |name: &str, reason: String| Err(Error::Field { field: name.to_string(), reason });
        let r = self.resolve();
        if self.trainers == 0 {
            return field("trainers", "must be at least 1".into());
        }
        if self.aggregators == Some(0) {
            return field("aggregators", "must be at least 1".into());
        }
        if self.partitions == 0 {
            return field("partitions", "must be at least 1".into());
        }
        if self.trainers > self.partitions {
            return field(
                "trainers",
                format!(
                    "{} trainers but only {} partitions: a trainer would have nothing to do",
                    self.trainers, self.partitions
                ),
            );
        }
        if r.epochs == 0 {
            return field("epochs", "must be at least 1".into());
        }
        if r.batch_size == 0 {
            return field("batch_size", "must be at least 1".into());
        }
        if !(r.learning_rate.is_finite() && r.learning_rate > 0.0) {
            return field("learning_rate", format!("{} is not a positive number", r.learning_rate));
        }
        if !(0.0..1.0).contains(&self.test_fraction) {
            return field("test_fraction", format!("{} is not in [0, 1)", self.test_fraction));
        }
        if self.model.builtin().is_some() && self.model_config.is_some() {
            return field(
                "model_config",
                format!("the built-in model {} takes no model_config (the MLP's width is `hidden`)", self.model),
            );
        }
        if self.implied_task().is_none() {
            return field(
                "task",
                format!(
                    "model {} on dataset {} implies no task: set task = \"regression\" or \"classification\"",
                    self.model, self.dataset
                ),
            );
        }
        if self.model == ModelKind::Mlp && self.hidden == 0 {
            return field("hidden", "must be at least 1".into());
        }
        if self.model == ModelKind::Linear && r.task == TaskKind::Classification {
            return field("model", "linear regression needs a regression task (use softmax or mlp for classes)".into());
        }
        if self.model == ModelKind::Softmax && r.task == TaskKind::Regression {
            return field("model", "softmax regression needs a classification task (use linear or mlp)".into());
        }
        if let Some(f) = self.fail.first() {
            crate::require_fault_injection(crate::FAULT_INJECTION, "fail", f)?;
        }
        for f in &self.fail {
            let count = match f.actor.role {
                phalanx_actors::protocol::Role::Trainer => self.trainers,
                phalanx_actors::protocol::Role::Shard => self.partitions,
                // Unset on a cluster until its coordinator accepts the job (one per node); every
                // node checks again then, with the number fixed.
                phalanx_actors::protocol::Role::Aggregator => match self.aggregators {
                    Some(n) => n,
                    None => continue,
                },
            };
            if f.actor.index >= count {
                return field("fail", format!("{f}: there are only {count} {}s (indices 0..{count})", f.actor.role));
            }
        }
        if self.resume && self.out.is_none() {
            return field("resume", "needs an output directory (--out) holding checkpoints/".into());
        }
        Ok(())
    }

    /// What the model registry is asked to build, once the data fix the shape: a built-in gets
    /// `{"hidden": hidden}` as its config, a registered model its `model_config` (`null` when
    /// absent).
    pub fn model_request(&self, inputs: usize, outputs: usize, head: Head) -> ModelRequest {
        let config = match (self.model.builtin(), &self.model_config) {
            (Some(_), _) => serde_json::json!({ "hidden": self.hidden }),
            (None, Some(config)) => config.0.clone(),
            (None, None) => serde_json::Value::Null,
        };
        ModelRequest::new(self.model.clone(), inputs, outputs, head, config)
    }

    /// The restart policy for every role.
    pub fn restart_policy(&self) -> RestartPolicy {
        RestartPolicy { max_restarts: self.max_restarts, window_ms: self.restart_window_ms, ..RestartPolicy::default() }
    }
}

fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_job_file_fields_parse_and_defaults_fill_the_rest() {
        let c = JobConfig::from_toml_str(
            "model = \"mlp\"\ndataset = \"winequality\"\ntrainers = 4\nfail = [\"trainer:1@20\", \"aggregator@50\"]\n",
        )
        .unwrap();
        assert_eq!(c.model, ModelKind::Mlp);
        assert_eq!(c.trainers, 4);
        assert_eq!(c.partitions, DEFAULT_PARTITIONS);
        assert_eq!(c.fail.len(), 2);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_toml_field_is_named_with_its_line() {
        let e = JobConfig::from_toml_str("model = \"mlp\"\nepoch = 3\n").unwrap_err().to_string();
        assert!(e.contains("epoch"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn wrong_types_and_values_are_named() {
        let e = JobConfig::from_toml_str("trainers = \"two\"\n").unwrap_err().to_string();
        assert!(e.contains("trainers"), "{e}");
        // Any well-formed name parses (a registry decides whether it exists); a malformed one
        // does not.
        let e = JobConfig::from_toml_str("model = \"c n n\"\n").unwrap_err().to_string();
        assert!(e.contains("c n n") && e.contains("model"), "{e}");
        let e = JobConfig::from_toml_str("fail = [\"trainer:x@3\"]\n").unwrap_err().to_string();
        assert!(e.contains("trainer:x@3"), "{e}");
    }

    #[test]
    fn a_registered_model_and_source_with_a_model_config_parse_and_round_trip() {
        let text = "model = \"quadratic\"\ndataset = \"rings:600\"\ntask = \"classification\"\n\n[model_config]\ndegree = 2\nscale = [0.5, 1.5]\n";
        let c = JobConfig::from_toml_str(text).unwrap();
        assert_eq!(c.model, "quadratic");
        assert_eq!(c.model.builtin(), None);
        assert_eq!(c.dataset.to_string(), "rings:600");
        assert_eq!(c.model_config.as_ref().unwrap().0, serde_json::json!({"degree": 2, "scale": [0.5, 1.5]}));
        c.validate().unwrap();
        let request = c.model_request(2, 3, Head::Classification);
        assert_eq!(request.config, serde_json::json!({"degree": 2, "scale": [0.5, 1.5]}));
        // A job file written back (as `phalanx local` hands jobs to its nodes) reads the same.
        let back = JobConfig::from_toml_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        // A built-in gets its width as config, as before registries.
        let mlp = JobConfig { model: ModelKind::Mlp.into(), hidden: 7, ..JobConfig::default() };
        assert_eq!(mlp.model_request(4, 3, Head::Classification).config, serde_json::json!({"hidden": 7}));
        let back = JobConfig::from_toml_str(&toml::to_string(&mlp).unwrap()).unwrap();
        assert_eq!(back, mlp);
    }

    #[test]
    fn a_job_with_a_model_config_crosses_the_wire_codec_intact() {
        // Nodes pass jobs to each other as bincode headers, which cannot decode a
        // self-describing value: the config travels as its JSON text.
        let job = JobConfig {
            model: "quadratic".parse().unwrap(),
            model_config: Some(serde_json::json!({"init_scale": 0.05, "layers": [3, {"w": true}]}).into()),
            dataset: "rings:2400".parse().unwrap(),
            task: Some(TaskKind::Classification),
            ..JobConfig::default()
        };
        let limits = phalanx_transport::Limits::default();
        let wire = phalanx_transport::encode(&job, &[], &limits).unwrap();
        let back =
            phalanx_transport::decode::<JobConfig>(&wire[phalanx_transport::codec::PREFIX_BYTES..], &limits).unwrap();
        assert_eq!(back.header, job);
    }

    #[test]
    fn unset_aggregators_mean_one_per_node_spread_and_one_in_a_process() {
        let c = JobConfig::default();
        assert_eq!((c.aggregators, c.aggregator_placement), (None, AggregatorPlacement::Spread));
        assert_eq!(c.aggregator_count(), 1);
        // A job file without the field stays unset through TOML (for the coordinator to fix)...
        let back: JobConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.aggregators, None);
        // ...and one that sets it keeps its number and placement.
        let set: JobConfig = toml::from_str("aggregators = 3\naggregator_placement = \"coordinator\"").unwrap();
        assert_eq!((set.aggregators, set.aggregator_count()), (Some(3), 3));
        assert_eq!(set.aggregator_placement, AggregatorPlacement::Coordinator);
    }

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(JobConfig, &str)> = vec![
            (JobConfig { trainers: 0, ..JobConfig::default() }, "trainers"),
            (JobConfig { trainers: 9, ..JobConfig::default() }, "trainers"),
            (JobConfig { aggregators: Some(0), ..JobConfig::default() }, "aggregators"),
            (JobConfig { epochs: Some(0), ..JobConfig::default() }, "epochs"),
            (JobConfig { batch_size: Some(0), ..JobConfig::default() }, "batch_size"),
            (JobConfig { test_fraction: 1.0, ..JobConfig::default() }, "test_fraction"),
            (JobConfig { learning_rate: Some(-1.0), ..JobConfig::default() }, "learning_rate"),
            (
                JobConfig { model: ModelKind::Linear.into(), dataset: DatasetSource::Iris, ..JobConfig::default() },
                "model",
            ),
            (
                JobConfig { model_config: Some(serde_json::json!({"hidden": 3}).into()), ..JobConfig::default() },
                "model_config",
            ),
            (
                JobConfig {
                    model: "quadratic".parse().unwrap(),
                    dataset: "rings".parse().unwrap(),
                    ..JobConfig::default()
                },
                "task",
            ),
            (JobConfig { fail: vec!["trainer:5@3".parse().unwrap()], ..JobConfig::default() }, "fail"),
            (JobConfig { resume: true, ..JobConfig::default() }, "resume"),
        ];
        for (c, field) in cases {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        }
    }
}
