//! The `phalanx` binary: bad flags, configs and CSV files give a one-line
//! error naming the field or line and exit non-zero; a good run writes the
//! documented outputs.

use std::path::Path;
use std::process::Command;

fn phalanx(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phalanx")).args(args).output().expect("run phalanx");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn error_line(args: &[&str]) -> String {
    let (ok, _, err) = phalanx(args);
    assert!(!ok, "{args:?} should fail");
    let line = err.lines().find(|l| l.starts_with("error")).unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(!err.contains("panicked"), "{err}");
    line.to_string()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn bad_flag_values_name_the_flag() {
    let e = error_line(&["train", "--model", "cnn"]);
    assert!(e.contains("--model") && e.contains("cnn"), "{e}");
    let e = error_line(&["train", "--fail", "trainer@x"]);
    assert!(e.contains("--fail") && e.contains("trainer@x"), "{e}");
    let e = error_line(&["train", "--trainers", "0"]);
    assert!(e.contains("`trainers`"), "{e}");
    let e = error_line(&["train", "--fail", "trainer:1@100000"]);
    assert!(e.contains("`fail`") && e.contains("past the last step"), "{e}");
}

#[test]
fn bad_config_files_name_the_file_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "job.toml", "model = \"mlp\"\nbatchsize = 3\n");
    let e = error_line(&["train", "--config", &f]);
    assert!(e.contains("job.toml") && e.contains("batchsize") && e.contains("line 2"), "{e}");
    let f = write(dir.path(), "job2.toml", "epochs = -1\n");
    let e = error_line(&["train", "--config", &f]);
    assert!(e.contains("epochs"), "{e}");
    let e = error_line(&["train", "--config", "/nonexistent/job.toml"]);
    assert!(e.contains("/nonexistent/job.toml"), "{e}");
}

#[test]
fn bad_csv_files_name_the_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let ragged = write(dir.path(), "ragged.csv", "a,b,y\n1,2,3\n4,5\n");
    let e = error_line(&["train", "--model", "linear", "--dataset", &format!("csv:{ragged}")]);
    assert!(e.contains("line 3") && e.contains("ragged.csv"), "{e}");
    let text = write(dir.path(), "text.csv", "a,b,y\n1,2,3\n4,oops,6\n");
    let e = error_line(&["train", "--model", "linear", "--dataset", &format!("csv:{text}")]);
    assert!(e.contains("line 3") && e.contains("oops") && e.contains('b'), "{e}");
    let e = error_line(&["train", "--model", "linear", "--dataset", &format!("csv:{text}:price")]);
    assert!(e.contains("price"), "{e}");
}

#[test]
fn a_csv_job_writes_summary_and_model_with_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    // y = 2a - b + 0.5 plus a little deterministic wobble.
    let mut csv = String::from("a,b,y\n");
    for i in 0..200 {
        let (a, b) = ((i % 17) as f32 / 4.0, (i % 11) as f32 / 3.0);
        csv.push_str(&format!("{a},{b},{}\n", 2.0 * a - b + 0.5 + ((i * 7) % 5) as f32 * 0.01));
    }
    let data = write(dir.path(), "line.csv", &csv);
    let out = dir.path().join("out");
    let (ok, stdout, stderr) = phalanx(&[
        "train",
        "--model",
        "linear",
        "--dataset",
        &format!("csv:{data}:y"),
        "--trainers",
        "2",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--fail",
        "trainer:1@30",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    for field in ["steps", "epochs", "final_loss", "metric", "model_sha256", "samples_applied", "faults"] {
        assert!(summary.get(field).is_some(), "summary.json lacks {field}: {summary}");
    }
    assert_eq!(summary["metric"]["name"], "r2");
    assert!(summary["metric"]["value"].as_f64().unwrap() > 0.99, "{summary}");
    assert_eq!(summary["faults"][0]["what"], "trainer 1");
    assert!(summary["faults"][0]["recovery_ms"].is_u64());
    let applied = &summary["samples_applied"];
    assert!(applied["exactly_once"] == true && applied["exactly_once_epochs"] == summary["epochs"], "{applied}");
    let model = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&model).unwrap();
    let mut bytes = Vec::new();
    for name in ["weight", "bias"] {
        bytes.extend_from_slice(st.tensor(name).unwrap().data());
    }
    use sha2::Digest;
    assert_eq!(
        summary["model_sha256"],
        hex::encode(sha2::Sha256::digest(&bytes)),
        "model_sha256 covers the tensors in order"
    );
    assert!(stdout.contains("exactly-once: yes"), "{stdout}");
}
