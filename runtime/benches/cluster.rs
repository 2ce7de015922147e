//! Training throughput on 3 local node processes (QUIC, mutual TLS) vs the
//! one-process run of the same job, printed as a ratio in one run. Both end
//! with the same model bits (asserted). `cargo bench -p phalanx --bench cluster`
//! (build the release `phalanx` binary first: `cargo build --release -p phalanx`).

use phalanx::local::run_local_with;
use phalanx::{JobConfig, PreparedJob};
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_phalanx"));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    println!("{:<32} {:>14} {:>14} {:>10}", "job", "1 process s/s", "3 nodes s/s", "3n/1p");
    for (name, hidden, batch, epochs) in
        [("mlp h64/winequality b64", 64, 64, 40), ("mlp h256/winequality b256", 256, 256, 60)]
    {
        let epochs = if quick { 2 } else { epochs };
        let dir = tempfile::tempdir().expect("temp dir");
        let config = JobConfig {
            model: ModelKind::Mlp.into(),
            dataset: DatasetSource::Winequality,
            hidden,
            batch_size: Some(batch),
            epochs: Some(epochs),
            trainers: 3,
            out: Some(dir.path().join("local")),
            ..JobConfig::default()
        };
        let job = PreparedJob::new(config.clone()).expect("job");
        let one = rt.block_on(phalanx::job::run(&job, &dir.path().join("ckpt"), false, |_| {})).expect("one process");
        let summary = run_local_with(&exe, &config, 3, Vec::new(), |_, _, _| {}).expect("3 nodes");
        assert_eq!(
            summary["model_sha256"].as_str(),
            Some(phalanx::model_sha256(job.model.as_ref(), &one.outcome.params).as_str())
        );
        let samples = (job.data.train.len() as u64 * u64::from(epochs)) as f64;
        let one_rate = samples / one.duration.as_secs_f64();
        let three_rate = summary["samples_per_sec"].as_f64().unwrap_or(0.0);
        println!("{name:<32} {one_rate:>14.0} {three_rate:>14.0} {:>10.3}", three_rate / one_rate);
    }
}
