//! Bit-identical: the final parameters hash to the fault-free run's.

use super::Expected;
use crate::sim::SimOutcome;

/// SHA-256 of the final parameters equals the fault-free one.
pub fn bit_identical(outcome: &SimOutcome, expected: &Expected) -> Result<(), String> {
    let Some(Ok((params, _))) = &outcome.result else { return Ok(()) };
    let got = phalanx::params_sha256(params);
    if got == expected.model_sha256 {
        Ok(())
    } else {
        Err(format!("final model {} differs from the fault-free {}", &got[..16], &expected.model_sha256[..16]))
    }
}
