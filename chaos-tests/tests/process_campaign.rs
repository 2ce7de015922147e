//! The real-process tier in CI: each node fault type once (SIGKILL of a
//! trainer node and of the aggregator node, SIGSTOP shorter and longer than
//! detection, kill + restart) against 3 `phalanx node` processes; every run
//! completes bit-identical with exactly-once accounting.

use phalanx_chaos::process::{find_phalanx, process_campaign};
use phalanx_chaos::report::Report;

#[test]
fn every_node_fault_type_keeps_every_invariant() {
    let exe = find_phalanx().expect(
        "the phalanx binary next to this test (target/<profile>/phalanx): run the workspace tests \\
         (cargo test --workspace) or build it first (cargo build -p phalanx)",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut report = Report { identical: true, ..Report::default() };
    process_campaign(&exe, dir.path(), &mut report).unwrap();
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!(report.seeds_run, 5);
    assert_eq!((report.samples_lost, report.samples_duplicated), (0, 0));
    assert_eq!(report.faults_injected, report.faults_survived);
    for (name, f) in &report.fault_types {
        assert!(f.injected >= 1, "{name}");
        if name.contains("longer") || name.contains("SIGKILL") {
            let p = f.restart_ms.p50.unwrap_or_else(|| panic!("{name}: detected"));
            assert!(p < 1_000, "{name}: detection {p} ms");
        }
    }
    report.write(dir.path()).unwrap();
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("SIGKILL aggregator node"), "{md}");
}
