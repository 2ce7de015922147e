//! The dense kernels of the built-in models: every sum's order written down here, so the same
//! inputs give the same `f32` bits on every CPU.
//!
//! A BLAS (or `matrixmultiply`) picks its kernel when the program runs — AVX-512, FMA, AVX,
//! SSE2 — and the kernels round differently: a fused multiply-add rounds once where a multiply
//! then an add rounds twice, and the blocking decides which partial sums meet. Here every output
//! element is one of two sums, each with its order fixed by this file and nothing else:
//!
//! - **Linear combination** ([`matmul_rows`], [`matmul_tn`]): `out[j] = Σ_t a_t · v_t[j]`, the
//!   terms added in ascending `t` to an accumulator that starts at `0.0`: `((0 + a_0·v_0[j]) +
//!   a_1·v_1[j]) + …`.
//! - **Lane dot** ([`LaneDot`]): `Σ_i h[i] · w[i]` over a long `i` as eight partial sums, lane
//!   `l` adding the terms `i ≡ l (mod 8)` in ascending `i` from `0.0`, then
//!   `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`.
//!
//! Every product is rounded to `f32`, then every addition (Rust never contracts a multiply and
//! an add into a fused multiply-add). Vector instructions only run several of these sums side
//! by side — one output element, or one lane, per vector lane — and never change what is added
//! to what. So the AVX2 code path — the same source compiled for AVX2, and for a linear
//! combination's blocks of 32 columns explicit AVX2 intrinsics that multiply, then add (never
//! `_mm256_fmadd_ps`), in the portable loop's order — picked when the CPU has AVX2, gives the
//! bits of the portable one, and so does the AVX-512 path (the same source compiled for
//! AVX-512F, and blocks of 64 columns in 512-bit registers, again a multiply then an add) picked
//! when the CPU has AVX-512F; tests compare all three. Only `exp` and `ln` (the
//! platform's libm, in the classification head) can still differ between machines, which is
//! what [`super::kernel::fingerprint`] still measures.
//!
//! The kernels also fix how a **tree of batches** is summed ([`tree_sum`]): the reduction tree
//! over partitions, so a trainer that owns a whole subtree computes its sum in one pass (the
//! built-in MLP fuses it into its backward pass) with the bits of adding the partitions'
//! gradients one by one.

/// Columns an accumulator block covers: 32 `f32` (four AVX2 registers) stay in registers while
/// every term of a linear combination is added.
const BLOCK: usize = 32;

/// Lanes of a [`LaneDot`].
pub(crate) const LANES: usize = 8;

/// Columns of a linear combination's block in AVX-512 registers: 64 `f32` (four registers per
/// output, eight independent chains of additions for two outputs, as the AVX2 block has).
#[cfg(phalanx_avx512)]
const BLOCK_512: usize = 2 * BLOCK;

/// Compiles `$body` three times — for the CPU's baseline, with AVX2 and with AVX-512F enabled —
/// and runs the widest copy the CPU can. The copies are the same source, so they give the same
/// bits (see the module docs); only their speed differs.
macro_rules! dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        pub(crate) fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[cfg(phalanx_avx512)]
                {
                    #[target_feature(enable = "avx512f,avx2")]
                    #[clippy::msrv = "1.89"]
                    fn avx512($($arg: $ty),*) {
                        body($($arg),*)
                    }
                    if use_avx512() {
                        // SAFETY: the CPU has AVX-512F and AVX2 (checked at run time just above).
                        return unsafe { avx512($($arg),*) };
                    }
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if use_avx2() {
                    // SAFETY: the CPU has AVX2 (checked at run time just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

#[cfg(test)]
thread_local! {
    /// Tests narrow the path on their own thread (0: the widest the CPU has, 1: AVX2 at most,
    /// 2: portable) to compare the bits of every path.
    static NARROWED: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Whether the AVX2 copy of a kernel may run here (the AVX-512 one is tried first).
#[cfg(target_arch = "x86_64")]
#[inline]
fn use_avx2() -> bool {
    #[cfg(test)]
    if NARROWED.with(|p| p.get()) >= 2 {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx2")
}

/// Whether the AVX-512 copy of a kernel runs here (built by Rust 1.89 and later: `build.rs`).
#[cfg(all(target_arch = "x86_64", phalanx_avx512))]
#[inline]
fn use_avx512() -> bool {
    #[cfg(test)]
    if NARROWED.with(|p| p.get()) >= 1 {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(test)]
fn narrowed<R>(level: u8, f: impl FnOnce() -> R) -> R {
    NARROWED.with(|p| p.set(level));
    let out = f();
    NARROWED.with(|p| p.set(0));
    out
}

/// Runs `f` with the portable kernels on this thread (tests: every vector path must give its
/// bits).
#[cfg(test)]
pub(crate) fn portable<R>(f: impl FnOnce() -> R) -> R {
    narrowed(2, f)
}

/// Runs `f` with the AVX2 kernels at most on this thread.
#[cfg(test)]
pub(crate) fn avx2_at_most<R>(f: impl FnOnce() -> R) -> R {
    narrowed(1, f)
}

/// Which code path the kernels take on this CPU, for people reading a log (the bits are the
/// same either way).
pub fn path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(phalanx_avx512)]
        if use_avx512() {
            return "avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "portable"
}

/// The inputs of a linear combination: `coef(q, t) = coefs[q · coef_q + t · coef_t]` and
/// `vec(t)[j] = vecs[t · vec_t + j]`.
#[derive(Clone, Copy)]
struct Terms<'a> {
    terms: usize,
    coefs: &'a [f32],
    coef_t: usize,
    coef_q: usize,
    vecs: &'a [f32],
    vec_t: usize,
}

/// `outs[q][j] = Σ_t coef(q, t) · vec(t)[j]` for `t` in `0..terms`, ascending from `0.0`, over
/// the outputs' columns (all `outs` the same width). `R` outputs at once share every load of
/// `vec(t)` and run `R` independent chains of additions.
///
/// Panics if `coefs` or `vecs` is too short for `R` outputs of that width (checked once, so
/// the AVX2 block below may read without checks).
#[inline(always)]
fn lincomb<const R: usize>(t: Terms<'_>, mut outs: [&mut [f32]; R]) {
    let width = outs[0].len();
    assert!(outs.iter().all(|o| o.len() == width), "outputs of one width");
    if t.terms == 0 || width == 0 {
        outs.iter_mut().for_each(|o| o.fill(0.0));
        return;
    }
    assert!((R - 1) * t.coef_q + (t.terms - 1) * t.coef_t < t.coefs.len(), "coefficients out of range");
    assert!((t.terms - 1) * t.vec_t + width <= t.vecs.len(), "vectors out of range");
    let coef = |q: usize, i: usize| t.coefs[q * t.coef_q + i * t.coef_t];
    let mut j = 0;
    #[cfg(all(target_arch = "x86_64", phalanx_avx512))]
    if use_avx512() {
        while j + BLOCK_512 <= width {
            let outs: [*mut f32; R] = std::array::from_fn(|q| outs[q][j..].as_mut_ptr());
            // SAFETY: the CPU has AVX-512F; the asserts above keep every read in `coefs` and
            // `vecs` (`(terms - 1) · vec_t + j + BLOCK_512 <= vecs.len()`), and each output
            // has `BLOCK_512` values from `j`.
            unsafe { lincomb_block_avx512::<R>(t, j, outs) };
            j += BLOCK_512;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        while j + BLOCK <= width {
            let outs: [*mut f32; R] = std::array::from_fn(|q| outs[q][j..].as_mut_ptr());
            // SAFETY: the CPU has AVX2; the asserts above keep every read in `coefs` and
            // `vecs` (`vecs` from `j`: `(terms - 1) · vec_t + j + BLOCK <= vecs.len()`), and
            // each output has `BLOCK` values from `j`.
            unsafe { lincomb_block_avx2::<R>(t, j, outs) };
            j += BLOCK;
        }
    }
    while j + BLOCK <= width {
        let mut acc = [[0.0f32; BLOCK]; R];
        for i in 0..t.terms {
            // The block and the coefficients are loaded once, before any product: with the
            // block borrowed and each coefficient read inside the loop, LLVM loaded the block a
            // second time, piece by piece, for the second row. The sums are the same either way.
            let at = i * t.vec_t + j;
            let v: [f32; BLOCK] = t.vecs[at..at + BLOCK].try_into().expect("a block of columns");
            let a: [f32; R] = std::array::from_fn(|q| coef(q, i));
            for (acc, &a) in acc.iter_mut().zip(&a) {
                for (sum, &value) in acc.iter_mut().zip(&v) {
                    *sum += a * value;
                }
            }
        }
        for (out, acc) in outs.iter_mut().zip(&acc) {
            out[j..j + BLOCK].copy_from_slice(acc);
        }
        j += BLOCK;
    }
    if j < width {
        for (q, out) in outs.iter_mut().enumerate() {
            let tail = &mut out[j..width];
            tail.fill(0.0);
            for i in 0..t.terms {
                let a = coef(q, i);
                let at = i * t.vec_t;
                for (sum, &value) in tail.iter_mut().zip(&t.vecs[at + j..at + width]) {
                    *sum += a * value;
                }
            }
        }
    }
}

/// Writes the `unsafe fn` computing one block of columns of [`lincomb`] in vector registers:
/// the same products and additions in the same order as the portable loop (a multiply, then an
/// add — never a fused multiply-add), without its per-term index arithmetic and checks, which
/// took as many instructions as the sums. One body for each register width, so the AVX2 and
/// AVX-512 blocks cannot drift apart (a test compares their bits with the portable loop's).
macro_rules! lincomb_block {
    (
        $(#[$attr:meta])*
        fn $name:ident, $block:expr, $lanes:literal, $vec:ident,
        $setzero:ident, $load:ident, $set1:ident, $add:ident, $mul:ident, $store:ident
    ) => {
        $(#[$attr])*
        unsafe fn $name<const R: usize>(t: Terms<'_>, j: usize, outs: [*mut f32; R]) {
            use std::arch::x86_64::{$add, $load, $mul, $set1, $setzero, $store, $vec};
            const V: usize = $block / $lanes;
            let mut acc: [[$vec; V]; R] = [[$setzero(); V]; R];
            let mut c = t.coefs.as_ptr();
            let mut v = t.vecs.as_ptr().add(j);
            for _ in 0..t.terms {
                let x: [$vec; V] = std::array::from_fn(|b| $load(v.add($lanes * b)));
                for (q, acc) in acc.iter_mut().enumerate() {
                    let a = $set1(*c.add(q * t.coef_q));
                    for (sum, &x) in acc.iter_mut().zip(&x) {
                        *sum = $add(*sum, $mul(a, x));
                    }
                }
                // Wrapping: after the last term the pointers may pass the end; they are not read.
                c = c.wrapping_add(t.coef_t);
                v = v.wrapping_add(t.vec_t);
            }
            for (out, acc) in outs.iter().zip(&acc) {
                for (b, &sum) in acc.iter().enumerate() {
                    $store(out.add($lanes * b), sum);
                }
            }
        }
    };
}

lincomb_block! {
    /// One block of [`BLOCK`] columns, from column `j`, of [`lincomb`], in AVX2 registers.
    ///
    /// # Safety
    ///
    /// The CPU has AVX2; `t.coefs` holds index `(R - 1) · coef_q + (terms - 1) · coef_t`,
    /// `t.vecs` holds `(terms - 1) · vec_t + j + BLOCK` values, and each of `outs` points at
    /// `BLOCK` writable values that nothing else borrows.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn lincomb_block_avx2, BLOCK, 8, __m256,
    _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_add_ps, _mm256_mul_ps, _mm256_storeu_ps
}

lincomb_block! {
    /// [`lincomb_block_avx2`] over [`BLOCK_512`] columns in AVX-512 registers.
    ///
    /// # Safety
    ///
    /// The CPU has AVX-512F; `t.coefs` holds index `(R - 1) · coef_q + (terms - 1) · coef_t`,
    /// `t.vecs` holds `(terms - 1) · vec_t + j + BLOCK_512` values, and each of `outs` points at
    /// `BLOCK_512` writable values that nothing else borrows.
    #[cfg(all(target_arch = "x86_64", phalanx_avx512))]
    #[target_feature(enable = "avx512f")]
    #[clippy::msrv = "1.89"]
    fn lincomb_block_avx512, BLOCK_512, 16, __m512,
    _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_add_ps, _mm512_mul_ps, _mm512_storeu_ps
}

dispatch! {
    /// `out = a · b[:, col..col + width]`: `a` is `rows × k` (row-major), `b` has `k` rows of
    /// `ldb` columns, `out` is `rows × width`; each element a linear combination over `k`.
    fn matmul_rows(a: &[f32], k: usize, b: &[f32], ldb: usize, col: usize, out: &mut [f32], width: usize) {
        if width == 0 {
            return;
        }
        if k == 0 {
            out.fill(0.0);
            return;
        }
        let terms = |coefs| Terms { terms: k, coefs, coef_t: 1, coef_q: k, vecs: &b[col..], vec_t: ldb };
        // Two rows at a time, then the odd one.
        let mut pairs = a.chunks_exact(2 * k).zip(out.chunks_exact_mut(2 * width));
        for (rows, out) in pairs.by_ref() {
            let (out0, out1) = out.split_at_mut(width);
            lincomb(terms(rows), [out0, out1]);
        }
        let done = a.len() / (2 * k) * 2;
        if let (Some(row), Some(out)) = (a.chunks_exact(k).nth(done), out.chunks_exact_mut(width).nth(done)) {
            lincomb(terms(row), [out]);
        }
    }
}

dispatch! {
    /// `out = aᵀ · b`: `a` is `rows × m`, `b` is `rows × width`, `out` is `m × width`; each
    /// element a linear combination over the rows, in row order.
    fn matmul_tn(a: &[f32], m: usize, b: &[f32], width: usize, out: &mut [f32]) {
        if width == 0 || m == 0 {
            return;
        }
        let rows = b.len() / width;
        // With no rows `a` is empty and every output is zero.
        let terms = |i: usize| Terms { terms: rows, coefs: a.get(i..).unwrap_or(&[]), coef_t: m, coef_q: 1, vecs: b, vec_t: width };
        let out = &mut out[..m * width];
        let mut i = 0;
        for pair in out.chunks_exact_mut(2 * width) {
            let (out0, out1) = pair.split_at_mut(width);
            lincomb(terms(i), [out0, out1]);
            i += 2;
        }
        if i < m {
            lincomb(terms(i), [&mut out[i * width..]]);
        }
    }
}

dispatch! {
    /// `z = z + bias[j]` on every row of `rows` (rows of `bias.len()` values), then the ReLU:
    /// `0` where the sum is `<= 0`, the sum elsewhere (a NaN stays NaN and shows up in the loss
    /// instead of being clamped to 0).
    fn bias_relu(rows: &mut [f32], bias: &[f32]) {
        if bias.is_empty() {
            return;
        }
        for row in rows.chunks_exact_mut(bias.len()) {
            for (z, &b) in row.iter_mut().zip(bias) {
                let v = *z + b;
                *z = if v <= 0.0 { 0.0 } else { v };
            }
        }
    }
}

dispatch! {
    /// The ReLU's backward pass: `d = 0` where the activation `h <= 0` (at `z == 0` exactly the
    /// subgradient 0), `d` unchanged elsewhere (a NaN `h` keeps its `d`). A select, not a
    /// branch: whether a unit is active is a coin toss per element.
    fn relu_backward(d: &mut [f32], h: &[f32]) {
        for (d, &hv) in d.iter_mut().zip(h) {
            *d = if hv <= 0.0 { 0.0 } else { *d };
        }
    }
}

dispatch! {
    /// `out += tmp`, element by element (`out` on the left): how two tree nodes' sums meet.
    fn add_into(out: &mut [f32], tmp: &[f32]) {
        for (a, &b) in out.iter_mut().zip(tmp) {
            *a += b;
        }
    }
}

/// Lane-dot accumulators: for `rows` rows and `outs` outputs, the [`LANES`] partial sums of
/// `Σ_i h[r][i] · w[o][i]`, fed chunk by chunk of `i` (each chunk starting at a multiple of
/// [`LANES`]), then [`finish`](LaneDot::finish)ed.
pub(crate) struct LaneDot {
    outs: usize,
    acc: Vec<f32>,
}

impl LaneDot {
    pub(crate) fn new(rows: usize, outs: usize) -> Self {
        Self { outs, acc: vec![0.0; rows * outs * LANES] }
    }

    /// Adds one chunk: `h` is `rows × width`, `w` is `outs × width` (the chunk's columns of
    /// each output's weights).
    pub(crate) fn add(&mut self, h: &[f32], w: &[f32], width: usize) {
        lane_dot_add(h, w, width, self.outs, &mut self.acc);
    }

    /// `out[r][o] = lanes(r, o) + bias[o]`, lanes added in their fixed tree.
    pub(crate) fn finish(&self, bias: &[f32], out: &mut [f32]) {
        for (lanes, (value, &b)) in self.acc.chunks_exact(LANES).zip(out.iter_mut().zip(bias.iter().cycle())) {
            *value = lanes_sum(lanes) + b;
        }
    }
}

/// `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`.
#[inline(always)]
fn lanes_sum(l: &[f32]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// The lane-dot step for outputs `o..o + N` of `R` rows: `R × N` independent chains of
/// additions, each load of a row used `N` times and each load of a weight `R` times.
#[inline(always)]
fn dot_block<const R: usize, const N: usize>(
    rows: [&[f32]; R],
    w: &[f32],
    width: usize,
    o: usize,
    accs: [&mut [f32]; R],
) {
    let full = width / LANES * LANES;
    let mut sums = [[[0.0f32; LANES]; N]; R];
    for (s, acc) in sums.iter_mut().zip(&accs) {
        for (s, a) in s.iter_mut().zip(acc[o * LANES..(o + N) * LANES].chunks_exact(LANES)) {
            s.copy_from_slice(a);
        }
    }
    let ws: [&[f32]; N] = std::array::from_fn(|q| &w[(o + q) * width..(o + q + 1) * width]);
    let mut i = 0;
    while i < full {
        let x: [[f32; LANES]; R] = std::array::from_fn(|r| rows[r][i..i + LANES].try_into().expect("a lane block"));
        let v: [[f32; LANES]; N] = std::array::from_fn(|q| ws[q][i..i + LANES].try_into().expect("a lane block"));
        for (s, x) in sums.iter_mut().zip(&x) {
            for (s, v) in s.iter_mut().zip(&v) {
                for l in 0..LANES {
                    s[l] += x[l] * v[l];
                }
            }
        }
        i += LANES;
    }
    for i in full..width {
        for (s, row) in sums.iter_mut().zip(&rows) {
            for (s, wq) in s.iter_mut().zip(ws) {
                s[i % LANES] += row[i] * wq[i];
            }
        }
    }
    for (s, acc) in sums.iter().zip(accs) {
        for (s, a) in s.iter().zip(acc[o * LANES..(o + N) * LANES].chunks_exact_mut(LANES)) {
            a.copy_from_slice(s);
        }
    }
}

/// The lane-dot step of `R` rows over every output: four outputs at a time, then two, then one.
#[inline(always)]
fn dot_rows<const R: usize>(rows: [&[f32]; R], w: &[f32], width: usize, outs: usize, mut accs: [&mut [f32]; R]) {
    let mut o = 0;
    while o + 4 <= outs {
        dot_block::<R, 4>(rows, w, width, o, accs.each_mut().map(|a| &mut **a));
        o += 4;
    }
    if o + 2 <= outs {
        dot_block::<R, 2>(rows, w, width, o, accs.each_mut().map(|a| &mut **a));
        o += 2;
    }
    if o < outs {
        dot_block::<R, 1>(rows, w, width, o, accs);
    }
}

dispatch! {
    /// The lane-dot step of [`LaneDot::add`], two rows at a time (then the odd one).
    fn lane_dot_add(h: &[f32], w: &[f32], width: usize, outs: usize, acc: &mut [f32]) {
        if width == 0 || outs == 0 {
            return;
        }
        let n = outs * LANES;
        let mut pairs = h.chunks_exact(2 * width).zip(acc.chunks_exact_mut(2 * n));
        for (rows, acc) in pairs.by_ref() {
            let (row0, row1) = rows.split_at(width);
            let (acc0, acc1) = acc.split_at_mut(n);
            dot_rows::<2>([row0, row1], w, width, outs, [acc0, acc1]);
        }
        let done = h.len() / (2 * width) * 2;
        if let (Some(row), Some(acc)) = (h.chunks_exact(width).nth(done), acc.chunks_exact_mut(n).nth(done)) {
            dot_rows::<1>([row], w, width, outs, [acc]);
        }
    }
}

/// Leaves of the left child of a reduction-tree node over `n >= 2` leaves: the largest power of
/// two below `n` (`8` → 4 + 4, `6` → 4 + 2, `12` → 8 + 4). The tree over partitions
/// ([`crate::protocol::reduce`]) splits by this rule too, so a subtree of `n` partitions has the
/// shape of the tree over `n` leaves.
pub fn tree_left(n: usize) -> usize {
    debug_assert!(n >= 2, "only inner nodes split");
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// Height of the tree over `n` leaves (scratch levels [`tree_sum`] needs).
fn tree_height(n: usize) -> usize {
    if n <= 1 {
        0
    } else {
        (usize::BITS - (n - 1).leading_zeros()) as usize
    }
}

/// The sum of `leaves` leaves of width `out.len()` in the reduction tree over their count:
/// `leaf(i, buffer)` writes leaf `i`'s values (overwriting `buffer`), the leaves are asked for in
/// ascending order, and each inner node is its left child's sum plus its right child's, element
/// by element. `scratch` holds the right children being summed (grown as needed, reusable).
/// With no leaves `out` is all zeros.
pub(crate) fn tree_sum(
    leaves: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    leaf: &mut dyn FnMut(usize, &mut [f32]),
) {
    if leaves == 0 {
        out.fill(0.0);
        return;
    }
    let width = out.len();
    let need = tree_height(leaves) * width;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    node(0, leaves, out, &mut scratch[..need], leaf);

    fn node(lo: usize, hi: usize, out: &mut [f32], scratch: &mut [f32], leaf: &mut dyn FnMut(usize, &mut [f32])) {
        if hi - lo == 1 {
            leaf(lo, out);
            return;
        }
        let mid = lo + tree_left(hi - lo);
        node(lo, mid, out, scratch, leaf);
        let (right, rest) = scratch.split_at_mut(out.len());
        node(mid, hi, right, rest, leaf);
        add_into(out, right);
    }
}

/// [`tree_sum`] for one number per leaf (the batches' losses, in `f64`).
pub fn tree_sum_f64(values: &[f64]) -> f64 {
    match values.len() {
        0 => 0.0,
        1 => values[0],
        n => {
            let (left, right) = values.split_at(tree_left(n));
            tree_sum_f64(left) + tree_sum_f64(right)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose products and sums round (so a changed order shows in the bits).
    fn values(count: usize, seed: u64) -> Vec<f32> {
        let mut state = seed | 1;
        (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.7
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn matmul_rows_sums_each_element_in_ascending_order_from_zero() {
        for &(rows, k, n, col, width) in &[(3, 5, 70, 3, 65), (2, 11, 256, 0, 256), (1, 1, 40, 7, 33), (4, 3, 9, 0, 9)]
        {
            let a = values(rows * k, 1);
            let b = values(k * n, 2);
            let mut out = vec![f32::NAN; rows * width];
            matmul_rows(&a, k, &b, n, col, &mut out, width);
            for r in 0..rows {
                for j in 0..width {
                    let mut sum = 0.0f32;
                    for t in 0..k {
                        sum += a[r * k + t] * b[t * n + col + j];
                    }
                    assert_eq!(out[r * width + j].to_bits(), sum.to_bits(), "row {r} column {j}");
                }
            }
        }
    }

    #[test]
    fn matmul_tn_sums_each_element_over_rows_in_order() {
        for &(rows, m, width) in &[(5, 11, 70), (1, 3, 32), (7, 6, 100), (3, 1, 5)] {
            let a = values(rows * m, 3);
            let b = values(rows * width, 4);
            let mut out = vec![f32::NAN; m * width];
            matmul_tn(&a, m, &b, width, &mut out);
            for i in 0..m {
                for j in 0..width {
                    let mut sum = 0.0f32;
                    for r in 0..rows {
                        sum += a[r * m + i] * b[r * width + j];
                    }
                    assert_eq!(out[i * width + j].to_bits(), sum.to_bits(), "element {i}, {j}");
                }
            }
        }
    }

    #[test]
    fn a_lane_dot_fed_in_chunks_has_the_bits_of_its_definition() {
        // Rows in pairs and alone; outputs by four, two and one.
        for &(rows, outs) in &[(3, 6), (4, 7), (1, 1), (2, 5)] {
            let n = 75;
            let h = values(rows * n, 5);
            let w = values(outs * n, 6);
            let bias = values(outs, 7);
            let mut dot = LaneDot::new(rows, outs);
            // Chunks of 32 and a tail of 11: lanes continue across chunks.
            for start in (0..n).step_by(32) {
                let width = 32.min(n - start);
                let hc: Vec<f32> = (0..rows).flat_map(|r| h[r * n + start..r * n + start + width].to_vec()).collect();
                let wc: Vec<f32> = (0..outs).flat_map(|o| w[o * n + start..o * n + start + width].to_vec()).collect();
                dot.add(&hc, &wc, width);
            }
            let mut out = vec![f32::NAN; rows * outs];
            dot.finish(&bias, &mut out);
            for r in 0..rows {
                for o in 0..outs {
                    let mut lanes = [0.0f32; LANES];
                    for i in 0..n {
                        lanes[i % LANES] += h[r * n + i] * w[o * n + i];
                    }
                    let expected = lanes_sum(&lanes) + bias[o];
                    assert_eq!(out[r * outs + o].to_bits(), expected.to_bits(), "{rows} rows, row {r} output {o}");
                }
            }
        }
    }

    #[test]
    fn the_avx512_avx2_and_portable_paths_give_the_same_bits() {
        // 301 columns: blocks of 64, then of 32, then a tail.
        let (rows, k, n) = (9, 13, 301);
        let a = values(rows * k, 8);
        let b = values(k * n, 9);
        let run = || {
            let mut out = vec![0.0f32; rows * n];
            matmul_rows(&a, k, &b, n, 0, &mut out, n);
            let mut tn = vec![0.0f32; k * n];
            matmul_tn(&a, k, &out, n, &mut tn);
            let mut dot = LaneDot::new(rows, k);
            dot.add(&out, &tn, n);
            let mut dots = vec![0.0f32; rows * k];
            dot.finish(&vec![0.5; k], &mut dots);
            add_into(&mut out, &b[..rows * n]);
            let mut activated = out.clone();
            bias_relu(&mut activated, &b[..n]);
            let mut backward = tn[..rows * n].to_vec();
            relu_backward(&mut backward, &activated);
            (bits(&out), bits(&tn), bits(&dots), bits(&activated), bits(&backward))
        };
        let fast = run();
        assert_eq!(avx2_at_most(run), fast);
        assert_eq!(portable(run), fast);
        assert!(["avx512", "avx2", "portable"].contains(&path()));
    }

    #[test]
    fn trees_split_off_the_largest_power_of_two_below_their_size() {
        assert_eq!([2, 3, 4, 5, 6, 8, 9, 12, 16].map(tree_left), [1, 2, 2, 4, 4, 4, 8, 8, 8]);
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(tree_height), [0, 1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn tree_sum_adds_the_leaves_in_the_tree_and_reuses_its_scratch() {
        let leaves: Vec<Vec<f32>> = (0..7).map(|i| values(37, 10 + i)).collect();
        let mut out = vec![f32::NAN; 37];
        let mut scratch = Vec::new();
        let mut asked = Vec::new();
        tree_sum(7, &mut out, &mut scratch, &mut |i, buf| {
            asked.push(i);
            buf.copy_from_slice(&leaves[i]);
        });
        assert_eq!(asked, (0..7).collect::<Vec<_>>(), "leaves in order");
        // [0,7) = [0,4) + [4,7); [4,7) = [4,6) + 6.
        let add = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<f32>>();
        let l01 = add(&leaves[0], &leaves[1]);
        let l23 = add(&leaves[2], &leaves[3]);
        let l45 = add(&leaves[4], &leaves[5]);
        let expected = add(&add(&l01, &l23), &add(&l45, &leaves[6]));
        assert_eq!(bits(&out), bits(&expected));
        // Another order of the same additions would give other bits here (the check can fail).
        let serial = leaves.iter().skip(1).fold(leaves[0].clone(), |acc, l| add(&acc, l));
        assert_ne!(bits(&serial), bits(&expected));
        let mut again = vec![0.0; 37];
        tree_sum(7, &mut again, &mut scratch, &mut |i, buf| buf.copy_from_slice(&leaves[i]));
        assert_eq!(bits(&again), bits(&expected));
        assert_eq!(tree_sum_f64(&[1.0, 2.0, 3.0]), (1.0 + 2.0) + 3.0);
        tree_sum(0, &mut out, &mut scratch, &mut |_, _| unreachable!());
        assert!(out.iter().all(|&v| v == 0.0));
    }
}
