//! The promise, shown: the same job run fault-free on 1 trainer, on 4
//! trainers with 3 aggregators, and on 4 trainers while trainers, shards and
//! aggregators are killed, ends with the same model bits.
//!
//! cargo run --release -p phalanx-examples --example promise

use phalanx::{JobConfig, PreparedJob};
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Injected faults are panics; the supervisors handle them. Keep the output readable.
    phalanx::log_panics();
    let base = JobConfig {
        model: ModelKind::Mlp.into(),
        dataset: DatasetSource::Winequality,
        epochs: Some(20),
        ..Default::default()
    };
    let runs = [
        ("1 trainer, 1 aggregator, no faults", JobConfig { trainers: 1, ..base.clone() }),
        ("4 trainers, 3 aggregators, no faults", JobConfig { trainers: 4, aggregators: Some(3), ..base.clone() }),
        (
            "4 trainers, 3 aggregators, 5 failures",
            JobConfig {
                trainers: 4,
                aggregators: Some(3),
                fail: ["trainer:1@40", "shard:5@77", "aggregator@130", "trainer:3@222", "aggregator:2@301"]
                    .iter()
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?,
                ..base.clone()
            },
        ),
    ];
    let plain = PreparedJob::new(base)?;
    let plain = phalanx::model_sha256(plain.model.as_ref(), &plain.reference_params()?);
    println!("{:<40} {}", "plain single-threaded loop", &plain[..16]);
    for (name, config) in runs {
        let (job, report) = phalanx::train(config, |_| {}).await?;
        let sha = phalanx::model_sha256(job.model.as_ref(), &report.outcome.params);
        let faults = report.outcome.faults.len();
        let exact = phalanx::Summary::new(&job, &report).samples_applied.exactly_once;
        println!(
            "{name:<40} {} {} (faults {faults}, held-out accuracy {:.3}, exactly-once: {exact})",
            &sha[..16],
            if sha == plain { "== plain" } else { "!= plain" },
            report.evaluation.metric.value
        );
        anyhow::ensure!(sha == plain && exact, "{name}: the promise does not hold");
    }
    Ok(())
}
