//! The aggregator actor: carries out an [`AggregatorCore`] and makes its
//! checkpoints durable.
//!
//! **Checkpoints persist in the background** (as CheckFreq does): at a checkpoint step the
//! actor snapshots its range in memory (a copy of the parameters, optimizer state and
//! ledger), sends the new parameters to the trainers and hands the snapshot to a blocking
//! task that writes, fsyncs, renames, replicates and prunes, then reports `CheckpointSaved`
//! (or `CheckpointFailed`) to the supervisor and wakes the actor. Training goes on meanwhile:
//! only the step that would ask for the next checkpoint waits until this one is done
//! ([`AggregatorCore::on_checkpoint_done`]), so one snapshot at most is being persisted per
//! range (memory: one extra copy of it; on a cluster, for as long as the copies to other nodes
//! are in flight, the file's bytes too, encoded once and shared by every copy) and a write that takes less than `checkpoint_every`
//! steps costs no step time. An orderly stop waits for the write in progress (`post_stop`),
//! so a job that stops at step `s` has every checkpoint it started durable or reported
//! failed; a crash can lose the one being written, and recovery then rolls back to the one
//! before (the same bits, a few more steps replayed). A checkpoint only counts once renamed
//! into place (the store's rule), so a rollback never sees one that is still being written.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::JobContext;
use crate::checkpoint::RangeCheckpoint;
use crate::net::ActorMsg;
use crate::protocol::{
    ActorKey, Addr, AggCommand, AggregatorCore, AggregatorSetup, Gradient, Msg, RangeState, Verdict,
};

use crate::checkpoint::CHECKPOINTS_KEPT;

/// Owns one range of θ and applies steps.
pub struct AggregatorActor;

/// An aggregator's state: its core.
pub struct AggregatorState {
    ctx: Arc<JobContext>,
    key: ActorKey,
    core: AggregatorCore,
    /// A look-again at the lease is scheduled.
    retry_due: bool,
    /// `aggregator{range}`, under the job's span.
    span: tracing::Span,
    /// The checkpoint being persisted in the background, if any.
    persisting: Option<Persisting>,
    /// Checkpoints this actor started to persist (pruning runs every few of them).
    saves: u64,
    /// This actor: woken by the background persist when it is done, and by itself to look
    /// at the lease again.
    myself: ActorRef<ActorMsg>,
}

/// A checkpoint being persisted by a blocking task: its step, and where the task tells the
/// outcome (an error only for what is not an I/O failure — those are reported to the
/// supervisor, and training goes on from the previous checkpoint).
struct Persisting {
    step: u64,
    done: std::sync::mpsc::Receiver<Result<(), String>>,
}

impl Persisting {
    /// Waits until the checkpoint is durable (or failed); if the write is still going, off the
    /// tokio worker (an fsync may take long, and a small range's step runs on the worker: see
    /// `super::offload`).
    fn wait(self) -> Result<(), ActorProcessingErr> {
        use std::sync::mpsc::TryRecvError;
        let received = match self.done.try_recv() {
            Ok(result) => Ok(result),
            Err(TryRecvError::Empty) => super::offload(true, || self.done.recv()).map_err(|_| ()),
            Err(TryRecvError::Disconnected) => Err(()),
        };
        received.map_err(|()| self.lost())?.map_err(Into::into)
    }

    fn lost(&self) -> ActorProcessingErr {
        format!("the task persisting the checkpoint of step {} ended without a word", self.step).into()
    }
}

/// Write one range checkpoint (fsync and rename), replicate it, prune old ones, and tell the
/// supervisor: the body of a background persist.
fn persist(ctx: &JobContext, range: u32, ckpt: RangeCheckpoint, prune: bool) -> Result<(), String> {
    let started = std::time::Instant::now();
    let result = persist_timed(ctx, range, ckpt, prune);
    // What the cadence spaces checkpoints by: the whole write, pruning included, and the copies
    // on other nodes, counted on average over the job's ranges so that every process counts alike.
    let copies = match &ctx.cluster {
        Some(cluster) if !ctx.plan.ranges.is_empty() => {
            let all: u32 = (0..ctx.plan.ranges.len() as u32).map(|r| cluster.checkpoint_copies(r)).sum();
            f64::from(all) / ctx.plan.ranges.len() as f64
        }
        _ => 0.0,
    };
    ctx.checkpoint_cadence
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .record_write(started.elapsed(), copies);
    result
}

/// The body of [`persist`].
fn persist_timed(ctx: &JobContext, range: u32, ckpt: RangeCheckpoint, prune: bool) -> Result<(), String> {
    let step = ckpt.step;
    let started = std::time::Instant::now();
    // On a cluster the file's bytes are kept for the copies to other nodes.
    let saved = match ctx.cluster {
        Some(_) => ctx.store.save_keeping_bytes(&ckpt).map(|(path, bytes)| (path, Some(bytes))),
        None => ctx.store.save(&ckpt).map(|path| (path, None)),
    };
    let took = started.elapsed();
    if let (Some(observer), Err(e)) = (&ctx.observer, &saved) {
        observer.checkpoint_failed(range, step, &e.to_string());
    }
    let (path, bytes) = match saved {
        Ok(saved) => saved,
        Err(e @ crate::checkpoint::CheckpointError::Io { .. }) => {
            // A checkpoint that cannot be written (a full disk, an I/O error) does not
            // stop training: the previous complete checkpoint stays the rollback point
            // and the next interval tries again. Failing the aggregator instead would
            // roll back, replay to this step and fail again until the job escalates.
            tracing::error!(range, step, "checkpoint not saved; training goes on from the previous one: {e}");
            let reason = e.to_string();
            ctx.net.send(Addr::Job, Msg::CheckpointFailed { job: ctx.job, range, step, reason });
            return Ok(());
        }
        Err(e) => return Err(format!("aggregator {range}: checkpoint of step {step}: {e}")),
    };
    tracing::debug!(range, step, path = %path.display(), took_us = took.as_micros() as u64, "checkpoint saved");
    if let Some(observer) = &ctx.observer {
        observer.checkpoint_saved(range, step, took);
    }
    if let (Some(cluster), Some(bytes)) = (&ctx.cluster, bytes) {
        cluster.replicate(&path, bytes);
    }
    // Pruning verifies the files it keeps (those this process has not verified yet), so it
    // runs once per CHECKPOINTS_KEPT checkpoints (and at the end), not on every save.
    if prune {
        // Whole checkpoints, and this range's own files (on a node that holds no whole one).
        let pruned = ctx
            .store
            .prune(&ctx.config_hash, ckpt.total_len, CHECKPOINTS_KEPT)
            .and_then(|_| ctx.store.prune_range(ckpt.total_len, CHECKPOINTS_KEPT, ckpt.offset, ckpt.params.len()));
        if let Err(e) = pruned {
            tracing::warn!(range, "pruning old checkpoints failed: {e}");
        }
    }
    ctx.net.send(Addr::Job, Msg::CheckpointSaved { job: ctx.job, range, step });
    Ok(())
}

fn setup(ctx: &JobContext, range: u32) -> AggregatorSetup {
    AggregatorSetup::for_range(
        ctx.job,
        range,
        &ctx.plan.ranges,
        ctx.partitions.sizes(),
        ctx.plan.schedule,
        ctx.checkpoint_every,
        ctx.optimizer,
    )
}

/// The state of `range` at `restore` (a checkpointed step), or fresh.
/// Step 0 without a checkpoint file is the deterministic initial state.
fn initial_state(ctx: &JobContext, range: u32, restore: Option<u64>) -> Result<(RangeState, bool), ActorProcessingErr> {
    let (offset, len) = ctx.plan.ranges[range as usize];
    let total = ctx.model.num_params();
    if let Some(step) = restore {
        match ctx.store.load_range(step, &ctx.config_hash, total, offset, len) {
            Ok(c) => {
                // A copy may have come from another node: its optimizer state must
                // fit this job's optimizer before the core trusts it.
                let names = ctx.optimizer.slot_names();
                let slots_fit = c.optimizer_slots.len() == names.len()
                    && c.optimizer_slots.iter().zip(names).all(|((n, v), want)| n == want && v.len() == len);
                if c.params.len() != len || !slots_fit {
                    return Err(format!(
                        "aggregator {range}: checkpoint of step {step} does not fit the range [{offset}, +{len}) \
                         and the optimizer's slots {names:?}"
                    )
                    .into());
                }
                let state = RangeState {
                    step: c.step,
                    params: c.params.into(),
                    optimizer: crate::optim::OptimizerState {
                        t: c.optimizer_t,
                        slots: c.optimizer_slots.into_iter().map(|(_, v)| v).collect(),
                    },
                    ledger: c.ledger,
                };
                return Ok((state, false));
            }
            Err(e) if step > 0 => {
                return Err(format!("aggregator {range}: cannot restore step {step}: {e}").into());
            }
            Err(e) => tracing::debug!(range, "no checkpoint of step 0 ({e}); starting fresh"),
        }
    }
    let params = ctx.model.init_params(ctx.init_seed)[offset..offset + len].to_vec();
    let state = RangeState {
        step: 0,
        params: params.into(),
        optimizer: ctx.optimizer.new_state(len),
        ledger: Default::default(),
    };
    Ok((state, true))
}

/// How often an aggregator whose step waits for the coordinator's lease looks again.
const LEASE_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

impl AggregatorState {
    fn may_commit(&self) -> bool {
        self.ctx.cluster.as_ref().is_none_or(|c| c.may_commit())
    }

    /// Run `cmds` of a call that may have applied a step (`before`: the step before it):
    /// tell the observer of the commit, and look again later while a step waits for the lease.
    fn after_step(&mut self, before: u64, cmds: Vec<AggCommand>) -> Result<(), ActorProcessingErr> {
        if self.core.step() > before {
            // Every applied step times the checkpoint cadence (its step time is a median of
            // steps, so a slow start or a stall does not shorten the stride).
            self.ctx
                .checkpoint_cadence
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .observe(self.core.step(), crate::clock::now());
            if let Some(observer) = &self.ctx.observer {
                let state = self.core.state();
                observer.committed(self.key.index, self.core.generation(), state.step, &state.params);
            }
        }
        self.run(cmds)?;
        // One look-again at a time, however many messages arrive meanwhile.
        if self.core.waiting_for_lease() && !self.retry_due {
            self.retry_due = true;
            self.myself.send_after(LEASE_RETRY, || ActorMsg::Tick);
        }
        Ok(())
    }

    fn run(&mut self, cmds: Vec<AggCommand>) -> Result<(), ActorProcessingErr> {
        let mut queue = std::collections::VecDeque::from(cmds);
        while let Some(cmd) = queue.pop_front() {
            match cmd {
                AggCommand::Send(to, msg) => self.ctx.net.send(to, msg),
                AggCommand::Checkpoint { step } => {
                    let last = self.core.is_finished();
                    let taken = self
                        .ctx
                        .checkpoint_cadence
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .decide(step, last, crate::clock::now());
                    if taken {
                        self.checkpoint(step)?;
                    } else {
                        // Sooner than checkpoint_min_interval_ms after the last one (every
                        // range of the job skips it alike): done without a write.
                        tracing::trace!(
                            range = self.key.index,
                            step,
                            "checkpoint step skipped: the last one is recent"
                        );
                        queue.extend(self.core.on_checkpoint_done());
                    }
                }
            }
        }
        Ok(())
    }

    /// Snapshot the range at `step` and persist it in the background (see the module docs):
    /// the previous checkpoint, if still being written, is waited for first, and the job's
    /// last checkpoint is waited for before anything else goes out.
    fn checkpoint(&mut self, step: u64) -> Result<(), ActorProcessingErr> {
        self.flush()?;
        let state = self.core.state();
        debug_assert_eq!(state.step, step);
        let names = self.ctx.optimizer.slot_names();
        let ckpt = RangeCheckpoint {
            step,
            config_hash: self.ctx.config_hash.clone(),
            total_len: self.ctx.model.num_params(),
            offset: self.core.setup().offset,
            params: state.params.to_vec(),
            optimizer_t: state.optimizer.t,
            optimizer_slots: names.iter().map(|n| n.to_string()).zip(state.optimizer.slots.iter().cloned()).collect(),
            ledger: state.ledger.clone(),
            kernel: Some(crate::model::kernel::fingerprint()),
        };
        let (range, finished) = (self.key.index, self.core.is_finished());
        // Counted, not derived from the step: with skipped checkpoint steps no arithmetic on
        // steps says which save is every CHECKPOINTS_KEPT-th.
        self.saves = self.saves.wrapping_add(1);
        let prune = finished || self.saves % CHECKPOINTS_KEPT as u64 == 0;
        let (ctx, span, myself) = (self.ctx.clone(), self.span.clone(), self.myself.clone());
        let (tx, done) = std::sync::mpsc::sync_channel(1);
        let work = move || {
            let result = span.in_scope(|| persist(&ctx, range, ckpt, prune));
            let _ = tx.send(result);
            // The actor may be gone (stopped, rolled back and replaced): then nobody waits.
            let _ = myself.send_message(ActorMsg::Tick);
        };
        // A blocking task where there is a runtime (under a paused clock it holds virtual
        // time still while it writes, as the inline write did); a thread elsewhere.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(work)),
            Err(_) => drop(std::thread::spawn(work)),
        }
        self.persisting = Some(Persisting { step, done });
        if finished {
            // The final values go to the supervisor only once the last checkpoint is done.
            self.flush()?;
            self.core.on_checkpoint_done();
        }
        Ok(())
    }

    /// If the checkpoint being persisted is done, tell the core (which may apply a waiting step).
    fn poll_checkpoint(&mut self) -> Result<Vec<AggCommand>, ActorProcessingErr> {
        let Some(p) = &self.persisting else { return Ok(Vec::new()) };
        let result = match p.done.try_recv() {
            Ok(result) => result,
            Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(Vec::new()),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return Err(p.lost()),
        };
        self.persisting = None;
        result?;
        Ok(self.core.on_checkpoint_done())
    }

    /// What a step waiting for its checkpoint or the lease may do now: the checkpoint's news
    /// first, then the lease as it stands.
    fn resume_waiting_step(&mut self) -> Result<Vec<AggCommand>, ActorProcessingErr> {
        let mut cmds = self.poll_checkpoint()?;
        cmds.extend(self.core.on_lease(self.may_commit()));
        Ok(cmds)
    }

    /// Wait for the checkpoint being persisted, if any.
    fn flush(&mut self) -> Result<(), ActorProcessingErr> {
        match self.persisting.take() {
            Some(p) => p.wait(),
            None => Ok(()),
        }
    }

    fn on_gradient(&mut self, g: Gradient) -> Result<(), ActorProcessingErr> {
        let _step = tracing::debug_span!("step", step = g.step, partition = g.partition).entered();
        let before = self.core.step();
        let cmds = self.resume_waiting_step()?;
        self.after_step(before, cmds)?;
        #[cfg(feature = "fault-injection")]
        if g.step == self.core.step() && g.generation == self.core.generation() {
            self.ctx.faults.maybe_panic(self.key, g.step);
        }
        let (partition, step) = (g.partition, g.step);
        let before = self.core.step();
        let (verdict, cmds) = self.core.on_gradient(g);
        match &verdict {
            Verdict::Malformed(reason) => {
                tracing::warn!(range = self.key.index, partition, step, "gradient rejected: {reason}")
            }
            Verdict::Accepted | Verdict::Applied => {}
            other => tracing::trace!(range = self.key.index, partition, step, ?other, "gradient ignored"),
        }
        self.after_step(before, cmds)
    }

    fn restart_core(&mut self, generation: u64, restore: Option<u64>) -> Result<(), ActorProcessingErr> {
        let (state, fresh) = initial_state(&self.ctx, self.key.index, restore)?;
        self.core = AggregatorCore::new(setup(&self.ctx, self.key.index), generation, state);
        let cmds = self.core.start(fresh);
        self.run(cmds)
    }
}

impl Actor for AggregatorActor {
    type Msg = ActorMsg;
    type State = AggregatorState;
    type Arguments = (Arc<JobContext>, u32, u64, Option<u64>);

    async fn pre_start(
        &self,
        myself: ActorRef<ActorMsg>,
        (ctx, range, generation, restore): Self::Arguments,
    ) -> Result<AggregatorState, ActorProcessingErr> {
        let span = tracing::info_span!(parent: &ctx.span, "aggregator", range);
        let (state, fresh) = span.in_scope(|| initial_state(&ctx, range, restore))?;
        let mut core = AggregatorCore::new(setup(&ctx, range), generation, state);
        let cmds = core.start(fresh);
        let mut state = AggregatorState {
            ctx,
            key: ActorKey::aggregator(range),
            core,
            retry_due: false,
            span: span.clone(),
            persisting: None,
            saves: 0,
            myself,
        };
        span.in_scope(|| state.run(cmds))?;
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<ActorMsg>,
        msg: ActorMsg,
        state: &mut AggregatorState,
    ) -> Result<(), ActorProcessingErr> {
        let span = state.span.clone();
        span.in_scope(|| state.on_message(msg))
    }

    /// An orderly stop (the job ended or failed, a rollback replaces this actor, the range
    /// moves) waits for the checkpoint being written: every checkpoint this aggregator started
    /// is then durable or reported failed, so what a stopped job leaves on disk does not
    /// depend on how fast the disk was. Only a crash can lose the one being written.
    async fn post_stop(
        &self,
        _myself: ActorRef<ActorMsg>,
        state: &mut AggregatorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Err(e) = state.flush() {
            tracing::warn!(range = state.key.index, "the checkpoint being written when stopping: {e}");
        }
        Ok(())
    }
}

impl AggregatorState {
    /// Whether this aggregator's work per message (a gradient range added, an optimizer step:
    /// proportional to its range's length) leaves the tokio worker (see
    /// [`super::OFFLOAD_RANGE_VALUES`]).
    fn large(&self) -> bool {
        self.ctx.plan.ranges[self.key.index as usize].1 >= super::OFFLOAD_RANGE_VALUES
    }

    fn on_message(&mut self, msg: ActorMsg) -> Result<(), ActorProcessingErr> {
        let msg = match msg {
            ActorMsg::Net(msg) => msg,
            // A step waits for the lease or for a checkpoint being written: look again (a large
            // range's step runs off the tokio workers).
            ActorMsg::Tick => {
                self.retry_due = false;
                let before = self.core.step();
                return super::offload(self.large(), || {
                    let cmds = self.resume_waiting_step()?;
                    self.after_step(before, cmds)
                });
            }
        };
        match msg {
            // A gradient may complete a step: a large range's sum and step run off the tokio workers.
            Msg::Gradient(g) => super::offload(self.large(), || self.on_gradient(g)),
            Msg::Gradients(gs) => super::offload(self.large(), || gs.into_iter().try_for_each(|g| self.on_gradient(g))),
            Msg::ParamsRequest { trainer, step, .. } => {
                let cmds = self.core.on_params_request(trainer, step);
                self.run(cmds)
            }
            Msg::Rollback { generation, step, .. } => {
                if generation <= self.core.generation() {
                    return Ok(());
                }
                tracing::info!(range = self.key.index, generation, step, "rolling back to checkpoint");
                self.restart_core(generation, Some(step))
            }
            other => {
                tracing::warn!(range = self.key.index, kind = other.kind(), "unexpected message dropped");
                Ok(())
            }
        }
    }
}
