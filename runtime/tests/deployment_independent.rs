//! The final model depends only on the job, not on how many trainers or
//! aggregators ran it — and equals a plain single-threaded loop.

mod common;

use common::{assert_exactly_once, job, run, sha};
use phalanx::{params_sha256, JobConfig, PreparedJob};
use phalanx_actors::model::ModelKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_two_or_four_trainers_and_one_or_three_aggregators_give_identical_bits() {
    for model in [ModelKind::Linear, ModelKind::Softmax, ModelKind::Mlp] {
        let base = job(model);
        let plain = PreparedJob::new(base.clone()).unwrap().reference_params().unwrap();
        let expected = params_sha256(&plain);
        for trainers in [1, 2, 4] {
            for aggregators in [1, 3] {
                let (job, report) =
                    run(JobConfig { trainers, aggregators: Some(aggregators), ..base.clone() }).await.unwrap();
                assert_eq!(
                    sha(&report),
                    expected,
                    "{model} with {trainers} trainers and {aggregators} aggregators differs from the plain loop"
                );
                assert_exactly_once(&job, &report);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_and_the_partition_count_do_change_the_result() {
    // The counterpart of the test above: identical bits are not a constant.
    let base = job(ModelKind::Softmax);
    let (_, a) = run(base.clone()).await.unwrap();
    let (_, b) = run(JobConfig { seed: base.seed + 1, ..base.clone() }).await.unwrap();
    let (_, c) = run(JobConfig { partitions: 4, ..base }).await.unwrap();
    assert_ne!(sha(&a), sha(&b));
    assert_ne!(sha(&a), sha(&c));
}
