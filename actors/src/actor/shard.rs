//! The shard actor: serves the batches of one partition.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::JobContext;
use crate::net::ActorMsg;
use crate::protocol::{Addr, Msg, ShardCore};

/// Serves partition `p`'s batches by carrying out a [`ShardCore`].
pub struct ShardActor;

/// State of a shard: its core.
pub struct ShardState {
    ctx: Arc<JobContext>,
    core: ShardCore,
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
        let core = ShardCore::new(ctx.job, partition, ctx.plan.schedule, &ctx.partitions, ctx.train.clone())?;
        Ok(ShardState { ctx, core })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ActorMsg>,
        msg: ActorMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        let ActorMsg::Net(Msg::BatchRequest { job, partition, step, count, trainer }) = msg else {
            tracing::warn!(shard = state.core.partition(), ?msg, "unexpected message dropped");
            return Ok(());
        };
        let steps = state.core.steps(job, partition, step, count);
        if steps.is_empty() {
            tracing::warn!(
                shard = state.core.partition(),
                job,
                partition,
                step,
                count,
                "batch request that is not for this shard dropped"
            );
            return Ok(());
        }
        let mut batches = Vec::with_capacity(steps.clone().count());
        for s in steps {
            #[cfg(feature = "fault-injection")]
            state.ctx.faults.maybe_panic(crate::protocol::ActorKey::shard(partition), s);
            batches.push(state.core.batch(s)?);
        }
        state.ctx.net.send(Addr::Trainer(trainer), Msg::Batches(batches));
        Ok(())
    }
}
