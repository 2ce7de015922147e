//! Models by name: the registry a job's `model` is looked up in.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{build, Head, Model, ModelError, ModelKind, ModelSpec, MAX_PARAMS};

/// Longest model name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// The name of a model in a [`ModelRegistry`]: 1 to 64 ASCII letters, digits,
/// `_`, `-` or `.`, starting with a letter or a digit. Case matters (`mlp` is the built-in,
/// `MLP` is not).
///
/// Its string form is used by serde, [`FromStr`] and [`fmt::Display`], so a job file says
/// `model = "mlp"`. A built-in [`ModelKind`] converts into its name.
///
/// ```
/// use phalanx_actors::model::{ModelKind, ModelName};
///
/// let name: ModelName = "quadratic".parse()?;
/// assert_eq!(name.builtin(), None);
/// assert_eq!(ModelName::from(ModelKind::Mlp).builtin(), Some(ModelKind::Mlp));
/// assert_eq!(ModelName::from(ModelKind::Mlp), ModelKind::Mlp);
/// assert!("two words".parse::<ModelName>().is_err());
/// # Ok::<(), phalanx_actors::model::ModelError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModelName(String);

impl ModelName {
    /// Checks the syntax of `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, ModelError> {
        let name = name.into();
        let bad = |reason| ModelError::BadName { got: crate::data::quote(&name), reason };
        if name.is_empty() {
            return Err(bad("a model name cannot be empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(bad("a model name has at most 64 characters"));
        }
        if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(bad("a model name starts with a letter or a digit"));
        }
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
            return Err(bad("a model name has only ASCII letters, digits, `_`, `-` and `.`"));
        }
        Ok(Self(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The built-in model of this name, if it is one.
    pub fn builtin(&self) -> Option<ModelKind> {
        self.0.parse().ok()
    }
}

impl From<ModelKind> for ModelName {
    fn from(kind: ModelKind) -> Self {
        Self(kind.name().to_owned())
    }
}

impl PartialEq<ModelKind> for ModelName {
    fn eq(&self, kind: &ModelKind) -> bool {
        self.0 == kind.name()
    }
}

impl PartialEq<str> for ModelName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ModelName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ModelName {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for ModelName {
    type Error = ModelError;

    fn try_from(name: String) -> Result<Self, ModelError> {
        Self::new(name)
    }
}

impl From<ModelName> for String {
    fn from(name: ModelName) -> Self {
        name.0
    }
}

/// A model's own settings as a job gives them (`[model_config]` in a job file): any serde
/// value, handed to the model's factory as [`ModelRequest::config`].
///
/// Text formats (TOML, JSON) carry it as the value itself; binary formats (bincode, which cannot
/// decode a self-describing value) carry it as its JSON text, so a job holding one can travel
/// between nodes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelConfig(pub serde_json::Value);

impl ModelConfig {
    /// The value.
    pub fn value(&self) -> &serde_json::Value {
        &self.0
    }
}

impl From<serde_json::Value> for ModelConfig {
    fn from(value: serde_json::Value) -> Self {
        Self(value)
    }
}

impl Serialize for ModelConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            self.0.serialize(serializer)
        } else {
            serializer.serialize_str(&self.0.to_string())
        }
    }
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            serde_json::Value::deserialize(deserializer).map(Self)
        } else {
            let text = String::deserialize(deserializer)?;
            serde_json::from_str(&text).map(Self).map_err(serde::de::Error::custom)
        }
    }
}

/// What a factory is asked to build: the model's name and config from the job, and the shape
/// the job's data fix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRequest {
    /// The registry name the job gave.
    pub name: ModelName,
    /// Number of input features (columns of a batch's `x`).
    pub inputs: usize,
    /// 1 for regression; the number of classes for classification.
    pub outputs: usize,
    /// What the output layer fits: real targets or class labels.
    pub head: Head,
    /// The job's model config; `null` when it gave none.
    pub config: serde_json::Value,
}

impl ModelRequest {
    /// A request; `config` is stored with its object keys sorted, so that equal configs
    /// serialise (and hash into a job's identity) the same whatever order a file wrote them in.
    pub fn new(name: ModelName, inputs: usize, outputs: usize, head: Head, config: serde_json::Value) -> Self {
        Self { name, inputs, outputs, head, config: canonical(config) }
    }

    /// The config as the factory's own type; `null` reads as an empty table, so a config type
    /// with `#[serde(default)]` fields works without a `[model_config]`. Errors name the model.
    pub fn parse_config<T: DeserializeOwned>(&self) -> Result<T, ModelError> {
        let value = match &self.config {
            serde_json::Value::Null => serde_json::Value::Object(serde_json::Map::new()),
            other => other.clone(),
        };
        serde_json::from_value(value)
            .map_err(|e| ModelError::InvalidConfig { model: self.name.to_string(), reason: e.to_string() })
    }
}

/// `value` with every object's keys in sorted order (whatever map `serde_json` was built with).
fn canonical(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let sorted: BTreeMap<String, serde_json::Value> = map.into_iter().map(|(k, v)| (k, canonical(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
        serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// A factory: builds a model for a request, or says why it cannot.
pub type ModelFactory = dyn Fn(&ModelRequest) -> Result<Box<dyn Model>, ModelError> + Send + Sync;

/// What identifies a built model: hashed into a job's identity (so checkpoints of another model
/// are never loaded) and written into model files (so the model can be rebuilt).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ModelIdentity {
    /// A built-in model: its spec, exactly as Phalanx wrote it before models had registries
    /// (so a built-in job keeps its config hash and its `model_spec` metadata).
    Builtin(ModelSpec),
    /// A model from a registered factory: the request it was built from.
    Registered(ModelRequest),
}

impl ModelIdentity {
    /// The request this model answers (for a built-in: its spec's shape and `hidden`).
    pub fn request(&self) -> ModelRequest {
        match self {
            Self::Builtin(spec) => ModelRequest::new(
                spec.kind.into(),
                spec.inputs,
                spec.outputs,
                spec.head,
                serde_json::json!({ "hidden": spec.hidden }),
            ),
            Self::Registered(request) => request.clone(),
        }
    }
}

/// A model a registry built, with its identity.
#[derive(Debug)]
pub struct BuiltModel {
    /// The model.
    pub model: Box<dyn Model>,
    /// What it is.
    pub identity: ModelIdentity,
}

/// How a registry builds the models of one name.
#[derive(Clone)]
enum Entry {
    /// A built-in model.
    Builtin(ModelKind),
    /// A factory someone registered.
    Registered(Arc<ModelFactory>),
}

/// The config of a built-in model: `hidden` is read by `mlp` only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BuiltinConfig {
    #[serde(default)]
    hidden: usize,
}

/// Models by name — the registry a job's `model` is looked up in. Cheap to clone.
///
/// A job names its model (`model = "quadratic"`) and may give it a config (a `[model_config]`
/// table in the job file). The data decide the rest of the shape: the number of input features,
/// the number of outputs and the [`Head`]. Together they make a [`ModelRequest`], and the
/// [`ModelRegistry`] of whoever runs the job (a node, a `train` call) hands it to the factory
/// registered under that name:
///
/// ```text
///  job: model = "quadratic", [model_config]     data: inputs, outputs, head
///               └────────────────┬─────────────────────────┘
///                           ModelRequest ──▶ ModelRegistry::build ──▶ factory("quadratic") ──▶ Box<dyn Model>
/// ```
///
/// A registry belongs to its owner, never to the process: two nodes in one process may host
/// different models. [`ModelRegistry::default`] holds the built-in models (linear, softmax,
/// mlp); [`ModelRegistry::empty`] holds none.
///
/// ```
/// use phalanx_actors::model::{Head, Model, ModelError, ModelRegistry, ModelRequest};
///
/// #[derive(serde::Deserialize)]
/// struct Config {
///     hidden: usize,
/// }
///
/// let mut models = ModelRegistry::default();
/// models.register("wide_mlp", |request: &ModelRequest| -> Result<Box<dyn Model>, ModelError> {
///     // A user factory may build anything implementing `Model`; this one reuses the built-in MLP.
///     let config: Config = request.parse_config()?;
///     let spec = phalanx_actors::model::ModelSpec {
///         kind: phalanx_actors::model::ModelKind::Mlp,
///         inputs: request.inputs,
///         outputs: request.outputs,
///         hidden: config.hidden * 4,
///         head: request.head,
///     };
///     phalanx_actors::model::build(&spec)
/// })?;
/// assert_eq!(models.names().collect::<Vec<_>>(), ["linear", "mlp", "softmax", "wide_mlp"]);
///
/// let request = ModelRequest::new(
///     "wide_mlp".parse()?,
///     4,
///     3,
///     Head::Classification,
///     serde_json::json!({ "hidden": 8 }),
/// );
/// let built = models.build(&request)?;
/// assert_eq!(built.model.num_params(), 4 * 32 + 32 + 32 * 3 + 3);
///
/// // A name nobody registered is an error that lists what there is.
/// let unknown = ModelRequest::new("cnn".parse()?, 4, 3, Head::Classification, serde_json::Value::Null);
/// let err = models.build(&unknown).unwrap_err().to_string();
/// assert!(err.contains("cnn") && err.contains("wide_mlp"), "{err}");
/// # Ok::<(), ModelError>(())
/// ```
#[derive(Clone)]
pub struct ModelRegistry {
    entries: BTreeMap<String, Entry>,
}

impl Default for ModelRegistry {
    /// The built-in models: `linear`, `softmax` and `mlp`.
    fn default() -> Self {
        let mut registry = Self::empty();
        for kind in ModelKind::ALL {
            registry.add_builtin(kind);
        }
        registry
    }
}

impl fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelRegistry").field("names", &self.names().collect::<Vec<_>>()).finish()
    }
}

impl ModelRegistry {
    /// A registry without any model, not even the built-ins.
    pub fn empty() -> Self {
        Self { entries: BTreeMap::new() }
    }

    /// Adds a built-in model (to a registry made with [`empty`](Self::empty)); adding one that
    /// is there already changes nothing.
    pub fn add_builtin(&mut self, kind: ModelKind) -> &mut Self {
        self.entries.insert(kind.name().to_owned(), Entry::Builtin(kind));
        self
    }

    /// Registers `factory` under `name`.
    ///
    /// Fails with [`ModelError::BadName`] when the name breaks the [`ModelName`] rules and with
    /// [`ModelError::NameTaken`] when it is a built-in model's name or registered already:
    /// a name means one model, so two nodes never build different models for one job.
    ///
    /// The factory must build models that keep the [determinism contract](Model), and must
    /// itself be deterministic: every node builds the model from the same request.
    pub fn register<F>(&mut self, name: &str, factory: F) -> Result<&mut Self, ModelError>
    where
        F: Fn(&ModelRequest) -> Result<Box<dyn Model>, ModelError> + Send + Sync + 'static,
    {
        let name = ModelName::new(name)?;
        if name.builtin().is_some() || self.entries.contains_key(name.as_str()) {
            return Err(ModelError::NameTaken { name: name.to_string() });
        }
        self.entries.insert(name.0, Entry::Registered(Arc::new(factory)));
        Ok(self)
    }

    /// The names it can build, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.keys().map(String::as_str)
    }

    /// Whether it can build models named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Builds the model a request names, and checks its layout.
    ///
    /// Errors: [`ModelError::UnknownModel`] (listing the names there are) when no model of that
    /// name is registered; the factory's own error (for a built-in, [`ModelError::InvalidSpec`]
    /// or [`ModelError::InvalidConfig`]); [`ModelError::BadLayout`] when the model's
    /// [`Model::layout`] does not tile its parameter vector.
    pub fn build(&self, request: &ModelRequest) -> Result<BuiltModel, ModelError> {
        let entry = self.entries.get(request.name.as_str()).ok_or_else(|| ModelError::UnknownModel {
            name: request.name.to_string(),
            known: self.names().map(str::to_owned).collect(),
        })?;
        let built = match entry {
            Entry::Builtin(kind) => {
                let config: BuiltinConfig = request.parse_config()?;
                let spec = ModelSpec {
                    kind: *kind,
                    inputs: request.inputs,
                    outputs: request.outputs,
                    hidden: config.hidden,
                    head: request.head,
                };
                BuiltModel { model: build(&spec)?, identity: ModelIdentity::Builtin(spec) }
            }
            Entry::Registered(factory) => {
                let request = ModelRequest::new(
                    request.name.clone(),
                    request.inputs,
                    request.outputs,
                    request.head,
                    request.config.clone(),
                );
                BuiltModel { model: factory(&request)?, identity: ModelIdentity::Registered(request) }
            }
        };
        check_layout(request.name.as_str(), built.model.as_ref())?;
        Ok(built)
    }
}

/// Checks that a model's layout tiles `0..num_params` with uniquely named tensors, and that the
/// count is within [`MAX_PARAMS`]: aggregator ranges, checkpoints and model files rely on it.
fn check_layout(name: &str, model: &dyn Model) -> Result<(), ModelError> {
    let bad = |reason: String| ModelError::BadLayout { model: name.to_owned(), reason };
    let total = model.num_params();
    if total == 0 || total > MAX_PARAMS {
        return Err(bad(format!("{total} parameters (expected 1 to 2^31)")));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut offset = 0usize;
    for tensor in model.layout() {
        if tensor.offset != offset {
            return Err(bad(format!("tensor `{}` starts at {}, expected {offset}", tensor.name, tensor.offset)));
        }
        if !names.insert(tensor.name.clone()) {
            return Err(bad(format!("two tensors are named `{}`", tensor.name)));
        }
        let len = tensor.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        offset = len
            .and_then(|len| offset.checked_add(len))
            .filter(|end| *end <= total)
            .ok_or_else(|| bad(format!("tensor `{}` ends past the {total} parameters", tensor.name)))?;
    }
    if offset != total {
        return Err(bad(format!("the tensors cover {offset} of the {total} parameters")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, ArrayView2};

    use super::*;
    use crate::model::{Targets, TensorInfo};

    /// A user model: `pred = Σ x · w`, no bias; optionally a broken layout.
    #[derive(Debug)]
    struct Dot {
        inputs: usize,
        broken: bool,
    }

    impl Model for Dot {
        fn num_params(&self) -> usize {
            self.inputs
        }
        fn layout(&self) -> Vec<TensorInfo> {
            let offset = usize::from(self.broken);
            vec![TensorInfo { name: "w".into(), shape: vec![self.inputs], offset }]
        }
        fn init_params(&self, _seed: u64) -> Vec<f32> {
            vec![0.0; self.inputs]
        }
        fn loss_grad(
            &self,
            _params: &[f32],
            _x: ArrayView2<'_, f32>,
            _y: Targets<'_>,
            grad: &mut [f32],
        ) -> Result<f64, ModelError> {
            grad.fill(0.0);
            Ok(0.0)
        }
        fn loss(&self, _params: &[f32], _x: ArrayView2<'_, f32>, _y: Targets<'_>) -> Result<f64, ModelError> {
            Ok(0.0)
        }
        fn predict(&self, _params: &[f32], x: ArrayView2<'_, f32>) -> Result<Array2<f32>, ModelError> {
            Ok(Array2::zeros((x.nrows(), 1)))
        }
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct DotConfig {
        #[serde(default)]
        broken: bool,
    }

    fn registry() -> ModelRegistry {
        let mut models = ModelRegistry::default();
        models
            .register("dot", |r: &ModelRequest| {
                let c: DotConfig = r.parse_config()?;
                Ok(Box::new(Dot { inputs: r.inputs, broken: c.broken }) as Box<dyn Model>)
            })
            .expect("a fresh name");
        models
    }

    fn request(name: &str, config: serde_json::Value) -> ModelRequest {
        ModelRequest::new(name.parse().expect("a valid name"), 3, 1, Head::Regression, config)
    }

    #[test]
    fn builtins_register_themselves_and_build_as_before() {
        let models = ModelRegistry::default();
        assert_eq!(models.names().collect::<Vec<_>>(), ["linear", "mlp", "softmax"]);
        let built = models
            .build(&ModelRequest::new(
                ModelKind::Mlp.into(),
                3,
                4,
                Head::Classification,
                serde_json::json!({"hidden": 5}),
            ))
            .expect("mlp");
        let spec = ModelSpec { kind: ModelKind::Mlp, inputs: 3, outputs: 4, hidden: 5, head: Head::Classification };
        assert_eq!(built.identity, ModelIdentity::Builtin(spec.clone()));
        let direct = build(&spec).expect("valid spec");
        assert_eq!(built.model.init_params(9), direct.init_params(9));
        // The identity of a built-in serialises as its spec always did.
        assert_eq!(
            serde_json::to_string(&built.identity).unwrap(),
            r#"{"kind":"mlp","inputs":3,"outputs":4,"hidden":5,"head":"classification"}"#
        );
        assert_eq!(ModelIdentity::Builtin(spec).request().config, serde_json::json!({"hidden": 5}));
    }

    #[test]
    fn a_registered_factory_gets_the_request_and_its_config() {
        let models = registry();
        assert!(models.contains("dot"));
        let built = models.build(&request("dot", serde_json::Value::Null)).expect("dot");
        assert_eq!(built.model.num_params(), 3);
        assert!(matches!(built.identity, ModelIdentity::Registered(ref r) if r.name == "dot"));
        let err = models.build(&request("dot", serde_json::json!({"brokn": true}))).unwrap_err();
        assert!(matches!(&err, ModelError::InvalidConfig { model, .. } if model == "dot"), "{err}");
        assert!(err.to_string().contains("brokn"), "{err}");
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = registry().build(&request("cnn", serde_json::Value::Null)).unwrap_err();
        assert_eq!(
            err,
            ModelError::UnknownModel {
                name: "cnn".into(),
                known: ["dot", "linear", "mlp", "softmax"].map(String::from).to_vec()
            }
        );
        let message = err.to_string();
        assert!(message.contains("\"cnn\"") && message.contains("dot, linear, mlp, softmax"), "{message}");
        // An empty registry knows not even the built-ins.
        let err = ModelRegistry::empty().build(&request("linear", serde_json::Value::Null)).unwrap_err();
        assert!(matches!(err, ModelError::UnknownModel { ref known, .. } if known.is_empty()), "{err}");
    }

    #[test]
    fn taken_and_malformed_names_are_refused() {
        let mut models = registry();
        let factory = |r: &ModelRequest| Ok(Box::new(Dot { inputs: r.inputs, broken: false }) as Box<dyn Model>);
        assert!(matches!(models.register("dot", factory), Err(ModelError::NameTaken { .. })));
        assert!(matches!(ModelRegistry::empty().register("mlp", factory), Err(ModelError::NameTaken { .. })));
        for bad in ["", "two words", "-dash", "a:b", &"x".repeat(65)] {
            assert!(matches!(models.register(bad, factory), Err(ModelError::BadName { .. })), "{bad:?}");
        }
        assert!(ModelName::new("ok_name-2.v1").is_ok());
    }

    #[test]
    fn a_layout_that_does_not_tile_the_parameters_is_an_error() {
        let err = registry().build(&request("dot", serde_json::json!({"broken": true}))).unwrap_err();
        assert!(matches!(&err, ModelError::BadLayout { model, .. } if model == "dot"), "{err}");
    }

    #[test]
    fn configs_are_canonical_whatever_the_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b": 1, "a": {"d": 2, "c": 3}}"#).unwrap();
        let r = request("dot", a);
        assert_eq!(serde_json::to_string(&r.config).unwrap(), r#"{"a":{"c":3,"d":2},"b":1}"#);
    }

    #[test]
    fn model_config_travels_as_json_text_in_binary_formats() {
        let config = ModelConfig(serde_json::json!({"degree": 3, "scale": [0.5, 1.5]}));
        let bytes = bincode::serde::encode_to_vec(&config, bincode::config::standard()).expect("encodes");
        let (back, _): (ModelConfig, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).expect("decodes");
        assert_eq!(back, config);
        assert_eq!(serde_json::to_value(&config).unwrap(), config.0);
    }
}
