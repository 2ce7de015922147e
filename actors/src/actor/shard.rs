//! The shard actor: serves the batches of one partition.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::JobContext;
use crate::data::{OwnedTargets, PartitionFeed};
use crate::net::ActorMsg;
use crate::protocol::{ActorKey, Addr, Batch, BatchTargets, Msg};

/// The most batches one request may ask for: bounds the reply's size.
const MAX_BATCHES_PER_REQUEST: u32 = 64;

/// Serves partition `p`'s batches; a pure function of `(seed, p, epoch,
/// step)`, so a restarted shard replays exactly what its predecessor would
/// have served.
pub struct ShardActor;

/// State of a shard: its partition and the permutation of the current epoch.
pub struct ShardState {
    ctx: Arc<JobContext>,
    partition: u32,
    feed: PartitionFeed,
}

impl Actor for ShardActor {
    type Msg = ActorMsg;
    type State = ShardState;
    type Arguments = (Arc<JobContext>, u32);

    async fn pre_start(
        &self,
        _myself: ActorRef<ActorMsg>,
        (ctx, partition): Self::Arguments,
    ) -> Result<ShardState, ActorProcessingErr> {
        let feed = ctx.partitions.feed(partition).map_err(|e| format!("shard {partition}: {e}"))?;
        Ok(ShardState { ctx, partition, feed })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ActorMsg>,
        msg: ActorMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        let ActorMsg::Net(Msg::BatchRequest { job, partition, step, count, trainer }) = msg else {
            tracing::warn!(shard = state.partition, ?msg, "unexpected message dropped");
            return Ok(());
        };
        let ctx = state.ctx.clone();
        let total = ctx.plan.schedule.total_steps();
        if job != ctx.job || partition != state.partition || step >= total || count == 0 {
            tracing::warn!(
                shard = state.partition,
                job,
                partition,
                step,
                count,
                "batch request that is not for this shard dropped"
            );
            return Ok(());
        }
        let end = (step + u64::from(count.min(MAX_BATCHES_PER_REQUEST))).min(total);
        let mut batches = Vec::with_capacity((end - step) as usize);
        for s in step..end {
            ctx.faults.maybe_panic(ActorKey::shard(partition), s);
            let (epoch, k) = ctx.plan.schedule.locate(s);
            let rows = state.feed.batch(epoch, k).map_err(|e| format!("shard {partition} at step {s}: {e}"))?;
            let (x, y) = ctx.train.rows(rows).map_err(|e| format!("shard {partition} at step {s}: {e}"))?;
            let features = x.ncols() as u32;
            let targets = match y {
                OwnedTargets::Real(v) => BatchTargets::Real(v),
                OwnedTargets::Class(v) => BatchTargets::Class(v),
            };
            let x = x.into_iter().collect();
            batches.push(Batch { job, partition, step: s, features, x, targets });
        }
        ctx.net.send(Addr::Trainer(trainer), Msg::Batches(batches));
        Ok(())
    }
}
