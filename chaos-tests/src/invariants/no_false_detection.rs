//! No false detection: a member is declared down only when a fault could have silenced it.
//!
//! The failure detector trades speed for certainty (a timeout on heartbeats). Recovery must be
//! fast, but a node declared down while it was alive and talking costs a view change, a
//! restart of its actors and a replay, for nothing. In a real-process run the faults say which
//! nodes may fall silent: killed, paused, crashed, wiped or restarted ones. A `down` event that
//! names any other member is a false detection — unless a silenced node declared it: a node
//! woken from a pause (or started again) has heard nobody for as long as it slept, and saying
//! so is its detector working. Runs that cut or degrade links are not checked (any member may
//! then be silent to another), nor runs that stop, kill or restart members of a coordination
//! service (a node's lease or session may run out before the service answers again).

use phalanx::local::NodeFault;
use serde_json::Value;

/// `Ok` if every `down` event among `events` names a node one of `faults` silences, or comes
/// from such a node (or the faults cut or degrade links); else the first false detection, with
/// who declared it and when.
pub fn no_false_detection(faults: &[NodeFault], events: &[Value]) -> Result<(), String> {
    let mut silenced = Vec::new();
    for fault in faults {
        match fault {
            NodeFault::Partition { .. } | NodeFault::Degrade { .. } => return Ok(()),
            NodeFault::Kill { node, .. }
            | NodeFault::Pause { node, .. }
            | NodeFault::Restart { node, .. }
            | NodeFault::CrashBeforeRename { node, .. }
            | NodeFault::Wipe { node, .. }
            | NodeFault::ServiceCut { node, .. } => silenced.push(u64::from(*node)),
            // While the service (or its leader) is away, any node's lease may run out before
            // it can be renewed: losing the membership then is the rule working.
            NodeFault::ServiceKill { .. } | NodeFault::ServicePause { .. } | NodeFault::ServiceRestart { .. } => {
                return Ok(())
            }
            NodeFault::DiskFull { .. }
            | NodeFault::Corrupt { .. }
            | NodeFault::Duplicate { .. }
            | NodeFault::Rogue { .. } => {}
        }
    }
    let silenced_one = |field: &Value| field.as_u64().is_some_and(|n| silenced.contains(&n));
    let mut downs = events.iter().filter(|e| e["event"] == "down" && !silenced_one(&e["node"]));
    match downs.find(|e| !silenced_one(&e["peer"])) {
        None => Ok(()),
        Some(e) => Err(format!(
            "node {} was declared down by node {} at {} ms (Unix), but no fault silenced it (faults silence {:?}): \
             the detector fired on a live member",
            e["peer"], e["node"], e["t_ms"], silenced
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn down(node: u64, peer: u64) -> Value {
        json!({ "event": "down", "node": node, "peer": peer, "t_ms": 17 })
    }

    #[test]
    fn only_silenced_nodes_may_be_declared_down() {
        let kill = [NodeFault::Kill { node: 1, step: 300 }];
        let events = [json!({ "event": "view", "node": 0 }), down(0, 1), down(2, 1)];
        assert_eq!(no_false_detection(&kill, &events), Ok(()));
        let err = no_false_detection(&kill, &[down(0, 1), down(2, 0)]).unwrap_err();
        assert!(err.contains("node 0 was declared down by node 2 at 17 ms"), "{err}");
        // The silenced node itself, woken, may declare the others down.
        let pause = [NodeFault::Pause { node: 1, step: 300, ms: 900 }];
        assert_eq!(no_false_detection(&pause, &[down(1, 0), down(1, 2), down(0, 1)]), Ok(()));
        // No fault at all: any down is false.
        assert!(no_false_detection(&[], &[down(0, 1)]).is_err());
        assert_eq!(no_false_detection(&[], &[]), Ok(()));
        // A rogue or a full disk silences nobody.
        let rogue = [NodeFault::Rogue { node: 2, step: 100 }];
        assert!(no_false_detection(&rogue, &[down(0, 2)]).is_err());
    }

    #[test]
    fn cut_or_degraded_links_are_not_checked() {
        let cut = [NodeFault::Partition { side: vec![0], step: 300, ms: 900 }];
        assert_eq!(no_false_detection(&cut, &[down(1, 2)]), Ok(()));
    }
}
