//! The benchmark harness against PyTorch DDP (`bench/`) runs here in its smoke mode, so that it
//! cannot rot: `bench/run.sh --smoke` with this build's `phalanx` trains the same tiny MLP on
//! both sides, checks that their loss curves agree (the fairness check), measures every figure
//! once and writes `latest.json`, whose keys and verdict this test checks. The figures of a smoke
//! run are noise (a few dozen steps): nothing here asserts a speed.
//!
//! The harness installs Debian's `python3-torch` and `libopenblas0-pthread` with apt-get when
//! they are missing (CI runs as root with network to Debian). Without them and without apt-get
//! the harness exits with an error saying so, and this test fails with it: it never skips.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The keys `latest.json` must have (the list), each a number or an object.
const KEYS: [&str; 6] = [
    "phalanx_over_ddp",
    "phalanx_over_ddp_by_size",
    "recovery_speedup_vs_torchrun",
    "wire_bytes_per_node_step_over_model_bytes",
    "ft_overhead_no_faults",
    "recovery_ms_p99",
];

#[test]
fn bench_smoke_runs_both_sides_fairly_and_writes_every_figure() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the runtime crate sits in the workspace");
    let out = tempfile::tempdir().expect("temp dir");
    let output = Command::new(repo.join("bench/run.sh"))
        .args(["--smoke", "--out"])
        .arg(out.path())
        .arg("--phalanx")
        .arg(env!("CARGO_BIN_EXE_phalanx"))
        .current_dir(repo)
        .output()
        .expect("run bench/run.sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench/run.sh --smoke failed ({}); it needs Debian's python3-torch and libopenblas0-pthread \
         (installed with apt-get as root when missing):\n{stderr}",
        output.status
    );
    let path = out.path().join("latest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}\n{stderr}", path.display()));
    let result: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    for key in KEYS {
        let v = &result[key];
        assert!(v.is_number() || v.is_object(), "latest.json: `{key}` is {v}, expected a figure");
    }
    // The race was fair: both sides trained the same workload, step by step.
    let fairness = &result["fairness"];
    assert_eq!(fairness["passed"], true, "fairness: {fairness}");
    assert!(fairness["checks"].as_u64().unwrap_or(0) >= 2, "fairness: {fairness}");
    for (figure, tolerance) in [
        ("max_first_step_diff", "first_step_tolerance"),
        ("max_first_epoch_rel_diff", "first_epoch_tolerance_rel"),
        ("max_epoch_mean_rel_diff", "epoch_mean_tolerance_rel"),
    ] {
        let (figure, tolerance) = (fairness[figure].as_f64(), fairness[tolerance].as_f64());
        assert!(figure.zip(tolerance).is_some_and(|(f, t)| f <= t), "fairness: {fairness}");
    }
    // Every measured figure is there: step times of both systems, the wire of both, a recovery
    // on each side, and torch on OpenBLAS.
    for row in result["step_time"].as_array().expect("step_time rows") {
        for system in ["phalanx", "ddp"] {
            assert!(row[system]["wall_ms_per_step"]["median"].is_number(), "{row}");
            assert!(row[system]["cpu_ms_per_step"]["median"].is_number(), "{row}");
        }
    }
    let wire = &result["wire_bytes_per_node_step_over_model_bytes"];
    assert!(wire["phalanx"]["2"].is_number() && wire["ddp"]["2"].is_number(), "wire: {wire}");
    let recovery = &result["recovery"];
    for system in ["phalanx", "torchrun"] {
        let runs = recovery[system]["runs"].as_array().expect("recovery runs");
        assert!(!runs.is_empty() && runs.iter().all(|r| r["recovery_ms"].as_u64().is_some()), "{recovery}");
    }
    assert!(result["recovery_ms_p99"].as_u64().is_some_and(|ms| ms > 0), "{recovery}");
    // The cost of checkpoints comes from pairs of runs (on, off), each pair's figure kept.
    let ft = &result["ft_overhead_no_faults_by_size"];
    let cell = &ft["8"]["1"];
    let pairs = cell["pairs"].as_u64().unwrap_or(0);
    assert!(pairs >= 1, "ft: {ft}");
    assert_eq!(cell["overhead_by_pair"].as_array().map(Vec::len), Some(pairs as usize), "ft: {ft}");
    assert!(cell["on_ms_per_step"].is_number() && cell["off_ms_per_step"].is_number(), "ft: {ft}");
    assert_eq!(result["meta"]["versions"]["blas"], "openblas", "{}", result["meta"]["versions"]);
    assert!(out.path().join("BENCHMARKS.md").exists(), "the smoke run writes its report beside latest.json");
}
