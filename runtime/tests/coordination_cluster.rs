//! Training on a coordination service: real node processes (`phalanx local`, QUIC with mutual
//! TLS) whose membership, coordinator election and views live on a real etcd (one member, and
//! a 3-member cluster) or a real ZooKeeper, started as child processes. On each backend the
//! run kills a trainer's node, pauses a node past its lease or session, kills the
//! coordinator's node and restarts a killed node — and ends with the bits of `phalanx train`.

mod common;

use common::{phalanx_cli as phalanx, printed_sha as sha};
use phalanx::cluster::coordination::servers::LocalEtcd;

const JOB: [&str; 8] = ["--model", "mlp", "--dataset", "winequality", "--epochs", "30", "--trainers", "3"];

/// On 3 nodes with 3 trainers (one on each): a trainer's node dies and comes back as a new
/// process; node 1 stops past its 2 s lease or session and wakes up (it must rejoin as a new
/// incarnation); the coordinator's node dies (node 1 takes over from the checkpoint copies).
const FAULTS: [&str; 8] = ["--kill", "2@100", "--restart", "2@200", "--pause", "1@300:3000", "--kill", "0@450"];

/// The fault-free model of the job, from one process.
fn reference() -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("train");
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    args.extend(JOB);
    let (ok, stdout, stderr) = phalanx(&args);
    assert!(ok, "{stderr}");
    sha(&stdout)
}

/// Run the job on 3 nodes coordinating on `coordination` with [`FAULTS`]; check it against
/// `phalanx train`.
fn survives_every_fault_with_the_same_bits(coordination: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("local");
    let mut args = vec!["local", "--nodes", "3", "--coordination", coordination, "--out", out.to_str().unwrap()];
    args.extend(FAULTS);
    args.extend(JOB);
    let (ok, stdout, stderr) = phalanx(&args);
    assert!(ok, "{coordination}: {stdout}\n{stderr}");
    assert_eq!(sha(&stdout), reference(), "{coordination}: 3 processes with faults vs one process\n{stdout}\n{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    let applied = &summary["samples_applied"];
    assert!(applied["exactly_once"] == true && applied["exactly_once_epochs"] == 30, "{coordination}: {applied}");
    let faults = summary["node_faults"].as_array().unwrap();
    assert_eq!(faults.len(), 4, "{faults:?}");
    // The kills are detected through the service: the lease or session runs out.
    for f in faults.iter().filter(|f| f["kind"] == "kill") {
        assert!(f["detection_ms"].is_u64() && f["recovery_ms"].is_u64(), "{coordination}: {f}");
    }
    // Node 1 coordinates at the end: node 0 coordinated until it was killed.
    assert_eq!(summary["coordinator"], 1, "{coordination}: {stdout}");
    let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    let views: Vec<serde_json::Value> = events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "view")
        .collect();
    assert!(views.iter().any(|v| v["coordinator"] == 0), "{coordination}: node 0 coordinated at first");
    // Never two coordinators for one epoch.
    let mut by_epoch = std::collections::BTreeMap::new();
    for v in &views {
        let previous = by_epoch.insert(v["epoch"].as_u64().unwrap(), v["coordinator"].as_u64().unwrap());
        assert!(
            previous.is_none_or(|c| Some(c) == v["coordinator"].as_u64()),
            "{coordination}: two coordinators in epoch {}",
            v["epoch"]
        );
    }
}

#[test]
fn training_on_one_etcd_survives_every_fault_with_the_same_bits() {
    survives_every_fault_with_the_same_bits("etcd");
}

#[test]
fn training_on_a_zookeeper_survives_every_fault_with_the_same_bits() {
    survives_every_fault_with_the_same_bits("zookeeper");
}

#[test]
fn training_on_three_etcds_survives_every_fault_with_the_same_bits() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let etcd = runtime.block_on(LocalEtcd::start(3, None)).unwrap();
    let spec = etcd.spec("/phalanx/three").to_string();
    survives_every_fault_with_the_same_bits(&spec);
    drop(etcd);
}

#[test]
fn a_cluster_started_again_on_the_same_prefix_ignores_the_view_left_there() {
    // The second cluster finds the first one's last view in etcd (epoch several, written under
    // a token whose lease is long gone); it must not act on it, and must train the same bits.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let etcd = runtime.block_on(LocalEtcd::start(1, None)).unwrap();
    let spec = etcd.spec("/phalanx/again").to_string();
    let expected = reference();
    for run in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("local");
        let mut args = vec!["local", "--nodes", "3", "--coordination", &spec, "--out", out.to_str().unwrap()];
        args.extend(["--kill", "2@100"]);
        args.extend(JOB);
        let (ok, stdout, stderr) = phalanx(&args);
        assert!(ok, "run {run}: {stdout}\n{stderr}");
        assert_eq!(sha(&stdout), expected, "run {run}");
        let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
        let first_view = events
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["event"] == "view")
            .expect("a view");
        assert_eq!(first_view["coordinator"], 0, "run {run}: the first view is the new cluster's: {first_view}");
        if run == 1 {
            assert!(first_view["epoch"].as_u64() > Some(2), "run 1 goes above the epochs left by run 0: {first_view}");
        }
    }
    drop(etcd);
}

#[test]
fn on_a_service_a_dead_nodes_trainers_spread_over_the_survivors() {
    // Six trainers on three nodes: two on each (hashing with bounded loads). Node 1 dies for
    // good: its two trainers go one to each survivor — a ring would give both to node 2 — and
    // the bits are those of `phalanx train` (the number of trainers is deployment only).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("local");
    let mut args = vec!["local", "--nodes", "3", "--coordination", "etcd", "--out", out.to_str().unwrap()];
    args.extend(["--kill", "1@100"]);
    args.extend(["--model", "mlp", "--dataset", "winequality", "--epochs", "30", "--trainers", "6"]);
    let (ok, stdout, stderr) = phalanx(&args);
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(sha(&stdout), reference(), "6 trainers, node 1 lost, vs one process");
    let events: Vec<serde_json::Value> = std::fs::read_to_string(out.join("events.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let down = events.iter().position(|e| e["event"] == "down" && e["peer"] == 1).expect("node 1 declared down");
    let trainer = |e: &serde_json::Value| {
        (e["event"] == "spawn" && e["actor"].as_str().is_some_and(|a| a.starts_with("trainer")))
            .then(|| (e["actor"].as_str().unwrap().to_string(), e["node"].as_u64().unwrap()))
    };
    // Where each trainer was when node 1 died: its last spawn there before. The coordinator
    // (node 0) spawns its own actors in place, without a frame and so without a `spawn` event:
    // a trainer never spawned elsewhere is on node 0.
    let on = |spawned: &std::collections::BTreeMap<String, u64>, t: u32| {
        spawned.get(&format!("trainer {t}")).copied().unwrap_or(0)
    };
    let before: std::collections::BTreeMap<String, u64> = events[..down].iter().filter_map(trainer).collect();
    for node in 0..3 {
        let n = (0..6).filter(|t| on(&before, *t) == node).count();
        assert_eq!(n, 2, "two trainers a node: {before:?}");
    }
    let moved: Vec<u32> = (0..6).filter(|t| on(&before, *t) == 1).collect();
    let mut after = std::collections::BTreeMap::new();
    for (t, node) in events[down..].iter().filter_map(trainer) {
        after.entry(t).or_insert(node);
    }
    let went: std::collections::BTreeSet<u64> = moved.iter().map(|t| on(&after, *t)).collect();
    assert_eq!(went, [0, 2].into_iter().collect(), "node 1's trainers {moved:?} went to {went:?}: {after:?}");
    // The coordinator recovered exactly those (and their shards).
    let recovered = events[down..].iter().find(|e| e["event"] == "recovered").expect("a recovery");
    for t in &moved {
        let name = format!("trainer {t}");
        assert!(recovered["actors"].as_array().unwrap().iter().any(|a| a == name.as_str()), "{recovered}");
    }
}
