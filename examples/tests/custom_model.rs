//! The `custom_model` example, end to end: a model and a data source that are
//! not Phalanx's, registered by name, trained on three node processes of the
//! example's binary with one of them SIGKILLed mid-job, end bit-identical to
//! the fault-free in-process run — and the kill took effect (the job's
//! summary lists the lost node).
//!
//! The example is built with the cargo that runs this test (same profile, target directory
//! and workspace features: under `cargo test --workspace` that build is already done), then run
//! as a user would; every wait is bounded.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Bound on the example's run: a hang fails the test.
const BOUND: Duration = Duration::from_secs(300);

/// Builds the example and returns its executable (cargo prints it as a JSON artifact message).
fn build_example(name: &str) -> PathBuf {
    // This test runs from TARGET/PROFILE/deps/.
    let exe = std::env::current_exe().expect("test executable");
    let target_dir = exe.ancestors().nth(3).expect("a target directory").to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    // Cargo gives this test the variables of its package (CARGO_MANIFEST_DIR, CARGO_PKG_*, …);
    // handed on, build scripts that watch them (ring's does) would rebuild half the tree.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let set_for_tests =
            ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_BIN_", "CARGO_CRATE_NAME", "CARGO_PRIMARY_PACKAGE"]
                .iter()
                .any(|p| key.starts_with(p))
                || ["CARGO_TARGET_TMPDIR", "CARGO_RUSTC_CURRENT_DIR", "OUT_DIR"].contains(&key.as_ref());
        if set_for_tests {
            command.env_remove(key.as_ref());
        }
    }
    command
        // `--workspace`, not `-p phalanx-examples`: the features then unify over the whole
        // workspace as `cargo test --workspace` unifies them, which has built this example with
        // every library it needs already, so nothing is compiled again (a `-p` build selected
        // other features and rebuilt the workspace's crates: about 100 s of CI).
        .args(["build", "--quiet", "--message-format=json", "--workspace", "--example", name])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit());
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    let out = command.output().expect("run cargo build");
    assert!(out.status.success(), "cargo build --example {name} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo named no executable for example {name}"))
}

#[test]
fn a_registered_model_on_three_processes_with_a_kill_ends_bit_identical_to_the_fault_free_run() {
    let exe = build_example("custom_model");
    let mut child = Command::new(&exe).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run the example");
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOUND;
    let mut seen = Vec::new();
    let result = loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                seen.push(line.clone());
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["example"] == "custom_model" {
                        break v;
                    }
                }
            }
            Err(e) => {
                let _ = child.kill();
                let stderr = child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
                panic!("no result from the example ({e}); stdout: {seen:#?}\nstderr: {}", stderr.unwrap_or_default());
            }
        }
    };
    // The result is the last line: the example exits right after it.
    let output = child.wait_with_output().expect("the example exits");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{result}\n{stderr}");

    assert_eq!(result["model"], "quadratic", "{result}");
    assert_eq!(result["killed_node"], 2, "a trainer node, not the coordinator: {result}");
    let (at, total) = (result["killed_at_step"].as_u64().unwrap(), result["total_steps"].as_u64().unwrap());
    assert!(at > 0 && at < total, "killed mid-job: {result}");
    assert_eq!(result["fault_recorded"], true, "the job recovered from the lost node: {result}");
    assert_eq!(result["identical"], true, "{result}");
    assert_eq!(result["sha256_with_kill"], result["fault_free_sha256"], "{result}");
    assert!(result["metric_value"].as_f64().is_some_and(|a| a > 0.9), "the quadratic model separates rings: {result}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
