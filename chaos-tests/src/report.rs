//! Campaign reports: `report.json` for scripts, `report.md` and a plot for people.

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
    /// Faults of this type injected.
    pub injected: u64,
    /// Of those, in runs whose every invariant held.
    pub survived: u64,
    /// Simulation: time from the fault to the replacement running (virtual
    /// ms). Real processes: time until a survivor declared the node down.
    pub restart_ms: Percentiles,
    /// Time from the fault to training progressing again.
    pub recovery_ms: Percentiles,
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
    /// Recovery time over all faults with one.
    pub recovery_ms: Percentiles,
    /// Per fault type.
    pub fault_types: BTreeMap<String, FaultType>,
    /// Invariant violations, `seed: message`.
    pub violations: Vec<String>,
    /// Steps recomputed after rollbacks, over every run.
    pub steps_replayed: u64,
    /// Mean virtual time to finish with faults over the fault-free time (1.0 = no slowdown).
    pub slowdown: f64,
    /// What is not covered yet, said plainly.
    pub not_covered: Vec<String>,
}

impl Report {
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
        s.push_str("| fault type | injected | survived | restart or detection p50/p95/p99 ms | recovery p50/p95/p99 ms | lost | duplicated |\n");
        s.push_str("|---|---:|---:|---|---|---:|---:|\n");
        for (name, f) in &self.fault_types {
            s.push_str(&format!(
                "| {name} | {} | {} | {}/{}/{} | {}/{}/{} | 0 | 0 |\n",
                f.injected,
                f.survived,
                ms(f.restart_ms.p50),
                ms(f.restart_ms.p95),
                ms(f.restart_ms.p99),
                ms(f.recovery_ms.p50),
                ms(f.recovery_ms.p95),
                ms(f.recovery_ms.p99)
            ));
        }
        s.push_str(&format!(
            "\nSteps recomputed after rollbacks: {}. Slowdown vs fault-free (virtual time): {:.2}×.\n\n",
            self.steps_replayed, self.slowdown
        ));
        s.push_str(
            "Simulation rows (crashes, messages) are in virtual milliseconds of a seeded clock; \
             real-process rows (SIGKILL, SIGSTOP, restart) are wall-clock milliseconds on loopback, \
             with detection in the restart column.\n\n",
        );
        s.push_str("![loss per step, faults marked](loss.svg)\n\n");
        if self.violations.is_empty() {
            s.push_str(
                "All invariants held: completes, exactly-once, bit-identical, replays-identical, no-split-brain.\n",
            );
        } else {
            s.push_str("## Violations\n\n");
            for v in &self.violations {
                s.push_str(&format!("- {v}\n"));
            }
        }
        if !self.not_covered.is_empty() {
            s.push_str("\n## Not covered yet\n\n");
            for n in &self.not_covered {
                s.push_str(&format!("- {n}\n"));
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
    fn nearest_rank_percentiles() {
        let p = Percentiles::of(&(1..=100).collect::<Vec<_>>());
        assert_eq!((p.p50, p.p95, p.p99, p.count), (Some(50), Some(95), Some(99), 100));
        assert_eq!(Percentiles::of(&[]).p50, None);
        assert_eq!(Percentiles::of(&[7]).p99, Some(7));
    }
}
