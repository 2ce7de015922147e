//! Using a trained model: load and verify `model.safetensors`, predict on raw
//! rows or a CSV file, and inspect model and checkpoint files.
//!
//! A model file carries what prediction needs besides the weights (see
//! [`model_safetensors`](crate::output::model_safetensors)): the model spec
//! (`model_spec` for a built-in, `model_request` for a registered model, which
//! [`TrainedModel::load_with`] rebuilds through a [`ModelRegistry`]),
//! the feature names and the standardisation of the training rows, the
//! target's scale (regression) or the class names (classification), and the
//! SHA-256 of the parameters, checked on load.
//!
//! ```no_run
//! # fn demo() -> Result<(), phalanx::Error> {
//! let model = phalanx::predict::TrainedModel::load("out/model.safetensors".as_ref())?;
//! let predictions = model.predict_csv("new-wines.csv".as_ref())?;
//! for p in &predictions {
//!     println!("{p}");
//! }
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use ndarray::Array2;
use phalanx_actors::checkpoint::CheckpointStore;
use phalanx_actors::model::{Head, Model, ModelIdentity, ModelRegistry, ModelRequest, ModelSpec};
use safetensors::SafeTensors;

use crate::error::Error;

/// The `format` metadata of a model file.
pub const MODEL_FORMAT: &str = "phalanx-model-1";

/// Rows predicted per batch: bounds the memory of one forward pass whatever the file's size.
const PREDICT_BATCH_ROWS: usize = 4096;

/// A trained model loaded from `model.safetensors`, verified.
#[derive(Debug)]
pub struct TrainedModel {
    /// The file it came from.
    pub path: PathBuf,
    /// The model: its name, shape (`inputs`, `outputs`, `head`) and config.
    pub spec: ModelRequest,
    model: Box<dyn Model>,
    params: Vec<f32>,
    /// The features it expects, in order (CSV columns are matched by these names).
    pub feature_names: Vec<String>,
    feature_mean: Vec<f64>,
    feature_std: Vec<f64>,
    /// Regression: the target's training `(mean, std)`; predictions come back in original units.
    pub target_scale: Option<(f64, f64)>,
    /// Classification: the name of every class, by index.
    pub class_names: Option<Vec<String>>,
    /// SHA-256 of the parameters (verified on load).
    pub model_sha256: String,
    /// Every metadata entry of the file.
    pub metadata: BTreeMap<String, String>,
}

/// One prediction.
#[derive(Clone, Debug, PartialEq)]
pub enum Prediction {
    /// Regression: the predicted value, in the target's original units.
    Value(f64),
    /// Classification: the most likely class.
    Class {
        /// Its index.
        index: usize,
        /// Its name (the label as the training data spelled it).
        name: String,
    },
}

impl fmt::Display for Prediction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Prediction::Value(v) => write!(f, "{v}"),
            Prediction::Class { name, .. } => f.write_str(name),
        }
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadFile { path: path.to_path_buf(), reason: reason.into() }
}

fn json_meta<T: serde::de::DeserializeOwned>(
    path: &Path,
    meta: &BTreeMap<String, String>,
    key: &str,
) -> Result<T, Error> {
    let text = meta.get(key).ok_or_else(|| bad(path, format!("metadata has no `{key}`")))?;
    serde_json::from_str(text).map_err(|e| bad(path, format!("metadata `{key}`: {e}")))
}

impl TrainedModel {
    /// Read and verify a model file of a built-in model.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::load_with(path, &ModelRegistry::default())
    }

    /// Read and verify a model file, rebuilding its model through `models` (which must have
    /// the model the file names).
    pub fn load_with(path: &Path, models: &ModelRegistry) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_bytes_with(path, &bytes, models)
    }

    /// Verify and load the bytes of a model file of a built-in model; `path` names it in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, Error> {
        Self::from_bytes_with(path, bytes, &ModelRegistry::default())
    }

    /// [`from_bytes`](Self::from_bytes), rebuilding the model through `models`.
    pub fn from_bytes_with(path: &Path, bytes: &[u8], models: &ModelRegistry) -> Result<Self, Error> {
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| bad(path, format!("not a safetensors file: {e}")))?;
        let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
        match meta.get("format").map(String::as_str) {
            Some(MODEL_FORMAT) => {}
            Some(other) => return Err(bad(path, format!("format `{other}`, expected `{MODEL_FORMAT}`"))),
            None => return Err(bad(path, "no `format` metadata: not a Phalanx model file")),
        }
        let (spec, key) = if meta.contains_key("model_request") {
            (json_meta::<ModelRequest>(path, &meta, "model_request")?, "model_request")
        } else {
            let spec: ModelSpec = json_meta(path, &meta, "model_spec").map_err(|e| match e {
                Error::BadFile { path, reason } => Error::BadFile {
                    path,
                    reason: format!("{reason} (a model file written before `phalanx predict` existed: train it again)"),
                },
                other => other,
            })?;
            (ModelIdentity::Builtin(spec).request(), "model_spec")
        };
        let model: Box<dyn Model> = models.build(&spec).map_err(|e| bad(path, format!("{key}: {e}")))?.model;
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| bad(path, e.to_string()))?;
        let mut params = Vec::with_capacity(model.num_params());
        for t in model.layout() {
            let view = tensors.tensor(&t.name).map_err(|e| bad(path, format!("tensor `{}`: {e}", t.name)))?;
            if view.dtype() != safetensors::Dtype::F32 || view.shape() != t.shape.as_slice() {
                return Err(bad(
                    path,
                    format!(
                        "tensor `{}` is {:?} {:?}, the model needs F32 {:?}",
                        t.name,
                        view.dtype(),
                        view.shape(),
                        t.shape
                    ),
                ));
            }
            params.extend(view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
        }
        // The file's hash is over the tensors in their order; the model computes on its flat
        // vector ([`Model::flat_order`]).
        let model_sha256 = crate::params_sha256(&params);
        let params = model.flat_order(params);
        match meta.get("model_sha256") {
            Some(want) if *want == model_sha256 => {}
            Some(want) => {
                return Err(bad(path, format!("parameters hash to {model_sha256}, the file says {want}: damaged")))
            }
            None => return Err(bad(path, "metadata has no `model_sha256`")),
        }
        let feature_names: Vec<String> =
            meta.get("feature_names").map(|s| s.split(',').map(str::to_owned).collect()).unwrap_or_default();
        let feature_mean: Vec<f64> = json_meta(path, &meta, "feature_mean")?;
        let feature_std: Vec<f64> = json_meta(path, &meta, "feature_std")?;
        if [feature_names.len(), feature_mean.len(), feature_std.len()].iter().any(|n| *n != spec.inputs) {
            return Err(bad(
                path,
                format!(
                    "the model takes {} features; the file names {}, with {} means and {} deviations",
                    spec.inputs,
                    feature_names.len(),
                    feature_mean.len(),
                    feature_std.len()
                ),
            ));
        }
        let target_scale = match (meta.get("target_mean"), meta.get("target_std")) {
            (Some(m), Some(s)) => Some((
                m.parse().map_err(|_| bad(path, format!("target_mean `{m}` is not a number")))?,
                s.parse().map_err(|_| bad(path, format!("target_std `{s}` is not a number")))?,
            )),
            _ => None,
        };
        let class_names = match spec.head {
            Head::Classification => {
                let names: Vec<String> = json_meta(path, &meta, "class_names")?;
                if names.len() != spec.outputs {
                    return Err(bad(path, format!("{} class names for {} classes", names.len(), spec.outputs)));
                }
                Some(names)
            }
            Head::Regression => None,
        };
        Ok(Self {
            path: path.to_path_buf(),
            spec,
            model,
            params,
            feature_names,
            feature_mean,
            feature_std,
            target_scale,
            class_names,
            model_sha256,
            metadata: meta,
        })
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    /// The model's tensors: (name, shape).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.model.layout().into_iter().map(|t| (t.name, t.shape)).collect()
    }

    /// Predict raw rows (features in [`feature_names`](Self::feature_names)
    /// order, in the units of the training data); standardised as in training.
    pub fn predict(&self, rows: &Array2<f32>) -> Result<Vec<Prediction>, Error> {
        if rows.ncols() != self.spec.inputs {
            return Err(bad(
                &self.path,
                format!("rows have {} features, the model takes {}", rows.ncols(), self.spec.inputs),
            ));
        }
        let mut out = Vec::with_capacity(rows.nrows());
        for chunk in rows.axis_chunks_iter(ndarray::Axis(0), PREDICT_BATCH_ROWS) {
            let mut x = chunk.to_owned();
            for mut row in x.rows_mut() {
                for ((v, &mean), &std) in row.iter_mut().zip(&self.feature_mean).zip(&self.feature_std) {
                    // The same arithmetic as the training rows' standardisation.
                    *v = ((f64::from(*v) - mean) / std) as f32;
                }
            }
            let raw = self.model.predict(&self.params, x.view())?;
            for row in raw.rows() {
                out.push(match &self.class_names {
                    Some(names) => {
                        // The first of equal logits wins, as the accuracy metric counts it.
                        let index = row
                            .iter()
                            .enumerate()
                            .fold((0, f32::NEG_INFINITY), |best, (i, v)| if *v > best.1 { (i, *v) } else { best })
                            .0;
                        Prediction::Class { index, name: names[index].clone() }
                    }
                    None => {
                        let y = f64::from(row[0]);
                        Prediction::Value(self.target_scale.map_or(y, |(mean, std)| y * std + mean))
                    }
                });
            }
        }
        Ok(out)
    }

    /// Predict every row of a CSV file with a header: the model's features are
    /// taken by name (other columns, such as the target, are ignored).
    pub fn predict_csv(&self, csv_path: &Path) -> Result<Vec<Prediction>, Error> {
        let rows = read_features(csv_path, &self.feature_names)?;
        self.predict(&rows)
    }
}

/// The columns `features` of a CSV file with a header, as f32 rows.
fn read_features(path: &Path, features: &[String]) -> Result<Array2<f32>, Error> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| bad(path, format!("cannot read CSV: {e}")))?;
    let header = reader.headers().map_err(|e| bad(path, format!("header: {e}")))?.clone();
    let columns: Vec<usize> = features
        .iter()
        .map(|f| {
            header.iter().position(|h| h == f).ok_or_else(|| {
                bad(
                    path,
                    format!("no column `{f}` (the model needs {}; the header has {:?})", features.join(", "), header),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let mut values = Vec::new();
    let mut rows = 0usize;
    for (i, record) in reader.records().enumerate() {
        // Line numbers as an editor shows them: the header is line 1.
        let line = i + 2;
        let record = record.map_err(|e| bad(path, format!("line {line}: {e}")))?;
        for (&c, name) in columns.iter().zip(features) {
            let cell = record.get(c).unwrap_or("");
            let v: f32 =
                cell.parse().ok().filter(|v: &f32| v.is_finite()).ok_or_else(|| {
                    bad(path, format!("line {line}, column `{name}`: `{cell}` is not a finite number"))
                })?;
            values.push(v);
        }
        rows += 1;
    }
    Array2::from_shape_vec((rows, features.len()), values).map_err(|e| bad(path, e.to_string()))
}

/// What `phalanx inspect` found in a file.
#[derive(Debug)]
pub enum Inspection {
    /// A model file, verified (parameters hash to its `model_sha256`).
    Model(Box<TrainedModel>),
    /// A checkpoint file, verified (checksum, range, optimizer state).
    Checkpoint(Box<phalanx_actors::checkpoint::RangeCheckpoint>),
}

/// Read and verify a model or checkpoint file.
pub fn inspect(path: &Path) -> Result<Inspection, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let is_model = SafeTensors::read_metadata(&bytes)
        .ok()
        .and_then(|(_, h)| h.metadata().as_ref().and_then(|m| m.get("format").cloned()))
        .is_some_and(|f| f.starts_with("phalanx-model"));
    if is_model {
        return Ok(Inspection::Model(Box::new(TrainedModel::from_bytes(path, &bytes)?)));
    }
    CheckpointStore::read_file(path).map(|c| Inspection::Checkpoint(Box::new(c))).map_err(|e| bad(path, e.to_string()))
}
