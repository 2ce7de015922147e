//! A bad checkpoint is never loaded: no coordinator took over from a
//! checkpoint the harness corrupted on its node, or from one whose write was
//! cut short by a crash before the rename (real-process tier).

use serde_json::Value;

/// Every takeover in a node cluster's `summary.json` restored a good
/// checkpoint: none restored, on the node where it went bad, a step that a
/// `corrupt` or `crash-before-rename` fault damaged.
pub fn no_bad_checkpoint(summary: &Value) -> Result<(), String> {
    let bad: Vec<(u64, u64)> = summary["node_faults"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| Some((f["node"].as_u64()?, f["checkpoint_step"].as_u64()?)))
        .collect();
    for t in summary["takeovers"].as_array().into_iter().flatten() {
        let (Some(node), Some(restore)) = (t["node"].as_u64(), t["restore"].as_u64()) else { continue };
        if bad.contains(&(node, restore)) {
            return Err(format!(
                "node {node} took over (epoch {}) from checkpoint {restore}, which was damaged on that node",
                t["epoch"]
            ));
        }
    }
    Ok(())
}
