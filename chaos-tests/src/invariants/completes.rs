//! The job completes (after healing) within its budget — no hang.

use super::Expected;
use crate::sim::SimOutcome;

/// The job finished successfully.
pub fn completes(outcome: &SimOutcome, _: &Expected) -> Result<(), String> {
    match &outcome.result {
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(format!("the job failed: {e}")),
        None => Err(format!(
            "no completion within the liveness budget (stopped at {} virtual ms after {} events)",
            outcome.stats.finished_at_ms, outcome.stats.events
        )),
    }
}
