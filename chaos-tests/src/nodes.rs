//! The simulation tier on real nodes: the node loop, membership, the jobs' control plane and
//! the actor shells of `phalanx node`, unchanged, on an in-memory network
//! ([`MemNetwork`]) under tokio's paused clock.
//!
//! ```text
//!   seeded fault plan ──▶ MemNetwork (loss · duplication · reordering · asymmetric cuts ·
//!        │                 pauses · crashes and restarts)          virtual time
//!        │                    ▲            ▲            ▲
//!        └─ freeze switch ─▶ node 0      node 1   …   node n-1   (run_node_on: the real loop,
//!                            │  events: view · coordinating · commit · job_done …  Jobs, shells)
//!                            ▼
//!             invariants: completes · exactly-once · bit-identical · leases (no two
//!             coordinators commit at once, one hash per step) · a single coordinator per term
//! ```
//!
//! A run is one job on `nodes` nodes with the seed's faults, all in one current-thread runtime
//! whose clock is paused: time moves only when every task waits, so seconds of failure
//! detection, leases and retries take milliseconds, and training compute takes no virtual
//! time. Checkpoints are real files (fsync and rename) in a temporary directory. The runtime
//! runs blocking work (job preparation, checkpoint writes) on its blocking pool, during which
//! the clock does not move; so a seed replays the same faults at the same virtual times, but
//! the interleaving of tasks that wake at the same instant may differ between runs.
//!
//! **Faults** ([`NodeFault`]), drawn from the seed in a fault phase, one at a time so a
//! majority is always up (the promise holds "within the quorum"): message loss, duplication
//! and reordering on every link (control and data frames alike, and the in-memory network does
//! not retransmit); an asymmetric cut of one direction of one link; the coordinator's outgoing
//! links cut while it still hears everyone (the others elect a successor while it believes it
//! coordinates: two competing coordinators); a paused node (its loop and network stand still,
//! then it wakes with stale beliefs); a crash and a restart from the node's data directory; on
//! the five-node seeds (one in five) also two nodes crashing at once.
//! After the fault phase the network heals and the job must finish within the budget.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use phalanx::cluster::event::{EventSink, NodeEvent, NodeEventKind};
use phalanx::cluster::membership::DetectorConfig;
use phalanx::cluster::node::{run_node_on, NodeConfig, NodeParts};
use phalanx::metrics::NodeMetrics;
use phalanx::JobConfig;
use phalanx_transport::mem::{LinkFaults, MemConfig, MemNetwork, NetStats};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tokio::sync::{oneshot, watch, Notify};

use crate::invariants::{check_process, Expected};

/// Heartbeat of the simulated nodes (virtual ms).
const HEARTBEAT_MS: u64 = 50;
/// Failure timeout of the simulated nodes (virtual ms).
const FAILURE_TIMEOUT_MS: u64 = 400;
/// Every link's latency outside faults: a LAN's, with jitter that reorders frames now and then.
fn base_link() -> LinkFaults {
    LinkFaults::none().delay(Duration::from_millis(2), Duration::from_millis(1))
}
/// Idle timeout of the in-memory connections (virtual ms): above the failure timeout, as
/// QUIC's is in a real cluster.
const IDLE_TIMEOUT_MS: u64 = 1_500;

/// What a run may throw at the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeSimOptions {
    /// The seed of every random choice (faults and the network's).
    pub seed: u64,
    /// Nodes in the cluster (at least 3).
    pub nodes: u32,
    /// Faults start within this long after the job starts; after the last one ends the
    /// network heals.
    pub fault_phase: Duration,
    /// Faults drawn from the seed (one at a time).
    pub faults: u32,
    /// Virtual time allowed for the whole job.
    pub budget: Duration,
    /// These faults instead of the seed's.
    pub plan: Option<Vec<NodeFault>>,
}

impl NodeSimOptions {
    /// Three nodes (five for every fifth seed), three faults in the first 1.5 virtual
    /// seconds, two virtual minutes.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            nodes: if seed % 5 == 4 { 5 } else { 3 },
            fault_phase: Duration::from_millis(1_500),
            faults: 3,
            budget: Duration::from_secs(120),
            plan: None,
        }
    }
}

/// The kinds of fault a run draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// Loss, duplication and reordering of frames (control and data) on every link.
    MessageLoss,
    /// One direction of one link cut.
    AsymmetricCut,
    /// The coordinator's outgoing links cut while it hears everyone: two coordinators.
    CompetingCoordinators,
    /// A node's loop and network stand still, then resume.
    Pause,
    /// A node crashes and restarts from its data directory.
    CrashRestart,
    /// Two nodes crash at once and restart (five nodes or more: still a minority).
    TwoCrashes,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::MessageLoss,
        FaultKind::AsymmetricCut,
        FaultKind::CompetingCoordinators,
        FaultKind::Pause,
        FaultKind::CrashRestart,
        FaultKind::TwoCrashes,
    ];

    /// Whether a cluster of `nodes` survives it within the quorum.
    pub fn fits(self, nodes: u32) -> bool {
        self != FaultKind::TwoCrashes || nodes >= 5
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::MessageLoss => "control-message loss, duplication, reordering",
            FaultKind::AsymmetricCut => "asymmetric partition",
            FaultKind::CompetingCoordinators => "competing coordinators",
            FaultKind::Pause => "paused node",
            FaultKind::CrashRestart => "crash and restart",
            FaultKind::TwoCrashes => "two nodes crash at once (5 nodes)",
        }
    }
}

/// One fault of a run, as planned from the seed.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeFault {
    /// Its kind.
    pub kind: FaultKind,
    /// Virtual time after the start it begins.
    pub at: Duration,
    /// How long it lasts.
    pub lasts: Duration,
    /// The node it hits (the sender of a cut link; the coordinator for competing ones).
    pub node: u32,
    /// The other end of a cut link; the second node of two crashes.
    pub peer: Option<u32>,
    /// Loss and duplication probability of a message-loss fault.
    pub probability: f64,
}

/// The seed's faults, one after the other within the fault phase.
pub fn plan(opts: &NodeSimOptions) -> Vec<NodeFault> {
    if let Some(plan) = &opts.plan {
        return plan.clone();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x9e37_79b9_7f4a_7c15);
    let kinds: Vec<FaultKind> = FaultKind::ALL.into_iter().filter(|k| k.fits(opts.nodes)).collect();
    let mut at = Duration::from_millis(rng.random_range(50..200));
    let mut faults = Vec::new();
    for _ in 0..opts.faults {
        if at >= opts.fault_phase {
            break;
        }
        let kind = kinds[rng.random_range(0..kinds.len())];
        let node = rng.random_range(0..opts.nodes);
        let lasts = Duration::from_millis(match kind {
            // Longer than the failure timeout half the time: detected, or not.
            FaultKind::Pause | FaultKind::AsymmetricCut => rng.random_range(100..3 * FAILURE_TIMEOUT_MS),
            FaultKind::CompetingCoordinators => rng.random_range(2 * FAILURE_TIMEOUT_MS..4 * FAILURE_TIMEOUT_MS),
            FaultKind::CrashRestart | FaultKind::TwoCrashes => {
                rng.random_range(FAILURE_TIMEOUT_MS..3 * FAILURE_TIMEOUT_MS)
            }
            FaultKind::MessageLoss => rng.random_range(200..1_000),
        });
        let other = matches!(kind, FaultKind::AsymmetricCut | FaultKind::TwoCrashes);
        let peer = other.then(|| (node + rng.random_range(1..opts.nodes)) % opts.nodes);
        let probability = if kind == FaultKind::MessageLoss { rng.random_range(0.01..0.15) } else { 0.0 };
        faults.push(NodeFault { kind, at, lasts, node, peer, probability });
        // The next one once this one is over and the cluster had a moment to settle.
        at += lasts + Duration::from_millis(rng.random_range(2 * FAILURE_TIMEOUT_MS..4 * FAILURE_TIMEOUT_MS));
    }
    faults
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct NodeSimOutcome {
    /// The seed.
    pub seed: u64,
    /// The faults injected.
    pub faults: Vec<NodeFault>,
    /// The coordinator's `summary.json` if the job finished.
    pub summary: Option<Value>,
    /// Why the job did not finish (failed, or the budget ran out).
    pub error: Option<String>,
    /// Every event of every node, in the order they happened, as JSON.
    pub events: Vec<Value>,
    /// What the network did.
    pub net: NetStats,
    /// Virtual time from start to the end of the job.
    pub finished_after: Duration,
    /// The start on the events' clock (`t_ms`, virtual Unix milliseconds).
    pub start_ms: u64,
}

/// Every event of the cluster, and a wake-up when the job ends.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<NodeEvent>>,
    ended: Notify,
}

impl Recorder {
    fn sink(self: &Arc<Self>) -> EventSink {
        let me = self.clone();
        Arc::new(move |event: NodeEvent| {
            let ends = matches!(event.kind, NodeEventKind::JobDone { .. } | NodeEventKind::JobFailed { .. });
            me.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(event);
            if ends {
                me.ended.notify_one();
            }
        })
    }

    fn snapshot(&self) -> Vec<NodeEvent> {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// One running node: its stop signal, its freeze switch, its task.
struct SimNode {
    stop: Option<oneshot::Sender<()>>,
    freeze: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), phalanx::Error>>,
}

struct Cluster {
    network: MemNetwork,
    job: JobConfig,
    opts: NodeSimOptions,
    dir: std::path::PathBuf,
    recorder: Arc<Recorder>,
    nodes: BTreeMap<u32, SimNode>,
}

impl Cluster {
    fn config(&self, id: u32) -> NodeConfig {
        let seeds = (0..self.opts.nodes).filter(|&n| n != id).map(|n| self.network.addr_of(n)).collect();
        NodeConfig {
            seeds,
            nodes: Some(self.opts.nodes),
            data_dir: Some(self.dir.join(format!("node-{id}"))),
            detector: DetectorConfig {
                heartbeat_ms: HEARTBEAT_MS,
                failure_timeout_ms: FAILURE_TIMEOUT_MS,
                lease_ms: None,
                probe: true,
            },
            out: Some(self.dir.join("out")),
            record_commits: true,
            ..NodeConfig::new(id, self.network.addr_of(id), self.dir.join("no-certificates-in-memory"))
        }
    }

    /// Start node `id` on the network (a restart after a crash too).
    fn start(&mut self, id: u32, restart: bool) -> Result<(), String> {
        let (transport, events) = if restart { self.network.restart(id) } else { self.network.add_node(id) }
            .map_err(|e| format!("node {id}: {e}"))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let (freeze, frozen) = watch::channel(false);
        let mut parts = NodeParts::new(self.recorder.sink(), NodeMetrics::new(id));
        parts.job = Some(self.job.clone());
        parts.freeze = Some(frozen);
        let config = self.config(id);
        let task = tokio::spawn(run_node_on(config, parts, transport, events, async move {
            let _ = stopped.await;
        }));
        self.nodes.insert(id, SimNode { stop: Some(stop), freeze, task });
        Ok(())
    }

    /// The coordinator of the newest view any node adopted.
    fn coordinator(&self) -> u32 {
        let events = self.recorder.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        events
            .iter()
            .rev()
            .find_map(|e| match &e.kind {
                NodeEventKind::View { coordinator, .. } => Some(*coordinator),
                _ => None,
            })
            .unwrap_or(0)
    }

    async fn inject(&mut self, fault: &NodeFault) -> Result<(), String> {
        let net = &self.network;
        let n = self.opts.nodes;
        match fault.kind {
            FaultKind::MessageLoss => {
                let faults = LinkFaults::none()
                    .loss(fault.probability)
                    .duplicate(fault.probability)
                    .delay(Duration::from_millis(1), Duration::from_millis(5));
                net.set_default_link(faults).map_err(|e| e.to_string())?;
                tokio::time::sleep(fault.lasts).await;
                net.set_default_link(base_link()).map_err(|e| e.to_string())?;
            }
            FaultKind::AsymmetricCut => {
                let peer = fault.peer.unwrap_or((fault.node + 1) % n);
                net.cut(fault.node, peer);
                tokio::time::sleep(fault.lasts).await;
                net.heal(fault.node, peer);
            }
            FaultKind::CompetingCoordinators => {
                let coordinator = self.coordinator();
                for peer in (0..n).filter(|&p| p != coordinator) {
                    net.cut(coordinator, peer);
                }
                tokio::time::sleep(fault.lasts).await;
                for peer in (0..n).filter(|&p| p != coordinator) {
                    net.heal(coordinator, peer);
                }
            }
            FaultKind::Pause => {
                let node = fault.node;
                net.pause(node).map_err(|e| format!("pause node {node}: {e}"))?;
                if let Some(sim) = self.nodes.get(&node) {
                    let _ = sim.freeze.send(true);
                }
                tokio::time::sleep(fault.lasts).await;
                if let Some(sim) = self.nodes.get(&node) {
                    let _ = sim.freeze.send(false);
                }
                net.resume(node).map_err(|e| format!("resume node {node}: {e}"))?;
            }
            FaultKind::CrashRestart | FaultKind::TwoCrashes => {
                let nodes: Vec<u32> = std::iter::once(fault.node)
                    .chain(fault.peer.filter(|_| fault.kind == FaultKind::TwoCrashes))
                    .collect();
                for &node in &nodes {
                    net.crash(node).map_err(|e| format!("crash node {node}: {e}"))?;
                }
                for node in &nodes {
                    if let Some(sim) = self.nodes.remove(node) {
                        // The node's event stream ended: its loop stops by itself.
                        let _ = sim.task.await;
                    }
                }
                tokio::time::sleep(fault.lasts).await;
                for node in nodes {
                    self.start(node, true)?;
                }
            }
        }
        Ok(())
    }

    async fn shutdown(&mut self) {
        for sim in self.nodes.values_mut() {
            let _ = sim.freeze.send(false);
            if let Some(stop) = sim.stop.take() {
                let _ = stop.send(());
            }
        }
        for (_, sim) in std::mem::take(&mut self.nodes) {
            let _ = sim.task.await;
        }
    }
}

/// The job's end as the events tell it: `Ok(summary path)` or the error.
fn ended(events: &[NodeEvent]) -> Option<Result<String, String>> {
    events.iter().find_map(|e| match &e.kind {
        NodeEventKind::JobDone { summary, .. } => Some(Ok(summary.clone().unwrap_or_default())),
        NodeEventKind::JobFailed { error, .. } => Some(Err(format!("node {}: the job failed: {error}", e.node))),
        _ => None,
    })
}

/// Run `job` on a simulated cluster with the faults of `opts`, in a fresh current-thread
/// runtime with a paused clock; outputs and checkpoints under `dir`.
pub fn run_nodes(job: &JobConfig, opts: &NodeSimOptions, dir: &Path) -> NodeSimOutcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds");
    runtime.block_on(run_in_runtime(job, opts, dir))
}

async fn run_in_runtime(job: &JobConfig, opts: &NodeSimOptions, dir: &Path) -> NodeSimOutcome {
    let faults = plan(opts);
    let mut outcome = NodeSimOutcome {
        seed: opts.seed,
        faults: faults.clone(),
        summary: None,
        error: None,
        events: Vec::new(),
        net: NetStats::default(),
        finished_after: Duration::ZERO,
        start_ms: phalanx_actors::clock::unix_ms(),
    };
    let mut config = MemConfig::default();
    config.idle_timeout_ms = IDLE_TIMEOUT_MS;
    config.trace_capacity = 0;
    let network = match MemNetwork::new(opts.seed, config).and_then(|n| n.set_default_link(base_link()).map(|()| n)) {
        Ok(network) => network,
        Err(e) => {
            outcome.error = Some(format!("the in-memory network: {e}"));
            return outcome;
        }
    };
    let start = tokio::time::Instant::now();
    let recorder = Arc::new(Recorder::default());
    let mut cluster = Cluster {
        network,
        job: job.clone(),
        opts: opts.clone(),
        dir: dir.to_path_buf(),
        recorder: recorder.clone(),
        nodes: BTreeMap::new(),
    };
    for id in 0..opts.nodes {
        if let Err(e) = cluster.start(id, false) {
            outcome.error = Some(e);
            return outcome;
        }
    }
    let deadline = start + opts.budget;
    let result = {
        let recorder = recorder.clone();
        let wait_end = async move {
            loop {
                let ended_now = recorder.ended.notified();
                if let Some(end) = ended(&recorder.snapshot()) {
                    return end;
                }
                ended_now.await;
            }
        };
        tokio::pin!(wait_end);
        let mut faults = faults.iter();
        loop {
            let next = faults.next();
            tokio::select! {
                end = &mut wait_end => break end,
                _ = tokio::time::sleep_until(deadline) => {
                    break Err(format!("the job did not finish within {:?} of virtual time", opts.budget));
                }
                r = async {
                    match next {
                        Some(fault) => {
                            tokio::time::sleep_until(start + fault.at).await;
                            cluster.inject(fault).await
                        }
                        None => std::future::pending().await,
                    }
                } => if let Err(e) = r {
                    break Err(format!("injecting a fault: {e}"));
                }
            }
        }
    };
    outcome.finished_after = start.elapsed();
    // The network heals and every node stops.
    cluster.network.heal_all();
    let _ = cluster.network.set_default_link(base_link());
    cluster.shutdown().await;
    outcome.net = cluster.network.stats();
    outcome.events = recorder.snapshot().iter().filter_map(|e| serde_json::to_value(e).ok()).collect();
    match result {
        Ok(summary) => match std::fs::read(&summary) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(summary) => outcome.summary = Some(summary),
                Err(e) => outcome.error = Some(format!("{summary}: {e}")),
            },
            Err(e) => outcome.error = Some(format!("{summary}: {e}")),
        },
        Err(e) => outcome.error = Some(e),
    }
    outcome
}

/// Every invariant of a node-simulation run; the violations, named: `completes`,
/// `exactly-once`, `bit-identical`, `no-bad-checkpoint` (from the coordinator's summary),
/// `leases` (no two coordination terms commit at once) and `no-split-brain` (every step of a
/// range has one parameter hash across every commit of every node: no diverging lineage).
pub fn check_nodes(outcome: &NodeSimOutcome, expected: &Expected) -> Vec<String> {
    let mut violations = Vec::new();
    match (&outcome.summary, &outcome.error) {
        (_, Some(e)) => violations.push(format!("completes: {e}")),
        (Some(summary), None) => violations.extend(check_process(summary, expected)),
        (None, None) => violations.push("completes: no summary".into()),
    }
    for v in crate::process::check_lease_events(outcome.events.iter()) {
        let name = if v.starts_with("two coordinators committed at once") { "leases" } else { "no-split-brain" };
        violations.push(format!("{name}: {v}"));
    }
    violations
}

/// The job every node-simulation seed runs: the campaign's softmax job on Iris (4
/// partitions, 2 trainers, 2 aggregators, a checkpoint every 5 steps), for 40 epochs (320
/// steps, about 2.3 virtual seconds on three nodes: long enough for the fault phase), with
/// what its fault-free single-process run produces.
pub fn node_job() -> (JobConfig, Expected) {
    node_job_placed(phalanx::config::AggregatorPlacement::Coordinator)
}

/// [`node_job`] with its two aggregator ranges placed by `placement` (`spread`: on nodes 0
/// and 1, moving when those die).
pub fn node_job_placed(placement: phalanx::config::AggregatorPlacement) -> (JobConfig, Expected) {
    let base = crate::sim::campaign_jobs().swap_remove(0).config;
    let config = JobConfig { epochs: Some(40), trainers: 4, aggregator_placement: placement, ..base };
    let prepared = phalanx::PreparedJob::new(config.clone()).expect("the node-simulation job is valid");
    let reference = prepared.reference_params().expect("the plain loop runs");
    let expected = Expected {
        model_sha256: phalanx::model_sha256(prepared.model.as_ref(), &reference),
        params_sha256: phalanx::params_sha256(&reference),
        partition_sizes: prepared.partitions.sizes(),
        epochs: prepared.schedule.epochs,
    };
    (config, expected)
}

/// One seed's verdict in a campaign.
#[derive(Clone, Debug)]
pub struct SeedVerdict {
    /// The run.
    pub outcome: NodeSimOutcome,
    /// What it violated (empty: every invariant held).
    pub violations: Vec<String>,
}

/// Run `seeds` with [`NodeSimOptions::new`] on `threads` threads (each seed in its own
/// runtime and temporary directory), in seed order. A seed that keeps every invariant keeps
/// only its [`KEPT_EVENTS`]; a failing one keeps all.
pub fn run_seeds(seeds: std::ops::Range<u64>, threads: usize) -> Vec<SeedVerdict> {
    run_seeds_of(&node_job(), seeds, threads)
}

/// [`run_seeds`] of another job (and what its fault-free run produces).
pub fn run_seeds_of(
    (job, expected): &(JobConfig, Expected),
    seeds: std::ops::Range<u64>,
    threads: usize,
) -> Vec<SeedVerdict> {
    let seeds: Vec<u64> = seeds.collect();
    let threads = threads.clamp(1, 16);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Mutex<Vec<(u64, SeedVerdict)>> = Mutex::new(Vec::with_capacity(seeds.len()));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else { break };
                let verdict = match sim_tempdir() {
                    Ok(dir) => {
                        let mut outcome = run_nodes(job, &NodeSimOptions::new(seed), dir.path());
                        let violations = check_nodes(&outcome, expected);
                        // A passing seed keeps only what the report reads (a campaign of
                        // thousands of seeds would otherwise hold every event of every run).
                        if violations.is_empty() {
                            outcome.events.retain(|e| KEPT_EVENTS.contains(&e["event"].as_str().unwrap_or("")));
                        }
                        SeedVerdict { outcome, violations }
                    }
                    Err(e) => SeedVerdict {
                        outcome: NodeSimOutcome {
                            seed,
                            faults: Vec::new(),
                            summary: None,
                            error: Some(format!("a temporary directory: {e}")),
                            events: Vec::new(),
                            net: NetStats::default(),
                            finished_after: Duration::ZERO,
                            start_ms: 0,
                        },
                        violations: vec![format!("completes: a temporary directory: {e}")],
                    },
                };
                results.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((seed, verdict));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    results.sort_by_key(|(seed, _)| *seed);
    results.into_iter().map(|(_, v)| v).collect()
}

/// A temporary directory for one simulated run's node directories (checkpoints, logs): in
/// memory (`/dev/shm`) where the machine has it, else the usual temporary directory.
///
/// The simulation checks the control plane under a paused clock; its checkpoints are real
/// files written, fsynced, renamed and pruned by the nodes' own code, but a disk adds nothing
/// to what it checks: on a disk a campaign spent a third of its CPU time in `fsync`, `open`
/// and `unlink`, and every fsync's wait was dead time. Real disks are the process tier's and
/// the checkpoint store's tests' business. Space is no concern: a seed's directory holds a
/// few checkpoints of a small model (the whole of `/dev/shm` peaked at 244 kB while two
/// threads ran seeds), far below even a container's default 64 MiB.
pub fn sim_tempdir() -> std::io::Result<tempfile::TempDir> {
    let memory = Path::new("/dev/shm");
    if memory.is_dir() {
        if let Ok(dir) = tempfile::Builder::new().prefix("phalanx-sim-").tempdir_in(memory) {
            return Ok(dir);
        }
    }
    tempfile::tempdir()
}

/// The events a passing seed keeps in [`run_seeds`]: what reports and tests read.
pub const KEPT_EVENTS: [&str; 3] = ["recovered", "coordinating", "view"];

/// The tier's name in reports.
pub const TIER: &str = crate::report::NODES_TIER;

/// Add a node-simulation campaign's verdicts to `report`: seeds, a row per fault kind
/// (injected; survived when the seed kept every invariant; recovery from the `recovered`
/// events, virtual ms), violations by seed.
pub fn add_to_report(verdicts: &[SeedVerdict], report: &mut crate::report::Report) {
    if !report.tiers.iter().any(|t| t == TIER) {
        report.tiers.push(TIER.into());
    }
    let mut recoveries = Vec::new();
    let mut by_kind: BTreeMap<FaultKind, Vec<u64>> = BTreeMap::new();
    for v in verdicts {
        report.seeds_run += 1;
        let ok = v.violations.is_empty();
        report.identical &= ok;
        report.violations.extend(v.violations.iter().map(|e| format!("{TIER} seed {}: {e}", v.outcome.seed)));
        // Each recovery is the latest fault's that began before it.
        for e in v.outcome.events.iter().filter(|e| e["event"] == "recovered") {
            let (Some(ms), Some(t)) = (e["recovery_ms"].as_u64(), e["t_ms"].as_u64()) else { continue };
            recoveries.push(ms);
            let since = t.saturating_sub(v.outcome.start_ms);
            if let Some(f) = v.outcome.faults.iter().rev().find(|f| f.at.as_millis() as u64 <= since) {
                by_kind.entry(f.kind).or_default().push(ms);
            }
        }
        for f in &v.outcome.faults {
            report.faults_injected += 1;
            report.faults_survived += u64::from(ok);
            let row = report.fault_types.entry(format!("{TIER}: {}", f.kind.name())).or_default();
            row.tier = TIER.into();
            row.injected += 1;
            row.survived += u64::from(ok);
        }
    }
    for (kind, values) in by_kind {
        if let Some(row) = report.fault_types.get_mut(&format!("{TIER}: {}", kind.name())) {
            row.recovery_ms = crate::report::Percentiles::of(&values);
        }
    }
    report.add_recoveries(TIER, &recoveries);
}
