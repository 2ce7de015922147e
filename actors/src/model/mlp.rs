//! Multi-layer perceptron with one hidden ReLU layer:
//! `h = relu(x·W1 + b1)`, `out = h·W2 + b2`, then the regression or classification head.
//!
//! **Flat layout: chunk by chunk.** The hidden units come in chunks of [`CHUNK`] (the last one
//! may be shorter), and the flat vector holds each chunk's parameters together, in the form the
//! maths reads them, then `b2`:
//!
//! ```text
//!  chunk of units j0..j0+c, at j0·(inputs + 1 + outputs):
//!    W1[:, j0..j0+c]   inputs × c, row-major (input k's weights to the chunk's units)
//!    b1[j0..j0+c]      c
//!    W2[j0..j0+c, :]ᵀ  outputs × c, row-major (output o's weights from the chunk's units)
//!  b2                  outputs, at hidden·(inputs + 1 + outputs)
//! ```
//!
//! So a chunk's weights are one contiguous block, read in place (no packing, no transposing);
//! its gradient is written as one block the same shape; and a range of the flat vector is a run
//! of whole units, which is what lets a trainer send a range's gradient as soon as its chunks
//! are done. Model files and `init_params` files hold the usual tensors (`w1` `[inputs ×
//! hidden]`, `b1`, `w2` `[hidden × outputs]`, `b2`, all row-major; [`Model::layout`]):
//! [`Model::tensor_order`] and [`Model::flat_order`] convert, and the initial values are
//! drawn in that order, so a value and its bits do not depend on the layout.
//!
//! The maths run on the fixed-order kernels of [`super::dense`], a chunk at a time, so a
//! chunk's weights and activations stay in the CPU's caches:
//!
//! - **forward**, per chunk: `h = relu(x·W1 + b1)` (each element `Σ_k x·W1` in ascending `k`,
//!   then `+ b1`), and the output's lane dot `h·W2` takes the chunk in; then `out = lanes + b2`;
//! - **head**, per batch: its summed loss, and `∂out` in place of `out`;
//! - **backward**, per chunk: the chunk's `h` as the forward pass left it when every chunk's fit
//!   in [`KEEP_BYTES`], else computed again (the same code, so the same bits either way): at
//!   4,096 hidden units and 64 rows they take 1 MiB, and reading them back made a step 13 %
//!   faster than computing them again; at 65,536 units they take 5.5 MiB (21 rows) to 17 MiB
//!   (64 rows), which no core's cache holds, and computing `inputs` multiply-adds per
//!   activation again (11 for the wine data) was as fast or faster than reading them; then
//!   `∂h = (∂out·W2ᵀ)` where the unit was active, then for every batch `∂W1 = xᵀ·∂h`,
//!   `∂b1 = Σ ∂h` and `∂W2ᵀ = ∂outᵀ·h` (each element summed over the batch's rows in order),
//!   added over the batches in the reduction tree ([`super::dense::tree_sum`]) straight into
//!   the chunk's block of the gradient.
//!
//! A trainer that owns a whole subtree of partitions therefore makes one pass and writes one
//! model-sized gradient per step ([`Model::loss_grad_tree`]), with the bits of computing each
//! partition alone and adding the gradients in the tree: every batch's sums are the same code
//! either way, and so are the additions.

use std::borrow::Cow;

use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use super::dense::{self, LaneDot};
use super::{
    apply_head, check_batch, check_grad, check_x, BatchView, Init, Model, ModelError, ModelSpec, ParamLayout,
    ParamParts, Targets, TensorInfo,
};

/// Hidden units per chunk (a multiple of [`dense::LANES`], so the output's lane dot continues
/// across chunks). Part of the flat layout: changing it changes where every value lives.
const CHUNK: usize = 256;

/// The most bytes of activations a forward pass keeps for the backward pass; above it, the
/// backward pass computes them again. Measured on both sides of it (this machine: 512 KiB of
/// L2 per core, 32 MiB of L3): 1.1 MiB kept was faster, 5.5 MiB was not.
const KEEP_BYTES: usize = 2 << 20;

/// One-hidden-layer ReLU network with either head.
#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    spec: ModelSpec,
    /// The tensors as files hold them, and how they are initialised.
    layout: ParamLayout,
    /// Values per hidden unit in the flat vector: `inputs + 1 + outputs`.
    unit: usize,
}

impl Mlp {
    /// Lays out the parameters; the spec's rules are checked by [`super::build`].
    pub(crate) fn new(spec: ModelSpec) -> Result<Self, ModelError> {
        let ModelSpec { inputs, outputs, hidden, .. } = spec;
        let mut layout = ParamLayout::new(spec.kind);
        layout.push("w1", &[inputs, hidden], Init::he(inputs))?;
        layout.push("b1", &[hidden], Init::Zeros)?;
        layout.push("w2", &[hidden, outputs], Init::xavier(hidden, outputs))?;
        layout.push("b2", &[outputs], Init::Zeros)?;
        Ok(Mlp { spec, layout, unit: inputs + 1 + outputs })
    }

    /// Checks the length of `params`: the parameters of one call, in the pieces they came in (a
    /// trainer's θ as its aggregators' ranges, or one whole vector). A chunk's block is borrowed
    /// from its piece, or copied when it lies across two, so pieces cost no assembly and give
    /// the same bits as the joined vector.
    fn check_len(&self, params: &ParamParts<'_>) -> Result<(), ModelError> {
        if params.len() != self.layout.total {
            return Err(ModelError::ParamLength { expected: self.layout.total, got: params.len() });
        }
        Ok(())
    }

    /// Where the block of the chunk of units `j0..j0 + c` lies in the flat vector.
    fn block_range(&self, j0: usize, c: usize) -> std::ops::Range<usize> {
        j0 * self.unit..(j0 + c) * self.unit
    }

    /// Where `b2` lies in the flat vector.
    fn b2_range(&self) -> std::ops::Range<usize> {
        let at = self.spec.hidden * self.unit;
        at..at + self.spec.outputs
    }

    /// The chunks: `(j0, c)` for units `j0..j0 + c`.
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> {
        let hidden = self.spec.hidden;
        (0..hidden).step_by(CHUNK).map(move |j0| (j0, CHUNK.min(hidden - j0)))
    }

    /// Forward pass over `rows` rows of `x` (row-major): the raw outputs (`rows × outputs`).
    /// The hidden activations live one chunk at a time in `bufs`, unless `keep` takes them
    /// (every chunk's activations, for the backward pass).
    fn forward(
        &self,
        p: &ParamParts<'_>,
        x: &[f32],
        rows: usize,
        bufs: &mut ChunkBufs,
        mut keep: Option<&mut Kept>,
    ) -> Vec<f32> {
        let ModelSpec { inputs, outputs, .. } = self.spec;
        let mut dot = LaneDot::new(rows, outputs);
        for (j0, c) in self.chunks() {
            let block = p.slice(self.block_range(j0, c), &mut bufs.scratch);
            let h = match keep.as_deref_mut() {
                Some(kept) => kept.chunk_mut(j0, c),
                None => &mut bufs.h[..rows * c],
            };
            self.activations(block, x, c, h);
            dot.add(h, &block[(inputs + 1) * c..], c);
        }
        let mut out = vec![0.0; rows * outputs];
        dot.finish(p.slice(self.b2_range(), &mut bufs.scratch), &mut out);
        out
    }

    /// [`Model::loss_grad_tree_parts`], keeping the forward pass's activations for the backward
    /// pass when they take at most `keep_bytes` ([`KEEP_BYTES`]; the bits are the same
    /// either way).
    fn loss_grad_keeping(
        &self,
        params: &ParamParts<'_>,
        batches: &[BatchView<'_>],
        grad: &mut [f32],
        keep_bytes: usize,
    ) -> Result<Vec<f64>, ModelError> {
        self.check_len(params)?;
        let p = params;
        check_grad(self.layout.total, grad)?;
        let ModelSpec { inputs, outputs, hidden, .. } = self.spec;
        let Gathered { x, ys, bounds } = self.gather(batches)?;
        let rows = bounds[bounds.len() - 1];
        let mut kept = Kept::fitting(rows, hidden, keep_bytes);
        let mut bufs = ChunkBufs::new(&self.spec, rows, kept.is_some());
        let mut out = self.forward(p, &x, rows, &mut bufs, kept.as_mut());

        // The head, batch by batch: `out` becomes ∂loss/∂out.
        let mut losses = Vec::with_capacity(batches.len());
        for (i, y) in ys.iter().enumerate() {
            let (a, b) = (bounds[i], bounds[i + 1]);
            let view = ArrayViewMut2::from_shape((b - a, outputs), &mut out[a * outputs..b * outputs])
                .expect("the batch's rows of the outputs");
            losses.push(apply_head(view, *y, true));
        }
        let d_out = &out;

        let ones = vec![1.0f32; (1..bounds.len()).map(|i| bounds[i] - bounds[i - 1]).max().unwrap_or(0)];
        let widest = CHUNK.min(hidden);
        let mut d_hidden = vec![0.0; rows * widest];
        let mut scratch = Vec::new();
        for (j0, c) in self.chunks() {
            let ChunkBufs { h: h_buf, scratch: block_scratch } = &mut bufs;
            let block = p.slice(self.block_range(j0, c), block_scratch);
            let h: &[f32] = match &kept {
                Some(kept) => kept.chunk(j0, c),
                None => {
                    let h = &mut h_buf[..rows * c];
                    self.activations(block, &x, c, h);
                    h
                }
            };
            // ∂h = ∂out·W2ᵀ, then through the ReLU: only units that were active pass gradient.
            let d_hidden = &mut d_hidden[..rows * c];
            dense::matmul_rows(d_out, outputs, &block[(inputs + 1) * c..], c, 0, d_hidden, c);
            dense::relu_backward(d_hidden, h);
            let d_hidden: &[f32] = d_hidden;
            // The chunk's block of the gradient: ∂W1 (inputs × c), ∂b1 (c), ∂W2ᵀ (outputs × c),
            // summed over the tree in place.
            dense::tree_sum(batches.len(), &mut grad[self.block_range(j0, c)], &mut scratch, &mut |i, buf| {
                let (a, b) = (bounds[i], bounds[i + 1]);
                let (bw1, rest) = buf.split_at_mut(inputs * c);
                let (bb1, bw2t) = rest.split_at_mut(c);
                let d_leaf = &d_hidden[a * c..b * c];
                dense::matmul_tn(&x[a * inputs..b * inputs], inputs, d_leaf, c, bw1);
                dense::matmul_tn(&ones[..b - a], 1, d_leaf, c, bb1);
                dense::matmul_tn(&d_out[a * outputs..b * outputs], outputs, &h[a * c..b * c], c, bw2t);
            });
        }
        // ∂b2 = Σ ∂out over each batch's rows, in the tree too.
        dense::tree_sum(batches.len(), &mut grad[self.b2_range()], &mut scratch, &mut |i, buf| {
            let (a, b) = (bounds[i], bounds[i + 1]);
            dense::matmul_tn(&ones[..b - a], 1, &d_out[a * outputs..b * outputs], outputs, buf);
        });
        Ok(losses)
    }

    /// A chunk's activations `h = relu(x·W1[:, j0..j0 + c] + b1[j0..j0 + c])` (`rows × c`),
    /// from the chunk's block of the flat vector.
    fn activations(&self, block: &[f32], x: &[f32], c: usize, h: &mut [f32]) {
        let inputs = self.spec.inputs;
        dense::matmul_rows(x, inputs, &block[..inputs * c], c, 0, h, c);
        dense::bias_relu(h, &block[inputs * c..(inputs + 1) * c]);
    }

    /// The values that keep their order between the flat vector and the tensors one after
    /// another (`w1` `[inputs × hidden]`, `b1`, `w2` `[hidden × outputs]`, `b2`): `(flat,
    /// tensors)` range pairs for each chunk's rows of `W1` and its `b1`, and for `b2`. The rest is
    /// `W2`, transposed per chunk ([`Self::w2_blocks`]).
    fn copied_runs(&self) -> impl Iterator<Item = (std::ops::Range<usize>, std::ops::Range<usize>)> + '_ {
        let ModelSpec { inputs, outputs, hidden, .. } = self.spec;
        let per_chunk = self.chunks().flat_map(move |(j0, c)| {
            let at = j0 * self.unit;
            let w1 = (0..inputs).map(move |k| (at + k * c..at + (k + 1) * c, k * hidden + j0..k * hidden + j0 + c));
            let b1 = (at + inputs * c..at + (inputs + 1) * c, inputs * hidden + j0..inputs * hidden + j0 + c);
            w1.chain(std::iter::once(b1))
        });
        let b2 = (self.b2_range(), (inputs + 1 + outputs) * hidden..(inputs + 1 + outputs) * hidden + outputs);
        per_chunk.chain(std::iter::once(b2))
    }

    /// Each chunk's `(j0, c, flat range of its W2ᵀ)`; in the tensors, `W2` starts at
    /// `(inputs + 1) · hidden`.
    fn w2_blocks(&self) -> impl Iterator<Item = (usize, usize, std::ops::Range<usize>)> + '_ {
        let (inputs, outputs) = (self.spec.inputs, self.spec.outputs);
        self.chunks().map(move |(j0, c)| {
            let at = j0 * self.unit + (inputs + 1) * c;
            (j0, c, at..at + outputs * c)
        })
    }

    /// The tensors `w1`, `b1`, `w2`, `b2` one after another (as [`Model::layout`] names them)
    /// from the flat vector.
    fn tensors_of(&self, flat: &[f32]) -> Vec<f32> {
        let w2_at = (self.spec.inputs + 1) * self.spec.hidden;
        let mut tensors = vec![0.0; flat.len()];
        for (f, t) in self.copied_runs() {
            tensors[t].copy_from_slice(&flat[f]);
        }
        for (j0, c, f) in self.w2_blocks() {
            untranspose_rows(&flat[f], self.spec.outputs, j0, c, &mut tensors[w2_at..]);
        }
        tensors
    }

    /// The flat vector from the tensors one after another: the inverse of [`Self::tensors_of`].
    fn flat_of(&self, tensors: &[f32]) -> Vec<f32> {
        let (outputs, w2_at) = (self.spec.outputs, (self.spec.inputs + 1) * self.spec.hidden);
        let mut flat = vec![0.0; tensors.len()];
        for (f, t) in self.copied_runs() {
            flat[f].copy_from_slice(&tensors[t]);
        }
        for (j0, c, f) in self.w2_blocks() {
            let w2 = &tensors[w2_at + j0 * outputs..w2_at + (j0 + c) * outputs];
            transpose_rows(w2, outputs, c, &mut flat[f]);
        }
        flat
    }

    /// Validates every batch and gathers their rows (row-major, batch after batch).
    fn gather<'a>(&self, batches: &[BatchView<'a>]) -> Result<Gathered<'a>, ModelError> {
        let mut ys = Vec::with_capacity(batches.len());
        let mut bounds = Vec::with_capacity(batches.len() + 1);
        bounds.push(0);
        for b in batches {
            ys.push(check_batch(&self.spec, b.x, b.y)?);
            bounds.push(bounds[bounds.len() - 1] + b.x.nrows());
        }
        let mut x = Vec::with_capacity(bounds[bounds.len() - 1] * self.spec.inputs);
        for b in batches {
            x.extend(b.x.iter());
        }
        Ok(Gathered { x, ys, bounds })
    }
}

/// A chunk's working buffers: its activations (unless they are kept), and room for a block of
/// parameters that lies across two pieces.
struct ChunkBufs {
    h: Vec<f32>,
    scratch: Vec<f32>,
}

impl ChunkBufs {
    /// Buffers for chunks of `rows` rows, with `h` only if the activations are not kept
    /// elsewhere.
    fn new(spec: &ModelSpec, rows: usize, kept: bool) -> Self {
        let own = if kept { 0 } else { CHUNK.min(spec.hidden) };
        Self { h: vec![0.0; rows * own], scratch: Vec::new() }
    }
}

/// Every chunk's activations, as a forward pass left them for the backward pass: chunk
/// `j0..j0 + c` at `rows · j0`.
struct Kept {
    rows: usize,
    h: Vec<f32>,
}

thread_local! {
    /// A thread's [`Kept`] buffer between calls: per thread that computes, at most the largest
    /// a call kept ([`KEEP_BYTES`] in training), freed when the thread exits (an idle
    /// blocking-pool thread does after tokio's keep-alive).
    static KEPT_BUFFER: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Drop for Kept {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.h);
        KEPT_BUFFER.with(|spare| spare.set(buffer));
    }
}

impl Kept {
    /// Room for `rows` rows' activations over `hidden` units, if they take at most `max_bytes`.
    fn fitting(rows: usize, hidden: usize, max_bytes: usize) -> Option<Self> {
        let bytes = rows.checked_mul(hidden)?.checked_mul(4)?;
        if bytes > max_bytes {
            return None;
        }
        // The last call's buffer on this thread (see `KEPT_BUFFER`): the forward pass
        // overwrites every value, so only growth is zeroed.
        let mut h = KEPT_BUFFER.with(|spare| spare.take());
        h.resize(rows * hidden, 0.0);
        Some(Self { rows, h })
    }

    fn chunk_mut(&mut self, j0: usize, c: usize) -> &mut [f32] {
        let r = self.rows;
        &mut self.h[r * j0..r * (j0 + c)]
    }

    fn chunk(&self, j0: usize, c: usize) -> &[f32] {
        let r = self.rows;
        &self.h[r * j0..r * (j0 + c)]
    }
}

/// The batches of one call, checked: their rows one after another, each batch's targets, and
/// where each batch's rows start (and, last, where they end).
struct Gathered<'a> {
    x: Vec<f32>,
    ys: Vec<Targets<'a>>,
    bounds: Vec<usize>,
}

/// Rows a transpose moves per block: each of a block's `outputs` columns is read or written
/// [`T_BLOCK`] values at a time. Value by value, the transposed side is touched at `outputs`
/// places `c` values apart for every row, one value per line each time, which took about 10 %
/// of a step's CPU at 1.2 M parameters on three trainers.
const T_BLOCK: usize = 8;

/// Calls `$f::<O>` for a constant `O` equal to `$outputs` from 1 to 8 (the loops then unroll
/// over known offsets), else `$any`.
macro_rules! by_outputs {
    ($outputs:expr, $f:ident($($arg:expr),*), $any:expr) => {
        match $outputs {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            _ => $any,
        }
    };
}

/// `out[o][jj] = rows[jj · outputs + o]`: `c` rows of a `· × outputs` matrix, transposed
/// (`outputs × c`).
fn transpose_rows(rows: &[f32], outputs: usize, c: usize, out: &mut [f32]) {
    let done = by_outputs!(outputs, transpose_blocks(rows, c, out), 0);
    for (jj, row) in rows[..c * outputs].chunks_exact(outputs).enumerate().skip(done) {
        for (o, &value) in row.iter().enumerate() {
            out[o * c + jj] = value;
        }
    }
}

/// The whole blocks of [`transpose_rows`] for `O` outputs; returns the rows it moved (`c`
/// rounded down to whole blocks).
fn transpose_blocks<const O: usize>(rows: &[f32], c: usize, out: &mut [f32]) -> usize {
    let full = c - c % T_BLOCK;
    for (b, block) in rows[..full * O].chunks_exact(T_BLOCK * O).enumerate() {
        let jj = b * T_BLOCK;
        let r: [&[f32; O]; T_BLOCK] = std::array::from_fn(|k| block[k * O..(k + 1) * O].try_into().expect("O values"));
        for o in 0..O {
            let lane: [f32; T_BLOCK] = std::array::from_fn(|k| r[k][o]);
            out[o * c + jj..o * c + jj + T_BLOCK].copy_from_slice(&lane);
        }
    }
    full
}

/// `out[(j0 + jj) · outputs + o] = t[o][jj]`: the inverse of [`transpose_rows`].
fn untranspose_rows(t: &[f32], outputs: usize, j0: usize, c: usize, out: &mut [f32]) {
    let out = &mut out[j0 * outputs..(j0 + c) * outputs];
    let done = by_outputs!(outputs, untranspose_blocks(t, c, out), 0);
    for (jj, row) in out.chunks_exact_mut(outputs).enumerate().skip(done) {
        for (o, value) in row.iter_mut().enumerate() {
            *value = t[o * c + jj];
        }
    }
}

/// The whole blocks of [`untranspose_rows`] for `O` outputs, into `out` from its row `0`;
/// returns the rows it moved.
fn untranspose_blocks<const O: usize>(t: &[f32], c: usize, out: &mut [f32]) -> usize {
    let full = c - c % T_BLOCK;
    for (b, block) in out[..full * O].chunks_exact_mut(T_BLOCK * O).enumerate() {
        let jj = b * T_BLOCK;
        let lanes: [[f32; T_BLOCK]; O] =
            std::array::from_fn(|o| t[o * c + jj..o * c + jj + T_BLOCK].try_into().expect("a lane"));
        for (k, row) in block.chunks_exact_mut(O).enumerate() {
            let row: &mut [f32; O] = row.try_into().expect("O values");
            for (o, value) in row.iter_mut().enumerate() {
                *value = lanes[o][k];
            }
        }
    }
    full
}

impl Model for Mlp {
    fn num_params(&self) -> usize {
        self.layout.total
    }

    fn layout(&self) -> Vec<TensorInfo> {
        self.layout.tensors.clone()
    }

    /// Drawn tensor by tensor in [`Model::layout`]'s order (as before the chunked layout, so
    /// the same seed gives the same weights), then laid out chunk by chunk.
    fn init_params(&self, seed: u64) -> Vec<f32> {
        self.flat_of(&self.layout.init(seed))
    }

    fn tensor_order<'p>(&self, params: &'p [f32]) -> Cow<'p, [f32]> {
        Cow::Owned(self.tensors_of(params))
    }

    fn flat_order(&self, tensors: Vec<f32>) -> Vec<f32> {
        self.flat_of(&tensors)
    }

    fn loss_grad(
        &self,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        y: Targets<'_>,
        grad: &mut [f32],
    ) -> Result<f64, ModelError> {
        let losses = self.loss_grad_tree(params, &[BatchView { x: x.view(), y }], grad)?;
        Ok(losses[0])
    }

    fn loss_grad_tree(
        &self,
        params: &[f32],
        batches: &[BatchView<'_>],
        grad: &mut [f32],
    ) -> Result<Vec<f64>, ModelError> {
        self.loss_grad_tree_parts(&ParamParts::whole(params), batches, grad)
    }

    fn loss_grad_tree_parts(
        &self,
        params: &ParamParts<'_>,
        batches: &[BatchView<'_>],
        grad: &mut [f32],
    ) -> Result<Vec<f64>, ModelError> {
        self.loss_grad_keeping(params, batches, grad, KEEP_BYTES)
    }

    fn loss(&self, params: &[f32], x: ArrayView2<'_, f32>, y: Targets<'_>) -> Result<f64, ModelError> {
        let params = ParamParts::whole(params);
        self.check_len(&params)?;
        let Gathered { x, ys, bounds } = self.gather(&[BatchView { x: x.view(), y }])?;
        let rows = bounds[1];
        let mut out = self.forward(&params, &x, rows, &mut ChunkBufs::new(&self.spec, rows, false), None);
        let view = ArrayViewMut2::from_shape((rows, self.spec.outputs), &mut out).expect("rows × outputs");
        Ok(apply_head(view, ys[0], false))
    }

    fn predict(&self, params: &[f32], x: ArrayView2<'_, f32>) -> Result<Array2<f32>, ModelError> {
        let params = ParamParts::whole(params);
        self.check_len(&params)?;
        check_x(&self.spec, x)?;
        let rows = x.nrows();
        let x: Vec<f32> = x.iter().copied().collect();
        let out = self.forward(&params, &x, rows, &mut ChunkBufs::new(&self.spec, rows, false), None);
        Ok(Array2::from_shape_vec((rows, self.spec.outputs), out).expect("rows × outputs"))
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, ArrayView2};

    use super::super::test_util::{assert_gradient_matches, random_labels, random_matrix, random_vec, train_adam};
    use super::super::{
        build, metrics, BatchView, Head, Model, ModelError, ModelKind, ModelSpec, ParamParts, Piece, Targets,
    };
    use super::Mlp;

    fn mlp_spec(inputs: usize, outputs: usize, hidden: usize, head: Head) -> ModelSpec {
        ModelSpec { kind: ModelKind::Mlp, inputs, outputs, hidden, head }
    }

    /// Smallest `|x·W1 + b1|` over the batch: how far the batch is from a ReLU kink.
    fn kink_margin(model: &Mlp, params: &[f32], x: ArrayView2<'_, f32>) -> f32 {
        let (inputs, hidden) = (model.spec.inputs, model.spec.hidden);
        let tensors = model.tensor_order(params);
        let (w1, rest) = tensors.split_at(inputs * hidden);
        let w1 = ArrayView2::from_shape((inputs, hidden), w1).expect("w1");
        let pre = x.dot(&w1) + ndarray::ArrayView1::from(&rest[..hidden]);
        pre.iter().fold(f32::INFINITY, |m, z| m.min(z.abs()))
    }

    /// Random parameters whose pre-activations all stay at least `margin` away from 0, so a
    /// finite-difference probe never steps across a ReLU kink (where the loss has no
    /// derivative and the numeric estimate would be meaningless). Seeds are tried in order,
    /// so the choice is deterministic.
    fn params_away_from_kinks(model: &Mlp, x: ArrayView2<'_, f32>, margin: f32) -> Vec<f32> {
        (0..1000)
            .map(|seed| random_vec(seed, model.num_params(), -1.0, 1.0))
            .find(|params| kink_margin(model, params, x) >= margin)
            .expect("some seed keeps every unit away from its kink")
    }

    fn check_head(head: Head, outputs: usize) {
        let spec = mlp_spec(3, outputs, 5, head);
        let model = Mlp::new(spec).expect("valid spec");
        let x = random_matrix(2, 6, 3, -1.0, 1.0);
        // A probe moves a pre-activation by at most step · max|x| = 0.01; keep 5× that away.
        let step = 1e-2;
        let params = params_away_from_kinks(&model, x.view(), 0.05);
        let real = random_vec(3, 6, -2.0, 2.0);
        let labels = random_labels(4, 6, outputs as u32);
        let y = match head {
            Head::Regression => Targets::Real(&real),
            Head::Classification => Targets::Class(&labels),
        };
        assert_gradient_matches(&model, &params, x.view(), y, step);
    }

    #[test]
    fn mlp_regression_gradient_matches_finite_differences_away_from_relu_kinks() {
        check_head(Head::Regression, 1);
    }

    #[test]
    fn mlp_classification_gradient_matches_finite_differences_away_from_relu_kinks() {
        check_head(Head::Classification, 4);
    }

    /// The flat vector is laid out chunk by chunk; in the tensors' order it is the textbook
    /// network: `w1` `[inputs × hidden]`, `b1`, `w2` `[hidden × outputs]`, `b2`, row-major. A
    /// prediction from the tensors by hand matches the model's (two chunks, the second short),
    /// the initial values are the tensors drawn in their order (as before the chunked layout),
    /// and the two orders convert both ways.
    #[test]
    fn the_tensors_order_is_the_textbook_network_and_the_flat_order_is_chunked() {
        let (inputs, outputs, hidden) = (3, 2, 300);
        let model = Mlp::new(mlp_spec(inputs, outputs, hidden, Head::Classification)).expect("valid spec");
        let flat = random_vec(4, model.num_params(), -0.5, 0.5);
        let tensors = model.tensor_order(&flat).into_owned();
        assert_eq!(model.flat_order(tensors.clone()), flat);
        let (w1, rest) = tensors.split_at(inputs * hidden);
        let (b1, rest) = rest.split_at(hidden);
        let (w2, b2) = rest.split_at(hidden * outputs);
        // Where unit 257 (the second chunk's unit 1: that chunk is 44 units wide and starts at
        // (3 + 1 + 2) · 256) keeps its weight from input 2, its bias and its weight to output 1.
        let (unit, c, j) = (inputs + 1 + outputs, 44, 257 - 256);
        let at = 256 * unit;
        assert_eq!(flat[at + 2 * c + j], w1[2 * hidden + 257]);
        assert_eq!(flat[at + inputs * c + j], b1[257]);
        assert_eq!(flat[at + (inputs + 1 + 1) * c + j], w2[257 * outputs + 1]);
        assert_eq!(&flat[hidden * unit..], b2);
        let x = random_matrix(5, 4, inputs, -1.0, 1.0);
        let got = model.predict(&flat, x.view()).expect("valid");
        let w1 = ArrayView2::from_shape((inputs, hidden), w1).expect("w1");
        let w2 = ArrayView2::from_shape((hidden, outputs), w2).expect("w2");
        let h = (x.dot(&w1) + ndarray::ArrayView1::from(b1)).mapv(|z| z.max(0.0));
        let want = h.dot(&w2) + ndarray::ArrayView1::from(b2);
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
        let drawn = model.layout.init(7);
        assert_eq!(model.tensor_order(&model.init_params(7)).into_owned(), drawn);
    }

    #[test]
    fn mlp_dead_units_get_zero_gradient() {
        // b1 hugely negative: every hidden unit is off, so W1 and b1 get no gradient.
        let model = Mlp::new(mlp_spec(2, 1, 3, Head::Regression)).expect("valid spec");
        let mut tensors = model.tensor_order(&model.init_params(9)).into_owned();
        let (w1_len, b1_len) = (2 * 3, 3);
        tensors[w1_len..w1_len + b1_len].fill(-100.0);
        let params = model.flat_order(tensors);
        let x = random_matrix(1, 5, 2, -1.0, 1.0);
        let y = [1.0f32; 5];
        let mut grad = vec![f32::NAN; model.num_params()];
        model.loss_grad(&params, x.view(), Targets::Real(&y), &mut grad).expect("valid");
        let grad = model.tensor_order(&grad);
        assert!(grad[..w1_len + b1_len].iter().all(|&g| g == 0.0));
        // The output bias still learns: ∂b2 = Σ (b2 − y) = −5.
        assert_eq!(grad[grad.len() - 1], -5.0);
    }

    #[test]
    fn mlp_adam_learns_xor() {
        let model = build(&mlp_spec(2, 2, 16, Head::Classification)).expect("valid spec");
        let n = 80;
        // Points away from the axes, labelled by the sign of x0·x1: not linearly separable.
        let raw = random_matrix(5, n, 2, 0.2, 1.0);
        let signs = random_labels(6, n * 2, 2);
        let x = Array2::from_shape_fn((n, 2), |(i, j)| if signs[2 * i + j] == 1 { -raw[[i, j]] } else { raw[[i, j]] });
        let labels: Vec<u32> = x.rows().into_iter().map(|r| u32::from(r[0] * r[1] > 0.0)).collect();
        let (params, loss) = train_adam(model.as_ref(), x.view(), Targets::Class(&labels), 400, 0.03);
        let logits = model.predict(&params, x.view()).expect("valid");
        let accuracy = metrics::accuracy(logits.view(), &labels);
        assert!(accuracy >= 0.95, "accuracy {accuracy}, mean loss {loss}");
        assert!(loss < 0.2, "mean loss {loss}");
    }

    #[test]
    fn mlp_adam_fits_a_nonlinear_regression() {
        let model = build(&mlp_spec(2, 1, 16, Head::Regression)).expect("valid spec");
        let n = 100;
        let x = random_matrix(7, n, 2, -1.0, 1.0);
        let y: Vec<f32> = x.rows().into_iter().map(|r| r[0].abs() + 0.5 * r[1]).collect();
        let initial = model.loss(&model.init_params(1), x.view(), Targets::Real(&y)).expect("valid") / n as f64;
        let (params, loss) = train_adam(model.as_ref(), x.view(), Targets::Real(&y), 500, 0.02);
        assert!(loss < 0.01 && loss < initial / 10.0, "mean loss {loss}, initial {initial}");
        let pred = model.predict(&params, x.view()).expect("valid");
        let r2 = metrics::r2(pred.as_slice().expect("standard layout"), &y);
        // A linear fit cannot bend around |x0|; the MLP must beat it clearly.
        let linear = metrics::least_squares_r2(x.view(), &y, x.view(), &y).expect("well posed");
        assert!(r2 > 0.95 && r2 > linear + 0.1, "mlp {r2}, linear {linear}");
    }

    /// The MLP with the trait's default `loss_grad_tree`: one `loss_grad` per batch, then the
    /// tree's additions — the definition the fused pass must match bit for bit.
    #[derive(Debug)]
    struct LeafByLeaf(Mlp);

    impl Model for LeafByLeaf {
        fn num_params(&self) -> usize {
            self.0.num_params()
        }
        fn layout(&self) -> Vec<super::super::TensorInfo> {
            self.0.layout()
        }
        fn init_params(&self, seed: u64) -> Vec<f32> {
            self.0.init_params(seed)
        }
        fn loss_grad(
            &self,
            params: &[f32],
            x: ArrayView2<'_, f32>,
            y: Targets<'_>,
            grad: &mut [f32],
        ) -> Result<f64, super::super::ModelError> {
            self.0.loss_grad(params, x, y, grad)
        }
        fn loss(
            &self,
            params: &[f32],
            x: ArrayView2<'_, f32>,
            y: Targets<'_>,
        ) -> Result<f64, super::super::ModelError> {
            self.0.loss(params, x, y)
        }
        fn predict(&self, params: &[f32], x: ArrayView2<'_, f32>) -> Result<Array2<f32>, super::super::ModelError> {
            self.0.predict(params, x)
        }
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    fn loss_bits(losses: &[f64]) -> Vec<u64> {
        losses.iter().map(|v| v.to_bits()).collect()
    }

    /// The batches of [`batches_for`] with the targets of `head`.
    fn views(data: &[(Array2<f32>, Vec<f32>, Vec<u32>)], head: Head) -> Vec<BatchView<'_>> {
        data.iter()
            .map(|(x, real, labels)| BatchView {
                x: x.view(),
                y: match head {
                    Head::Regression => Targets::Real(real),
                    Head::Classification => Targets::Class(labels),
                },
            })
            .collect()
    }

    /// Batches of 5, 0, 8, 1, 3, 7 and 2 rows; the tree over 7 batches is ((0 1)(2 3))((4 5) 6).
    fn batches_for(inputs: usize, outputs: u32, seed: u64) -> Vec<(Array2<f32>, Vec<f32>, Vec<u32>)> {
        [5, 0, 8, 1, 3, 7, 2]
            .iter()
            .enumerate()
            .map(|(i, &rows)| {
                let seed = seed + 10 * i as u64;
                let x = random_matrix(seed, rows, inputs, -2.0, 2.0);
                (x, random_vec(seed + 1, rows, -3.0, 3.0), random_labels(seed + 2, rows, outputs))
            })
            .collect()
    }

    #[test]
    fn the_fused_tree_of_batches_has_the_bits_of_batch_by_batch_sums_added_in_the_tree() {
        // 300 hidden units: one full chunk and a tail of 44, which is not a multiple of 8.
        for (head, outputs) in [(Head::Classification, 6u32), (Head::Regression, 1)] {
            let model = Mlp::new(mlp_spec(11, outputs as usize, 300, head)).expect("valid spec");
            let reference = LeafByLeaf(model.clone());
            let params = random_vec(3, model.num_params(), -0.3, 0.3);
            let data = batches_for(11, outputs, 40);
            let batches = views(&data, head);
            let mut fused = vec![f32::NAN; model.num_params()];
            let mut expected = vec![f32::NAN; model.num_params()];
            let losses = model.loss_grad_tree(&params, &batches, &mut fused).expect("valid");
            let expected_losses = reference.loss_grad_tree(&params, &batches, &mut expected).expect("valid");
            assert_eq!(bits(&fused), bits(&expected), "{head}: the fused pass changed bits");
            assert_eq!(loss_bits(&losses), loss_bits(&expected_losses));
            // Every subtree too (a replacement trainer may own any node): [4, 7) = (4 5) 6.
            let mut part = vec![f32::NAN; model.num_params()];
            let mut part_expected = vec![f32::NAN; model.num_params()];
            model.loss_grad_tree(&params, &batches[4..], &mut part).expect("valid");
            reference.loss_grad_tree(&params, &batches[4..], &mut part_expected).expect("valid");
            assert_eq!(bits(&part), bits(&part_expected));
            // The order is the tree's: adding the batches one after another gives other bits
            // (so this test would see a fused pass that summed in another order).
            let mut serial = vec![0.0f32; model.num_params()];
            let mut one = vec![0.0f32; model.num_params()];
            for b in &batches {
                model.loss_grad(&params, b.x, b.y, &mut one).expect("valid");
                serial.iter_mut().zip(&one).for_each(|(s, o)| *s += o);
            }
            assert_ne!(bits(&serial), bits(&fused), "{head}: serial and tree sums agree; the test is blind");
        }
    }

    /// Keeping the forward pass's activations for the backward pass, or computing them again,
    /// gives the same bits: the tiny models of these tests keep them, so this is the test of
    /// the path large models take (and the other way round).
    #[test]
    fn kept_and_recomputed_activations_give_the_same_bits() {
        for (head, outputs) in [(Head::Classification, 6u32), (Head::Regression, 1)] {
            let model = Mlp::new(mlp_spec(11, outputs as usize, 300, head)).expect("valid spec");
            let params = random_vec(9, model.num_params(), -0.3, 0.3);
            let data = batches_for(11, outputs, 70);
            let batches = views(&data, head);
            let rows: usize = data.iter().map(|(x, _, _)| x.nrows()).sum();
            assert!(super::Kept::fitting(rows, 300, super::KEEP_BYTES).is_some());
            assert!(super::Kept::fitting(rows, 300, 0).is_none());
            assert!(super::Kept::fitting(usize::MAX, 2, usize::MAX).is_none(), "an overflow keeps nothing");
            let parts = ParamParts::whole(&params);
            let mut kept = vec![f32::NAN; model.num_params()];
            let mut again = vec![f32::NAN; model.num_params()];
            let kept_losses = model.loss_grad_keeping(&parts, &batches, &mut kept, usize::MAX).expect("valid");
            let again_losses = model.loss_grad_keeping(&parts, &batches, &mut again, 0).expect("valid");
            assert_eq!(bits(&kept), bits(&again), "{head}");
            assert_eq!(loss_bits(&kept_losses), loss_bits(&again_losses), "{head}");
            assert!(kept.iter().any(|&g| g != 0.0), "{head}: a zero gradient would hide a mix-up");
        }
    }

    /// The blocked transposes move every value where the value-by-value definition puts it,
    /// for every number of outputs and any tail of rows after the last whole block.
    #[test]
    fn transposes_match_their_definition() {
        for outputs in [1, 2, 6, 7, 9] {
            for c in [1, 7, 8, 9, 44, 256] {
                let rows: Vec<f32> = (0..c * outputs).map(|i| i as f32 + 0.5).collect();
                let mut t = vec![f32::NAN; outputs * c];
                super::transpose_rows(&rows, outputs, c, &mut t);
                for jj in 0..c {
                    for o in 0..outputs {
                        assert_eq!(t[o * c + jj], rows[jj * outputs + o], "outputs {outputs}, c {c}, row {jj}");
                    }
                }
                // Back into rows 3.. of a longer matrix, leaving the rows around them alone.
                let mut back = vec![-1.0f32; (c + 5) * outputs];
                super::untranspose_rows(&t, outputs, 3, c, &mut back);
                assert_eq!(&back[3 * outputs..(3 + c) * outputs], &rows[..], "outputs {outputs}, c {c}");
                assert!(back[..3 * outputs].iter().chain(&back[(3 + c) * outputs..]).all(|&v| v == -1.0));
            }
        }
    }

    /// θ in pieces, cut anywhere (inside a chunk's `W1`, between and inside its `b1` and `W2`,
    /// at a chunk's edge, inside `b2`, with empty pieces), in memory or as received from the
    /// wire, gives the bits of the joined vector, and so does the trait's default, which joins
    /// them.
    #[test]
    fn parameters_in_pieces_give_the_bits_of_the_joined_vector() {
        let model = Mlp::new(mlp_spec(11, 6, 300, Head::Classification)).expect("valid spec");
        let n = model.num_params();
        let params = random_vec(8, n, -0.3, 0.3);
        let data = batches_for(11, 6, 40);
        let batches = views(&data, Head::Classification);
        let mut whole = vec![f32::NAN; n];
        let losses = model.loss_grad_tree(&params, &batches, &mut whole).expect("valid");
        // The first chunk (256 units) holds W1 in 11 × 256 values, b1 in 256, W2ᵀ in 6 × 256.
        let (w1, b1, chunk) = (11 * 256, 256, 18 * 256);
        let cuts: [&[usize]; 5] = [
            &[n / 3, 2 * n / 3],
            &[1, 257, 300 + 255, w1 + 10],
            &[w1, w1, w1 + b1, chunk],
            &[chunk + 44 * 11 + 3, chunk + 44 * 12 + 1, n - 1],
            &[0, n],
        ];
        // The trait's default joins the pieces (the leaf-by-leaf reference does not override it).
        let joining = LeafByLeaf(model.clone());
        for cut in cuts {
            let mut bounds = vec![0];
            bounds.extend_from_slice(cut);
            bounds.push(n);
            // Every other piece as it would come off the wire: little-endian bytes in chunks
            // that end inside values.
            let wire: Vec<phalanx_transport::LeTensor> = bounds
                .windows(2)
                .map(|w| {
                    let bytes: Vec<u8> = params[w[0]..w[1]].iter().flat_map(|v| v.to_le_bytes()).collect();
                    let chunks = bytes.chunks(4 * 97 + 3).map(bytes::Bytes::copy_from_slice).collect();
                    phalanx_transport::LeTensor::from_chunks(chunks).expect("whole values")
                })
                .collect();
            let in_memory = ParamParts::new(bounds.windows(2).map(|w| &params[w[0]..w[1]]).collect());
            let mixed = ParamParts::from_pieces(
                bounds
                    .windows(2)
                    .zip(&wire)
                    .enumerate()
                    .map(|(i, (w, t))| if i % 2 == 0 { Piece::Le(t) } else { Piece::Values(&params[w[0]..w[1]]) })
                    .collect(),
            );
            for (name, m) in [("mlp", &model as &dyn Model), ("default", &joining)] {
                for (pieces, parts) in [("in memory", &in_memory), ("mixed", &mixed)] {
                    let mut grad = vec![f32::NAN; n];
                    let got = m.loss_grad_tree_parts(parts, &batches, &mut grad).expect("valid");
                    assert_eq!(bits(&grad), bits(&whole), "{name}, {pieces}, cut {cut:?}");
                    assert_eq!(
                        got.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
                        losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>()
                    );
                }
            }
        }
        let short = ParamParts::whole(&params[1..]);
        assert_eq!(
            model.loss_grad_tree_parts(&short, &batches, &mut whole),
            Err(ModelError::ParamLength { expected: n, got: n - 1 })
        );
    }

    #[test]
    fn the_avx512_avx2_and_portable_kernels_train_the_same_bits() {
        let model = Mlp::new(mlp_spec(11, 6, 300, Head::Classification)).expect("valid spec");
        let params = random_vec(5, model.num_params(), -0.3, 0.3);
        let data = batches_for(11, 6, 90);
        let batches = views(&data, Head::Classification);
        let run = || {
            let mut grad = vec![0.0f32; model.num_params()];
            let losses = model.loss_grad_tree(&params, &batches, &mut grad).expect("valid");
            let out = model.predict(&params, data[0].0.view()).expect("valid");
            (bits(&grad), losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), bits(out.as_slice().expect("owned")))
        };
        let fast = run();
        assert_eq!(super::super::dense::avx2_at_most(run), fast);
        assert_eq!(super::super::dense::portable(run), fast);
    }
}
