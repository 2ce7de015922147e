//! A 100 MiB checkpoint copy causes no false failure detection: three nodes in this process
//! (a 2-thread runtime, as on a 2-core machine) train a model of 26 Mi parameters (100 MiB of
//! f32, plain SGD: the checkpoint file is that size), checkpointing every step, so every step
//! sends a 100 MiB copy from the coordinator to its replica over QUIC, where it is written,
//! fsynced and verified. The copies share the connection with the heartbeats (500 ms failure
//! timeout), and the replica's disk work shares the process with the node loops; both stay off
//! the loops, so no node is declared down, and every copy is acknowledged.

mod common;

use std::time::Duration;

use ndarray::{Array2, ArrayView2};
use phalanx::{
    DataRegistry, DataRequest, Head, JobConfig, Model, ModelError, ModelRegistry, ModelRequest, Node, NodeEventKind,
    Table, Targets, TaskKind, TensorInfo,
};
use phalanx_actors::optim::OptimizerKind;
use tokio_stream::StreamExt;

/// 100 MiB of f32.
const PARAMS: usize = 100 << 18;

/// `pred = a·w0 + b·w1 + w2`; every other weight is carried (and checkpointed) untouched.
#[derive(Debug)]
struct Wide;

impl Wide {
    fn pred(params: &[f32], row: ndarray::ArrayView1<'_, f32>) -> f32 {
        row[0] * params[0] + row[1] * params[1] + params[2]
    }
}

impl Model for Wide {
    fn num_params(&self) -> usize {
        PARAMS
    }
    fn layout(&self) -> Vec<TensorInfo> {
        vec![TensorInfo { name: "w".into(), shape: vec![PARAMS], offset: 0 }]
    }
    fn init_params(&self, _seed: u64) -> Vec<f32> {
        vec![0.0; PARAMS]
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

fn wide(_: &ModelRequest) -> Result<Box<dyn Model>, ModelError> {
    Ok(Box::new(Wide))
}

/// 32 rows of `y = 2a − b + 0.5`.
fn plane(request: &DataRequest<'_>) -> Result<Table, phalanx_actors::data::DataError> {
    common::plane(32, 0.0, request)
}

fn registries() -> (ModelRegistry, DataRegistry) {
    let mut models = ModelRegistry::default();
    models.register("wide", wide).unwrap();
    let mut data = DataRegistry::default();
    data.register("plane", plane).unwrap();
    (models, data)
}

fn job() -> JobConfig {
    JobConfig {
        model: "wide".parse().unwrap(),
        dataset: "plane".parse().unwrap(),
        task: Some(TaskKind::Regression),
        // One trainer beside the aggregator: the only large traffic is the checkpoint copies.
        trainers: 1,
        partitions: 1,
        batch_size: Some(32),
        epochs: Some(4),
        optimizer: OptimizerKind::Sgd,
        checkpoint_every: 1,
        ..JobConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_checkpoint_copy_causes_no_false_failure_detection() {
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
        tokio::time::timeout(Duration::from_secs(300), job.outcome()).await.expect("bounded").expect("finishes");

    let downs = downs.lock().unwrap().clone();
    assert!(downs.is_empty(), "false failure detection during 100 MiB checkpoint copies: {downs:?}");
    // The copies really went: the replica acknowledged every checkpoint's.
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(result.summary.expect("summary written")).unwrap()).unwrap();
    let acknowledged = summary["replication"]["copies_acknowledged"].as_u64().unwrap_or(0);
    assert!(acknowledged >= 3, "100 MiB copies acknowledged: {}", summary["replication"]);
    let copies: Vec<_> =
        std::fs::read_dir(dir.path().join("data-1").join("jobs").join(result.id.to_string()).join("checkpoints"))
            .map(|d| d.flatten().filter(|e| e.metadata().is_ok_and(|m| m.len() >= 100 << 20)).collect())
            .unwrap_or_default();
    assert!(!copies.is_empty(), "a 100 MiB copy on the replica");
    for w in watchers {
        w.abort();
    }
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}
