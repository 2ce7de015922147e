//! A training step of two seconds causes no false failure detection: three nodes in this
//! process (a 2-thread runtime, as on a 2-core machine) train a user model whose every
//! gradient takes 2 s of CPU. The trainers would hold every tokio worker for the whole
//! step, and with them the node loops and their heartbeats (500 ms failure timeout), if the
//! computation ran on the workers; it runs off them, so no node is declared down and the job
//! finishes. (Its bits are the plain loop's like any job's: not recomputed here, where every
//! gradient costs 2 s.)

mod common;

use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView2};
use phalanx::{
    DataRegistry, DataRequest, Head, JobConfig, Model, ModelError, ModelRegistry, ModelRequest, Node, NodeEventKind,
    PreparedJob, Table, Targets, TaskKind, TensorInfo,
};
use phalanx_actors::data::splitmix64;
use tokio_stream::StreamExt;

/// How long each gradient computes.
const STEP: Duration = Duration::from_secs(2);

/// Parameters of the model: enough to count as a large model (see
/// `phalanx_actors::actor::OFFLOAD_PARAMS`); all but the first three are unused weights.
const PARAMS: usize = 1 << 17;

/// `pred = a·w0 + b·w1 + w2`, with a gradient that takes [`STEP`] of CPU.
#[derive(Debug)]
struct Slow;

impl Slow {
    fn pred(params: &[f32], row: ndarray::ArrayView1<'_, f32>) -> f32 {
        row[0] * params[0] + row[1] * params[1] + params[2]
    }
}

impl Model for Slow {
    fn num_params(&self) -> usize {
        PARAMS
    }
    fn layout(&self) -> Vec<TensorInfo> {
        vec![TensorInfo { name: "w".into(), shape: vec![PARAMS], offset: 0 }]
    }
    fn init_params(&self, seed: u64) -> Vec<f32> {
        (0..PARAMS as u64).map(|i| ((splitmix64(seed ^ i) >> 40) as f32 / 16_777_216.0 - 0.5) * 0.2).collect()
    }
    fn loss_grad(
        &self,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        y: Targets<'_>,
        grad: &mut [f32],
    ) -> Result<f64, ModelError> {
        let Targets::Real(y) = y else {
            return Err(ModelError::TargetKind { head: Head::Regression, expected: "real", got: "class" });
        };
        // Real CPU work for STEP: a long step, as a large model's would be.
        let started = Instant::now();
        let mut spin = 0u64;
        while started.elapsed() < STEP {
            spin = std::hint::black_box(spin.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        grad.fill(0.0);
        let mut loss = 0.0f64;
        for (row, &t) in x.rows().into_iter().zip(y) {
            let r = Self::pred(params, row) - t;
            loss += 0.5 * f64::from(r) * f64::from(r);
            grad[0] += r * row[0];
            grad[1] += r * row[1];
            grad[2] += r;
        }
        Ok(loss)
    }
    fn loss(&self, params: &[f32], x: ArrayView2<'_, f32>, y: Targets<'_>) -> Result<f64, ModelError> {
        let Targets::Real(y) = y else {
            return Err(ModelError::TargetKind { head: Head::Regression, expected: "real", got: "class" });
        };
        Ok(x.rows().into_iter().zip(y).map(|(row, &t)| 0.5 * f64::from(Self::pred(params, row) - t).powi(2)).sum())
    }
    fn predict(&self, params: &[f32], x: ArrayView2<'_, f32>) -> Result<Array2<f32>, ModelError> {
        Ok(Array2::from_shape_fn((x.nrows(), 1), |(i, _)| Self::pred(params, x.row(i))))
    }
}

fn slow(_: &ModelRequest) -> Result<Box<dyn Model>, ModelError> {
    Ok(Box::new(Slow))
}

/// 96 rows of `y = 2a − b + 0.5`.
fn plane(request: &DataRequest<'_>) -> Result<Table, phalanx_actors::data::DataError> {
    common::plane(96, 0.0, request)
}

fn registries() -> (ModelRegistry, DataRegistry) {
    let mut models = ModelRegistry::default();
    models.register("slow", slow).unwrap();
    let mut data = DataRegistry::default();
    data.register("plane", plane).unwrap();
    (models, data)
}

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
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    phalanx_transport::certs::generate(&certs, 3).unwrap();
    let ports = common::free_udp_ports(3);
    let addr = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], ports[i]));
    let mut nodes = Vec::new();
    for i in 0..3u32 {
        let (models, data) = registries();
        let node = Node::builder()
            .id(i)
            .listen(addr(i as usize))
            .seeds((0..3).filter(|j| *j != i as usize).map(addr).collect())
            .certs_dir(&certs)
            .data_dir(dir.path().join(format!("data-{i}")))
            .models(models)
            .datasets(data)
            .start()
            .await
            .expect("node starts");
        nodes.push(node);
    }
    // Every node's failure reports, collected while the job runs.
    let downs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let watchers: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (mut events, downs) = (n.events(), downs.clone());
            tokio::spawn(async move {
                while let Some(e) = events.next().await {
                    if matches!(e.kind, NodeEventKind::Down { .. } | NodeEventKind::QuorumLost { .. }) {
                        downs.lock().unwrap().push(e);
                    }
                }
            })
        })
        .collect();
    let job = nodes[0].submit(job()).await.expect("accepted");
    let result =
        tokio::time::timeout(Duration::from_secs(120), job.outcome()).await.expect("bounded").expect("finishes");

    let (models, data) = registries();
    let prepared = PreparedJob::with_registries(self::job(), &models, &data).expect("job");
    assert!(prepared.schedule.steps_per_epoch >= 2, "several long steps");
    assert_eq!(result.model_sha256.len(), 64);

    // The job is over and every node still up: nothing was declared down while it ran.
    let downs = downs.lock().unwrap().clone();
    assert!(downs.is_empty(), "false failure detection during 2 s steps: {downs:?}");
    for w in watchers {
        w.abort();
    }
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}
