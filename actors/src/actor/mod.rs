//! The ractor actors of a job. Each owns one protocol core and carries out
//! its commands; none holds protocol rules of its own.
//!
//! ```text
//!                      JobActor (supervisor: JobCore)
//!          ┌──────────────┬───────────────┴──────────────┐
//!     ShardActor ×P   TrainerActor ×T            AggregatorActor ×A
//!     (Partitions)    (TrainerCore)              (AggregatorCore + CheckpointStore)
//!   Batch ─────────────▶ │ Gradient ranges ─────────────▶ │
//!                        │ ◀───────────────────── Params  │
//! ```
//!
//! The protocol is self-clocking: a trainer sends gradients for version
//! `s` only after it holds θ_s and prefetches at most one batch ahead, so at
//! most one step of gradients and one batch per partition are in flight.
//! That bounds every (unbounded) ractor mailbox without extra credits.
//!
//! Every actor logs inside a span named by its role with its index
//! (`shard{partition}`, `trainer{trainer}`, `aggregator{range}`), a child of
//! [`JobContext::span`] (which names the job), although each actor runs on a
//! task of its own; the work of one step runs in a `debug`-level `step` span
//! with the field `step`, which costs nothing unless debug logging is on. What a node counts (restarts, recoveries,
//! checkpoint durations) it learns from a [`JobObserver`].

mod aggregator;
mod job;
mod shard;
mod trainer;

pub use aggregator::AggregatorActor;
pub use job::{
    spawn_job, spawn_job_at, spawn_job_recording, CheckpointFailure, JobActor, JobArgs, JobHandle, JobOutcome,
    JobRunError, JobState, Progress, StepRecord, CHECKPOINT_FAILURES_KEPT, STEP_QUEUE,
};

use ractor::{Actor, ActorCell, SpawnErr};

use crate::protocol::{ActorKey, Role};
pub use shard::ShardActor;
pub use trainer::TrainerActor;

use std::sync::Arc;

use crate::checkpoint::{CheckpointCadence, CheckpointStore};
use crate::data::{Partitions, Table};
#[cfg(feature = "fault-injection")]
use crate::faults::FaultPlan;
use crate::model::Model;
use crate::net::Net;
use crate::optim::OptimizerSpec;
use crate::protocol::{FaultCause, JobId, JobPlan, Recovery};

/// Everything the actors of one job share. Immutable once built.
pub struct JobContext {
    /// The job.
    pub job: JobId,
    /// The supervisor's plan (assignment, ranges, schedule, restart policies).
    pub plan: JobPlan,
    /// The model.
    pub model: Arc<dyn Model>,
    /// The training rows.
    pub train: Arc<Table>,
    /// The fixed partitioning of the training rows.
    pub partitions: Arc<Partitions>,
    /// The optimizer.
    pub optimizer: OptimizerSpec,
    /// Seed of the initial parameters.
    pub init_seed: u64,
    /// Write a checkpoint every this many steps...
    pub checkpoint_every: u64,
    /// ...when this says so: at most one per `checkpoint_min_interval_ms`, decided once per
    /// step for every range of the job in this process (see [`CheckpointCadence`]).
    pub checkpoint_cadence: std::sync::Mutex<CheckpointCadence>,
    /// Where checkpoints go.
    pub store: Arc<CheckpointStore>,
    /// SHA-256 (hex) of everything that determines the math of the job.
    pub config_hash: String,
    /// Injected faults (only with the cargo feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub faults: FaultPlan,
    /// How actors reach each other.
    pub net: Arc<dyn Net>,
    /// Registry names of the job's actors.
    pub names: crate::net::LocalNet,
    /// When the job spans several nodes: where actors live and how to reach
    /// other nodes. `None` runs everything in this process.
    pub cluster: Option<Arc<dyn Cluster>>,
    /// Told of restarts, recoveries and checkpoints as they happen (a node's
    /// metrics and events). `None`: nobody listens.
    pub observer: Option<Arc<dyn JobObserver>>,
    /// The span the job's actors log in, naming the job (the `phalanx` crate
    /// opens `job{job}`, on a node `job{node, job}`): the supervisor logs in
    /// it, and each actor's own span is its child.
    pub span: tracing::Span,
}

/// What a job reports while it runs, for whoever runs it to count (the
/// `phalanx` crate feeds a node's metrics and events from it). Called on the
/// actors' own tasks: it must return at once (count, send on a channel),
/// never block. Every method does nothing by default.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::time::Duration;
/// use phalanx_actors::actor::JobObserver;
///
/// #[derive(Default)]
/// struct Checkpoints(AtomicU64);
///
/// impl JobObserver for Checkpoints {
///     fn checkpoint_saved(&self, _range: u32, _step: u64, _took: Duration) {
///         self.0.fetch_add(1, Ordering::Relaxed);
///     }
/// }
///
/// let seen = Checkpoints::default();
/// seen.checkpoint_saved(0, 10, Duration::from_millis(3));
/// seen.checkpoint_failed(0, 20, "disk full"); // not counted by this observer
/// assert_eq!(seen.0.load(Ordering::Relaxed), 1);
/// ```
pub trait JobObserver: Send + Sync + 'static {
    /// The supervisor restarts `actor`, lost for `cause`.
    fn restarted(&self, _actor: crate::protocol::ActorKey, _cause: FaultCause) {}
    /// Step `step` is the first applied after the failures of `recovery`.
    fn recovered(&self, _step: u64, _recovery: &Recovery) {}
    /// The aggregator of `range` wrote its checkpoint of `step` (written,
    /// fsynced, renamed, directory fsynced) in `took`.
    fn checkpoint_saved(&self, _range: u32, _step: u64, _took: std::time::Duration) {}
    /// The aggregator of `range` could not write its checkpoint of `step`.
    fn checkpoint_failed(&self, _range: u32, _step: u64, _reason: &str) {}
    /// The aggregator of `range`, in `generation`, applied a step: the range is
    /// now `params` at version `step` (the commit invariants are checked on these).
    fn committed(&self, _range: u32, _generation: u64, _step: u64, _params: &[f32]) {}
}

/// What the supervisor needs from a multi-node runtime. Implemented by the
/// `phalanx` crate over its QUIC transport; the actors never see quinn.
pub trait Cluster: Send + Sync + 'static {
    /// Whether this node may commit steps now: it holds the coordinator's lease
    /// (see `AggregatorCore::on_lease`). One process with no cluster always may.
    fn may_commit(&self) -> bool {
        true
    }
    /// The node that should host `key` now, or `None` for this node.
    fn remote_host(&self, key: ActorKey) -> Option<u32>;
    /// Ask `node` to spawn `key`; it answers with `JobMsg::RemoteStarted`
    /// or `JobMsg::RemoteFailed`, and reports later failures the same way,
    /// naming the request by `spawn` (unique per supervisor) so that a late
    /// report about an earlier instance is told apart.
    fn spawn_remote(&self, node: u32, key: ActorKey, generation: u64, restore: Option<u64>, spawn: u64);
    /// A checkpoint file was written (`bytes`: its contents, as written): copy it to another
    /// node so that the aggregators can be restored if this node dies. Called on the blocking
    /// task that wrote it.
    fn replicate(&self, path: &std::path::Path, bytes: Vec<u8>);
    /// How many other nodes keep a copy of each checkpoint file of aggregator `range` (0, the
    /// default: none). The same answer in every process of the job, as it depends on the
    /// placement alone: the checkpoint cadence counts the copies' cost with it.
    fn checkpoint_copies(&self, range: u32) -> u32 {
        let _ = range;
        0
    }
    /// Where `key` belongs in the current placement (`None`: this node).
    fn preferred_host(&self, key: ActorKey) -> Option<u32>;
    /// Ask `node` to stop `key` without reporting it as failed (it moves).
    fn stop_remote(&self, node: u32, key: ActorKey);
}

/// How long starting an actor waits for an older instance holding its name to stop; past it
/// the start fails (and the supervisor restarts it after its backoff).
pub const REPLACE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Spawn one actor of a job in this process, linked to `supervisor`, under
/// its registry name. Shared by the job supervisor and by node hosts. A key
/// that is not an actor of the job (a spawn request from the wire naming an
/// index out of range) fails to start instead of reaching the actor.
pub async fn spawn_actor(
    ctx: &Arc<JobContext>,
    supervisor: ActorCell,
    key: ActorKey,
    generation: u64,
    restore: Option<u64>,
) -> Result<ActorCell, SpawnErr> {
    if !ctx.plan.contains(key) {
        return Err(SpawnErr::StartupFailed(format!("{key} is not an actor of job {}", ctx.job).into()));
    }
    let name = ctx.names.name_of(key);
    let mut attempt = 0;
    loop {
        if let Some(old) = ractor::registry::where_is(name.clone()) {
            // An older instance holds the name: a previous coordinator's actor the host is still
            // stopping, or a failed one still shutting down. Being placed here again makes it
            // obsolete; wait (bounded) until it is gone instead of failing the start on its name.
            tracing::debug!(actor = %key, "waiting for the previous instance to stop");
            let _ = old.stop_and_wait(Some(format!("{key} is started again")), Some(REPLACE_WAIT)).await;
        }
        let started = spawn_role(ctx, supervisor.clone(), key, generation, restore, name.clone()).await;
        attempt += 1;
        match started {
            // Another start of this actor in this process took the name between the check
            // above and the spawn (a host starting it for the previous coordinator while the
            // supervisor taking over starts it too): that one is obsolete as well. Once more,
            // which stops it; a second loss of the race fails the start.
            Err(SpawnErr::ActorAlreadyRegistered(_)) if attempt < 2 => {
                tracing::debug!(actor = %key, "name taken by a concurrent start; starting again");
            }
            other => return other,
        }
    }
}

/// Spawns the actor of `key`'s role under `name`, linked to `supervisor`.
async fn spawn_role(
    ctx: &Arc<JobContext>,
    supervisor: ActorCell,
    key: ActorKey,
    generation: u64,
    restore: Option<u64>,
    name: ractor::ActorName,
) -> Result<ActorCell, SpawnErr> {
    let name = Some(name);
    let ctx = ctx.clone();
    Ok(match key.role {
        Role::Shard => Actor::spawn_linked(name, ShardActor, (ctx, key.index), supervisor).await?.0.get_cell(),
        Role::Trainer => {
            Actor::spawn_linked(name, TrainerActor, (ctx, key.index, generation), supervisor).await?.0.get_cell()
        }
        Role::Aggregator => {
            Actor::spawn_linked(name, AggregatorActor, (ctx, key.index, generation, restore), supervisor)
                .await?
                .0
                .get_cell()
        }
    })
}

/// Runs an actor's CPU-bound work (a trainer's gradients) so that it does not hold a tokio
/// worker the rest of the node needs: see [`offload`]. Handing a worker over costs a few
/// microseconds, more than a small model's whole step, so only gradients of models of at least
/// [`OFFLOAD_PARAMS`] parameters (`params`) are handed over. Messages that start no such work
/// (a θ range that does not complete θ, a batch) never come here.
pub(crate) fn compute<R>(params: usize, work: impl FnOnce() -> R) -> R {
    offload(params >= OFFLOAD_PARAMS, work)
}

/// Runs `work` off the tokio worker if it is `large`: on a multi-threaded runtime the worker
/// hands its other tasks (the node loop, heartbeats, QUIC) to another thread for the duration
/// ([`tokio::task::block_in_place`]); elsewhere (a current-thread runtime, outside tokio), or
/// if the work is small, it simply runs. The result and its bits are the same either way.
pub(crate) fn offload<R>(large: bool, work: impl FnOnce() -> R) -> R {
    if !large {
        return work();
    }
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Models from this many parameters compute their gradients off the tokio workers (see
/// [`compute`]): a gradient of this size takes on the order of a millisecond.
pub const OFFLOAD_PARAMS: usize = 65_536;

/// Aggregators whose range has this many values add gradients and step off the tokio workers
/// (see [`offload`]). Their work per value (one addition per gradient, the optimizer's few
/// operations) is far below a gradient's per parameter, so the bar is higher: at 524,288
/// values a sum and an SGD step take a few hundred microseconds. Below it the hand-over cost
/// more than it saved: ms/step 73,734 × 1 (one range of 73,734) 1.41 → 1.34, 1.2 M × 3 (ranges
/// of 393,218) 33.4 → 31.9 (medians of 6 and 5 alternating runs).
pub const OFFLOAD_RANGE_VALUES: usize = 8 * OFFLOAD_PARAMS;
