//! Real node processes over real QUIC with mutual TLS on 127.0.0.1: they
//! form a view, detect a SIGKILLed node in under a second (on its host's refusal of a probe,
//! not the failure timeout), take a restarted node back, fence a paused node (after the
//! timeout: its socket still takes the probes) and take it back when it resumes.

mod common;

use common::cluster::Cluster;

#[test]
fn three_node_processes_form_a_view_with_node_zero_coordinating() {
    let c = Cluster::start(3);
    for id in 0..3 {
        let v = c.wait_view(0, id, &[0, 1, 2]);
        assert_eq!(v["coordinator"], 0);
    }
}

#[test]
fn a_killed_node_is_detected_in_under_a_second_and_a_restarted_one_rejoins() {
    let mut c = Cluster::start(3);
    c.wait_view(0, 0, &[0, 1, 2]);
    c.wait_view(0, 2, &[0, 1, 2]);
    let since = c.mark();
    let killed_at = c.kill(2);
    let down = c
        .wait_for(since, "node 0 to declare node 2 down", |v| v["event"] == "down" && v["node"] == 0 && v["peer"] == 2);
    let detection_ms = down["t_ms"].as_u64().unwrap().saturating_sub(killed_at);
    assert!(detection_ms < 1_000, "detection took {detection_ms} ms");
    // The process is gone and its host is up: node 0's probe of the silent member was refused.
    assert_eq!(down["cause"], "refused", "{down}");
    let shrunk = c.wait_view(since, 1, &[0, 1]);
    let since = c.mark();
    let node = c.spawn(2);
    c.nodes[2] = Some(node);
    let grown = c.wait_view(since, 1, &[0, 1, 2]);
    assert!(grown["epoch"].as_u64() > shrunk["epoch"].as_u64());
}

#[test]
fn a_paused_coordinator_is_replaced_and_rejoins_the_new_coordinators_view() {
    let c = Cluster::start(3);
    let first = c.wait_view(0, 2, &[0, 1, 2]);
    // Node 0's own event of that view too, before it is stopped: written after the wake-up, it
    // would read as a view node 0 adopted then.
    c.wait_view(0, 0, &[0, 1, 2]);
    let since = c.mark();
    c.signal(0, "STOP");
    let takeover =
        c.wait_for(since, "node 1 to coordinate", |v| v["event"] == "view" && v["node"] == 2 && v["coordinator"] == 1);
    // A stopped process still holds its socket: no refusal, the failure timeout decided.
    let down = c
        .wait_for(since, "node 1 to declare node 0 down", |v| v["event"] == "down" && v["node"] == 1 && v["peer"] == 0);
    assert_eq!(down["cause"], "silence", "{down}");
    assert!(takeover["epoch"].as_u64() > first["epoch"].as_u64());
    let since = c.mark();
    c.signal(0, "CONT");
    let back = c.wait_view(since, 0, &[0, 1, 2]);
    // The coordinator is sticky: node 0 joins node 1's view, it does not take over again.
    assert_eq!(back["coordinator"], 1);
    assert!(back["epoch"].as_u64() > takeover["epoch"].as_u64(), "the woken node cannot reuse its stale epoch");
}
