//! Plots a person reads next to a run's outputs: loss and throughput per
//! step, with faults and recoveries marked (SVG, no font files needed).

use std::path::Path;

/// One step event of a real-process run, for [`plot_run`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunPoint {
    /// The step.
    pub step: u64,
    /// Mean loss of the step.
    pub loss: f64,
    /// Steps per second around it (wall clock).
    pub throughput: Option<f64>,
}

/// Plot loss (top) and throughput (bottom) per step of one run, with fault
/// and recovery moments marked, as SVG.
/// `throughput_label` names the bottom chart's unit (e.g. `steps / s`).
pub fn plot_run(
    path: &Path,
    title: &str,
    throughput_label: &str,
    points: &[RunPoint],
    marks: &[(u64, String)],
) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled(title, ("sans-serif", 18)).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(300);
    let max_step = points.iter().map(|p| p.step).max().unwrap_or(1).max(1);
    let series: [(&str, Vec<(u64, f64)>); 2] = [
        ("mean loss", points.iter().map(|p| (p.step, p.loss)).filter(|(_, l)| l.is_finite()).collect()),
        (throughput_label, points.iter().filter_map(|p| Some((p.step, p.throughput?))).collect()),
    ];
    for ((label, data), area) in series.into_iter().zip([top, bottom]) {
        let max_y = data.iter().map(|(_, y)| *y).fold(0.0f64, f64::max).max(1e-9) * 1.1;
        let mut chart = ChartBuilder::on(&area)
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(60)
            .build_cartesian_2d(0u64..max_step, 0f64..max_y)
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("step").y_desc(label).draw().map_err(|e| err(&e))?;
        chart.draw_series(LineSeries::new(data, &BLUE)).map_err(|e| err(&e))?;
        for (step, what) in marks {
            let s = (*step).min(max_step);
            // Faults are labelled at the top, recoveries lower: they are often a few steps apart.
            let (color, height) = if what == "resumed" { (GREEN.mix(0.8), 0.80) } else { (RED.mix(0.6), 0.93) };
            chart.draw_series(LineSeries::new(vec![(s, 0.0), (s, max_y)], color)).map_err(|e| err(&e))?;
            chart
                .draw_series(std::iter::once(Text::new(what.clone(), (s, max_y * height), ("sans-serif", 11))))
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))
}
