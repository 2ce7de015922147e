//! The training protocol: messages and the sans-IO cores that decide what
//! happens on every event.
//!
//! Each role has a core — [`AggregatorCore`], [`TrainerCore`], [`JobCore`] —
//! that is a plain state machine: feed it an event, get back the messages to
//! send (and, for the aggregator, checkpoints to write; for the supervisor,
//! actors to spawn and timers to set). The ractor actors in
//! [`crate::actor`] own one core each and only carry out its commands, so
//! every failure order can be replayed in a unit test without actors,
//! sockets or clocks.

mod aggregator;
pub mod delta;
mod ledger;
mod loss_series;
mod msg;
pub mod reduce;
mod schedule;
mod shard;
mod supervision;
mod trainer;

pub use aggregator::{AggCommand, AggStats, AggregatorCore, AggregatorSetup, RangeState, Verdict};
pub use ledger::{ClosedEpochs, Ledger};
pub use loss_series::{LossSeries, LOSS_POINTS};
pub use msg::{
    ActorKey, Batch, BatchTargets, DeltaBase, Gradient, JobId, Msg, Params, ParamsDelta, Role, SharedValues,
};
pub use schedule::Schedule;
pub use shard::{ShardCore, ShardError, MAX_BATCHES_PER_REQUEST};
pub use supervision::{FaultCause, FaultRecord, JobCommand, JobCore, JobError, JobPlan, Recovery, RestartPolicy};
pub use trainer::{TrainerCommand, TrainerCore, TrainerError, TrainerSetup, BATCH_WINDOW, STALL_TICKS};

use serde::{Deserialize, Serialize};

/// Where a message goes. The [`crate::net::Net`] in use maps it to an actor,
/// local or remote.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Addr {
    /// The shard of a partition.
    Shard(u32),
    /// A trainer.
    Trainer(u32),
    /// Every trainer of the job.
    AllTrainers,
    /// The aggregator of a range.
    Aggregator(u32),
    /// The job's supervisor.
    Job,
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
