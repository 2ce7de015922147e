//! The messages of the training protocol.
//!
//! Every message is a plain serde type so the cluster transport can carry it
//! unchanged; tensors travel as `Vec<f32>` and the transport is free to send
//! them as raw little-endian bytes. Every training message carries the job id
//! and the *generation* (bumped on every rollback or placement change), so a
//! message produced before a recovery can be recognised and dropped.

use std::fmt;

use serde::{Deserialize, Serialize};

use phalanx_transport::{LeTensor, TensorBytes};

use super::ledger::Ledger;
use super::reduce::{Span, Summand};
use crate::model::Piece;

/// Identifies one training job; every message carries it so that two jobs
/// sharing a node or a connection can never mix their contributions.
pub type JobId = u64;

/// The kind of actor in a training job.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Owns one data partition and serves its batches.
    Shard,
    /// Computes gradients for the partitions assigned to it.
    Trainer,
    /// Owns one contiguous range of the parameter vector and applies steps.
    Aggregator,
}

impl Role {
    /// The lowercase name used in flags, logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Shard => "shard",
            Role::Trainer => "trainer",
            Role::Aggregator => "aggregator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One actor of a job: a role and its index (partition for shards, trainer
/// number, aggregator range number).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorKey {
    /// What the actor does.
    pub role: Role,
    /// Which one of its role.
    pub index: u32,
}

impl ActorKey {
    /// The shard serving partition `p`.
    pub fn shard(p: u32) -> Self {
        Self { role: Role::Shard, index: p }
    }
    /// Trainer number `i`.
    pub fn trainer(i: u32) -> Self {
        Self { role: Role::Trainer, index: i }
    }
    /// The aggregator owning parameter range `r`.
    pub fn aggregator(r: u32) -> Self {
        Self { role: Role::Aggregator, index: r }
    }
}

impl fmt::Display for ActorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.index)
    }
}

/// θ (or one range of it) at a version, sent by an aggregator to trainers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Params {
    /// The job.
    pub job: JobId,
    /// Generation the sender belongs to.
    pub generation: u64,
    /// Version: the parameters before step `step` is applied.
    pub step: u64,
    /// Range index of the sending aggregator.
    pub range: u32,
    /// Offset of `values` in the flat parameter vector.
    pub offset: u64,
    /// The parameter values of the range, shared: one buffer per version serves every
    /// trainer it goes to (and the aggregator's copy of the previous version); from a remote
    /// aggregator, the tensor as it came off the wire. Empty when the values came as a
    /// [`delta`](Self::delta).
    pub values: SharedValues,
    /// Received only: the values came as the XOR with version `base_step` of the range (see
    /// [`super::delta`]); the trainer holding that version decodes them.
    pub delta: Option<Box<ParamsDelta>>,
    /// Sent only, never on the wire: the version before this one, which the receiver of
    /// the step's new version holds (it computed the step on it). A node sending the message
    /// to another codes the values against it once ([`wire_delta`](Self::wire_delta)); a
    /// trainer on the same node takes `values` as they are.
    #[serde(skip)]
    pub base: Option<DeltaBase>,
}

impl Params {
    /// A version of a range, sent as its values.
    pub fn new(job: JobId, generation: u64, step: u64, range: u32, offset: u64, values: SharedValues) -> Self {
        Self { job, generation, step, range, offset, values, delta: None, base: None }
    }

    /// Number of values of the range (also when they came as a delta).
    pub fn len(&self) -> usize {
        match &self.delta {
            Some(d) => usize::try_from(d.len).unwrap_or(usize::MAX),
            None => self.values.len(),
        }
    }

    /// Whether the range has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values coded against [`base`](Self::base) for another node: the header and the
    /// code's bytes (padded to whole words), coded on the first call and shared by every
    /// copy of the message after it. `None` without a base, or when the code would not be
    /// smaller than the values.
    pub fn wire_delta(&self) -> Option<(ParamsDelta, TensorBytes)> {
        let base = self.base.as_ref().filter(|b| b.step < self.step && b.values.len() == self.values.len())?;
        let coded = base.coded.get_or_init(|| {
            let coded = super::delta::encode(self.values.as_slice(), &base.values)?;
            let header = ParamsDelta {
                base_step: base.step,
                base_check: coded.base_check,
                len: self.values.len() as u64,
                bytes: coded.bytes.len() as u64,
                code: LeTensor::default(),
            };
            let mut bytes = coded.bytes;
            bytes.resize(bytes.len().next_multiple_of(4), 0);
            Some((header, TensorBytes::le_words(bytes).expect("padded to whole words")))
        });
        coded.clone()
    }
}

/// A version of a parameter range as the XOR with an earlier one, as a [`Params`] message
/// carries it (see [`super::delta`]).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ParamsDelta {
    /// The version the values were coded against.
    pub base_step: u64,
    /// [`super::delta::base_check`] of that version.
    pub base_check: u64,
    /// Values of the range.
    pub len: u64,
    /// Bytes of the code (the frame pads it to whole words).
    pub bytes: u64,
    /// The code as it came off the wire (its padding included).
    #[serde(skip)]
    pub code: LeTensor,
}

impl PartialEq for ParamsDelta {
    fn eq(&self, other: &Self) -> bool {
        let bytes = |t: &LeTensor| t.chunks().iter().flat_map(|c| c.iter().copied()).collect::<Vec<u8>>();
        (self.base_step, self.base_check, self.len, self.bytes)
            == (other.base_step, other.base_check, other.len, other.bytes)
            && bytes(&self.code) == bytes(&other.code)
    }
}

/// The version a [`Params`] message may be coded against on its way to another node, and
/// that code once made.
#[derive(Clone)]
pub struct DeltaBase {
    /// The base's version.
    pub step: u64,
    /// Its values.
    pub values: std::sync::Arc<Vec<f32>>,
    coded: std::sync::Arc<std::sync::OnceLock<Option<(ParamsDelta, TensorBytes)>>>,
}

impl DeltaBase {
    /// Version `step` with `values`, not coded against yet.
    pub fn new(step: u64, values: std::sync::Arc<Vec<f32>>) -> Self {
        Self { step, values, coded: Default::default() }
    }
}

impl PartialEq for DeltaBase {
    fn eq(&self, other: &Self) -> bool {
        self.step == other.step && self.values == other.values
    }
}

impl fmt::Debug for DeltaBase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeltaBase(step {}, {} values)", self.step, self.values.len())
    }
}

/// One range of a gradient sum at `step`, sent by a trainer: the gradient of one partition's
/// batch, or the sum over the partitions `partition .. partition + partitions` — a node of the
/// reduction tree (see [`super::reduce`]) whose partitions the trainer all owns, summed in
/// tree order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Gradient {
    /// The job.
    pub job: JobId,
    /// Generation of the parameters the gradient was computed on.
    pub generation: u64,
    /// The step (parameter version) the gradient was computed on.
    pub step: u64,
    /// The first partition whose batch produced it.
    pub partition: u32,
    /// How many partitions it sums, from `partition` on (1: one partition's gradient).
    pub partitions: u32,
    /// Number of samples in the batches (the gradient is their sum).
    pub samples: u32,
    /// Sum of the per-sample losses of the batches (in tree order).
    pub loss_sum: f64,
    /// Offset of `values` in the flat parameter vector.
    pub offset: u64,
    /// The gradient values of the range: a range of the trainer's sum, shared with the
    /// messages carrying the other ranges (no copy per aggregator).
    pub values: SharedValues,
}

impl Gradient {
    /// The node of the reduction tree it sums.
    pub fn span(&self) -> Span {
        Span { lo: self.partition, hi: self.partition.saturating_add(self.partitions) }
    }
}

/// Values of a tensor: a range of a buffer that several messages may share, or a tensor as it
/// came off the wire. A trainer cuts its sum of gradients into its aggregators' ranges without
/// copying any of them; the transport sends each range straight from the shared buffer, and the
/// buffer is free for the trainer's next step once every frame is acknowledged. An owned `Vec`
/// is a range over all of itself (`From<Vec<f32>>`, no copy), and so is an `Arc<Vec<f32>>` (a
/// version of a range's parameters, shared by every trainer it goes to).
///
/// A received tensor stays in the chunks QUIC delivered ([`from_le`](Self::from_le)): a trainer
/// reads its weights out of them ([`piece`](Self::piece)) and an aggregator adds them
/// ([`add`](Self::add)) without joining them first. Anything that reads it as a `&[f32]`
/// (`Deref`) joins it once, on first use.
///
/// It compares by value, and serializes as a sequence of `f32` (the bytes of a `Vec<f32>`).
#[derive(Clone)]
pub struct SharedValues {
    repr: Repr,
}

#[derive(Clone)]
enum Repr {
    Shared { buf: std::sync::Arc<Vec<f32>>, start: usize, end: usize },
    Le { tensor: LeTensor, joined: std::sync::OnceLock<Vec<f32>> },
}

/// Values added per block when one side is read out of wire chunks (a block stays in L1).
pub(crate) const ADD_BLOCK: usize = 1024;

impl Default for SharedValues {
    fn default() -> Self {
        Vec::new().into()
    }
}

impl SharedValues {
    /// Values `range` of `buf`; `None` if the range is not inside it.
    pub fn range(buf: &std::sync::Arc<Vec<f32>>, range: std::ops::Range<usize>) -> Option<Self> {
        buf.get(range.clone())?;
        Some(Self { repr: Repr::Shared { buf: buf.clone(), start: range.start, end: range.end } })
    }

    /// A tensor as it came off the wire, not copied.
    pub fn from_le(tensor: LeTensor) -> Self {
        Self { repr: Repr::Le { tensor, joined: std::sync::OnceLock::new() } }
    }

    /// Number of values (never joins a received tensor).
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Shared { start, end, .. } => end - start,
            Repr::Le { tensor, .. } => tensor.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values (a received tensor is joined on the first call, and kept).
    pub fn as_slice(&self) -> &[f32] {
        match &self.repr {
            Repr::Shared { buf, start, end } => &buf[*start..*end],
            Repr::Le { tensor, joined } => joined.get_or_init(|| tensor.to_vec()),
        }
    }

    /// The values as a piece of a parameter vector: a slice, or the received chunks when they
    /// have not been joined.
    pub fn piece(&self) -> Piece<'_> {
        match &self.repr {
            Repr::Shared { buf, start, end } => Piece::Values(&buf[*start..*end]),
            Repr::Le { joined, .. } if joined.get().is_some() => Piece::Values(self.as_slice()),
            Repr::Le { tensor, .. } => Piece::Le(tensor),
        }
    }

    /// Copies values `at..at + out.len()` into `out`.
    ///
    /// # Panics
    /// If the range is not inside `0..len()`.
    pub fn copy_to(&self, at: usize, out: &mut [f32]) {
        match self.piece() {
            Piece::Values(v) => out.copy_from_slice(&v[at..at + out.len()]),
            Piece::Le(t) => t.copy_to(at, out),
        }
    }

    /// The values as an owned vector: the buffer itself when these are all of it and nothing
    /// else holds it, a copy of the range otherwise.
    pub fn into_vec(self) -> Vec<f32> {
        match self.repr {
            Repr::Shared { buf, start, end } => {
                let whole = start == 0 && end == buf.len();
                match std::sync::Arc::try_unwrap(buf) {
                    Ok(values) if whole => values,
                    Ok(values) => values[start..end].to_vec(),
                    Err(shared) => shared[start..end].to_vec(),
                }
            }
            Repr::Le { tensor, joined } => joined.into_inner().unwrap_or_else(|| tensor.to_vec()),
        }
    }

    /// Whether [`add`](Self::add) changes these values in place: a buffer nothing else holds.
    pub fn adds_in_place(&self) -> bool {
        match &self.repr {
            Repr::Shared { buf, .. } => std::sync::Arc::strong_count(buf) == 1 && std::sync::Arc::weak_count(buf) == 0,
            Repr::Le { .. } => false,
        }
    }

    /// `self += other`, element by element, `self` on the left: in place when nothing else
    /// holds this buffer ([`adds_in_place`](Self::adds_in_place)), else into a new buffer of
    /// this length. Either side may be a received tensor, read out of its chunks a block at a
    /// time (no joined copy of it).
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn add(&mut self, other: &SharedValues) {
        let n = self.len();
        assert_eq!(n, other.len(), "adding values of another length");
        if let Repr::Shared { buf, start, end } = &mut self.repr {
            if let Some(buf) = std::sync::Arc::get_mut(buf) {
                for (i, into) in buf[*start..*end].chunks_mut(ADD_BLOCK).enumerate() {
                    other.add_to(i * ADD_BLOCK, into);
                }
                return;
            }
        }
        // Block by block through the cache into a buffer that is written once (a zeroed one
        // would be one more pass over the range).
        let mut sum = Vec::with_capacity(n);
        let mut mine = [0.0f32; ADD_BLOCK];
        for at in (0..n).step_by(ADD_BLOCK) {
            let mine = &mut mine[..ADD_BLOCK.min(n - at)];
            self.copy_to(at, mine);
            other.add_to(at, mine);
            sum.extend_from_slice(mine);
        }
        *self = sum.into();
    }

    /// `into[i] += self[at + i]` for every `i`, reading a received tensor out of its chunks
    /// through a block on the stack (blocks of at most [`ADD_BLOCK`] values stay in L1).
    ///
    /// # Panics
    /// If the range is not inside `0..len()`.
    pub fn add_to(&self, at: usize, into: &mut [f32]) {
        let mut block = [0.0f32; ADD_BLOCK];
        for (i, into) in into.chunks_mut(ADD_BLOCK).enumerate() {
            let at = at + i * ADD_BLOCK;
            let values = match self.piece() {
                Piece::Values(v) => &v[at..at + into.len()],
                Piece::Le(t) => {
                    let block = &mut block[..into.len()];
                    t.copy_to(at, block);
                    block
                }
            };
            for (a, b) in into.iter_mut().zip(values) {
                *a += *b;
            }
        }
    }

    /// The shared buffer and the range of it these values are (for a transport that sends
    /// them from the buffer); a received tensor is joined into a buffer of its own.
    pub fn into_parts(self) -> (std::sync::Arc<Vec<f32>>, std::ops::Range<usize>) {
        match self.repr {
            Repr::Shared { buf, start, end } => (buf, start..end),
            Repr::Le { .. } => {
                let values = self.into_vec();
                let len = values.len();
                (std::sync::Arc::new(values), 0..len)
            }
        }
    }
}

impl Summand for SharedValues {
    fn width(&self) -> usize {
        self.len()
    }
    fn add(&mut self, other: &Self) {
        SharedValues::add(self, other);
    }
    fn adds_in_place(&self) -> bool {
        SharedValues::adds_in_place(self)
    }
}

impl From<Vec<f32>> for SharedValues {
    fn from(values: Vec<f32>) -> Self {
        std::sync::Arc::new(values).into()
    }
}

impl From<std::sync::Arc<Vec<f32>>> for SharedValues {
    fn from(buf: std::sync::Arc<Vec<f32>>) -> Self {
        let end = buf.len();
        Self { repr: Repr::Shared { buf, start: 0, end } }
    }
}

impl std::ops::Deref for SharedValues {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.as_slice()
    }
}

impl PartialEq for SharedValues {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl fmt::Debug for SharedValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_slice().fmt(f)
    }
}

impl Serialize for SharedValues {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.as_slice().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SharedValues {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<f32>::deserialize(deserializer).map(Self::from)
    }
}

/// Targets of a batch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum BatchTargets {
    /// Regression targets.
    Real(Vec<f32>),
    /// Class labels.
    Class(Vec<u32>),
}

impl BatchTargets {
    /// Number of samples.
    pub fn len(&self) -> usize {
        match self {
            BatchTargets::Real(v) => v.len(),
            BatchTargets::Class(v) => v.len(),
        }
    }
    /// True when the batch has no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The rows partition `partition` feeds at global step `step`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Batch {
    /// The job.
    pub job: JobId,
    /// The partition.
    pub partition: u32,
    /// The global step.
    pub step: u64,
    /// Number of features per row.
    pub features: u32,
    /// Row-major features, `targets.len() × features`.
    pub x: Vec<f32>,
    /// The targets.
    pub targets: BatchTargets,
}

/// Everything the actors of a job say to each other.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Msg {
    /// Aggregator → trainer: a parameter range at a version.
    Params(Params),
    /// Trainer → aggregator: a gradient range.
    Gradient(Gradient),
    /// Trainer → aggregator: send me your range at `step` (current when `None`).
    ParamsRequest {
        /// The job.
        job: JobId,
        /// The asking trainer.
        trainer: u32,
        /// The wanted version; `None` for the newest.
        step: Option<u64>,
    },
    /// Trainer → shard: send me the batches of your partition at steps
    /// `step .. step + count` (a window, so one request serves several steps).
    BatchRequest {
        /// The job.
        job: JobId,
        /// The partition.
        partition: u32,
        /// The first global step.
        step: u64,
        /// How many consecutive steps.
        count: u32,
        /// The trainer to reply to.
        trainer: u32,
    },
    /// Shard → trainer: consecutive batches of one partition.
    Batches(Vec<Batch>),
    /// Trainer → aggregator: several gradient ranges for the aggregator's
    /// range (one per tree node the trainer summed), in one message.
    Gradients(Vec<Gradient>),
    /// Job → trainer: the shard of `partition` (re)started; re-send requests.
    ShardReady {
        /// The job.
        job: JobId,
        /// The partition whose shard is ready.
        partition: u32,
    },
    /// Job → trainer: from `generation` on, you own `partitions`.
    Assign {
        /// The job.
        job: JobId,
        /// The generation of the assignment.
        generation: u64,
        /// The partitions the trainer owns.
        partitions: Vec<u32>,
    },
    /// Job → aggregator: restore the checkpoint of `step` and continue as `generation`.
    Rollback {
        /// The job.
        job: JobId,
        /// The new generation.
        generation: u64,
        /// The checkpointed step to restore (0 = the initial parameters).
        step: u64,
    },
    /// Aggregator → job: step `step - 1` was applied, θ is now at version `step`.
    StepApplied {
        /// The job.
        job: JobId,
        /// The sender's range.
        range: u32,
        /// The sender's generation.
        generation: u64,
        /// The new parameter version.
        step: u64,
        /// Summed loss of the applied step over all partitions.
        loss_sum: f64,
        /// Samples applied in the step.
        samples: u64,
    },
    /// Aggregator → job: a checkpoint of the range at `step` is durable.
    CheckpointSaved {
        /// The job.
        job: JobId,
        /// The sender's range.
        range: u32,
        /// The checkpointed version.
        step: u64,
    },
    /// Aggregator → job: the checkpoint of the range at `step` could not be
    /// written (full disk, I/O error). Training goes on; the previous complete
    /// checkpoint stays the rollback point.
    CheckpointFailed {
        /// The job.
        job: JobId,
        /// The sender's range.
        range: u32,
        /// The version that was not checkpointed.
        step: u64,
        /// The error, naming the file.
        reason: String,
    },
    /// Aggregator → job: the last step is applied; here is the final range.
    Finished {
        /// The job.
        job: JobId,
        /// The sender's range.
        range: u32,
        /// The sender's generation.
        generation: u64,
        /// Offset of the range.
        offset: u64,
        /// Final parameter values of the range.
        values: Vec<f32>,
        /// The exactly-once ledger: samples applied per partition and epoch.
        ledger: Ledger,
    },
}

impl Msg {
    /// The job a message belongs to.
    pub fn job(&self) -> JobId {
        match self {
            Msg::Params(p) => p.job,
            Msg::Gradient(g) => g.job,
            Msg::Batches(b) => b.first().map_or(0, |b| b.job),
            Msg::Gradients(g) => g.first().map_or(0, |g| g.job),
            Msg::ParamsRequest { job, .. }
            | Msg::BatchRequest { job, .. }
            | Msg::ShardReady { job, .. }
            | Msg::Assign { job, .. }
            | Msg::Rollback { job, .. }
            | Msg::StepApplied { job, .. }
            | Msg::CheckpointSaved { job, .. }
            | Msg::CheckpointFailed { job, .. }
            | Msg::Finished { job, .. } => *job,
        }
    }

    /// A short name of the message kind for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Params(_) => "params",
            Msg::Gradient(_) => "gradient",
            Msg::ParamsRequest { .. } => "params-request",
            Msg::BatchRequest { .. } => "batch-request",
            Msg::Batches(_) => "batches",
            Msg::Gradients(_) => "gradients",
            Msg::ShardReady { .. } => "shard-ready",
            Msg::Assign { .. } => "assign",
            Msg::Rollback { .. } => "rollback",
            Msg::StepApplied { .. } => "step-applied",
            Msg::CheckpointSaved { .. } => "checkpoint-saved",
            Msg::CheckpointFailed { .. } => "checkpoint-failed",
            Msg::Finished { .. } => "finished",
        }
    }
}
