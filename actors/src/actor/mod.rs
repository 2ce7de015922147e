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

mod aggregator;
mod job;
mod shard;
mod trainer;

pub use aggregator::AggregatorActor;
pub use job::{spawn_job, JobActor, JobArgs, JobHandle, JobOutcome, JobRunError, JobState, Progress};
pub use shard::ShardActor;
pub use trainer::TrainerActor;

use std::sync::Arc;

use crate::checkpoint::CheckpointStore;
use crate::data::{Partitions, Table};
use crate::faults::FaultPlan;
use crate::model::Model;
use crate::net::Net;
use crate::optim::OptimizerSpec;
use crate::protocol::{JobId, JobPlan};

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
    /// Write a checkpoint every this many steps.
    pub checkpoint_every: u64,
    /// Where checkpoints go.
    pub store: Arc<CheckpointStore>,
    /// SHA-256 (hex) of everything that determines the math of the job.
    pub config_hash: String,
    /// Injected faults.
    pub faults: FaultPlan,
    /// How actors reach each other.
    pub net: Arc<dyn Net>,
    /// Registry names of the job's actors.
    pub names: crate::net::LocalNet,
}
