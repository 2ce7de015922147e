//! No split brain: within one generation each step of a range is committed
//! at most once (one live aggregator per range and generation).

use std::collections::BTreeSet;

use super::Expected;
use crate::sim::SimOutcome;

/// No `(range, step, generation)` is committed twice.
pub fn no_split_brain(outcome: &SimOutcome, _: &Expected) -> Result<(), String> {
    for ((range, step), commits) in &outcome.commits {
        let mut seen = BTreeSet::new();
        for (generation, _) in commits {
            if !seen.insert(*generation) {
                return Err(format!("range {range} step {step} committed twice in generation {generation}"));
            }
        }
    }
    Ok(())
}
