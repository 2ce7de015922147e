//! The `phalanx` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use phalanx::{JobConfig, Progress};
use phalanx_actors::data::{DatasetSource, TaskKind};
#[cfg(feature = "fault-injection")]
use phalanx_actors::faults::FaultSpec;
use phalanx_actors::model::ModelKind;
use phalanx_actors::optim::OptimizerKind;

mod cli_client;

/// Phalanx: distributed training that keeps training when nodes die, and
/// ends with the same model bits as if nothing had failed.
#[derive(Parser, Debug)]
#[command(name = "phalanx", version = phalanx::VERSION, about, long_about = None)]
struct Cli {
    /// Log more (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Log lines on stderr as text for people or as JSON objects (with span fields) for machines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Tokio worker threads for messages and I/O (default: one per core, or TOKIO_WORKER_THREADS;
    /// `phalanx local` gives each of its N node processes cores / N, at least 1). A large
    /// model's maths leaves them while it runs.
    #[arg(long, value_name = "N", global = true)]
    worker_threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model in this process on supervised actors.
    Train(TrainArgs),
    /// Create a cluster CA and one certificate per node (mutual TLS).
    Certs(CertsArgs),
    /// Run a cluster node: QUIC with mutual TLS, heartbeats, failure detection.
    Node(NodeArgs),
    /// Run a job on N local node processes (fresh certificates, loopback QUIC) and inject node faults.
    Local(Box<LocalArgs>),
    /// Apply a trained model (model.safetensors) to rows of a CSV file.
    Predict(PredictArgs),
    /// Print and verify a model file or a checkpoint file.
    Inspect(InspectArgs),
    /// Submit a job to a running cluster (prints its id first); --wait follows it and fetches its model.
    Submit(Box<cli_client::SubmitArgs>),
    /// List a cluster's jobs and their states.
    Jobs(cli_client::JobsArgs),
    /// Cancel a job of a cluster.
    Cancel(cli_client::CancelArgs),
    /// Show a cluster's view: epoch, coordinator, members.
    Status(cli_client::StatusArgs),
}

/// `phalanx predict --model model.safetensors --data csv:PATH [--out preds.csv]`.
#[derive(Args, Debug)]
struct PredictArgs {
    /// The trained model (`OUT/model.safetensors` of a run).
    #[arg(long)]
    model: PathBuf,
    /// The rows: `csv:PATH`, a CSV file with a header naming (at least) the model's features.
    #[arg(long, value_name = "csv:PATH")]
    data: String,
    /// Write the predictions here (CSV: `row,prediction`, plus `class_index` for classifiers);
    /// default: standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `phalanx inspect FILE`.
#[derive(Args, Debug)]
struct InspectArgs {
    /// A model file (`model.safetensors`) or a checkpoint file (`ckpt-*.safetensors`).
    file: PathBuf,
}

/// `phalanx local --nodes N [job flags] [--kill NODE@STEP] [--pause NODE@STEP:MS] [--restart NODE@STEP]`.
#[derive(Args, Debug)]
struct LocalArgs {
    /// Number of node processes.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// SIGKILL a node when the job reaches a step (node 0 coordinates and hosts range 0 of the parameters). Repeatable.
    #[arg(long, value_name = "NODE@STEP")]
    kill: Vec<String>,
    /// SIGSTOP a node at a step and SIGCONT it MS later. Repeatable.
    #[arg(long, value_name = "NODE@STEP:MS")]
    pause: Vec<String>,
    /// Restart a node (same id) at a step. Repeatable.
    #[arg(long, value_name = "NODE@STEP")]
    restart: Vec<String>,
    /// Cut every link between NODES (comma-separated) and the other nodes for MS. Repeatable.
    #[arg(long, value_name = "NODES@STEP:MS")]
    partition: Vec<String>,
    /// Damage every link for MS: SPEC is loss=P,delay=MS,jitter=MS,dup=P (any subset). Repeatable.
    #[arg(long, value_name = "SPEC@STEP:MS")]
    degrade: Vec<String>,
    /// Fill a node's data directory (a tmpfs mounted for the run; needs root) for MS. Repeatable.
    #[arg(long, value_name = "NODE@STEP:MS")]
    disk_full: Vec<String>,
    /// Flip a byte in every checkpoint file of the newest step on a node. Repeatable.
    #[arg(long, value_name = "NODE@STEP")]
    corrupt: Vec<String>,
    /// The node aborts after writing its checkpoint of STEP to a temporary file, before the rename.
    #[cfg(feature = "fault-injection")]
    #[arg(long, value_name = "NODE@STEP")]
    crash_before_rename: Vec<String>,
    /// Delete every checkpoint file on a node (its copies are lost). Repeatable.
    #[arg(long, value_name = "NODE@STEP")]
    wipe: Vec<String>,
    /// Other nodes keeping a copy of every checkpoint (default: 2 with at least 5 nodes, else 1).
    #[arg(long, value_name = "R")]
    replicas: Option<u32>,
    /// Start a second process with NODE's id and certificate on another port (the members must refuse it). Repeatable.
    #[arg(long, value_name = "NODE@STEP")]
    duplicate: Vec<String>,
    /// NODE runs as a rogue member and, at STEP, sends every other member a round of forged
    /// messages (SIGUSR1). Repeatable for more rounds; give it the highest id (a coordinator's orders are obeyed).
    #[cfg(feature = "fault-injection")]
    #[arg(long, value_name = "NODE@STEP")]
    rogue: Vec<String>,
    /// Where the nodes coordinate: `embedded` (heartbeats between them; the default), `etcd`,
    /// `etcd:N` (N members) or `zookeeper` (a server started for the run from Debian's
    /// `etcd-server` / `zookeeperd`, installed when missing), or the spec of a running service
    /// (`etcd://HOST:PORT/PREFIX`, `zk://HOST:PORT/CHROOT`).
    #[arg(long, value_name = "BACKEND", default_value = "embedded")]
    coordination: phalanx::local::LocalCoordination,
    /// SIGKILL members of the coordination server started for the run: WHAT is `leader`, `all`
    /// or a member's index. Repeatable.
    #[arg(long, value_name = "WHAT@STEP")]
    service_kill: Vec<String>,
    /// Start killed members of the coordination server again. Repeatable.
    #[arg(long, value_name = "WHAT@STEP")]
    service_restart: Vec<String>,
    /// Cut NODE off from the coordination server started for the run (not from its peers) for
    /// MS, through a TCP relay. Repeatable.
    #[arg(long, value_name = "NODE@STEP:MS")]
    service_cut: Vec<String>,
    /// SIGSTOP members of the coordination server, SIGCONT them MS later. Repeatable.
    #[arg(long, value_name = "WHAT@STEP:MS")]
    service_pause: Vec<String>,
    #[command(flatten)]
    job: TrainArgs,
}

/// `phalanx certs --dir DIR --nodes N [--name ID=HOST ...]`.
#[derive(Args, Debug)]
struct CertsArgs {
    /// Directory to write: ca.pem, ca/ (the CA key: keep it off the nodes), node-<i>/ for each
    /// node (node.pem, node.key, ca.pem: ship it to node i alone) and client/ for the CLI.
    #[arg(long)]
    dir: PathBuf,
    /// Number of nodes (certificates for ids 0..N).
    #[arg(long)]
    nodes: u32,
    /// Also name HOST (a DNS name or an IP address) in node ID's certificate; nodes only check
    /// node-<id>, other tools may want more. Repeatable.
    #[arg(long = "name", value_name = "ID=HOST")]
    names: Vec<String>,
}

impl CertsArgs {
    fn extra_names(&self) -> anyhow::Result<std::collections::BTreeMap<u32, Vec<String>>> {
        let mut names: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
        for spec in &self.names {
            let (id, host) =
                spec.split_once('=').ok_or_else(|| anyhow::anyhow!("--name {spec:?}: expected ID=HOST"))?;
            let id: u32 = id.trim().parse().map_err(|_| anyhow::anyhow!("--name {spec:?}: {id:?} is not a node id"))?;
            anyhow::ensure!(id < self.nodes, "--name {spec:?}: node {id} is not among the {} nodes", self.nodes);
            anyhow::ensure!(!host.trim().is_empty(), "--name {spec:?}: empty host");
            names.entry(id).or_default().push(host.trim().to_owned());
        }
        Ok(names)
    }
}

/// `phalanx node --id I --listen ADDR --certs DIR [--seeds ADDR,...]`; the
/// same fields may come from `--config node.toml`.
#[derive(Args, Debug)]
struct NodeArgs {
    /// TOML file with the fields below (id, listen, certs, seeds, nodes, data_dir, detector).
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id (its certificate is node-<id>).
    #[arg(long)]
    id: Option<u32>,
    /// UDP address to listen on, e.g. 127.0.0.1:7000.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Certificates directory (see `phalanx certs`).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Comma-separated addresses of the other members.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<std::net::SocketAddr>,
    /// Configured cluster size (members are nodes 0..N); default: seeds + 1.
    #[arg(long)]
    nodes: Option<u32>,
    /// Directory for the node's state.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Heartbeat period in ms.
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Silence in ms after which a member counts as down.
    #[arg(long)]
    failure_timeout_ms: Option<u64>,
    /// A job file (TOML, as `phalanx train --config`) the cluster trains; give every node the same one.
    #[arg(long)]
    job: Option<PathBuf>,
    /// Where the coordinator writes summary.json and model.safetensors.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fault injection (chaos tests): abort after writing the checkpoint of STEP to its temporary file, before the rename.
    #[cfg(feature = "fault-injection")]
    #[arg(long, value_name = "STEP")]
    crash_before_rename: Option<u64>,
    /// Fault injection (chaos tests): a rogue member; every SIGUSR1 sends every other member a round of forged messages.
    #[cfg(feature = "fault-injection")]
    #[arg(long)]
    rogue: bool,
    /// Fault injection (tests): claim kernel fingerprint HEX (16 hex digits), as a machine whose maths gives other bits would.
    #[cfg(feature = "fault-injection")]
    #[arg(long, value_name = "HEX")]
    pretend_kernel: Option<String>,
    /// Other nodes keeping a copy of every checkpoint (default: 2 with at least 5 nodes, else 1).
    #[arg(long, value_name = "R")]
    replicas: Option<u32>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Jobs running at once; more wait in the queue, first in first out.
    #[arg(long, value_name = "N")]
    max_jobs: Option<u32>,
    /// Steps that always get a `step` event on the coordinator (others come at a bounded rate). Comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "STEP,...")]
    report_steps: Vec<u64>,
    /// Refuse a certificate: node-<id>, client-<name> or serial:<hex>. Repeatable; adds to the
    /// config's `revoked`, which SIGHUP reloads from --config.
    #[arg(long, value_name = "ENTRY")]
    revoke: Vec<phalanx_transport::Revoked>,
    /// Print a `commit` event for every step this node's aggregators apply (`phalanx local`
    /// does, and checks the lease invariants on them).
    #[arg(long)]
    record_commits: bool,
    /// Where membership, the coordinator election and the views live: `embedded` (heartbeats
    /// between the nodes; the default), `etcd://HOST:PORT[,HOST:PORT…]/PREFIX` or
    /// `zk://HOST:PORT[,HOST:PORT…]/CHROOT`. Every node of a cluster names the same one.
    #[arg(long, value_name = "SPEC")]
    coordination: Option<phalanx::cluster::coordination::Coordination>,
    /// The etcd lease's TTL or the ZooKeeper session timeout in ms (default 2000): a node
    /// silent for this long loses its membership.
    #[arg(long, value_name = "MS")]
    coordination_ttl_ms: Option<u64>,
    /// TLS to the coordination service: DIR holds `ca.pem` (the service's CA) and, for a
    /// service that checks its clients, `client.pem` and `client.key` (etcd or ZooKeeper).
    #[arg(long, value_name = "DIR")]
    coordination_certs: Option<PathBuf>,
}

impl NodeArgs {
    fn into_config(self) -> anyhow::Result<phalanx::cluster::node::NodeConfig> {
        use phalanx::cluster::node::NodeConfig;
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<NodeConfig>(&text)
                    .map_err(|e| anyhow::anyhow!("config {}: {}", path.display(), e.to_string().replace('\n', " ")))?
            }
            None => {
                let missing = |f: &str| anyhow::anyhow!("missing --{f} (or a --config file with `{f}`)");
                NodeConfig::new(
                    self.id.ok_or_else(|| missing("id"))?,
                    self.listen.ok_or_else(|| missing("listen"))?,
                    self.certs.clone().ok_or_else(|| missing("certs"))?,
                )
            }
        };
        if let Some(v) = self.id {
            c.id = v;
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.certs {
            c.certs = v;
        }
        if !self.seeds.is_empty() {
            c.seeds = self.seeds;
        }
        if self.nodes.is_some() {
            c.nodes = self.nodes;
        }
        if self.data_dir.is_some() {
            c.data_dir = self.data_dir;
        }
        if self.job.is_some() {
            c.job = self.job;
        }
        if self.out.is_some() {
            c.out = self.out;
        }
        if self.replicas.is_some() {
            c.replicas = self.replicas;
        }
        if let Some(n) = self.max_jobs {
            c.max_jobs = n.max(1);
        }
        #[cfg(feature = "fault-injection")]
        if self.crash_before_rename.is_some() {
            c.crash_before_rename = self.crash_before_rename;
        }
        #[cfg(feature = "fault-injection")]
        if self.rogue {
            c.rogue = true;
        }
        if !self.report_steps.is_empty() {
            c.report_steps = self.report_steps;
        }
        c.revoked.extend(self.revoke);
        c.record_commits |= self.record_commits;
        if let Some(spec) = self.coordination {
            c.coordination = spec;
        }
        if self.coordination_ttl_ms.is_some() {
            c.coordination_ttl_ms = self.coordination_ttl_ms;
        }
        if self.coordination_certs.is_some() {
            c.coordination_certs = self.coordination_certs;
        }
        if let Some(v) = self.heartbeat_ms {
            c.detector.heartbeat_ms = v;
        }
        if let Some(v) = self.failure_timeout_ms {
            c.detector.failure_timeout_ms = v;
        }
        Ok(c)
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Job flags; each overrides the same field of `--config`.
#[derive(Args, Debug, Default)]
pub(crate) struct TrainArgs {
    /// TOML job file (fields as in the flags, with underscores: batch_size = 32).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model: linear, softmax or mlp.
    #[arg(long)]
    model: Option<ModelKind>,
    /// Data: diabetes, iris, winequality or csv:PATH[:TARGET].
    #[arg(long)]
    dataset: Option<DatasetSource>,
    /// regression or classification (default: from the model; mlp → classification).
    #[arg(long)]
    task: Option<TaskKind>,
    /// Trainer actors.
    #[arg(long)]
    trainers: Option<u32>,
    /// Aggregator actors, each owning a range of the parameters (default: one per node of a
    /// cluster with the spread placement, else one).
    #[arg(long)]
    aggregators: Option<u32>,
    /// Where a cluster runs the aggregators: spread (default: range r on node r mod N) or
    /// coordinator (all on its node).
    #[arg(long, value_name = "WHERE")]
    aggregator_placement: Option<phalanx::config::AggregatorPlacement>,
    /// Data partitions (fixed for the job; default 8).
    #[arg(long)]
    partitions: Option<u32>,
    /// Seed of split, partitions, batches and initial parameters.
    #[arg(long)]
    seed: Option<u64>,
    /// Epochs.
    #[arg(long)]
    epochs: Option<u32>,
    /// Global batch size.
    #[arg(long)]
    batch_size: Option<u32>,
    /// Optimizer: sgd, momentum or adam.
    #[arg(long)]
    optimizer: Option<OptimizerKind>,
    /// Learning rate.
    #[arg(long = "lr", alias = "learning-rate")]
    learning_rate: Option<f32>,
    /// Hidden units of the MLP.
    #[arg(long)]
    hidden: Option<usize>,
    /// Share of rows held out for the metric.
    #[arg(long)]
    test_fraction: Option<f64>,
    /// Checkpoint every K steps (0: only the final one).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// ...but at most one checkpoint per MS milliseconds of training (0: every K steps exactly; default 500).
    #[arg(long, value_name = "MS")]
    checkpoint_min_interval_ms: Option<u64>,
    /// Make an actor panic: ROLE[:INDEX]@STEP[xN|x*], ROLE = trainer, shard or aggregator. Repeatable.
    #[cfg(feature = "fault-injection")]
    #[arg(long = "fail", value_name = "ROLE[:INDEX]@STEP")]
    fail: Vec<FaultSpec>,
    /// Output directory: model.safetensors, summary.json, checkpoints/.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Resume from the newest complete checkpoint in OUT/checkpoints.
    #[arg(long)]
    resume: bool,
    /// Restarts allowed per actor within the restart window before the job fails.
    #[arg(long)]
    max_restarts: Option<u32>,
}

impl TrainArgs {
    pub(crate) fn into_config(self) -> anyhow::Result<JobConfig> {
        let mut c = match &self.config {
            Some(path) => JobConfig::from_toml_file(path)?,
            None => JobConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        macro_rules! set_opt {
            ($($f:ident),*) => { $( if self.$f.is_some() { c.$f = self.$f; } )* };
        }
        if let Some(model) = self.model {
            c.model = model.into();
        }
        set!(
            dataset,
            trainers,
            aggregator_placement,
            partitions,
            seed,
            optimizer,
            hidden,
            test_fraction,
            checkpoint_every,
            checkpoint_min_interval_ms,
            max_restarts
        );
        set_opt!(aggregators, task, epochs, batch_size, learning_rate, out);
        #[cfg(feature = "fault-injection")]
        if !self.fail.is_empty() {
            c.fail = self.fail;
        }
        c.resume |= self.resume;
        Ok(c)
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per event, with the fields of its spans.
    Json,
}

fn init_logging(verbose: u8, format: LogFormat) {
    let default = match verbose {
        0 => "error",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().with_current_span(true).with_span_list(true).init(),
    }
}

/// Shows progress: a bar on a terminal, a line every tenth of the job otherwise.
pub(crate) struct ProgressView {
    bar: Option<ProgressBar>,
    last_tenth: u64,
}

impl ProgressView {
    pub(crate) fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:32.cyan/blue} step {pos}/{len} {msg}")
                    .expect("valid template")
                    .progress_chars("█▉▊▋▌▍▎▏ "),
            );
            bar
        });
        Self { bar, last_tenth: 0 }
    }

    pub(crate) fn update(&mut self, p: &Progress, started: std::time::Instant) {
        let rate = p.samples as f64 / started.elapsed().as_secs_f64().max(1e-6);
        let msg = if p.samples > 0 {
            format!("loss {:.4} | {:.0} samples/s | faults {}", p.loss, rate, p.faults)
        } else {
            format!("loss {:.4}", p.loss)
        };
        match &self.bar {
            Some(bar) => {
                bar.set_length(p.total_steps);
                bar.set_position(p.step);
                bar.set_message(msg);
            }
            None => {
                let tenth = p.step * 10 / p.total_steps.max(1);
                if tenth > self.last_tenth {
                    self.last_tenth = tenth;
                    eprintln!("step {}/{} {msg}", p.step, p.total_steps);
                }
            }
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

async fn train(args: TrainArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let out = config.out.clone().unwrap_or_else(|| PathBuf::from("phalanx-out"));
    let config = JobConfig { out: Some(out.clone()), ..config };
    let job = phalanx::PreparedJob::new(config)?;
    let r = job.resolved;
    eprintln!(
        "training {} on {} ({} rows, {} features): {} partitions, {} trainers, {} aggregators, {} epochs × {} steps, batch {}, {} lr {}",
        job.config.model,
        job.config.dataset,
        job.data.train.len(),
        job.data.train.features(),
        job.config.partitions,
        job.config.trainers,
        job.config.aggregator_count(),
        r.epochs,
        job.schedule.steps_per_epoch,
        r.batch_size,
        job.config.optimizer,
        r.learning_rate,
    );
    let started = std::time::Instant::now();
    let mut view = ProgressView::new();
    let ckpt = out.join("checkpoints");
    let result = phalanx::job::run(&job, &ckpt, job.config.resume, |p| view.update(p, started)).await;
    view.finish();
    let report = result?;
    let summary = phalanx::write_outputs(&out, &job, &report).with_context(|| format!("writing {}", out.display()))?;
    let m = &summary.metric;
    println!(
        "done: {} steps in {:.2}s ({:.0} samples/s); final loss {:.5}; {} {} = {:.4} (train {:.4})",
        summary.steps,
        summary.duration_ms as f64 / 1000.0,
        summary.samples_per_sec,
        summary.final_loss,
        m.split,
        m.name,
        m.value,
        m.train_value
    );
    if let Some(ls) = m.least_squares_r2 {
        println!("      closed-form least squares on the same split: r2 = {ls:.4}");
    }
    let applied = &summary.samples_applied;
    println!(
        "exactly-once: {} ({} of {} epochs, {} samples each)",
        if applied.exactly_once { "yes" } else { "NO" },
        applied.exactly_once_epochs,
        summary.epochs,
        summary.partition_sizes.iter().sum::<u64>()
    );
    if let Some(e) = &applied.first_failing {
        println!(
            "first epoch not applied exactly once: {} (per partition {:?}, sizes {:?}); {} samples lost, {} duplicated",
            e.epoch, e.per_partition, summary.partition_sizes, applied.lost, applied.duplicated
        );
    }
    for f in &summary.faults {
        println!(
            "fault: {} at step {}: {} — recovered in {} ms{}",
            f.what,
            f.step,
            f.reason,
            f.recovery_ms.map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
            f.rolled_back_to.map(|s| format!(" (rolled back to checkpoint {s})")).unwrap_or_default()
        );
    }
    println!("model_sha256 {}", summary.model_sha256);
    println!("wrote {0}/model.safetensors, {0}/summary.json and {0}/history.csv", out.display());
    Ok(())
}

async fn local(args: LocalArgs, worker_threads: Option<std::num::NonZeroUsize>) -> anyhow::Result<()> {
    use phalanx::local::{run_local, LocalOptions, NodeFault};
    let mut faults = Vec::new();
    for (kind, specs) in [
        ("kill", &args.kill),
        ("pause", &args.pause),
        ("restart", &args.restart),
        ("partition", &args.partition),
        ("degrade", &args.degrade),
        ("disk-full", &args.disk_full),
        ("corrupt", &args.corrupt),
        #[cfg(feature = "fault-injection")]
        ("crash-before-rename", &args.crash_before_rename),
        ("wipe", &args.wipe),
        ("duplicate", &args.duplicate),
        ("service-kill", &args.service_kill),
        ("service-restart", &args.service_restart),
        ("service-pause", &args.service_pause),
        ("service-cut", &args.service_cut),
        #[cfg(feature = "fault-injection")]
        ("rogue", &args.rogue),
    ] {
        for s in specs {
            faults.push(NodeFault::parse(kind, s).map_err(anyhow::Error::msg)?);
        }
    }
    let config = args.job.into_config()?;
    let (nodes, replicas, coordination) = (args.nodes, args.replicas, args.coordination);
    let on = match &coordination {
        phalanx::local::LocalCoordination::Embedded => String::new(),
        phalanx::local::LocalCoordination::Etcd(1) => ", coordinating on an etcd started for the run".into(),
        phalanx::local::LocalCoordination::Etcd(n) => {
            format!(", coordinating on an etcd of {n} members started for the run")
        }
        phalanx::local::LocalCoordination::ZooKeeper => ", coordinating on a ZooKeeper started for the run".into(),
        phalanx::local::LocalCoordination::Service(spec) => format!(", coordinating on {spec}"),
    };
    eprintln!(
        "starting {nodes} node processes on 127.0.0.1 (mutual TLS, fresh CA) for {} on {}{on}",
        config.model, config.dataset
    );
    let started = std::time::Instant::now();
    let summary = tokio::task::spawn_blocking(move || {
        let mut view = ProgressView::new();
        let options = LocalOptions { nodes, replicas, coordination, worker_threads };
        let r = run_local(&config, &options, faults, |step, total, loss| {
            let p = Progress { step, total_steps: total, loss, ..Progress::default() };
            view.update(&p, started);
        });
        view.finish();
        r
    })
    .await??;
    let m = &summary["metric"];
    println!(
        "done on {} nodes: {} steps; final loss {:.5}; {} {} = {:.4}; coordinator at the end: node {}",
        nodes,
        summary["steps"],
        summary["final_loss"].as_f64().unwrap_or(f64::NAN),
        m["split"].as_str().unwrap_or(""),
        m["name"].as_str().unwrap_or(""),
        m["value"].as_f64().unwrap_or(f64::NAN),
        summary["coordinator"]
    );
    let applied = &summary["samples_applied"];
    println!("exactly-once: {}", if applied["exactly_once"] == true { "yes" } else { "NO" });
    if let Some(e) = applied["first_failing"].as_object() {
        println!("first epoch not applied exactly once: {} (per partition {})", e["epoch"], e["per_partition"]);
    }
    for f in summary["node_faults"].as_array().into_iter().flatten() {
        let node = f["node"].as_u64().map(|n| format!(" node {n}")).unwrap_or_default();
        let ms = |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |ms| format!("{ms} ms"));
        print!(
            "fault: {}{node} at step {}: detected after {}, training resumed after {}",
            f["kind"].as_str().unwrap_or(""),
            f["step"],
            ms(&f["detection_ms"]),
            ms(&f["recovery_ms"])
        );
        match f["evidence"].as_str() {
            Some(e) => println!(" ({e})"),
            None => println!(),
        }
    }
    for t in summary["takeovers"].as_array().into_iter().flatten().skip(1) {
        let restored = match (t["restore"].as_u64(), t["restore_from"].as_str()) {
            (Some(step), Some("local") | None) => format!("checkpoint {step} from its own copies"),
            (Some(step), Some(from)) => format!("checkpoint {step} fetched from {from}"),
            (None, _) => "no checkpoint anywhere: recomputed from step 0".to_string(),
        };
        println!("takeover: node {} coordinates (epoch {}); restored {restored}", t["node"], t["epoch"]);
    }
    let listed = summary["checkpoint_failures"].as_array().map_or(0, Vec::len) as u64;
    for c in summary["checkpoint_failures"].as_array().into_iter().flatten() {
        println!(
            "checkpoint not saved: range {} step {}: {}",
            c["range"],
            c["step"],
            c["reason"].as_str().unwrap_or("")
        );
    }
    if let Some(more) = summary["checkpoint_failures_total"].as_u64().and_then(|t| t.checked_sub(listed)) {
        if more > 0 {
            println!("... and {more} more checkpoints not saved");
        }
    }
    println!("model_sha256 {}", summary["model_sha256"].as_str().unwrap_or(""));
    Ok(())
}

fn predict(args: PredictArgs) -> anyhow::Result<()> {
    use phalanx::predict::{Prediction, TrainedModel};
    use std::io::Write;
    let csv = args.data.strip_prefix("csv:").ok_or_else(|| {
        anyhow::anyhow!("--data {}: expected csv:PATH (a CSV file with a header naming the features)", args.data)
    })?;
    let model = TrainedModel::load(&args.model)?;
    let predictions = model.predict_csv(std::path::Path::new(csv))?;
    let classifier = model.class_names.is_some();
    let mut text = String::from(if classifier { "row,prediction,class_index\n" } else { "row,prediction\n" });
    for (i, p) in predictions.iter().enumerate() {
        match p {
            Prediction::Value(v) => text.push_str(&format!("{i},{v}\n")),
            Prediction::Class { index, name } => text.push_str(&format!("{i},{name},{index}\n")),
        }
    }
    match &args.out {
        Some(path) => {
            std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} predictions to {}", predictions.len(), path.display());
        }
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(())
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    use phalanx::predict::{inspect, Inspection};
    match inspect(&args.file)? {
        Inspection::Model(m) => {
            println!("{}: Phalanx model file, verified (parameters hash to model_sha256)", args.file.display());
            println!("model: {:?} ({} parameters)", m.spec, m.num_params());
            for (name, shape) in m.tensors() {
                println!("tensor {name}: {shape:?}");
            }
            println!("features ({}): {}", m.feature_names.len(), m.feature_names.join(", "));
            if let Some(classes) = &m.class_names {
                println!("classes ({}): {}", classes.len(), classes.join(", "));
            }
            if let Some((mean, std)) = m.target_scale {
                println!("target scale: mean {mean}, std {std}");
            }
            for key in ["dataset", "param_order"] {
                if let Some(v) = m.metadata.get(key) {
                    println!("{key}: {v}");
                }
            }
            println!("model_sha256 {}", m.model_sha256);
        }
        Inspection::Checkpoint(c) => {
            println!("{}: Phalanx checkpoint file, verified (checksum and contents)", args.file.display());
            println!(
                "step {}; range [{}, {}) of {} parameters",
                c.step,
                c.offset,
                c.offset + c.params.len(),
                c.total_len
            );
            println!("config_hash {}", c.config_hash);
            let slots: Vec<&str> = c.optimizer_slots.iter().map(|(n, _)| n.as_str()).collect();
            println!("optimizer: t = {}, slots {:?}", c.optimizer_t, slots);
            let closed = &c.ledger.closed;
            println!(
                "exactly-once ledger: {} closed epoch(s), {} exact, {} lost, {} duplicated; {} open epoch(s)",
                closed.epochs,
                closed.exact,
                closed.lost,
                closed.duplicated,
                c.ledger.open.len()
            );
        }
    }
    Ok(())
}

/// `phalanx node`: one JSON line per event on stdout, `/metrics` if asked.
async fn node(args: NodeArgs) -> anyhow::Result<()> {
    use phalanx::cluster::event::NodeEventKind;
    use phalanx::cluster::node::{run_node_with, NodeParts};
    use std::io::Write;
    #[cfg(feature = "fault-injection")]
    if let Some(hex) = &args.pretend_kernel {
        let fingerprint = hex.parse().map_err(|e: String| anyhow::anyhow!("--pretend-kernel: {e}"))?;
        phalanx_actors::model::kernel::pretend(fingerprint)
            .map_err(|used| anyhow::anyhow!("--pretend-kernel: kernel {used} is already in use"))?;
    }
    let metrics_at = args.metrics;
    let (config_path, flags_revoked) = (args.config.clone(), args.revoke.clone());
    let config = args.into_config()?;
    let metrics = phalanx::metrics::NodeMetrics::new(config.id);
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(at) = metrics_at {
        let (bound, _) = phalanx::metrics::serve(at, metrics.clone(), async move {
            let _ = stopped_rx.await;
        })
        .await?;
        eprintln!("node {} serves metrics at http://{bound}/metrics", config.id);
    }
    let events: phalanx::cluster::event::EventSink = std::sync::Arc::new(|event| {
        if let NodeEventKind::Listening { addr, .. } = &event.kind {
            eprintln!("node {} listening on {addr}", event.node);
        }
        if let Ok(line) = serde_json::to_string(&event) {
            // A closed stdout (the reader went away) must not stop the node.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
    let mut parts = NodeParts::new(events, metrics);
    parts.revocations = Some(reload_revocations_on_hangup(config.id, config_path, flags_revoked));
    // On a worker thread rather than the main thread's block_on: the node loop
    // is the process's heart and must be scheduled like every other task.
    let result = tokio::spawn(run_node_with(config, parts, termination()))
        .await
        .map_err(|e| anyhow::anyhow!("node task failed: {e}"))?;
    drop(stopped_tx);
    Ok(result?)
}

/// The revocation list, read again from the config file (plus the `--revoke` flags) at every
/// SIGHUP. A file that no longer parses keeps the current list and says why.
fn reload_revocations_on_hangup(
    node: u32,
    config: Option<PathBuf>,
    flags: Vec<phalanx_transport::Revoked>,
) -> tokio::sync::watch::Receiver<phalanx_transport::Revocations> {
    let (tx, rx) = tokio::sync::watch::channel(phalanx_transport::Revocations::default());
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else { return };
        while hangups.recv().await.is_some() {
            let Some(path) = &config else {
                eprintln!("node {node}: SIGHUP: no --config file to reload the revocation list from");
                continue;
            };
            let read = std::fs::read_to_string(path).map_err(|e| e.to_string()).and_then(|text| {
                toml::from_str::<phalanx::cluster::node::NodeConfig>(&text).map_err(|e| e.to_string())
            });
            match read {
                Ok(fresh) => {
                    let list =
                        phalanx_transport::Revocations::new(fresh.revoked.into_iter().chain(flags.iter().cloned()));
                    eprintln!("node {node}: revocation list reloaded from {}: {list:?}", path.display());
                    tx.send_replace(list);
                }
                Err(e) => eprintln!(
                    "node {node}: SIGHUP: keeping the revocation list: cannot read {}: {}",
                    path.display(),
                    e.replace('\n', " ")
                ),
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (node, config, flags, &tx);
    rx
}

/// An error and its causes on one line, each cause once: errors that already
/// quote their source (`path: os error`) do not repeat it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn main() -> ExitCode {
    // Before any thread starts: step buffers stay in the process (see the function).
    phalanx::tune_allocator();
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.log_format);
    phalanx::log_panics();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads {
        builder.worker_threads(n.get());
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Train(args) => train(args).await,
            Command::Local(args) => local(*args, cli.worker_threads).await,
            Command::Predict(args) => predict(args),
            Command::Inspect(args) => inspect(args),
            Command::Certs(args) => {
                phalanx_transport::certs::generate_named(&args.dir, args.nodes, &args.extra_names()?)
                    .with_context(|| format!("writing certificates to {}", args.dir.display()))?;
                println!(
                    "wrote {0}/ca.pem; the CA key in {0}/ca/ (keep it off the nodes); {0}/node-<i>/ for i in 0..{1} \
                     (ship each to its node); {0}/client/ for phalanx submit, jobs, cancel, status",
                    args.dir.display(),
                    args.nodes
                );
                Ok(())
            }
            Command::Node(args) => node(args).await,
            Command::Submit(args) => cli_client::submit(*args, &mut std::io::stdout()).await,
            Command::Jobs(args) => cli_client::jobs(args, &mut std::io::stdout()).await,
            Command::Cancel(args) => cli_client::cancel(args, &mut std::io::stdout()).await,
            Command::Status(args) => cli_client::status(args, &mut std::io::stdout()).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
