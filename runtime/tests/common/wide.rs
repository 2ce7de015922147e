//! A user model and an in-process cluster for the tests of what a node does under load
//! (`slow_step.rs`, `large_checkpoint.rs`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayView2};
use phalanx::{
    DataRegistry, DataRequest, Head, Model, ModelError, ModelRegistry, Node, NodeEvent, NodeEventKind, NodeHandle,
    Targets, TensorInfo,
};
use phalanx_actors::data::splitmix64;
use tokio_stream::StreamExt;

/// `pred = a·w0 + b·w1 + w2` over `params` weights (all but the first three carried, and
/// checkpointed, untouched), whose every gradient takes `step` of CPU.
#[derive(Debug, Clone, Copy)]
pub struct Wide {
    /// Parameters of the model.
    pub params: usize,
    /// CPU time of every gradient.
    pub step: Duration,
}

impl Wide {
    fn pred(params: &[f32], row: ndarray::ArrayView1<'_, f32>) -> f32 {
        row[0] * params[0] + row[1] * params[1] + params[2]
    }

    /// Models `name` (this model) and `plane` (`rows` rows of `y = 2a − b + 0.5`).
    pub fn registries(self, name: &str, rows: u64) -> (ModelRegistry, DataRegistry) {
        let mut models = ModelRegistry::default();
        models.register(name, move |_| Ok(Box::new(self) as Box<dyn Model>)).unwrap();
        let mut data = DataRegistry::default();
        data.register("plane", move |request: &DataRequest<'_>| super::plane(rows, 0.0, request)).unwrap();
        (models, data)
    }
}

impl Model for Wide {
    fn num_params(&self) -> usize {
        self.params
    }
    fn layout(&self) -> Vec<TensorInfo> {
        vec![TensorInfo { name: "w".into(), shape: vec![self.params], offset: 0 }]
    }
    fn init_params(&self, seed: u64) -> Vec<f32> {
        (0..self.params as u64).map(|i| ((splitmix64(seed ^ i) >> 40) as f32 / 16_777_216.0 - 0.5) * 0.2).collect()
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
        // Real CPU work for `step`: a long step, as a large model's would be.
        let started = Instant::now();
        let mut spin = 0u64;
        while started.elapsed() < self.step {
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

/// `n` nodes in this process on loopback (fresh certificates and data directories under the
/// returned directory), each with the registries `registries` makes.
pub async fn start_nodes(
    n: u32,
    registries: impl Fn() -> (ModelRegistry, DataRegistry),
) -> (tempfile::TempDir, Vec<NodeHandle>) {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    phalanx_transport::certs::generate(&certs, n).unwrap();
    let ports = super::free_udp_ports(n as usize);
    let addr = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], ports[i]));
    let mut nodes = Vec::new();
    for i in 0..n {
        let (models, data) = registries();
        let node = Node::builder()
            .id(i)
            .listen(addr(i as usize))
            .seeds((0..n as usize).filter(|j| *j != i as usize).map(addr).collect())
            .certs_dir(&certs)
            .data_dir(dir.path().join(format!("data-{i}")))
            .models(models)
            .datasets(data)
            .start()
            .await
            .expect("node starts");
        nodes.push(node);
    }
    (dir, nodes)
}

/// Every `down` and `quorum_lost` any of the nodes reports from now on.
pub struct Failures {
    seen: Arc<Mutex<Vec<NodeEvent>>>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

impl Failures {
    /// Start watching `nodes`.
    pub fn watch(nodes: &[NodeHandle]) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let watchers = nodes
            .iter()
            .map(|n| {
                let (mut events, seen) = (n.events(), seen.clone());
                tokio::spawn(async move {
                    while let Some(e) = events.next().await {
                        if matches!(e.kind, NodeEventKind::Down { .. } | NodeEventKind::QuorumLost { .. }) {
                            seen.lock().unwrap().push(e);
                        }
                    }
                })
            })
            .collect();
        Self { seen, watchers }
    }

    /// What was reported so far.
    pub fn seen(&self) -> Vec<NodeEvent> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Failures {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}
