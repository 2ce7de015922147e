//! Train on your own CSV file: a header row, numeric columns, a target column.
//!
//! cargo run --release -p phalanx-examples --example train_csv -- data.csv price [linear|mlp]
//!
//! Without arguments it writes a small CSV (a noisy plane) to a temp dir and
//! trains on that, so the example runs anywhere.

use phalanx::JobConfig;
use phalanx_actors::data::{DatasetSource, TaskKind};
use phalanx_actors::model::ModelKind;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tmp = std::env::temp_dir().join(format!("phalanx-example-{}.csv", std::process::id()));
    let (path, target) = match args.as_slice() {
        [path, target, ..] => (path.clone(), target.clone()),
        _ => {
            let mut csv = String::from("x1,x2,x3,y\n");
            for i in 0..500u32 {
                let (a, b, c) = ((i % 13) as f32 / 3.0, (i % 7) as f32 / 2.0, (i % 5) as f32);
                let noise = ((i.wrapping_mul(2654435761) >> 16) % 100) as f32 / 500.0;
                csv.push_str(&format!("{a},{b},{c},{}\n", 1.5 * a - 2.0 * b + 0.25 * c + 3.0 + noise));
            }
            std::fs::write(&tmp, csv)?;
            println!("no CSV given: wrote a sample to {}", tmp.display());
            (tmp.to_string_lossy().into_owned(), "y".to_string())
        }
    };
    let model = match args.get(2).map(String::as_str) {
        Some("mlp") => ModelKind::Mlp.into(),
        _ => ModelKind::Linear.into(),
    };
    let dataset: DatasetSource = format!("csv:{path}:{target}").parse()?;
    let config = JobConfig { model, dataset, task: Some(TaskKind::Regression), trainers: 2, ..Default::default() };
    let (job, report) = phalanx::train(config, |_| {}).await?;
    let m = &report.evaluation.metric;
    println!(
        "{} rows, {} features: held-out {} {:.4} (least squares on the same split: {})",
        job.data.train.len() + job.data.test.len(),
        job.data.train.features(),
        m.name,
        m.value,
        m.least_squares_r2.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into())
    );
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}
