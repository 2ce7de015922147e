//! Exactly-once: in every epoch every partition applied exactly its size —
//! none lost, none counted twice.

use super::Expected;
use crate::sim::SimOutcome;
use phalanx_actors::protocol::Ledger;

/// The final ledger equals the partition sizes in every epoch.
pub fn exactly_once(outcome: &SimOutcome, expected: &Expected) -> Result<(), String> {
    let Some(Ok((_, ledger))) = &outcome.result else { return Ok(()) };
    ledger_exact(ledger, expected)
}

/// The check on a ledger (per epoch, samples applied per partition), for
/// both tiers: the simulation's final ledger and a node cluster's summary.
pub fn ledger_exact(ledger: &Ledger, expected: &Expected) -> Result<(), String> {
    if ledger.len() as u32 != expected.epochs {
        return Err(format!("ledger has {} epochs, the job {}", ledger.len(), expected.epochs));
    }
    for (epoch, applied) in ledger {
        for (p, (got, want)) in applied.iter().zip(&expected.partition_sizes).enumerate() {
            if got != want {
                let what = if got > want { "duplicated" } else { "lost" };
                return Err(format!(
                    "epoch {epoch} partition {p}: {got} samples applied, partition has {want} ({} {what})",
                    got.abs_diff(*want)
                ));
            }
        }
    }
    Ok(())
}
