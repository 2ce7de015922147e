//! One job as a node sees it: the prepared job, the host of the actors the
//! coordinator places here, routing, checkpoint copies, and — on the
//! coordinator — the resume decision and the running supervisor.
//!
//! The node (see [`super::node`]) owns one `NodeJob` per job of the
//! cluster's registry that is not over, and hands it the frames of its job.

use phalanx_actors::clock;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use phalanx_actors::actor::{spawn_job_recording, JobContext, JobObserver};
use phalanx_actors::checkpoint::{CheckpointError, CheckpointStore, FileKey, CHECKPOINTS_KEPT};
use phalanx_actors::net::{JobMsg, LocalNet, Net};
use phalanx_actors::protocol::{ActorKey, Addr, FaultCause, Msg, Recovery, Role};
use phalanx_transport::Limits;
use ractor::{Actor, ActorRef};
use tokio::sync::{mpsc, watch};

use super::authority::{JobScope, Scope, Verdict};
use super::event::{unix_ms, Emitter, NodeEventKind};
use super::membership::{LeaseCell, View};
use super::node_config::NodeConfig;
use super::placement::{Placement, Shape};
use super::registry::JobId;
use super::registry::{AssignmentRecord, CheckpointRecord, JobRecord};
use super::replication::{ReplicationStats, ReplicationTracker};
use super::restore_gate::{GateCommand, RestoreGate, RESTORE_WAIT};
use super::resume::{Inventory, Resume, ResumeCommand, ResumeConfig, Source};
use super::runner::{
    to_job, ClusterHooks, ClusterNet, HostActor, HostHooks, HostMsg, OutQueue, Outbound, Routes, Routing, Traffic,
};
use super::step_events::StepEvents;
use super::wire::{self, Inbound, NodeMsg};
use crate::error::Error;
use crate::job::PreparedJob;
use crate::metrics::{Cause, Kind, NodeMetrics};

/// The job side of a node: the prepared job, the host of placed actors,
/// routing, and (on the coordinator) the running supervisor.
pub(crate) struct NodeJob {
    /// The job's id in the cluster's registry.
    pub(crate) id: JobId,
    /// The registry says the job runs (a coordinator starts or resumes it).
    pub(crate) should_run: bool,
    prepared: Arc<PreparedJob>,
    host_ctx: Arc<JobContext>,
    host: ActorRef<HostMsg>,
    routing: Routing,
    routes: watch::Sender<Routes>,
    names: LocalNet,
    checkpoints: PathBuf,
    out: Option<PathBuf>,
    /// Fault injection: see [`NodeConfig::crash_before_rename`].
    #[cfg(feature = "fault-injection")]
    crash_before_rename: Option<u64>,
    /// See [`NodeConfig::report_steps`].
    report_steps: Vec<u64>,
    members: Vec<u32>,
    /// How trainers are spread (see [`NodeConfig::placement`]).
    policy: super::placement::Policy,
    /// Checkpoint copies wanted on other nodes.
    replicas: u32,
    /// The coordinator task running here: its view epoch, the task, and the flag that
    /// tells it it was stood down (its supervisor stopping then is no failure).
    coordinator: Option<(u64, tokio::task::JoinHandle<()>, Arc<AtomicBool>)>,
    pub(crate) done: bool,
    /// Members of the previous view, to notice a node coming back.
    last_members: std::collections::BTreeSet<u32>,
    /// Where a coordinator starts the job from (asks the members first).
    resume: Resume,
    /// This node has seen the job run (hosted its actors, had its locations,
    /// coordinated it): a coordinator taking over need not wait for a fresh start.
    seen_job: bool,
    /// Checkpoint copies kept here for this job (pruning runs every few of them).
    copies_kept: u64,
    /// When the job first started anywhere (Unix ms), as coordinators said.
    job_started_ms: Option<u64>,
    /// When a view made this node coordinator in place of another one: a
    /// takeover, timed until the first step this node applies.
    takeover_since: Option<Instant>,
    /// Copies of this node's checkpoints acknowledged by the replicas.
    replication: ReplicationTracker,
    replication_stats: watch::Sender<ReplicationStats>,
    /// Records of this coordinator (its newest complete checkpoint and where its copies are;
    /// where the partitions are) that changed and the node has not taken yet (it keeps them on
    /// a coordination service), and the last of each kind.
    records: Vec<JobRecord>,
    last_checkpoint: Option<CheckpointRecord>,
    last_assignment: Option<AssignmentRecord>,
    events: Emitter,
    metrics: Arc<NodeMetrics>,
    /// Where checkpoint copies written off the loop report back.
    stored: mpsc::Sender<StoredCopy>,
    /// Orders to restore a range whose files are being fetched, and what follows them.
    gate: RestoreGate<(u32, Inbound)>,
}

/// What every job of a node shares with it: the queue to the node loop, the
/// event sink, the metrics, and the node instance's random tag (which keeps
/// its actor names apart from another node's with the same id in the process).
#[derive(Clone)]
pub(crate) struct NodeShared {
    pub(crate) out_tx: OutQueue,
    pub(crate) events: Emitter,
    pub(crate) metrics: Arc<NodeMetrics>,
    pub(crate) instance: u64,
    /// Where checkpoint copies written off the node loop report back.
    pub(crate) stored: mpsc::Sender<StoredCopy>,
    /// The node's coordinator lease, published by the node loop.
    pub(crate) lease: Arc<LeaseCell>,
}

/// A checkpoint copy written (and verified) on the blocking pool, back on the node loop.
#[derive(Debug)]
pub(crate) struct StoredCopy {
    pub(crate) job: JobId,
    pub(crate) peer: u32,
    pub(crate) name: String,
    /// It came from the node this one was fetching from (a resume), not the coordinator.
    pub(crate) fetching: bool,
    /// Kept (written, fsynced and verified); false: refused or bad (logged).
    pub(crate) kept: bool,
}

/// Copies being written at once per node; more wait (back-pressure on the copies' senders).
pub(crate) const STORED_COPIES_CAPACITY: usize = 64;

/// Where node `config.id` keeps the state of job `id`: `DATA_DIR/jobs/<id>/`.
pub fn job_dir(config: &NodeConfig, id: JobId) -> PathBuf {
    let data_dir = config
        .data_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("phalanx-node-{}-{}", config.id, std::process::id())));
    data_dir.join("jobs").join(id.to_string())
}

impl NodeJob {
    /// Job `id` on this node: `prepared` (data loaded, model built) and the
    /// host of its actors; outputs (on the coordinator) go to `out`.
    pub(crate) async fn start(
        config: &NodeConfig,
        id: JobId,
        prepared: Arc<PreparedJob>,
        out: Option<PathBuf>,
        shared: NodeShared,
    ) -> Result<Self, Error> {
        let NodeShared { out_tx, events, metrics, instance, stored, lease } = shared;
        let checkpoints = job_dir(config, id).join("checkpoints");
        let (routes, routes_rx) = watch::channel(Routes::default());
        let routing = Routing {
            me: config.id,
            job: id,
            routes: routes_rx,
            out: out_tx,
            limits: Limits::default(),
            trainers: prepared.config.trainers,
            lease,
            record_commits: config.record_commits,
        };
        // Actor names are per node instance and job: ractor's registry is the
        // process's, and one process may run several nodes, even of several
        // clusters with the same ids (tests do).
        let names =
            LocalNet::new(format!("phalanx-node{}-{instance:016x}/job{id}", config.id), prepared.config.trainers);
        let net = Arc::new(ClusterNet::new(names.clone(), routing.clone()));
        let store = CheckpointStore::open(&checkpoints)?;
        let observer = NodeObserver::new(id, events.clone(), metrics.clone(), false);
        // The actors hosted here log in this node's span of the job.
        let host_ctx = tracing::info_span!("job", node = config.id, job = id).in_scope(|| {
            let hooks: Arc<dyn phalanx_actors::actor::Cluster> = Arc::new(HostHooks::new(routing.clone()));
            prepared.context(prepared.cluster_job_id(), store, names.clone(), net, Some(hooks), Some(observer))
        });
        let (host, _) = Actor::spawn(None, HostActor, (host_ctx.clone(), routing.clone()))
            .await
            .map_err(|e| Error::Spawn(e.to_string()))?;
        let replicas = config.replica_count();
        let resume_config = ResumeConfig {
            // Members of the view are alive: a few failure timeouts is plenty to answer.
            answer_timeout: Duration::from_millis(2 * config.detector.failure_timeout_ms),
            ..ResumeConfig::default()
        };
        let ranges = prepared.ranges().len();
        Ok(Self {
            id,
            should_run: false,
            prepared,
            host_ctx,
            host,
            routing,
            routes,
            names,
            checkpoints,
            out,
            #[cfg(feature = "fault-injection")]
            crash_before_rename: config.crash_before_rename,
            report_steps: config.report_steps.clone(),
            members: (0..config.members()).collect(),
            policy: config.placement(),
            replicas,
            coordinator: None,
            done: false,
            last_members: Default::default(),
            resume: Resume::new(config.id, 0..config.members(), resume_config),
            seen_job: false,
            copies_kept: 0,
            job_started_ms: None,
            takeover_since: None,
            replication: ReplicationTracker::new(replicas, ranges),
            records: Vec::new(),
            last_checkpoint: None,
            last_assignment: None,
            replication_stats: watch::channel(ReplicationStats { replicas, ..Default::default() }).0,
            events,
            metrics,
            stored,
            gate: RestoreGate::default(),
        })
    }

    pub(crate) fn on_view(&mut self, view: &View) {
        let plan = self.host_ctx.plan.clone();
        let shape = Shape {
            policy: self.policy,
            configured: self.members.len() as u32,
            trainers: plan.trainers,
            assignment: &plan.assignment,
            aggregators: plan.ranges.len() as u32,
            spread: self.prepared.config.aggregator_placement == crate::config::AggregatorPlacement::Spread,
            replicas: self.replicas,
        };
        let placement = Placement::compute(view.epoch, view.coordinator, &view.members, &shape);
        if let Some(p) = placement.as_ref().filter(|p| p.coordinator == self.routing.me) {
            let partitions = (0..plan.assignment.len() as u32)
                .map(|i| p.node_of(phalanx_actors::protocol::ActorKey::shard(i)).unwrap_or(p.coordinator))
                .collect();
            let record = AssignmentRecord { epoch: p.epoch, partitions };
            if self.last_assignment.as_ref().map(|r| &r.partitions) != Some(&record.partitions) {
                self.last_assignment = Some(record.clone());
                self.records.push(JobRecord::Assignment(record));
            }
        }
        let previous = self.routes.borrow().placement.as_ref().map(|p| p.coordinator);
        let changed = previous != Some(view.coordinator);
        let me = self.routing.me;
        if view.coordinator != me {
            self.takeover_since = None;
        } else if previous.is_some_and(|p| p != me) && self.takeover_since.is_none() {
            self.takeover_since = Some(clock::now());
        }
        self.routes.send_modify(|r| r.placement = placement);
        // A new coordinator respawns every actor; what an old one placed here goes.
        let _ = self.host.send_message(HostMsg::CoordinatorIs { coordinator: view.coordinator, epoch: view.epoch });
        let grew = view.members.iter().any(|m| !self.last_members.contains(m)) && !self.last_members.is_empty();
        self.last_members = view.members.clone();
        if view.coordinator == me && grew && !changed {
            // A node came back: give it its work again.
            to_job(&self.names, JobMsg::Rebalance);
        }
        if view.coordinator != me {
            self.stop_coordinating();
        } else if self.coordinator.is_none() && !self.done && self.should_run {
            // A new view while deciding starts the decision over with its members.
            let cmds = self.resume.begin(view.epoch, &view.members, self.local_newest(), self.seen_job, clock::now());
            self.run_resume(cmds);
        }
    }

    /// The registry says the job runs (or no longer): start deciding where to
    /// resume if this node coordinates `view` and nothing runs or decides yet.
    pub(crate) fn set_should_run(&mut self, run: bool, view: Option<&View>) {
        self.should_run = run;
        let me = self.routing.me;
        if let Some(view) = view.filter(|v| v.coordinator == me) {
            if run && self.coordinator.is_none() && !self.done && !self.resume.is_deciding() {
                let cmds =
                    self.resume.begin(view.epoch, &view.members, self.local_newest(), self.seen_job, clock::now());
                self.run_resume(cmds);
            }
        }
    }

    /// The job supervisor of this job here, if it runs here.
    pub(crate) fn names(&self) -> &LocalNet {
        &self.names
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
                ResumeCommand::Ask { to, epoch } => {
                    self.send_control(to, &NodeMsg::CheckpointQuery { job: self.id, epoch })
                }
                ResumeCommand::Fetch { from, step, epoch } => {
                    tracing::info!(node = me, from, step, "fetching checkpoint {step} from node {from}");
                    self.events.emit(NodeEventKind::Fetching { job: self.id, from, step, epoch });
                    self.send_control(from, &NodeMsg::CheckpointFetch { job: self.id, epoch, step });
                }
                ResumeCommand::Start { restore, source, epoch } => {
                    self.metrics.coordinator_waiting.set(0);
                    self.start_coordinator(epoch, restore, source)
                }
                ResumeCommand::Waiting { missing, reason } => {
                    tracing::warn!(node = me, ?missing, "coordinator not starting the job yet: {reason}");
                    self.metrics.coordinator_waiting.set(1);
                    self.events.emit(NodeEventKind::Waiting { job: self.id, missing, reason });
                }
            }
        }
    }

    /// The clock advanced (the node loop's tick).
    pub(crate) fn on_tick(&mut self, now: Instant) {
        if self.resume.is_deciding() {
            let cmds = self.resume.on_tick(now);
            self.run_resume(cmds);
        }
        if !self.gate.is_empty() {
            let cmds = self.gate.on_tick(now);
            self.run_gate(cmds);
        }
    }

    fn send_control(&self, to: u32, msg: &NodeMsg) {
        match wire::encode(msg, &self.routing.limits) {
            Ok(frame) => {
                // The node loop's own frame: never waits for the queue it drains.
                let _ = self.routing.out.send_now(Outbound::control(to, frame));
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
        #[cfg(feature = "fault-injection")]
        let crash = self.crash_before_rename;
        let replication = self.replication_stats.subscribe();
        // A job this node has never seen run starts fresh (a new history);
        // any other start continues it.
        let fresh_job = self.job_started_ms.is_none();
        let takeover = self.takeover_since.take().filter(|_| !fresh_job);
        let job_started_ms = *self.job_started_ms.get_or_insert_with(unix_ms);
        let (events, metrics) = (self.events.clone(), self.metrics.clone());
        let (routing_job, limits, failed_out, failed_members) =
            (self.id, self.routing.limits, self.routing.out.clone(), self.members.clone());
        let start = Start {
            epoch,
            restore,
            source,
            replication,
            job_started_ms,
            fresh_job,
            takeover,
            report_steps: self.report_steps.clone(),
            events: events.clone(),
            metrics: metrics.clone(),
        };
        let stood_down = Arc::new(AtomicBool::new(false));
        let stand_down = stood_down.clone();
        let task = tokio::spawn(async move {
            let result = match CheckpointStore::open(&checkpoints) {
                Ok(store) => {
                    #[cfg(feature = "fault-injection")]
                    let store = store.with_crash_before_rename(crash);
                    let span = tracing::info_span!("job", node = me, job = routing.job, epoch);
                    tracing::Instrument::instrument(
                        coordinate(prepared, routing, names, members, store, out, start),
                        span,
                    )
                    .await
                }
                Err(e) => Err(e.into()),
            };
            // Stood down (a new view, a lost quorum, a shutdown): its supervisor
            // stopped under it, which says nothing about the job — the node that
            // coordinates now carries it on. Set before the supervisor is stopped,
            // so it is seen here whenever that stop is what ended the run.
            if stand_down.load(Ordering::Acquire) {
                if let Err(e) = result {
                    tracing::info!(node = me, job = routing_job, "coordinator stood down ({e})");
                }
                return;
            }
            if let Err(e) = result {
                tracing::error!(node = me, job = routing_job, "coordinator: {e}");
                events.emit(NodeEventKind::JobFailed { job: routing_job, error: e.to_string() });
                // Every member learns it (the coordinator's registry first: it is one of them).
                if let Ok(frame) = wire::encode(&NodeMsg::JobFailed { job: routing_job, error: e.to_string() }, &limits)
                {
                    for m in failed_members {
                        let _ = failed_out.send(Outbound::control(m, frame.clone()));
                    }
                }
            }
        });
        self.coordinator = Some((epoch, task, stood_down));
    }

    /// Stop the coordinator (if here) and every hosted actor, telling their
    /// coordinators `why`.
    pub(crate) fn stop_all(&mut self, why: &str) {
        let reason = Some(format!("node {} {why}", self.routing.me));
        let _ = self.host.send_message(HostMsg::StopAll { reason });
        self.stop_coordinating();
    }

    /// Give up the coordinator role here: no resume decision under way, the supervisor's
    /// task and its actors stopped.
    pub(crate) fn stop_coordinating(&mut self) {
        // A later term starts its records afresh (the service may hold another coordinator's).
        self.records.clear();
        self.last_checkpoint = None;
        self.last_assignment = None;
        self.resume.cancel();
        if let Some((_, task, stood_down)) = self.coordinator.take() {
            stood_down.store(true, Ordering::Release);
            task.abort();
            if let Some(job) = ActorRef::<JobMsg>::where_is(self.names.job_name()) {
                job.stop_children(None);
                job.stop(None);
            }
        }
    }

    /// Whether `peer` may send `inbound` of this job (see [`authority`](super::authority)).
    pub(crate) fn judge(&self, me: u32, members: u32, view: Option<&View>, peer: u32, inbound: &Inbound) -> Verdict {
        let routes = self.routes.borrow();
        let job = JobScope { plan: &self.host_ctx.plan, routes: &routes, fetching_from: self.resume.fetching_from() };
        Scope { me, members, view, job: Some(job) }.judge(peer, inbound)
    }

    /// A frame of this job from `peer` (or from this node's own queue), which the
    /// authority rules let through. Orders to restore a range this node holds no files for,
    /// and what follows them for that range, wait in the [`RestoreGate`] first.
    pub(crate) fn on_inbound(&mut self, peer: u32, inbound: Inbound) {
        // The aggregator range a frame is for, and the checkpoint step it restores (if above 0).
        let (range, restore) = match &inbound {
            Inbound::Control(NodeMsg::Spawn { key, restore, .. }) if key.role == Role::Aggregator => {
                (key.index, *restore)
            }
            Inbound::Deliver(_, Addr::Aggregator(range), Msg::Rollback { step, .. }) => (*range, Some(*step)),
            Inbound::Deliver(_, Addr::Aggregator(range), _) => (*range, None),
            _ => return self.handle(peer, inbound),
        };
        let now = clock::now();
        let cmds = match restore.filter(|step| *step > 0) {
            Some(step) => {
                let have = holds(&self.checkpoints, &self.host_ctx.plan.ranges, range, step);
                self.gate.restore(range, step, have, (peer, inbound), now)
            }
            None => self.gate.message(range, (peer, inbound), now),
        };
        self.run_gate(cmds);
    }

    /// Carry out the restore gate's commands.
    fn run_gate(&mut self, cmds: Vec<GateCommand<(u32, Inbound)>>) {
        let me = self.routing.me;
        for cmd in cmds {
            match cmd {
                GateCommand::Release((peer, inbound)) => self.handle(peer, inbound),
                GateCommand::Fetch { step } => {
                    let coordinator = self.routes.borrow().placement.as_ref().map(|p| (p.coordinator, p.epoch));
                    let Some((from, epoch)) = coordinator.filter(|(c, _)| *c != me) else { continue };
                    tracing::info!(
                        node = me,
                        job = self.id,
                        step,
                        "fetching checkpoint {step} from node {from} to restore a range"
                    );
                    self.send_control(from, &NodeMsg::CheckpointFetch { job: self.id, epoch, step });
                }
                GateCommand::GaveUp { range, step } => tracing::warn!(
                    node = me,
                    job = self.id,
                    range,
                    step,
                    "the files of aggregator {range} at step {step} did not come within {} ms; restoring without them",
                    RESTORE_WAIT.as_millis()
                ),
            }
        }
    }

    /// [`on_inbound`](Self::on_inbound) past the restore gate.
    fn handle(&mut self, peer: u32, inbound: Inbound) {
        let job = self.id;
        match inbound {
            Inbound::Deliver(_, to, msg) => self.names.send(to, msg),
            Inbound::Checkpoint(_, name, bytes) => self.on_checkpoint_copy(peer, name, bytes),
            Inbound::Control(NodeMsg::Spawn { key, generation, restore, spawn, kernel, .. }) => {
                self.seen_job = true;
                self.events.emit(NodeEventKind::Spawn { job, actor: key.to_string(), from: peer });
                let _ = self.host.send_message(HostMsg::Spawn { from: peer, key, generation, restore, spawn, kernel });
            }
            Inbound::Control(NodeMsg::Stop { key, .. }) => {
                let _ = self.host.send_message(HostMsg::Stop { key, from: peer });
            }
            Inbound::Control(NodeMsg::Started { key, spawn, .. }) => {
                to_job(&self.names, JobMsg::RemoteStarted(key, peer, spawn))
            }
            Inbound::Control(NodeMsg::Failed { key, spawn, reason, .. }) => {
                to_job(&self.names, JobMsg::RemoteFailed(key, peer, spawn, reason))
            }
            Inbound::Control(NodeMsg::Locations { epoch, job_started_ms, map, seq, .. }) => {
                self.seen_job = true;
                self.job_started_ms = Some(self.job_started_ms.map_or(job_started_ms, |t| t.min(job_started_ms)));
                let mut taken = None;
                self.routes.send_if_modified(|r| {
                    taken = r.set_locations(peer, epoch, seq, map);
                    taken.is_some()
                });
                if let Some(map) = taken {
                    let _ = self.host.send_message(HostMsg::Placed { coordinator: peer, map });
                }
            }
            Inbound::Control(NodeMsg::JobDone { summary, model_sha256, .. }) => {
                self.done = true;
                self.resume.cancel();
                let _ = self.host.send_message(HostMsg::StopAll { reason: None });
                self.events.emit(NodeEventKind::JobDone { job, summary, model_sha256, from: peer });
            }
            Inbound::Control(NodeMsg::JobFailed { .. }) => {
                self.done = true;
                self.stop_all("ends a failed job");
            }
            Inbound::Control(NodeMsg::CheckpointQuery { epoch, .. }) => self.answer_query(peer, epoch),
            Inbound::Control(NodeMsg::CheckpointInventory { epoch, inventory, .. }) => {
                let cmds = self.resume.on_inventory(peer, epoch, inventory, clock::now());
                self.run_resume(cmds);
            }
            Inbound::Control(NodeMsg::CheckpointFetch { epoch, step, .. }) => self.serve_fetch(peer, epoch, step),
            Inbound::Control(NodeMsg::CheckpointStored { name, .. }) => {
                self.replication.on_acked(&name, peer);
                self.replication_stats.send_replace(self.replication.snapshot());
                self.note_checkpoint();
            }
            // A checkpoint file written here or on the host of its range (authority checked).
            Inbound::Control(NodeMsg::Replicating { name, to, .. }) => {
                if let Some(key) = FileKey::parse(&name) {
                    self.replication.on_sent(&name, key.step, peer, &to);
                    self.replication_stats.send_replace(self.replication.snapshot());
                    self.note_checkpoint();
                }
            }
            // Not this job's, or handled by the node (membership, the registry).
            Inbound::Control(_) => {}
        }
    }

    /// The newest complete checkpoint or its copies changed: note it for the node.
    fn note_checkpoint(&mut self) {
        let ranges = self.host_ctx.plan.ranges.len();
        let Some((step, mut copies)) = self.replication.newest_complete(ranges) else { return };
        copies.insert(self.routing.me);
        let record = CheckpointRecord { step, copies: copies.into_iter().collect() };
        if self.last_checkpoint.as_ref() != Some(&record) {
            self.last_checkpoint = Some(record.clone());
            self.records.push(JobRecord::Checkpoint(record));
        }
    }

    /// This coordinator's records that changed since the last call, oldest first.
    pub(crate) fn take_records(&mut self) -> Vec<JobRecord> {
        std::mem::take(&mut self.records)
    }

    /// A new coordinator asks what this node holds: answer from a blocking
    /// task (listing and verifying files is disk work, not the node loop's).
    fn answer_query(&self, peer: u32, epoch: u64) {
        let (dir, prepared, out, limits) =
            (self.checkpoints.clone(), self.prepared.clone(), self.routing.out.clone(), self.routing.limits);
        let (started, job) = (self.seen_job, self.id);
        tokio::task::spawn_blocking(move || {
            let inventory = Inventory { newest: newest_complete(&dir, &prepared), started };
            if let Ok(frame) = wire::encode(&NodeMsg::CheckpointInventory { job, epoch, inventory }, &limits) {
                let _ = out.send(Outbound::control(peer, frame));
            }
        });
    }

    /// A new coordinator fetches checkpoint `step`: send it every file of it.
    fn serve_fetch(&self, peer: u32, epoch: u64, step: u64) {
        let (dir, out, limits, me, job) =
            (self.checkpoints.clone(), self.routing.out.clone(), self.routing.limits, self.routing.me, self.id);
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
                    .and_then(|bytes| wire::encode_checkpoint(job, &name, bytes, &limits).map_err(|e| e.to_string()));
                match frame {
                    Ok(frame) => {
                        let _ = out.send(Outbound { to: peer, frame, traffic: Traffic::Checkpoint });
                    }
                    Err(e) => tracing::warn!(node = me, peer, path = %path.display(), "cannot send a checkpoint: {e}"),
                }
            }
        });
    }

    /// A checkpoint file from `peer`: a replica's copy from the coordinator, or
    /// a file this node fetches to take over (nobody else gets here: see [`Scope::judge`]).
    fn on_checkpoint_copy(&mut self, peer: u32, name: String, bytes: Vec<u8>) {
        let me = self.routing.me;
        let fetching = self.resume.fetching_from() == Some(peer);
        // Written, fsynced and verified on the blocking pool: a large copy must not hold up
        // the node loop (heartbeats, other jobs); the result comes back as a StoredCopy.
        let (dir, stored, job, metrics) =
            (self.checkpoints.clone(), self.stored.clone(), self.id, self.metrics.clone());
        tokio::task::spawn_blocking(move || {
            let kept = store_copy(&dir, me, peer, &name, &bytes, &metrics);
            // Waits while the node loop is behind (bounded channel); fails only once the
            // node stopped, when nothing is waiting for the copy.
            let _ = stored.blocking_send(StoredCopy { job, peer, name, fetching, kept });
        });
    }

    /// A copy written off the loop: acknowledge it to the coordinator, or go on with the
    /// resume that fetched it.
    pub(crate) fn on_copy_stored(&mut self, copy: StoredCopy) {
        let me = self.routing.me;
        let StoredCopy { peer, name, fetching, kept, .. } = copy;
        if !kept {
            return;
        }
        if !self.gate.is_empty() {
            let (dir, ranges) = (&self.checkpoints, &self.host_ctx.plan.ranges);
            let cmds = self.gate.on_files(|range, step| holds(dir, ranges, range, step), clock::now());
            self.run_gate(cmds);
        }
        if fetching {
            // Still fetching from that node: the resume decides what the copy completes.
            if self.resume.fetching_from() == Some(peer) {
                let cmds = self.resume.on_local(self.local_newest(), clock::now());
                self.run_resume(cmds);
            }
            return;
        }
        // The coordinator keeps the replication figures, whoever wrote the file.
        let coordinator = self.routes.borrow().placement.as_ref().map_or(peer, |p| p.coordinator);
        self.send_control(coordinator, &NodeMsg::CheckpointStored { job: self.id, name: name.clone() });
        // Keep the newest few complete copies, as the coordinator does (every few copies:
        // pruning verifies the files it keeps that this process has not). Counted, not derived from the step: with
        // skipped checkpoint steps (checkpoint_min_interval_ms) no arithmetic on steps would do.
        self.copies_kept = self.copies_kept.wrapping_add(1);
        if self.copies_kept % CHECKPOINTS_KEPT as u64 == 0 {
            let (dir, prepared) = (self.checkpoints.clone(), self.prepared.clone());
            tokio::task::spawn_blocking(move || {
                let store = CheckpointStore::reader(&dir);
                if let Err(e) = store.prune(&prepared.config_hash, prepared.model.num_params(), CHECKPOINTS_KEPT) {
                    tracing::warn!(node = me, "pruning checkpoint copies in {} failed: {e}", dir.display());
                }
            });
        }
    }
}

/// Whether the checkpoint files in `dir` cover aggregator `range` (of `ranges`) at `step`, by
/// their names (a range the job does not have needs nothing).
fn holds(dir: &std::path::Path, ranges: &[(usize, usize)], range: u32, step: u64) -> bool {
    ranges.get(range as usize).is_none_or(|&(offset, len)| CheckpointStore::reader(dir).covers(step, offset, len))
}

/// Keep a checkpoint copy in `dir`, verified before it is written; true when kept.
fn store_copy(dir: &std::path::Path, me: u32, peer: u32, name: &str, bytes: &[u8], metrics: &NodeMetrics) -> bool {
    if name.contains('/') || name.contains('\\') || !name.starts_with("ckpt-") || !name.ends_with(".safetensors") {
        tracing::warn!(node = me, peer, "refusing a checkpoint copy named {name:?}");
        return false;
    }
    let kept = std::fs::create_dir_all(dir)
        .map_err(|source| CheckpointError::Io { op: "creating directory", path: dir.to_path_buf(), source })
        .and_then(|()| CheckpointStore::reader(dir).save_copy(name, bytes));
    match kept {
        Ok(_) => true,
        Err(e @ CheckpointError::Io { .. }) => {
            tracing::warn!(node = me, "cannot keep a checkpoint copy: {e}");
            metrics.checkpoint_failures.get_or_create(&Kind::of("copy")).inc();
            false
        }
        Err(e) => {
            tracing::warn!(node = me, peer, "checkpoint copy {name} from node {peer} is bad ({e}); not kept");
            false
        }
    }
}

/// The newest complete checkpoint of `job` in `dir` (none when unreadable: logged).
///
/// A newest step computed with another kernel is still named: restoring it fails in the
/// aggregator with the store's `KernelMismatch` (both kernels, the file), and the job fails
/// with that reason — rather than starting again from scratch as if no checkpoint existed.
fn newest_complete(dir: &std::path::Path, job: &PreparedJob) -> Option<u64> {
    match CheckpointStore::reader(dir).newest_complete(&job.config_hash, job.model.num_params()) {
        Ok(newest) => newest,
        Err(CheckpointError::KernelMismatch { path, expected, found, .. }) => {
            tracing::error!(dir = %dir.display(), %expected, %found, "the newest checkpoint was computed with another kernel");
            path.file_name().and_then(|n| n.to_str()).and_then(FileKey::parse).map(|k| k.step)
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "cannot list checkpoints: {e}");
            None
        }
    }
}

/// Feeds a node's metrics and events from the actors of one of its jobs (see
/// [`JobObserver`]).
struct NodeObserver {
    job: JobId,
    events: Emitter,
    metrics: Arc<NodeMetrics>,
    /// Emit a `commit` event for every step applied here (see [`NodeConfig::record_commits`]).
    record_commits: bool,
}

impl NodeObserver {
    fn new(job: JobId, events: Emitter, metrics: Arc<NodeMetrics>, record_commits: bool) -> Arc<Self> {
        Arc::new(Self { job, events, metrics, record_commits })
    }

    /// Step `step` is the first applied after failures of `cause` (of
    /// `actors`), `took` after the first was noticed. The one place a
    /// recovery is counted and reported, so the metric and the event agree.
    fn report_recovery(&self, step: u64, cause: &str, actors: Vec<String>, took: Duration) {
        self.metrics.recoveries.get_or_create(&Cause::of(cause)).inc();
        self.metrics.recovery_duration.observe(took.as_secs_f64());
        let recovery_ms = took.as_millis() as u64;
        tracing::info!(
            node = self.events.node,
            job = self.job,
            step,
            cause,
            recovery_ms,
            ?actors,
            "training recovered"
        );
        let cause = cause.to_string();
        self.events.emit(NodeEventKind::Recovered { job: self.job, step, cause, actors, recovery_ms });
    }
}

impl JobObserver for NodeObserver {
    fn committed(&self, range: u32, generation: u64, step: u64, params: &[f32]) {
        if !self.record_commits {
            return;
        }
        let hash = super::commits::digest(params);
        let t_us = clock::unix_us();
        self.events.emit(NodeEventKind::Commit { job: self.job, range, generation, step, hash, t_us });
    }

    fn restarted(&self, _actor: ActorKey, cause: FaultCause) {
        self.metrics.restarts.get_or_create(&Cause::of(cause.as_str())).inc();
    }

    fn recovered(&self, step: u64, recovery: &Recovery) {
        let actors = recovery.actors.iter().map(ActorKey::to_string).collect();
        self.report_recovery(step, recovery.cause.as_str(), actors, recovery.duration);
    }

    fn checkpoint_saved(&self, _range: u32, _step: u64, took: Duration) {
        self.metrics.checkpoint_duration.observe(took.as_secs_f64());
    }

    fn checkpoint_failed(&self, _range: u32, _step: u64, _reason: &str) {
        self.metrics.checkpoint_failures.get_or_create(&Kind::of("save")).inc();
    }
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
    /// This node took the job over from a lost coordinator at this moment.
    takeover: Option<Instant>,
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
    let Start {
        epoch,
        restore,
        source,
        replication,
        job_started_ms,
        fresh_job,
        mut takeover,
        report_steps,
        events,
        metrics,
    } = start;
    let hooks = Arc::new(ClusterHooks::new(routing.clone(), members.clone(), epoch, job_started_ms));
    let net = Arc::new(ClusterNet::new(names.clone(), routing.clone()));
    let observer = NodeObserver::new(routing.job, events.clone(), metrics.clone(), routing.record_commits);
    let ctx = prepared.context(prepared.cluster_job_id(), store, names, net, Some(hooks), Some(observer.clone()));
    let (source, cause) = match source {
        Source::Local => ("local".to_string(), "local"),
        Source::Fetched(node) => (format!("node {node}"), "fetched"),
        Source::Scratch => ("none".to_string(), "scratch"),
    };
    tracing::info!(node = me, epoch, ?restore, %source, "coordinating the job");
    metrics.takeovers.get_or_create(&Kind::of(cause)).inc();
    events.emit(NodeEventKind::Coordinating { job: routing.job, epoch, restore, restore_from: source });
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
            if let Some(since) = takeover.take() {
                observer.report_recovery(r.step, "takeover", Vec::new(), r.at.saturating_duration_since(since));
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
                events.emit(NodeEventKind::Step { job: routing.job, step: r.step, total_steps, loss: r.loss });
                // The members show it to their watchers (as `progress`). A few dozen bytes at
                // most `step`'s rate: queued at once, never waiting behind bulk frames.
                let progress = NodeMsg::Progress { job: routing.job, step: r.step, total_steps, loss: r.loss };
                if let Ok(frame) = super::wire::encode(&progress, &routing.limits) {
                    for &m in members.iter().filter(|&&m| m != me) {
                        let _ = routing.out.send_now(Outbound::control(m, frame.clone()));
                    }
                }
            }
        },
    )
    .await?;
    let evaluation = prepared.evaluate(&outcome.params)?;
    // The whole job's wall time, predecessors' shares included.
    let duration = Duration::from_millis(unix_ms().saturating_sub(job_started_ms));
    let history = history.map(|h| h.path().to_path_buf());
    let report = crate::TrainReport { outcome, evaluation, duration, history };
    let model_sha256 = crate::model_sha256(prepared.model.as_ref(), &report.outcome.params);
    let summary = match &out {
        Some(dir) => {
            crate::write_outputs(dir, &prepared, &report)?;
            let replication = serde_json::to_value(&*replication.borrow()).unwrap_or_default();
            crate::output::patch_summary(dir, [("replication".to_string(), replication)])?;
            Some(dir.join("summary.json").to_string_lossy().into_owned())
        }
        None => None,
    };
    let done = NodeMsg::JobDone { job: routing.job, summary, model_sha256 };
    if let Ok(frame) = super::wire::encode(&done, &routing.limits) {
        for m in members {
            let _ = routing.out.send(Outbound::control(m, frame.clone()));
        }
    }
    Ok(())
}
