//! The shard's core (sans-IO): cuts the batches of one partition.
//!
//! A batch is a pure function of `(seed, partition, epoch, step)` (see
//! [`crate::data::Partitions`]), so a restarted or moved shard serves
//! exactly what its predecessor would have served.

use std::sync::Arc;

use crate::data::{DataError, OwnedTargets, PartitionFeed, Partitions, Table};

use super::msg::{Batch, BatchTargets, JobId};
use super::Schedule;

/// The most batches one request may ask for: bounds a reply's size.
pub const MAX_BATCHES_PER_REQUEST: u32 = 64;

/// Serves one partition's batches.
pub struct ShardCore {
    job: JobId,
    partition: u32,
    schedule: Schedule,
    table: Arc<Table>,
    feed: PartitionFeed,
}

/// A batch the shard could not cut.
#[derive(Debug, thiserror::Error)]
#[error("shard {partition} at step {step}: {source}")]
pub struct ShardError {
    /// The partition.
    pub partition: u32,
    /// The step.
    pub step: u64,
    /// Why.
    pub source: DataError,
}

impl ShardCore {
    /// The shard of `partition`.
    pub fn new(
        job: JobId,
        partition: u32,
        schedule: Schedule,
        partitions: &Partitions,
        table: Arc<Table>,
    ) -> Result<Self, ShardError> {
        let feed = partitions.feed(partition).map_err(|source| ShardError { partition, step: 0, source })?;
        Ok(Self { job, partition, schedule, table, feed })
    }

    /// The partition served.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The steps a request for `count` batches from `step` covers, after
    /// capping at the job's end and [`MAX_BATCHES_PER_REQUEST`]; empty when
    /// the request is not for this shard's job and partition.
    pub fn steps(&self, job: JobId, partition: u32, step: u64, count: u32) -> std::ops::Range<u64> {
        let total = self.schedule.total_steps();
        if job != self.job || partition != self.partition || step >= total {
            return 0..0;
        }
        step..(step + u64::from(count.min(MAX_BATCHES_PER_REQUEST))).min(total)
    }

    /// The batch of global step `step`.
    pub fn batch(&mut self, step: u64) -> Result<Batch, ShardError> {
        let partition = self.partition;
        let err = |source| ShardError { partition, step, source };
        let (epoch, k) = self.schedule.locate(step);
        let rows = self.feed.batch(epoch, k).map_err(err)?;
        let (x, y) = self.table.rows(rows).map_err(err)?;
        let features = x.ncols() as u32;
        let targets = match y {
            OwnedTargets::Real(v) => BatchTargets::Real(v),
            OwnedTargets::Class(v) => BatchTargets::Class(v),
        };
        let x = x.into_iter().collect();
        Ok(Batch { job: self.job, partition, step, features, x, targets })
    }
}
