//! The real-process tier: `phalanx` node processes on loopback (QUIC, mutual
//! TLS), node faults injected while a job trains, and the same invariants on
//! the outcome: completes, exactly-once, bit-identical to the fault-free run.

use std::path::{Path, PathBuf};

use phalanx::local::{run_local_with, NodeFault};
use phalanx::{JobConfig, PreparedJob};
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;

use crate::report::{Percentiles, Report};

/// One real-process scenario: a name (its fault type) and the faults.
pub struct ProcessScenario {
    /// The fault type, as the report names it.
    pub name: &'static str,
    /// What to inject.
    pub faults: Vec<NodeFault>,
}

/// Each node fault type once, on 3 nodes (node 0 hosts the aggregators).
pub fn scenarios() -> Vec<ProcessScenario> {
    vec![
        ProcessScenario { name: "SIGKILL trainer node", faults: vec![NodeFault::Kill { node: 2, step: 150 }] },
        ProcessScenario { name: "SIGKILL aggregator node", faults: vec![NodeFault::Kill { node: 0, step: 150 }] },
        ProcessScenario {
            name: "SIGSTOP shorter than detection",
            faults: vec![NodeFault::Pause { node: 1, step: 150, ms: 150 }],
        },
        ProcessScenario {
            name: "SIGSTOP longer than detection",
            faults: vec![NodeFault::Pause { node: 1, step: 150, ms: 1200 }],
        },
        ProcessScenario {
            name: "SIGKILL then restart",
            faults: vec![NodeFault::Kill { node: 1, step: 100 }, NodeFault::Restart { node: 1, step: 300 }],
        },
    ]
}

/// The `phalanx` executable next to this one (both live in `target/<profile>`),
/// or in its parent (test executables live in `target/<profile>/deps`).
pub fn find_phalanx() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let dir = me.parent()?;
    [dir.join("phalanx"), dir.parent()?.join("phalanx")].into_iter().find(|p| p.is_file())
}

/// The job every scenario runs.
pub fn job() -> JobConfig {
    JobConfig {
        model: ModelKind::Mlp,
        dataset: DatasetSource::Winequality,
        trainers: 3,
        epochs: Some(30),
        checkpoint_every: 20,
        ..JobConfig::default()
    }
}

/// Run every scenario with `exe` and fold the results into `report`.
pub fn process_campaign(exe: &Path, work: &Path, report: &mut Report) -> Result<(), String> {
    let config = job();
    let prepared = PreparedJob::new(config.clone()).map_err(|e| e.to_string())?;
    let expected = phalanx::params_sha256(&prepared.reference_params().map_err(|e| e.to_string())?);
    let sizes = prepared.partitions.sizes();
    report.tiers.push("real processes".into());
    for (i, s) in scenarios().into_iter().enumerate() {
        let out = work.join(format!("scenario-{i}"));
        let run = JobConfig { out: Some(out), ..config.clone() };
        let injected = s.faults.iter().filter(|f| !matches!(f, NodeFault::Restart { .. })).count() as u64;
        let mut detection = Vec::new();
        let mut recovery = Vec::new();
        let outcome = run_local_with(exe, &run, 3, s.faults, |_, _, _| {});
        let mut violations = Vec::new();
        match &outcome {
            Err(e) => violations.push(format!("completes: {e}")),
            Ok(summary) => {
                if summary["model_sha256"].as_str() != Some(expected.as_str()) {
                    violations.push(format!("bit-identical: {} vs {}", summary["model_sha256"], expected));
                }
                for e in summary["samples_applied"].as_array().into_iter().flatten() {
                    let per: Vec<u64> =
                        e["per_partition"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).collect();
                    for (got, want) in per.iter().zip(&sizes) {
                        report.samples_lost += want.saturating_sub(*got);
                        report.samples_duplicated += got.saturating_sub(*want);
                    }
                    if per != sizes {
                        violations.push(format!("exactly-once: epoch {} applied {per:?}", e["epoch"]));
                    }
                }
                for f in summary["node_faults"].as_array().into_iter().flatten() {
                    detection.extend(f["detection_ms"].as_u64());
                    recovery.extend(f["recovery_ms"].as_u64());
                }
            }
        }
        let ok = violations.is_empty();
        report.identical &= ok;
        report.seeds_run += 1;
        report.violations.extend(violations.into_iter().map(|v| format!("{}: {v}", s.name)));
        let entry = report.fault_types.entry(s.name.to_string()).or_default();
        entry.injected += injected;
        if ok {
            entry.survived += injected;
        }
        entry.restart_ms = Percentiles::of(&detection);
        entry.recovery_ms = Percentiles::of(&recovery);
        report.faults_injected += injected;
        if ok {
            report.faults_survived += injected;
        }
    }
    report.not_covered =
        vec!["network partitions between real processes (the membership core's simulated network covers them), \
         disk-full checkpoint directories and torn checkpoint copies against processes"
            .into()];
    Ok(())
}
