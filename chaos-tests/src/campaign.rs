//! A bounded campaign: many seeds, every invariant checked, one report.

use std::path::Path;

use crate::invariants::check_all;
use crate::report::{plot_loss, Percentiles, Report};
use crate::sim::{campaign_jobs, simulate, SimOptions};

/// Run the simulation tier for `seeds` and write the report into `out`.
/// Returns the report; its `violations` are empty when every invariant held.
pub fn sim_campaign(seeds: std::ops::Range<u64>, out: &Path) -> std::io::Result<Report> {
    let jobs = campaign_jobs();
    let baselines: Vec<u64> = jobs
        .iter()
        .map(|j| {
            let calm =
                SimOptions { max_crashes: 0, drop_probability: 0.0, duplicate_probability: 0.0, ..SimOptions::new(0) };
            simulate(&j.job, &calm).stats.finished_at_ms.max(1)
        })
        .collect();
    let mut report = Report { tiers: vec!["simulation".into()], identical: true, ..Report::default() };
    let mut all_recovery = Vec::new();
    let mut restart: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let mut recovery: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    let mut slowdowns = Vec::new();
    let mut plotted = false;
    for seed in seeds {
        let k = (seed % jobs.len() as u64) as usize;
        let sim = &jobs[k];
        let outcome = simulate(&sim.job, &SimOptions::new(seed));
        report.seeds_run += 1;
        let violations = check_all(&outcome, &sim.expected);
        let ok = violations.is_empty();
        let (mut lost, mut duplicated) = (0, 0);
        report.violations.extend(violations.into_iter().map(|v| format!("seed {seed}: {v}")));
        match &outcome.result {
            Some(Ok((params, ledger))) => {
                report.identical &= phalanx::params_sha256(params) == sim.expected.params_sha256;
                let applied = phalanx::output::SamplesApplied::new(
                    ledger,
                    &sim.expected.partition_sizes,
                    u64::from(sim.expected.epochs),
                );
                (lost, duplicated) = (applied.lost, applied.duplicated);
                slowdowns.push(outcome.stats.finished_at_ms as f64 / baselines[k] as f64);
            }
            _ => report.identical = false,
        }
        report.samples_lost += lost;
        report.samples_duplicated += duplicated;
        let batch = sim.job.resolved.batch_size as u64;
        let mut count = |name: &str, n: u64, replayed: u64| {
            let f = report.fault_types.entry(name.to_string()).or_default();
            f.tier = "simulation".into();
            f.injected += n;
            f.samples_replayed += replayed * batch;
            if n > 0 {
                // What a run lost or duplicated counts against every fault type it had.
                f.lost += lost;
                f.duplicated += duplicated;
            }
            if ok {
                f.survived += n;
            }
        };
        count("message dropped", outcome.stats.dropped, 0);
        count("message duplicated", outcome.stats.duplicated, 0);
        count("partition (actor cut off)", u64::from(outcome.stats.partitions), 0);
        for f in &outcome.faults {
            let name = format!("{} crash", f.actor.role);
            count(&name, 1, f.rolled_back_to.map_or(0, |back| f.step.saturating_sub(back)));
            if let Some(ms) = f.restart_ms {
                restart.entry(name.clone()).or_default().push(ms);
            }
            if let Some(ms) = f.recovery_ms {
                recovery.entry(name.clone()).or_default().push(ms);
                all_recovery.push(ms);
            }
            if let Some(back) = f.rolled_back_to {
                report.steps_replayed += f.step.saturating_sub(back);
            }
        }
        if !plotted && outcome.faults.len() >= 2 && ok {
            plotted = true;
            let losses: Vec<(u64, f64)> = outcome.losses.iter().map(|(s, l)| (*s, *l)).collect();
            let marks: Vec<(u64, String)> = outcome.faults.iter().map(|f| (f.step, f.actor.to_string())).collect();
            let title =
                format!("seed {seed}: {} on {}, {} crashes", sim.job.config.model, sim.job.config.dataset, marks.len());
            std::fs::create_dir_all(out)?;
            plot_loss(&out.join("loss.svg"), &title, &losses, &marks).map_err(std::io::Error::other)?;
        }
    }
    for (name, f) in report.fault_types.iter_mut() {
        f.restart_ms = Percentiles::of(restart.get(name).map(Vec::as_slice).unwrap_or(&[]));
        f.recovery_ms = Percentiles::of(recovery.get(name).map(Vec::as_slice).unwrap_or(&[]));
    }
    report.faults_injected = report.fault_types.values().map(|f| f.injected).sum();
    report.faults_survived = report.fault_types.values().map(|f| f.survived).sum();
    report.add_recoveries("simulation", &all_recovery);
    report.slowdown = if slowdowns.is_empty() { 0.0 } else { slowdowns.iter().sum::<f64>() / slowdowns.len() as f64 };
    report.write(out)?;
    Ok(report)
}
