//! Every forged message is rejected (real-process tier, a rogue member): for each kind the
//! rogue forged, the members it went to dropped and counted as many, and nothing of it was
//! obeyed — the other invariants (bit-identical, no panic) show that.
//!
//! Read from the run's `events.jsonl`: the rogue's `forged` events (`node` = the rogue, `to`,
//! `kind`) and the members' `message_rejected` events (`node` = the member, `peer`, `kind`,
//! `count`: the member's running total of that kind from that peer; the last event of a burst
//! carries the final total). So the rejected count of a kind is the sum, over the members, of
//! their highest `count` from the rogue. A frame that breaks the codec (`oversized-frame`)
//! closes the connection, so frames the transport reads from it afterwards may be counted
//! too: there at least as many must be rejected as were forged; every other kind exactly as
//! many.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// The kind of a frame above the receiver's size limit (see `phalanx::cluster::rejections`).
pub const OVERSIZED_FRAME: &str = "oversized-frame";

/// One kind's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ForgedCount {
    /// Messages of this kind the rogue handed to its transport (its `forged` events).
    pub forged: u64,
    /// Of this kind from the rogue, dropped and counted by the members (their final totals).
    pub rejected: u64,
}

/// Forged and rejected messages per kind, from a run's events (the nodes that forged are
/// the peers whose rejections count).
pub fn tally(events: &[Value]) -> BTreeMap<String, ForgedCount> {
    let mut out: BTreeMap<String, ForgedCount> = BTreeMap::new();
    let rogues: std::collections::BTreeSet<u64> =
        events.iter().filter(|e| e["event"] == "forged").filter_map(|e| e["node"].as_u64()).collect();
    // (member, rogue, kind) → the highest running total.
    let mut finals: BTreeMap<(u64, u64, String), u64> = BTreeMap::new();
    for e in events {
        let kind = e["kind"].as_str().unwrap_or("?").to_string();
        match e["event"].as_str() {
            Some("forged") => out.entry(kind).or_default().forged += 1,
            Some("message_rejected") => {
                let (Some(node), Some(peer)) = (e["node"].as_u64(), e["peer"].as_u64()) else { continue };
                if node != peer && rogues.contains(&peer) {
                    let count = e["count"].as_u64().unwrap_or(0);
                    let total = finals.entry((node, peer, kind)).or_default();
                    *total = (*total).max(count);
                }
            }
            _ => {}
        }
    }
    for ((_, _, kind), count) in finals {
        // Only kinds the rogue forged: an honest message of another kind it sent and a member
        // dropped is not what this invariant is about.
        if let Some(c) = out.get_mut(&kind) {
            c.rejected += count;
        }
    }
    out
}

/// Every kind forged was rejected as often (`oversized-frame`: at least as often).
pub fn forged_rejected(tally: &BTreeMap<String, ForgedCount>) -> Result<(), String> {
    if tally.is_empty() {
        return Err("the rogue forged nothing (no `forged` event)".into());
    }
    let wrong: Vec<String> = tally
        .iter()
        .filter(
            |(kind, c)| if kind.as_str() == OVERSIZED_FRAME { c.rejected < c.forged } else { c.rejected != c.forged },
        )
        .map(|(kind, c)| format!("{kind}: {} forged, {} rejected", c.forged, c.rejected))
        .collect();
    match wrong.is_empty() {
        true => Ok(()),
        false => Err(format!("forged messages not rejected as often as sent: {}", wrong.join("; "))),
    }
}

/// The events of a run's `events.jsonl` (lines that are not JSON are skipped).
pub fn read_events(path: &std::path::Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn forged(to: u64, kind: &str) -> Value {
        json!({ "event": "forged", "node": 2, "t_ms": 1, "to": to, "kind": kind })
    }

    fn rejected(node: u64, kind: &str, count: u64) -> Value {
        json!({ "event": "message_rejected", "node": node, "t_ms": 2, "peer": 2, "kind": kind, "reason": "x", "count": count })
    }

    /// Two rounds of a rogue (node 2) to nodes 0 and 1, each member reporting its totals at a
    /// bounded rate (the last event carries the final total).
    fn run() -> Vec<Value> {
        let mut events = Vec::new();
        for _round in 0..2 {
            for to in [0, 1] {
                for kind in ["job-done", "view", OVERSIZED_FRAME] {
                    events.push(forged(to, kind));
                }
            }
        }
        for node in [0, 1] {
            events.push(rejected(node, "job-done", 1));
            events.push(rejected(node, "view", 1));
            events.push(rejected(node, OVERSIZED_FRAME, 1));
            events.push(rejected(node, "job-done", 2));
            events.push(rejected(node, "view", 2));
            events.push(rejected(node, OVERSIZED_FRAME, 3));
        }
        // An honest kind dropped from the rogue, and a rejection of another peer: not counted.
        events.push(rejected(0, "gradients", 5));
        events.push(json!({ "event": "message_rejected", "node": 1, "peer": 0, "kind": "view", "count": 9 }));
        events
    }

    #[test]
    fn passes_when_every_forged_kind_was_rejected_as_often() {
        let t = tally(&run());
        assert_eq!(t["job-done"], ForgedCount { forged: 4, rejected: 4 });
        assert_eq!(t["view"], ForgedCount { forged: 4, rejected: 4 });
        assert_eq!(t[OVERSIZED_FRAME], ForgedCount { forged: 4, rejected: 6 }, "more is fine for frames");
        assert!(!t.contains_key("gradients"));
        assert_eq!(forged_rejected(&t), Ok(()));
    }

    #[test]
    fn fails_when_a_forged_kind_was_not_rejected() {
        // Node 1 obeyed the second job-done: its final total stayed at 1.
        let events: Vec<Value> =
            run().into_iter().filter(|e| !(e["node"] == 1 && e["kind"] == "job-done" && e["count"] == 2)).collect();
        let e = forged_rejected(&tally(&events)).unwrap_err();
        assert!(e.contains("job-done: 4 forged, 3 rejected"), "{e}");
        // A kind nobody rejected at all.
        let mut events = run();
        events.push(forged(0, "rollback"));
        let e = forged_rejected(&tally(&events)).unwrap_err();
        assert!(e.contains("rollback: 1 forged, 0 rejected"), "{e}");
        // Fewer oversized frames counted than forged.
        let events: Vec<Value> =
            run().into_iter().filter(|e| e["kind"] != OVERSIZED_FRAME || e["event"] == "forged").collect();
        assert!(forged_rejected(&tally(&events)).unwrap_err().contains("oversized-frame: 4 forged, 0 rejected"));
        // More rejections than forgeries of an exact kind: something else was counted as forged.
        let mut events = run();
        events.push(rejected(0, "view", 3));
        assert!(forged_rejected(&tally(&events)).unwrap_err().contains("view: 4 forged, 5 rejected"));
    }

    #[test]
    fn fails_when_nothing_was_forged() {
        assert!(forged_rejected(&tally(&[])).unwrap_err().contains("forged nothing"));
    }
}
