//! The job supervisor actor: carries out a [`JobCore`].

use crate::clock;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use super::{spawn_actor, JobContext};
use crate::net::JobMsg;
use crate::protocol::{ActorKey, FaultCause, FaultRecord, JobCommand, JobCore, JobError, Ledger, Msg, Role};

/// How long a node has to answer a spawn request (started or failed)
/// before the supervisor counts the actor as failed and respawns it.
const SPAWN_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
/// Step records the supervisor may queue for its reader (see
/// [`JobHandle::steps`]) before it waits for the reader to catch up.
pub const STEP_QUEUE: usize = 256;
/// Checkpoint failures kept in the outcome with their reasons (a disk that
/// stays full fails every checkpoint of a long job); the rest are counted.
pub const CHECKPOINT_FAILURES_KEPT: usize = 32;

/// One applied step as the supervisor saw it: what `history.csv` records.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    /// The parameter version the step produced (step `s` produces `s + 1`).
    pub step: u64,
    /// The epoch the applied step belongs to.
    pub epoch: u32,
    /// Mean loss of the step.
    pub loss: f64,
    /// Samples applied in it.
    pub samples: u64,
    /// The supervisor's generation (it changes on every rollback).
    pub generation: u64,
    /// When the supervisor saw every range apply it.
    pub at: Instant,
}

/// Where a running job stands; published on every applied step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    /// Parameter version every range has reached.
    pub step: u64,
    /// Steps of the whole job.
    pub total_steps: u64,
    /// Mean loss of the last applied step.
    pub loss: f64,
    /// Samples applied since the job (or this resume) started, replays included.
    pub samples: u64,
    /// Failures so far.
    pub faults: usize,
    /// Rollbacks so far.
    pub generation: u64,
}

/// What a finished job produced.
#[derive(Clone, Debug, PartialEq)]
pub struct JobOutcome {
    /// The final flat parameter vector.
    pub params: Vec<f32>,
    /// Per epoch, samples applied per partition.
    pub ledger: Ledger,
    /// Every failure and its recovery.
    pub faults: Vec<FaultRecord>,
    /// Mean loss per step, keyed by the version it produced, downsampled to
    /// at most [`crate::protocol::LOSS_POINTS`] + 1 points (the full
    /// history is the stream of [`StepRecord`]s).
    pub losses: BTreeMap<u64, f64>,
    /// The generation at the end.
    pub generation: u64,
    /// Rollbacks to a checkpoint that happened.
    pub rollbacks: u64,
    /// Checkpoints that could not be written (training went on without
    /// them): the first [`CHECKPOINT_FAILURES_KEPT`].
    pub checkpoint_failures: Vec<CheckpointFailure>,
    /// Checkpoints that could not be written, all of them counted.
    pub checkpoint_failures_total: u64,
}

/// A checkpoint an aggregator could not write.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CheckpointFailure {
    /// The aggregator's range.
    pub range: u32,
    /// The version that was not checkpointed.
    pub step: u64,
    /// The error, naming the file.
    pub reason: String,
}

/// A running job: await [`JobHandle::finish`]; watch [`JobHandle::progress`].
pub struct JobHandle {
    /// Latest progress.
    pub progress: watch::Receiver<Progress>,
    /// Every applied step, in order, when the job was started with
    /// [`spawn_job_recording`]. The supervisor waits when [`STEP_QUEUE`]
    /// records are unread: read them, or drop the receiver (`finish` drops
    /// it) to stop the stream.
    pub steps: Option<mpsc::Receiver<StepRecord>>,
    outcome: oneshot::Receiver<Result<JobOutcome, JobError>>,
    actor: ActorRef<JobMsg>,
}

/// Why waiting for a job ended without an outcome.
#[derive(Debug, thiserror::Error)]
pub enum JobRunError {
    /// The job failed.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The supervisor stopped without reporting (it was stopped from outside).
    #[error("the job supervisor stopped without an outcome")]
    Aborted,
}

impl JobHandle {
    /// Wait for the outcome (step records not taken from [`JobHandle::steps`] are dropped).
    pub async fn finish(self) -> Result<JobOutcome, JobRunError> {
        drop(self.steps);
        match self.outcome.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(JobRunError::Aborted),
        }
    }

    /// Stop the job now (its actors stop; `finish` returns `Aborted`).
    pub fn abort(&self) {
        self.actor.stop_children(Some("aborted".into()));
        self.actor.stop(Some("aborted".into()));
    }
}

/// Start a job: spawns the supervisor, which spawns every actor.
/// `restore` resumes from a checkpointed step.
pub async fn spawn_job(ctx: Arc<JobContext>, restore: Option<u64>) -> Result<JobHandle, SpawnErr> {
    spawn_job_at(ctx, restore, 0).await
}

/// Like [`spawn_job`], with every generation of this supervisor at or above
/// `generation`: a supervisor taking over on another node starts above
/// anything its predecessor issued, so the predecessor's messages are fenced.
pub async fn spawn_job_at(ctx: Arc<JobContext>, restore: Option<u64>, generation: u64) -> Result<JobHandle, SpawnErr> {
    spawn(ctx, restore, generation, None).await
}

/// Like [`spawn_job_at`], with every applied step sent on
/// [`JobHandle::steps`] (for a per-step history).
pub async fn spawn_job_recording(
    ctx: Arc<JobContext>,
    restore: Option<u64>,
    generation: u64,
) -> Result<JobHandle, SpawnErr> {
    let (tx, rx) = mpsc::channel(STEP_QUEUE);
    let mut handle = spawn(ctx, restore, generation, Some(tx)).await?;
    handle.steps = Some(rx);
    Ok(handle)
}

async fn spawn(
    ctx: Arc<JobContext>,
    restore: Option<u64>,
    generation: u64,
    steps: Option<mpsc::Sender<StepRecord>>,
) -> Result<JobHandle, SpawnErr> {
    let (tx, rx) = oneshot::channel();
    let total_steps = ctx.plan.schedule.total_steps();
    let (ptx, prx) = watch::channel(Progress { step: restore.unwrap_or(0), total_steps, ..Progress::default() });
    let name = ctx.names.job_name();
    let args = JobArgs { ctx, restore, generation, outcome: tx, progress: ptx, steps };
    let (actor, _) = Actor::spawn(Some(name), JobActor, args).await?;
    Ok(JobHandle { progress: prx, steps: None, outcome: rx, actor })
}

/// Supervises the shards, trainers and aggregators of one job.
pub struct JobActor;

/// Arguments of [`JobActor`].
pub struct JobArgs {
    ctx: Arc<JobContext>,
    restore: Option<u64>,
    generation: u64,
    outcome: oneshot::Sender<Result<JobOutcome, JobError>>,
    progress: watch::Sender<Progress>,
    steps: Option<mpsc::Sender<StepRecord>>,
}

/// The supervisor's state.
pub struct JobState {
    ctx: Arc<JobContext>,
    core: JobCore,
    children: HashMap<ActorId, ActorKey>,
    outcome: Option<oneshot::Sender<Result<JobOutcome, JobError>>>,
    progress: watch::Sender<Progress>,
    /// Where every applied step goes, if anywhere.
    steps: Option<mpsc::Sender<StepRecord>>,
    samples: u64,
    stopping: bool,
    /// Actors spawned on other nodes: where, and the spawn request of the
    /// current instance (reports about other requests are stale).
    remote: BTreeMap<ActorKey, (u32, u64)>,
    /// The last spawn request issued.
    spawn_seq: u64,
    /// Spawn requests not answered yet.
    unanswered: std::collections::BTreeSet<(ActorKey, u64)>,
    /// Local children stopped on purpose (moved), whose end is no failure.
    moving: std::collections::HashSet<ActorId>,
    /// Checkpoints the aggregators could not write (the first
    /// [`CHECKPOINT_FAILURES_KEPT`]) and how many there were.
    checkpoint_failures: Vec<CheckpointFailure>,
    checkpoint_failures_total: u64,
}

impl JobState {
    /// Is `spawn` on `node` the current instance of `key`?
    fn is_current(&self, key: ActorKey, node: u32, spawn: u64) -> bool {
        self.remote.get(&key) == Some(&(node, spawn))
    }

    async fn run(&mut self, myself: &ActorRef<JobMsg>, cmds: Vec<JobCommand>) {
        let mut queue = VecDeque::from(cmds);
        while let Some(cmd) = queue.pop_front() {
            match cmd {
                JobCommand::Spawn { key, generation, restore } => {
                    if let Some(node) = self.ctx.cluster.as_ref().and_then(|c| c.remote_host(key)) {
                        // Started or failed: the host node answers with a JobMsg.
                        self.spawn_seq += 1;
                        let spawn = self.spawn_seq;
                        self.remote.insert(key, (node, spawn));
                        self.unanswered.insert((key, spawn));
                        if let Some(c) = &self.ctx.cluster {
                            c.spawn_remote(node, key, generation, restore, spawn);
                        }
                        // The request or its answer can be lost (a node just back from a
                        // pause refuses frames until its backlog drains): no answer in
                        // time counts as a failure, and the supervisor respawns.
                        myself.send_after(SPAWN_ANSWER_TIMEOUT, move || JobMsg::SpawnTimeout(key, node, spawn));
                        continue;
                    }
                    self.remote.remove(&key);
                    match spawn_actor(&self.ctx, myself.get_cell(), key, generation, restore).await {
                        Ok(cell) => {
                            self.children.insert(cell.get_id(), key);
                            queue.extend(self.core.on_child_started(key));
                        }
                        Err(e) => {
                            // A failed pre_start sends no supervision event: count it here.
                            tracing::warn!(actor = %key, "failed to start: {e}");
                            queue.extend(self.core.on_child_lost(
                                key,
                                FaultCause::StartFailed,
                                format!("failed to start: {e}"),
                                clock::now(),
                            ));
                        }
                    }
                }
                JobCommand::RestartAfter { key, delay } => {
                    tracing::info!(actor = %key, delay_ms = delay.as_millis() as u64, "restarting after backoff");
                    myself.send_after(delay, move || JobMsg::RestartDue(key));
                }
                JobCommand::Send(to, msg) => self.ctx.net.send(to, msg),
                JobCommand::Progress { step, loss, samples, recovered } => {
                    if let Some(observer) = &self.ctx.observer {
                        for r in &recovered {
                            observer.recovered(step, r);
                        }
                    }
                    self.samples += samples;
                    let (faults, generation) = (self.core.faults().len(), self.core.generation());
                    if let Some(tx) = &self.steps {
                        let (epoch, _) = self.ctx.plan.schedule.locate(step.saturating_sub(1));
                        let record = StepRecord { step, epoch, loss, samples, generation, at: clock::now() };
                        // Waits while the reader is STEP_QUEUE records behind: the
                        // history stays complete and the queue bounded.
                        if tx.send(record).await.is_err() {
                            self.steps = None; // nobody reads any more
                        }
                    }
                    let total = self.samples;
                    self.progress.send_modify(|p| {
                        p.step = step;
                        p.loss = loss;
                        p.samples = total;
                        p.faults = faults;
                        p.generation = generation;
                    });
                }
                JobCommand::Fail(e) => {
                    tracing::error!("job failed: {e}");
                    self.stop(myself, Err(e));
                }
                JobCommand::Complete { params, ledger } => {
                    let outcome = JobOutcome {
                        params,
                        ledger,
                        faults: self.core.faults().to_vec(),
                        losses: self.core.losses().to_map(),
                        generation: self.core.generation(),
                        rollbacks: self.core.rollbacks(),
                        checkpoint_failures: self.checkpoint_failures.clone(),
                        checkpoint_failures_total: self.checkpoint_failures_total,
                    };
                    self.stop(myself, Ok(outcome));
                }
            }
        }
    }

    /// Move trainers and shards whose placement changed (a node came back)
    /// to where they belong: stop them where they run, spawn them there.
    /// The math does not care where they run; the moved actors replay the
    /// current step and the aggregators ignore the duplicates.
    fn rebalance(&mut self, myself: &ActorRef<JobMsg>) -> Vec<JobCommand> {
        let Some(cluster) = self.ctx.cluster.clone() else { return Vec::new() };
        if self.stopping {
            return Vec::new();
        }
        let mut cmds = Vec::new();
        for key in self.ctx.plan.actors().into_iter().filter(|k| k.role != Role::Aggregator) {
            let wanted = cluster.preferred_host(key);
            let local = self.children.iter().find(|(_, k)| **k == key).map(|(id, _)| *id);
            let current = match (self.remote.get(&key), local) {
                (Some((node, _)), _) => Some(*node),
                (None, Some(_)) => None,
                (None, None) => continue, // not running (restarting): its respawn follows the placement
            };
            if current == wanted {
                continue;
            }
            match (current, local) {
                (Some(node), _) => {
                    cluster.stop_remote(node, key);
                    self.remote.remove(&key);
                }
                (None, Some(id)) => {
                    if let Some(cell) = myself.get_children().into_iter().find(|c| c.get_id() == id) {
                        self.moving.insert(id);
                        self.children.remove(&id);
                        cell.stop(Some("moved to another node".into()));
                    }
                }
                (None, None) => continue,
            }
            tracing::info!(actor = %key, ?wanted, "moving to its preferred node");
            cmds.push(JobCommand::Spawn { key, generation: self.core.generation(), restore: None });
        }
        cmds
    }

    fn stop(&mut self, myself: &ActorRef<JobMsg>, result: Result<JobOutcome, JobError>) {
        self.stopping = true;
        if let Some(tx) = self.outcome.take() {
            let _ = tx.send(result);
        }
        myself.stop_children(None);
        myself.stop(None);
    }
}

impl Actor for JobActor {
    type Msg = JobMsg;
    type State = JobState;
    type Arguments = JobArgs;

    async fn pre_start(&self, _myself: ActorRef<JobMsg>, args: JobArgs) -> Result<JobState, ActorProcessingErr> {
        let mut core = JobCore::new(args.ctx.plan.clone(), clock::now()).with_generation(args.generation);
        if let Some(step) = args.restore {
            core = core.with_start_step(step);
        }
        Ok(JobState {
            ctx: args.ctx,
            core,
            children: HashMap::new(),
            outcome: Some(args.outcome),
            progress: args.progress,
            steps: args.steps,
            samples: 0,
            stopping: false,
            remote: BTreeMap::new(),
            spawn_seq: 0,
            unanswered: Default::default(),
            moving: Default::default(),
            checkpoint_failures: Vec::new(),
            checkpoint_failures_total: 0,
        })
    }

    async fn post_start(&self, myself: ActorRef<JobMsg>, state: &mut JobState) -> Result<(), ActorProcessingErr> {
        // Spawned here rather than in pre_start so that children can already
        // reach the supervisor (it is running and registered).
        let restore = state.core.global_step();
        let restore = (restore > 0).then_some(restore);
        let cmds = state.core.start(restore);
        let span = state.ctx.span.clone();
        state.run(&myself, cmds).instrument(span).await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<JobMsg>,
        msg: JobMsg,
        state: &mut JobState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.ctx.span.clone();
        on_message(myself, msg, state).instrument(span).await
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<JobMsg>,
        evt: SupervisionEvent,
        state: &mut JobState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.ctx.span.clone();
        on_supervision(myself, evt, state).instrument(span).await
    }
}

/// [`JobActor::handle`], inside the job's span.
async fn on_message(myself: ActorRef<JobMsg>, msg: JobMsg, state: &mut JobState) -> Result<(), ActorProcessingErr> {
    if state.stopping {
        return Ok(());
    }
    let now = clock::now();
    let cmds = match msg {
        JobMsg::RestartDue(key) => {
            let checkpoint = if key.role == Role::Aggregator {
                match state.ctx.store.newest_complete(&state.ctx.config_hash, state.ctx.model.num_params()) {
                    Ok(step) => step,
                    Err(e @ crate::checkpoint::CheckpointError::KernelMismatch { .. }) => {
                        // Not "no checkpoint": falling back to step 0 would train on with
                        // other maths as if nothing had been saved.
                        tracing::error!("cannot restore {key}: {e}");
                        state.stop(&myself, Err(JobError::ForeignCheckpoint { actor: key, reason: e.to_string() }));
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::error!("cannot list checkpoints: {e}");
                        None
                    }
                }
            } else {
                None
            };
            if let (Some(observer), Some(cause)) = (&state.ctx.observer, state.core.restart_cause(key)) {
                if !state.core.is_done() {
                    observer.restarted(key, cause);
                }
            }
            state.core.on_restart_due(key, checkpoint, now)
        }
        JobMsg::Net(Msg::StepApplied { range, generation, step, loss_sum, samples, .. }) => {
            state.core.on_step_applied(range, generation, step, loss_sum, samples, now)
        }
        JobMsg::Net(Msg::Finished { range, generation, offset, values, ledger, .. }) => {
            state.core.on_finished(range, generation, offset, values, ledger)
        }
        JobMsg::Net(Msg::CheckpointSaved { .. }) => Vec::new(),
        JobMsg::Net(Msg::CheckpointFailed { range, step, reason, .. }) => {
            tracing::warn!(range, step, "checkpoint not saved: {reason}");
            state.checkpoint_failures_total += 1;
            if state.checkpoint_failures.len() < CHECKPOINT_FAILURES_KEPT {
                state.checkpoint_failures.push(CheckpointFailure { range, step, reason });
            }
            Vec::new()
        }
        JobMsg::RemoteStarted(key, node, spawn) => {
            state.unanswered.remove(&(key, spawn));
            if !state.is_current(key, node, spawn) {
                return Ok(());
            }
            state.core.on_child_started(key)
        }
        JobMsg::SpawnTimeout(key, node, spawn) => {
            if !state.unanswered.remove(&(key, spawn)) || !state.is_current(key, node, spawn) {
                return Ok(());
            }
            state.remote.remove(&key);
            let reason =
                format!("node {node} did not answer the spawn request within {} ms", SPAWN_ANSWER_TIMEOUT.as_millis());
            tracing::warn!(actor = %key, "{reason}");
            state.core.on_child_lost(key, FaultCause::SpawnTimeout, reason, now)
        }
        JobMsg::RemoteFailed(key, node, spawn, reason) => {
            state.unanswered.remove(&(key, spawn));
            if !state.is_current(key, node, spawn) {
                // About an instance that is no longer the current one: e.g. a node
                // that was cut off reports, late, the actor it stopped, after the
                // actor was placed again (there or elsewhere).
                tracing::debug!(actor = %key, node, spawn, "stale report ignored: {reason}");
                return Ok(());
            }
            state.remote.remove(&key);
            tracing::warn!(actor = %key, "remote actor failed: {reason}");
            state.core.on_child_failed(key, reason, now)
        }
        JobMsg::Rebalance => state.rebalance(&myself),
        JobMsg::NodeLost(node) => {
            let lost: Vec<ActorKey> = state.remote.iter().filter(|(_, (n, _))| *n == node).map(|(k, _)| *k).collect();
            let mut cmds = Vec::new();
            for key in lost {
                state.remote.remove(&key);
                cmds.extend(state.core.on_child_lost(key, FaultCause::NodeLost, format!("node {node} lost"), now));
            }
            cmds
        }
        JobMsg::Net(other) => {
            tracing::warn!(kind = other.kind(), "unexpected message at the job supervisor dropped");
            Vec::new()
        }
    };
    state.run(&myself, cmds).await;
    Ok(())
}

/// [`JobActor::handle_supervisor_evt`], inside the job's span.
async fn on_supervision(
    myself: ActorRef<JobMsg>,
    evt: SupervisionEvent,
    state: &mut JobState,
) -> Result<(), ActorProcessingErr> {
    // ractor's default would stop the supervisor on any child exit; here a
    // dead child goes to the restart policy instead.
    if state.stopping {
        return Ok(());
    }
    let (cell, reason) = match evt {
        SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
        SupervisionEvent::ActorTerminated(cell, _, reason) => {
            (cell, format!("stopped unexpectedly ({})", reason.unwrap_or_else(|| "no reason".into())))
        }
        _ => return Ok(()),
    };
    if state.moving.remove(&cell.get_id()) {
        return Ok(());
    }
    let Some(key) = state.children.remove(&cell.get_id()) else { return Ok(()) };
    tracing::warn!(actor = %key, step = state.core.global_step(), "actor failed: {reason}");
    let cmds = state.core.on_child_failed(key, reason, clock::now());
    state.run(&myself, cmds).await;
    Ok(())
}
