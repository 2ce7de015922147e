//! The trainer's protocol core (sans-IO).
//!
//! A trainer owns some partitions. For each parameter version `step` it
//! assembles the full θ from the ranges every aggregator publishes, gets the
//! batch each owned partition feeds at `step` from that partition's shard,
//! and, once every batch of a largest tree node made only of its partitions
//! is here, computes that node's sum of gradients in one call
//! ([`Model::loss_grad_tree`]: the fixed reduction tree of [`super::reduce`],
//! fused into the model's backward pass) and sends each aggregator its range
//! of it: a trainer owning a whole subtree computes and sends one gradient
//! per step, not one per partition.
//!
//! ```text
//!  Params(range r, step s) ─▶ assembly[s] ──complete──▶ Compute(s, node) for each owned node
//!  Batches(p, s..s+W) ───────▶ buffer ────────────────▶ (needs θ_s and the node's batches)
//!  Compute(s, node) ─▶ loss_grad_tree over the node's batches ─▶ Gradient(s, node) ranges ─▶ aggregators
//!                ─▶ BatchRequest(p, window) prefetch
//! ```
//!
//! Every input is idempotent: a repeated θ range, a repeated batch or a
//! `ShardReady` that crosses a reply changes nothing, so restarts of any
//! actor can simply re-send what they have.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ndarray::ArrayView2;

use crate::model::{tree_sum_f64, BatchView, Model, ParamParts, Targets};

use super::delta;
use super::msg::{Batch, BatchTargets, Gradient, JobId, Msg, Params, SharedValues};
use super::reduce::{maximal_owned, Partial, Span};
use super::{Addr, Schedule};

/// How many steps of batches a trainer asks a shard for ahead of time. One
/// request then serves several steps (fewer messages per step), and the
/// shard cuts batches while the aggregators apply steps. It also bounds the
/// batches buffered per partition.
pub const BATCH_WINDOW: u64 = 8;

/// Ticks without a new θ after which a trainer assumes something it sent or
/// expected was lost (a dead peer, a cut link) and asks again from scratch.
/// Every request is idempotent, so a false alarm costs only messages.
pub const STALL_TICKS: u32 = 4;

/// How many parameter versions a trainer assembles at once. Two suffice (see
/// [`TrainerCore::on_params`]); one more absorbs reordering.
const MAX_ASSEMBLIES: usize = 3;

/// What a trainer is; fixed for its lifetime.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainerSetup {
    /// The job.
    pub job: JobId,
    /// This trainer's index.
    pub index: u32,
    /// `(offset, len)` of every aggregator's range, in range order; they tile the vector.
    pub ranges: Vec<(usize, usize)>,
    /// The step schedule.
    pub schedule: Schedule,
    /// Number of input features.
    pub features: usize,
    /// Number of data partitions P of the job (the leaves of the reduction tree).
    pub partitions: u32,
}

/// What the trainer's actor must do.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainerCommand {
    /// Send a message.
    Send(Addr, Msg),
    /// Compute the sum of gradients at `step` of the owned tree node holding `partition`
    /// (its first partition), now: call [`TrainerCore::compute`].
    Compute {
        /// The parameter version.
        step: u64,
        /// The first partition of the node.
        partition: u32,
    },
}

/// A batch or parameter message the trainer could not use.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// The batch does not fit the model (wrong row length or target count).
    #[error("trainer {trainer}: batch of partition {partition} at step {step} is malformed: {reason}")]
    BadBatch {
        /// The trainer.
        trainer: u32,
        /// The partition.
        partition: u32,
        /// The step.
        step: u64,
        /// What is wrong.
        reason: String,
    },
    /// The model refused the batch.
    #[error("trainer {trainer}: partition {partition} at step {step}: {source}")]
    Model {
        /// The trainer.
        trainer: u32,
        /// The partition.
        partition: u32,
        /// The step.
        step: u64,
        /// The model's error.
        source: crate::model::ModelError,
    },
}

/// A θ as its aggregators sent it: entry `r` is range `r`'s values, shared with the message
/// that brought them — a remote range as it came off the wire — so no model-sized copy per
/// step: the model reads the pieces ([`Model::loss_grad_tree_parts`]).
type Theta = Arc<Vec<SharedValues>>;

/// The ranges of one version of θ received so far.
struct Assembly {
    pieces: Vec<Option<SharedValues>>,
    count: usize,
}

/// The trainer's state machine.
pub struct TrainerCore {
    setup: TrainerSetup,
    model: Arc<dyn Model>,
    total_len: usize,
    generation: u64,
    partitions: BTreeSet<u32>,
    /// The largest reduction-tree nodes made only of owned partitions: what is computed (one
    /// call each) and sent.
    spans: Vec<Span>,
    /// Gradient sums already sent as ranges of one shared buffer each, reused by the next
    /// computations once nothing else holds them (the transport lets go of a range when the
    /// peer has acknowledged it, which is before the next θ can arrive): no allocation and no
    /// clearing of a model-sized vector per node and step. At most one per owned node.
    spare: Vec<Arc<Vec<f32>>>,
    /// Buffers of ranges decoded from deltas, reused once nothing else holds them (bounded:
    /// a few per range).
    decoded: Vec<Arc<Vec<f32>>>,
    assemblies: BTreeMap<u64, Assembly>,
    /// The ranges in the order of their offsets (how the pieces of θ line up).
    by_offset: Vec<usize>,
    /// The newest complete θ and the partitions already computed on it.
    ready: Option<(u64, Theta)>,
    computed: BTreeSet<u32>,
    batches: BTreeMap<(u64, u32), Batch>,
    requested: BTreeSet<(u64, u32)>,
    /// Per partition: one past the last step asked for in this generation.
    horizon: BTreeMap<u32, u64>,
    /// Bumped whenever a θ becomes ready; ticks compare it to detect a stall.
    progress: u64,
    seen_progress: u64,
    idle_ticks: u32,
    /// Messages dropped because their shape does not fit the job.
    rejected: u64,
}

impl TrainerCore {
    /// A trainer owning `partitions` in `generation`.
    pub fn new(setup: TrainerSetup, model: Arc<dyn Model>, generation: u64, partitions: Vec<u32>) -> Self {
        let total_len = setup.ranges.iter().map(|(_, l)| l).sum();
        assert_eq!(total_len, model.num_params(), "ranges must tile the parameter vector");
        let mut by_offset: Vec<usize> = (0..setup.ranges.len()).collect();
        by_offset.sort_by_key(|&r| setup.ranges[r].0);
        let mut end = 0;
        for &r in &by_offset {
            let (offset, len) = setup.ranges[r];
            assert_eq!(offset, end, "ranges must tile the parameter vector: range {r} starts at {offset}");
            end += len;
        }
        let partitions: BTreeSet<u32> = partitions.into_iter().collect();
        let spans = maximal_owned(setup.partitions, &partitions);
        Self {
            setup,
            model,
            total_len,
            generation,
            partitions,
            spans,
            spare: Vec::new(),
            decoded: Vec::new(),
            assemblies: BTreeMap::new(),
            by_offset,
            ready: None,
            computed: BTreeSet::new(),
            batches: BTreeMap::new(),
            requested: BTreeSet::new(),
            horizon: BTreeMap::new(),
            progress: 0,
            seen_progress: 0,
            idle_ticks: 0,
            rejected: 0,
        }
    }

    /// The partitions this trainer owns.
    pub fn partitions(&self) -> impl Iterator<Item = u32> + '_ {
        self.partitions.iter().copied()
    }
    /// The generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// Messages dropped because their shape (a range's offset or length, a
    /// batch's features or row count) does not fit the job.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }
    /// The version of the newest complete θ, if any.
    pub fn ready_step(&self) -> Option<u64> {
        self.ready.as_ref().map(|(s, _)| *s)
    }

    /// On (re)start: ask every aggregator where it stands.
    pub fn start(&self) -> Vec<TrainerCommand> {
        (0..self.setup.ranges.len() as u32)
            .map(|r| TrainerCommand::Send(Addr::Aggregator(r), self.params_request(None)))
            .collect()
    }

    fn params_request(&self, step: Option<u64>) -> Msg {
        Msg::ParamsRequest { job: self.setup.job, trainer: self.setup.index, step }
    }

    /// Ask for the batches of `partition` at `from .. to` (capped at the last step).
    fn request_window(&mut self, partition: u32, from: u64, to: u64) -> Option<TrainerCommand> {
        let to = to.min(self.setup.schedule.total_steps());
        if from >= to {
            return None;
        }
        self.requested.extend((from..to).map(|s| (s, partition)));
        let h = self.horizon.entry(partition).or_insert(0);
        *h = (*h).max(to);
        Some(self.batch_request(partition, from, to))
    }

    fn batch_request(&self, partition: u32, from: u64, to: u64) -> TrainerCommand {
        TrainerCommand::Send(
            Addr::Shard(partition),
            Msg::BatchRequest {
                job: self.setup.job,
                partition,
                step: from,
                count: (to - from) as u32,
                trainer: self.setup.index,
            },
        )
    }

    fn reset(&mut self, generation: u64) {
        self.generation = generation;
        self.assemblies.clear();
        self.ready = None;
        self.computed.clear();
        self.batches.clear();
        self.requested.clear();
        self.horizon.clear();
    }

    /// A periodic tick. After [`STALL_TICKS`] ticks without a new θ (and
    /// before the last step) the trainer drops what it holds and asks every
    /// aggregator for θ again; it then recomputes the current step, and the
    /// aggregators ignore whatever turns out to be a duplicate.
    pub fn on_tick(&mut self) -> Vec<TrainerCommand> {
        if self.progress != self.seen_progress {
            self.seen_progress = self.progress;
            self.idle_ticks = 0;
            return Vec::new();
        }
        if self.ready_step().is_some_and(|s| s >= self.setup.schedule.total_steps()) {
            return Vec::new();
        }
        self.idle_ticks += 1;
        if self.idle_ticks < STALL_TICKS {
            return Vec::new();
        }
        self.idle_ticks = 0;
        tracing::debug!(trainer = self.setup.index, step = ?self.ready_step(), "no progress; asking again");
        self.reset(self.generation);
        self.start()
    }

    /// A parameter range arrives.
    ///
    /// Ranges of one version can be at two different versions when a trainer
    /// died after sending only some ranges of a gradient: the ranges that got
    /// theirs moved on, the others still wait. Then the trainer asks the
    /// ranges that moved on for their previous version (they keep one), so it
    /// can rebuild the older θ and finish the step everyone waits for.
    pub fn on_params(&mut self, p: Params) -> Vec<TrainerCommand> {
        if p.job != self.setup.job || p.generation < self.generation {
            return Vec::new();
        }
        if p.generation > self.generation {
            self.reset(p.generation);
        }
        let r = p.range as usize;
        let Some(&(offset, len)) = self.setup.ranges.get(r) else {
            tracing::warn!(trainer = self.setup.index, range = p.range, "params for an unknown range dropped");
            self.rejected += 1;
            return Vec::new();
        };
        if p.offset != offset as u64 || p.len() != len {
            tracing::warn!(trainer = self.setup.index, range = p.range, "params with a wrong offset or length dropped");
            self.rejected += 1;
            return Vec::new();
        }
        if self.ready_step().is_some_and(|s| p.step <= s) {
            return Vec::new();
        }
        let p = match self.decoded(p) {
            Ok(p) => p,
            Err(ask) => return ask,
        };
        let ranges = self.setup.ranges.len();
        if ranges == 1 {
            // One range is all of θ: it is ready as it came.
            self.assemblies.clear();
            return self.become_ready(p.step, Arc::new(vec![p.values]));
        }
        let a = self.assemblies.entry(p.step).or_insert_with(|| Assembly { pieces: vec![None; ranges], count: 0 });
        if a.pieces[r].is_none() {
            a.pieces[r] = Some(p.values);
            a.count += 1;
        }
        if a.count == ranges {
            let Some(done) = self.assemblies.remove(&p.step) else {
                return Vec::new();
            };
            self.assemblies.retain(|s, _| *s > p.step);
            // Every range is here (`count` counts the filled ones).
            return self.become_ready(p.step, Arc::new(done.pieces.into_iter().flatten().collect()));
        }
        while self.assemblies.len() > MAX_ASSEMBLIES {
            self.assemblies.pop_first();
        }
        self.fill_gaps()
    }

    /// `p` with its values: as they came, or decoded from a delta against the version of the
    /// range held here (the ready θ, or a version being assembled). Without that version, or
    /// if the code does not decode against it, the trainer asks the range's aggregator for
    /// the values themselves (it answers a request with values, never a delta).
    fn decoded(&mut self, mut p: Params) -> Result<Params, Vec<TrainerCommand>> {
        p.base = None;
        let Some(delta) = p.delta.take() else { return Ok(p) };
        let r = p.range as usize;
        let ask = vec![TrainerCommand::Send(Addr::Aggregator(p.range), self.params_request(Some(p.step)))];
        let held = match &self.ready {
            Some((step, theta)) if *step == delta.base_step => theta.get(r).cloned(),
            _ => self.assemblies.get(&delta.base_step).and_then(|a| a.pieces[r].clone()),
        };
        let Some(base) = held else {
            tracing::debug!(
                trainer = self.setup.index,
                range = p.range,
                step = p.step,
                base = delta.base_step,
                "params coded against a version not held here; asking for the values"
            );
            return Err(ask);
        };
        let len = base.len();
        let mut values = self.decode_buffer();
        let bytes = usize::try_from(delta.bytes).unwrap_or(usize::MAX);
        let chunks = delta.code.chunks();
        if let Err(e) =
            delta::decode(chunks, bytes, delta.base_check, len, |at, out| base.copy_to(at, out), &mut values)
        {
            tracing::warn!(
                trainer = self.setup.index,
                range = p.range,
                step = p.step,
                base = delta.base_step,
                "params coded against version {} do not decode ({e}); asking for the values",
                delta.base_step
            );
            self.rejected += 1;
            return Err(ask);
        }
        let values = Arc::new(values);
        if self.decoded.len() >= self.setup.ranges.len() * (MAX_ASSEMBLIES + 1) {
            self.decoded.remove(0);
        }
        self.decoded.push(values.clone());
        p.values = values.into();
        Ok(p)
    }

    /// An empty buffer for decoded values: one decoded before that nothing holds any more
    /// (its capacity kept), or a new one.
    fn decode_buffer(&mut self) -> Vec<f32> {
        while let Some(i) = self.decoded.iter().position(|b| Arc::strong_count(b) == 1) {
            if let Ok(mut buffer) = Arc::try_unwrap(self.decoded.swap_remove(i)) {
                buffer.clear();
                return buffer;
            }
        }
        Vec::new()
    }

    fn fill_gaps(&self) -> Vec<TrainerCommand> {
        let mut out = Vec::new();
        let mut iter = self.assemblies.iter();
        let Some((&oldest, a)) = iter.next() else { return out };
        let newer: Vec<&Assembly> = iter.map(|(_, a)| a).collect();
        for (r, have) in a.pieces.iter().enumerate() {
            if have.is_none() && newer.iter().any(|n| n.pieces[r].is_some()) {
                out.push(TrainerCommand::Send(Addr::Aggregator(r as u32), self.params_request(Some(oldest))));
            }
        }
        out
    }

    fn become_ready(&mut self, step: u64, theta: Theta) -> Vec<TrainerCommand> {
        self.progress += 1;
        self.ready = Some((step, theta));
        self.computed.clear();
        self.batches.retain(|(s, _), _| *s >= step);
        self.requested.retain(|(s, _)| *s >= step);
        if step >= self.setup.schedule.total_steps() {
            return Vec::new();
        }
        self.wants(step)
    }

    /// For the ready `step`: ask for the batches not here and not asked for (a window starting
    /// at each), and compute every owned node whose batches are all here.
    fn wants(&mut self, step: u64) -> Vec<TrainerCommand> {
        let mut out = Vec::new();
        for p in self.partitions.clone() {
            if self.computed.contains(&p)
                || self.batches.contains_key(&(step, p))
                || self.requested.contains(&(step, p))
            {
                continue;
            }
            // Some later steps of the window may be asked for already; their second copies
            // are dropped on arrival.
            out.extend(self.request_window(p, step, step + BATCH_WINDOW));
        }
        for span in self.spans.clone() {
            if self.computable(step, span) {
                out.push(TrainerCommand::Compute { step, partition: span.lo });
            }
        }
        out
    }

    /// Whether owned node `span` is not computed at `step` yet and every batch of it is here.
    fn computable(&self, step: u64, span: Span) -> bool {
        !self.computed.contains(&span.lo) && (span.lo..span.hi).all(|p| self.batches.contains_key(&(step, p)))
    }

    /// The owned node holding partition `p`.
    pub fn node_of(&self, p: u32) -> Option<Span> {
        self.spans.iter().find(|s| s.covers(&Span::leaf(p))).copied()
    }

    /// Batches arrive from a shard.
    pub fn on_batches(&mut self, batches: Vec<Batch>) -> Vec<TrainerCommand> {
        let mut out = Vec::new();
        for b in batches {
            out.extend(self.on_batch(b));
        }
        out
    }

    /// A batch arrives from a shard.
    pub fn on_batch(&mut self, b: Batch) -> Vec<TrainerCommand> {
        if b.job != self.setup.job || !self.partitions.contains(&b.partition) {
            return Vec::new();
        }
        let key = (b.step, b.partition);
        if !self.requested.contains(&key) {
            return Vec::new(); // not asked for (any more): a duplicate or late reply
        }
        // The shape comes from the wire: a batch that cannot feed the model is
        // dropped here (still requested: the stall check asks again) rather than
        // failing the trainer at compute time.
        if let Err(reason) = self.check_batch(&b) {
            tracing::warn!(
                trainer = self.setup.index,
                partition = b.partition,
                step = b.step,
                "batch dropped: {reason}"
            );
            self.rejected += 1;
            return Vec::new();
        }
        self.requested.remove(&key);
        let ready = self.ready_step();
        self.batches.insert(key, b);
        match (ready, self.node_of(key.1)) {
            (Some(s), Some(node)) if s == key.0 && self.computable(s, node) => {
                vec![TrainerCommand::Compute { step: key.0, partition: node.lo }]
            }
            _ => Vec::new(),
        }
    }

    /// Why `b` cannot feed the model, if it cannot.
    fn check_batch(&self, b: &Batch) -> Result<(), String> {
        let rows = b.targets.len();
        let features = self.setup.features;
        if b.features as usize != features || rows.checked_mul(features) != Some(b.x.len()) {
            return Err(format!(
                "{} values for {rows} rows of {} features (model has {features})",
                b.x.len(),
                b.features
            ));
        }
        Ok(())
    }

    /// The shard of `partition` restarted: requests sent to its predecessor may be lost.
    pub fn on_shard_ready(&mut self, partition: u32) -> Vec<TrainerCommand> {
        let steps = self.requested.iter().filter(|(_, p)| *p == partition).map(|(s, _)| *s);
        let (Some(from), Some(last)) = (steps.clone().min(), steps.max()) else { return Vec::new() };
        vec![self.batch_request(partition, from, last + 1)]
    }

    /// The job (re)assigns partitions from `generation` on.
    pub fn on_assign(&mut self, generation: u64, partitions: Vec<u32>) -> Vec<TrainerCommand> {
        if generation < self.generation {
            return Vec::new();
        }
        let before = std::mem::take(&mut self.partitions);
        self.partitions = partitions.into_iter().collect();
        self.spans = maximal_owned(self.setup.partitions, &self.partitions);
        // The nodes to send changed: the step's owned partitions are computed again
        // (the aggregators drop what turns out to be covered already).
        self.computed.clear();
        let removed: Vec<u32> = before.difference(&self.partitions).copied().collect();
        self.batches.retain(|(_, p), _| !removed.contains(p));
        self.requested.retain(|(_, p)| !removed.contains(p));
        if generation > self.generation {
            // Parameters of the new generation will come from the aggregators.
            self.reset(generation);
            return Vec::new();
        }
        match self.ready_step() {
            Some(step) if step < self.setup.schedule.total_steps() => self.wants(step),
            _ => Vec::new(),
        }
    }

    /// Keep a sent sum's buffer for the next computations, at most one per owned node (an older
    /// one still held by the transport is let go: it is freed when the transport is done).
    fn recycle(&mut self, buffer: Arc<Vec<f32>>) {
        if buffer.len() != self.total_len {
            return;
        }
        if self.spare.len() >= self.spans.len().max(1) {
            self.spare.remove(0);
        }
        self.spare.push(buffer);
    }

    /// A model-sized buffer for a sum: a sent one nothing holds any more, or a new one.
    fn gradient_buffer(&mut self) -> Vec<f32> {
        while let Some(i) = self.spare.iter().position(|b| Arc::strong_count(b) == 1) {
            if let Ok(buffer) = Arc::try_unwrap(self.spare.swap_remove(i)) {
                return buffer;
            }
        }
        vec![0.0; self.total_len]
    }

    /// The messages carrying each aggregator its range of the sum of `node`'s gradients: ranges
    /// of one shared buffer, none copied.
    fn gradient_ranges(&mut self, step: u64, node: Span, sum: Partial) -> Vec<TrainerCommand> {
        let Partial { values, samples, loss_sum } = sum;
        let gradient = |offset: usize, values: SharedValues| Gradient {
            job: self.setup.job,
            generation: self.generation,
            step,
            partition: node.lo,
            partitions: node.len(),
            samples: u32::try_from(samples).unwrap_or(u32::MAX),
            loss_sum,
            offset: offset as u64,
            values,
        };
        if let [(offset, _)] = self.setup.ranges.as_slice() {
            // All of θ goes to one aggregator: the buffer moves into the message (an aggregator
            // on this node takes it over without a copy).
            let values = SharedValues::from(values);
            return vec![TrainerCommand::Send(Addr::Aggregator(0), Msg::Gradient(gradient(*offset, values)))];
        }
        let shared = Arc::new(values);
        let ranges = self.setup.ranges.iter().enumerate();
        let out = ranges
            .map(|(r, &(offset, len))| {
                let range = SharedValues::range(&shared, offset..offset + len).expect("the ranges tile the vector");
                TrainerCommand::Send(Addr::Aggregator(r as u32), Msg::Gradient(gradient(offset, range)))
            })
            .collect();
        self.recycle(shared);
        out
    }

    /// Compute the sum of gradients of the owned node holding `partition` on the ready θ and
    /// the node's buffered batches (nothing if it is computed already or a batch is missing);
    /// returns the gradient ranges to send and the next batches to prefetch.
    pub fn compute(&mut self, step: u64, partition: u32) -> Result<Vec<TrainerCommand>, TrainerError> {
        let Some(node) = self.node_of(partition) else { return Ok(Vec::new()) };
        let Some((ready, params)) = &self.ready else { return Ok(Vec::new()) };
        if *ready != step || !self.computable(step, node) {
            return Ok(Vec::new());
        }
        let theta = params.clone();
        let batches: Vec<(u32, Batch)> =
            (node.lo..node.hi).filter_map(|p| self.batches.remove(&(step, p)).map(|b| (p, b))).collect();
        let trainer = self.setup.index;
        let bad = |partition: u32, reason: String| TrainerError::BadBatch { trainer, partition, step, reason };
        let mut views = Vec::with_capacity(batches.len());
        for (p, batch) in &batches {
            let rows = batch.targets.len();
            self.check_batch(batch).map_err(|reason| bad(*p, reason))?;
            let x =
                ArrayView2::from_shape((rows, self.setup.features), &batch.x).map_err(|e| bad(*p, e.to_string()))?;
            let y = match &batch.targets {
                BatchTargets::Real(v) => Targets::Real(v),
                BatchTargets::Class(v) => Targets::Class(v),
            };
            views.push(BatchView { x, y });
        }
        // The model overwrites every value: a spent buffer serves as it is (a sum sent to a
        // one-range job moves into the message; the others come back through `recycle`).
        let mut grad = self.gradient_buffer();
        let params = ParamParts::from_pieces(self.by_offset.iter().map(|&r| theta[r].piece()).collect());
        let losses = match self.model.loss_grad_tree_parts(&params, &views, &mut grad) {
            Ok(losses) => losses,
            Err(source) => {
                // Name the partition whose batch the model refused.
                let params = params.to_vec();
                let failing = views
                    .iter()
                    .position(|v| self.model.loss_grad(&params, v.x, v.y, &mut grad).is_err())
                    .map_or(node.lo, |i| batches[i].0);
                return Err(TrainerError::Model { trainer, partition: failing, step, source });
            }
        };
        self.computed.extend(node.lo..node.hi);
        let samples = batches.iter().map(|(_, b)| b.targets.len() as u64).sum();
        let part = Partial { values: grad, samples, loss_sum: tree_sum_f64(&losses) };
        let mut out = self.gradient_ranges(step, node, part);
        // Prefetch: batches are a pure function of (p, step), so the shard can cut the next
        // window while the aggregators apply this step. Refill when less than half a window is
        // left.
        for p in node.lo..node.hi {
            let horizon = self.horizon.get(&p).copied().unwrap_or(0);
            if horizon <= step + 1 + BATCH_WINDOW / 2 {
                out.extend(self.request_window(p, horizon.max(step + 1), step + 1 + BATCH_WINDOW));
            }
        }
        Ok(out)
    }
}
