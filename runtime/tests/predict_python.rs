//! Using a trained model outside Phalanx: `model.safetensors` loads in Python with
//! `safetensors` + `numpy`, which recompute the predictions of `phalanx predict` from the
//! file alone (weights, model spec, feature standardisation, target scale, class names).
//! Bad inputs to `phalanx predict` and `phalanx inspect` get errors naming the file, line and
//! column.
//!
//! The test installs `safetensors` and `numpy` itself, in a virtualenv under the target
//! directory (`target/predict-venv`, reused when present). Without `python3` (or without a
//! working `venv`/`pip`) it fails when `CI=true` and is skipped with a printed reason otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use phalanx::JobConfig;
use phalanx_actors::data::{load, DatasetSource, Labels, TaskKind};
use phalanx_actors::model::ModelKind;

const SAFETENSORS_VERSION: &str = "0.8.0";
const NUMPY_VERSION: &str = "2.2.6";
/// Rows predicted by both sides.
const ROWS: usize = 25;

fn run(command: &mut Command) -> Result<String, String> {
    let output = command.output().map_err(|err| format!("cannot run {command:?}: {err}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The venv's python with safetensors and numpy, creating the venv if needed.
fn interpreter() -> Result<PathBuf, String> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = tmp.parent().unwrap_or(tmp).join("predict-venv");
    let python = venv.join("bin/python");
    let check = format!(
        "import sys, numpy, safetensors; sys.exit(numpy.__version__ != '{NUMPY_VERSION}' or safetensors.__version__ != '{SAFETENSORS_VERSION}')"
    );
    if python.exists() && run(Command::new(&python).args(["-c", &check])).is_ok() {
        return Ok(python);
    }
    run(Command::new("python3").arg("--version")).map_err(|err| format!("python3 is missing: {err}"))?;
    run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv))
        .map_err(|err| format!("python3 -m venv is missing or failed: {err}"))?;
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("safetensors=={SAFETENSORS_VERSION}"),
        &format!("numpy=={NUMPY_VERSION}"),
    ]))
    .map_err(|err| format!("pip install safetensors numpy failed: {err}"))?;
    Ok(python)
}

/// Train `model` on `dataset` in this process; returns the model file.
async fn trained(dir: &Path, model: ModelKind, dataset: DatasetSource) -> PathBuf {
    let out = dir.join(model.name());
    let config =
        JobConfig { model: model.into(), dataset, epochs: Some(5), out: Some(out.clone()), ..JobConfig::default() };
    let (job, report) = phalanx::train(config, |_| {}).await.expect("training");
    phalanx::write_outputs(&out, &job, &report).expect("outputs");
    out.join("model.safetensors")
}

/// The first rows of `dataset` as raw CSV (features by name, then the target column).
fn rows_csv(dir: &Path, dataset: &DatasetSource, task: TaskKind) -> PathBuf {
    let table = load(dataset, task).expect("dataset");
    let path = dir.join(format!("{dataset}.csv"));
    let mut w = csv::Writer::from_path(&path).expect("csv");
    let mut header = table.feature_names.clone();
    header.push("target".into());
    w.write_record(&header).expect("header");
    for i in 0..ROWS {
        let mut record: Vec<String> = table.x.row(i).iter().map(|v| v.to_string()).collect();
        record.push(match &table.y {
            Labels::Real(values) => values[i].to_string(),
            Labels::Class { labels, .. } => labels[i].to_string(),
        });
        w.write_record(&record).expect("row");
    }
    w.flush().expect("flush");
    path
}

fn phalanx(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_phalanx")).args(args).output().expect("phalanx runs")
}

/// `phalanx predict` into a CSV, read back as (prediction, class index) per row.
fn predict(model: &Path, rows: &Path, out: &Path) -> Vec<(String, Option<usize>)> {
    let output = phalanx(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &format!("csv:{}", rows.display()),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "phalanx predict: {}", String::from_utf8_lossy(&output.stderr));
    let mut reader = csv::Reader::from_path(out).expect("predictions");
    reader
        .records()
        .enumerate()
        .map(|(i, r)| {
            let r = r.expect("record");
            assert_eq!(r[0].parse::<usize>().unwrap(), i);
            (r[1].to_string(), r.get(2).map(|c| c.parse().expect("class index")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_recomputes_the_predictions_of_phalanx_predict_from_the_model_file() {
    let python = match interpreter() {
        Ok(python) => python,
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => panic!("{reason}"),
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return;
        }
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/predict_numpy.py");
    let dir = tempfile::tempdir().unwrap();
    for (model, dataset, task) in [
        (ModelKind::Mlp, DatasetSource::Winequality, TaskKind::Classification),
        (ModelKind::Softmax, DatasetSource::Iris, TaskKind::Classification),
        (ModelKind::Linear, DatasetSource::Diabetes, TaskKind::Regression),
    ] {
        let file = trained(dir.path(), model, dataset.clone()).await;
        let rows = rows_csv(dir.path(), &dataset, task);
        let ours = predict(&file, &rows, &dir.path().join(format!("{model}-preds.csv")));
        assert_eq!(ours.len(), ROWS);
        let theirs = run(Command::new(&python).arg(&script).arg(&file).arg(&rows)).expect("python");
        let theirs: Vec<serde_json::Value> = serde_json::from_str(theirs.trim()).expect("json from python");
        assert_eq!(theirs.len(), ROWS, "{model}: python predicted every row");
        for (i, ((ours, index), theirs)) in ours.iter().zip(&theirs).enumerate() {
            match index {
                Some(index) => assert_eq!(Some(*index as u64), theirs.as_u64(), "{model} row {i}: class of {ours}"),
                None => {
                    let (a, b) = (ours.parse::<f64>().unwrap(), theirs.as_f64().unwrap());
                    assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{model} row {i}: phalanx {a}, numpy {b}");
                }
            }
        }
        if task == TaskKind::Classification {
            let distinct: std::collections::BTreeSet<&String> = ours.iter().map(|(p, _)| p).collect();
            assert!(!distinct.is_empty());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_to_predict_and_inspect_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let model = trained(dir.path(), ModelKind::Softmax, DatasetSource::Iris).await;
    let model_arg = model.to_str().unwrap();

    // A CSV without one of the model's features.
    let missing = dir.path().join("missing.csv");
    std::fs::write(&missing, "sepal length,sepal width\n1,2\n").unwrap();
    let out = phalanx(&["predict", "--model", model_arg, "--data", &format!("csv:{}", missing.display())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("missing.csv") && err.contains("no column"), "{err}");

    // A cell that is not a number: the line and the column are named.
    let good = rows_csv(dir.path(), &DatasetSource::Iris, TaskKind::Classification);
    let text = std::fs::read_to_string(&good).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines[3] = lines[3].replacen(|c: char| c.is_ascii_digit(), "x", 1);
    let bad_cell = dir.path().join("bad-cell.csv");
    std::fs::write(&bad_cell, lines.join("\n")).unwrap();
    let out = phalanx(&["predict", "--model", model_arg, "--data", &format!("csv:{}", bad_cell.display())]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 4") && err.contains("not a finite number"), "{err}");

    // --data without the csv: prefix.
    let out = phalanx(&["predict", "--model", model_arg, "--data", good.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected csv:PATH"));

    // A damaged model file: a flipped byte in the weights fails the hash check.
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x40;
    let damaged = dir.path().join("damaged.safetensors");
    std::fs::File::create(&damaged).unwrap().write_all(&bytes).unwrap();
    for cmd in [
        vec!["inspect", damaged.to_str().unwrap()],
        vec!["predict", "--model", damaged.to_str().unwrap(), "--data", &format!("csv:{}", good.display())],
    ] {
        let out = phalanx(&cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("damaged.safetensors") && err.contains("damaged"),
            "{cmd:?}: {err}"
        );
    }

    // Not a model or checkpoint at all.
    let out = phalanx(&["inspect", good.to_str().unwrap()]);
    assert!(!out.status.success(), "a CSV is neither a model nor a checkpoint");

    // The good model inspects, verified.
    let out = phalanx(&["inspect", model_arg]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("verified") && text.contains("classes (3)"), "{text}");
}
