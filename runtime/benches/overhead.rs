//! Actor overhead: samples/s of the plain single-threaded training loop vs
//! Phalanx's actors in one process with 1 and 4 trainers, measured in one
//! run and printed as ratios. Run with `cargo bench -p phalanx --bench overhead`.
//!
//! Every variant computes the same bits (asserted), so the ratio is the
//! price of the protocol: messages, batch copies, per-partition gradients
//! through the aggregator, and the step-0 and final checkpoints.

use std::time::{Duration, Instant};

use phalanx::{params_sha256, JobConfig, PreparedJob};
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;

/// Repetitions per variant; the median is reported.
const REPS: usize = 5;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent; keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let epochs = if quick { 2 } else { 60 };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    // (name, model, data, batch, hidden units): the overhead is per step, so
    // it shrinks as the work per step grows; the rows show that trend.
    let cases = [
        ("mlp/winequality", ModelKind::Mlp, DatasetSource::Winequality, 64, 64),
        ("mlp/winequality b256", ModelKind::Mlp, DatasetSource::Winequality, 256, 64),
        ("mlp h256/winequality b256", ModelKind::Mlp, DatasetSource::Winequality, 256, 256),
        ("softmax/iris", ModelKind::Softmax, DatasetSource::Iris, 16, 0),
    ];
    println!(
        "{:<22} {:>14} {:>14} {:>14} {:>10} {:>10}",
        "job", "plain s/s", "1 trainer s/s", "4 trainers s/s", "1t/plain", "4t/plain"
    );
    for (name, model, dataset, batch, hidden) in cases {
        let base = JobConfig {
            model: model.into(),
            dataset,
            hidden: hidden.max(1),
            epochs: Some(epochs),
            batch_size: Some(batch),
            checkpoint_every: 0,
            ..JobConfig::default()
        };
        let job = PreparedJob::new(base.clone()).expect("job");
        let samples = (job.data.train.len() as u64 * u64::from(epochs)) as f64;
        let mut plain = Vec::new();
        let mut expected = String::new();
        for _ in 0..REPS {
            let t = Instant::now();
            let params = job.reference_params().expect("plain loop");
            plain.push(t.elapsed());
            expected = params_sha256(&params);
        }
        let mut rates = vec![samples / median(plain).as_secs_f64()];
        for trainers in [1, 4] {
            let job = PreparedJob::new(JobConfig { trainers, ..base.clone() }).expect("job");
            let mut times = Vec::new();
            for _ in 0..REPS {
                let dir = tempfile::tempdir().expect("temp dir");
                let t = Instant::now();
                let report = rt.block_on(phalanx::job::run(&job, dir.path(), false, |_| {})).expect("run");
                times.push(t.elapsed());
                assert_eq!(params_sha256(&report.outcome.params), expected, "{name}: actors must match the plain loop");
            }
            rates.push(samples / median(times).as_secs_f64());
        }
        println!(
            "{:<26} {:>14.0} {:>14.0} {:>14.0} {:>10.3} {:>10.3}",
            name,
            rates[0],
            rates[1],
            rates[2],
            rates[1] / rates[0],
            rates[2] / rates[0]
        );
    }
    println!("(ratios > 1 are faster than the plain loop; overhead at 1 trainer = 1 - 1t/plain)");
}
