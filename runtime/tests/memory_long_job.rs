//! Long jobs cost the same per step at the end as at the start: the resident
//! memory of every node process stays flat once warmed up, `summary.json`
//! stays a summary, every step is in `history.csv`, and `events.jsonl` gets
//! step events at a bounded rate.
//!
//! Real node processes (`phalanx local`'s machinery, QUIC with mutual TLS);
//! memory is read from `/proc/<pid>/status` of each node whenever a `step`
//! event arrives (no sleeps), the pids coming from the nodes' `listening`
//! events.
//!
//! The job spreads its ranges over the nodes (`aggregator_placement = "spread"`),
//! so every node hosts a range, receives gradients, publishes parameters and
//! copies checkpoints: the busiest memory pattern a node has. Without the
//! nodes' periodic `trim_allocator` this grew by 1–3 MiB on a range's host
//! while the live heap stayed flat (heaptrack): glibc kept freed pages.

use std::collections::BTreeMap;

use phalanx::config::AggregatorPlacement;
use phalanx::local::{run_local_watching, LocalOptions};
use phalanx::JobConfig;
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;
use phalanx_actors::protocol::LOSS_POINTS;
use serde_json::Value;

/// Steps of the job: one per epoch (the global batch is the whole training
/// set), so the exactly-once ledger folds an epoch on every step too.
const STEPS: u64 = 100_000;
/// Memory is compared with what each node holds at this step. glibc's heaps settle slowly: a
/// node's resident memory still rose by 2.2–2.6 MiB between steps 20,000 and 100,000 at
/// 9d40489 and at 0faa92d alike (2026-12-02, this machine; its live heap flat at 242 KB with
/// nothing leaked, heaptrack), rising by less every interval (+1040, +580, +424, +336, +212,
/// +192, +240 kB per 10 s): the allocator's warm-up, not a leak. Measured from half-way, a
/// range's host still rose by 1.6 MiB in one run and by 3.1 MiB in another (the fresh-clone CI
/// of 478998a, on a loaded machine), so the comparison starts at three quarters, where the
/// settling has slowed down most: over the last 25,000 steps a leak of more than about 84
/// bytes a step exceeds the bound below.
const WARM_UP: u64 = 75_000;
/// How much a node's resident memory may grow after the warm-up.
const GROWTH_BOUND_KB: u64 = 2 * 1024;
/// `summary.json` of any job stays below this (the loss curve is downsampled,
/// the exactly-once verdict folded).
const SUMMARY_BOUND_BYTES: u64 = 96 * 1024;

/// `VmRSS` of a live process, in kB.
fn resident_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Per node: resident memory at the warm-up, the most after it, and samples taken.
#[derive(Debug, Default)]
struct Memory {
    pid: Option<u32>,
    warm_kb: Option<u64>,
    peak_kb: u64,
    last_kb: u64,
    samples: u32,
}

#[test]
fn node_memory_stays_flat_over_a_long_job_and_outputs_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let config = JobConfig {
        model: ModelKind::Linear.into(),
        dataset: DatasetSource::Diabetes,
        partitions: 2,
        trainers: 2,
        batch_size: Some(512), // more than the training rows of diabetes: one step per epoch
        epochs: Some(STEPS as u32),
        checkpoint_every: 1_000,
        checkpoint_min_interval_ms: 0,
        aggregator_placement: AggregatorPlacement::Spread,
        out: Some(out.clone()),
        ..JobConfig::default()
    };
    let mut nodes: BTreeMap<u32, Memory> = BTreeMap::new();
    let summary = run_local_watching(
        std::path::Path::new(env!("CARGO_BIN_EXE_phalanx")),
        &config,
        &LocalOptions { nodes: 3, ..LocalOptions::default() },
        vec![],
        |e| {
            let node = e["node"].as_u64().unwrap_or(u64::MAX) as u32;
            match e["event"].as_str() {
                Some("listening") => {
                    nodes.entry(node).or_default().pid = e["pid"].as_u64().map(|p| p as u32);
                }
                Some("step") => {
                    let step = e["step"].as_u64().unwrap_or(0);
                    if step < WARM_UP {
                        return;
                    }
                    for m in nodes.values_mut() {
                        let Some(kb) = m.pid.and_then(resident_kb) else { continue };
                        m.warm_kb.get_or_insert(kb);
                        m.peak_kb = m.peak_kb.max(kb);
                        m.last_kb = kb;
                        m.samples += 1;
                    }
                }
                _ => {}
            }
        },
    )
    .unwrap_or_else(|e| panic!("the long job failed: {e}"));

    // Memory: flat on every node from the warm-up to the last step.
    assert_eq!(nodes.len(), 3, "every node reported its pid: {nodes:?}");
    for (node, m) in &nodes {
        let warm = m.warm_kb.unwrap_or(0);
        eprintln!("node {node}: {warm} kB at step {WARM_UP}, peak {} kB, {} kB at the end", m.peak_kb, m.last_kb);
    }
    for (node, m) in &nodes {
        let warm = m.warm_kb.unwrap_or_else(|| panic!("node {node} was never sampled after step {WARM_UP}: {m:?}"));
        assert!(m.samples >= 10, "node {node}: only {} samples after the warm-up", m.samples);
        let growth = m.peak_kb.saturating_sub(warm);
        assert!(
            growth <= GROWTH_BOUND_KB,
            "node {node} grew by {growth} kB over {} steps after the warm-up (from {warm} kB to a peak of {} kB)",
            STEPS - WARM_UP,
            m.peak_kb
        );
    }

    // summary.json: a summary whatever the number of steps.
    let summary_bytes = std::fs::metadata(out.join("summary.json")).unwrap().len();
    assert!(summary_bytes <= SUMMARY_BOUND_BYTES, "summary.json is {summary_bytes} bytes");
    assert_eq!(summary["steps"], STEPS);
    let applied = &summary["samples_applied"];
    assert!(applied["exactly_once"] == true && applied["exactly_once_epochs"] == STEPS, "{applied}");
    assert!(applied["first_failing"].is_null(), "{applied}");
    let curve = summary["loss_history"].as_array().unwrap();
    assert!(curve.len() > LOSS_POINTS / 2 && curve.len() <= LOSS_POINTS + 1, "{} loss points", curve.len());
    assert_eq!(curve.last().unwrap()[0], STEPS, "the curve ends at the last step");
    assert_eq!(summary["history"], "history.csv");

    // history.csv: every step once, in order (no fault, nothing recomputed).
    let rows = phalanx::output::read_history(&out.join("history.csv")).unwrap();
    assert_eq!(rows.len() as u64, STEPS);
    assert!(rows.iter().zip(1..).all(|(r, step)| r.step == step && u64::from(r.epoch) == step - 1));
    assert!(rows.windows(2).all(|w| w[0].t_ms <= w[1].t_ms));
    assert_eq!(rows.last().unwrap().loss, summary["loss_history"].as_array().unwrap().last().unwrap()[1]);

    // events.jsonl: state changes, and steps at a bounded rate.
    let events: Vec<Value> = std::fs::read_to_string(out.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps = events.iter().filter(|e| e["event"] == "step").count() as u64;
    let seconds = summary["duration_ms"].as_u64().unwrap() / 1000 + 1;
    // One every 100 ms, one per stall of 50 ms or more, the first and the last.
    assert!(steps >= 2 && steps <= 30 * seconds + 2, "{steps} step events in {seconds} s");
    for kind in ["listening", "view", "coordinating", "job_done"] {
        assert!(events.iter().any(|e| e["event"] == kind), "no {kind} event in events.jsonl");
    }
}
