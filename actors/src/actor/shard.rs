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
    /// `shard{partition}`, under the job's span.
    span: tracing::Span,
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
        let span = tracing::info_span!(parent: &ctx.span, "shard", partition);
        let core = span
            .in_scope(|| ShardCore::new(ctx.job, partition, ctx.plan.schedule, &ctx.partitions, ctx.train.clone()))?;
        Ok(ShardState { ctx, core, span })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ActorMsg>,
        msg: ActorMsg,
        state: &mut ShardState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        span.in_scope(|| state.on_message(msg))
    }
}

impl ShardState {
    fn on_message(&mut self, msg: ActorMsg) -> Result<(), ActorProcessingErr> {
        let ActorMsg::Net(Msg::BatchRequest { job, partition, step, count, trainer }) = msg else {
            tracing::warn!(shard = self.core.partition(), ?msg, "unexpected message dropped");
            return Ok(());
        };
        let steps = self.core.steps(job, partition, step, count);
        if steps.is_empty() {
            tracing::warn!(
                shard = self.core.partition(),
                job,
                partition,
                step,
                count,
                "batch request that is not for this shard dropped"
            );
            return Ok(());
        }
        let _step = tracing::debug_span!("step", step, count).entered();
        let mut batches = Vec::with_capacity(steps.clone().count());
        for s in steps {
            #[cfg(feature = "fault-injection")]
            self.ctx.faults.maybe_panic(crate::protocol::ActorKey::shard(partition), s);
            batches.push(self.core.batch(s)?);
        }
        self.ctx.net.send(Addr::Trainer(trainer), Msg::Batches(batches));
        Ok(())
    }
}
