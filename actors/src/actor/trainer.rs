//! The trainer actor: carries out a [`TrainerCore`].

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::JobContext;
use crate::net::ActorMsg;
use std::collections::BTreeMap;

use crate::protocol::{ActorKey, Addr, Gradient, Msg, TrainerCommand, TrainerCore, TrainerSetup};

/// How often a trainer checks for a stall (see [`crate::protocol::STALL_TICKS`]).
pub const TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// Computes gradients for the partitions it owns.
pub struct TrainerActor;

/// A trainer's state: its core.
pub struct TrainerState {
    ctx: Arc<JobContext>,
    key: ActorKey,
    core: TrainerCore,
    /// `trainer{trainer}`, under the job's span.
    span: tracing::Span,
}

impl TrainerState {
    /// Carry out commands. Gradient ranges for one aggregator produced in one
    /// go are sent as a single message: with many partitions per trainer that
    /// is most of the messages of a step.
    fn run(&mut self, cmds: Vec<TrainerCommand>) -> Result<(), ActorProcessingErr> {
        let mut queue = std::collections::VecDeque::from(cmds);
        let mut gradients: BTreeMap<u32, Vec<Gradient>> = BTreeMap::new();
        while let Some(cmd) = queue.pop_front() {
            match cmd {
                TrainerCommand::Send(Addr::Aggregator(r), Msg::Gradient(g)) => gradients.entry(r).or_default().push(g),
                TrainerCommand::Send(to, msg) => self.ctx.net.send(to, msg),
                TrainerCommand::Compute { step, partition } => {
                    // The node computed: its first partition and how many it covers.
                    let partitions = self.core.node_of(partition).map_or(1, |node| node.len());
                    let _step = tracing::debug_span!("step", step, partition, partitions).entered();
                    #[cfg(feature = "fault-injection")]
                    self.ctx.faults.maybe_panic(self.key, step);
                    // Only the maths leaves the tokio worker (see `super::compute`): a message
                    // that computes nothing (most θ ranges and batches) is handled in place.
                    let core = &mut self.core;
                    queue.extend(super::compute(self.ctx.model.num_params(), || core.compute(step, partition))?);
                }
            }
        }
        for (r, gs) in gradients {
            self.ctx.net.send(Addr::Aggregator(r), Msg::Gradients(gs));
        }
        Ok(())
    }
}

impl Actor for TrainerActor {
    type Msg = ActorMsg;
    type State = TrainerState;
    type Arguments = (Arc<JobContext>, u32, u64);

    async fn pre_start(
        &self,
        myself: ActorRef<ActorMsg>,
        (ctx, index, generation): Self::Arguments,
    ) -> Result<TrainerState, ActorProcessingErr> {
        let setup = TrainerSetup {
            job: ctx.job,
            index,
            ranges: ctx.plan.ranges.clone(),
            schedule: ctx.plan.schedule,
            features: ctx.train.features(),
            partitions: ctx.plan.assignment.len() as u32,
        };
        let span = tracing::info_span!(parent: &ctx.span, "trainer", trainer = index);
        let core = TrainerCore::new(setup, ctx.model.clone(), generation, ctx.plan.partitions_of(index));
        let mut state = TrainerState { ctx, key: ActorKey::trainer(index), core, span: span.clone() };
        let start = state.core.start();
        span.in_scope(|| state.run(start))?;
        // The timer task ends with the actor (its sends fail once it is gone).
        myself.send_interval(TICK, || ActorMsg::Tick);
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<ActorMsg>,
        msg: ActorMsg,
        state: &mut TrainerState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        span.in_scope(|| state.on_message(msg))
    }
}

impl TrainerState {
    fn on_message(&mut self, msg: ActorMsg) -> Result<(), ActorProcessingErr> {
        let msg = match msg {
            ActorMsg::Tick => {
                let cmds = self.core.on_tick();
                return self.run(cmds);
            }
            ActorMsg::Net(msg) => msg,
        };
        // Gradients are computed in `run` (TrainerCommand::Compute), off the tokio workers.
        let cmds = match msg {
            Msg::Params(p) => self.core.on_params(p),
            Msg::Batches(b) => self.core.on_batches(b),
            Msg::ShardReady { partition, .. } => self.core.on_shard_ready(partition),
            Msg::Assign { generation, partitions, .. } => self.core.on_assign(generation, partitions),
            other => {
                tracing::warn!(trainer = self.key.index, kind = other.kind(), "unexpected message dropped");
                Vec::new()
            }
        };
        self.run(cmds)
    }
}
