//! Optimizers: turn the summed gradient of a step into new parameters.
//!
//! The aggregator may split the flat parameter vector into contiguous key ranges held by
//! different aggregators, each stepping its range with its own slice of the optimizer state:
//!
//! ```text
//!  θ = [ range 0 | range 1 | … ]     state = { t, slots: [m, v] } sliced the same way
//!        │          │
//!   step(range 0)  step(range 1)     ← must give the same bits as step(θ) then slicing
//! ```
//!
//! So every update here is **purely elementwise**: element `i` depends only on `θ[i]`,
//! `grad[i]`, the slots' `[i]` and per-step scalars computed from the spec and the step
//! counter `t` alone. Rust never fuses `a * b + c` into an FMA on its own, so the same
//! expression gives the same bits whether it is vectorised or not, and whatever the range.
//!
//! The entry point is [`OptimizerSpec`]:
//!
//! ```
//! use phalanx_actors::optim::{OptimizerKind, OptimizerSpec};
//!
//! let spec = OptimizerSpec::new(OptimizerKind::Adam);
//! let mut params = vec![1.0f32, -2.0, 0.5];
//! let mut state = spec.new_state(params.len());
//! spec.step(&mut state, &mut params, &[0.3, -0.1, 0.0])?;
//! assert_eq!(state.t, 1);
//! // Re-splitting: the state of elements 1..3 alone.
//! assert_eq!(state.slice(1..3).slots[0].len(), 2);
//! # Ok::<(), phalanx_actors::optim::OptimError>(())
//! ```

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which update rule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Plain gradient descent: `θ −= lr·g`. No state.
    Sgd,
    /// Heavy-ball momentum (PyTorch's form): `m = μ·m + g; θ −= lr·m`. One slot, `m`.
    Momentum,
    /// Adam with bias correction. Two slots, `m` and `v`.
    Adam,
}

impl OptimizerKind {
    /// Every kind, in the order error messages list them.
    pub const ALL: [OptimizerKind; 3] = [OptimizerKind::Sgd, OptimizerKind::Momentum, OptimizerKind::Adam];

    /// The lowercase name used in configs and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Momentum => "momentum",
            OptimizerKind::Adam => "adam",
        }
    }

    /// Names of the per-element state slots, in the order [`OptimizerState::slots`] holds them.
    pub const fn slot_names(self) -> &'static [&'static str] {
        match self {
            OptimizerKind::Sgd => &[],
            OptimizerKind::Momentum => &["m"],
            OptimizerKind::Adam => &["m", "v"],
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OptimizerKind {
    type Err = OptimError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OptimizerKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| OptimError::UnknownKind { got: s.to_owned() })
    }
}

/// An optimizer and its hyperparameters. Part of the job config (and its hash).
///
/// Every field is present whatever the kind, so a config can switch kinds without losing
/// values; a kind reads (and [`OptimizerSpec::validate`] checks) only the fields it uses.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct OptimizerSpec {
    /// Update rule.
    pub kind: OptimizerKind,
    /// Learning rate (all kinds); finite and `> 0`.
    pub lr: f32,
    /// Momentum coefficient `μ` ([`OptimizerKind::Momentum`]); in `[0, 1)`.
    pub momentum: f32,
    /// Adam's decay of the first moment; in `[0, 1)`.
    pub beta1: f32,
    /// Adam's decay of the second moment; in `[0, 1)`.
    pub beta2: f32,
    /// Adam's denominator floor, `> 0`: keeps the step finite where `v` is 0.
    pub eps: f32,
}

/// Default learning rate of [`OptimizerKind::Sgd`].
const SGD_LR: f32 = 0.05;
/// Default learning rate of [`OptimizerKind::Momentum`].
const MOMENTUM_LR: f32 = 0.05;
/// Default learning rate of [`OptimizerKind::Adam`].
const ADAM_LR: f32 = 0.01;
/// Default momentum coefficient.
const MOMENTUM: f32 = 0.9;
/// Default Adam `β1` (Kingma & Ba).
const BETA1: f32 = 0.9;
/// Default Adam `β2` (Kingma & Ba).
const BETA2: f32 = 0.999;
/// Default Adam `ε` (Kingma & Ba).
const EPS: f32 = 1e-8;

impl OptimizerSpec {
    /// The kind with common defaults: SGD lr 0.05; momentum lr 0.05 with `μ = 0.9`; Adam lr
    /// 0.01 with `β1 = 0.9`, `β2 = 0.999`, `ε = 1e-8`. Fields the kind ignores get the same
    /// defaults.
    pub fn new(kind: OptimizerKind) -> Self {
        let lr = match kind {
            OptimizerKind::Sgd => SGD_LR,
            OptimizerKind::Momentum => MOMENTUM_LR,
            OptimizerKind::Adam => ADAM_LR,
        };
        OptimizerSpec { kind, lr, momentum: MOMENTUM, beta1: BETA1, beta2: BETA2, eps: EPS }
    }

    /// Names of the state slots: `[]`, `["m"]` or `["m", "v"]` (checkpoint tensor names).
    pub fn slot_names(&self) -> &'static [&'static str] {
        self.kind.slot_names()
    }

    /// Fresh state (`t = 0`, zeroed slots) for a parameter range of `len` elements.
    pub fn new_state(&self, len: usize) -> OptimizerState {
        OptimizerState { t: 0, slots: vec![vec![0.0; len]; self.slot_names().len()] }
    }

    /// Checks the hyperparameters the kind uses: `lr` finite and `> 0`; momentum: `μ` in
    /// `[0, 1)`; Adam: `β1`, `β2` in `[0, 1)` and `ε` finite and `> 0`. NaN fails every rule.
    pub fn validate(&self) -> Result<(), OptimError> {
        let check = |name: &'static str, value: f32, ok: bool, rule: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(OptimError::InvalidHyperparameter { name, value, rule })
            }
        };
        let unit = |v: f32| (0.0..1.0).contains(&v);
        check("lr", self.lr, self.lr.is_finite() && self.lr > 0.0, "finite and > 0")?;
        match self.kind {
            OptimizerKind::Sgd => Ok(()),
            OptimizerKind::Momentum => check("momentum", self.momentum, unit(self.momentum), "in [0, 1)"),
            OptimizerKind::Adam => {
                check("beta1", self.beta1, unit(self.beta1), "in [0, 1)")?;
                check("beta2", self.beta2, unit(self.beta2), "in [0, 1)")?;
                check("eps", self.eps, self.eps.is_finite() && self.eps > 0.0, "finite and > 0")
            }
        }
    }

    /// One optimizer step on a parameter range: increments `state.t`, then updates `params`
    /// and the slots in place from `grad`.
    ///
    /// Everything is checked before anything changes, so on `Err` the params and the state
    /// (including `t`) are untouched and the step can be retried.
    pub fn step(&self, state: &mut OptimizerState, params: &mut [f32], grad: &[f32]) -> Result<(), OptimError> {
        let len = params.len();
        if grad.len() != len {
            return Err(OptimError::LengthMismatch { params: len, grad: grad.len() });
        }
        let update = self.begin(state, len)?;
        update.apply(params, grad, &mut state.slots, 0);
        Ok(())
    }

    /// The same step out of place and block by block: `new` gets the parameters after the
    /// step from `old`, and `grad(at, block)` writes gradient values `at..at + block.len()`
    /// into `block` when the update reaches them. The bits are those of [`step`](Self::step)
    /// on a copy of `old` with the whole gradient written out: each value goes through the
    /// same operations. What it saves is memory traffic: the gradient, typically a sum of
    /// received parts scaled by the batch size, is made a block at a time in the cache instead
    /// of being written to memory and read back, and `old` stays unchanged for whoever shares
    /// it (a version of the parameters being sent to trainers).
    ///
    /// Everything is checked first, as in [`step`](Self::step).
    pub fn step_into(
        &self,
        state: &mut OptimizerState,
        old: &[f32],
        new: &mut [f32],
        mut grad: impl FnMut(usize, &mut [f32]),
    ) -> Result<(), OptimError> {
        let len = old.len();
        if new.len() != len {
            return Err(OptimError::LengthMismatch { params: len, grad: new.len() });
        }
        let update = self.begin(state, len)?;
        let mut block = [0.0f32; STEP_BLOCK];
        for (i, (new, old)) in new.chunks_mut(STEP_BLOCK).zip(old.chunks(STEP_BLOCK)).enumerate() {
            let at = i * STEP_BLOCK;
            let g = &mut block[..new.len()];
            grad(at, g);
            new.copy_from_slice(old);
            update.apply(new, g, &mut state.slots, at);
        }
        Ok(())
    }

    /// Checks the hyperparameters and the state against a range of `len` values, then counts
    /// the step (`t`): what an update of that range needs, nothing changed on `Err`.
    fn begin(&self, state: &mut OptimizerState, len: usize) -> Result<Update, OptimError> {
        self.validate()?;
        let names = self.slot_names();
        if state.slots.len() != names.len() {
            return Err(OptimError::SlotCount { kind: self.kind, expected: names.len(), got: state.slots.len() });
        }
        if let Some((&slot, got)) =
            names.iter().zip(&state.slots).map(|(name, s)| (name, s.len())).find(|&(_, got)| got != len)
        {
            return Err(OptimError::SlotLength { slot, expected: len, got });
        }
        // Saturating: 2^64 steps will not happen, and once β^t has underflowed the bias
        // corrections no longer change, so the update stays well-defined.
        state.t = state.t.saturating_add(1);
        Ok(match self.kind {
            OptimizerKind::Sgd => Update::Sgd { lr: self.lr },
            OptimizerKind::Momentum => Update::Momentum { lr: self.lr, mu: self.momentum },
            OptimizerKind::Adam => Update::Adam(self.adam_scalars(state.t)),
        })
    }

    /// Adam's per-step scalars, computed once per step from `t` alone so that every range of
    /// a split vector uses the very same bits.
    fn adam_scalars(&self, t: u64) -> AdamScalars {
        let bias1 = 1.0 - pow_u64(f64::from(self.beta1), t);
        let bias2 = 1.0 - pow_u64(f64::from(self.beta2), t);
        AdamScalars {
            beta1: self.beta1,
            one_minus_beta1: 1.0 - self.beta1,
            beta2: self.beta2,
            one_minus_beta2: 1.0 - self.beta2,
            step_size: (f64::from(self.lr) / bias1) as f32,
            inv_sqrt_bias2: (1.0 / bias2.sqrt()) as f32,
            eps: self.eps,
        }
    }
}

/// Values per block of [`OptimizerSpec::step_into`]: the block of gradient values stays in
/// L1 between being made and being used.
const STEP_BLOCK: usize = 1024;

/// One counted step's arithmetic, for any part of the range: the scalars it uses are fixed
/// when the step is counted ([`OptimizerSpec::begin`]), so every part of the range, and every
/// range of the vector, uses the same bits.
enum Update {
    Sgd { lr: f32 },
    Momentum { lr: f32, mu: f32 },
    Adam(AdamScalars),
}

impl Update {
    /// Updates `params` (values `at..at + params.len()` of the range) and the same values of
    /// every slot from `grad`. The slot count was checked by [`OptimizerSpec::begin`].
    fn apply(&self, params: &mut [f32], grad: &[f32], slots: &mut [Vec<f32>], at: usize) {
        let span = at..at + params.len();
        match (self, slots) {
            (Update::Sgd { lr }, []) => {
                for (p, &g) in params.iter_mut().zip(grad) {
                    *p -= lr * g;
                }
            }
            (Update::Momentum { lr, mu }, [m]) => {
                for ((p, &g), m) in params.iter_mut().zip(grad).zip(&mut m[span]) {
                    *m = mu * *m + g;
                    *p -= lr * *m;
                }
            }
            (Update::Adam(sc), [m, v]) => {
                let AdamScalars { beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_sqrt_bias2, eps } =
                    *sc;
                for (((p, &g), m), v) in params.iter_mut().zip(grad).zip(&mut m[span.clone()]).zip(&mut v[span]) {
                    *m = beta1 * *m + one_minus_beta1 * g;
                    *v = beta2 * *v + one_minus_beta2 * (g * g);
                    // θ −= lr·m̂ / (√v̂ + ε) with m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t).
                    let denom = v.sqrt() * inv_sqrt_bias2 + eps;
                    *p -= step_size * (*m / denom);
                }
            }
            _ => unreachable!("the slot count is checked when the step is counted"),
        }
    }
}

/// Scalars shared by every element of one Adam step.
#[derive(Clone, Copy)]
struct AdamScalars {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    /// `lr / (1 − β1^t)`.
    step_size: f32,
    /// `1 / √(1 − β2^t)`.
    inv_sqrt_bias2: f32,
    eps: f32,
}

/// `base^exp` by binary exponentiation with plain multiplications.
///
/// Not `powi`/`powf`: their precision is documented as platform- and even call-dependent,
/// while IEEE multiplication is exactly rounded everywhere, so this gives the same bits on
/// every node (a recovered aggregator must reproduce the bias correction exactly).
fn pow_u64(base: f64, mut exp: u64) -> f64 {
    let mut result = 1.0f64;
    let mut square = base;
    while exp > 0 {
        if exp & 1 == 1 {
            result *= square;
        }
        square *= square;
        exp >>= 1;
    }
    result
}

/// Per-range optimizer state; `slots[i]` has the same length as the parameter range.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OptimizerState {
    /// Number of steps taken (Adam's bias correction reads it). Every range of one vector
    /// has the same `t`.
    pub t: u64,
    /// Per-element state, named by [`OptimizerSpec::slot_names`].
    pub slots: Vec<Vec<f32>>,
}

impl OptimizerState {
    /// The state of elements `range` of this range, for re-splitting the parameter vector
    /// over a different set of aggregators.
    ///
    /// # Panics
    ///
    /// If `range` is not within the slots, as slice indexing does; use
    /// [`OptimizerState::try_slice`] for ranges that come from outside (a config, the wire).
    pub fn slice(&self, range: Range<usize>) -> OptimizerState {
        OptimizerState { t: self.t, slots: self.slots.iter().map(|s| s[range.clone()].to_vec()).collect() }
    }

    /// [`OptimizerState::slice`] that returns an error instead of panicking on a bad range.
    /// A state without slots (SGD) accepts any well-ordered range.
    pub fn try_slice(&self, range: Range<usize>) -> Result<OptimizerState, OptimError> {
        let slots = self
            .slots
            .iter()
            .map(|s| {
                s.get(range.clone()).map(<[f32]>::to_vec).ok_or(OptimError::RangeOutOfBounds {
                    start: range.start,
                    end: range.end,
                    len: s.len(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if range.start > range.end {
            return Err(OptimError::RangeOutOfBounds {
                start: range.start,
                end: range.end,
                len: self.slots.first().map_or(0, Vec::len),
            });
        }
        Ok(OptimizerState { t: self.t, slots })
    }

    /// Joins the states of adjacent ranges, in order — the inverse of [`OptimizerState::slice`]
    /// — for merging ranges when aggregators are scaled in. All parts must have the same `t`
    /// and slot count.
    pub fn concat(parts: &[OptimizerState]) -> Result<OptimizerState, OptimError> {
        let Some(first) = parts.first() else {
            return Ok(OptimizerState { t: 0, slots: Vec::new() });
        };
        let mut slots = vec![Vec::new(); first.slots.len()];
        for part in parts {
            if part.t != first.t {
                return Err(OptimError::StepMismatch { expected: first.t, got: part.t });
            }
            if part.slots.len() != first.slots.len() {
                return Err(OptimError::PartSlotCount { expected: first.slots.len(), got: part.slots.len() });
            }
            for (joined, slot) in slots.iter_mut().zip(&part.slots) {
                joined.extend_from_slice(slot);
            }
        }
        Ok(OptimizerState { t: first.t, slots })
    }
}

/// Why an optimizer step or a state operation failed. All are caller bugs or bad configs,
/// not transient: retrying the same call fails the same way.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum OptimError {
    /// The gradient does not have one entry per parameter of the range.
    #[error("gradient length {grad} does not match parameter length {params}")]
    LengthMismatch {
        /// Length of the parameter range.
        params: usize,
        /// Length of the gradient.
        grad: usize,
    },
    /// The state has a different number of slots than the kind needs (e.g. SGD state given
    /// to Adam).
    #[error("optimizer state has {got} slots, {kind} needs {expected}")]
    SlotCount {
        /// The spec's kind.
        kind: OptimizerKind,
        /// Slots the kind needs.
        expected: usize,
        /// Slots the state has.
        got: usize,
    },
    /// A slot's length differs from the parameter range's length.
    #[error("optimizer slot {slot:?} has length {got}, parameter length is {expected}")]
    SlotLength {
        /// Name of the slot (`"m"` or `"v"`).
        slot: &'static str,
        /// Length of the parameter range.
        expected: usize,
        /// Length of the slot.
        got: usize,
    },
    /// A hyperparameter breaks its rule (see [`OptimizerSpec::validate`]).
    #[error("invalid optimizer {name} = {value}: must be {rule}")]
    InvalidHyperparameter {
        /// Field name.
        name: &'static str,
        /// Its value.
        value: f32,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// An optimizer name that is none of the known ones.
    #[error("unknown optimizer {got:?}: expected one of sgd, momentum, adam")]
    UnknownKind {
        /// The name given.
        got: String,
    },
    /// A range to slice the state by is reversed or reaches past its end.
    #[error("state range {start}..{end} out of bounds for length {len}")]
    RangeOutOfBounds {
        /// Range start.
        start: usize,
        /// Range end.
        end: usize,
        /// Length of the state's slots.
        len: usize,
    },
    /// States to join were taken at different steps.
    #[error("cannot join optimizer states of different steps: {expected} and {got}")]
    StepMismatch {
        /// `t` of the first part.
        expected: u64,
        /// `t` of the offending part.
        got: u64,
    },
    /// States to join have different numbers of slots.
    #[error("cannot join optimizer states with {expected} and {got} slots")]
    PartSlotCount {
        /// Slots of the first part.
        expected: usize,
        /// Slots of the offending part.
        got: usize,
    },
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn random_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    fn assert_same_state(a: &OptimizerState, b: &OptimizerState) {
        assert_eq!(a.t, b.t);
        assert_eq!(a.slots.len(), b.slots.len());
        for (x, y) in a.slots.iter().zip(&b.slots) {
            assert_eq!(bits(x), bits(y));
        }
    }

    /// Steps the whole vector, and separately `[0, k)` and `[k, n)` with sliced state, for
    /// `steps` steps of seeded gradients; asserts identical bits throughout.
    fn check_split(kind: OptimizerKind, n: usize, k: usize, steps: usize, seed: u64) {
        let spec = OptimizerSpec::new(kind);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut whole = random_vec(&mut rng, n);
        let mut whole_state = spec.new_state(n);
        // Take a step on the whole vector first so the sliced state is not all zeros.
        let warmup = random_vec(&mut rng, n);
        spec.step(&mut whole_state, &mut whole, &warmup).expect("valid");

        let (mut left, mut right) = (whole[..k].to_vec(), whole[k..].to_vec());
        let mut left_state = whole_state.slice(0..k);
        let mut right_state = whole_state.slice(k..n);
        for _ in 0..steps {
            let grad = random_vec(&mut rng, n);
            spec.step(&mut whole_state, &mut whole, &grad).expect("valid");
            spec.step(&mut left_state, &mut left, &grad[..k]).expect("valid");
            spec.step(&mut right_state, &mut right, &grad[k..]).expect("valid");
        }
        assert_eq!(bits(&whole[..k]), bits(&left), "{kind} split at {k}");
        assert_eq!(bits(&whole[k..]), bits(&right), "{kind} split at {k}");
        assert_same_state(&whole_state.slice(0..k), &left_state);
        assert_same_state(&whole_state.slice(k..n), &right_state);
        let joined = OptimizerState::concat(&[left_state, right_state]).expect("same step");
        assert_same_state(&whole_state, &joined);
    }

    #[test]
    fn a_step_into_another_buffer_block_by_block_has_the_bits_of_a_step_in_place() {
        // Lengths around the block size, and steps on a state that is not all zeros.
        for kind in OptimizerKind::ALL {
            let spec = OptimizerSpec::new(kind);
            for n in [1, STEP_BLOCK - 1, STEP_BLOCK, 2 * STEP_BLOCK + 7] {
                let mut rng = ChaCha8Rng::seed_from_u64(n as u64);
                let mut in_place = random_vec(&mut rng, n);
                let mut state = spec.new_state(n);
                let mut into_state = spec.new_state(n);
                let mut current = in_place.clone();
                for step in 0..3 {
                    let grad = random_vec(&mut rng, n);
                    spec.step(&mut state, &mut in_place, &grad).expect("valid");
                    let mut next = vec![f32::NAN; n];
                    let mut asked = Vec::new();
                    spec.step_into(&mut into_state, &current, &mut next, |at, g| {
                        asked.push((at, g.len()));
                        g.copy_from_slice(&grad[at..at + g.len()]);
                    })
                    .expect("valid");
                    assert_eq!(bits(&next), bits(&in_place), "{kind} n {n} step {step}");
                    assert_same_state(&state, &into_state);
                    let covered: usize = asked.iter().map(|(_, l)| l).sum();
                    assert_eq!(covered, n, "every gradient value asked for once");
                    current = next;
                }
            }
            // Checked before anything changes, as `step`.
            let mut state = spec.new_state(4);
            let err = spec.step_into(&mut state, &[0.0; 4], &mut [0.0; 3], |_, _| panic!("nothing computed"));
            assert!(matches!(err, Err(OptimError::LengthMismatch { .. })), "{err:?}");
            assert_eq!(state.t, 0);
        }
    }

    #[test]
    fn range_split_steps_give_identical_bits_for_every_kind() {
        for kind in OptimizerKind::ALL {
            for k in [0, 1, 17, 36, 37] {
                check_split(kind, 37, k, 6, 99);
            }
        }
    }

    proptest! {
        #[test]
        fn range_split_is_bit_identical_for_random_splits(
            kind_index in 0usize..3,
            n in 1usize..200,
            k_frac in 0.0f64..=1.0,
            steps in 1usize..8,
            seed in any::<u64>(),
        ) {
            let k = ((n as f64) * k_frac) as usize;
            check_split(OptimizerKind::ALL[kind_index], n, k.min(n), steps, seed);
        }
    }

    /// `f(θ) = ½ Σ a_i (θ_i − c_i)²` with its gradient.
    fn quadratic(params: &[f32], grad: &mut [f32]) -> f64 {
        const A: [f32; 4] = [1.0, 3.0, 0.5, 2.0];
        const C: [f32; 4] = [1.0, -2.0, 0.5, 3.0];
        let mut loss = 0.0;
        for i in 0..4 {
            let d = params[i] - C[i];
            grad[i] = A[i] * d;
            loss += 0.5 * f64::from(A[i] * d * d);
        }
        loss
    }

    fn minimise(kind: OptimizerKind, steps: usize) -> (f64, f64) {
        let spec = OptimizerSpec::new(kind);
        let mut params = vec![0.0f32; 4];
        let mut grad = vec![0.0f32; 4];
        let mut state = spec.new_state(4);
        let initial = quadratic(&params, &mut grad);
        for _ in 0..steps {
            quadratic(&params, &mut grad);
            spec.step(&mut state, &mut params, &grad).expect("valid");
        }
        (initial, quadratic(&params, &mut grad))
    }

    #[test]
    fn sgd_reduces_a_quadratic() {
        let (initial, last) = minimise(OptimizerKind::Sgd, 300);
        assert!(last < 1e-3 * initial, "{initial} → {last}");
    }

    #[test]
    fn momentum_reduces_a_quadratic() {
        let (initial, last) = minimise(OptimizerKind::Momentum, 300);
        assert!(last < 1e-3 * initial, "{initial} → {last}");
    }

    #[test]
    fn adam_reduces_a_quadratic() {
        let (initial, last) = minimise(OptimizerKind::Adam, 1000);
        assert!(last < 1e-3 * initial, "{initial} → {last}");
    }

    #[test]
    fn sgd_and_momentum_known_values() {
        let sgd = OptimizerSpec::new(OptimizerKind::Sgd);
        let mut p = [1.0f32];
        let mut state = sgd.new_state(1);
        sgd.step(&mut state, &mut p, &[2.0]).expect("valid");
        assert_eq!(p, [1.0 - 0.05 * 2.0]);

        let momentum = OptimizerSpec::new(OptimizerKind::Momentum);
        let mut p = [1.0f32];
        let mut state = momentum.new_state(1);
        momentum.step(&mut state, &mut p, &[2.0]).expect("valid");
        momentum.step(&mut state, &mut p, &[1.0]).expect("valid");
        // m1 = 2, m2 = 0.9·2 + 1 = 2.8; θ = 1 − 0.05·2 − 0.05·2.8 = 0.76.
        assert!((state.slots[0][0] - 2.8).abs() < 1e-6);
        assert!((p[0] - 0.76).abs() < 1e-6, "{}", p[0]);
    }

    #[test]
    fn adam_known_values_for_two_steps() {
        let mut spec = OptimizerSpec::new(OptimizerKind::Adam);
        spec.lr = 0.1;
        let mut p = [1.0f32, -1.0];
        let mut state = spec.new_state(2);
        spec.step(&mut state, &mut p, &[0.5, -4.0]).expect("valid");
        // First step: m̂ = g and v̂ = g², so each parameter moves by lr·sign(g).
        assert_eq!(state.t, 1);
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 0.9).abs() < 1e-6, "{p:?}");

        spec.step(&mut state, &mut p, &[0.25, 2.0]).expect("valid");
        // Reference in f64 for the first element.
        let (b1, b2, lr, eps) = (0.9f64, 0.999f64, 0.1f64, 1e-8f64);
        let m1 = 0.1 * 0.5;
        let v1 = 0.001 * 0.25;
        let m2 = b1 * m1 + 0.1 * 0.25;
        let v2 = b2 * v1 + 0.001 * 0.0625;
        let m_hat = m2 / (1.0 - b1 * b1);
        let v_hat = v2 / (1.0 - b2 * b2);
        let expected = 0.9 - lr * m_hat / (v_hat.sqrt() + eps);
        assert!((f64::from(p[0]) - expected).abs() < 1e-6, "{} vs {expected}", p[0]);
        assert!((f64::from(state.slots[0][0]) - m2).abs() < 1e-7);
        // 0.999f32 is not 0.999: compare relatively.
        assert!((f64::from(state.slots[1][0]) - v2).abs() < 1e-4 * v2);
    }

    #[test]
    fn pow_u64_matches_repeated_multiplication() {
        for exp in [0u64, 1, 2, 3, 10, 1000] {
            let expected = (0..exp).fold(1.0f64, |acc, _| acc * 0.999);
            assert!((pow_u64(0.999, exp) - expected).abs() < 1e-12, "{exp}");
        }
        assert_eq!(pow_u64(0.9, u64::MAX), 0.0);
        assert_eq!(pow_u64(0.0, 3), 0.0);
    }

    #[test]
    fn step_errors_leave_params_and_state_untouched() {
        let adam = OptimizerSpec::new(OptimizerKind::Adam);
        let mut params = vec![1.0f32; 3];
        let mut state = adam.new_state(3);
        assert_eq!(
            adam.step(&mut state, &mut params, &[0.0; 2]),
            Err(OptimError::LengthMismatch { params: 3, grad: 2 })
        );
        let mut sgd_state = OptimizerSpec::new(OptimizerKind::Sgd).new_state(3);
        assert_eq!(
            adam.step(&mut sgd_state, &mut params, &[0.0; 3]),
            Err(OptimError::SlotCount { kind: OptimizerKind::Adam, expected: 2, got: 0 })
        );
        state.slots[1].pop();
        let err = adam.step(&mut state, &mut params, &[0.0; 3]);
        assert_eq!(err, Err(OptimError::SlotLength { slot: "v", expected: 3, got: 2 }));
        assert!(err.unwrap_err().to_string().contains("\"v\""));
        assert_eq!(state.t, 0);
        assert_eq!(sgd_state.t, 0);
        assert_eq!(params, vec![1.0; 3]);
    }

    /// A kind, a way to break its spec, and the field the error must name.
    type Case = (OptimizerKind, fn(&mut OptimizerSpec), &'static str);

    #[test]
    fn validate_rejects_each_bad_hyperparameter() {
        let cases: [Case; 9] = [
            (OptimizerKind::Sgd, |s| s.lr = 0.0, "lr"),
            (OptimizerKind::Sgd, |s| s.lr = f32::NAN, "lr"),
            (OptimizerKind::Adam, |s| s.lr = f32::INFINITY, "lr"),
            (OptimizerKind::Momentum, |s| s.momentum = 1.0, "momentum"),
            (OptimizerKind::Momentum, |s| s.momentum = -0.1, "momentum"),
            (OptimizerKind::Adam, |s| s.beta1 = 1.0, "beta1"),
            (OptimizerKind::Adam, |s| s.beta2 = f32::NAN, "beta2"),
            (OptimizerKind::Adam, |s| s.eps = 0.0, "eps"),
            (OptimizerKind::Adam, |s| s.eps = -1e-8, "eps"),
        ];
        for (kind, break_it, field) in cases {
            let mut spec = OptimizerSpec::new(kind);
            assert_eq!(spec.validate(), Ok(()));
            break_it(&mut spec);
            match spec.validate() {
                Err(OptimError::InvalidHyperparameter { name, .. }) => assert_eq!(name, field),
                other => panic!("{kind} {field}: {other:?}"),
            }
            let mut state = spec.new_state(1);
            assert!(spec.step(&mut state, &mut [0.0], &[1.0]).is_err());
            assert_eq!(state.t, 0);
        }
        // Fields a kind does not read are not checked.
        let mut sgd = OptimizerSpec::new(OptimizerKind::Sgd);
        sgd.eps = 0.0;
        sgd.momentum = 5.0;
        assert_eq!(sgd.validate(), Ok(()));
    }

    #[test]
    fn kind_parses_displays_and_lists_choices() {
        for kind in OptimizerKind::ALL {
            assert_eq!(kind.to_string().parse::<OptimizerKind>(), Ok(kind));
        }
        let message = "rmsprop".parse::<OptimizerKind>().unwrap_err().to_string();
        for name in ["rmsprop", "sgd", "momentum", "adam"] {
            assert!(message.contains(name), "{message}");
        }
    }

    #[test]
    fn slot_names_and_new_state_match_the_kind() {
        let expected: [&[&str]; 3] = [&[], &["m"], &["m", "v"]];
        for (kind, names) in OptimizerKind::ALL.into_iter().zip(expected) {
            let spec = OptimizerSpec::new(kind);
            assert_eq!(spec.slot_names(), names);
            let state = spec.new_state(5);
            assert_eq!(state.t, 0);
            assert_eq!(state.slots, vec![vec![0.0f32; 5]; names.len()]);
        }
    }

    #[test]
    fn try_slice_and_concat_reject_bad_input() {
        let spec = OptimizerSpec::new(OptimizerKind::Adam);
        let state = spec.new_state(4);
        assert!(state.try_slice(1..3).is_ok());
        assert_eq!(state.try_slice(2..5), Err(OptimError::RangeOutOfBounds { start: 2, end: 5, len: 4 }));
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 3..1;
        assert!(state.try_slice(reversed.clone()).is_err());
        let sgd_state = OptimizerSpec::new(OptimizerKind::Sgd).new_state(4);
        assert!(sgd_state.try_slice(reversed).is_err());
        assert!(sgd_state.try_slice(0..100).is_ok());

        let mut later = state.clone();
        later.t = 3;
        assert_eq!(
            OptimizerState::concat(&[state.clone(), later]),
            Err(OptimError::StepMismatch { expected: 0, got: 3 })
        );
        assert!(matches!(
            OptimizerState::concat(&[state, sgd_state]),
            Err(OptimError::PartSlotCount { expected: 2, got: 0 })
        ));
    }
}
