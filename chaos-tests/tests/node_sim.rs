//! The simulation tier on real nodes (see `phalanx_chaos::nodes`): the node loop, membership,
//! the jobs' control plane and the actor shells of `phalanx node` on an in-memory network
//! under a paused clock.

use std::time::Duration;

use phalanx_chaos::nodes::{
    add_to_report, check_nodes, node_job, node_job_placed, run_nodes, run_seeds, run_seeds_of, FaultKind, NodeFault,
    NodeSimOptions,
};
use phalanx_chaos::report::Report;

/// Seeds run in `cargo test` (`PHALANX_NODE_SIM_SEEDS` to change; the campaign command
/// takes `--seeds`).
const SEEDS: u64 = 500;

#[test]
fn a_fault_free_cluster_finishes_bit_identical() {
    let (job, expected) = node_job();
    let dir = phalanx_chaos::nodes::sim_tempdir().unwrap();
    let opts = NodeSimOptions { faults: 0, ..NodeSimOptions::new(1) };
    let outcome = run_nodes(&job, &opts, dir.path());
    let violations = check_nodes(&outcome, &expected);
    assert!(violations.is_empty(), "{violations:?}");
    assert!(outcome.events.iter().any(|e| e["event"] == "commit"), "commits are recorded");
}

/// Every seed, every invariant (seeds 132 and 1424 once broke the lease invariant: a woken
/// coordinator that kept its quorum went on with its old term after its successor's).
#[test]
fn every_seed_keeps_every_invariant_under_every_kind_of_fault() {
    let seeds = std::env::var("PHALANX_NODE_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(SEEDS);
    let verdicts = run_seeds(0..seeds, 2);
    let mut report = Report { identical: true, ..Report::default() };
    add_to_report(&verdicts, &mut report);
    eprintln!("{}", report.markdown());
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert_eq!(report.seeds_run, seeds);
    for kind in FaultKind::ALL {
        let row = &report.fault_types[&format!("simulated nodes: {}", kind.name())];
        // Two crashes at once only on the five-node seeds (one in five).
        let least = if kind.fits(3) { seeds / 10 } else { seeds / 100 };
        assert!(row.injected >= least, "{}: only {} injected", kind.name(), row.injected);
    }
    // The faults bit: nodes were declared down, coordinators changed, frames were lost.
    let events = verdicts.iter().flat_map(|v| v.outcome.events.iter());
    let takeovers = events.filter(|e| e["event"] == "coordinating" && e["node"] != 0).count();
    assert!(takeovers as u64 >= seeds / 10, "only {takeovers} takeovers in {seeds} seeds");
    let lost: u64 = verdicts.iter().map(|v| v.outcome.net.frames.lost).sum();
    assert!(lost > 0, "no frame was lost");
}

/// The same faults with the job's two aggregator ranges spread over the nodes (range 1 on node
/// 1, moving when it dies): every invariant holds — bits, exactly-once, one lineage, no two
/// terms committing at once — and ranges hosted off the coordinator were lost with their node
/// and restored elsewhere. (The first runs of this test found a location map arriving after a
/// newer one, and a stale range left running on a node that came back, shadowing the moved
/// one: the job stalled in about 1 seed in 6.)
#[test]
fn spread_ranges_keep_every_invariant_under_every_kind_of_fault() {
    let seeds = std::env::var("PHALANX_NODE_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(SEEDS / 2);
    let job = node_job_placed(phalanx::config::AggregatorPlacement::Spread);
    let verdicts = run_seeds_of(&job, 0..seeds, 2);
    let mut report = Report { identical: true, ..Report::default() };
    add_to_report(&verdicts, &mut report);
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    let hosted_lost = verdicts
        .iter()
        .filter(|v| {
            v.outcome.events.iter().any(|e| {
                e["event"] == "recovered"
                    && e["cause"] == "node_lost"
                    && e["actors"].as_array().is_some_and(|a| a.iter().any(|x| x == "aggregator 1"))
            })
        })
        .count();
    assert!(hosted_lost as u64 >= seeds / 20, "range 1 was lost with its node in only {hosted_lost} seeds");
}

/// The coordinator stands still past its lease while the others elect a successor, then
/// wakes believing it still coordinates. (That leases are what keeps it from committing
/// beside its successor is shown on the membership core, which can stop a node between
/// receiving and committing: `without_leases_the_commit_invariant_fails` in
/// `runtime/src/cluster/membership.rs`; here a woken node's loop hears the news before its
/// aggregators get to run.)
fn pause_the_coordinator() -> (Vec<String>, Vec<serde_json::Value>) {
    let (job, expected) = node_job();
    let dir = phalanx_chaos::nodes::sim_tempdir().unwrap();
    let pause = NodeFault {
        kind: FaultKind::Pause,
        at: Duration::from_millis(600),
        lasts: Duration::from_millis(1_000),
        node: 0,
        peer: None,
        probability: 0.0,
    };
    let opts = NodeSimOptions { plan: Some(vec![pause]), ..NodeSimOptions::new(7) };
    let outcome = run_nodes(&job, &opts, dir.path());
    (check_nodes(&outcome, &expected), outcome.events)
}

/// The woken coordinator may handle its peers' queued heartbeats before its tick. Its old term
/// must not go on after its successor's: it did, about one run in two, before a term whose lease
/// lapsed while a member served another coordinator ended; and since the membership core
/// starts over as a newcomer when it stood still past the failure timeout
/// (`a_coordinator_woken_to_a_heartbeat_queued_before_its_pause_rejoins_its_successors_term` in
/// `runtime/src/cluster/membership.rs`), it does not coordinate again at all. Node 0 ends up in
/// a view newer than its successor's.
#[test]
fn a_coordinator_woken_from_a_pause_commits_nothing_beside_its_successor() {
    let (violations, events) = pause_the_coordinator();
    assert!(violations.is_empty(), "{violations:?}");
    let successor = events
        .iter()
        .filter(|e| e["event"] == "view" && e["coordinator"] != 0)
        .filter_map(|e| e["epoch"].as_u64())
        .min()
        .expect("another node took over while node 0 stood still");
    let woke = events
        .iter()
        .any(|e| e["node"] == 0 && e["event"] == "view" && e["epoch"].as_u64().is_some_and(|epoch| epoch >= successor));
    assert!(woke, "node 0 woke into a view at least as new as its successor's (epoch {successor})");
    let usurped = events.iter().find(|e| {
        e["node"] == 0
            && e["event"] == "view"
            && e["coordinator"] == 0
            && e["epoch"].as_u64().is_some_and(|epoch| epoch >= successor)
    });
    assert!(usurped.is_none(), "the coordinator is sticky: node 0 coordinated again after waking: {usurped:?}");
}

/// `PHALANX_NODE_SIM_SEED=N cargo test -p phalanx-chaos --test node_sim one_seed -- --ignored
/// --nocapture`: one seed's faults, violations and events (commits left out), for reading a
/// failing seed's story.
#[test]
#[ignore]
fn one_seed() {
    let seed = std::env::var("PHALANX_NODE_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let (job, expected) = node_job();
    let dir = phalanx_chaos::nodes::sim_tempdir().unwrap();
    let outcome = run_nodes(&job, &NodeSimOptions::new(seed), dir.path());
    eprintln!("faults: {:?}", outcome.faults);
    eprintln!("start: {} ms", outcome.start_ms);
    for e in outcome.events.iter().filter(|e| e["event"] != "commit" && e["event"] != "step") {
        eprintln!("{e}");
    }
    eprintln!("violations: {:?}", check_nodes(&outcome, &expected));
}
