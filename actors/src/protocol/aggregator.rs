//! The aggregator's protocol core (sans-IO).
//!
//! One aggregator owns the contiguous range `[offset, offset + len)` of the
//! flat parameter vector. At version `step` it waits for the range of the
//! gradient of every partition — one partition's gradient, or a trainer's
//! partial sum over a node of the reduction tree whose partitions it owns —
//! and adds them **in the fixed tree order** of [`super::reduce`] (so the sum
//! does not depend on which trainer computed what or answered first), divides
//! by the number of samples, applies the optimizer and publishes version
//! `step + 1`.
//!
//! ```text
//!   Gradient(step, span) ──▶ [ Reducer: siblings added as they come ] ──root complete──▶ optimizer ─▶ Publish(step+1)
//!        │ covered already (duplicate) / stale / future / other generation
//!        └──────────────▶ dropped (counted)
//! ```
//!
//! Because a contribution is keyed by `(generation, step, span)` and one a held
//! node covers is ignored, replays after a failure are idempotent, and the
//! per-epoch ledger counts every sample exactly once (finished epochs are
//! folded into counts, see [`Ledger`], so it does not grow with the job).

use std::sync::Arc;

use crate::optim::{OptimizerSpec, OptimizerState};

use super::ledger::Ledger;
use super::msg::{DeltaBase, Gradient, JobId, Msg, Params, SharedValues};
use super::reduce::{Complete, Partial, Reducer, Span};
use super::{Addr, Schedule};

/// What an aggregator is responsible for; fixed for its lifetime.
#[derive(Clone, Debug, PartialEq)]
pub struct AggregatorSetup {
    /// The job.
    pub job: JobId,
    /// Index of this range.
    pub range: u32,
    /// Offset of the range in the flat parameter vector.
    pub offset: usize,
    /// Length of the range.
    pub len: usize,
    /// Number of data partitions P.
    pub partitions: u32,
    /// Size of every partition (for the exactly-once assertion).
    pub partition_sizes: Vec<u64>,
    /// The step schedule.
    pub schedule: Schedule,
    /// Write a checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: u64,
    /// The optimizer.
    pub optimizer: OptimizerSpec,
}

impl AggregatorSetup {
    /// The setup of range `range` of a job whose aggregators own `ranges`.
    #[allow(clippy::too_many_arguments)]
    pub fn for_range(
        job: JobId,
        range: u32,
        ranges: &[(usize, usize)],
        partition_sizes: Vec<u64>,
        schedule: Schedule,
        checkpoint_every: u64,
        optimizer: OptimizerSpec,
    ) -> Self {
        let (offset, len) = ranges[range as usize];
        Self {
            job,
            range,
            offset,
            len,
            partitions: partition_sizes.len() as u32,
            partition_sizes,
            schedule,
            checkpoint_every,
            optimizer,
        }
    }

    /// Number of samples partition `p` feeds at global step `step`: chunk `k`
    /// of an epoch over `m` rows is `[k·m/S, (k+1)·m/S)` (see
    /// [`crate::data::Partitions`]), so its length is known without the data.
    pub fn chunk_len(&self, p: u32, step: u64) -> u64 {
        let m = self.partition_sizes[p as usize];
        let s = u64::from(self.schedule.steps_per_epoch.max(1));
        let (_, k) = self.schedule.locate(step);
        let k = u64::from(k);
        (k + 1) * m / s - k * m / s
    }
}

/// The state an aggregator starts from: fresh parameters or a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct RangeState {
    /// Parameter version.
    pub step: u64,
    /// Parameter values of the range: the current version, shared as it is with every message
    /// that sends it (a step writes the next version into another buffer).
    pub params: Arc<Vec<f32>>,
    /// Optimizer state of the range.
    pub optimizer: OptimizerState,
    /// Samples applied so far, per partition: open epochs by row, finished ones folded.
    pub ledger: Ledger,
}

/// What the aggregator's actor must do after an event.
#[derive(Clone, Debug, PartialEq)]
pub enum AggCommand {
    /// Send a message.
    Send(Addr, Msg),
    /// Make the current state durable (the actor reads it from the core).
    Checkpoint {
        /// The version to checkpoint.
        step: u64,
    },
}

/// Why a gradient was not (or was) taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Stored; the step still waits for other partitions.
    Accepted,
    /// Stored, and it completed the step, which was applied.
    Applied,
    /// A node covering its partitions at this step was already held: a replay, ignored.
    Duplicate,
    /// For a step already applied: ignored.
    Stale,
    /// For a step not reached yet (sent before a rollback): ignored.
    Future,
    /// From another generation: ignored.
    OtherGeneration,
    /// The job is finished: ignored.
    AfterFinish,
    /// Not a valid contribution for this range; the reason names it.
    Malformed(String),
}

/// Counters of dropped messages, for logs and reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AggStats {
    /// Replayed contributions ignored.
    pub duplicates: u64,
    /// Contributions for applied steps ignored.
    pub stale: u64,
    /// Contributions for steps not reached ignored.
    pub future: u64,
    /// Contributions of other generations ignored.
    pub other_generation: u64,
    /// Malformed contributions rejected.
    pub malformed: u64,
}

/// The aggregator's state machine. Feed it events; carry out the commands.
pub struct AggregatorCore {
    setup: AggregatorSetup,
    generation: u64,
    state: RangeState,
    /// Version `state.step - 1` of the range, kept so that a trainer which
    /// restarted after sending only part of a gradient can still rebuild the
    /// full θ of the step the other ranges wait for.
    previous: Option<(u64, Arc<Vec<f32>>)>,
    /// The version before `previous`, once nothing else holds it: the buffer the next step
    /// writes into (one range-sized allocation fewer per step).
    spare: Option<Arc<Vec<f32>>>,
    /// The gradient sums received for the current step.
    pending: Reducer<Received>,
    /// Per partition, the samples counted in the current step (the ledger's row of it).
    counted: Vec<u64>,
    stats: AggStats,
    /// The coordinator holds its lease (see [`AggregatorCore::on_lease`]).
    lease: bool,
    /// The checkpoint this core asked for last, until the shell says it is done (see
    /// [`AggregatorCore::on_checkpoint_done`]): steps go on meanwhile, but not one that would
    /// ask for the next checkpoint.
    awaiting_checkpoint: Option<u64>,
    /// A deliberately broken mode (see `AggregatorCore::break_accept_duplicates`).
    #[cfg(feature = "fault-injection")]
    accept_duplicates: bool,
}

/// A gradient sum as it came: the range of a trainer on this node stays a view of that
/// trainer's buffer (no copy when it arrives), and sums are made in a buffer this aggregator
/// owns — the received one when nothing else holds it, else a new one written by the addition
/// itself (`Partial::absorb`).
type Received = Partial<SharedValues>;

impl From<Gradient> for Received {
    fn from(g: Gradient) -> Self {
        Self { values: g.values, samples: u64::from(g.samples), loss_sum: g.loss_sum }
    }
}

impl AggregatorCore {
    /// A core at `state`, in `generation`.
    ///
    /// # Panics
    /// When the state does not fit the setup (a bug in the caller, not an input error).
    pub fn new(setup: AggregatorSetup, generation: u64, mut state: RangeState) -> Self {
        assert_eq!(state.params.len(), setup.len, "range state length");
        assert_eq!(setup.partition_sizes.len(), setup.partitions as usize);
        // A checkpoint written before epochs were folded holds finished epochs as rows.
        let (epoch, _) = setup.schedule.locate(state.step);
        state.ledger.close_before(u64::from(epoch), &setup.partition_sizes);
        // The root's addition is left to `apply`, which makes the sum a block at a time in
        // the same pass as the optimizer step.
        let pending = Reducer::leaving_root_unsummed(setup.partitions, setup.len);
        let counted = vec![0; setup.partitions as usize];
        Self {
            setup,
            generation,
            state,
            previous: None,
            spare: None,
            pending,
            counted,
            stats: AggStats::default(),
            lease: true,
            awaiting_checkpoint: None,
            #[cfg(feature = "fault-injection")]
            accept_duplicates: false,
        }
    }

    /// The setup.
    pub fn setup(&self) -> &AggregatorSetup {
        &self.setup
    }
    /// The current state (version, parameters, optimizer, ledger).
    pub fn state(&self) -> &RangeState {
        &self.state
    }
    /// The generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// The current parameter version.
    pub fn step(&self) -> u64 {
        self.state.step
    }
    /// True once the last step is applied.
    pub fn is_finished(&self) -> bool {
        self.state.step >= self.setup.schedule.total_steps()
    }
    /// Drop counters.
    pub fn stats(&self) -> &AggStats {
        &self.stats
    }

    /// Commands to run when the aggregator (re)starts: tell every trainer
    /// where the range stands, and checkpoint a fresh start so that a
    /// rollback always has a version to return to.
    pub fn start(&mut self, fresh: bool) -> Vec<AggCommand> {
        let mut out = vec![AggCommand::Send(Addr::AllTrainers, self.params_msg(None))];
        if fresh {
            out.push(self.checkpoint());
        }
        if self.is_finished() {
            out.push(AggCommand::Send(Addr::Job, self.finished_msg()));
        }
        out
    }

    /// A trainer asks for the range at `step` (the newest when `None`).
    pub fn on_params_request(&mut self, trainer: u32, step: Option<u64>) -> Vec<AggCommand> {
        match step {
            None => vec![AggCommand::Send(Addr::Trainer(trainer), self.params_msg(None))],
            Some(s) if s == self.state.step => {
                vec![AggCommand::Send(Addr::Trainer(trainer), self.params_msg(None))]
            }
            Some(s) => match &self.previous {
                Some((prev, _)) if *prev == s => {
                    vec![AggCommand::Send(Addr::Trainer(trainer), self.params_msg(Some(s)))]
                }
                // Older than anything kept: the trainer's view is outdated and the
                // newest version is the useful answer.
                _ => vec![AggCommand::Send(Addr::Trainer(trainer), self.params_msg(None))],
            },
        }
    }

    /// The current version, shared (no copy).
    fn publish(&self) -> Arc<Vec<f32>> {
        self.state.params.clone()
    }

    fn params_msg(&mut self, previous: Option<u64>) -> Msg {
        let (step, values) = match (previous, &self.previous) {
            (Some(s), Some((prev, values))) if s == *prev => (s, values.clone()),
            _ => (self.state.step, self.publish()),
        };
        Msg::Params(Params::new(
            self.setup.job,
            self.generation,
            step,
            self.setup.range,
            self.setup.offset as u64,
            values.into(),
        ))
    }

    /// The version a step just made, for every trainer: each one computed the step on the
    /// version before it, so a node sending it to another may code it against that one — if
    /// the range is small enough for that to pay ([`super::delta::CODED_RANGE_VALUES`]).
    fn stepped_msg(&mut self) -> Msg {
        let mut msg = self.params_msg(None);
        if self.setup.len <= super::delta::CODED_RANGE_VALUES {
            if let (Msg::Params(p), Some((step, before))) = (&mut msg, &self.previous) {
                p.base = Some(DeltaBase::new(*step, before.clone()));
            }
        }
        msg
    }

    /// A buffer of the range's length for the next version: the spare one if nothing else
    /// holds it any more (its values are all overwritten), else a new one.
    fn spare_buffer(&mut self) -> Vec<f32> {
        match self.spare.take().map(Arc::try_unwrap) {
            Some(Ok(values)) if values.len() == self.setup.len => values,
            _ => vec![0.0; self.setup.len],
        }
    }

    fn finished_msg(&self) -> Msg {
        Msg::Finished {
            job: self.setup.job,
            range: self.setup.range,
            generation: self.generation,
            offset: self.setup.offset as u64,
            values: self.state.params.to_vec(),
            ledger: self.state.ledger.clone(),
        }
    }

    /// Break this core on purpose: from now on a duplicate contribution is
    /// added to the pending one instead of being ignored. Exists only so the
    /// chaos tests can prove their checkers catch a real bug. Only with the
    /// cargo feature `fault-injection`.
    #[doc(hidden)]
    #[cfg(feature = "fault-injection")]
    pub fn break_accept_duplicates(&mut self) {
        self.accept_duplicates = true;
    }

    /// True in the deliberately broken mode of `break_accept_duplicates`.
    fn accepts_duplicates(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return self.accept_duplicates;
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    /// A gradient range arrives. Returns what happened to it and the commands.
    pub fn on_gradient(&mut self, g: Gradient) -> (Verdict, Vec<AggCommand>) {
        let verdict = self.classify(&g);
        #[cfg(feature = "fault-injection")]
        if verdict == Verdict::Duplicate && self.accept_duplicates {
            let span = g.span();
            self.count(span, true);
            let part = Received::from(g);
            self.pending.add_duplicate(&span, &part);
            return (Verdict::Accepted, Vec::new());
        }
        if verdict != Verdict::Accepted {
            match &verdict {
                Verdict::Duplicate => self.stats.duplicates += 1,
                Verdict::Stale => self.stats.stale += 1,
                Verdict::Future => self.stats.future += 1,
                Verdict::OtherGeneration => self.stats.other_generation += 1,
                Verdict::Malformed(_) => self.stats.malformed += 1,
                Verdict::AfterFinish | Verdict::Accepted | Verdict::Applied => {}
            }
            return (verdict, Vec::new());
        }
        let span = g.span();
        let part = Received::from(g);
        if let Err(e) = self.pending.insert(span, part) {
            // `classify` checked the node and the length: unreachable, but a peer's input.
            self.stats.malformed += 1;
            return (Verdict::Malformed(e.to_string()), Vec::new());
        }
        self.count(span, false);
        if !(self.lease && self.waiting_for_lease()) {
            return (Verdict::Accepted, Vec::new());
        }
        (Verdict::Applied, self.apply())
    }

    /// Count the samples of `span`'s partitions in the current step: set (a larger node
    /// replacing smaller ones counts the same samples), or added by the broken mode.
    fn count(&mut self, span: Span, add: bool) {
        for p in span.lo..span.hi {
            let n = self.setup.chunk_len(p, self.state.step);
            let c = &mut self.counted[p as usize];
            *c = if add { c.saturating_add(n) } else { n };
        }
    }

    /// The checkpoint of the last [`AggCommand::Checkpoint`] is durable, or failed to be
    /// written (a failure is reported and training goes on from the previous one): a step
    /// that waited for it may now be applied.
    ///
    /// Checkpoints are written in the background while training goes on (CheckFreq): the
    /// snapshot is taken when the step is applied, and the following steps are applied while
    /// it is written — only a step that would ask for the *next* checkpoint waits for this one
    /// to be done. So at most one checkpoint of a range is being written at a time, a write
    /// shorter than `checkpoint_every` steps costs no step time, and a write longer than that
    /// paces checkpoints to the disk instead of piling them up. What a crash can lose is the
    /// checkpoint being written: the rollback point is then the one before it (an orderly
    /// stop waits for it; see the actor).
    pub fn on_checkpoint_done(&mut self) -> Vec<AggCommand> {
        self.awaiting_checkpoint = None;
        if self.lease && self.waiting_for_lease() {
            return self.apply();
        }
        Vec::new()
    }

    /// The step of the checkpoint being written, which must be done before the next
    /// checkpoint step is applied.
    pub fn awaiting_checkpoint(&self) -> Option<u64> {
        self.awaiting_checkpoint
    }

    /// Whether the state at `step` is checkpointed: every `checkpoint_every` steps, and the
    /// final state.
    fn checkpoints_at(&self, step: u64) -> bool {
        let k = self.setup.checkpoint_every;
        step >= self.setup.schedule.total_steps() || (k > 0 && step % k == 0)
    }

    /// Applying the waiting step now would ask for a checkpoint while the last one is still
    /// being written.
    fn blocked_by_checkpoint(&self) -> bool {
        self.awaiting_checkpoint.is_some() && self.checkpoints_at(self.state.step + 1)
    }

    fn checkpoint(&mut self) -> AggCommand {
        self.awaiting_checkpoint = Some(self.state.step);
        AggCommand::Checkpoint { step: self.state.step }
    }

    /// Whether the coordinator this aggregator runs on holds its lease (a
    /// majority acknowledged it recently; see the runtime's membership). A step
    /// whose gradients are all in is applied only while it does: a coordinator
    /// that lost its majority — paused, cut off — never commits a step its
    /// successor may commit too. When the lease comes back, the waiting step is
    /// applied exactly as it would have been at once.
    pub fn on_lease(&mut self, holds: bool) -> Vec<AggCommand> {
        self.lease = holds;
        if holds && self.waiting_for_lease() {
            return self.apply();
        }
        Vec::new()
    }

    /// True while a complete step waits for the lease (and for nothing else).
    pub fn waiting_for_lease(&self) -> bool {
        self.pending.complete() && !self.blocked_by_checkpoint()
    }

    fn classify(&self, g: &Gradient) -> Verdict {
        if g.job != self.setup.job {
            return Verdict::Malformed(format!("gradient for job {} sent to job {}", g.job, self.setup.job));
        }
        if g.generation != self.generation {
            return Verdict::OtherGeneration;
        }
        if self.is_finished() {
            return Verdict::AfterFinish;
        }
        if g.step < self.state.step {
            return Verdict::Stale;
        }
        if g.step > self.state.step {
            return Verdict::Future;
        }
        let span = g.span();
        if g.partition >= self.setup.partitions {
            return Verdict::Malformed(format!(
                "partition {} out of range (job has {} partitions)",
                g.partition, self.setup.partitions
            ));
        }
        if !span.is_node(self.setup.partitions) {
            return Verdict::Malformed(format!(
                "step {}: {span} is not a node of the reduction tree over {} partitions",
                g.step, self.setup.partitions
            ));
        }
        if g.offset != self.setup.offset as u64 || g.values.len() != self.setup.len {
            return Verdict::Malformed(format!(
                "{span} step {}: range [{}, +{}) does not match aggregator range {} [{}, +{})",
                g.step,
                g.offset,
                g.values.len(),
                self.setup.range,
                self.setup.offset,
                self.setup.len
            ));
        }
        let expected: u64 = (span.lo..span.hi).map(|p| self.setup.chunk_len(p, g.step)).sum();
        if u64::from(g.samples) != expected {
            return Verdict::Malformed(format!(
                "{span} step {}: {} samples, but its batches have {}",
                g.step, g.samples, expected
            ));
        }
        if self.pending.covers(&span) {
            return Verdict::Duplicate;
        }
        Verdict::Accepted
    }

    fn apply(&mut self) -> Vec<AggCommand> {
        let step = self.state.step;
        let (epoch, _) = self.setup.schedule.locate(step);
        let partitions = self.setup.partitions as usize;
        let broken = self.accepts_duplicates();
        // The tree-order sum: float addition is not associative, and this fixed
        // order is what makes the result independent of placement and arrival order.
        let Some(complete) = self.pending.take_complete() else {
            unreachable!("apply with partitions missing");
        };
        // The root's sum is `left + right`: made a block at a time below, where it is used.
        let (left, right, loss_sum) = match complete {
            Complete::Root(root) => (root.values, None, root.loss_sum),
            Complete::Halves(l, r) => (l.values, Some(r.values), l.loss_sum + r.loss_sum),
        };
        self.pending.clear();
        let mut samples: u64 = 0;
        for p in 0..partitions {
            let n = std::mem::take(&mut self.counted[p]);
            samples += n;
            let applied = self.state.ledger.add(u64::from(epoch), partitions, p, n);
            assert!(
                broken || applied <= self.setup.partition_sizes[p],
                "exactly-once violated: epoch {epoch} partition {p} applied {applied} > {} samples",
                self.setup.partition_sizes[p]
            );
        }
        let scale = 1.0f32 / samples as f32;
        // One pass over the range: per block, the root's sum (`left + right`, the addition
        // the tree makes last), scaled, then the optimizer's update from the version the step
        // was computed on (shared with the trainers, left as it is) into the next one. Each
        // value goes through the operations it would if the sum were written out first.
        let mut next = self.spare_buffer();
        self.setup
            .optimizer
            .step_into(&mut self.state.optimizer, &self.state.params, &mut next, |at, g| {
                left.copy_to(at, g);
                if let Some(right) = &right {
                    right.add_to(at, g);
                }
                for v in g {
                    *v *= scale;
                }
            })
            .expect("optimizer state sized at construction");
        let before = std::mem::replace(&mut self.state.params, Arc::new(next));
        // The version two steps back: the buffer of the next step once nothing holds it.
        self.spare = self.previous.replace((step, before)).map(|(_, values)| values);
        self.state.step = step + 1;
        if self.setup.schedule.locate(self.state.step).0 != epoch {
            // The epoch's last step: its row is final, fold it.
            self.state.ledger.close(u64::from(epoch), &self.setup.partition_sizes);
        }

        let mut out = vec![
            AggCommand::Send(Addr::AllTrainers, self.stepped_msg()),
            AggCommand::Send(
                Addr::Job,
                Msg::StepApplied {
                    job: self.setup.job,
                    range: self.setup.range,
                    generation: self.generation,
                    step: self.state.step,
                    loss_sum,
                    samples,
                },
            ),
        ];
        if self.checkpoints_at(self.state.step) {
            let checkpoint = self.checkpoint();
            out.push(checkpoint);
        }
        if self.is_finished() {
            out.push(AggCommand::Send(Addr::Job, self.finished_msg()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Received, Reducer, SharedValues, Span};

    fn part(values: SharedValues, loss_sum: f64) -> Received {
        Received { values, samples: 2, loss_sum }
    }

    /// A local trainer's range (shared with its buffer) is neither copied nor changed: the sums
    /// go into a received buffer nothing else holds, or into a new one when every part is
    /// shared; the bits are those of adding the vectors in the tree either way.
    #[test]
    fn sums_go_into_a_buffer_nothing_else_holds_and_leave_shared_ranges_alone() {
        let local: Arc<Vec<f32>> = Arc::new(vec![0.1, -0.0, 3.5, 1e-30, 7.25, f32::MAX]);
        let a = vec![0.3f32, 0.0, -3.5, 1.0, 2.0];
        let b = vec![1e30f32, 0.5, 0.25, -1e-30, 0.1];
        let shared = || SharedValues::range(&local, 1..6).expect("inside");
        let expected: Vec<u32> = (0..5).map(|i| ((a[i] + local[i + 1]) + b[i]).to_bits()).collect::<Vec<_>>();
        // Leaves 0, 1, 2 of a 3-partition tree: [0, 3) = [0, 2) + 2, and [0, 2) = 0 + 1.
        for order in [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
            let mut reducer: Reducer<Received> = Reducer::new(3, 5);
            let mut parts =
                [Some(part(a.clone().into(), 1.0)), Some(part(shared(), 2.0)), Some(part(b.clone().into(), 4.0))];
            let mut unique_at = Vec::new();
            for p in order {
                let received = parts[p].take().expect("each once");
                if p != 1 {
                    unique_at.push(received.values.as_ptr());
                }
                reducer.insert(Span::leaf(p as u32), received).expect("a leaf");
            }
            let root = reducer.take_root().expect("all in");
            let bits: Vec<u32> = root.values.iter().map(|v| v.to_bits()).collect();
            assert_eq!(bits, expected, "order {order:?}");
            assert_eq!(root.loss_sum, 7.0);
            assert!(unique_at.contains(&root.values.as_ptr()), "order {order:?}: summed into a received buffer");
            assert!(root.values.adds_in_place());
        }
        assert_eq!(*local, vec![0.1, -0.0, 3.5, 1e-30, 7.25, f32::MAX], "the trainer's buffer is untouched");
        // Every part shared: the sum is a new buffer, the parts unchanged.
        let other: Arc<Vec<f32>> = Arc::new(a.clone());
        let mut reducer: Reducer<Received> = Reducer::new(2, 5);
        reducer.insert(Span::leaf(0), part(SharedValues::range(&other, 0..5).expect("whole"), 0.0)).expect("leaf");
        reducer.insert(Span::leaf(1), part(shared(), 0.0)).expect("leaf");
        let root = reducer.take_root().expect("all in");
        assert_eq!(root.values.to_vec(), (0..5).map(|i| a[i] + local[i + 1]).collect::<Vec<_>>());
        assert_eq!(*other, a);
        assert_eq!(Arc::strong_count(&local), 1, "no part keeps the trainer's buffer");
    }

    /// Gradients as they came off the wire are added out of their chunks (never joined into a
    /// buffer of their own first), with the bits of adding the vectors, in every order.
    #[test]
    fn received_tensors_are_added_out_of_their_chunks() {
        let wire = |v: &[f32]| {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let chunks = bytes.chunks(7).map(bytes::Bytes::copy_from_slice).collect();
            SharedValues::from_le(phalanx_transport::LeTensor::from_chunks(chunks).expect("whole values"))
        };
        // Longer than a block of the addition, so blocks and chunk ends fall everywhere.
        let n = 2 * super::super::msg::ADD_BLOCK + 5;
        let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let l: Vec<f32> = (0..n).map(|i| (i as f32 * 1.13).cos() * 1e3).collect();
        let b: Vec<f32> = (0..n).map(|i| 1.0 / (i as f32 + 0.5)).collect();
        let local = Arc::new(l.clone());
        let expected: Vec<u32> = (0..n).map(|i| ((a[i] + l[i]) + b[i]).to_bits()).collect();
        for order in [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
            let mut reducer: Reducer<Received> = Reducer::new(3, n);
            let mut parts =
                [Some(part(wire(&a), 1.0)), Some(part(local.clone().into(), 2.0)), Some(part(wire(&b), 4.0))];
            for p in order {
                reducer.insert(Span::leaf(p as u32), parts[p].take().expect("each once")).expect("a leaf");
            }
            let root = reducer.take_root().expect("all in");
            assert!(root.values.adds_in_place(), "order {order:?}: the sum is a buffer of its own");
            assert_eq!(root.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expected, "order {order:?}");
        }
        assert_eq!(*local, l, "the trainer's buffer is untouched");
        assert_eq!(Arc::strong_count(&local), 1);
    }
}
