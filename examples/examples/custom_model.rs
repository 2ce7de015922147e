//! A model of your own, trained through the registry on three node processes,
//! one of them killed mid-job — ending with the same bits as a fault-free run.
//!
//! cargo run --release -p phalanx-examples --example custom_model
//!
//! The model (`quadratic`: softmax regression on the features and their
//! squares) and the data (`rings`: three concentric rings, which no linear
//! model separates) are defined here, not in Phalanx. Both go into registries:
//! a job names them (`model = "quadratic"`, `dataset = "rings:2400"`) and
//! every node that runs the job builds them from its own registries.
//!
//! Without arguments the example
//! 1. trains the job in this process with `phalanx::train_with` (fault-free);
//! 2. writes certificates and starts three nodes as processes of this same
//!    binary (`custom_model node --id N --dir DIR --ports P0,P1,P2`), each
//!    embedding a node with `Node::builder().models(..).datasets(..)`;
//! 3. SIGKILLs node 2 (a trainer node) once a tenth of the steps are applied;
//! 4. waits for the survivors' `job_done` and compares `model_sha256` with
//!    step 1. The last line of stdout is a JSON object with the result; the
//!    exit code is 1 when the bits differ or the kill did not take effect.
//!
//! Every wait is bounded and waits on the nodes' JSON events (one per line on
//! their stdout), never on a sleep.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use phalanx::ndarray::{Array2, ArrayView1, ArrayView2};
use phalanx::{
    DataError, DataRegistry, DataRequest, Head, JobConfig, Model, ModelError, ModelRegistry, ModelRequest, Node,
    NodeEvent, NodeEventKind, Table, Targets, TaskKind, TensorInfo,
};
use phalanx_actors::data::splitmix64;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

/// Nodes in the cluster.
const NODES: u32 = 3;
/// The node killed mid-job: it runs a trainer, not the coordinator (node 0).
const KILLED: u32 = 2;
/// Bound on every wait: a hang fails instead of blocking forever.
const WAIT: Duration = Duration::from_secs(180);

// ------------------------------------------------------------------------------------------
// The model: your own, not one of Phalanx's.
// ------------------------------------------------------------------------------------------

/// Softmax regression on the features and their squares:
/// `logits = x·A + (x⊙x)·B + c`, softmax cross-entropy per row.
///
/// Flat layout: `a` `[inputs × classes]`, `b` `[inputs × classes]`, `c` `[classes]`.
///
/// It keeps the determinism contract of [`Model`]: plain loops in a fixed order on one thread,
/// randomness only from the seed, errors instead of panics.
#[derive(Debug)]
struct Quadratic {
    inputs: usize,
    classes: usize,
    /// Initial weights are uniform in `[-init_scale, init_scale]`.
    init_scale: f32,
}

/// The `[model_config]` the quadratic model reads.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QuadraticConfig {
    #[serde(default = "default_init_scale")]
    init_scale: f32,
}

fn default_init_scale() -> f32 {
    0.1
}

/// The factory the registry calls with the job's request.
fn quadratic(request: &ModelRequest) -> Result<Box<dyn Model>, ModelError> {
    let config: QuadraticConfig = request.parse_config()?;
    let invalid = |reason: &str| ModelError::InvalidConfig { model: request.name.to_string(), reason: reason.into() };
    if request.head != Head::Classification || request.outputs < 2 {
        return Err(invalid("quadratic is a classifier: the job's task must be classification"));
    }
    if !(config.init_scale.is_finite() && config.init_scale > 0.0) {
        return Err(invalid("init_scale must be a positive number"));
    }
    if request.inputs == 0 || request.inputs.checked_mul(request.outputs).is_none_or(|n| n > 1 << 24) {
        return Err(invalid("between 1 and 2^24 weights per matrix"));
    }
    Ok(Box::new(Quadratic { inputs: request.inputs, classes: request.outputs, init_scale: config.init_scale }))
}

/// The three tensors of a parameter vector.
#[derive(Clone, Copy)]
struct Parts<'a> {
    a: &'a [f32],
    b: &'a [f32],
    c: &'a [f32],
}

impl Quadratic {
    fn weights(&self) -> usize {
        self.inputs * self.classes
    }

    /// `A`, `B` and `c` after checking the length.
    fn split<'a>(&self, params: &'a [f32]) -> Result<Parts<'a>, ModelError> {
        if params.len() != self.num_params() {
            return Err(ModelError::ParamLength { expected: self.num_params(), got: params.len() });
        }
        let (a, rest) = params.split_at(self.weights());
        let (b, c) = rest.split_at(self.weights());
        Ok(Parts { a, b, c })
    }

    /// Checks the batch; returns its labels.
    fn labels<'a>(&self, x: ArrayView2<'_, f32>, y: Targets<'a>) -> Result<&'a [u32], ModelError> {
        if x.ncols() != self.inputs {
            return Err(ModelError::InputWidth { expected: self.inputs, got: x.ncols() });
        }
        let Targets::Class(labels) = y else {
            return Err(ModelError::TargetKind { head: Head::Classification, expected: "class", got: "real" });
        };
        if labels.len() != x.nrows() {
            return Err(ModelError::TargetCount { rows: x.nrows(), targets: labels.len() });
        }
        if let Some((row, &label)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= self.classes) {
            return Err(ModelError::LabelOutOfRange { label, classes: self.classes, row });
        }
        Ok(labels)
    }

    /// The logits of one row into `out`, summed in a fixed order.
    fn logits(&self, Parts { a, b, c }: Parts<'_>, row: ArrayView1<'_, f32>, out: &mut [f32]) {
        out.copy_from_slice(c);
        for (i, &v) in row.iter().enumerate() {
            let square = v * v;
            let (ai, bi) = (&a[i * self.classes..][..self.classes], &b[i * self.classes..][..self.classes]);
            for k in 0..self.classes {
                out[k] += v * ai[k] + square * bi[k];
            }
        }
    }

    /// Softmax cross-entropy of one row; with `grad`, turns `z` into `∂loss/∂z`.
    fn head(z: &mut [f32], label: usize, grad: bool) -> f64 {
        let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let z_label = z[label];
        let mut sum = 0.0f32;
        for v in z.iter_mut() {
            let e = (*v - max).exp();
            sum += e;
            *v = e;
        }
        if grad {
            for v in z.iter_mut() {
                *v /= sum;
            }
            z[label] -= 1.0;
        }
        f64::from(sum).ln() + f64::from(max) - f64::from(z_label)
    }
}

impl Model for Quadratic {
    fn num_params(&self) -> usize {
        2 * self.weights() + self.classes
    }

    fn layout(&self) -> Vec<TensorInfo> {
        let shape = vec![self.inputs, self.classes];
        vec![
            TensorInfo { name: "a".into(), shape: shape.clone(), offset: 0 },
            TensorInfo { name: "b".into(), shape, offset: self.weights() },
            TensorInfo { name: "c".into(), shape: vec![self.classes], offset: 2 * self.weights() },
        ]
    }

    fn init_params(&self, seed: u64) -> Vec<f32> {
        // A pure function of the seed: value i comes from splitmix64(seed, i), top 24 bits.
        let mut params: Vec<f32> = (0..2 * self.weights() as u64)
            .map(|i| {
                let unit = (splitmix64(seed ^ splitmix64(i)) >> 40) as f32 / (1u64 << 24) as f32;
                (2.0 * unit - 1.0) * self.init_scale
            })
            .collect();
        params.resize(self.num_params(), 0.0);
        params
    }

    fn loss_grad(
        &self,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        y: Targets<'_>,
        grad: &mut [f32],
    ) -> Result<f64, ModelError> {
        let parts = self.split(params)?;
        if grad.len() != self.num_params() {
            return Err(ModelError::GradLength { expected: self.num_params(), got: grad.len() });
        }
        let labels = self.labels(x, y)?;
        grad.fill(0.0);
        let (ga, rest) = grad.split_at_mut(self.weights());
        let (gb, gc) = rest.split_at_mut(self.weights());
        let mut z = vec![0.0f32; self.classes];
        let mut loss = 0.0f64;
        for (row, &label) in x.rows().into_iter().zip(labels) {
            self.logits(parts, row, &mut z);
            loss += Self::head(&mut z, label as usize, true);
            for (i, &v) in row.iter().enumerate() {
                let square = v * v;
                for (k, &d) in z.iter().enumerate() {
                    ga[i * self.classes + k] += v * d;
                    gb[i * self.classes + k] += square * d;
                }
            }
            for (g, &d) in gc.iter_mut().zip(&z) {
                *g += d;
            }
        }
        Ok(loss)
    }

    fn loss(&self, params: &[f32], x: ArrayView2<'_, f32>, y: Targets<'_>) -> Result<f64, ModelError> {
        let parts = self.split(params)?;
        let labels = self.labels(x, y)?;
        let mut z = vec![0.0f32; self.classes];
        let mut loss = 0.0f64;
        for (row, &label) in x.rows().into_iter().zip(labels) {
            self.logits(parts, row, &mut z);
            loss += Self::head(&mut z, label as usize, false);
        }
        Ok(loss)
    }

    fn predict(&self, params: &[f32], x: ArrayView2<'_, f32>) -> Result<Array2<f32>, ModelError> {
        let parts = self.split(params)?;
        if x.ncols() != self.inputs {
            return Err(ModelError::InputWidth { expected: self.inputs, got: x.ncols() });
        }
        let mut out = Array2::zeros((x.nrows(), self.classes));
        let mut z = vec![0.0f32; self.classes];
        for (row, mut target) in x.rows().into_iter().zip(out.rows_mut()) {
            self.logits(parts, row, &mut z);
            target.iter_mut().zip(&z).for_each(|(t, v)| *t = *v);
        }
        Ok(out)
    }
}

// ------------------------------------------------------------------------------------------
// The data: a source of your own, plugged in by name.
// ------------------------------------------------------------------------------------------

/// Rows when the job names `rings` without a count.
const DEFAULT_RINGS: usize = 1200;

/// `rings` or `rings:N`: N points on three noisy concentric rings in the plane, the class being
/// the ring. Every point is a function of its index only, so every node (and every run) gets
/// the same rows in the same order.
fn rings(request: &DataRequest<'_>) -> Result<Table, DataError> {
    let rows =
        match request.arg {
            None => DEFAULT_RINGS,
            Some(arg) => arg.parse::<usize>().ok().filter(|n| (30..=1_000_000).contains(n)).ok_or_else(|| {
                DataError::BadSource { text: arg.into(), reason: "rings takes a row count: rings:1200" }
            })?,
        };
    let unit = |i: u64| (splitmix64(i) >> 40) as f32 / (1u64 << 24) as f32;
    let mut points = Vec::with_capacity(rows);
    let mut classes = Vec::with_capacity(rows);
    for i in 0..rows as u64 {
        let class = i % 3;
        let angle = std::f32::consts::TAU * unit(2 * i);
        let radius = 1.0 + class as f32 + 0.7 * (unit(2 * i + 1) - 0.5);
        points.push([radius * angle.cos(), radius * angle.sin()]);
        classes.push(class as f32);
    }
    Table::from_rows(request.name, vec!["x".into(), "y".into()], &points, &classes, request.task)
}

/// The built-ins plus this example's model and data source. Every process builds its own.
fn registries() -> anyhow::Result<(ModelRegistry, DataRegistry)> {
    let mut models = ModelRegistry::default();
    models.register("quadratic", quadratic)?;
    let mut datasets = DataRegistry::default();
    datasets.register("rings", rings)?;
    Ok((models, datasets))
}

/// The job: every node is given the same one.
fn job() -> anyhow::Result<JobConfig> {
    Ok(JobConfig {
        model: "quadratic".parse()?,
        model_config: Some(json!({ "init_scale": 0.05 }).into()),
        // 1920 training rows in batches of 32: 60 steps an epoch, 3000 steps. Long enough that
        // the kill lands mid-job however fast the machine (a step is a round trip between
        // processes), short enough to take seconds.
        dataset: "rings:2400".parse()?,
        task: Some(TaskKind::Classification),
        trainers: 3,
        epochs: Some(50),
        batch_size: Some(32),
        checkpoint_every: 20,
        ..JobConfig::default()
    })
}

// ------------------------------------------------------------------------------------------
// One node: what each child process runs.
// ------------------------------------------------------------------------------------------

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Runs node `id` until stdin closes, printing its events as JSON lines on stdout (the last
/// one `stopped`, once it has shut down).
async fn node(id: u32, dir: &Path, ports: &[u16]) -> anyhow::Result<()> {
    let (models, datasets) = registries()?;
    let seeds = (0..NODES).filter(|j| *j != id).map(|j| addr(ports[j as usize])).collect();
    let node = Node::builder()
        .id(id)
        .listen(addr(ports[id as usize]))
        .seeds(seeds)
        .certs_dir(dir.join("certs"))
        .data_dir(dir.join(format!("data-{id}")))
        .job(job()?)
        .out(dir.join("out"))
        .models(models)
        .datasets(datasets)
        .start()
        .await?;
    let mut events = node.events();
    // The parent closes stdin when it is done with this node.
    let (closed_tx, mut closed) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = closed_tx.send(());
    });
    let mut stdout = std::io::stdout();
    let mut print = |event: &NodeEvent| -> anyhow::Result<()> {
        writeln!(stdout, "{}", serde_json::to_string(event)?)?;
        Ok(stdout.flush()?)
    };
    loop {
        tokio::select! {
            _ = &mut closed => break,
            event = events.next() => match event {
                Some(event) => print(&event)?,
                None => return Ok(()),
            },
        }
    }
    node.shutdown().await?;
    // The events up to `stopped` are buffered in the stream.
    while let Some(event) = events.next().await {
        print(&event)?;
        if event.kind == NodeEventKind::Stopped {
            break;
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The driver: a fault-free run here, then three node processes with a kill.
// ------------------------------------------------------------------------------------------

/// The child processes and their events, merged in arrival order.
struct Cluster {
    nodes: Vec<Option<Child>>,
    events: mpsc::Receiver<Value>,
    seen: Vec<Value>,
}

impl Cluster {
    fn start(dir: &Path, ports: &[u16]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let ports_arg = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let (tx, events) = mpsc::channel();
        let mut nodes = Vec::new();
        for id in 0..NODES {
            let mut child = Command::new(&exe)
                .args(["node", "--id", &id.to_string(), "--dir"])
                .arg(dir)
                .args(["--ports", &ports_arg])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting node {id}"))?;
            let out = child.stdout.take().context("child stdout")?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                }
            });
            nodes.push(Some(child));
        }
        Ok(Self { nodes, events, seen: Vec::new() })
    }

    /// The first event matching `want` (seen already or arriving within [`WAIT`]).
    fn wait_for(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        if let Some(v) = self.seen.iter().find(|v| want(v)) {
            return Ok(v.clone());
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if want(&v) {
                        return Ok(v);
                    }
                }
                Err(_) => bail!("no {what} within {WAIT:?}; events so far: {:?}", self.seen),
            }
        }
    }

    fn kill(&mut self, id: u32) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[id as usize].take() {
            child.kill()?; // SIGKILL
            child.wait()?;
        }
        Ok(())
    }

    /// Closes every live node's stdin: each shuts down gracefully, says `stopped` (waited for,
    /// bounded) and exits.
    fn stop(&mut self) -> anyhow::Result<()> {
        for child in self.nodes.iter_mut().flatten() {
            drop(child.stdin.take());
        }
        for id in 0..NODES {
            if let Some(mut child) = self.nodes[id as usize].take() {
                self.wait_for(&format!("node {id} to stop"), |v| v["event"] == "stopped" && v["node"] == id)?;
                let status = child.wait()?;
                if !status.success() {
                    bail!("node {id} exited with {status}");
                }
            }
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Free loopback UDP ports (bound, read, released; the nodes bind them next).
fn free_ports(n: u32) -> anyhow::Result<Vec<u16>> {
    let sockets = (0..n).map(|_| std::net::UdpSocket::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
    sockets.iter().map(|s| Ok(s.local_addr()?.port())).collect()
}

async fn demo() -> anyhow::Result<bool> {
    let (models, datasets) = registries()?;
    println!("1. fault-free run of the quadratic model on rings, in this process");
    let (prepared, report) = phalanx::train_with(job()?, &models, &datasets, |_| {}).await?;
    let fault_free = phalanx::model_sha256(prepared.model.as_ref(), &report.outcome.params);
    let metric = &report.evaluation.metric;
    println!("   {} {:.3} ({}), model_sha256 {fault_free}", metric.name, metric.value, metric.split);
    // The built-ins train on a registered source too; a linear model cannot separate rings.
    let linear = JobConfig { model: phalanx::ModelKind::Softmax.into(), model_config: None, ..job()? };
    let (_, baseline) = phalanx::train_with(linear, &models, &datasets, |_| {}).await?;
    println!("   (the built-in softmax on the same rows: {} {:.3})", metric.name, baseline.evaluation.metric.value);

    let dir = tempfile::tempdir()?;
    phalanx_transport::certs::generate(&dir.path().join("certs"), NODES)?;
    let ports = free_ports(NODES)?;
    println!("2. three node processes on 127.0.0.1 ports {ports:?}");
    let mut cluster = Cluster::start(dir.path(), &ports)?;

    let first = cluster.wait_for("a step event", |v| v["event"] == "step")?;
    let total = first["total_steps"].as_u64().context("total_steps")?;
    // Step events come at most every 100 ms: the first one past a tenth of the job.
    let at = cluster.wait_for("a tenth of the steps", |v| {
        v["event"] == "step" && v["step"].as_u64().is_some_and(|s| s >= total / 10)
    })?;
    let killed_at_step = at["step"].as_u64().unwrap_or(0);
    cluster.kill(KILLED)?;
    println!("3. SIGKILLed node {KILLED} at step {killed_at_step} of {total}");

    let mut shas = Vec::new();
    for id in (0..NODES).filter(|id| *id != KILLED) {
        let done =
            cluster.wait_for(&format!("node {id}'s job_done"), |v| v["event"] == "job_done" && v["node"] == id)?;
        shas.push(done["model_sha256"].as_str().context("model_sha256")?.to_owned());
    }
    let summary: Value = serde_json::from_slice(&std::fs::read(dir.path().join("out/summary.json"))?)?;
    let lost = format!("node {KILLED} lost");
    let recovered = summary["faults"].as_array().is_some_and(|f| f.iter().any(|f| f["reason"] == lost.as_str()));
    cluster.stop()?;

    let with_kill = shas[0].clone();
    let identical = shas.iter().all(|s| *s == fault_free);
    println!(
        "4. with node {KILLED} killed: model_sha256 {with_kill} — {}",
        if identical { "bit-identical to the fault-free run" } else { "DIFFERENT from the fault-free run" }
    );
    let result = json!({
        "example": "custom_model",
        "model": "quadratic",
        "dataset": "rings:2400",
        "fault_free_sha256": fault_free,
        "sha256_with_kill": with_kill,
        "identical": identical,
        "killed_node": KILLED,
        "killed_at_step": killed_at_step,
        "total_steps": total,
        "fault_recorded": recovered,
        "metric": metric.name,
        "metric_value": metric.value,
    });
    println!("{result}");
    Ok(identical && recovered && killed_at_step < total)
}

/// `node --id N --dir DIR --ports P0,P1,P2`
fn node_args(args: &[String]) -> anyhow::Result<(u32, PathBuf, Vec<u16>)> {
    let value = |flag: &str| {
        args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).with_context(|| format!("missing {flag}"))
    };
    let id = value("--id")?.parse()?;
    let dir = PathBuf::from(value("--dir")?);
    let ports = value("--ports")?.split(',').map(str::parse).collect::<Result<Vec<u16>, _>>()?;
    if ports.len() != NODES as usize || id >= NODES {
        bail!("--ports needs {NODES} ports and --id a node below {NODES}");
    }
    Ok((id, dir, ports))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("node") {
        let (id, dir, ports) = node_args(&args[1..])?;
        return node(id, &dir, &ports).await;
    }
    if !demo().await? {
        std::process::exit(1);
    }
    Ok(())
}
