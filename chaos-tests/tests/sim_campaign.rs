//! The deterministic-simulation campaign: at least 200 seeds of crashes,
//! restarts, drops, duplicates and reorderings against the real protocol
//! cores; every invariant must hold for every seed. A failure prints the
//! seed and the command that replays it.
//!
//! PHALANX_SIM_SEEDS=N runs N seeds (default 240); PHALANX_SIM_SEED=S runs one.

use phalanx_chaos::invariants::check_all;
use phalanx_chaos::sim::{campaign_jobs, simulate, SimOptions};

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("PHALANX_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![s];
    }
    let n = std::env::var("PHALANX_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(240u64);
    (0..n).collect()
}

#[test]
fn every_seed_keeps_every_invariant() {
    let jobs = campaign_jobs();
    let mut failures = Vec::new();
    let (mut crashes, mut dropped, mut rollbacks) = (0, 0, 0);
    let seeds = seeds();
    for &seed in &seeds {
        let sim = &jobs[(seed % jobs.len() as u64) as usize];
        let outcome = simulate(&sim.job, &SimOptions::new(seed));
        crashes += outcome.stats.crashes;
        dropped += outcome.stats.dropped;
        rollbacks += outcome.stats.rollbacks;
        let violations = check_all(&outcome, &sim.expected);
        if !violations.is_empty() {
            failures.push(format!(
                "seed {seed} ({} on {}): {}\n  replay: PHALANX_SIM_SEED={seed} cargo test -p phalanx-chaos --test sim_campaign",
                sim.job.config.model,
                sim.job.config.dataset,
                violations.join("; ")
            ));
        }
    }
    println!(
        "{} seeds: {crashes} crashes, {rollbacks} aggregator rollbacks, {dropped} messages lost, {} failures",
        seeds.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{} of {} seeds failed:\n{}", failures.len(), seeds.len(), failures.join("\n"));
    assert!(seeds.len() < 50 || (crashes > 0 && rollbacks > 0 && dropped > 0), "the campaign injected no faults");
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let jobs = campaign_jobs();
    for seed in [3, 17, 101] {
        let sim = &jobs[(seed % 3) as usize];
        let a = simulate(&sim.job, &SimOptions::new(seed));
        let b = simulate(&sim.job, &SimOptions::new(seed));
        assert_eq!(a.trace_digest, b.trace_digest, "seed {seed}");
        assert_eq!(a.stats, b.stats, "seed {seed}");
    }
    let sim = &jobs[0];
    let a = simulate(&sim.job, &SimOptions::new(3));
    let b = simulate(&sim.job, &SimOptions::new(6));
    assert_ne!(a.trace_digest, b.trace_digest, "different seeds, different runs");
}

#[test]
fn a_build_that_applies_duplicates_is_caught_by_the_checkers() {
    let jobs = campaign_jobs();
    let mut caught = std::collections::BTreeSet::new();
    for seed in 0..30 {
        let sim = &jobs[(seed % 3) as usize];
        let opts = SimOptions { duplicate_probability: 0.2, break_accept_duplicates: true, ..SimOptions::new(seed) };
        let outcome = simulate(&sim.job, &opts);
        for v in check_all(&outcome, &sim.expected) {
            caught.insert(v.split(':').next().unwrap_or_default().to_string());
        }
    }
    assert!(caught.contains("exactly-once"), "caught: {caught:?}");
    assert!(caught.contains("bit-identical"), "caught: {caught:?}");
}

#[test]
fn a_run_out_of_time_is_caught_as_a_hang() {
    let jobs = campaign_jobs();
    let opts = SimOptions { liveness_budget_ms: 0, fault_phase_ms: 2, ..SimOptions::new(1) };
    let outcome = simulate(&jobs[0].job, &opts);
    let v = check_all(&outcome, &jobs[0].expected);
    assert!(v.iter().any(|v| v.starts_with("completes: no completion")), "{v:?}");
}

#[test]
fn the_campaign_writes_a_report_with_every_documented_field() {
    let dir = tempfile::tempdir().unwrap();
    let report = phalanx_chaos::campaign::sim_campaign(0..12, dir.path()).unwrap();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    for field in [
        "faults_injected",
        "faults_survived",
        "samples_lost",
        "samples_duplicated",
        "seeds_run",
        "identical",
        "recovery_ms",
        "fault_types",
    ] {
        assert!(json.get(field).is_some(), "report.json lacks {field}");
    }
    assert_eq!(json["seeds_run"], 12);
    assert_eq!((json["samples_lost"].as_u64(), json["samples_duplicated"].as_u64()), (Some(0), Some(0)));
    for p in ["p50", "p95", "p99"] {
        assert!(json["recovery_ms"].get(p).is_some());
    }
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("| fault type | injected | survived"), "{md}");
    let svg = std::fs::read_to_string(dir.path().join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"), "a plot with a line");
}
