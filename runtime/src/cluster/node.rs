//! A cluster node: the QUIC transport, membership and failure detection,
//! and a stream of events for people and scripts.
//!
//! ```text
//!   seeds ──dial──▶ Transport (mTLS QUIC) ──events──▶ node loop ──▶ Membership core
//!                        ▲                               │  ticks (every TICK_MS)
//!                        └──────── frames (NodeMsg) ◀────┘──▶ stdout: one JSON event per line
//! ```
//!
//! The node hands one typed event per state change to its sink (see
//! [`super::event`]); `phalanx node` prints each as one JSON object per line
//! on stdout (`listening` with the process id, `peer_up`, `peer_down`,
//! `down`, `view`, `quorum_lost`, `duplicate_identity`, `stopped`; with a job
//! `coordinating`, `spawn`, `step`, `job_done`, `job_failed`), each with
//! `node` and `t_ms` (milliseconds since the Unix epoch, so a driver can
//! measure detection time against the moment it killed a process), and logs
//! for people on stderr. `step` events come at a bounded rate (see
//! [`super::step_events`]) while the coordinator appends every step to
//! `OUT/history.csv`.
//!
//! **One process per node id.** A second process started with a member's id
//! (an operator mistake) is refused by every member whose connection to the
//! first one is still heard from (see
//! [`TransportConfig::restart_silence_ms`], set here to the failure timeout):
//! the members print `duplicate_identity` with `"role": "member"`, the second
//! process prints it with `"role": "refused"` and stops with
//! [`Error::DuplicateIdentity`]. A restarted node (the old process is dead,
//! so silent) takes over as before.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use phalanx_transport::certs::NodeIdentity;
use phalanx_transport::{codes, Limits, Transport, TransportConfig, TransportEvent};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use phalanx_actors::actor::{spawn_job_recording, JobContext};
use phalanx_actors::checkpoint::CheckpointStore;
use phalanx_actors::net::{JobMsg, LocalNet, Net};
use ractor::{Actor, ActorRef};
use tokio::sync::{mpsc, watch};

use super::event::{unix_ms, DuplicateRole, EventSink, NodeEvent, NodeEventKind};
use super::membership::{DetectorConfig, Membership, MembershipCommand};
use super::placement::{default_replicas, Placement, Shape};
use super::replication::{ReplicationStats, ReplicationTracker};
use super::resume::{Inventory, Resume, ResumeCommand, ResumeConfig, Source};
use super::runner::{to_job, ClusterHooks, ClusterNet, HostActor, HostMsg, Outbound, Routes, Routing};
use super::step_events::StepEvents;
use super::wire::{self, Inbound, InboundError, NodeMsg};
use crate::error::Error;
use crate::job::PreparedJob;
use crate::metrics::{Kind, NodeMetrics};
use phalanx_actors::checkpoint::{FileKey, CHECKPOINTS_KEPT};

/// How often the node loop advances the membership clock.
const TICK_MS: u64 = 20;
/// Delay before re-dialling a seed that did not answer.
const REDIAL_MS: u64 = 200;

/// What a node needs to start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (must match its certificate, `node-<id>`).
    pub id: u32,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Directory with `ca.pem` and `node-<id>.pem`/`.key` (see `phalanx certs`).
    pub certs: PathBuf,
    /// Addresses of the other members.
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
    /// Configured cluster size; members are nodes `0..nodes`. Default: seeds + 1.
    #[serde(default)]
    pub nodes: Option<u32>,
    /// Where the node keeps its state (checkpoint copies).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Failure-detector settings.
    #[serde(default)]
    pub detector: DetectorConfig,
    /// The training job this cluster runs (every node gets the same file).
    #[serde(default)]
    pub job: Option<PathBuf>,
    /// Where the coordinator writes summary.json and model.safetensors.
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Fault injection for chaos tests: abort this process after writing the
    /// checkpoint of this step to its temporary file, before the rename.
    #[serde(default)]
    pub crash_before_rename: Option<u64>,
    /// Other nodes that keep a copy of every checkpoint (the coordinator's
    /// successor first). Default: 2 when the cluster has at least 5 members,
    /// else 1 (see [`default_replicas`]).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Steps that always get a `step` event when this node coordinates (a
    /// harness injecting faults at those steps); other steps are reported at
    /// a bounded rate (see [`super::step_events`]).
    #[serde(default)]
    pub report_steps: Vec<u64>,
}

impl NodeConfig {
    /// The configured members: `0..nodes`.
    pub fn members(&self) -> u32 {
        self.nodes.unwrap_or(self.seeds.len() as u32 + 1)
    }

    /// Checkpoint copies on other nodes: `replicas`, or the default for the cluster size.
    pub fn replica_count(&self) -> u32 {
        self.replicas.unwrap_or_else(|| default_replicas(self.members())).min(self.members().saturating_sub(1))
    }

    /// Check what can be checked before binding.
    pub fn validate(&self) -> Result<(), Error> {
        let field = |f: &str, reason: String| Err(Error::Field { field: f.into(), reason });
        if self.id >= self.members() {
            return field(
                "id",
                format!(
                    "node {} is not a member of a {}-node cluster (ids 0..{})",
                    self.id,
                    self.members(),
                    self.members()
                ),
            );
        }
        if let Some(r) = self.replicas.filter(|r| *r >= self.members()) {
            return field(
                "replicas",
                format!(
                    "{r} copies need {r} other nodes, and a {}-node cluster has {} (at most {})",
                    self.members(),
                    self.members() - 1,
                    self.members() - 1
                ),
            );
        }
        if self.detector.heartbeat_ms == 0 || self.detector.failure_timeout_ms <= self.detector.heartbeat_ms {
            return field("detector", "failure_timeout_ms must exceed heartbeat_ms, and both be positive".into());
        }
        Ok(())
    }
}

/// What a node is given besides its config: where its events go, its
/// metrics, optionally its identity and job in memory, and a channel told the
/// bound address once it listens.
pub struct NodeParts {
    /// Where events go (the binary prints them; a [`NodeHandle`](crate::node::NodeHandle) broadcasts them).
    pub events: EventSink,
    /// This node's metrics.
    pub metrics: Arc<NodeMetrics>,
    /// The identity; loaded from `config.certs` when absent.
    pub identity: Option<NodeIdentity>,
    /// The job; read from `config.job` when absent.
    pub job: Option<crate::JobConfig>,
    /// Told the bound address once the node listens.
    pub bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    /// The models and data sources this node can host.
    pub registries: crate::job::Registries,
}

/// Hands a node's events to its sink, stamped with the node and the time.
#[derive(Clone)]
struct Emitter {
    node: u32,
    sink: EventSink,
}

impl Emitter {
    fn emit(&self, kind: NodeEventKind) {
        (self.sink)(NodeEvent::new(self.node, kind));
    }
}

/// The job side of a node: the prepared job, the host of placed actors,
/// routing, and (on the coordinator) the running supervisor.
struct NodeJob {
    prepared: Arc<PreparedJob>,
    host_ctx: Arc<JobContext>,
    host: ActorRef<HostMsg>,
    routing: Routing,
    routes: watch::Sender<Routes>,
    names: LocalNet,
    checkpoints: PathBuf,
    out: Option<PathBuf>,
    /// Fault injection: see [`NodeConfig::crash_before_rename`].
    crash_before_rename: Option<u64>,
    /// See [`NodeConfig::report_steps`].
    report_steps: Vec<u64>,
    members: Vec<u32>,
    /// Checkpoint copies wanted on other nodes.
    replicas: u32,
    coordinator: Option<(u64, tokio::task::JoinHandle<()>)>,
    done: bool,
    /// Members of the previous view, to notice a node coming back.
    last_members: std::collections::BTreeSet<u32>,
    /// Where a coordinator starts the job from (asks the members first).
    resume: Resume,
    /// This node has seen the job run (hosted its actors, had its locations,
    /// coordinated it): a coordinator taking over need not wait for a fresh start.
    seen_job: bool,
    /// When the job first started anywhere (Unix ms), as coordinators said.
    job_started_ms: Option<u64>,
    /// Copies of this node's checkpoints acknowledged by the replicas.
    replication: ReplicationTracker,
    replication_stats: watch::Sender<ReplicationStats>,
    events: Emitter,
    metrics: Arc<NodeMetrics>,
}

impl NodeJob {
    async fn start(
        config: &NodeConfig,
        job: Option<crate::JobConfig>,
        registries: &crate::job::Registries,
        out_tx: mpsc::UnboundedSender<Outbound>,
        events: Emitter,
        metrics: Arc<NodeMetrics>,
    ) -> Result<Option<Self>, Error> {
        let job = match (job, &config.job) {
            (Some(job), _) => job,
            (None, Some(path)) => crate::JobConfig::from_toml_file(path)?,
            (None, None) => return Ok(None),
        };
        let prepared = Arc::new(PreparedJob::with_registries(job, &registries.models, &registries.data)?);
        let data_dir = config
            .data_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("phalanx-node-{}-{}", config.id, std::process::id())));
        let checkpoints = data_dir.join("checkpoints");
        let (routes, routes_rx) = watch::channel(Routes::default());
        let routing = Routing {
            me: config.id,
            routes: routes_rx,
            out: out_tx,
            limits: Limits::default(),
            trainers: prepared.config.trainers,
        };
        let names = LocalNet::new(format!("phalanx-node{}", config.id), prepared.config.trainers);
        let net = Arc::new(ClusterNet::new(names.clone(), routing.clone()));
        let store = CheckpointStore::open(&checkpoints)?;
        let host_ctx = prepared.context(prepared.cluster_job_id(), store, names.clone(), net, None);
        let (host, _) = Actor::spawn(None, HostActor, (host_ctx.clone(), routing.clone()))
            .await
            .map_err(|e| Error::Spawn(e.to_string()))?;
        let replicas = config.replica_count();
        let resume_config = ResumeConfig {
            // Members of the view are alive: a few failure timeouts is plenty to answer.
            answer_timeout: Duration::from_millis(2 * config.detector.failure_timeout_ms),
            ..ResumeConfig::default()
        };
        Ok(Some(Self {
            prepared,
            host_ctx,
            host,
            routing,
            routes,
            names,
            checkpoints,
            out: config.out.clone(),
            crash_before_rename: config.crash_before_rename,
            report_steps: config.report_steps.clone(),
            members: (0..config.members()).collect(),
            replicas,
            coordinator: None,
            done: false,
            last_members: Default::default(),
            resume: Resume::new(config.id, 0..config.members(), resume_config),
            seen_job: false,
            job_started_ms: None,
            replication: ReplicationTracker::new(replicas),
            replication_stats: watch::channel(ReplicationStats { replicas, ..Default::default() }).0,
            events,
            metrics,
        }))
    }

    fn on_view(&mut self, view: &super::membership::View) {
        let plan = self.host_ctx.plan.clone();
        let shape = Shape {
            configured: self.members.len() as u32,
            trainers: plan.trainers,
            assignment: &plan.assignment,
            aggregators: plan.ranges.len() as u32,
            replicas: self.replicas,
        };
        let placement = Placement::compute(view.epoch, view.coordinator, &view.members, &shape);
        let previous = self.routes.borrow().placement.as_ref().map(|p| p.coordinator);
        let changed = previous != Some(view.coordinator);
        self.routes.send_modify(|r| r.placement = placement);
        // A new coordinator respawns every actor; what an old one placed here goes.
        let _ = self.host.send_message(HostMsg::CoordinatorIs { coordinator: view.coordinator, epoch: view.epoch });
        let me = self.routing.me;
        let grew = view.members.iter().any(|m| !self.last_members.contains(m)) && !self.last_members.is_empty();
        self.last_members = view.members.clone();
        if view.coordinator == me && grew && !changed {
            // A node came back: give it its work again.
            to_job(&self.names, JobMsg::Rebalance);
        }
        if view.coordinator != me {
            self.resume.cancel();
            if let Some((_, task)) = self.coordinator.take() {
                task.abort();
                if let Some(job) = ActorRef::<JobMsg>::where_is(self.names.job_name()) {
                    job.stop_children(None);
                    job.stop(None);
                }
            }
        } else if self.coordinator.is_none() && !self.done {
            // A new view while deciding starts the decision over with its members.
            let cmds = self.resume.begin(view.epoch, &view.members, self.local_newest(), self.seen_job, Instant::now());
            self.run_resume(cmds);
        }
    }

    /// This node's newest complete checkpoint of the job.
    fn local_newest(&self) -> Option<u64> {
        newest_complete(&self.checkpoints, &self.prepared)
    }

    /// Carry out the resume decision's commands.
    fn run_resume(&mut self, cmds: Vec<ResumeCommand>) {
        let me = self.routing.me;
        for cmd in cmds {
            match cmd {
                ResumeCommand::Ask { to, epoch } => self.send_control(to, &NodeMsg::CheckpointQuery { epoch }),
                ResumeCommand::Fetch { from, step, epoch } => {
                    tracing::info!(node = me, from, step, "fetching checkpoint {step} from node {from}");
                    self.events.emit(NodeEventKind::Fetching { from, step, epoch });
                    self.send_control(from, &NodeMsg::CheckpointFetch { epoch, step });
                }
                ResumeCommand::Start { restore, source, epoch } => {
                    self.metrics.coordinator_waiting.set(0);
                    self.start_coordinator(epoch, restore, source)
                }
                ResumeCommand::Waiting { missing, reason } => {
                    tracing::warn!(node = me, ?missing, "coordinator not starting the job yet: {reason}");
                    self.metrics.coordinator_waiting.set(1);
                    self.events.emit(NodeEventKind::Waiting { missing, reason });
                }
            }
        }
    }

    /// The clock advanced (the node loop's tick).
    fn on_tick(&mut self, now: Instant) {
        if self.resume.is_deciding() {
            let cmds = self.resume.on_tick(now);
            self.run_resume(cmds);
        }
    }

    fn send_control(&self, to: u32, msg: &NodeMsg) {
        match wire::encode(msg, &self.routing.limits) {
            Ok(frame) => {
                let _ = self.routing.out.send((to, frame));
            }
            Err(e) => tracing::warn!(node = self.routing.me, to, "cannot encode a control message: {e}"),
        }
    }

    fn start_coordinator(&mut self, epoch: u64, restore: Option<u64>, source: Source) {
        let me = self.routing.me;
        self.seen_job = true;
        let prepared = self.prepared.clone();
        let routing = self.routing.clone();
        let names = self.names.clone();
        let members = self.members.clone();
        let checkpoints = self.checkpoints.clone();
        let out = self.out.clone();
        let crash = self.crash_before_rename;
        let replication = self.replication_stats.subscribe();
        // A job this node has never seen run starts fresh (a new history);
        // any other start continues it.
        let fresh_job = self.job_started_ms.is_none();
        let job_started_ms = *self.job_started_ms.get_or_insert_with(unix_ms);
        let (events, metrics) = (self.events.clone(), self.metrics.clone());
        let start = Start {
            epoch,
            restore,
            source,
            replication,
            job_started_ms,
            fresh_job,
            report_steps: self.report_steps.clone(),
            events: events.clone(),
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(async move {
            let result = match CheckpointStore::open(&checkpoints) {
                Ok(store) => {
                    let store = store.with_crash_before_rename(crash);
                    coordinate(prepared, routing, names, members, store, out, start).await
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = result {
                tracing::error!(node = me, "coordinator: {e}");
                metrics.jobs.get_or_create(&Kind::of("running")).set(0);
                metrics.jobs.get_or_create(&Kind::of("failed")).inc();
                events.emit(NodeEventKind::JobFailed { error: e.to_string() });
            }
        });
        self.coordinator = Some((epoch, task));
    }

    /// Stop the coordinator (if here) and every hosted actor, telling their
    /// coordinators `why`.
    fn stop_all(&mut self, why: &str) {
        let reason = Some(format!("node {} {why}", self.routing.me));
        let _ = self.host.send_message(HostMsg::StopAll { reason });
        self.resume.cancel();
        if let Some((_, task)) = self.coordinator.take() {
            task.abort();
            if let Some(job) = ActorRef::<JobMsg>::where_is(self.names.job_name()) {
                job.stop_children(None);
                job.stop(None);
            }
        }
    }

    /// A frame from `peer` (or from this node's own queue).
    fn on_inbound(&mut self, peer: u32, inbound: Inbound) {
        let me = self.routing.me;
        match inbound {
            Inbound::Deliver(to, msg) => self.names.send(to, msg),
            Inbound::Checkpoint(name, bytes) => self.on_checkpoint_copy(peer, &name, &bytes),
            Inbound::Control(NodeMsg::Spawn { key, generation, restore, spawn }) => {
                self.seen_job = true;
                self.events.emit(NodeEventKind::Spawn { actor: key.to_string(), from: peer });
                let _ = self.host.send_message(HostMsg::Spawn { from: peer, key, generation, restore, spawn });
            }
            Inbound::Control(NodeMsg::Stop { key }) => {
                let _ = self.host.send_message(HostMsg::Stop { key, from: peer });
            }
            Inbound::Control(NodeMsg::Started { key, spawn }) => {
                to_job(&self.names, JobMsg::RemoteStarted(key, peer, spawn))
            }
            Inbound::Control(NodeMsg::Failed { key, spawn, reason }) => {
                to_job(&self.names, JobMsg::RemoteFailed(key, peer, spawn, reason))
            }
            Inbound::Control(NodeMsg::Locations { epoch, job_started_ms, map }) => {
                self.seen_job = true;
                self.job_started_ms = Some(self.job_started_ms.map_or(job_started_ms, |t| t.min(job_started_ms)));
                self.routes.send_modify(|r| r.set_locations(peer, epoch, map));
            }
            Inbound::Control(NodeMsg::JobDone { summary, model_sha256 }) => {
                self.done = true;
                self.resume.cancel();
                let _ = self.host.send_message(HostMsg::StopAll { reason: None });
                self.events.emit(NodeEventKind::JobDone { summary, model_sha256, from: peer });
            }
            Inbound::Control(NodeMsg::CheckpointQuery { epoch }) => self.answer_query(peer, epoch),
            Inbound::Control(NodeMsg::CheckpointInventory { epoch, inventory }) => {
                let cmds = self.resume.on_inventory(peer, epoch, inventory, Instant::now());
                self.run_resume(cmds);
            }
            Inbound::Control(NodeMsg::CheckpointFetch { epoch, step }) => self.serve_fetch(peer, epoch, step),
            Inbound::Control(NodeMsg::CheckpointStored { name }) => {
                self.replication.on_acked(&name, peer);
                self.replication_stats.send_replace(self.replication.snapshot());
            }
            Inbound::Control(NodeMsg::Replicating { name, to }) if peer == me => {
                if let Some(key) = FileKey::parse(&name) {
                    self.replication.on_sent(&name, key.step, &to);
                    self.replication_stats.send_replace(self.replication.snapshot());
                }
            }
            Inbound::Control(
                NodeMsg::Membership(_)
                | NodeMsg::Deliver { .. }
                | NodeMsg::CheckpointCopy { .. }
                | NodeMsg::Replicating { .. },
            ) => {}
        }
    }

    /// A new coordinator asks what this node holds: answer from a blocking
    /// task (listing and verifying files is disk work, not the node loop's).
    fn answer_query(&self, peer: u32, epoch: u64) {
        let (dir, prepared, out, limits) =
            (self.checkpoints.clone(), self.prepared.clone(), self.routing.out.clone(), self.routing.limits);
        let started = self.seen_job;
        tokio::task::spawn_blocking(move || {
            let inventory = Inventory { newest: newest_complete(&dir, &prepared), started };
            if let Ok(frame) = wire::encode(&NodeMsg::CheckpointInventory { epoch, inventory }, &limits) {
                let _ = out.send((peer, frame));
            }
        });
    }

    /// A new coordinator fetches checkpoint `step`: send it every file of it.
    fn serve_fetch(&self, peer: u32, epoch: u64, step: u64) {
        let (dir, out, limits, me) =
            (self.checkpoints.clone(), self.routing.out.clone(), self.routing.limits, self.routing.me);
        tokio::task::spawn_blocking(move || {
            let files = CheckpointStore::reader(&dir).files_of_step(step).unwrap_or_else(|e| {
                tracing::warn!(node = me, peer, step, "cannot list checkpoint {step} for node {peer}: {e}");
                Vec::new()
            });
            if files.is_empty() {
                tracing::warn!(node = me, peer, step, epoch, "node {peer} asked for checkpoint {step}, which is gone");
            }
            for path in files {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
                let frame = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| wire::encode_checkpoint(&name, &bytes, &limits).map_err(|e| e.to_string()));
                match frame {
                    Ok(frame) => {
                        let _ = out.send((peer, frame));
                    }
                    Err(e) => tracing::warn!(node = me, peer, path = %path.display(), "cannot send a checkpoint: {e}"),
                }
            }
        });
    }

    /// A checkpoint file from `peer`: a replica's copy from the coordinator, or
    /// a file this node fetches to take over. Nobody else may write here.
    fn on_checkpoint_copy(&mut self, peer: u32, name: &str, bytes: &[u8]) {
        let me = self.routing.me;
        let coordinator = self.routes.borrow().placement.as_ref().map(|p| p.coordinator);
        let fetching = self.resume.fetching_from() == Some(peer);
        if coordinator != Some(peer) && !fetching {
            tracing::warn!(
                node = me,
                peer,
                "refusing checkpoint copy {name:?} from node {peer}: not the coordinator ({coordinator:?}) nor a node this one fetches from"
            );
            return;
        }
        if !self.store_copy(peer, name, bytes) {
            return;
        }
        if fetching {
            let cmds = self.resume.on_local(self.local_newest(), Instant::now());
            self.run_resume(cmds);
            return;
        }
        self.send_control(peer, &NodeMsg::CheckpointStored { name: name.to_string() });
        // Keep the newest few complete copies, as the coordinator does (every
        // few checkpoints: pruning verifies the files it keeps).
        let every = self.prepared.config.checkpoint_every.max(1);
        if FileKey::parse(name).is_some_and(|k| (k.step / every) % CHECKPOINTS_KEPT as u64 == 0) {
            let (dir, prepared) = (self.checkpoints.clone(), self.prepared.clone());
            tokio::task::spawn_blocking(move || {
                let store = CheckpointStore::reader(&dir);
                if let Err(e) = store.prune(&prepared.config_hash, prepared.model.num_params(), CHECKPOINTS_KEPT) {
                    tracing::warn!(node = me, "pruning checkpoint copies in {} failed: {e}", dir.display());
                }
            });
        }
    }

    /// Keep a checkpoint copy, verified before it counts; true when kept.
    fn store_copy(&self, peer: u32, name: &str, bytes: &[u8]) -> bool {
        let me = self.routing.me;
        if name.contains('/') || name.contains('\\') || !name.starts_with("ckpt-") || !name.ends_with(".safetensors") {
            tracing::warn!(node = me, peer, "refusing a checkpoint copy named {name:?}");
            return false;
        }
        let path = self.checkpoints.join(name);
        if let Err(e) = std::fs::create_dir_all(&self.checkpoints)
            .map_err(|source| Error::Io { path: self.checkpoints.clone(), source })
            .and_then(|()| crate::output::write_atomic(&path, bytes))
        {
            tracing::warn!(node = me, "cannot keep a checkpoint copy: {e}");
            return false;
        }
        if let Err(e) = CheckpointStore::read_file(&path) {
            tracing::warn!(node = me, peer, "checkpoint copy {name} is bad ({e}); deleted");
            let _ = std::fs::remove_file(&path);
            return false;
        }
        true
    }
}

/// The newest complete checkpoint of `job` in `dir` (none when unreadable: logged).
fn newest_complete(dir: &std::path::Path, job: &PreparedJob) -> Option<u64> {
    CheckpointStore::reader(dir).newest_complete(&job.config_hash, job.model.num_params()).unwrap_or_else(|e| {
        tracing::warn!(dir = %dir.display(), "cannot list checkpoints: {e}");
        None
    })
}

/// Where a coordinator starts: its view, the resume decision, and the
/// replication figures to report at the end.
struct Start {
    epoch: u64,
    restore: Option<u64>,
    source: Source,
    replication: watch::Receiver<ReplicationStats>,
    /// When the job first started, on any coordinator (Unix ms).
    job_started_ms: u64,
    /// This node never saw the job run before: a new history.
    fresh_job: bool,
    /// Steps that always get a `step` event.
    report_steps: Vec<u64>,
    events: Emitter,
    metrics: Arc<NodeMetrics>,
}

/// The first generation of a supervisor started by node `me` in view
/// `epoch`: above every generation of earlier views (the epoch is in the high
/// bits) and distinct from one another coordinator might start in a view of
/// the same epoch (node ids in bits 20..32; rollbacks count up from there).
fn first_generation(epoch: u64, me: u32) -> u64 {
    (epoch << 32) | (u64::from(me & 0xfff) << 20)
}

/// What the coordinator writes and reports besides the job itself.
/// Run the job's supervisor on this node (the coordinator) until the job ends.
async fn coordinate(
    prepared: Arc<PreparedJob>,
    routing: Routing,
    names: LocalNet,
    members: Vec<u32>,
    store: CheckpointStore,
    out: Option<PathBuf>,
    start: Start,
) -> Result<(), Error> {
    let me = routing.me;
    let Start { epoch, restore, source, replication, job_started_ms, fresh_job, report_steps, events, metrics } = start;
    let hooks = Arc::new(ClusterHooks::new(routing.clone(), members.clone(), epoch, job_started_ms));
    let net = Arc::new(ClusterNet::new(names.clone(), routing.clone()));
    let ctx = prepared.context(prepared.cluster_job_id(), store, names, net, Some(hooks));
    let (source, cause) = match source {
        Source::Local => ("local".to_string(), "local"),
        Source::Fetched(node) => (format!("node {node}"), "fetched"),
        Source::Scratch => ("none".to_string(), "scratch"),
    };
    tracing::info!(node = me, epoch, ?restore, %source, "coordinating the job");
    metrics.takeovers.get_or_create(&Kind::of(cause)).inc();
    metrics.jobs.get_or_create(&Kind::of("running")).set(1);
    events.emit(NodeEventKind::Coordinating { epoch, restore, restore_from: source });
    // A coordinator taking over continues its predecessor's history (steps it
    // recomputes appear again); a fresh job starts a new one.
    let mut history = match &out {
        Some(dir) => Some(crate::output::HistoryWriter::open(&dir.join(crate::output::HISTORY_FILE), !fresh_job)?),
        None => None,
    };
    let total_steps = prepared.schedule.total_steps();
    let mut step_events = StepEvents::new(report_steps, total_steps);
    // A new view (a node lost or back) or placement: report the next step when it comes.
    let mut routes = routing.routes.clone();
    routes.mark_unchanged();
    // Generations of this supervisor start above any a predecessor issued.
    let handle = spawn_job_recording(ctx, restore, first_generation(epoch, me))
        .await
        .map_err(|e| Error::Spawn(e.to_string()))?;
    let mut last_at: Option<Instant> = None;
    let outcome = crate::job::await_job(
        handle,
        |_| {},
        |r| {
            if let Some(h) = history.as_mut() {
                h.record(r);
            }
            metrics.steps_applied.inc();
            metrics.samples_applied.inc_by(r.samples);
            if let Some(at) = last_at.replace(r.at) {
                metrics.step_duration.observe(r.at.saturating_duration_since(at).as_secs_f64());
            }
            if routes.has_changed().unwrap_or(false) {
                routes.mark_unchanged();
                step_events.report_next();
            }
            if step_events.due(r.step, r.at) {
                events.emit(NodeEventKind::Step { step: r.step, total_steps, loss: r.loss });
            }
        },
    )
    .await?;
    metrics.checkpoint_failures.inc_by(outcome.checkpoint_failures.len() as u64);
    metrics.jobs.get_or_create(&Kind::of("running")).set(0);
    metrics.jobs.get_or_create(&Kind::of("finished")).inc();
    let evaluation = prepared.evaluate(&outcome.params)?;
    // The whole job's wall time, predecessors' shares included.
    let duration = Duration::from_millis(unix_ms().saturating_sub(job_started_ms));
    let history = history.map(|h| h.path().to_path_buf());
    let report = crate::TrainReport { outcome, evaluation, duration, history };
    let model_sha256 = crate::params_sha256(&report.outcome.params);
    let summary = match &out {
        Some(dir) => {
            crate::write_outputs(dir, &prepared, &report)?;
            let replication = serde_json::to_value(&*replication.borrow()).unwrap_or_default();
            crate::output::patch_summary(dir, [("replication".to_string(), replication)])?;
            Some(dir.join("summary.json").to_string_lossy().into_owned())
        }
        None => None,
    };
    let done = NodeMsg::JobDone { summary, model_sha256 };
    if let Ok(frame) = super::wire::encode(&done, &routing.limits) {
        for m in members {
            let _ = routing.out.send((m, frame.clone()));
        }
    }
    Ok(())
}

/// Run a node until `shutdown` resolves, handing its events to `events`.
pub async fn run_node(
    config: NodeConfig,
    events: EventSink,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let metrics = NodeMetrics::new(config.id);
    let parts = NodeParts { events, metrics, identity: None, job: None, bound: None, registries: Default::default() };
    run_node_with(config, parts, shutdown).await
}

/// [`run_node`] with every part given (see [`NodeParts`]).
pub async fn run_node_with(
    config: NodeConfig,
    parts: NodeParts,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    config.validate()?;
    let NodeParts { events: sink, metrics, identity, job, bound, registries } = parts;
    let identity = match identity {
        Some(identity) if identity.id == config.id => identity,
        Some(identity) => {
            return Err(Error::Field {
                field: "identity".into(),
                reason: format!("the identity is node {}'s, this is node {}", identity.id, config.id),
            })
        }
        None => NodeIdentity::load(&config.certs, config.id)
            .map_err(|e| Error::Field { field: "certs".into(), reason: e.to_string() })?,
    };
    let emitter = Emitter { node: config.id, sink };
    let limits = Limits::default();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outbound>();
    let mut job = NodeJob::start(&config, job, &registries, out_tx, emitter.clone(), metrics.clone()).await?;
    let mut transport_config = TransportConfig::new(identity, config.listen);
    // A member silent for a failure timeout is down for membership too: only then may another
    // incarnation with its id replace it; until then a second process is refused.
    transport_config.restart_silence_ms = config.detector.failure_timeout_ms.min(transport_config.idle_timeout_ms);
    let (transport, mut events) = Transport::bind(transport_config)
        .await
        .map_err(|e| Error::Field { field: "listen".into(), reason: format!("{}: {e}", config.listen) })?;
    let me = config.id;
    let addr = transport.local_addr();
    tracing::info!(node = me, %addr, "listening");
    emitter.emit(NodeEventKind::Listening { addr, pid: std::process::id() });
    if let Some(bound) = bound {
        let _ = bound.send(addr);
    }

    let mut membership = Membership::new(me, 0..config.members(), config.detector);
    let mut dialing: BTreeMap<SocketAddr, Instant> = BTreeMap::new();
    let mut connected_addrs: BTreeMap<u32, SocketAddr> = BTreeMap::new();
    let (dial_tx, mut dial_rx) = mpsc::channel::<(SocketAddr, Result<u32, String>)>(64);
    let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    // Set when this process must stop with an error (it is a second one with this id).
    let mut fatal: Option<Error> = None;

    loop {
        let cmds = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                let now = Instant::now();
                // Dial seeds we have no connection to (a restarted seed comes back this way).
                for seed in &config.seeds {
                    let live = connected_addrs.values().any(|a| a == seed);
                    let due = dialing.get(seed).is_none_or(|t| now >= *t);
                    if !live && due {
                        dialing.insert(*seed, now + Duration::from_secs(3600));
                        let (t, tx, seed) = (transport.clone(), dial_tx.clone(), *seed);
                        tokio::spawn(async move {
                            let r = t.connect(seed, None).await.map_err(|e| e.to_string());
                            let _ = tx.send((seed, r)).await;
                        });
                    }
                }
                if let Some(job) = job.as_mut() {
                    job.on_tick(now);
                }
                membership.on_tick(now)
            }
            Some((node, frame)) = out_rx.recv() => {
                if node == me {
                    if let (Some(job), Ok(inbound)) = (job.as_mut(), wire::decode(&frame[4..], &limits)) {
                        job.on_inbound(me, inbound);
                    }
                } else {
                    let bytes = frame.len() as u64;
                    match transport.send(node, frame) {
                        Ok(()) => {
                            metrics.bytes_sent.get_or_create(&Kind::of("cluster")).inc_by(bytes);
                        }
                        Err(e) => tracing::debug!(node = me, to = node, "frame not sent: {e}"),
                    }
                }
                Vec::new()
            }
            Some((seed, result)) = dial_rx.recv() => {
                match result {
                    Ok(peer) => {
                        connected_addrs.insert(peer, seed);
                        dialing.remove(&seed);
                    }
                    Err(e) => {
                        tracing::debug!(node = me, %seed, "dial failed: {e}");
                        dialing.insert(seed, Instant::now() + Duration::from_millis(REDIAL_MS));
                    }
                }
                Vec::new()
            }
            event = events.recv() => match event {
                None => break,
                Some(TransportEvent::PeerUp { peer, addr }) => {
                    emitter.emit(NodeEventKind::PeerUp { peer, addr });
                    Vec::new()
                }
                Some(TransportEvent::PeerDown { peer, reason }) => {
                    connected_addrs.remove(&peer);
                    emitter.emit(NodeEventKind::PeerDown { peer, reason });
                    Vec::new()
                }
                Some(TransportEvent::Message { peer, frame }) => match wire::decode(&frame, &limits) {
                    Ok(Inbound::Control(NodeMsg::Membership(m))) => {
                        metrics.bytes_received.get_or_create(&Kind::of("membership")).inc_by(frame.len() as u64);
                        membership.on_message(peer, m, Instant::now())
                    }
                    Ok(inbound) => {
                        metrics.bytes_received.get_or_create(&Kind::of("cluster")).inc_by(frame.len() as u64);
                        if let Some(job) = job.as_mut() {
                            job.on_inbound(peer, inbound);
                        }
                        Vec::new()
                    }
                    Err(e) => {
                        let code = match &e {
                            InboundError::Decode(d) => d.reason_code(),
                            InboundError::TensorMismatch { .. } => wire::TENSOR_MISMATCH_CODE,
                        };
                        tracing::warn!(node = me, peer, "closing the connection of node {peer}: bad frame: {e}");
                        transport.reject(peer, code, &e.to_string());
                        Vec::new()
                    }
                },
                Some(TransportEvent::Rejected { addr, peer, code: codes::DUPLICATE_IDENTITY, reason }) => {
                    tracing::warn!(node = me, %addr, ?peer, "refused a second process with a member's id: {reason}");
                    metrics.rejected_connections.get_or_create(&Kind::of(codes::name(codes::DUPLICATE_IDENTITY))).inc();
                    emitter.emit(NodeEventKind::DuplicateIdentity { role: DuplicateRole::Member, peer, addr, reason });
                    Vec::new()
                }
                Some(TransportEvent::Rejected { addr, peer, code, reason }) => {
                    tracing::warn!(node = me, %addr, ?peer, code, "rejected connection: {reason}");
                    metrics.rejected_connections.get_or_create(&Kind::of(codes::name(code))).inc();
                    emitter.emit(NodeEventKind::Rejected { addr, peer, code, reason });
                    Vec::new()
                }
                Some(TransportEvent::DuplicateIdentity { peer, addr, reason }) => {
                    tracing::error!(node = me, by = peer, %addr, "refused as a second process with this id: {reason}");
                    emitter.emit(NodeEventKind::DuplicateIdentity {
                        role: DuplicateRole::Refused,
                        peer: Some(peer),
                        addr,
                        reason: reason.clone(),
                    });
                    fatal = Some(Error::DuplicateIdentity { node: me, by: peer, addr, reason });
                    break;
                }
            },
        };
        for cmd in cmds {
            match cmd {
                MembershipCommand::Send(to, msg) => {
                    if let Ok(frame) = wire::encode(&NodeMsg::Membership(msg), &limits) {
                        let bytes = frame.len() as u64;
                        // A peer without a connection simply misses a heartbeat.
                        if transport.send(to, frame).is_ok() {
                            metrics.bytes_sent.get_or_create(&Kind::of("membership")).inc_by(bytes);
                        }
                    }
                }
                MembershipCommand::Down(peer) => {
                    tracing::warn!(node = me, peer, "node {peer} is down (no heartbeat)");
                    if let Some(heard) = membership.last_heard(peer) {
                        metrics
                            .failure_detection
                            .observe(Instant::now().saturating_duration_since(heard).as_secs_f64());
                    }
                    metrics.restarts.get_or_create(&Kind::of("node_lost")).inc();
                    emitter.emit(NodeEventKind::Down { peer });
                    if let Some(job) = job.as_ref() {
                        to_job(&job.names, JobMsg::NodeLost(peer));
                    }
                }
                MembershipCommand::Adopted(view) => {
                    tracing::info!(
                        node = me,
                        epoch = view.epoch,
                        coordinator = view.coordinator,
                        "new view {:?}",
                        view.members
                    );
                    metrics.membership_epoch.set(i64::try_from(view.epoch).unwrap_or(i64::MAX));
                    metrics.members.set(view.members.len() as i64);
                    emitter.emit(NodeEventKind::View {
                        epoch: view.epoch,
                        coordinator: view.coordinator,
                        members: view.members.clone(),
                    });
                    if let Some(job) = job.as_mut() {
                        job.on_view(&view);
                    }
                }
                MembershipCommand::QuorumLost => {
                    let reachable: Vec<u32> = membership.up().iter().copied().collect();
                    let missing: Vec<u32> = (0..config.members()).filter(|m| !reachable.contains(m)).collect();
                    let need = config.members() / 2 + 1;
                    tracing::warn!(
                        node = me,
                        ?reachable,
                        ?missing,
                        "no majority of the cluster is reachable ({} of {}, {need} needed): waiting for any of nodes {missing:?}",
                        reachable.len(),
                        config.members()
                    );
                    metrics.members.set(0);
                    emitter.emit(NodeEventKind::QuorumLost { reachable, missing, needed: need });
                    if let Some(job) = job.as_mut() {
                        job.stop_all("lost its quorum");
                    }
                }
            }
        }
    }
    if let Some(job) = job.as_mut() {
        job.stop_all("is shutting down");
    }
    transport.shutdown().await;
    if let Some(error) = fatal {
        return Err(error);
    }
    emitter.emit(NodeEventKind::Stopped);
    Ok(())
}
