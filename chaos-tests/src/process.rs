//! The real-process tier: `phalanx node` processes on loopback (QUIC, mutual
//! TLS), faults injected while a job trains — SIGKILL, SIGSTOP, restarts,
//! partitions and damaged links (through the fault relay), full disks (a
//! tmpfs), corrupted checkpoints, a crash between checkpoint write and
//! rename, a second process with a member's identity, a rogue member that
//! forges orders, views, checkpoint copies, out-of-range values and oversized
//! frames — and the invariants checked on the outcome, including the commit
//! invariants on the nodes' `commit` events ([`check_leases`]).
//!
//! Scenarios are TOML files in `chaos-tests/scenarios/` (`tier = "process"`);
//! the built-in set is compiled in, so the campaign runs from anywhere:
//!
//! ```toml
//! tier = "process"
//! name = "SIGKILL aggregator node"   # the fault type, as the report names it
//! nodes = 3                          # default 3
//! faults = ["kill 0@300"]            # `phalanx local` flags without the dashes
//! expect_detection = true            # must a survivor declare a node down? (default: by fault kind)
//! replicas = 2                       # checkpoint copies (`--replicas`; default: the nodes' default)
//! coordination = "etcd:3"            # `phalanx local --coordination` (default: embedded)
//! ```
//!
//! Scenarios on a coordination service (`coordination = "etcd"`, `"etcd:3"`, `"zookeeper"`)
//! may also hit the service: `service-kill leader@300`, `service-pause all@300:3500`,
//! `service-restart 1@600`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use phalanx::config::AggregatorPlacement;
use phalanx::local::{run_local_with_options, LocalCoordination, LocalOptions, NodeFault};
use phalanx::{JobConfig, PreparedJob};
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;
use serde::Deserialize;
use serde_json::Value;

use crate::invariants::{
    check_process, forged_rejected, no_false_detection, read_events, tally, Expected, ForgedCount,
};
use crate::report::{plot_run, Percentiles, Report, RunPoint};

/// The built-in scenarios: (file name, contents).
pub const BUILTIN: [(&str, &str); 27] = [
    ("kill-trainer-node.toml", include_str!("../scenarios/kill-trainer-node.toml")),
    ("kill-aggregator-node.toml", include_str!("../scenarios/kill-aggregator-node.toml")),
    ("kill-two-nodes.toml", include_str!("../scenarios/kill-two-nodes.toml")),
    ("kill-aggregator-and-trainer.toml", include_str!("../scenarios/kill-aggregator-and-trainer.toml")),
    ("pause-short.toml", include_str!("../scenarios/pause-short.toml")),
    ("pause-long.toml", include_str!("../scenarios/pause-long.toml")),
    ("kill-restart.toml", include_str!("../scenarios/kill-restart.toml")),
    ("partition-aggregator-node.toml", include_str!("../scenarios/partition-aggregator-node.toml")),
    ("partition-trainer-node.toml", include_str!("../scenarios/partition-trainer-node.toml")),
    ("degraded-links.toml", include_str!("../scenarios/degraded-links.toml")),
    ("disk-full.toml", include_str!("../scenarios/disk-full.toml")),
    ("disk-full-then-kill.toml", include_str!("../scenarios/disk-full-then-kill.toml")),
    ("crash-before-rename.toml", include_str!("../scenarios/crash-before-rename.toml")),
    ("corrupt-checkpoint.toml", include_str!("../scenarios/corrupt-checkpoint.toml")),
    ("kill-coordinator-and-replica.toml", include_str!("../scenarios/kill-coordinator-and-replica.toml")),
    ("lost-every-checkpoint-copy.toml", include_str!("../scenarios/lost-every-checkpoint-copy.toml")),
    ("fetch-checkpoint-from-member.toml", include_str!("../scenarios/fetch-checkpoint-from-member.toml")),
    ("duplicate-identity.toml", include_str!("../scenarios/duplicate-identity.toml")),
    ("pause-coordinator-past-lease.toml", include_str!("../scenarios/pause-coordinator-past-lease.toml")),
    ("rogue-member.toml", include_str!("../scenarios/rogue-member.toml")),
    ("etcd-kill-coordinator.toml", include_str!("../scenarios/etcd-kill-coordinator.toml")),
    ("etcd-kill-leader.toml", include_str!("../scenarios/etcd-kill-leader.toml")),
    ("etcd-down-briefly.toml", include_str!("../scenarios/etcd-down-briefly.toml")),
    ("zookeeper-pause-past-session.toml", include_str!("../scenarios/zookeeper-pause-past-session.toml")),
    ("etcd-cut-node.toml", include_str!("../scenarios/etcd-cut-node.toml")),
    (
        "coordinator-placement-kill-trainer-node.toml",
        include_str!("../scenarios/coordinator-placement-kill-trainer-node.toml"),
    ),
    (
        "coordinator-placement-kill-coordinator.toml",
        include_str!("../scenarios/coordinator-placement-kill-coordinator.toml"),
    ),
];

/// Epochs of the scenario job: about 3000 steps, a few seconds on 3 nodes,
/// long enough for faults of 1–3 s to start and heal mid-run.
const EPOCHS: u32 = 150;

/// One real-process scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessScenario {
    /// Must be "process".
    pub tier: String,
    /// The fault type, as the report names it.
    pub name: String,
    /// Node processes (default 3).
    #[serde(default = "three")]
    pub nodes: u32,
    /// Faults as `phalanx local` spells them without the dashes: `kill 0@300`.
    pub faults: Vec<String>,
    /// Must a survivor declare a node down? Default: yes when a fault kills,
    /// crashes or cuts off a node; not checked otherwise.
    #[serde(default)]
    pub expect_detection: Option<bool>,
    /// Epochs of the job (default 150).
    #[serde(default)]
    pub epochs: Option<u32>,
    /// Checkpoint copies on other nodes (`--replicas`); default: the nodes' default.
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Where the nodes coordinate (`phalanx local --coordination`: `etcd`, `etcd:3`,
    /// `zookeeper`); default: embedded.
    #[serde(default)]
    pub coordination: Option<String>,
    /// Where the job's aggregators run (`coordinator` or `spread`, as the job field);
    /// default: the job's default.
    #[serde(default)]
    pub aggregator_placement: Option<AggregatorPlacement>,
}

fn three() -> u32 {
    3
}

impl ProcessScenario {
    /// Parse a scenario file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, String> {
        let s: Self = toml::from_str(text).map_err(|e| format!("{origin}: {}", e.to_string().replace('\n', " ")))?;
        if s.tier != "process" {
            return Err(format!("{origin}: tier is '{}', expected \"process\"", s.tier));
        }
        s.node_faults().map_err(|e| format!("{origin}: {e}"))?;
        s.local_coordination().map_err(|e| format!("{origin}: coordination: {e}"))?;
        Ok(s)
    }

    /// The faults, parsed.
    pub fn node_faults(&self) -> Result<Vec<NodeFault>, String> {
        self.faults
            .iter()
            .map(|f| {
                let (kind, arg) =
                    f.trim().split_once(' ').ok_or_else(|| format!("fault '{f}': expected 'KIND ARG'"))?;
                NodeFault::parse(kind, arg.trim())
            })
            .collect()
    }

    /// Where its nodes coordinate.
    pub fn local_coordination(&self) -> Result<LocalCoordination, String> {
        self.coordination.as_deref().map_or(Ok(LocalCoordination::Embedded), str::parse)
    }

    /// The job it runs.
    pub fn job(&self) -> JobConfig {
        let base = job();
        JobConfig {
            epochs: Some(self.epochs.unwrap_or(EPOCHS)),
            aggregator_placement: self.aggregator_placement.unwrap_or(base.aggregator_placement),
            ..base
        }
    }
}

/// The built-in scenarios, parsed.
pub fn scenarios() -> Vec<ProcessScenario> {
    BUILTIN
        .iter()
        .map(|(name, text)| ProcessScenario::parse(text, name).unwrap_or_else(|e| panic!("built-in scenario {e}")))
        .collect()
}

/// The `phalanx` executable next to this one (both live in `target/<profile>`),
/// or in its parent (test executables live in `target/<profile>/deps`).
pub fn find_phalanx() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let dir = me.parent()?;
    [dir.join("phalanx"), dir.parent()?.join("phalanx")].into_iter().find(|p| p.is_file())
}

/// Fault kinds that fire inside a node (an in-process hook), not from outside:
/// the node must be a build with the cargo feature `fault-injection`.
pub const IN_PROCESS_FAULTS: [&str; 2] = ["crash-before-rename", "rogue"];

/// Whether `exe` has the in-process fault hooks: `phalanx --version` ends in
/// `(fault-injection)` in such a build (see [`phalanx::VERSION`]).
pub fn has_fault_injection(exe: &Path) -> Result<bool, String> {
    let out = std::process::Command::new(exe)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} --version: {e}", exe.display()))?;
    let line = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !line.starts_with("phalanx ") {
        return Err(format!("{} --version: not a phalanx binary ({}): {line}", exe.display(), out.status));
    }
    Ok(line.trim_end().ends_with("(fault-injection)"))
}

/// Refuse, before anything runs, a campaign whose scenarios need a hook that `exe` lacks.
fn check_hooks(exe: &Path, scenarios: &[ProcessScenario]) -> Result<(), String> {
    let needs = scenarios.iter().find_map(|s| {
        let faults = s.node_faults().ok()?;
        faults.iter().find(|f| IN_PROCESS_FAULTS.contains(&f.kind())).map(|f| (s.name.clone(), f.kind()))
    });
    match needs {
        Some((scenario, kind)) if !has_fault_injection(exe)? => Err(format!(
            "{}: a default build, without the in-process fault hooks that scenario '{scenario}' needs ({kind}); \
             build it with the harness: cargo build --release -p phalanx -p phalanx-chaos",
            exe.display()
        )),
        _ => Ok(()),
    }
}

/// The job every scenario runs (before its own epochs).
pub fn job() -> JobConfig {
    JobConfig {
        model: ModelKind::Mlp.into(),
        dataset: DatasetSource::Winequality,
        trainers: 3,
        epochs: Some(EPOCHS),
        checkpoint_every: 20,
        checkpoint_min_interval_ms: 0,
        ..JobConfig::default()
    }
}

/// What the checkers compare a job against: the single-process plain loop.
pub fn expected(config: &JobConfig) -> Result<Expected, String> {
    let prepared = PreparedJob::new(config.clone()).map_err(|e| e.to_string())?;
    let params = prepared.reference_params().map_err(|e| e.to_string())?;
    Ok(Expected {
        model_sha256: phalanx::model_sha256(prepared.model.as_ref(), &params),
        params_sha256: phalanx::params_sha256(&params),
        partition_sizes: prepared.partitions.sizes(),
        epochs: prepared.schedule.epochs,
    })
}

/// The plain loop's result for `config`, computed once per epoch count.
fn expected_of(cache: &mut std::collections::BTreeMap<u32, Expected>, config: &JobConfig) -> Result<Expected, String> {
    let epochs = config.epochs.unwrap_or(EPOCHS);
    if let Some(e) = cache.get(&epochs) {
        return Ok(e.clone());
    }
    let e = expected(config)?;
    cache.insert(epochs, e.clone());
    Ok(e)
}

/// One scenario's run.
#[derive(Debug)]
pub struct ScenarioRun {
    /// The scenario's name.
    pub name: String,
    /// The cluster's summary (with `node_faults`), or why there is none.
    pub summary: Result<Value, String>,
    /// Wall time of the training: first step applied to the last (node start-up,
    /// certificates and the first view are left out: they are noise, not faults).
    pub duration: Duration,
    /// Every step applied, from the run's `history.csv` (recomputed steps
    /// again): step, loss, seconds since the first.
    pub trace: Vec<(u64, f64, f64)>,
    /// Invariant violations and faults that did not take effect.
    pub violations: Vec<String>,
    /// A rogue member's forged messages and the members' rejections of them, per kind
    /// (empty without a rogue).
    pub forged: std::collections::BTreeMap<String, ForgedCount>,
}

impl ScenarioRun {
    /// Faults injected (a restart is the end of a kill, not a fault).
    pub fn injected(&self, scenario: &ProcessScenario) -> u64 {
        scenario.faults.iter().filter(|f| !f.trim_start().starts_with("restart")).count() as u64
    }

    /// Steps applied again (rollbacks and takeovers): rows of the history
    /// whose step an earlier row already recorded. Counted by step rather
    /// than by backward jumps, as a coordinator woken from a pause may append
    /// the step it applied before it, after its successor's rows.
    pub fn steps_replayed(&self) -> u64 {
        let distinct: std::collections::BTreeSet<u64> = self.trace.iter().map(|(step, _, _)| *step).collect();
        (self.trace.len() - distinct.len()) as u64
    }

    /// The trace as plot points: loss and steps per second over the last
    /// few steps.
    pub fn points(&self) -> Vec<RunPoint> {
        const WINDOW: usize = 50;
        self.trace
            .iter()
            .enumerate()
            .map(|(i, (step, loss, t))| {
                let from = i.saturating_sub(WINDOW);
                let advanced: u64 = self.trace[from..=i].windows(2).map(|w| w[1].0.saturating_sub(w[0].0)).sum();
                let dt = t - self.trace[from].2;
                RunPoint { step: *step, loss: *loss, throughput: (dt > 0.0).then(|| advanced as f64 / dt) }
            })
            .collect()
    }

    /// Fault and recovery moments as (step, label) marks.
    pub fn marks(&self) -> Vec<(u64, String)> {
        let Ok(summary) = &self.summary else { return Vec::new() };
        let mut marks = Vec::new();
        for f in summary["node_faults"].as_array().into_iter().flatten() {
            let step = f["step"].as_u64().unwrap_or(0);
            let node = f["node"].as_u64().map(|n| format!(" {n}")).unwrap_or_default();
            marks.push((step, format!("{}{node}", f["kind"].as_str().unwrap_or("?"))));
            // Resumed: the step reached `recovery_ms` after the step of injection.
            let injected_at = self.trace.iter().find(|(s, _, _)| *s >= step).map(|(_, _, t)| *t);
            if let (Some(at), Some(ms)) = (injected_at, f["recovery_ms"].as_u64()) {
                let resumed = at + ms as f64 / 1000.0;
                if let Some((s, _, _)) = self.trace.iter().find(|(_, _, t)| *t >= resumed) {
                    marks.push((*s, "resumed".into()));
                }
            }
        }
        marks
    }
}

/// Run one scenario with `exe`, outputs under `work`, and check it.
pub fn run_scenario(exe: &Path, scenario: &ProcessScenario, work: &Path, expected: &Expected) -> ScenarioRun {
    let config = JobConfig { out: Some(work.to_path_buf()), ..scenario.job() };
    let started = Instant::now();
    let summary = scenario.node_faults().and_then(|faults| {
        let options = LocalOptions {
            nodes: scenario.nodes,
            replicas: scenario.replicas,
            coordination: scenario.local_coordination()?,
            worker_threads: None,
        };
        run_local_with_options(exe, &config, &options, faults, |_, _, _| {}).map_err(|e| e.to_string())
    });
    // Every step the coordinators applied, in order (a failed run may have none).
    let rows = phalanx::output::read_history(&work.join(phalanx::output::HISTORY_FILE)).unwrap_or_default();
    let t0 = rows.first().map_or(0, |r| r.t_ms);
    let trace: Vec<(u64, f64, f64)> =
        rows.iter().map(|r| (r.step, r.loss, r.t_ms.saturating_sub(t0) as f64 / 1000.0)).collect();
    let duration = match (trace.first(), trace.last()) {
        (Some(first), Some(last)) => Duration::from_secs_f64(last.2 - first.2),
        _ => started.elapsed(),
    };
    let mut violations = match &summary {
        Err(e) => vec![format!("completes: {e}")],
        Ok(s) => {
            let mut v = check_process(s, expected);
            v.extend(took_effect(scenario, s).err().map(|e| format!("fault-took-effect: {e}")));
            v.extend(check_leases(&work.join("events.jsonl")).into_iter().map(|e| format!("leases: {e}")));
            let detections = scenario.node_faults().and_then(|faults| {
                read_events(&work.join("events.jsonl")).and_then(|events| no_false_detection(&faults, &events))
            });
            v.extend(detections.err().map(|e| format!("no-false-detection: {e}")));
            if scenario.expect_detection == Some(false) {
                // Nothing may be declared down, whoever declares it.
                let downs = read_events(&work.join("events.jsonl"))
                    .map(|events| events.iter().filter(|e| e["event"] == "down").cloned().collect::<Vec<_>>());
                match downs {
                    Ok(downs) if downs.is_empty() => {}
                    Ok(downs) => v.push(format!("fault-took-effect: no node may be declared down, got {downs:?}")),
                    Err(e) => v.push(format!("fault-took-effect: no events: {e}")),
                }
            }
            v
        }
    };
    // A rogue member: what it forged and what the members rejected, from the run's events.
    let mut forged = Default::default();
    if scenario.faults.iter().any(|f| f.trim_start().starts_with("rogue")) {
        match read_events(&work.join("events.jsonl")) {
            Ok(events) => {
                forged = tally(&events);
                violations.extend(forged_rejected(&forged).err().map(|e| format!("forged-rejected: {e}")));
            }
            Err(e) => violations.push(format!("forged-rejected: no events: {e}")),
        }
    }
    ScenarioRun { name: scenario.name.clone(), summary, duration, trace, violations, forged }
}

/// The commit invariants (no two coordinators commit at once, one parameter hash per
/// range and step) on the `commit` events of a run's `events.jsonl` (one machine, one clock).
pub fn check_leases(events: &Path) -> Vec<String> {
    let text = match std::fs::read_to_string(events) {
        Ok(text) => text,
        Err(e) => return vec![format!("{}: {e}", events.display())],
    };
    let parsed: Vec<Value> = text.lines().filter_map(|line| serde_json::from_str::<Value>(line).ok()).collect();
    check_lease_events(parsed.iter()).into_iter().map(|v| format!("{v} ({})", events.display())).collect()
}

/// [`check_leases`] on events already read (the `commit` ones count; the rest are skipped).
pub fn check_lease_events<'a>(events: impl Iterator<Item = &'a Value>) -> Vec<String> {
    let commits: Vec<phalanx::cluster::commits::Commit> = events
        .filter(|e| e["event"] == "commit")
        .filter_map(|e| {
            Some(phalanx::cluster::commits::Commit {
                node: u32::try_from(e["node"].as_u64()?).ok()?,
                generation: e["generation"].as_u64()?,
                range: u32::try_from(e["range"].as_u64()?).ok()?,
                step: e["step"].as_u64()?,
                hash: e["hash"].as_str()?.to_owned(),
                t_us: e["t_us"].as_u64()?,
            })
        })
        .collect();
    if commits.is_empty() {
        return vec!["no commit recorded".to_string()];
    }
    phalanx::cluster::commits::check(&commits)
}

/// The faults really happened: a run where nothing was damaged proves nothing.
fn took_effect(scenario: &ProcessScenario, summary: &Value) -> Result<(), String> {
    let reports: Vec<&Value> = summary["node_faults"].as_array().into_iter().flatten().collect();
    let kind = |f: &Value| f["kind"].as_str().unwrap_or("").to_string();
    let kills = |k: &str| matches!(k, "kill" | "partition" | "crash-before-rename" | "service-cut");
    let default_detection = reports.iter().any(|f| kills(&kind(f)));
    match scenario.expect_detection.unwrap_or(default_detection) {
        true => {
            let detectable = |k: &str| kills(k) || k == "pause";
            if let Some(f) = reports.iter().find(|f| detectable(&kind(f)) && f["detection_ms"].is_null()) {
                return Err(format!("{} of node {} at step {} was never detected", kind(f), f["node"], f["step"]));
            }
        }
        false if scenario.expect_detection == Some(false) => {
            if let Some(f) = reports.iter().find(|f| !f["detection_ms"].is_null()) {
                return Err(format!("{} at step {} got a node declared down", kind(f), f["step"]));
            }
        }
        false => {}
    }
    for f in &reports {
        match kind(f).as_str() {
            "disk-full" if summary["checkpoint_failures"].as_array().is_none_or(|c| c.is_empty()) => {
                return Err("the disk was filled but no checkpoint failed".into());
            }
            "crash-before-rename" => {
                let evidence = f["evidence"].as_str().unwrap_or("");
                if evidence.is_empty() || evidence.contains("left 0 ") {
                    return Err(format!("the crash left no temporary checkpoint file ({evidence:?})"));
                }
            }
            "wipe" => {
                // The wiped node's copies are gone: a takeover there must not
                // have restored from them (it fetched, or started from step 0).
                let node = f["node"].as_u64();
                let after_wipe: Vec<&Value> = summary["takeovers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|t| t["node"].as_u64() == node && t["epoch"].as_u64() > Some(1))
                    .collect();
                if after_wipe.is_empty() {
                    return Err(format!("node {node:?} was wiped but never took over"));
                }
                if let Some(t) = after_wipe.iter().find(|t| t["restore_from"].as_str() == Some("local")) {
                    return Err(format!("node {node:?} restored its wiped copies: {t}"));
                }
            }
            "duplicate" => {
                // The second process must have been refused: a non-zero exit with the error.
                let evidence = f["evidence"].as_str().unwrap_or("");
                let refused =
                    evidence.contains("is already a live member") && evidence.contains("refusing to join twice");
                if f["exit_code"].as_i64().is_none_or(|code| code == 0) || !refused {
                    return Err(format!(
                        "the duplicate of node {} was not refused (exit code {}): {evidence:?}",
                        f["node"], f["exit_code"]
                    ));
                }
            }
            "corrupt" => {
                let (node, Some(bad)) = (f["node"].as_u64(), f["checkpoint_step"].as_u64()) else {
                    return Err(format!("nothing was corrupted: {}", f["evidence"]));
                };
                let fell_back = summary["takeovers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| t["node"].as_u64() == node && t["restore"].as_u64().is_some_and(|r| r < bad));
                if !fell_back {
                    return Err(format!("no takeover on node {node:?} fell back below the corrupted step {bad}"));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Run `scenarios` with `exe` (plus one fault-free run per cluster size, for
/// the slowdown per step) and fold the results into `report`; plot one run into
/// `plot` (`processes.svg`).
pub fn process_campaign_of(
    exe: &Path,
    scenarios: &[ProcessScenario],
    work: &Path,
    report: &mut Report,
    plot: Option<&Path>,
) -> Result<(), String> {
    check_hooks(exe, scenarios)?;
    report.tiers.push("real processes".into());
    // The plain loop's result per job (epochs), and per cluster size the wall time of a step
    // in a fault-free run of the default job with embedded coordination: a scenario's
    // slowdown is its wall time over that per-step time times its steps. (One fault-free
    // run per size: a scenario that runs longer, or on a coordination service, is compared
    // per step with it, rather than paying a fault-free run as long as itself.)
    let mut expectations: std::collections::BTreeMap<u32, Expected> = Default::default();
    let mut baselines: std::collections::BTreeMap<u32, f64> = Default::default();
    let mut plotted = plot.is_none();
    let mut recoveries = Vec::new();
    for (i, s) in scenarios.iter().enumerate() {
        let config = s.job();
        let prepared = PreparedJob::new(config.clone()).map_err(|e| e.to_string())?;
        let (batch, steps) = (prepared.resolved.batch_size as u64, prepared.schedule.total_steps());
        let expected = expected_of(&mut expectations, &config)?;
        let step_time = match baselines.entry(s.nodes) {
            std::collections::btree_map::Entry::Occupied(e) => *e.get(),
            std::collections::btree_map::Entry::Vacant(slot) => {
                let calm = ProcessScenario {
                    name: "fault-free".into(),
                    faults: Vec::new(),
                    epochs: None,
                    coordination: None,
                    ..s.clone()
                };
                let calm_config = calm.job();
                let calm_steps =
                    PreparedJob::new(calm_config.clone()).map_err(|e| e.to_string())?.schedule.total_steps();
                let dir = work.join(format!("fault-free-{}-nodes", s.nodes));
                let run = run_scenario(exe, &calm, &dir, &expected_of(&mut expectations, &calm_config)?);
                if !run.violations.is_empty() {
                    let why = run.violations.join("; ");
                    return Err(format!("the fault-free run on {} nodes failed: {why}", s.nodes));
                }
                *slot.insert(run.duration.as_secs_f64().max(1e-3) / calm_steps.max(1) as f64)
            }
        };
        let baseline = step_time * steps.max(1) as f64;
        let run = run_scenario(exe, s, &work.join(format!("scenario-{i}")), &expected);
        let ok = run.violations.is_empty();
        let injected = run.injected(s);
        let (mut detection, mut recovery) = (Vec::new(), Vec::new());
        if let Ok(summary) = &run.summary {
            // Folded over the epochs by the aggregators (see `SamplesApplied`).
            let applied = &summary["samples_applied"];
            report.samples_lost += applied["lost"].as_u64().unwrap_or(0);
            report.samples_duplicated += applied["duplicated"].as_u64().unwrap_or(0);
            for f in summary["node_faults"].as_array().into_iter().flatten() {
                detection.extend(f["detection_ms"].as_u64());
                recovery.extend(f["recovery_ms"].as_u64());
            }
        }
        println!(
            "process scenario '{}': {:.1} s, {} step(s) replayed: {}",
            s.name,
            run.duration.as_secs_f64(),
            run.steps_replayed(),
            if ok { "all invariants hold".to_string() } else { run.violations.join("; ") }
        );
        report.identical &=
            run.summary.as_ref().is_ok_and(|s| s["model_sha256"].as_str() == Some(&expected.model_sha256));
        report.seeds_run += 1;
        report.steps_replayed += run.steps_replayed();
        report.violations.extend(run.violations.iter().map(|v| format!("{}: {v}", s.name)));
        for (kind, c) in &run.forged {
            let total = report.forged_rejected.entry(kind.clone()).or_default();
            total.forged += c.forged;
            total.rejected += c.rejected;
        }
        let entry = report.fault_types.entry(s.name.clone()).or_default();
        entry.tier = "process".into();
        entry.injected += injected;
        if ok {
            entry.survived += injected;
        }
        recoveries.extend_from_slice(&recovery);
        entry.restart_ms = Percentiles::of(&detection);
        entry.recovery_ms = Percentiles::of(&recovery);
        entry.samples_replayed += run.steps_replayed() * batch;
        entry.slowdown = Some(run.duration.as_secs_f64() / baseline);
        report.faults_injected += injected;
        if ok {
            report.faults_survived += injected;
        }
        // Plot a run that recovered and replayed steps (a takeover or rollback shows best).
        if let (false, Some(path), true) = (plotted, plot, ok) {
            if run.steps_replayed() > 0 && run.marks().iter().any(|(_, m)| m == "resumed") {
                plotted = true;
                let title = format!("{} ({} nodes): loss and throughput per step", s.name, s.nodes);
                plot_run(path, &title, "steps / s", &run.points(), &run.marks())?;
            }
        }
    }
    report.add_recoveries("process", &recoveries);
    Ok(())
}

/// The built-in scenarios, into `report`, plotting into `work/../processes.svg`.
pub fn process_campaign(exe: &Path, work: &Path, report: &mut Report) -> Result<(), String> {
    let plot = work.parent().map(|d| d.join("processes.svg"));
    process_campaign_of(exe, &scenarios(), work, report, plot.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_scenario_parses() {
        let all = scenarios();
        assert_eq!(all.len(), BUILTIN.len());
        let kinds: std::collections::BTreeSet<&'static str> =
            all.iter().flat_map(|s| s.node_faults().unwrap()).map(|f| f.kind()).collect();
        let wanted = [
            "kill",
            "pause",
            "restart",
            "partition",
            "degrade",
            "disk-full",
            "corrupt",
            "crash-before-rename",
            "wipe",
            "duplicate",
            "rogue",
        ];
        for k in wanted {
            assert!(kinds.contains(k), "no built-in scenario injects {k}");
        }
    }

    #[test]
    fn a_duplicate_counts_only_if_it_was_refused() {
        let scenario = scenarios().into_iter().find(|s| s.name == "duplicate node identity").expect("built in");
        let summary = |exit_code: Value, evidence: &str| {
            serde_json::json!({ "node_faults": [{
                "kind": "duplicate", "node": 1, "step": 300, "detection_ms": null,
                "exit_code": exit_code, "evidence": evidence,
            }] })
        };
        let refused = "the second process with node 1's id exited (exit status: 1): error: node 1 is already a \
                       live member at 127.0.0.1:7001, incarnation 0x2a; refusing to join twice";
        assert_eq!(took_effect(&scenario, &summary(1.into(), refused)), Ok(()));
        let running = "the second process with node 1's id was still running at the end: killed";
        let e = took_effect(&scenario, &summary(Value::Null, running)).unwrap_err();
        assert!(e.contains("not refused"), "{e}");
        let e = took_effect(&scenario, &summary(0.into(), "exited (exit status: 0): (no error line)")).unwrap_err();
        assert!(e.contains("not refused"), "{e}");
        // A member declared node 1 down: the duplicate disturbed the cluster.
        let mut churned = summary(1.into(), refused);
        churned["node_faults"][0]["detection_ms"] = 480.into();
        assert!(took_effect(&scenario, &churned).unwrap_err().contains("declared down"));
    }

    #[test]
    fn a_bad_scenario_names_its_file_and_the_problem() {
        let e = ProcessScenario::parse("tier = \"process\"\nname = \"x\"\nfaults = [\"explode 1@2\"]", "x.toml")
            .unwrap_err();
        assert!(e.starts_with("x.toml: --explode 1@2: unknown fault kind"), "{e}");
        let e = ProcessScenario::parse("tier = \"simulation\"\nname = \"x\"\nfaults = []", "y.toml").unwrap_err();
        assert!(e.contains("y.toml: tier is 'simulation'"), "{e}");
        let e =
            ProcessScenario::parse("tier = \"process\"\nname = \"x\"\nfaults = []\nnode = 3", "z.toml").unwrap_err();
        assert!(e.contains("z.toml") && e.contains("unknown field `node`"), "{e}");
    }
}
