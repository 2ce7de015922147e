//! A cluster node: the QUIC transport, membership and failure detection,
//! and a stream of events for people and scripts.
//!
//! ```text
//!   seeds ──dial──▶ Transport (mTLS QUIC) ──events──▶ node loop ──▶ Membership core
//!                        ▲                               │  ticks (every TICK_MS)
//!                        └──────── frames (NodeMsg) ◀────┘──▶ stdout: one JSON event per line
//! ```
//!
//! The node prints one JSON object per line on stdout (`listening` with the
//! process id, `peer_up`, `peer_down`, `down`, `view`, `quorum_lost`,
//! `stopped`; with a job `coordinating`, `spawn`, `step`, `job_done`,
//! `job_failed`), each with `node` and `t_ms` (milliseconds since the Unix
//! epoch, so a driver can measure detection time against the moment it
//! killed a process), and logs for people on stderr. State changes are all
//! printed; `step` events come at a bounded rate (see [`super::step_events`])
//! while the coordinator appends every step to `OUT/history.csv`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use phalanx_transport::certs::NodeIdentity;
use phalanx_transport::{Limits, Transport, TransportConfig, TransportEvent};
use serde::{Deserialize, Serialize};
use serde_json::json;

use std::sync::Arc;

use phalanx_actors::actor::{spawn_job_recording, JobContext};
use phalanx_actors::checkpoint::CheckpointStore;
use phalanx_actors::net::{JobMsg, LocalNet, Net};
use ractor::{Actor, ActorRef};
use tokio::sync::{mpsc, watch};

use super::membership::{DetectorConfig, Membership, MembershipCommand};
use super::placement::Placement;
use super::runner::{to_job, ClusterHooks, ClusterNet, HostActor, HostMsg, Outbound, Routes, Routing};
use super::step_events::StepEvents;
use super::wire::{self, Inbound, InboundError, NodeMsg};
use crate::error::Error;
use crate::job::PreparedJob;

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
        if self.detector.heartbeat_ms == 0 || self.detector.failure_timeout_ms <= self.detector.heartbeat_ms {
            return field("detector", "failure_timeout_ms must exceed heartbeat_ms, and both be positive".into());
        }
        Ok(())
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Print one event line on stdout.
fn emit(node: u32, event: &str, mut fields: serde_json::Value) {
    if let Some(map) = fields.as_object_mut() {
        map.insert("event".into(), event.into());
        map.insert("node".into(), node.into());
        map.insert("t_ms".into(), unix_ms().into());
    }
    println!("{fields}");
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
    coordinator: Option<(u64, tokio::task::JoinHandle<()>)>,
    done: bool,
    /// Members of the previous view, to notice a node coming back.
    last_members: std::collections::BTreeSet<u32>,
}

impl NodeJob {
    async fn start(config: &NodeConfig, out_tx: mpsc::UnboundedSender<Outbound>) -> Result<Option<Self>, Error> {
        let Some(path) = &config.job else { return Ok(None) };
        let job = crate::JobConfig::from_toml_file(path)?;
        let prepared = Arc::new(PreparedJob::new(job)?);
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
            coordinator: None,
            done: false,
            last_members: Default::default(),
        }))
    }

    fn on_view(&mut self, view: &super::membership::View) {
        let plan = self.host_ctx.plan.clone();
        let placement = Placement::compute(
            view.epoch,
            view.coordinator,
            &view.members,
            self.members.len() as u32,
            plan.trainers,
            &plan.assignment,
            plan.ranges.len() as u32,
        );
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
            if let Some((_, task)) = self.coordinator.take() {
                task.abort();
                if let Some(job) = ActorRef::<JobMsg>::where_is(self.names.job_name()) {
                    job.stop_children(None);
                    job.stop(None);
                }
            }
        } else if self.coordinator.is_none() && !self.done && self.may_start(view) {
            self.start_coordinator(view.epoch);
        }
    }

    /// A fresh job waits for every configured member, so the first placement
    /// spreads the work; a takeover (this node holds checkpoint copies) goes
    /// ahead with the quorum it has.
    fn may_start(&self, view: &super::membership::View) -> bool {
        if view.members.len() == self.members.len() {
            return true;
        }
        let total = self.prepared.model.num_params();
        CheckpointStore::open(&self.checkpoints)
            .and_then(|s| s.newest_complete(&self.prepared.config_hash, total))
            .is_ok_and(|step| step.is_some())
    }

    fn start_coordinator(&mut self, epoch: u64) {
        let me = self.routing.me;
        let prepared = self.prepared.clone();
        let routing = self.routing.clone();
        let names = self.names.clone();
        let members = self.members.clone();
        let checkpoints = self.checkpoints.clone();
        let out = self.out.clone();
        let crash = self.crash_before_rename;
        let report_steps = self.report_steps.clone();
        let task = tokio::spawn(async move {
            let result = match CheckpointStore::open(&checkpoints) {
                Ok(store) => {
                    let store = store.with_crash_before_rename(crash);
                    let outputs = Outputs { out, report_steps };
                    coordinate(prepared, routing, names, members, store, outputs, epoch).await
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = result {
                tracing::error!(node = me, "coordinator: {e}");
                emit(me, "job_failed", json!({ "error": e.to_string() }));
            }
        });
        self.coordinator = Some((epoch, task));
    }

    /// Stop the coordinator (if here) and every hosted actor, telling their
    /// coordinators `why`.
    fn stop_all(&mut self, why: &str) {
        let reason = Some(format!("node {} {why}", self.routing.me));
        let _ = self.host.send_message(HostMsg::StopAll { reason });
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
        match inbound {
            Inbound::Deliver(to, msg) => self.names.send(to, msg),
            Inbound::Checkpoint(name, bytes) => self.store_copy(peer, &name, &bytes),
            Inbound::Control(NodeMsg::Spawn { key, generation, restore, spawn }) => {
                emit(self.routing.me, "spawn", json!({ "actor": key.to_string(), "from": peer }));
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
            Inbound::Control(NodeMsg::Locations { epoch, map }) => {
                self.routes.send_modify(|r| r.set_locations(peer, epoch, map));
            }
            Inbound::Control(NodeMsg::JobDone { summary, model_sha256 }) => {
                self.done = true;
                let _ = self.host.send_message(HostMsg::StopAll { reason: None });
                emit(
                    self.routing.me,
                    "job_done",
                    json!({ "summary": summary, "model_sha256": model_sha256, "from": peer }),
                );
            }
            Inbound::Control(NodeMsg::Membership(_) | NodeMsg::Deliver { .. } | NodeMsg::CheckpointCopy { .. }) => {}
        }
    }

    /// Keep a checkpoint copy from the coordinator, verified before it counts.
    fn store_copy(&self, peer: u32, name: &str, bytes: &[u8]) {
        let me = self.routing.me;
        if name.contains('/') || name.contains('\\') || !name.starts_with("ckpt-") || !name.ends_with(".safetensors") {
            tracing::warn!(node = me, peer, "refusing a checkpoint copy named {name:?}");
            return;
        }
        let path = self.checkpoints.join(name);
        if let Err(e) = crate::output::write_atomic(&path, bytes) {
            tracing::warn!(node = me, "cannot keep a checkpoint copy: {e}");
            return;
        }
        if let Err(e) = CheckpointStore::read_file(&path) {
            tracing::warn!(node = me, peer, "checkpoint copy {name} is bad ({e}); deleted");
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The first generation of a supervisor started by node `me` in view
/// `epoch`: above every generation of earlier views (the epoch is in the high
/// bits) and distinct from one another coordinator might start in a view of
/// the same epoch (node ids in bits 20..32; rollbacks count up from there).
fn first_generation(epoch: u64, me: u32) -> u64 {
    (epoch << 32) | (u64::from(me & 0xfff) << 20)
}

/// What the coordinator writes and reports besides the job itself.
struct Outputs {
    /// Where summary.json, history.csv and model.safetensors go.
    out: Option<PathBuf>,
    /// Steps that always get a `step` event.
    report_steps: Vec<u64>,
}

/// Run the job's supervisor on this node (the coordinator) until the job ends.
async fn coordinate(
    prepared: Arc<PreparedJob>,
    routing: Routing,
    names: LocalNet,
    members: Vec<u32>,
    store: CheckpointStore,
    outputs: Outputs,
    epoch: u64,
) -> Result<(), Error> {
    let me = routing.me;
    let out = outputs.out;
    let restore = store.newest_complete(&prepared.config_hash, prepared.model.num_params())?;
    let hooks = Arc::new(ClusterHooks::new(routing.clone(), members.clone(), epoch));
    let net = Arc::new(ClusterNet::new(names.clone(), routing.clone()));
    let ctx = prepared.context(prepared.cluster_job_id(), store, names, net, Some(hooks));
    tracing::info!(node = me, epoch, ?restore, "coordinating the job");
    emit(me, "coordinating", json!({ "epoch": epoch, "restore": restore }));
    // A coordinator taking over from a checkpoint continues its predecessor's history.
    let mut history = match &out {
        Some(dir) => {
            Some(crate::output::HistoryWriter::open(&dir.join(crate::output::HISTORY_FILE), restore.is_some())?)
        }
        None => None,
    };
    let total_steps = prepared.schedule.total_steps();
    let mut step_events = StepEvents::new(outputs.report_steps, total_steps);
    // A new view (a node lost or back) or placement: report the next step when it comes.
    let mut routes = routing.routes.clone();
    routes.mark_unchanged();
    let started = Instant::now();
    // Generations of this supervisor start above any a predecessor issued.
    let handle = spawn_job_recording(ctx, restore, first_generation(epoch, me))
        .await
        .map_err(|e| Error::Spawn(e.to_string()))?;
    let outcome = crate::job::await_job(
        handle,
        |_| {},
        |r| {
            if let Some(h) = history.as_mut() {
                h.record(r);
            }
            if routes.has_changed().unwrap_or(false) {
                routes.mark_unchanged();
                step_events.report_next();
            }
            if step_events.due(r.step, r.at) {
                emit(me, "step", json!({ "step": r.step, "total_steps": total_steps, "loss": r.loss }));
            }
        },
    )
    .await?;
    let evaluation = prepared.evaluate(&outcome.params)?;
    let history = history.map(|h| h.path().to_path_buf());
    let report = crate::TrainReport { outcome, evaluation, duration: started.elapsed(), history };
    let model_sha256 = crate::params_sha256(&report.outcome.params);
    let summary = match &out {
        Some(dir) => {
            crate::write_outputs(dir, &prepared, &report)?;
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

/// Run a node until `shutdown` resolves.
pub async fn run_node(config: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
    config.validate()?;
    let identity = NodeIdentity::load(&config.certs, config.id)
        .map_err(|e| Error::Field { field: "certs".into(), reason: e.to_string() })?;
    let limits = Limits::default();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outbound>();
    let mut job = NodeJob::start(&config, out_tx).await?;
    let (transport, mut events) = Transport::bind(TransportConfig::new(identity, config.listen))
        .await
        .map_err(|e| Error::Field { field: "listen".into(), reason: format!("{}: {e}", config.listen) })?;
    let me = config.id;
    let addr = transport.local_addr();
    tracing::info!(node = me, %addr, "listening");
    eprintln!("node {me} listening on {addr}");
    emit(me, "listening", json!({ "addr": addr.to_string(), "pid": std::process::id() }));

    let mut membership = Membership::new(me, 0..config.members(), config.detector);
    let mut dialing: BTreeMap<SocketAddr, Instant> = BTreeMap::new();
    let mut connected_addrs: BTreeMap<u32, SocketAddr> = BTreeMap::new();
    let (dial_tx, mut dial_rx) = mpsc::channel::<(SocketAddr, Result<u32, String>)>(64);
    let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);

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
                membership.on_tick(now)
            }
            Some((node, frame)) = out_rx.recv() => {
                if node == me {
                    if let (Some(job), Ok(inbound)) = (job.as_mut(), wire::decode(&frame[4..], &limits)) {
                        job.on_inbound(me, inbound);
                    }
                } else if let Err(e) = transport.send(node, frame) {
                    tracing::debug!(node = me, to = node, "frame not sent: {e}");
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
                    emit(me, "peer_up", json!({ "peer": peer, "addr": addr.to_string() }));
                    Vec::new()
                }
                Some(TransportEvent::PeerDown { peer, reason }) => {
                    connected_addrs.remove(&peer);
                    emit(me, "peer_down", json!({ "peer": peer, "reason": reason }));
                    Vec::new()
                }
                Some(TransportEvent::Message { peer, frame }) => match wire::decode(&frame, &limits) {
                    Ok(Inbound::Control(NodeMsg::Membership(m))) => membership.on_message(peer, m, Instant::now()),
                    Ok(inbound) => {
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
                Some(TransportEvent::Rejected { addr, peer, code, reason }) => {
                    tracing::warn!(node = me, %addr, ?peer, code, "rejected connection: {reason}");
                    emit(me, "rejected", json!({ "addr": addr.to_string(), "peer": peer, "code": code, "reason": reason }));
                    Vec::new()
                }
            },
        };
        for cmd in cmds {
            match cmd {
                MembershipCommand::Send(to, msg) => {
                    if let Ok(frame) = wire::encode(&NodeMsg::Membership(msg), &limits) {
                        // A peer without a connection simply misses a heartbeat.
                        let _ = transport.send(to, frame);
                    }
                }
                MembershipCommand::Down(peer) => {
                    tracing::warn!(node = me, peer, "node {peer} is down (no heartbeat)");
                    emit(me, "down", json!({ "peer": peer }));
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
                    emit(
                        me,
                        "view",
                        json!({ "epoch": view.epoch, "coordinator": view.coordinator, "members": view.members }),
                    );
                    if let Some(job) = job.as_mut() {
                        job.on_view(&view);
                    }
                }
                MembershipCommand::QuorumLost => {
                    tracing::warn!(node = me, "no majority of the cluster is reachable: waiting");
                    emit(me, "quorum_lost", json!({}));
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
    emit(me, "stopped", json!({}));
    Ok(())
}
