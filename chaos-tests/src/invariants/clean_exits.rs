//! No panics and no unexpected exit codes: every node the harness did not
//! kill exits with 0 when told to stop, and no node log reports a panic
//! (real-process tier; injected faults there are signals, aborts and damage,
//! never panics).

use serde_json::Value;

/// `summary.json`'s `node_exits` are all 0 and its `panics` empty.
pub fn clean_exits(summary: &Value) -> Result<(), String> {
    if let Some(p) = summary["panics"].as_array().and_then(|p| p.first()) {
        return Err(format!("a node panicked: {}", p.as_str().unwrap_or("?")));
    }
    for e in summary["node_exits"].as_array().into_iter().flatten() {
        if e["code"].as_i64() != Some(0) {
            return Err(format!("node {} exited badly: {}", e["node"], e["detail"].as_str().unwrap_or("?")));
        }
    }
    Ok(())
}
