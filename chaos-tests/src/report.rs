//! Campaign reports: `report.json` for scripts, `report.md` and a plot for people.

pub use phalanx::plot::{plot_run, RunPoint};
use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

/// p50/p95/p99 of a set of milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: Option<u64>,
    /// 95th percentile.
    pub p95: Option<u64>,
    /// 99th percentile.
    pub p99: Option<u64>,
    /// How many values.
    pub count: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values`.
    pub fn of(values: &[u64]) -> Self {
        let mut v = values.to_vec();
        v.sort_unstable();
        let at = |q: f64| -> Option<u64> {
            if v.is_empty() {
                return None;
            }
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            Some(v[rank - 1])
        };
        Self { p50: at(0.50), p95: at(0.95), p99: at(0.99), count: v.len() }
    }
}

/// One fault type's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FaultType {
    /// `simulation` or `process`.
    pub tier: String,
    /// Faults of this type injected.
    pub injected: u64,
    /// Of those, in runs whose every invariant held.
    pub survived: u64,
    /// Simulation: time from the fault to the replacement running (virtual
    /// ms). Real processes: time until a survivor declared the node down.
    pub restart_ms: Percentiles,
    /// Time from the fault to training progressing again.
    pub recovery_ms: Percentiles,
    /// Samples applied again after rollbacks and takeovers in runs with this fault type.
    pub samples_replayed: u64,
    /// Samples lost in runs with this fault type (must be 0).
    pub lost: u64,
    /// Samples applied twice in runs with this fault type (must be 0).
    pub duplicated: u64,
    /// Real processes: wall time of the run over the fault-free run's on as many nodes.
    pub slowdown: Option<f64>,
}

/// `report.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// Which tiers ran.
    pub tiers: Vec<String>,
    /// Seeds run.
    pub seeds_run: u64,
    /// Faults injected, all types.
    pub faults_injected: u64,
    /// Faults in runs whose every invariant held.
    pub faults_survived: u64,
    /// Samples lost over every run (must be 0).
    pub samples_lost: u64,
    /// Samples applied twice over every run (must be 0).
    pub samples_duplicated: u64,
    /// Every final model matched its fault-free twin.
    pub identical: bool,
    /// Recovery time over all faults with one, both tiers (simulation in
    /// virtual ms, processes in wall-clock ms; see `recovery_ms_by_tier`).
    pub recovery_ms: Percentiles,
    /// Recovery time per tier: `simulation`, `process`.
    pub recovery_ms_by_tier: BTreeMap<String, Percentiles>,
    /// Every recovery time behind `recovery_ms`.
    #[serde(skip)]
    pub recoveries: Vec<u64>,
    /// Per fault type.
    pub fault_types: BTreeMap<String, FaultType>,
    /// Invariant violations, `seed: message`.
    pub violations: Vec<String>,
    /// Steps recomputed after rollbacks, over every run.
    pub steps_replayed: u64,
    /// Mean virtual time to finish with faults over the fault-free time (1.0 = no slowdown).
    pub slowdown: f64,
    /// A rogue member's forged messages, per kind: how many it sent and how many the members
    /// dropped and counted (`oversized-frame`: frames the transport refused), over every run.
    pub forged_rejected: BTreeMap<String, crate::invariants::ForgedCount>,
}

/// The name of the simulated-nodes tier (`crate::nodes`) in reports.
pub const NODES_TIER: &str = "simulated nodes";

impl Report {
    /// Add one tier's recovery times to the totals.
    pub fn add_recoveries(&mut self, tier: &str, values: &[u64]) {
        self.recoveries.extend_from_slice(values);
        self.recovery_ms = Percentiles::of(&self.recoveries);
        self.recovery_ms_by_tier.insert(tier.to_string(), Percentiles::of(values));
    }

    /// Write `report.json` and `report.md` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self).expect("plain data"))?;
        std::fs::write(dir.join("report.md"), self.markdown())
    }

    /// The human report.
    pub fn markdown(&self) -> String {
        let ms = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "–".into());
        let mut s = String::new();
        s.push_str("# Phalanx chaos campaign\n\n");
        s.push_str(&format!(
            "Tiers: {}. Seeds: **{}**. Faults injected: **{}**, survived: **{}**. Samples lost: **{}**, duplicated: **{}**. \
             Every final model bit-identical to its fault-free twin: **{}**.\n\n",
            self.tiers.join(", "),
            self.seeds_run,
            self.faults_injected,
            self.faults_survived,
            self.samples_lost,
            self.samples_duplicated,
            if self.identical { "yes" } else { "NO" }
        ));
        for (tier, p) in &self.recovery_ms_by_tier {
            let unit = if tier == "simulation" || tier == NODES_TIER { "virtual ms" } else { "wall-clock ms" };
            s.push_str(&format!(
                "Recovery ({tier}, {unit}): p50 {} / p95 {} / p99 {} over {} faults.\n\n",
                ms(p.p50),
                ms(p.p95),
                ms(p.p99),
                p.count
            ));
        }
        for (tier, heading, restart) in [
            ("process", "Real processes (wall-clock ms on loopback)", "detection"),
            ("simulation", "Simulation (virtual ms of a seeded clock)", "restart"),
            (
                NODES_TIER,
                "Simulated nodes: the real node loop, control plane and actor shells on an in-memory network (virtual ms)",
                "restart",
            ),
        ] {
            let rows: Vec<_> = self.fault_types.iter().filter(|(_, f)| f.tier == tier).collect();
            if rows.is_empty() {
                continue;
            }
            s.push_str(&format!("## {heading}\n\n"));
            s.push_str(&format!(
                "| fault type | injected | survived | {restart} p50/p95/p99 ms | recovery p50/p95/p99 ms | samples replayed | lost | duplicated | slowdown vs fault-free |\n"
            ));
            s.push_str("|---|---:|---:|---|---|---:|---:|---:|---:|\n");
            for (name, f) in rows {
                s.push_str(&format!(
                    "| {name} | {} | {} | {}/{}/{} | {}/{}/{} | {} | {} | {} | {} |\n",
                    f.injected,
                    f.survived,
                    ms(f.restart_ms.p50),
                    ms(f.restart_ms.p95),
                    ms(f.restart_ms.p99),
                    ms(f.recovery_ms.p50),
                    ms(f.recovery_ms.p95),
                    ms(f.recovery_ms.p99),
                    f.samples_replayed,
                    f.lost,
                    f.duplicated,
                    f.slowdown.map_or("–".to_string(), |x| format!("{x:.2}×"))
                ));
            }
            s.push('\n');
        }
        if !self.forged_rejected.is_empty() {
            s.push_str("## Forged messages rejected, by kind\n\n");
            s.push_str(
                "A rogue member (a valid node certificate) forged them; the members dropped and counted them \
                 (`message_rejected`, metric `phalanx_rejected_messages_total`).\n\n",
            );
            s.push_str("| kind | forged | rejected |\n|---|---:|---:|\n");
            for (kind, c) in &self.forged_rejected {
                s.push_str(&format!("| {kind} | {} | {} |\n", c.forged, c.rejected));
            }
            s.push('\n');
        }
        s.push_str(&format!(
            "Steps recomputed after rollbacks and takeovers: {}. Simulation slowdown vs fault-free (virtual time, mean over seeds): {:.2}×.\n\n",
            self.steps_replayed, self.slowdown
        ));
        s.push_str(
            "Detection: from the fault until a survivor declared the node down. Recovery: from the fault until \
             the first step applied after that (simulation: after the replacement started). Slowdown: the run's \
             wall time over the fault-free run's on as many nodes.\n\n",
        );
        s.push_str("![real processes: loss and throughput per step, faults and recoveries marked](processes.svg)\n\n");
        s.push_str("![simulation: loss per step, crashes marked](loss.svg)\n\n");
        if self.violations.is_empty() {
            s.push_str("All invariants held: completes, exactly-once, bit-identical");
            if self.tiers.iter().any(|t| t == "simulation") {
                s.push_str("; replays-identical and no-split-brain (simulation)");
            }
            if self.tiers.iter().any(|t| t == "real processes") {
                s.push_str("; no-bad-checkpoint, clean-exits and fault-took-effect (real processes)");
                if !self.forged_rejected.is_empty() {
                    s.push_str("; forged-rejected (a rogue member)");
                }
            }
            s.push_str(".\n");
        } else {
            s.push_str("## Violations\n\n");
            for v in &self.violations {
                s.push_str(&format!("- {v}\n"));
            }
        }
        s
    }
}

/// Plot loss per step of one run with its faults marked, as SVG.
pub fn plot_loss(path: &Path, title: &str, losses: &[(u64, f64)], faults: &[(u64, String)]) -> Result<(), String> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let max_step = losses.iter().map(|(s, _)| *s).max().unwrap_or(1).max(1);
    let max_loss = losses.iter().map(|(_, l)| *l).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0u64..max_step, 0f64..max_loss)
        .map_err(|e| e.to_string())?;
    chart.configure_mesh().x_desc("step").y_desc("mean loss").draw().map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(losses.iter().copied(), &BLUE))
        .map_err(|e| e.to_string())?
        .label("loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    for (step, what) in faults {
        let s = (*step).min(max_step);
        chart.draw_series(LineSeries::new(vec![(s, 0.0), (s, max_loss)], RED.mix(0.6))).map_err(|e| e.to_string())?;
        chart
            .draw_series(std::iter::once(Text::new(what.clone(), (s, max_loss * 0.95), ("sans-serif", 11))))
            .map_err(|e| e.to_string())?;
    }
    chart.configure_series_labels().border_style(BLACK).draw().map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_has_a_table_of_forged_messages_rejected() {
        let mut r = Report::default();
        assert!(!r.markdown().contains("Forged messages rejected"), "no rogue, no table");
        r.forged_rejected.insert("job-done".into(), crate::invariants::ForgedCount { forged: 6, rejected: 6 });
        r.forged_rejected.insert("oversized-frame".into(), crate::invariants::ForgedCount { forged: 6, rejected: 7 });
        let md = r.markdown();
        assert!(md.contains("## Forged messages rejected, by kind"), "{md}");
        assert!(md.contains("| job-done | 6 | 6 |") && md.contains("| oversized-frame | 6 | 7 |"), "{md}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["forged_rejected"]["job-done"], serde_json::json!({ "forged": 6, "rejected": 6 }));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of(&(1..=100).collect::<Vec<_>>());
        assert_eq!((p.p50, p.p95, p.p99, p.count), (Some(50), Some(95), Some(99), 100));
        assert_eq!(Percentiles::of(&[]).p50, None);
        assert_eq!(Percentiles::of(&[7]).p99, Some(7));
    }
}
