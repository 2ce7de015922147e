//! The jobs of one node: its copy of the cluster's job registry, one
//! `NodeJob` per job that is not over, submissions and cancellations.
//!
//! ```text
//!  NodeHandle::submit ──▶ Jobs ──(coordinator)──▶ Registry::accept ──Registry{v}──▶ members ──Ack{v}──┐
//!                          │  (member) ──Submit──▶ coordinator ──SubmitAnswer──▶ reply               │
//!                          └── majority holds v ◀─────────────────────────────────────────────────────┘
//!  registry changes ──▶ sync: prepare a NodeJob for each new job (off the loop), start the
//!                       running ones on the coordinator, stop and drop those that are over
//! ```
//!
//! The rules (which jobs run, versions, durability) are in the sans-IO
//! [`Registry`]; this shell carries them out with frames and tasks.

use phalanx_actors::clock;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

pub use super::command::NodeCommand;

use super::authority::{Parked, ParkedFrame, Scope, Verdict};
use super::event::{Emitter, NodeEventKind};
use super::membership::View;
use super::node_config::NodeConfig;
use super::node_job::{NodeJob, NodeShared, StoredCopy};
use super::registry::{JobEntry, JobId, JobState, Records, Registry, ServiceStore, StorePoll, StoreWrite, Version};
use super::rejections::Rejections;
use super::runner::{to_job, OutQueue, Outbound};
use super::wire::{self, Inbound, NodeMsg};
use crate::config::JobConfig;
use crate::error::Error;
use crate::job::{PreparedJob, Registries};
use crate::metrics::{Kind, NodeMetrics};
use phalanx_actors::net::JobMsg;
use phalanx_transport::Limits;

/// How long a member waits for the coordinator to answer a forwarded submission.
const SUBMIT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the coordinator sends its registry again while a version is not
/// held by a majority (a member may have missed it).
const REGISTRY_RESEND: Duration = Duration::from_millis(500);
/// The largest job spec (as JSON) a cluster on a coordination service accepts: the service
/// keeps each job as one value, and values are bounded.
const MAX_STORED_SPEC_BYTES: usize = super::coordination::MAX_VALUE_BYTES - 4096;
/// The id of the job given at node start (`phalanx node --job`, [`NodeBuilder::job`](crate::NodeBuilder::job)).
pub const STARTUP_JOB: JobId = 1;

/// Where the answer to a submission goes.
type Reply = oneshot::Sender<Result<JobId, Error>>;

/// Who waits for an accepted job to become durable.
#[derive(Debug)]
enum Waiter {
    Local(Reply),
    Remote { node: u32, request: u64 },
}

/// The jobs of one node.
pub(crate) struct Jobs {
    config: NodeConfig,
    registry: Registry,
    jobs: BTreeMap<JobId, NodeJob>,
    preparing: BTreeSet<JobId>,
    /// The startup job's outputs go to the node's `out`, others' to `out/jobs/<id>`
    /// unless the spec names its own.
    view: Option<View>,
    /// Coordinator: accepted jobs waiting for their version to become durable.
    waiting: Vec<(Version, JobId, Waiter)>,
    /// Member: submissions forwarded to the coordinator.
    forwarded: BTreeMap<u64, (Reply, Instant)>,
    /// Submissions made while no coordinator was known (the cluster forming,
    /// or this node away from the majority): sent on once a view comes.
    parked: Vec<(Box<JobConfig>, Reply, Instant)>,
    next_request: u64,
    last_sent: Option<Instant>,
    /// The last state of each job this node told about.
    told: BTreeMap<JobId, &'static str>,
    /// Frames whose senders may become entitled with the next view or location map.
    lot: Parked,
    /// Messages dropped by the authority rules (and the node loop's bad frames), per
    /// sender and kind, reported at a bounded rate.
    rejections: Rejections,
    out_tx: OutQueue,
    ready_tx: mpsc::Sender<(JobId, Result<NodeJob, Error>)>,
    /// Where checkpoint copies written off the loop report back (see [`StoredCopy`]).
    stored: mpsc::Sender<StoredCopy>,
    /// The models and data sources this node can host.
    registries: Registries,
    /// This node instance's random tag (see [`NodeShared`]).
    instance: u64,
    /// The node's coordinator lease (see [`NodeShared`]).
    lease: Arc<super::membership::LeaseCell>,
    events: Emitter,
    metrics: Arc<NodeMetrics>,
    limits: Limits,
    /// On a coordination service: the service, not a majority of the nodes, makes a
    /// registry version durable, and keeps the registry for the next coordinator.
    on_service: bool,
    /// On a service, while coordinating: what the service holds of the registry.
    store: Option<ServiceStore>,
    /// On a service: this node coordinates the view of this epoch but has not yet read what
    /// the service keeps of the registry; until it has, it accepts and starts nothing.
    taking_over: Option<u64>,
    /// Submissions that came meanwhile (at most [`MAX_QUEUED`](super::registry::MAX_QUEUED)).
    held_submissions: Vec<(JobConfig, Waiter)>,
    /// The records of the jobs this node coordinates (newest complete checkpoint, where the
    /// partitions are), and a count of their changes (kept on a coordination service).
    records: Records,
    records_changed: u64,
}

impl Jobs {
    /// The jobs of node `config.id`; `startup` is the job given at start (job 1
    /// on every member), already prepared. Prepared jobs arrive on `ready_tx`'s
    /// receiver, to be handed to [`on_ready`](Self::on_ready); `shared` is what
    /// every job of the node shares.
    pub(crate) async fn new(
        config: NodeConfig,
        startup: Option<Arc<PreparedJob>>,
        registries: Registries,
        ready_tx: mpsc::Sender<(JobId, Result<NodeJob, Error>)>,
        shared: NodeShared,
    ) -> Result<Self, Error> {
        let mut registry = Registry::new(config.id, config.max_jobs);
        let NodeShared { out_tx, events, metrics, stored, instance, lease } = shared;
        let mut jobs = BTreeMap::new();
        if let Some(prepared) = startup {
            registry.seed(STARTUP_JOB, prepared.config.clone());
            let shared = NodeShared {
                out_tx: out_tx.clone(),
                events: events.clone(),
                metrics: metrics.clone(),
                instance,
                stored: stored.clone(),
                lease: lease.clone(),
            };
            let job = NodeJob::start(&config, STARTUP_JOB, prepared, config.out.clone(), shared).await?;
            jobs.insert(STARTUP_JOB, job);
        }
        let held_for = Duration::from_millis(config.detector.failure_timeout_ms.saturating_mul(2));
        Ok(Self {
            registry,
            jobs,
            preparing: BTreeSet::new(),
            view: None,
            waiting: Vec::new(),
            forwarded: BTreeMap::new(),
            parked: Vec::new(),
            next_request: 0,
            last_sent: None,
            told: BTreeMap::new(),
            // A message overtakes the view or map it depends on by a few frames at most:
            // two failure timeouts is far longer than that, and bounds what waits.
            rejections: Rejections::new(),
            lot: Parked::new(held_for),
            out_tx,
            ready_tx,
            stored,
            registries,
            events,
            metrics,
            instance,
            lease,
            limits: Limits::default(),
            on_service: !matches!(config.coordination, super::coordination::Coordination::Embedded),
            store: None,
            taking_over: None,
            held_submissions: Vec::new(),
            records: Records::new(),
            records_changed: 0,
            config,
        })
    }

    fn me(&self) -> u32 {
        self.config.id
    }

    fn coordinating(&self) -> bool {
        self.view.as_ref().is_some_and(|v| v.coordinator == self.me())
    }

    fn send(&self, to: u32, msg: &NodeMsg) {
        match wire::encode(msg, &self.limits) {
            Ok(frame) => {
                // The node loop's own frame: never waits for the queue it drains.
                let _ = self.out_tx.send_now(Outbound::control(to, frame));
            }
            Err(e) => tracing::warn!(node = self.me(), to, "cannot encode a control message: {e}"),
        }
    }

    /// The job supervisor's local name of every job here (to tell them a node is lost).
    pub(crate) fn on_node_lost(&self, peer: u32) {
        for job in self.jobs.values() {
            to_job(job.names(), JobMsg::NodeLost(peer));
        }
    }

    /// A new view was adopted.
    pub(crate) fn on_view(&mut self, view: &View) {
        let was = self.coordinating();
        self.view = Some(view.clone());
        for job in self.jobs.values_mut() {
            job.on_view(view);
        }
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            self.note_records(id);
        }
        if !self.coordinating() {
            self.end_store();
        }
        if self.coordinating() {
            if !was {
                // The views' members may have missed earlier updates.
                self.last_sent = None;
                if self.on_service {
                    // What the service keeps first (jobs accepted by earlier coordinators):
                    // see `take_over_stored`.
                    self.taking_over = Some(view.epoch);
                } else {
                    self.registry.take_over(view.epoch);
                }
            } else if let Some(epoch) = &mut self.taking_over {
                *epoch = view.epoch;
            }
            self.schedule();
            self.broadcast();
        }
        // Submissions that waited for a coordinator go on (after any takeover,
        // so their versions belong to this view).
        for (spec, reply, _) in std::mem::take(&mut self.parked) {
            self.on_command(NodeCommand::Submit { spec, reply });
        }
        self.judge_held();
    }

    /// The adopted view lost to another coordinator's: follow no view until the winner's
    /// comes, and if this node coordinated, end its term — its coordinator tasks stop, and a
    /// later view making it coordinator again starts a new term (a takeover of the registry,
    /// a fresh resume decision), never the old one going on after someone else's.
    pub(crate) fn on_view_given_up(&mut self, lost: &View) {
        if self.view.as_ref().is_some_and(|v| v.epoch == lost.epoch && v.coordinator == lost.coordinator) {
            self.view = None;
        }
        self.end_store();
        for job in self.jobs.values_mut() {
            job.stop_coordinating();
        }
    }

    /// Quorum lost or shutting down: stop everything here.
    pub(crate) fn stop_all(&mut self, why: &str) {
        self.view = None;
        self.end_store();
        for frame in self.lot.take() {
            let reason = format!("{}; dropped as this node {why}", frame.reason);
            self.rejected(frame.peer, frame.inbound.kind(), reason);
        }
        for job in self.jobs.values_mut() {
            job.stop_all(why);
        }
    }

    /// The clock advanced.
    pub(crate) fn on_tick(&mut self, now: Instant) {
        self.rejections.emit_due(&self.events, now);
        for frame in self.lot.expired(now) {
            let reason = format!("{} (still, after {} ms)", frame.reason, self.lot.max_age().as_millis());
            self.rejected(frame.peer, frame.inbound.kind(), reason);
        }
        for job in self.jobs.values_mut() {
            job.on_tick(now);
        }
        let expired: Vec<u64> = self
            .forwarded
            .iter()
            .filter(|(_, (_, at))| now.saturating_duration_since(*at) >= SUBMIT_ANSWER_TIMEOUT)
            .map(|(r, _)| *r)
            .collect();
        for request in expired {
            if let Some((reply, _)) = self.forwarded.remove(&request) {
                let _ = reply.send(Err(Error::Submit(format!(
                    "node {}: the coordinator did not answer within {} s; submit again",
                    self.me(),
                    SUBMIT_ANSWER_TIMEOUT.as_secs()
                ))));
            }
        }
        let (expired, parked): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|(_, _, at)| now.saturating_duration_since(*at) >= SUBMIT_ANSWER_TIMEOUT);
        self.parked = parked;
        for (_, reply, _) in expired {
            let _ = reply.send(Err(Error::Submit(format!(
                "node {} has seen no majority of the cluster for {} s: no coordinator to take the job",
                self.me(),
                SUBMIT_ANSWER_TIMEOUT.as_secs()
            ))));
        }
        let unacked = self.registry.durable() < self.registry.snapshot().version;
        let due = self.last_sent.is_none_or(|t| now.saturating_duration_since(t) >= REGISTRY_RESEND);
        if self.coordinating() && unacked && due {
            self.broadcast();
        }
    }

    /// A checkpoint copy written off the loop: to its job, if this node still hosts it.
    pub(crate) fn on_copy_stored(&mut self, copy: StoredCopy) {
        if let Some(job) = self.jobs.get_mut(&copy.job) {
            job.on_copy_stored(copy);
        }
    }

    /// A command of a [`NodeHandle`](crate::NodeHandle).
    pub(crate) fn on_command(&mut self, cmd: NodeCommand) {
        match cmd {
            NodeCommand::Submit { spec, reply } => match &self.view {
                Some(v) if v.coordinator == self.me() => self.accept(*spec, Waiter::Local(reply)),
                Some(v) => {
                    self.next_request += 1;
                    let request = self.next_request;
                    self.forwarded.insert(request, (reply, clock::now()));
                    self.send(v.coordinator, &NodeMsg::Submit { request, spec });
                }
                // No coordinator known yet: wait (bounded) for a view.
                None => self.parked.push((spec, reply, clock::now())),
            },
            NodeCommand::Cancel { job } => match &self.view {
                Some(v) if v.coordinator == self.me() => self.cancel(job),
                Some(v) => self.send(v.coordinator, &NodeMsg::Cancel { job }),
                None => tracing::warn!(node = self.me(), job, "cannot cancel job {job}: no coordinator"),
            },
            NodeCommand::Jobs { reply } => {
                let _ = reply.send(self.registry.snapshot().jobs.values().cloned().collect());
            }
            // The node loop answers it (it holds the view and the connections); dropping the
            // reply tells a caller that got here by mistake.
            NodeCommand::Status { reply } => drop(reply),
        }
    }

    /// Coordinator: accept a job; `waiter` hears once a majority (or the coordination
    /// service) holds it.
    fn accept(&mut self, mut spec: JobConfig, waiter: Waiter) {
        // Fixed here, once, so every node (and a later coordinator) runs the same ranges.
        self.config.admit(&mut spec);
        if self.taking_over.is_some() {
            if self.held_submissions.len() >= super::registry::MAX_QUEUED {
                let why = format!("node {} is taking the job registry over; submit again", self.me());
                return self.answer(waiter, Err(why));
            }
            return self.held_submissions.push((spec, waiter));
        }
        if self.on_service {
            let bytes = serde_json::to_vec(&spec).map_or(usize::MAX, |b| b.len());
            if bytes > MAX_STORED_SPEC_BYTES {
                let why = format!(
                    "node {}: the job spec is {bytes} bytes as JSON; a coordination service keeps specs of at most \
                     {MAX_STORED_SPEC_BYTES} (give large settings in a file the nodes read)",
                    self.me()
                );
                return self.answer(waiter, Err(why));
            }
        }
        match self.registry.accept(spec) {
            Ok((id, version)) => {
                tracing::info!(node = self.me(), job = id, "job {id} accepted");
                self.waiting.push((version, id, waiter));
                // This node holds it: with one member that is already a majority.
                if let Some(v) = self.registry.on_ack(self.me(), version, self.config.members()) {
                    if !self.on_service {
                        self.release(v);
                    }
                }
                self.schedule();
                self.broadcast();
            }
            Err(e) => self.answer(waiter, Err(e.to_string())),
        }
    }

    fn answer(&self, waiter: Waiter, result: Result<JobId, String>) {
        match waiter {
            Waiter::Local(reply) => {
                let _ = reply.send(result.map_err(Error::Submit));
            }
            Waiter::Remote { node, request } => self.send(node, &NodeMsg::SubmitAnswer { request, result }),
        }
    }

    /// On a service: this node coordinates but waits for what the service keeps of the registry.
    pub(crate) fn taking_over(&self) -> bool {
        self.taking_over.is_some()
    }

    /// On a service: the jobs it kept when this node's coordination term began (read after
    /// the role was won). They go into the registry before anything is accepted or started,
    /// so no job an earlier coordinator accepted is lost or numbered twice.
    pub(crate) fn take_over_stored(&mut self, stored: Vec<JobEntry>) {
        let Some(epoch) = self.taking_over.take() else { return };
        if !self.coordinating() {
            return;
        }
        self.registry.merge_stored(stored.clone(), STARTUP_JOB);
        self.store = Some(ServiceStore::new(stored));
        self.registry.take_over(epoch);
        tracing::info!(node = self.me(), epoch, "took the job registry over from the coordination service");
        self.schedule();
        self.broadcast();
        for (spec, waiter) in std::mem::take(&mut self.held_submissions) {
            self.accept(spec, waiter);
        }
    }

    /// On a service, while coordinating: the registry's next write to it, if one is due.
    pub(crate) fn next_store_write(&mut self, now: Instant) -> Option<StoreWrite> {
        let store = self.store.as_mut()?;
        match store.poll(self.registry.snapshot(), &self.records, self.records_changed, now) {
            StorePoll::Write(write) => Some(write),
            StorePoll::Durable(version) => {
                self.release(version);
                None
            }
            StorePoll::Idle => None,
        }
    }

    /// On a service: whether a write of the registry is under way or waits to be tried again.
    pub(crate) fn store_pending(&self) -> bool {
        self.store.as_ref().is_some_and(ServiceStore::pending)
    }

    /// This node's coordination term ended: what it knew of the service goes with it.
    fn end_store(&mut self) {
        self.store = None;
        self.records.clear();
        self.taking_over = None;
        for (_, waiter) in std::mem::take(&mut self.held_submissions) {
            let why = format!("node {} stopped coordinating before it could accept the job; submit again", self.me());
            self.answer(waiter, Err(why));
        }
    }

    /// On a service: a registry write ended (`held`: the service holds it).
    pub(crate) fn on_stored(&mut self, version: Version, held: bool) {
        let durable = self.store.as_mut().and_then(|store| store.on_written(version, held, clock::now()));
        if let Some(version) = durable {
            tracing::debug!(node = self.me(), ?version, "the coordination service holds the registry");
            self.release(version);
        }
    }

    /// Tell every submitter whose job's version a majority holds now.
    fn release(&mut self, durable: Version) {
        let (done, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|(v, _, _)| *v <= durable);
        self.waiting = rest;
        for (_, id, waiter) in done {
            self.answer(waiter, Ok(id));
        }
    }

    /// Coordinator: cancel a job.
    fn cancel(&mut self, job: JobId) {
        if self.registry.set_state(job, JobState::Cancelled).is_some() {
            tracing::info!(node = self.me(), job, "job {job} cancelled");
            self.schedule();
            self.broadcast();
        }
    }

    /// Coordinator: start what may start, then bring the local jobs in line.
    fn schedule(&mut self) {
        if self.coordinating() && self.taking_over.is_none() {
            self.registry.to_start();
        }
        self.sync();
    }

    /// Send the registry to every other member of the view.
    fn broadcast(&mut self) {
        if self.taking_over.is_some() {
            return;
        }
        let Some(view) = &self.view else { return };
        let msg = NodeMsg::Registry(Box::new(self.registry.snapshot().clone()));
        for m in view.members.iter().copied().filter(|m| *m != self.config.id) {
            self.send(m, &msg);
        }
        self.last_sent = Some(clock::now());
    }

    /// Bring the local jobs in line with the registry: prepare new ones, tell
    /// the running ones to run, stop and drop those that are over.
    fn sync(&mut self) {
        let entries: Vec<JobEntry> = self.registry.snapshot().jobs.values().cloned().collect();
        for entry in &entries {
            let name = entry.state.name();
            if self.told.get(&entry.id) != Some(&name) {
                self.told.insert(entry.id, name);
                let (model_sha256, summary, error) = match &entry.state {
                    JobState::Finished { model_sha256, summary } => (Some(model_sha256.clone()), summary.clone(), None),
                    JobState::Failed { error } => (None, None, Some(error.clone())),
                    _ => (None, None, None),
                };
                self.events.emit(NodeEventKind::JobState {
                    job: entry.id,
                    state: name.to_string(),
                    model_sha256,
                    summary,
                    error,
                });
            }
            if entry.state.is_over() {
                if let Some(mut job) = self.jobs.remove(&entry.id) {
                    job.stop_all(&format!("ends job {} ({name})", entry.id));
                }
                continue;
            }
            match self.jobs.get_mut(&entry.id) {
                Some(job) => job.set_should_run(entry.state == JobState::Running, self.view.as_ref()),
                None if !self.preparing.contains(&entry.id) => self.prepare(entry),
                None => {}
            }
        }
        // Jobs by state, as this node's copy of the registry has them.
        for state in ["queued", "running", "finished", "failed", "cancelled"] {
            let n = entries.iter().filter(|e| e.state.name() == state).count();
            self.metrics.jobs.get_or_create(&Kind::of(state)).set(n as i64);
        }
        // Jobs the registry forgot (bounded history): nothing left to host.
        let known: BTreeSet<JobId> = entries.iter().map(|e| e.id).collect();
        self.told.retain(|id, _| known.contains(id));
        self.records.retain(|(id, _), _| known.contains(id));
    }

    /// Load a job's data and build its model off the node loop; the job
    /// arrives through [`on_ready`](Self::on_ready).
    fn prepare(&mut self, entry: &JobEntry) {
        self.preparing.insert(entry.id);
        let (config, spec, id, registries) =
            (self.config.clone(), entry.spec.clone(), entry.id, self.registries.clone());
        // Outputs go where the spec or the node says, else beside the job's checkpoints, so
        // a client can always fetch a finished job's model (`phalanx submit --wait`).
        let out = spec
            .out
            .clone()
            .or_else(|| self.config.out.as_deref().map(|o| job_out(o, id)))
            .unwrap_or_else(|| super::node_job::job_dir(&self.config, id).join("out"));
        let out = Some(out);
        let ready = self.ready_tx.clone();
        let shared = NodeShared {
            out_tx: self.out_tx.clone(),
            events: self.events.clone(),
            metrics: self.metrics.clone(),
            instance: self.instance,
            stored: self.stored.clone(),
            lease: self.lease.clone(),
        };
        tokio::spawn(async move {
            let me = config.id;
            let prepared = tokio::task::spawn_blocking(move || {
                // A job naming a model or dataset this node lacks fails here, naming both.
                PreparedJob::with_registries(spec, &registries.models, &registries.data)
                    .map_err(|e| Error::Spawn(format!("node {me}: {e}")))
            })
            .await
            .map_err(|e| Error::Spawn(format!("preparing job {id}: {e}")))
            .and_then(|r| r);
            let job = match prepared {
                Ok(prepared) => NodeJob::start(&config, id, Arc::new(prepared), out, shared).await,
                Err(e) => Err(e),
            };
            let _ = ready.send((id, job)).await;
        });
    }

    /// A job finished preparing.
    pub(crate) fn on_ready(&mut self, id: JobId, job: Result<NodeJob, Error>) {
        self.preparing.remove(&id);
        match job {
            Ok(job) => {
                self.jobs.insert(id, job);
                if let Some(view) = self.view.clone() {
                    if let Some(job) = self.jobs.get_mut(&id) {
                        job.on_view(&view);
                    }
                }
                self.sync();
            }
            Err(e) => {
                tracing::error!(node = self.me(), job = id, "cannot host job {id}: {e}");
                let failed = JobState::Failed { error: format!("node {}: {e}", self.me()) };
                if self.coordinating() && self.registry.set_state(id, failed).is_some() {
                    self.schedule();
                    self.broadcast();
                }
            }
        }
    }

    /// A frame that is not membership, from `peer` (this node's own frames too):
    /// obeyed if the authority rules let `peer` send it, held if it may have
    /// overtaken the view or map that entitles it, else counted and dropped.
    pub(crate) fn on_frame(&mut self, peer: u32, inbound: Inbound) {
        match self.judge(peer, &inbound) {
            Verdict::Accept => self.obey(peer, inbound),
            Verdict::Wait(reason) => {
                tracing::debug!(node = self.me(), peer, kind = inbound.kind(), "held: {reason}");
                for frame in self.lot.park(clock::now(), peer, inbound, reason) {
                    let reason = format!("{} (pushed out: too many held from node {})", frame.reason, frame.peer);
                    self.rejected(frame.peer, frame.inbound.kind(), reason);
                }
            }
            Verdict::Reject(reason) => self.rejected(peer, inbound.kind(), reason),
        }
    }

    /// The authority rules on a frame from `peer` (see [`super::authority`]).
    fn judge(&self, peer: u32, inbound: &Inbound) -> Verdict {
        let (me, members, view) = (self.me(), self.config.members(), self.view.as_ref());
        match job_of(inbound).and_then(|job| self.jobs.get(&job)) {
            Some(job) => job.judge(me, members, view, peer, inbound),
            None => Scope { me, members, view, job: None }.judge(peer, inbound),
        }
    }

    /// Judge the held frames again (a view or a location map came).
    fn judge_held(&mut self) {
        for frame in self.lot.take() {
            match self.judge(frame.peer, &frame.inbound) {
                Verdict::Accept => {
                    let ParkedFrame { peer, inbound, .. } = frame;
                    self.obey(peer, inbound);
                }
                Verdict::Wait(_) => self.lot.keep(frame),
                Verdict::Reject(reason) => self.rejected(frame.peer, frame.inbound.kind(), reason),
            }
        }
    }

    /// A message from `peer` was dropped by the authority rules, a core or the codec: count
    /// and report it (see [`Rejections`]).
    pub(crate) fn rejected(&mut self, peer: u32, kind: &'static str, reason: String) {
        self.rejections.reject(&self.metrics, &self.events, peer, kind, reason, clock::now());
    }

    /// Report every rejection total not reported yet (the node is stopping).
    pub(crate) fn flush_rejections(&mut self) {
        for event in self.rejections.flush_all(clock::now()) {
            self.events.emit(event);
        }
    }

    /// A frame the authority rules let through.
    fn obey(&mut self, peer: u32, inbound: Inbound) {
        let locations = matches!(inbound, Inbound::Control(NodeMsg::Locations { .. }));
        self.handle(peer, inbound);
        if locations {
            self.judge_held();
        }
    }

    fn handle(&mut self, peer: u32, inbound: Inbound) {
        let job = job_of(&inbound);
        let Some(job) = job else {
            if let Inbound::Control(msg) = inbound {
                self.on_control(peer, msg);
            }
            return;
        };
        // The coordinator's progress, for this node's watchers (authority checked).
        if let Inbound::Control(NodeMsg::Progress { step, total_steps, loss, .. }) = &inbound {
            let (step, total_steps, loss) = (*step, *total_steps, *loss);
            self.events.emit(NodeEventKind::Progress { job, step, total_steps, loss, from: peer });
            return;
        }
        // The coordinator's registry follows its jobs' ends.
        if self.coordinating() {
            let state = match &inbound {
                Inbound::Control(NodeMsg::JobDone { model_sha256, summary, .. }) => {
                    Some(JobState::Finished { model_sha256: model_sha256.clone(), summary: summary.clone() })
                }
                Inbound::Control(NodeMsg::JobFailed { error, .. }) => Some(JobState::Failed { error: error.clone() }),
                _ => None,
            };
            if let Some(state) = state {
                if self.registry.set_state(job, state).is_some() {
                    if let Some(j) = self.jobs.get_mut(&job) {
                        j.on_inbound(peer, inbound);
                    }
                    self.note_records(job);
                    self.schedule();
                    self.broadcast();
                    return;
                }
            }
        }
        match self.jobs.get_mut(&job) {
            Some(j) => {
                j.on_inbound(peer, inbound);
                self.note_records(job);
            }
            None => match inbound {
                // Not hosted here (yet): the coordinator's spawn timeout respawns it.
                Inbound::Control(NodeMsg::Spawn { key, spawn, .. }) => {
                    let reason = format!("node {} does not host job {job} (yet)", self.me());
                    self.send(peer, &NodeMsg::Failed { job, key, spawn, reason });
                }
                Inbound::Control(NodeMsg::JobDone { model_sha256, summary, .. }) => {
                    self.events.emit(NodeEventKind::JobDone { job, summary, model_sha256, from: peer });
                }
                other => {
                    tracing::debug!(node = self.me(), job, peer, "frame for a job not hosted here: {}", other.kind())
                }
            },
        }
    }

    /// Registry traffic, submissions and cancellations.
    fn on_control(&mut self, peer: u32, msg: NodeMsg) {
        match msg {
            NodeMsg::Registry(snapshot) => {
                if self.registry.adopt(*snapshot) {
                    self.sync();
                }
                self.send(peer, &NodeMsg::RegistryAck { version: self.registry.snapshot().version });
            }
            NodeMsg::RegistryAck { version } if self.coordinating() => {
                // On a service the acks only stop the resends: the service makes it durable.
                if let Some(v) = self.registry.on_ack(peer, version, self.config.members()) {
                    if !self.on_service {
                        self.release(v);
                    }
                }
            }
            NodeMsg::Submit { request, spec } => {
                if let Err(e) = spec.validate() {
                    // Checked by the member too; a member's word is not taken for it.
                    let why = format!("node {} refused the job submitted through node {peer}: {e}", self.me());
                    self.send(peer, &NodeMsg::SubmitAnswer { request, result: Err(why) });
                } else if self.coordinating() {
                    self.accept(*spec, Waiter::Remote { node: peer, request });
                } else {
                    let why = format!("node {} does not coordinate; submit again", self.me());
                    self.send(peer, &NodeMsg::SubmitAnswer { request, result: Err(why) });
                }
            }
            NodeMsg::SubmitAnswer { request, result } => {
                if let Some((reply, _)) = self.forwarded.remove(&request) {
                    let _ = reply.send(result.map_err(Error::Submit));
                }
            }
            NodeMsg::Cancel { job } if self.coordinating() => self.cancel(job),
            _ => {}
        }
    }

    /// Job `job`'s records that changed (kept on a coordination service).
    fn note_records(&mut self, job: JobId) {
        let Some(j) = self.jobs.get_mut(&job) else { return };
        for record in j.take_records() {
            self.records.insert((job, record.dir()), record);
            self.records_changed += 1;
        }
    }
}

/// The job a frame belongs to, if it is scoped to one.
fn job_of(inbound: &Inbound) -> Option<JobId> {
    match inbound {
        Inbound::Deliver(job, _, _) | Inbound::Checkpoint(job, _, _) => Some(*job),
        Inbound::Control(msg) => msg.job(),
    }
}

/// Where the outputs of job `id` go on a node whose outputs go to `out`.
pub fn job_out(out: &std::path::Path, id: JobId) -> PathBuf {
    out.join("jobs").join(id.to_string())
}
