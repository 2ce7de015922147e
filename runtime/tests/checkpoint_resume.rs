//! Checkpoints on disk: a job that died can resume and still end
//! bit-identical; a corrupted checkpoint is skipped for the previous good
//! one; a checkpoint of another job is never loaded.

mod common;

use common::{assert_exactly_once, job, run, run_in, sha};
use phalanx::JobConfig;
use phalanx_actors::checkpoint::CheckpointStore;
use phalanx_actors::model::ModelKind;

/// Run a job that escalates (a poison trainer) at `step`, leaving its checkpoints in `dir`.
async fn crash_at(config: &JobConfig, dir: &std::path::Path, step: u64) {
    let dying =
        JobConfig { fail: vec![format!("trainer:0@{step}x*").parse().unwrap()], max_restarts: 1, ..config.clone() };
    let err = run_in(dying, dir, false).await.err().expect("the poisoned job fails");
    assert!(err.to_string().contains("trainer 0"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resumed_from_its_checkpoints_ends_bit_identical() {
    let config = JobConfig { aggregators: Some(2), ..job(ModelKind::Mlp) };
    let (_, reference) = run(config.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    crash_at(&config, dir.path(), 25).await;
    let store = CheckpointStore::open(dir.path()).unwrap();
    let hash = phalanx::PreparedJob::new(config.clone()).unwrap().config_hash;
    let newest = store.newest_complete(&hash, reference.outcome.params.len()).unwrap();
    assert_eq!(newest, Some(20), "checkpoints every 10 steps; the job died at 25");
    // Resume with another deployment: 3 aggregators, 4 trainers.
    let resumed = JobConfig { aggregators: Some(3), trainers: 4, ..config };
    let (job, report) = run_in(resumed, dir.path(), true).await.unwrap();
    assert_eq!(sha(&report), sha(&reference));
    assert_exactly_once(&job, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_newest_checkpoint_is_skipped_for_the_previous_good_one() {
    let config = job(ModelKind::Softmax);
    let (_, reference) = run(config.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    crash_at(&config, dir.path(), 35).await;
    // Flip one byte in the middle of the newest checkpoint file.
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let newest = files.last().unwrap().clone();
    assert!(newest.to_string_lossy().contains("ckpt-0000000030"), "{newest:?}");
    let mut bytes = std::fs::read(&newest).unwrap();
    let mid = bytes.len() - 9;
    bytes[mid] ^= 0x40;
    std::fs::write(&newest, bytes).unwrap();
    let store = CheckpointStore::open(dir.path()).unwrap();
    let hash = phalanx::PreparedJob::new(config.clone()).unwrap().config_hash;
    assert_eq!(store.newest_complete(&hash, reference.outcome.params.len()).unwrap(), Some(20));
    let (job, report) = run_in(config, dir.path(), true).await.unwrap();
    assert_eq!(sha(&report), sha(&reference));
    assert_exactly_once(&job, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_of_another_job_are_not_loaded() {
    let config = job(ModelKind::Softmax);
    let dir = tempfile::tempdir().unwrap();
    crash_at(&config, dir.path(), 25).await;
    let other = JobConfig { seed: config.seed + 1, ..config };
    let err = run_in(other, dir.path(), true).await.err().expect("nothing of this job to resume");
    assert!(err.to_string().contains("nothing to resume"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_files_are_real_safetensors_with_the_aggregator_state() {
    let config = JobConfig { aggregators: Some(3), ..job(ModelKind::Linear) };
    let dir = tempfile::tempdir().unwrap();
    let (_, report) = run_in(config, dir.path(), false).await.unwrap();
    let store = CheckpointStore::open(dir.path()).unwrap();
    let scanned = store.scan().unwrap();
    assert!(scanned.iter().all(|f| f.outcome.is_ok()), "every file verifies");
    let last = scanned.iter().map(|f| f.step).max().unwrap();
    let mut finals: Vec<_> = scanned.iter().filter(|f| f.step == last).collect();
    finals.sort_by_key(|f| f.offset);
    assert_eq!(finals.len(), 3);
    let mut joined = Vec::new();
    for f in finals {
        let bytes = std::fs::read(&f.path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("params").unwrap();
        joined.extend(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    }
    assert_eq!(joined, report.outcome.params, "the final checkpoint holds the final parameters");
}

/// With a checkpoint due every step and a floor of 30 ms, the ranges of a job skip the same
/// steps: every step on disk has the files of all three ranges (the newest complete one is the
/// final state), the steps kept are far apart where steps are fast, and the model has the bits
/// of a run with every checkpoint written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ranges_of_a_job_skip_the_same_checkpoint_steps() {
    let exact = JobConfig { aggregators: Some(3), epochs: Some(20), checkpoint_every: 1, ..job(ModelKind::Mlp) };
    let (_, reference) = run(exact.clone()).await.unwrap();
    let floor_ms = 30;
    let spaced = JobConfig { checkpoint_min_interval_ms: floor_ms, ..exact };
    let dir = tempfile::tempdir().unwrap();
    let (job, report) = run_in(spaced, dir.path(), false).await.unwrap();
    assert_eq!(sha(&report), sha(&reference));
    let total = job.schedule.total_steps();
    let store = CheckpointStore::open(dir.path()).unwrap();
    assert_eq!(store.newest_complete(&job.config_hash, report.outcome.params.len()).unwrap(), Some(total));
    let mut by_step = std::collections::BTreeMap::<u64, usize>::new();
    for file in store.scan().unwrap() {
        assert!(file.outcome.is_ok(), "{}: {:?}", file.path.display(), file.outcome.err());
        *by_step.entry(file.step).or_default() += 1;
    }
    assert!(by_step.values().all(|ranges| *ranges == 3), "a step written by only some ranges: {by_step:?}");
    let ms_per_step = report.duration.as_secs_f64() * 1000.0 / total as f64;
    let kept: Vec<u64> = by_step.keys().copied().filter(|s| *s != total).collect();
    if ms_per_step * 2.0 < floor_ms as f64 {
        assert!(
            kept.windows(2).all(|w| w[1] - w[0] >= 2),
            "checkpoints {floor_ms} ms apart at {ms_per_step:.3} ms/step: {kept:?}"
        );
    } else {
        eprintln!("steps of {ms_per_step:.1} ms are too slow for the floor to skip any: spacing not checked");
    }
}
