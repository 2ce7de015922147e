//! Aggregators spread over the nodes (`aggregator_placement = "spread"`, the default: range
//! `r` on node `r mod N`, one range per node when the job does not set `aggregators`), across
//! real node processes over QUIC: every node hosts and checkpoints its own
//! range, and the final parameters are bit-identical to the one-process run whether nothing
//! fails, a node hosting a range is SIGKILLed (its range restores on a node that never held
//! its files, fetched from the coordinator), or the coordinator's node is SIGKILLed (the
//! successor restores every range from the copies it holds).

mod common;

use common::cluster::{expected_sha, Cluster};
use phalanx::{JobConfig, PreparedJob};
use serde_json::Value;

/// 3 trainers over 3 nodes, checkpoints every 20 steps, 600 steps; the aggregators as they
/// come by default (one range per node, spread), so these tests also pin the default.
const JOB: &str = "model = \"mlp\"\ndataset = \"winequality\"\ntrainers = 3\nepochs = 30\n\
                   checkpoint_every = 20\ncheckpoint_min_interval_ms = 0\n";

fn assert_exactly_once(s: &Value) {
    let applied = &s["samples_applied"];
    assert!(applied["exactly_once"] == true && applied["exactly_once_epochs"] == 30, "{applied}");
}

/// The checkpoint files of node `id`'s data directory: `(step, offset)` of each.
fn files_on(c: &Cluster, id: u32) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    let jobs = c.dir().join(format!("data-{id}")).join("jobs");
    for job in std::fs::read_dir(&jobs).into_iter().flatten().flatten() {
        for file in std::fs::read_dir(job.path().join("checkpoints")).into_iter().flatten().flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            if let Some(key) = phalanx_actors::checkpoint::FileKey::parse(&name) {
                out.push((key.step, key.offset));
            }
        }
    }
    out.sort_unstable();
    out
}

/// Where each aggregator was spawned, as the hosts reported it since `since`.
fn aggregator_hosts(c: &Cluster, since: usize) -> Vec<(String, u64)> {
    let mut hosts: Vec<(String, u64)> = c
        .events_since(since)
        .into_iter()
        .filter(|v| v["event"] == "spawn" && v["actor"].as_str().is_some_and(|a| a.starts_with("aggregator")))
        .map(|v| (v["actor"].as_str().unwrap().to_owned(), v["node"].as_u64().unwrap()))
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

#[test]
fn each_node_hosts_and_checkpoints_its_own_range_and_the_bits_are_the_one_process_bits() {
    let c = Cluster::start_with_job(3, Some(JOB));
    let done = c.wait_done(0);
    assert_eq!(done["model_sha256"].as_str().unwrap(), expected_sha(JOB));
    let summary = c.summary();
    assert_exactly_once(&summary);
    assert_eq!(summary["job"]["aggregators"], 3, "one range per node by default: {}", summary["job"]);
    // Nodes 1 and 2 were asked to host ranges 1 and 2 (the coordinator's own range is spawned
    // by its supervisor, not by a request).
    assert_eq!(aggregator_hosts(&c, 0), vec![("aggregator 1".into(), 1), ("aggregator 2".into(), 2)]);
    // Node 2 is neither the coordinator nor its replica: it holds only the files of its range,
    // pruned to the newest few; the coordinator holds every range of the final step.
    let on_2 = files_on(&c, 2);
    let offsets: std::collections::BTreeSet<usize> = on_2.iter().map(|(_, o)| *o).collect();
    assert_eq!(offsets.len(), 1, "node 2 holds one range's files: {on_2:?}");
    assert!(on_2.len() <= 6, "node 2 prunes its range's files: {on_2:?}");
    let last = on_2.iter().map(|(s, _)| *s).max().unwrap();
    assert_eq!(files_on(&c, 0).iter().filter(|(s, _)| *s == last).count(), 3, "every range of step {last} on node 0");
}

#[test]
fn sigkill_of_a_range_host_restores_its_range_on_a_node_without_its_files() {
    let mut c = Cluster::start_with_job(3, Some(JOB));
    c.wait_for(0, "step 150", |v| v["event"] == "step" && v["step"].as_u64() >= Some(150));
    let since = c.mark();
    c.kill(1);
    let done = c.wait_done(2);
    assert_eq!(done["model_sha256"].as_str().unwrap(), expected_sha(JOB));
    let s = c.summary();
    assert_exactly_once(&s);
    assert!(s["rollbacks"].as_u64().unwrap_or(0) >= 1, "range 1 was lost: every range rolled back: {s}");
    // Range 1 went on on node 2 (the next live node), which fetched its files.
    assert!(aggregator_hosts(&c, since).contains(&("aggregator 1".into(), 2)), "{:?}", aggregator_hosts(&c, since));
    // The cluster gave the job one range per node.
    let spec = JobConfig { aggregators: Some(3), ..JobConfig::from_toml_str(JOB).unwrap() };
    let range_1 = PreparedJob::new(spec).unwrap().ranges()[1].0;
    assert!(files_on(&c, 2).iter().any(|(_, o)| *o == range_1), "node 2 holds range 1's files now");
}

#[test]
fn sigkill_of_the_coordinator_restores_every_range_from_the_successors_copies() {
    let mut c = Cluster::start_with_job(3, Some(JOB));
    c.wait_for(0, "step 150", |v| v["event"] == "step" && v["step"].as_u64() >= Some(150));
    c.kill(0);
    let takeover = c.wait_for(0, "node 1 to coordinate", |v| v["event"] == "coordinating" && v["node"] == 1);
    assert!(takeover["restore"].as_u64().is_some_and(|s| s >= 140), "restored from the copies: {takeover}");
    let done = c.wait_done(2);
    assert_eq!(done["model_sha256"].as_str().unwrap(), expected_sha(JOB));
    assert_exactly_once(&c.summary());
}
