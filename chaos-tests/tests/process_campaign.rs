//! The real-process tier in CI: every built-in scenario of
//! `chaos-tests/scenarios/` once against `phalanx node` processes — SIGKILL
//! of a trainer node, of the aggregator node, of two nodes at once; SIGSTOP
//! shorter and longer than detection, and of the coordinator past its lease
//! while the others elect a successor; kill + restart; a partition isolating
//! the aggregator node or a trainer node; packet loss, delay, jitter and
//! duplication; full checkpoint disks (tmpfs), with and without a kill; a
//! crash between checkpoint write and rename; a corrupted checkpoint copy; a
//! second process started with a member's identity; a rogue member that forges
//! job-done, spawn, rollback, view, checkpoint-copy, params and gradient
//! messages and oversized frames; and, on a coordination service started for
//! the run, the coordinator's node killed on etcd, the etcd leader of three
//! SIGKILLed, etcd stopped briefly, a node cut off from etcd but not from its
//! peers, ZooKeeper stopped past the session timeout.
//! Every run completes bit-identical to the plain loop with exactly-once
//! accounting, never loads a bad checkpoint, exits cleanly, and shows that
//! its faults took effect; every forged message is rejected; and its `commit`
//! events show no two coordinators committing at once and one parameter hash
//! per range and step.

use phalanx_chaos::process::{find_phalanx, process_campaign, BUILTIN};
use phalanx_chaos::report::Report;

#[test]
fn every_process_scenario_keeps_every_invariant() {
    let exe = find_phalanx().expect(
        "the phalanx binary next to this test (target/<profile>/phalanx): run the workspace tests \
         (cargo test --workspace) or build it first (cargo build -p phalanx)",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut report = Report { identical: true, ..Report::default() };
    process_campaign(&exe, &dir.path().join("processes"), &mut report).unwrap();
    if !report.violations.is_empty() {
        // Keep the runs' events and node logs for the post-mortem.
        let kept = dir.keep();
        panic!("{:#?}\nevents and node logs kept in {}", report.violations, kept.display());
    }
    assert!(report.identical);
    assert_eq!(report.seeds_run, BUILTIN.len() as u64);
    assert_eq!((report.samples_lost, report.samples_duplicated), (0, 0));
    assert_eq!(report.faults_injected, report.faults_survived);
    for (name, f) in &report.fault_types {
        assert!(f.injected >= 1, "{name}");
        assert!(f.slowdown.is_some_and(|s| s > 0.0), "{name}");
        if name.starts_with("SIGKILL") {
            let p = f.restart_ms.p50.unwrap_or_else(|| panic!("{name}: detected"));
            assert!(p < 1_000, "{name}: detection {p} ms");
        }
    }
    report.write(dir.path()).unwrap();
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("| SIGKILL aggregator node |"), "{md}");
    // The rogue member's forgeries, each kind rejected.
    for kind in ["job-done", "spawn", "rollback", "view", "checkpoint-copy", "params", "gradient", "oversized-frame"] {
        let c = report
            .forged_rejected
            .get(kind)
            .unwrap_or_else(|| panic!("no forged {kind}: {:?}", report.forged_rejected));
        assert!(c.forged > 0 && c.rejected >= c.forged, "{kind}: {c:?}");
    }
    assert!(md.contains("## Forged messages rejected, by kind"), "{md}");
    let svg = std::fs::read_to_string(dir.path().join("processes.svg")).unwrap();
    assert!(svg.contains("steps / s") && svg.contains("resumed"), "the plot shows throughput and recovery");
}
