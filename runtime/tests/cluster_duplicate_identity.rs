//! Two processes with one node identity (issue 14): a second `phalanx node` started with a
//! member's id and certificate on another port while a 3-node job trains. The members refuse
//! it, it exits non-zero saying which member holds the id, and the job runs as if it had
//! never started: the same model bits, about the same time, no membership churn. A real
//! restart (SIGKILL, then the same id again at once) is still taken back.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use phalanx::local::{run_local_with, NodeFault};
use phalanx::{JobConfig, PreparedJob};
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;
use serde_json::Value;

/// The job of the process-tier scenarios: about 3000 steps, a few seconds on 3 nodes.
fn job(out: &Path) -> JobConfig {
    JobConfig {
        model: ModelKind::Mlp.into(),
        dataset: DatasetSource::Winequality,
        trainers: 3,
        epochs: Some(150),
        checkpoint_every: 20,
        checkpoint_min_interval_ms: 0,
        out: Some(out.to_path_buf()),
        ..JobConfig::default()
    }
}

struct Run {
    summary: Value,
    /// First step event to the last (process start-up left out: it is noise, not the fault).
    training: Duration,
    /// Every event of the run, as `events.jsonl` keeps them.
    events: Vec<Value>,
}

impl Run {
    fn member_events(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == kind && e["duplicate"] != true).collect()
    }
}

fn run(out: &Path, faults: Vec<NodeFault>) -> Run {
    let exe = Path::new(env!("CARGO_BIN_EXE_phalanx"));
    let (mut first, mut last) = (None, None);
    let summary = run_local_with(exe, &job(out), 3, faults, |_, _, _| {
        let now = Instant::now();
        first.get_or_insert(now);
        last = Some(now);
    })
    .unwrap_or_else(|e| panic!("phalanx local in {}: {e}", out.display()));
    let training = last.zip(first).map(|(l, f)| l - f).expect("step events");
    let text = std::fs::read_to_string(out.join("events.jsonl")).expect("events.jsonl");
    let events = text.lines().map(|l| serde_json::from_str(l).expect("an event per line")).collect();
    Run { summary, training, events }
}

/// Slowdown bound of the duplicate run over the fault-free one (see the test).
const MAX_SLOWDOWN: f64 = 3.0;

#[test]
fn a_second_process_with_a_members_id_is_refused_and_the_job_runs_as_if_it_never_started() {
    let dir = tempfile::tempdir().unwrap();
    let reference = {
        let prepared = PreparedJob::new(job(dir.path())).unwrap();
        phalanx::model_sha256(prepared.model.as_ref(), &prepared.reference_params().unwrap())
    };
    // The duplicate starts at step 300 of 3000, while node 1 trains and heartbeats.
    let duplicate = NodeFault::Duplicate { node: 1, step: 300 };
    // Fault-free and duplicate runs alternate, two of each: the machine is shared with other
    // work, and the faster run of each kind is the closest to what the code itself costs.
    let (mut calm, mut twice) = (Vec::new(), Vec::new());
    for i in 0..2 {
        calm.push(run(&dir.path().join(format!("fault-free-{i}")), Vec::new()));
        twice.push(run(&dir.path().join(format!("duplicate-{i}")), vec![duplicate.clone()]));
    }
    for r in calm.iter().chain(&twice) {
        assert_eq!(r.summary["model_sha256"].as_str(), Some(reference.as_str()), "bit-identical to the plain loop");
        for exit in r.summary["node_exits"].as_array().unwrap() {
            assert_eq!(exit["code"], 0, "the members exit cleanly: {exit}");
        }
    }
    let fastest = |runs: &[Run]| runs.iter().map(|r| r.training).min().unwrap();
    let (calm_time, twice_time) = (fastest(&calm), fastest(&twice));
    // The causal checks of thrash are below (no member declared down or replaced, a handful of
    // views); wall time on a shared 2-core machine varies about 2x between identical runs, so
    // the time bound only catches the old behaviour (9-14x slower), and the ratio is printed.
    eprintln!("with a duplicate {twice_time:?}, fault-free {calm_time:?}");
    assert!(
        twice_time.as_secs_f64() <= MAX_SLOWDOWN * calm_time.as_secs_f64(),
        "with a duplicate {twice_time:?}, fault-free {calm_time:?}"
    );
    let calm_views = calm.iter().map(|r| r.member_events("view").len()).max().unwrap();

    for r in &twice {
        let faults = r.summary["node_faults"].as_array().unwrap();
        assert_eq!(faults.len(), 1, "{faults:?}");
        let fault = &faults[0];
        assert_eq!(fault["kind"], "duplicate");
        // The second process exited non-zero, naming the live member and its address.
        let code = fault["exit_code"].as_i64();
        assert!(code.is_some_and(|c| c != 0), "the duplicate exited non-zero: {fault}");
        let member_addr = r
            .member_events("listening")
            .into_iter()
            .find(|e| e["node"] == 1)
            .and_then(|e| e["addr"].as_str())
            .expect("node 1's address");
        let evidence = fault["evidence"].as_str().unwrap();
        let said = format!("error: node 1 is already a live member at {member_addr}, incarnation 0x");
        assert!(evidence.contains(&said) && evidence.contains("; refusing to join twice"), "{evidence}");

        // Both sides put it in the events: a member refused it, and it said it was refused.
        let refusals = r.member_events("duplicate_identity");
        assert!(
            !refusals.is_empty() && refusals.iter().all(|e| e["role"] == "member" && e["peer"] == 1),
            "{refusals:?}"
        );
        let refused = r.events.iter().filter(|e| e["event"] == "duplicate_identity" && e["duplicate"] == true);
        assert!(refused.clone().count() == 1 && refused.clone().all(|e| e["role"] == "refused"), "{:?}", r.events);

        // No churn: node 1 was never declared down or replaced, no member lost its quorum,
        // and the views are those of a fault-free run, give or take a handful.
        assert!(fault["detection_ms"].is_null(), "node 1 was declared down: {fault}");
        let replaced: Vec<&Value> = r
            .member_events("peer_down")
            .into_iter()
            .filter(|e| e["reason"].as_str().is_some_and(|r| r.contains("incarnation")))
            .collect();
        assert!(replaced.is_empty(), "a member was replaced by the duplicate: {replaced:?}");
        assert!(r.member_events("quorum_lost").is_empty());
        let views = r.member_events("view").len();
        assert!(views <= calm_views + 3, "{views} views with a duplicate, {calm_views} without");
    }
    println!(
        "training: fault-free {:?}, with a duplicate {:?}; views {calm_views} vs {:?}",
        calm.iter().map(|r| r.training).collect::<Vec<_>>(),
        twice.iter().map(|r| r.training).collect::<Vec<_>>(),
        twice.iter().map(|r| r.member_events("view").len()).collect::<Vec<_>>(),
    );
}

#[test]
fn a_node_killed_and_started_again_at_once_is_taken_back_not_refused() {
    let mut c = Cluster::start(3);
    for id in 0..3 {
        c.wait_view(0, id, &[0, 1, 2]);
    }
    let since = c.mark();
    // SIGKILL and start again without waiting for detection: the old process's connections
    // are still open at the members when the new one dials them.
    let killed_at = c.kill(1);
    let node = c.spawn(1);
    c.nodes[1] = Some(node);
    let back = c
        .wait_for(since, "node 0 to take node 1 back", |v| v["event"] == "peer_up" && v["node"] == 0 && v["peer"] == 1);
    let rejoin_ms = back["t_ms"].as_u64().unwrap().saturating_sub(killed_at);
    // The new process adopts the cluster's view (node 0's view may not even change: the
    // restart can be quicker than failure detection).
    c.wait_view(since, 1, &[0, 1, 2]);
    // The new process binds node 1's port again, which proves the old one gone: the members
    // take it at once (and would wait at most a failure timeout, 500 ms, after the old
    // process's last heartbeat otherwise); 2 s leaves room for start-up on a busy machine.
    assert!(rejoin_ms < 2_000, "node 1 taken back {rejoin_ms} ms after the kill");
    let refusals: Vec<Value> =
        c.events_since(since).into_iter().filter(|e| e["event"] == "duplicate_identity").collect();
    assert!(refusals.is_empty(), "a restart is not a duplicate: {refusals:?}");
    let down =
        c.events_since(since).into_iter().find(|e| e["event"] == "peer_down" && e["node"] == 0 && e["peer"] == 1);
    let reason = down.as_ref().and_then(|e| e["reason"].as_str()).unwrap_or_default().to_owned();
    assert!(reason.contains("node restarted"), "node 0 saw node 1 restart: {down:?}");
    assert!(c.exited(1).is_none(), "the restarted node 1 is running");
    println!("node 1 taken back {rejoin_ms} ms after SIGKILL and restart");
}
