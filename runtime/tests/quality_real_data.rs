//! Trained models reach sensible quality on real data, judged against the
//! best fit on the same split where there is one.

mod common;

use common::run;
use phalanx::JobConfig;
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn softmax_regression_on_iris_reaches_90_percent_held_out() {
    let (_, report) = run(JobConfig::default()).await.unwrap();
    let m = &report.evaluation.metric;
    assert_eq!((m.name.as_str(), m.split.as_str()), ("accuracy", "held-out"));
    assert!(m.value >= 0.90, "held-out accuracy {}", m.value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linear_regression_on_diabetes_matches_closed_form_least_squares() {
    let config =
        JobConfig { model: ModelKind::Linear.into(), dataset: DatasetSource::Diabetes, ..JobConfig::default() };
    let (_, report) = run(config).await.unwrap();
    let m = &report.evaluation.metric;
    let best = m.least_squares_r2.expect("closed-form fit on the same split");
    assert!(m.value >= best - 0.02, "held-out R² {} vs least squares {best}", m.value);
    assert!(m.value >= 0.40, "held-out R² {} (seed 42 split)", m.value);
    assert!(m.train_value >= 0.40, "in-sample R² {} (published fits reach about 0.5)", m.train_value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlp_beats_softmax_regression_on_winequality() {
    let mut gap = 0.0;
    let seeds = [1, 3, 4];
    for seed in seeds {
        let base = JobConfig { dataset: DatasetSource::Winequality, seed, ..JobConfig::default() };
        let (_, softmax) = run(JobConfig { model: ModelKind::Softmax.into(), ..base.clone() }).await.unwrap();
        let (_, mlp) = run(JobConfig { model: ModelKind::Mlp.into(), ..base }).await.unwrap();
        let (s, m) = (softmax.evaluation.metric.value, mlp.evaluation.metric.value);
        assert!(mlp.evaluation.metric.train_value > softmax.evaluation.metric.train_value, "seed {seed}");
        gap += (m - s) / seeds.len() as f64;
    }
    assert!(gap > 0.02, "mean held-out accuracy gain of the MLP over softmax: {gap:.4}");
}
