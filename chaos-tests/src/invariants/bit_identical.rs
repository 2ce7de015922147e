//! Bit-identical: the final parameters hash to the fault-free run's.

use super::Expected;
use crate::sim::SimOutcome;

/// SHA-256 of the final parameters equals the fault-free one.
pub fn bit_identical(outcome: &SimOutcome, expected: &Expected) -> Result<(), String> {
    let Some(Ok((params, _))) = &outcome.result else { return Ok(()) };
    sha_matches(&phalanx::params_sha256(params), &expected.params_sha256)
}

/// The check on a final-model SHA-256 (hex) against the fault-free one of the same kind, for
/// both tiers.
pub fn sha_matches(got: &str, expected: &str) -> Result<(), String> {
    if got == expected {
        Ok(())
    } else {
        Err(format!(
            "final model {} differs from the fault-free {}",
            got.get(..16).unwrap_or(got),
            expected.get(..16).unwrap_or(expected)
        ))
    }
}
