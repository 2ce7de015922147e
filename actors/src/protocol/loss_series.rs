//! A loss curve of bounded size: the mean loss of every `stride`-th step.
//!
//! A job of millions of steps cannot keep every step's loss in memory (the
//! full per-step history is streamed to a file instead). The supervisor keeps
//! this downsampled curve for summaries and plots: points at multiples of a
//! stride that doubles whenever the curve would exceed [`LOSS_POINTS`], plus
//! the newest step. Points are keyed by step, so a step recomputed after a
//! rollback replaces its earlier value, as the full history did.
//!
//! ```
//! use phalanx_actors::protocol::{LossSeries, LOSS_POINTS};
//! let mut s = LossSeries::new();
//! for step in 1..=1_000_000u64 {
//!     s.record(step, 1.0 / step as f64);
//! }
//! let points = s.points();
//! assert!(points.len() <= LOSS_POINTS + 1);
//! assert_eq!(points.last(), Some(&(1_000_000, 1e-6)));
//! ```

use std::collections::BTreeMap;

/// Most points a [`LossSeries`] keeps at a multiple of its stride (the newest
/// step comes on top).
pub const LOSS_POINTS: usize = 1024;

/// Mean loss per step, downsampled to at most [`LOSS_POINTS`] + 1 points.
#[derive(Clone, Debug, PartialEq)]
pub struct LossSeries {
    /// Steps kept are multiples of this (a power of two).
    stride: u64,
    points: BTreeMap<u64, f64>,
    newest: Option<(u64, f64)>,
}

impl Default for LossSeries {
    fn default() -> Self {
        Self::new()
    }
}

impl LossSeries {
    /// An empty curve that keeps every step until it holds [`LOSS_POINTS`].
    pub fn new() -> Self {
        Self { stride: 1, points: BTreeMap::new(), newest: None }
    }

    /// The mean loss of the step that produced version `step`.
    pub fn record(&mut self, step: u64, loss: f64) {
        self.newest = Some((step, loss));
        if step % self.stride != 0 {
            return;
        }
        self.points.insert(step, loss);
        while self.points.len() > LOSS_POINTS {
            self.stride *= 2;
            let stride = self.stride;
            self.points.retain(|s, _| s % stride == 0);
        }
    }

    /// The steps kept are multiples of this.
    pub fn stride(&self) -> u64 {
        self.stride
    }

    /// The curve as `(step, loss)` in step order, the newest step included.
    pub fn points(&self) -> Vec<(u64, f64)> {
        self.to_map().into_iter().collect()
    }

    /// The curve as a map from step to loss, the newest step included.
    pub fn to_map(&self) -> BTreeMap<u64, f64> {
        let mut map = self.points.clone();
        if let Some((step, loss)) = self.newest {
            map.insert(step, loss);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_curves_keep_every_step() {
        let mut s = LossSeries::new();
        for step in 1..=100 {
            s.record(step, step as f64);
        }
        assert_eq!(s.stride(), 1);
        assert_eq!(s.points().len(), 100);
    }

    #[test]
    fn long_curves_stay_bounded_and_evenly_spaced() {
        let mut s = LossSeries::new();
        for step in 1..=300_007u64 {
            s.record(step, step as f64);
            assert!(s.points.len() <= LOSS_POINTS);
        }
        let points = s.points();
        assert!(points.len() > LOSS_POINTS / 2 && points.len() <= LOSS_POINTS + 1, "{}", points.len());
        let stride = s.stride();
        assert!(points[..points.len() - 1].iter().all(|(step, _)| step % stride == 0));
        assert_eq!(points.last(), Some(&(300_007, 300_007.0)));
    }

    #[test]
    fn a_recomputed_step_replaces_its_value() {
        let mut s = LossSeries::new();
        for step in 1..=10 {
            s.record(step, 1.0);
        }
        // Rolled back to 5; steps 6.. are recomputed.
        s.record(6, 2.0);
        assert_eq!(s.to_map()[&6], 2.0);
        assert_eq!(s.to_map().len(), 10);
    }
}
