//! The client commands against a long-lived cluster of three real `phalanx node` processes:
//! `phalanx status`, `phalanx submit` (with and without `--wait`), `phalanx jobs`, `phalanx
//! cancel`, over QUIC with the client certificate `phalanx certs` wrote. Two submitted jobs
//! run back to back, the second with its coordinator SIGKILLed while `submit --wait`
//! follows it; both end with the bits of the plain loop (`phalanx train` computes the same,
//! see `recovery_bit_identical.rs`), and the waiting client fetches the model from whichever
//! node finished the job.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::cluster::Cluster;
use phalanx::{JobConfig, PreparedJob};
use phalanx_actors::data::DatasetSource;
use phalanx_actors::model::ModelKind;
use serde_json::Value;

fn phalanx() -> Command {
    Command::new(env!("CARGO_BIN_EXE_phalanx"))
}

/// `phalanx <command> --cluster … --certs …` plus `args`.
fn client(c: &Cluster, command: &str, args: &[&str]) -> Command {
    let mut cmd = phalanx();
    cmd.arg(command).args(["--cluster", &c.addrs(), "--certs", c.certs().to_str().unwrap()]).args(args);
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run phalanx")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The job as flags and as the config the reference is computed from.
struct Job {
    epochs: u32,
}

impl Job {
    fn flags(&self) -> Vec<String> {
        let job = ["--model", "mlp", "--dataset", "winequality", "--trainers", "3", "--checkpoint-every", "20"];
        // The exact cadence: the kill below expects a checkpoint at or after step 300.
        job.iter()
            .chain(&["--checkpoint-min-interval-ms", "0", "--epochs"])
            .map(|s| s.to_string())
            .chain([self.epochs.to_string()])
            .collect()
    }

    fn reference_sha(&self) -> String {
        let config = JobConfig {
            model: ModelKind::Mlp.into(),
            dataset: DatasetSource::Winequality,
            trainers: 3,
            checkpoint_every: 20,
            checkpoint_min_interval_ms: 0,
            epochs: Some(self.epochs),
            ..JobConfig::default()
        };
        let prepared = PreparedJob::new(config).expect("job");
        phalanx::model_sha256(prepared.model.as_ref(), &prepared.reference_params().expect("plain loop"))
    }
}

fn submit(c: &Cluster, job: &Job, extra: &[&str]) -> Command {
    let flags = job.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    client(c, "submit", &args)
}

/// The model_sha256 a `submit --wait` printed, after checking the files it fetched.
fn fetched(stdout: &str, out: &Path) -> String {
    let sha = stdout
        .lines()
        .find_map(|l| l.strip_prefix("model_sha256 "))
        .unwrap_or_else(|| panic!("no model_sha256 line in {stdout}"))
        .to_owned();
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary.json"))
            .expect("summary json");
    assert_eq!(summary["model_sha256"].as_str(), Some(sha.as_str()), "summary.json agrees");
    // A model file whose parameters hash to its model_sha256 (inspect verifies it).
    let model = phalanx::predict::inspect(&out.join("model.safetensors")).expect("a valid model file");
    assert!(matches!(model, phalanx::predict::Inspection::Model(_)), "{model:?}");
    for file in ["history.csv", "loss.svg"] {
        assert!(out.join(file).is_file(), "{file} fetched");
    }
    sha
}

fn wait_child(child: Child) -> Output {
    child.wait_with_output().expect("wait for phalanx submit")
}

#[test]
fn a_long_lived_cluster_runs_submitted_jobs_through_the_cli() {
    let mut c = Cluster::start(3);
    for id in 0..3 {
        c.wait_view(0, id, &[0, 1, 2]);
    }
    let dir = tempfile::tempdir().unwrap();

    // status: any node answers with the view.
    let status = run(client(&c, "status", &["--json"]));
    assert!(status.status.success(), "{}", text(&status.stderr));
    let status: Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(status["coordinator"], 0);
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3), "{status}");

    // Job 1: submit --wait; the id is the first line, the model is fetched into --out.
    let short = Job { epochs: 10 };
    let out1 = dir.path().join("job1");
    let done = run(submit(&c, &short, &["--wait", "--out", out1.to_str().unwrap()]));
    let stdout = text(&done.stdout);
    assert!(done.status.success(), "{stdout}\n{}\n{}", text(&done.stderr), c.logs());
    assert_eq!(stdout.lines().next(), Some("1"), "the job id comes first: {stdout}");
    assert_eq!(fetched(&stdout, &out1), short.reference_sha(), "job 1: the bits of the plain loop");

    // Job 2, followed by submit --wait while its coordinator (node 0) is SIGKILLed mid-job.
    let long = Job { epochs: 150 };
    let out2 = dir.path().join("job2");
    let since = c.mark();
    let waiting = submit(&c, &long, &["--wait", "--out", out2.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn submit --wait");
    c.wait_for(since, "job 2 at step 300 on node 0", |v| {
        v["event"] == "step" && v["node"] == 0 && v["job"] == 2 && v["step"].as_u64().is_some_and(|s| s >= 300)
    });
    c.kill(0);
    let done = wait_child(waiting);
    let stdout = text(&done.stdout);
    assert!(done.status.success(), "{stdout}\n{}\n{}", text(&done.stderr), c.logs());
    assert_eq!(stdout.lines().next(), Some("2"));
    let taken_over = c.wait_for(since, "node 1 to coordinate job 2", |v| {
        v["event"] == "coordinating" && v["node"] == 1 && v["job"] == 2
    });
    assert!(taken_over["restore"].as_u64().is_some_and(|s| s >= 300), "resumed from a checkpoint: {taken_over}");
    assert_eq!(fetched(&stdout, &out2), long.reference_sha(), "job 2: the bits of the plain loop despite the kill");

    // jobs: both finished, with those bits, seen from a surviving node.
    let jobs = run(client(&c, "jobs", &["--json"]));
    assert!(jobs.status.success(), "{}", text(&jobs.stderr));
    let jobs: Vec<Value> = serde_json::from_slice(&jobs.stdout).expect("jobs json");
    let shas: Vec<(u64, &str)> = jobs
        .iter()
        .map(|j| (j["id"].as_u64().unwrap(), j["state"]["finished"]["model_sha256"].as_str().unwrap()))
        .collect();
    assert_eq!(shas, [(1, short.reference_sha().as_str()), (2, long.reference_sha().as_str())]);

    // Job 3: cancelled while a client waits for it; the waiting client exits non-zero.
    let since = c.mark();
    let waiting = submit(&c, &Job { epochs: 2000 }, &["--wait", "--out", dir.path().join("job3").to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn submit --wait");
    c.wait_for(since, "job 3 to train", |v| v["event"] == "step" && v["job"] == 3);
    let cancel = run(client(&c, "cancel", &["3"]));
    assert!(cancel.status.success(), "{}", text(&cancel.stderr));
    let done = wait_child(waiting);
    assert!(!done.status.success(), "a cancelled job's submit --wait fails");
    assert!(text(&done.stderr).contains("job 3 was cancelled"), "{}", text(&done.stderr));
    let table = run(client(&c, "jobs", &[]));
    let table = text(&table.stdout);
    assert!(table.lines().any(|l| l.split_whitespace().take(2).eq(["3", "cancelled"])), "{table}");
}

#[test]
fn bad_submissions_get_errors_naming_the_field_or_file() {
    let c = Cluster::start(3);
    for id in 0..3 {
        c.wait_view(0, id, &[0, 1, 2]);
    }
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 3] = [
        ("dataset = \"csv:/nonexistent/rows.csv\"\n", "/nonexistent/rows.csv"),
        ("model = \"no-such-model\"\n", "no-such-model"),
        ("epochs = 2\nwarp_speed = 9\n", "warp_speed"),
    ];
    for (i, (toml, named)) in cases.iter().enumerate() {
        let path: PathBuf = dir.path().join(format!("job{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = run(client(&c, "submit", &["--config", path.to_str().unwrap()]));
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{toml} was accepted");
        assert!(stderr.contains(named), "the error names {named}: {stderr}");
        assert!(out.stdout.is_empty(), "no job id for a refused job: {}", text(&out.stdout));
    }
    // Nothing was queued.
    let jobs = run(client(&c, "jobs", &["--json"]));
    assert_eq!(serde_json::from_slice::<Vec<Value>>(&jobs.stdout).expect("jobs json"), Vec::<Value>::new());

    // The client certificate is required: a directory without one is named.
    let empty = tempfile::tempdir().unwrap();
    let out = run({
        let mut cmd = phalanx();
        cmd.args(["jobs", "--cluster", &c.addrs(), "--certs", empty.path().to_str().unwrap()]);
        cmd
    });
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("client.pem"), "{}", text(&out.stderr));
}
