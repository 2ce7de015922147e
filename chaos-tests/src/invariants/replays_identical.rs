//! Replays are identical: whenever a step of a range was committed more than
//! once (recomputed after a rollback), every commit produced the same bits.

use super::Expected;
use crate::sim::SimOutcome;

/// Every commit of `(range, step)` has the same digest.
pub fn replays_identical(outcome: &SimOutcome, _: &Expected) -> Result<(), String> {
    for ((range, step), commits) in &outcome.commits {
        if let Some((g, d)) = commits.iter().find(|(_, d)| *d != commits[0].1) {
            return Err(format!(
                "range {range} step {step}: generation {} committed {} but generation {g} committed {}",
                commits[0].0,
                &commits[0].1[..16],
                &d[..16]
            ));
        }
    }
    Ok(())
}
