//! Models and data sources of the user's own, plugged in by name: a registered
//! model on a registered source trains to the same bits on any deployment and
//! through injected failures (as the built-ins do), its model file carries its
//! request and predicts through the registry; a job naming a model or source
//! that a registry lacks fails with an error naming the field, the name and
//! what there is — from `train_with`, `PreparedJob` and a node alike, never a
//! crash. Registries belong to their owner: two in one process differ.

mod common;

use common::{assert_exactly_once, sha};
use ndarray::{Array2, ArrayView2};
use phalanx::{
    params_sha256, DataRegistry, DataRequest, Error, Head, JobConfig, Model, ModelError, ModelRegistry, ModelRequest,
    PreparedJob, Table, Targets, TaskKind, TensorInfo,
};
use phalanx_actors::data::splitmix64;

/// A user model: `pred = x·w + b` with `½(pred − y)²` per row, in plain loops.
#[derive(Debug)]
struct Affine {
    inputs: usize,
}

impl Affine {
    fn check(&self, params: &[f32], x: ArrayView2<'_, f32>) -> Result<(), ModelError> {
        if params.len() != self.num_params() {
            return Err(ModelError::ParamLength { expected: self.num_params(), got: params.len() });
        }
        if x.ncols() != self.inputs {
            return Err(ModelError::InputWidth { expected: self.inputs, got: x.ncols() });
        }
        Ok(())
    }

    fn targets<'a>(&self, x: ArrayView2<'_, f32>, y: Targets<'a>) -> Result<&'a [f32], ModelError> {
        let Targets::Real(y) = y else {
            return Err(ModelError::TargetKind { head: Head::Regression, expected: "real", got: "class" });
        };
        if y.len() != x.nrows() {
            return Err(ModelError::TargetCount { rows: x.nrows(), targets: y.len() });
        }
        Ok(y)
    }

    fn pred(&self, params: &[f32], row: ndarray::ArrayView1<'_, f32>) -> f32 {
        row.iter().zip(params).fold(params[self.inputs], |acc, (v, w)| acc + v * w)
    }
}

impl Model for Affine {
    fn num_params(&self) -> usize {
        self.inputs + 1
    }
    fn layout(&self) -> Vec<TensorInfo> {
        vec![
            TensorInfo { name: "w".into(), shape: vec![self.inputs], offset: 0 },
            TensorInfo { name: "b".into(), shape: vec![1], offset: self.inputs },
        ]
    }
    fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut p: Vec<f32> =
            (0..self.inputs as u64).map(|i| ((splitmix64(seed ^ i) >> 40) as f32 / 16_777_216.0 - 0.5) * 0.2).collect();
        p.push(0.0);
        p
    }
    fn loss_grad(
        &self,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        y: Targets<'_>,
        grad: &mut [f32],
    ) -> Result<f64, ModelError> {
        self.check(params, x)?;
        let y = self.targets(x, y)?;
        if grad.len() != self.num_params() {
            return Err(ModelError::GradLength { expected: self.num_params(), got: grad.len() });
        }
        grad.fill(0.0);
        let mut loss = 0.0f64;
        for (row, &t) in x.rows().into_iter().zip(y) {
            let r = self.pred(params, row) - t;
            loss += 0.5 * f64::from(r) * f64::from(r);
            for (g, v) in grad.iter_mut().zip(row) {
                *g += r * v;
            }
            grad[self.inputs] += r;
        }
        Ok(loss)
    }
    fn loss(&self, params: &[f32], x: ArrayView2<'_, f32>, y: Targets<'_>) -> Result<f64, ModelError> {
        let mut grad = vec![0.0; self.num_params()];
        self.loss_grad(params, x, y, &mut grad)
    }
    fn predict(&self, params: &[f32], x: ArrayView2<'_, f32>) -> Result<Array2<f32>, ModelError> {
        self.check(params, x)?;
        Ok(Array2::from_shape_fn((x.nrows(), 1), |(i, _)| self.pred(params, x.row(i))))
    }
}

fn affine(request: &ModelRequest) -> Result<Box<dyn Model>, ModelError> {
    if request.head != Head::Regression {
        return Err(ModelError::InvalidConfig { model: request.name.to_string(), reason: "a regression model".into() });
    }
    Ok(Box::new(Affine { inputs: request.inputs }))
}

/// `plane`: 400 rows of `y = 2a − b + 0.5 + noise`, each a function of its index.
fn plane(request: &DataRequest<'_>) -> Result<Table, phalanx_actors::data::DataError> {
    common::plane(400, 0.1, request)
}

fn registries() -> (ModelRegistry, DataRegistry) {
    let mut models = ModelRegistry::default();
    models.register("affine", affine).unwrap();
    let mut data = DataRegistry::default();
    data.register("plane", plane).unwrap();
    (models, data)
}

fn job() -> JobConfig {
    JobConfig {
        model: "affine".parse().unwrap(),
        dataset: "plane".parse().unwrap(),
        task: Some(TaskKind::Regression),
        epochs: Some(30),
        learning_rate: Some(0.05),
        checkpoint_every: 10,
        checkpoint_min_interval_ms: 0,
        seed: 7,
        ..JobConfig::default()
    }
}

async fn train(config: JobConfig) -> Result<(PreparedJob, phalanx::TrainReport), Error> {
    let (models, data) = registries();
    tokio::time::timeout(common::JOB_BOUND, phalanx::train_with(config, &models, &data, |_| {}))
        .await
        .expect("job finished within the bound")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_model_on_a_registered_source_is_deployment_independent_and_survives_failures() {
    let (models, data) = registries();
    let plain = PreparedJob::with_registries(job(), &models, &data).unwrap();
    let expected = params_sha256(&plain.reference_params().unwrap());
    let total = plain.schedule.total_steps();
    for (trainers, aggregators) in [(1, 1), (4, 2)] {
        let (job, report) = train(JobConfig { trainers, aggregators: Some(aggregators), ..job() }).await.unwrap();
        assert_eq!(sha(&report), expected, "{trainers} trainers, {aggregators} aggregators");
        assert_exactly_once(&job, &report);
    }
    let faults = vec![
        format!("trainer:1@{}", total / 4).parse().unwrap(),
        format!("aggregator@{}", total / 2 + 1).parse().unwrap(),
    ];
    let (_, report) = train(JobConfig { trainers: 3, aggregators: Some(2), fail: faults, ..job() }).await.unwrap();
    assert_eq!(report.outcome.faults.len(), 2, "{:?}", report.outcome.faults);
    assert_eq!(sha(&report), expected, "faulty run bit-identical to the fault-free one");
    // It trains: close to the least-squares fit of the same split.
    let metric = &report.evaluation.metric;
    assert!(metric.least_squares_r2.is_some_and(|best| metric.value > best - 0.02), "{metric:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_model_file_records_its_request_and_predicts_through_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (job, report) = train(job()).await.unwrap();
    phalanx::write_outputs(dir.path(), &job, &report).unwrap();
    let file = dir.path().join("model.safetensors");
    let (models, _) = registries();
    let model = phalanx::predict::TrainedModel::load_with(&file, &models).unwrap();
    assert_eq!((model.spec.name.as_str(), model.spec.inputs, model.spec.head), ("affine", 2, Head::Regression));
    assert!(model.metadata.contains_key("model_request") && !model.metadata.contains_key("model_spec"));
    let rows = ndarray::array![[1.0f32, 0.5], [-1.0, 1.0]];
    let predictions = model.predict(&rows).unwrap();
    for (p, want) in predictions.iter().zip([2.0, -2.5]) {
        let phalanx::predict::Prediction::Value(v) = p else { panic!("{p:?}") };
        assert!((v - want).abs() < 0.2, "{v} vs {want}");
    }
    // Without the registry that has it, the file names the model it needs.
    let err = phalanx::predict::TrainedModel::load(&file).unwrap_err().to_string();
    assert!(err.contains("affine") && err.contains("model_request"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_and_sources_are_errors_naming_the_field_and_the_known_names() {
    // The default registry (what `train` uses) has neither.
    let err = phalanx::train(job(), |_| {}).await.err().expect("an error");
    assert!(matches!(&err, Error::UnknownDataset { dataset, .. } if dataset == "plane"), "{err}");
    let message = err.to_string();
    assert!(message.contains("`dataset`") && message.contains("iris") && message.contains("csv:PATH"), "{message}");

    let (models, data) = registries();
    let known_data_only = JobConfig { dataset: "plane".parse().unwrap(), ..job() };
    let err = PreparedJob::with_registries(known_data_only, &ModelRegistry::default(), &data).err().expect("an error");
    assert!(matches!(&err, Error::UnknownModel { model, known } if model == "affine" && known.len() == 3), "{err}");
    let message = err.to_string();
    assert!(message.contains("`model`") && message.contains("\"affine\"") && message.contains("mlp"), "{message}");

    // Two registries in one process: the same job builds with one and not the other.
    assert!(PreparedJob::with_registries(job(), &models, &data).is_ok());
    let err = PreparedJob::with_registries(job(), &ModelRegistry::empty(), &data).err().expect("an error");
    assert!(matches!(err, Error::UnknownModel { ref known, .. } if known.is_empty()), "{err}");

    // A factory's own complaint names the field it came from.
    let classify = JobConfig { dataset: phalanx::DatasetSource::Iris, task: None, ..job() };
    let err = PreparedJob::with_registries(classify, &models, &data).err().expect("an error").to_string();
    assert!(err.contains("`model_config`") && err.contains("affine"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_registry_lacks_the_model_refuses_the_job_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    phalanx_transport::certs::generate(&certs, 1).unwrap();
    let (_, data) = registries();
    let err = phalanx::Node::builder()
        .id(0)
        .nodes(1)
        .certs_dir(&certs)
        .data_dir(dir.path().join("data"))
        .datasets(data)
        .job(job())
        .start()
        .await
        .expect_err("the node refuses the job")
        .to_string();
    assert!(err.contains("`model`") && err.contains("affine"), "{err}");
    // With the model registered, the same node starts.
    let (models, data) = registries();
    let node = phalanx::Node::builder()
        .id(0)
        .nodes(1)
        .certs_dir(&certs)
        .data_dir(dir.path().join("data"))
        .models(models)
        .datasets(data)
        .job(job())
        .start()
        .await
        .expect("the node starts");
    node.shutdown().await.unwrap();
}
