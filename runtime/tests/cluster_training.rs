//! Training across real node processes over QUIC: the final parameters are
//! bit-identical to the one-process run whether nothing fails, a trainer's
//! node is SIGKILLed mid-epoch, the aggregator's node is SIGKILLed (a
//! survivor restores the newest checkpoint copy), or a node is paused past
//! the detection window and resumed — and every sample counts exactly once.

mod common;

use common::cluster::{expected_sha, Cluster};
use serde_json::Value;

/// 3 trainers over 3 nodes, checkpoints every 20 steps, 600 steps.
const JOB: &str = "model = \"mlp\"\ndataset = \"winequality\"\ntrainers = 3\nepochs = 30\ncheckpoint_every = 20\ncheckpoint_min_interval_ms = 0\n";

fn wait_step(c: &Cluster, step: u64) {
    c.wait_for(0, &format!("step {step}"), |v| v["event"] == "step" && v["step"].as_u64() >= Some(step));
}

fn assert_exactly_once(s: &Value) {
    let applied = &s["samples_applied"];
    assert_eq!(applied["epochs"], 30);
    assert!(applied["exactly_once"] == true && applied["exactly_once_epochs"] == 30, "{applied}");
}

/// A node whose maths gives other bits (here: one that claims another kernel fingerprint, as
/// a machine with other SIMD features would measure) refuses every actor the coordinator asks
/// it to host (shards and trainers), with a reason naming it, the actor, the job and both
/// kernels; the restart policy escalates and the job fails with that reason — it never
/// finishes with mixed bits.
#[test]
fn a_node_with_other_maths_refuses_to_host_and_the_job_fails_naming_both_kernels() {
    let here = phalanx_actors::model::kernel::fingerprint();
    let other = format!("{:016x}", here.0 ^ 0x5a5a_0000_0000_0001);
    let extra = [(1, vec!["--pretend-kernel".to_string(), other.clone()])].into_iter().collect();
    let c = Cluster::start_with_args(2, Some(JOB), extra);
    let failed = c.wait_for(0, "the job to fail", |v| v["event"] == "job_failed" && v["node"] == 0);
    let error = failed["error"].as_str().unwrap();
    for needed in ["node 1 refuses to host", "giving up", &other, &here.to_string()] {
        assert!(error.contains(needed), "{needed:?} missing from {error:?}");
    }
    let done = c.events_since(0).into_iter().find(|v| v["event"] == "job_done");
    assert!(done.is_none(), "the job finished on mixed kernels: {done:?}");
}

/// Both nodes train with other maths (a claimed kernel fingerprint) and are killed; started
/// again with this machine's maths, they find checkpoints of the other kernel: the job fails
/// naming the file and both kernels — it neither restores them nor starts over from step 0.
#[test]
fn checkpoints_of_other_maths_are_not_resumed_and_not_silently_dropped() {
    let here = phalanx_actors::model::kernel::fingerprint();
    let other = format!("{:016x}", here.0 ^ 0x00a5_0000_0000_0100);
    let pretend = vec!["--pretend-kernel".to_string(), other.clone()];
    let extra = [(0, pretend.clone()), (1, pretend)].into_iter().collect();
    let mut c = Cluster::start_with_args(2, Some(JOB), extra);
    wait_step(&c, 150);
    c.kill(1);
    c.kill(0);
    c.extra.clear();
    let since = c.mark();
    for id in 0..2 {
        let node = c.spawn(id);
        c.nodes[id as usize] = Some(node);
    }
    let failed = c.wait_for(since, "the job to fail", |v| v["event"] == "job_failed");
    let error = failed["error"].as_str().unwrap();
    for needed in ["cannot be restored", "was computed with kernel", &other, &here.to_string()] {
        assert!(error.contains(needed), "{needed:?} missing from {error:?}");
    }
    let done = c.events_since(since).into_iter().find(|v| v["event"] == "job_done");
    assert!(done.is_none(), "the job started over and finished: {done:?}");
}

#[test]
fn three_processes_train_to_the_same_bits_as_one_process() {
    let c = Cluster::start_with_job(3, Some(JOB));
    let done = c.wait_done(2);
    assert_eq!(done["model_sha256"].as_str().unwrap(), expected_sha(JOB));
    assert_exactly_once(&c.summary());
}

#[test]
fn sigkill_of_a_trainer_node_mid_epoch_keeps_the_bits() {
    let mut c = Cluster::start_with_job(3, Some(JOB));
    wait_step(&c, 150);
    c.kill(2);
    let done = c.wait_done(1);
    assert_eq!(done["model_sha256"].as_str().unwrap(), expected_sha(JOB));
    let s = c.summary();
    assert_exactly_once(&s);
    let lost = s["faults"].as_array().unwrap();
    assert!(lost.iter().any(|f| f["reason"] == "node 2 lost"), "{lost:?}");
    assert!(lost.iter().all(|f| f["recovery_ms"].is_u64()), "{lost:?}");
}

#[test]
fn sigkill_of_the_aggregator_node_restores_a_checkpoint_copy_and_keeps_the_bits() {
    let mut c = Cluster::start_with_job(3, Some(JOB));
    wait_step(&c, 150);
    c.kill(0);
    let takeover = c.wait_for(0, "node 1 to coordinate", |v| v["event"] == "coordinating" && v["node"] == 1);
    assert!(takeover["restore"].as_u64().is_some_and(|s| s >= 140), "restored from a copy: {takeover}");
    let done = c.wait_done(2);
    assert_eq!(done["model_sha256"].as_str().unwrap(), expected_sha(JOB));
    assert_exactly_once(&c.summary());
}

#[test]
fn a_node_paused_past_detection_and_resumed_does_not_change_the_bits() {
    let c = Cluster::start_with_job(3, Some(JOB));
    wait_step(&c, 150);
    let since = c.mark();
    c.signal(2, "STOP");
    c.wait_for(since, "node 2 declared down", |v| v["event"] == "down" && v["peer"] == 2);
    c.signal(2, "CONT");
    let done = c.wait_done(0);
    assert_eq!(done["model_sha256"].as_str().unwrap(), expected_sha(JOB));
    assert_exactly_once(&c.summary());
}

#[test]
fn a_restarted_node_rejoins_and_gets_work_again() {
    let mut c = Cluster::start_with_job(3, Some(JOB));
    wait_step(&c, 100);
    let since = c.mark();
    c.kill(1);
    c.wait_for(since, "node 1 declared down", |v| v["event"] == "down" && v["peer"] == 1);
    let since = c.mark();
    let node = c.spawn(1);
    c.nodes[1] = Some(node);
    let work = c.wait_for(since, "node 1 to be given work again", |v| v["event"] == "spawn" && v["node"] == 1);
    assert!(work["actor"].as_str().is_some_and(|a| a.starts_with("trainer") || a.starts_with("shard")), "{work}");
    let done = c.wait_done(2);
    assert_eq!(done["model_sha256"].as_str().unwrap(), expected_sha(JOB));
    assert_exactly_once(&c.summary());
}
