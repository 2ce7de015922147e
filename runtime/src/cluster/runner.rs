//! A job spread over nodes: routing protocol messages to where actors live,
//! hosting actors the coordinator asks for, and the hooks the coordinator's
//! supervisor uses to place, spawn and replicate.
//!
//! ```text
//!  coordinator node                                    other node
//!  JobActor ──Spawn{key}──▶ node loop ══QUIC══▶ node loop ──▶ HostActor ──spawn──▶ trainer/shard
//!      ▲                                                          │ failure / started
//!      └──── RemoteFailed / RemoteStarted ◀══════════════════════ ┘
//!  actors ──ClusterNet::send(Addr)──▶ local registry, or ══Deliver══▶ the node in `locations`
//! ```
//!
//! Where an actor runs is decided once, when the coordinator spawns it (from
//! the placement of the current view), and broadcast as a location map;
//! routing follows that map, so actors stay put until they fail.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use phalanx_actors::actor::{spawn_actor, Cluster, JobContext};
use phalanx_actors::model::kernel::{self, KernelFingerprint};
use phalanx_actors::net::{JobMsg, LocalNet, Net};
use phalanx_actors::protocol::{ActorKey, Addr, Msg};
use phalanx_transport::{Limits, OutFrame};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::{mpsc, watch};

use super::membership::LeaseCell;
use super::placement::Placement;
use super::registry::JobId;
use super::wire::{self, NodeMsg};

/// What a frame carries, for the byte counters of the node's metrics
/// (`phalanx_network_{sent,received}_bytes_total{kind}`): told by whoever
/// encodes a frame, so that the node loop never decodes one to count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Traffic {
    /// Heartbeats and views.
    Membership,
    /// Everything else between nodes: spawn and stop orders, locations,
    /// the job registry, checkpoint questions, small protocol messages.
    Control,
    /// Parameters for trainers.
    Params,
    /// Gradients for aggregators.
    Gradients,
    /// Batches for a trainer on another node than its shard.
    Batches,
    /// Checkpoint files: copies for replicas, and fetches by a new coordinator.
    Checkpoint,
}

impl Traffic {
    /// The kind of a protocol message delivered to an actor on another node.
    pub fn of(msg: &Msg) -> Self {
        match msg {
            Msg::Params(_) => Traffic::Params,
            Msg::Gradient(_) | Msg::Gradients(_) => Traffic::Gradients,
            Msg::Batches(_) => Traffic::Batches,
            _ => Traffic::Control,
        }
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Traffic::Membership => "membership",
            Traffic::Control => "control",
            Traffic::Params => "params",
            Traffic::Gradients => "gradients",
            Traffic::Batches => "batches",
            Traffic::Checkpoint => "checkpoint",
        }
    }
}

/// A frame for a node, queued for the node loop to send.
#[derive(Debug)]
pub struct Outbound {
    /// The node.
    pub to: u32,
    /// The frame, length prefix included (its tensors may be held in buffers of their own).
    pub frame: OutFrame,
    /// What it carries.
    pub traffic: Traffic,
}

impl Outbound {
    /// A control frame for `to`.
    pub fn control(to: u32, frame: impl Into<OutFrame>) -> Self {
        Self { to, frame: frame.into(), traffic: Traffic::Control }
    }
}

/// Bytes of frames a node's jobs may have queued for its node loop (and the loop hold back
/// for a busy peer) before a producer waits: a few large parameter or checkpoint frames.
pub const OUT_QUEUE_BYTES: usize = 64 << 20;

/// The queue of frames from a node's jobs to its node loop, bounded in bytes.
///
/// A frame is counted from the moment it is queued until the node loop hands it to the
/// transport (or gives it up: the peer is gone). A producer that finds the budget used waits
/// until there is room — back-pressure instead of a growing queue or dropped frames; a frame
/// larger than the whole budget goes once the queue is empty. Actors wait off the tokio
/// workers (`block_in_place`), blocking-pool tasks in place; the node loop's own frames never
/// wait ([`send_now`](Self::send_now): it is the one draining the queue), nor does anything on
/// a single-threaded runtime (nothing else could drain it meanwhile).
#[derive(Clone)]
pub struct OutQueue {
    tx: mpsc::UnboundedSender<(Outbound, OutPermit)>,
    budget: Arc<OutBudget>,
}

struct OutBudget {
    queued: std::sync::Mutex<usize>,
    room: std::sync::Condvar,
    limit: usize,
}

impl OutBudget {
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a frame of `bytes` must wait with `queued` bytes queued: the budget would be
    /// exceeded, and the queue is not empty (a frame larger than the budget goes alone).
    fn too_full(queued: usize, bytes: usize, limit: usize) -> bool {
        queued > 0 && queued.saturating_add(bytes) > limit
    }

    /// Whether a frame of `bytes` must wait now.
    fn full_for(&self, bytes: usize) -> bool {
        Self::too_full(*self.lock(), bytes, self.limit)
    }
}

/// A queued frame's share of the budget, given back when dropped.
pub struct OutPermit {
    bytes: usize,
    budget: Arc<OutBudget>,
}

impl Drop for OutPermit {
    fn drop(&mut self) {
        let mut queued = self.budget.lock();
        *queued = queued.saturating_sub(self.bytes);
        self.budget.room.notify_all();
    }
}

/// The node loop's end of an [`OutQueue`].
pub struct OutReceiver {
    rx: mpsc::UnboundedReceiver<(Outbound, OutPermit)>,
    budget: Arc<OutBudget>,
}

impl OutQueue {
    /// A queue of at most `limit` bytes and its receiving end.
    pub fn new(limit: usize) -> (Self, OutReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(OutBudget { queued: std::sync::Mutex::new(0), room: std::sync::Condvar::new(), limit });
        (Self { tx, budget: budget.clone() }, OutReceiver { rx, budget })
    }

    /// Queue `out`, waiting while the budget is used (see [`OutQueue`]). Fails once the node
    /// loop is gone (the node stopped).
    pub fn send(&self, out: Outbound) -> Result<(), Outbound> {
        let wait = matches!(
            tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) | Err(_)
        );
        let bytes = out.frame.len();
        // Handing the worker over (`block_in_place`) costs a thread wake-up, more than the
        // rest of a small frame's send: only when there is no room.
        if wait && self.budget.full_for(bytes) && !self.tx.is_closed() {
            let room = || {
                let mut queued = self.budget.lock();
                while OutBudget::too_full(*queued, bytes, self.budget.limit) && !self.tx.is_closed() {
                    // Woken by every frame the loop sends; the timeout only re-checks closing.
                    queued = self
                        .budget
                        .room
                        .wait_timeout(queued, std::time::Duration::from_millis(100))
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(_) => tokio::task::block_in_place(room),
                Err(_) => room(),
            }
        }
        self.send_now(out)
    }

    /// Queue `out` at once, over the budget if need be (the node loop's own frames).
    pub fn send_now(&self, out: Outbound) -> Result<(), Outbound> {
        let bytes = out.frame.len();
        *self.budget.lock() += bytes;
        let permit = OutPermit { bytes, budget: self.budget.clone() };
        self.tx.send((out, permit)).map_err(|e| e.0 .0)
    }

    /// Bytes queued or held back now.
    pub fn queued_bytes(&self) -> usize {
        *self.budget.lock()
    }
}

impl OutReceiver {
    /// The next frame and its share of the budget (keep it until the frame is handed on).
    pub async fn recv(&mut self) -> Option<(Outbound, OutPermit)> {
        self.rx.recv().await
    }

    /// Bytes queued or held back now.
    pub fn queued_bytes(&self) -> usize {
        *self.budget.lock()
    }
}

/// What routing needs to know, published by the node loop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    /// The current placement (from the adopted view).
    pub placement: Option<Placement>,
    /// Where each spawned actor actually runs, as each coordinator last said,
    /// with the epoch it coordinates in and the map's number in that term
    /// (newest wins, whatever the arrival order): only the current coordinator's map is
    /// used. Keeping them per sender lets a new coordinator's map arrive before
    /// its view, and a deposed one's late map (held back by a partition) can
    /// never misroute.
    pub locations: BTreeMap<u32, (MapNumber, BTreeMap<ActorKey, u32>)>,
}

/// A location map's place in time: the epoch its coordinator coordinates in, and its number
/// in that term.
pub type MapNumber = (u64, u64);

impl Routes {
    /// Take map number `seq` from `coordinator` (coordinating in `epoch`) unless a newer one is
    /// held: of a later epoch, or a later map of the same one (maps may arrive out of order).
    /// Returns a copy of the map when it was taken.
    pub fn set_locations(
        &mut self,
        coordinator: u32,
        epoch: u64,
        seq: u64,
        map: BTreeMap<ActorKey, u32>,
    ) -> Option<BTreeMap<ActorKey, u32>> {
        if self.locations.get(&coordinator).is_some_and(|(held, _)| *held > (epoch, seq)) {
            return None;
        }
        self.locations.insert(coordinator, ((epoch, seq), map.clone()));
        Some(map)
    }

    /// Where `key` runs: the current coordinator's record, else the placement.
    pub fn node_of(&self, key: ActorKey) -> Option<u32> {
        let placement = self.placement.as_ref()?;
        let recorded = self.locations.get(&placement.coordinator).and_then(|(_, m)| m.get(&key));
        recorded.copied().or_else(|| placement.node_of(key))
    }
}

/// Shared by [`ClusterNet`] and [`ClusterHooks`]: who we are, where things
/// are, and the queue to the node loop. Read-only for actors.
#[derive(Clone)]
pub struct Routing {
    /// This node.
    pub me: u32,
    /// The job (its id in the cluster's registry): every frame says it.
    pub job: JobId,
    /// Latest routes.
    pub routes: watch::Receiver<Routes>,
    /// Frames for other nodes.
    pub out: OutQueue,
    /// Frame limits.
    pub limits: Limits,
    /// Trainers in the job.
    pub trainers: u32,
    /// This node's coordinator lease (see [`LeaseCell`]).
    pub lease: Arc<LeaseCell>,
    /// Report every step an aggregator here commits as a `commit` event.
    pub record_commits: bool,
}

impl Routing {
    fn send_frame(&self, node: u32, frame: impl Into<OutFrame>, traffic: Traffic) {
        // The node loop outlives every actor; a send error means shutdown.
        let _ = self.out.send(Outbound { to: node, frame: frame.into(), traffic });
    }

    fn node_for(&self, to: Addr) -> Option<u32> {
        let routes = self.routes.borrow();
        let coordinator = routes.placement.as_ref().map(|p| p.coordinator);
        let key = match to {
            Addr::Shard(p) => ActorKey::shard(p),
            Addr::Trainer(i) => ActorKey::trainer(i),
            Addr::Aggregator(r) => ActorKey::aggregator(r),
            Addr::Job | Addr::AllTrainers => return coordinator,
        };
        routes.node_of(key)
    }
}

/// A [`Net`] across nodes: local actors by registry name, others over QUIC.
pub struct ClusterNet {
    local: LocalNet,
    routing: Routing,
}

impl ClusterNet {
    /// A net delivering locally through `local`, remotely through `routing`.
    pub fn new(local: LocalNet, routing: Routing) -> Self {
        Self { local, routing }
    }
}

fn local_name(local: &LocalNet, to: Addr) -> Option<String> {
    Some(match to {
        Addr::Shard(p) => local.name_of(ActorKey::shard(p)),
        Addr::Trainer(i) => local.name_of(ActorKey::trainer(i)),
        Addr::Aggregator(r) => local.name_of(ActorKey::aggregator(r)),
        Addr::Job => local.job_name(),
        Addr::AllTrainers => return None,
    })
}

impl Net for ClusterNet {
    fn send(&self, to: Addr, msg: Msg) {
        if let Addr::AllTrainers = to {
            phalanx_actors::net::to_each_trainer(self.routing.trainers, msg, |i, msg| self.send(Addr::Trainer(i), msg));
            return;
        }
        let here = local_name(&self.local, to).is_some_and(|n| ractor::registry::where_is(n).is_some());
        if here {
            self.local.send(to, msg);
            return;
        }
        match self.routing.node_for(to) {
            Some(node) if node != self.routing.me => {
                let traffic = Traffic::of(&msg);
                match wire::encode_deliver(self.routing.job, to, msg, &self.routing.limits) {
                    Ok(frame) => self.routing.send_frame(node, frame, traffic),
                    Err(e) => tracing::warn!(?to, "cannot encode a message for node {node}: {e}"),
                }
            }
            _ => tracing::debug!(?to, "no live actor for this address; message dropped"),
        }
    }
}

/// The coordinator supervisor's view of the cluster (see [`Cluster`]).
pub struct ClusterHooks {
    routing: Routing,
    /// The coordinator's own record of locations, broadcast on change, and its number.
    locations: std::sync::Mutex<(u64, BTreeMap<ActorKey, u32>)>,
    members: Vec<u32>,
    /// The epoch this coordinator coordinates in (tags its location maps).
    epoch: u64,
    /// When the job first started (Unix ms), told to every member.
    job_started_ms: u64,
}

impl ClusterHooks {
    /// Hooks for the coordinator `routing.me` of a cluster of `members`,
    /// coordinating in `epoch` a job that first started at `job_started_ms`.
    pub fn new(routing: Routing, members: Vec<u32>, epoch: u64, job_started_ms: u64) -> Self {
        Self { routing, locations: Default::default(), members, epoch, job_started_ms }
    }

    fn record(&self, key: ActorKey, node: u32) {
        let (seq, map) = {
            let mut locations = self.locations.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            locations.0 += 1;
            locations.1.insert(key, node);
            locations.clone()
        };
        // Every member, this node included (the node loop applies its own copy).
        let (job, epoch, job_started_ms) = (self.routing.job, self.epoch, self.job_started_ms);
        if let Ok(frame) =
            wire::encode(&NodeMsg::Locations { job, epoch, job_started_ms, map, seq }, &self.routing.limits)
        {
            for &m in &self.members {
                self.routing.send_frame(m, frame.clone(), Traffic::Control);
            }
        }
    }
}

impl Cluster for ClusterHooks {
    fn may_commit(&self) -> bool {
        self.routing.lease.holds()
    }

    fn remote_host(&self, key: ActorKey) -> Option<u32> {
        let node =
            self.routing.routes.borrow().placement.as_ref().and_then(|p| p.node_of(key)).unwrap_or(self.routing.me);
        self.record(key, node);
        (node != self.routing.me).then_some(node)
    }

    fn spawn_remote(&self, node: u32, key: ActorKey, generation: u64, restore: Option<u64>, spawn: u64) {
        if let Ok(frame) = wire::encode(
            &NodeMsg::Spawn { job: self.routing.job, key, generation, restore, spawn, kernel: kernel::fingerprint() },
            &self.routing.limits,
        ) {
            self.routing.send_frame(node, frame, Traffic::Control);
        }
    }

    fn preferred_host(&self, key: ActorKey) -> Option<u32> {
        let node =
            self.routing.routes.borrow().placement.as_ref().and_then(|p| p.node_of(key)).unwrap_or(self.routing.me);
        (node != self.routing.me).then_some(node)
    }

    fn stop_remote(&self, node: u32, key: ActorKey) {
        if let Ok(frame) = wire::encode(&NodeMsg::Stop { job: self.routing.job, key }, &self.routing.limits) {
            self.routing.send_frame(node, frame, Traffic::Control);
        }
    }

    fn replicate(&self, path: &std::path::Path, bytes: Vec<u8>) {
        replicate_file(&self.routing, path, bytes);
    }

    fn checkpoint_copies(&self, range: u32) -> u32 {
        checkpoint_copies(&self.routing, range)
    }
}

/// The hooks of the aggregators a node hosts for another node's supervisor (ranges spread over
/// the nodes): they copy their checkpoints as the coordinator's do, and commit without the
/// coordinator's lease — a hosted range is fenced by its host instead, which stops it the
/// moment it adopts another coordinator's view or loses its quorum, and it cannot apply a
/// step the coordinator's own ranges have not published θ for. Nothing here spawns: the
/// supervisor runs on the coordinator.
pub struct HostHooks {
    routing: Routing,
}

impl HostHooks {
    /// Hooks for the actors hosted by `routing.me`.
    pub fn new(routing: Routing) -> Self {
        Self { routing }
    }
}

impl Cluster for HostHooks {
    fn remote_host(&self, _: ActorKey) -> Option<u32> {
        None
    }

    fn spawn_remote(&self, node: u32, key: ActorKey, _: u64, _: Option<u64>, _: u64) {
        tracing::warn!(node = self.routing.me, %key, to = node, "a hosted actor asked for a spawn; only the coordinator spawns");
    }

    fn replicate(&self, path: &std::path::Path, bytes: Vec<u8>) {
        replicate_file(&self.routing, path, bytes);
    }

    fn checkpoint_copies(&self, range: u32) -> u32 {
        checkpoint_copies(&self.routing, range)
    }

    fn preferred_host(&self, _: ActorKey) -> Option<u32> {
        None
    }

    fn stop_remote(&self, _: u32, _: ActorKey) {}
}

/// How many nodes [`replicate_file`] copies the files of aggregator `range` to.
fn checkpoint_copies(routing: &Routing, range: u32) -> u32 {
    routing.routes.borrow().placement.as_ref().map_or(0, |p| p.checkpoint_copies(range))
}

/// Copy the checkpoint file `path`, written here (`bytes`: its contents), to the coordinator
/// and its replicas (the nodes that hold every range of every checkpoint: the coordinator
/// restores from them, and its successor is the first replica), and tell the coordinator, which
/// keeps the job's replication figures. Runs on the aggregator's background persist, after the
/// file is durable: the frames share `bytes`, no copy is made here.
fn replicate_file(routing: &Routing, path: &std::path::Path, bytes: Vec<u8>) {
    let me = routing.me;
    let (coordinator, targets): (u32, Vec<u32>) = {
        let routes = routing.routes.borrow();
        let Some(p) = routes.placement.as_ref() else { return };
        (p.coordinator, p.checkpoint_keepers(me))
    };
    let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { return };
    // The record first: the copies' acknowledgements come after a write and an fsync.
    if let Ok(frame) = wire::encode(
        &NodeMsg::Replicating { job: routing.job, name: name.clone(), to: targets.clone() },
        &routing.limits,
    ) {
        routing.send_frame(coordinator, frame, Traffic::Control);
    }
    match wire::encode_checkpoint(routing.job, &name, bytes, &routing.limits) {
        Ok(frame) => {
            // In the background: a copy uses what the link has to spare beside the job's
            // gradients and parameters instead of sharing it with them round robin: on a link
            // that bandwidth limits, a 1.6 MB copy sharing it with a 1.6 MB range would double
            // that range's time. On loopback, where the CPU limits, no difference was measured
            // (each copy still costs its encryption and the replica's checksum and write).
            let frame = frame.background();
            for r in &targets {
                routing.send_frame(*r, frame.clone(), Traffic::Checkpoint);
            }
        }
        Err(e) => tracing::warn!(path = %path.display(), "cannot encode a checkpoint copy: {e}"),
    }
}

/// Messages of a [`HostActor`].
#[derive(Debug)]
pub enum HostMsg {
    /// Spawn an actor here for coordinator `from`.
    Spawn {
        /// The coordinator asking.
        from: u32,
        /// The actor.
        key: ActorKey,
        /// Its generation.
        generation: u64,
        /// Aggregators: the checkpoint to restore.
        restore: Option<u64>,
        /// The coordinator's id of the request.
        spawn: u64,
        /// The job's kernel, as the coordinator stamped it.
        kernel: KernelFingerprint,
    },
    /// Stop every hosted actor: the quorum is lost (`reason` is reported to
    /// each actor's coordinator, which restarts it: the view may not change
    /// if nobody else noticed), or the job ended (`None`).
    StopAll {
        /// Why, for the coordinators.
        reason: Option<String>,
    },
    /// Stop one hosted actor quietly: it moves to another node.
    Stop {
        /// The actor.
        key: ActorKey,
        /// The coordinator asking (only its own actors are stopped).
        from: u32,
    },
    /// `coordinator`'s newest location map: stop what it asked for here and now places on
    /// another node (an instance it gave up for lost while this node was cut off, and moved; a
    /// stale aggregator would otherwise take the messages of this node's actors for its range).
    Placed {
        /// The coordinator.
        coordinator: u32,
        /// Actor → node, as it says.
        map: BTreeMap<ActorKey, u32>,
    },
    /// `coordinator` coordinates the view of `epoch`: stop what any other
    /// coordinator asked for (the new one respawns everything it needs), and
    /// from now on ignore requests of coordinators of older views.
    CoordinatorIs {
        /// The coordinator.
        coordinator: u32,
        /// The view's epoch.
        epoch: u64,
    },
}

/// Hosts the actors the coordinator places on this node and reports their
/// failures back to it.
pub struct HostActor;

/// State of a [`HostActor`].
pub struct HostState {
    ctx: Arc<JobContext>,
    routing: Routing,
    children: HashMap<ActorId, (ActorKey, u32, u64)>,
    stopping: HashSet<ActorId>,
    /// The coordinator of the newest view, and its epoch.
    current: Option<(u32, u64)>,
}

impl HostState {
    fn report(&self, coordinator: u32, msg: NodeMsg) {
        if let Ok(frame) = wire::encode(&msg, &self.routing.limits) {
            self.routing.send_frame(coordinator, frame, Traffic::Control);
        }
    }
}

impl Actor for HostActor {
    type Msg = HostMsg;
    type State = HostState;
    type Arguments = (Arc<JobContext>, Routing);

    async fn pre_start(
        &self,
        _: ActorRef<HostMsg>,
        (ctx, routing): Self::Arguments,
    ) -> Result<HostState, ActorProcessingErr> {
        Ok(HostState { ctx, routing, children: HashMap::new(), stopping: HashSet::new(), current: None })
    }

    async fn handle(
        &self,
        myself: ActorRef<HostMsg>,
        msg: HostMsg,
        state: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HostMsg::Spawn { from, key, generation, restore, spawn, kernel } => {
                // A deposed coordinator's request, held back by a partition or a
                // pause, must not replace what the current one placed here. A
                // supervisor's generations carry its view's epoch in the high bits;
                // a new coordinator's request may overtake its view, so only
                // requests of older views are refused.
                if let Some((current, epoch)) = state.current {
                    if from != current && generation >> 32 < epoch {
                        tracing::info!(node = state.routing.me, %key, from, "ignoring a spawn request of a deposed coordinator");
                        return Ok(());
                    }
                }
                // Actors computing other bits than the job's would break the promise: refuse.
                if let Err(mismatch) = kernel::check(kernel) {
                    let (me, job) = (state.routing.me, state.routing.job);
                    tracing::error!(node = me, job, %key, "refusing to host: {mismatch}");
                    let reason = format!("node {me} refuses to host {key} of job {job}: {mismatch}");
                    state.report(from, NodeMsg::Failed { job, key, spawn, reason });
                    return Ok(());
                }
                // A previous incarnation of the same actor here is replaced.
                let old: Vec<ActorId> =
                    state.children.iter().filter(|(_, (k, _, _))| *k == key).map(|(id, _)| *id).collect();
                for id in old {
                    if let Some(cell) = myself.get_children().into_iter().find(|c| c.get_id() == id) {
                        state.stopping.insert(id);
                        let _ = cell.stop_and_wait(None, None).await;
                    }
                    state.children.remove(&id);
                }
                match spawn_actor(&state.ctx, myself.get_cell(), key, generation, restore).await {
                    Ok(cell) => {
                        state.children.insert(cell.get_id(), (key, from, spawn));
                        state.report(from, NodeMsg::Started { job: state.routing.job, key, spawn });
                    }
                    Err(e) => state.report(
                        from,
                        NodeMsg::Failed { job: state.routing.job, key, spawn, reason: format!("failed to start: {e}") },
                    ),
                }
            }
            HostMsg::StopAll { reason } => {
                for cell in myself.get_children() {
                    state.stopping.insert(cell.get_id());
                    cell.stop(Some("stopped by the node".into()));
                }
                if let Some(reason) = reason {
                    for (key, from, spawn) in state.children.values() {
                        let reason = format!("stopped: {reason}");
                        state.report(
                            *from,
                            NodeMsg::Failed { job: state.routing.job, key: *key, spawn: *spawn, reason },
                        );
                    }
                }
                state.children.clear();
            }
            HostMsg::Stop { key, from } => {
                let ids: Vec<ActorId> = state
                    .children
                    .iter()
                    .filter(|(_, (k, spawner, _))| *k == key && *spawner == from)
                    .map(|(id, _)| *id)
                    .collect();
                for cell in myself.get_children().into_iter().filter(|c| ids.contains(&c.get_id())) {
                    state.stopping.insert(cell.get_id());
                    cell.stop(Some("moved to another node".into()));
                }
                state.children.retain(|id, _| !ids.contains(id));
            }
            HostMsg::Placed { coordinator, map } => {
                let me = state.routing.me;
                let stale: Vec<(ActorId, ActorKey, u64)> = state
                    .children
                    .iter()
                    .filter(|(_, (key, from, _))| *from == coordinator && map.get(key).is_some_and(|n| *n != me))
                    .map(|(id, (key, _, spawn))| (*id, *key, *spawn))
                    .collect();
                for (id, key, spawn) in &stale {
                    if let Some(cell) = myself.get_children().into_iter().find(|c| c.get_id() == *id) {
                        tracing::info!(node = me, %key, "stopping a hosted actor node {coordinator} placed elsewhere");
                        state.stopping.insert(*id);
                        cell.stop(Some("placed on another node".into()));
                    }
                    // Said, in case the map was older than the request that spawned it here (they
                    // travel apart): the supervisor then restarts it; a report about an instance
                    // it already replaced is ignored there.
                    let reason = format!("stopped: node {coordinator}'s location map places it elsewhere");
                    state.report(
                        coordinator,
                        NodeMsg::Failed { job: state.routing.job, key: *key, spawn: *spawn, reason },
                    );
                    state.children.remove(id);
                }
            }
            HostMsg::CoordinatorIs { coordinator, epoch } => {
                if state.current.is_some_and(|(_, seen)| seen > epoch) {
                    return Ok(());
                }
                state.current = Some((coordinator, epoch));
                // Spawn requests and views travel separately, so a request of the
                // new coordinator may arrive before its view: keep those.
                let stale: Vec<(ActorId, ActorKey, u32, u64)> = state
                    .children
                    .iter()
                    .filter(|(_, (_, from, _))| *from != coordinator)
                    .map(|(id, (key, from, spawn))| (*id, *key, *from, *spawn))
                    .collect();
                for (id, key, from, spawn) in &stale {
                    if let Some(cell) = myself.get_children().into_iter().find(|c| c.get_id() == *id) {
                        state.stopping.insert(*id);
                        cell.stop(Some("coordinator changed".into()));
                    }
                    // Tell the old coordinator: if it is still alive after all,
                    // it must know its actor is gone.
                    state.report(
                        *from,
                        NodeMsg::Failed {
                            job: state.routing.job,
                            key: *key,
                            spawn: *spawn,
                            reason: format!("stopped: node {coordinator} coordinates now"),
                        },
                    );
                    state.children.remove(id);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<HostMsg>,
        evt: SupervisionEvent,
        state: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, format!("stopped unexpectedly ({})", reason.unwrap_or_default()))
            }
            _ => return Ok(()),
        };
        if state.stopping.remove(&cell.get_id()) {
            return Ok(());
        }
        if let Some((key, coordinator, spawn)) = state.children.remove(&cell.get_id()) {
            tracing::warn!(actor = %key, "hosted actor failed: {reason}");
            state.report(coordinator, NodeMsg::Failed { job: state.routing.job, key, spawn, reason });
        }
        Ok(())
    }
}

/// Tell the local supervisor (if it runs here) about a remote actor or node.
pub fn to_job(local: &LocalNet, msg: JobMsg) {
    if let Some(job) = ActorRef::<JobMsg>::where_is(local.job_name()) {
        let _ = job.send_message(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(to: u32, bytes: usize) -> Outbound {
        Outbound { to, frame: vec![0u8; bytes].into(), traffic: Traffic::Control }
    }

    /// Maps of one term arriving out of order: the newest stays; a later term's map wins.
    #[test]
    fn an_older_location_map_arriving_late_does_not_replace_a_newer_one() {
        let mut routes = Routes::default();
        let map = |node: u32| [(ActorKey::trainer(1), node)].into_iter().collect::<BTreeMap<_, _>>();
        assert_eq!(routes.set_locations(0, 1, 5, map(1)), Some(map(1)));
        assert_eq!(routes.set_locations(0, 1, 4, map(2)), None, "map 4 came after map 5");
        assert_eq!(routes.locations[&0].1, map(1));
        assert!(routes.set_locations(0, 2, 1, map(2)).is_some());
        assert_eq!(routes.locations[&0].1, map(2), "a later term's first map");
    }

    /// A producer over the budget waits until the node loop hands a frame on, and then goes;
    /// nothing is dropped and the queue never holds more than the budget plus one frame.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_producer_over_the_budget_waits_for_room() {
        let (queue, mut rx) = OutQueue::new(1000);
        queue.send(frame(1, 600)).unwrap();
        // A blocking-pool-like producer (a plain thread): 600 + 600 > 1000, so it waits.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let producer = {
            let queue = queue.clone();
            std::thread::spawn(move || {
                queue.send(frame(1, 600)).unwrap();
                done_tx.send(queue.queued_bytes()).unwrap();
            })
        };
        let (first, permit) = rx.recv().await.unwrap();
        assert_eq!(first.frame.len(), 600);
        // Had it not waited, it would have queued its frame by now.
        let early = done_rx.recv_timeout(std::time::Duration::from_millis(200));
        assert!(early.is_err(), "the producer went over the budget: {early:?}");
        assert_eq!(rx.queued_bytes(), 600, "only the first frame is counted");
        drop(permit);
        assert_eq!(done_rx.recv().unwrap(), 600, "the second frame went once the first was handed on");
        producer.join().unwrap();
        let (second, _permit) = rx.recv().await.unwrap();
        assert_eq!(second.frame.len(), 600);
    }

    /// The node loop's own frames never wait, and a frame larger than the whole budget goes
    /// once the queue is empty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_loops_frames_and_huge_frames_are_not_stuck() {
        let (queue, mut rx) = OutQueue::new(1000);
        queue.send_now(frame(1, 900)).unwrap();
        queue.send_now(frame(1, 900)).unwrap();
        assert_eq!(queue.queued_bytes(), 1800, "over the budget, without waiting");
        let (_, a) = rx.recv().await.unwrap();
        let (_, b) = rx.recv().await.unwrap();
        drop((a, b));
        queue.send(frame(2, 5000)).unwrap();
        let (huge, permit) = rx.recv().await.unwrap();
        assert_eq!((huge.to, huge.frame.len(), rx.queued_bytes()), (2, 5000, 5000));
        drop(permit);
        assert_eq!(rx.queued_bytes(), 0);
    }
}
