//! Exactly-once: in every epoch every partition applied exactly its size —
//! none lost, none counted twice.
//!
//! The aggregators fold each finished epoch into counts as it ends (the
//! ledger does not grow with the job), so the check reads the counts: every
//! epoch exact against the partition sizes, no epoch inexact, and — so that
//! a wrong idea of the sizes inside the aggregators cannot pass — the
//! samples applied per partition over all epochs equal epochs × size.

use super::Expected;
use crate::sim::SimOutcome;
use phalanx_actors::protocol::{ClosedEpochs, Ledger};

/// The final ledger equals the partition sizes in every epoch.
pub fn exactly_once(outcome: &SimOutcome, expected: &Expected) -> Result<(), String> {
    let Some(Ok((_, ledger))) = &outcome.result else { return Ok(()) };
    ledger_exact(ledger, expected)
}

/// The check on a ledger (open epochs by row, finished ones folded), for
/// both tiers: the simulation's final ledger and a node cluster's summary.
pub fn ledger_exact(ledger: &Ledger, expected: &Expected) -> Result<(), String> {
    let sizes = &expected.partition_sizes;
    let epochs = u64::from(expected.epochs);
    if ledger.epochs() != epochs {
        return Err(format!("ledger has {} epochs, the job {}", ledger.epochs(), expected.epochs));
    }
    if let Some((epoch, applied)) = ledger.first_inexact(sizes) {
        for (p, (got, want)) in applied.iter().zip(sizes).enumerate() {
            if got != want {
                let what = if got > want { "duplicated" } else { "lost" };
                return Err(format!(
                    "epoch {epoch} partition {p}: {got} samples applied, partition has {want} ({} {what})",
                    got.abs_diff(*want)
                ));
            }
        }
        return Err(format!(
            "epoch {epoch}: {} partitions applied samples, the job has {}",
            applied.len(),
            sizes.len()
        ));
    }
    let mut all = ledger.clone();
    all.close_before(u64::MAX, sizes);
    let ClosedEpochs { exact, per_partition, lost, duplicated, .. } = &all.closed;
    if *exact != epochs || *lost != 0 || *duplicated != 0 {
        return Err(format!(
            "{exact} of {epochs} epochs applied exactly once ({lost} samples lost, {duplicated} duplicated)"
        ));
    }
    let want: Vec<u64> = sizes.iter().map(|s| s * epochs).collect();
    if *per_partition != want {
        return Err(format!(
            "samples applied per partition over {epochs} epochs: {per_partition:?}, partitions have {want:?}"
        ));
    }
    Ok(())
}
