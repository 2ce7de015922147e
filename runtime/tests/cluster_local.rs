//! `phalanx local`: N node processes, node faults on a schedule, and a
//! summary.json with the node faults' detection and recovery times — and the
//! same model bits as `phalanx train`.

mod common;

use common::{phalanx_cli as phalanx, printed_sha as sha};

#[test]
fn local_cluster_with_a_kill_and_a_pause_matches_train_and_reports_node_faults() {
    let dir = tempfile::tempdir().unwrap();
    let (out_local, out_train) = (dir.path().join("local"), dir.path().join("train"));
    let job = ["--model", "mlp", "--dataset", "winequality", "--epochs", "30", "--trainers", "3"];
    let mut args =
        vec!["local", "--nodes", "3", "--kill", "1@150", "--pause", "2@300:900", "--out", out_local.to_str().unwrap()];
    args.extend(job);
    let (ok, stdout, stderr) = phalanx(&args);
    assert!(ok, "{stdout}\n{stderr}");
    let mut args = vec!["train", "--out", out_train.to_str().unwrap()];
    args.extend(job);
    let (ok, train_stdout, stderr) = phalanx(&args);
    assert!(ok, "{stderr}");
    assert_eq!(sha(&stdout), sha(&train_stdout), "3 processes with faults vs one process");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_local.join("summary.json")).unwrap()).unwrap();
    let faults = summary["node_faults"].as_array().unwrap();
    assert_eq!(faults.len(), 2, "{faults:?}");
    // Step events come at a bounded rate, but each fault fires at its exact step.
    let steps: Vec<u64> = faults.iter().map(|f| f["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![150, 300], "{faults:?}");
    for f in faults {
        let detection = f["detection_ms"].as_u64().unwrap_or_else(|| panic!("detected: {f}"));
        assert!(detection < 1_000, "detection under a second on loopback: {f}");
        assert!(f["recovery_ms"].is_u64(), "{f}");
    }
    let applied = &summary["samples_applied"];
    assert!(applied["exactly_once"] == true && applied["exactly_once_epochs"] == 30, "{applied}");
    assert!(stdout.contains("exactly-once: yes"), "{stdout}");
    // Every step is in the history; a coordinator that restarted from a checkpoint
    // (node 0 alone has no quorum during the pause) appended the steps it recomputed, and so
    // did one that rolled every range back (node 1 hosted a range of θ: one per node by
    // default).
    let rows = phalanx::output::read_history(&out_local.join("history.csv")).unwrap();
    let steps = summary["steps"].as_u64().unwrap();
    let seen: std::collections::BTreeSet<u64> = rows.iter().map(|r| r.step).collect();
    assert_eq!(seen, (1..=steps).collect(), "every step in history.csv");
    assert_eq!(rows.last().map(|r| r.step), Some(steps));
    let takeovers = summary["takeovers"].as_array().unwrap().iter().filter_map(|t| t["restore"].as_u64());
    // A rollback under an earlier coordinator is not in the last one's summary; its `recovered`
    // event is in events.jsonl, at the first step after the restored one.
    let events = std::fs::read_to_string(out_local.join("events.jsonl")).unwrap();
    let rollbacks = events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            e["event"] == "recovered"
                && e["actors"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x.as_str().is_some_and(|x| x.starts_with("aggregator"))))
        })
        .filter_map(|e| e["step"].as_u64().map(|s| s - 1));
    let restores: Vec<u64> = takeovers.chain(rollbacks).collect();
    for w in rows.windows(2).filter(|w| w[1].step <= w[0].step) {
        assert!(restores.contains(&(w[1].step - 1)), "history goes back to {} with restores {restores:?}", w[1].step);
    }
    let injected = events.lines().filter(|l| l.contains(r#""event":"injected""#)).count();
    assert_eq!(injected, 2, "the harness logs each fault it injects");
    assert!(out_train.join("history.csv").is_file(), "phalanx train writes the history too");
    // loss.svg beside the summary, with the node faults marked.
    let svg = std::fs::read_to_string(out_local.join("loss.svg")).expect("phalanx local draws loss.svg");
    assert!(svg.contains("samples / s") && svg.contains("kill 1") && svg.contains("pause 2"), "faults marked");
    assert!(out_train.join("loss.svg").is_file(), "phalanx train draws it too");
}

#[test]
fn local_refuses_a_fault_for_a_node_that_does_not_exist() {
    let (ok, _, stderr) = phalanx(&["local", "--nodes", "3", "--kill", "7@10"]);
    assert!(!ok);
    assert!(stderr.contains("--kill 7@10") && stderr.contains("no node 7 among 3"), "{stderr}");
    let (ok, _, stderr) = phalanx(&["local", "--nodes", "3", "--pause", "1@10"]);
    assert!(!ok);
    assert!(stderr.contains("--pause 1@10") && stderr.contains("@STEP:MS"), "{stderr}");
}
