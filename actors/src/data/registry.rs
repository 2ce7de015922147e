//! Data sources by name: the registry a job's `dataset` is looked up in.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::source::{check_source_name, is_builtin_source_name};
use super::{load, quote, DataError, DatasetSource, Table, TaskKind};

/// What a source is asked for.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct DataRequest<'a> {
    /// The dataset as the job gave it.
    pub source: &'a DatasetSource,
    /// The registry name (`rings` for `rings:600`).
    pub name: &'a str,
    /// What followed the first `:` (`600` for `rings:600`), if anything did.
    pub arg: Option<&'a str>,
    /// The job's task: regression targets or class labels.
    pub task: TaskKind,
}

/// A data source: every row (features and target) for a request, the same ones every time.
pub type DataFactory = dyn Fn(&DataRequest<'_>) -> Result<Table, DataError> + Send + Sync;

/// Data sources by name — the registry a job's `dataset` is looked up in. Cheap to clone.
///
/// The built-in datasets (`diabetes`, `iris`, `winequality`) and CSV files (`csv:PATH[:TARGET]`)
/// register themselves in [`DataRegistry::default`]. A source of your own — anything that can
/// produce rows of `f32` features and one target per row — plugs in under a name, and a job
/// names it: `dataset = "rings"` or, with an argument, `dataset = "rings:600"`.
///
/// ```text
///  dataset = "rings:600" ──parse──▶ DatasetSource::Named ──DataRegistry::load(task)──▶ factory("rings") ──▶ Table
/// ```
///
/// Every node that hosts part of a job loads the data through its own registry, so every node
/// must register the source, and the source must give the same rows in the same order each time
/// and on every node (a job's config hash, which its checkpoints and its cluster job id derive
/// from, covers the training rows).
///
/// ```
/// use phalanx_actors::data::{DataError, DataRegistry, DataRequest, DatasetSource, Table, TaskKind};
///
/// let mut data = DataRegistry::default();
/// data.register("line", |request: &DataRequest<'_>| -> Result<Table, DataError> {
///     let n: usize = request.arg.and_then(|a| a.parse().ok()).unwrap_or(10);
///     let rows: Vec<[f32; 1]> = (0..n).map(|i| [i as f32]).collect();
///     let targets: Vec<f32> = (0..n).map(|i| 2.0 * i as f32 + 1.0).collect();
///     Table::from_rows(request.name, vec!["x".into()], &rows, &targets, request.task)
/// })?;
/// let table = data.load(&"line:25".parse()?, TaskKind::Regression)?;
/// assert_eq!((table.len(), table.features()), (25, 1));
///
/// let err = data.load(&"mnist".parse()?, TaskKind::Classification).unwrap_err().to_string();
/// assert!(err.contains("mnist") && err.contains("line") && err.contains("iris"), "{err}");
/// # Ok::<(), DataError>(())
/// ```
#[derive(Clone)]
pub struct DataRegistry {
    sources: BTreeMap<String, Arc<DataFactory>>,
}

impl Default for DataRegistry {
    /// The built-in sources: `diabetes`, `iris`, `winequality` and `csv`.
    fn default() -> Self {
        let builtin: Arc<DataFactory> = Arc::new(|request: &DataRequest<'_>| load(request.source, request.task));
        let sources = ["csv", "diabetes", "iris", "winequality"].map(|name| (name.to_owned(), builtin.clone()));
        Self { sources: sources.into_iter().collect() }
    }
}

impl fmt::Debug for DataRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataRegistry").field("names", &self.sources.keys().collect::<Vec<_>>()).finish()
    }
}

impl DataRegistry {
    /// A registry without any source, not even the built-ins.
    pub fn empty() -> Self {
        Self { sources: BTreeMap::new() }
    }

    /// Registers `source` under `name`.
    ///
    /// Fails with [`DataError::BadSourceName`] when the name breaks the naming rules (see
    /// [`DatasetSource`]) and with [`DataError::SourceNameTaken`] when it is a built-in source's
    /// name (`csv` included, in any case) or registered already.
    pub fn register<F>(&mut self, name: &str, source: F) -> Result<&mut Self, DataError>
    where
        F: Fn(&DataRequest<'_>) -> Result<Table, DataError> + Send + Sync + 'static,
    {
        check_source_name(name).map_err(|reason| DataError::BadSourceName { name: quote(name), reason })?;
        if is_builtin_source_name(name) || self.sources.contains_key(name) {
            return Err(DataError::SourceNameTaken { name: name.to_owned() });
        }
        self.sources.insert(name.to_owned(), Arc::new(source));
        Ok(self)
    }

    /// The names it can load, sorted (`csv` for CSV files).
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.sources.keys().map(String::as_str)
    }

    /// Whether it can load datasets of this registry name.
    pub fn contains(&self, name: &str) -> bool {
        self.sources.contains_key(name)
    }

    /// Loads every row of `source` for `task`.
    ///
    /// Errors: [`DataError::UnknownSource`] (listing what there is) when no source of that
    /// name is registered; the source's own error; [`DataError::SourceTask`] when it returned
    /// rows of the other task.
    pub fn load(&self, source: &DatasetSource, task: TaskKind) -> Result<Table, DataError> {
        let name = source.registry_name();
        let factory = self.sources.get(name).ok_or_else(|| DataError::UnknownSource {
            name: name.to_owned(),
            known: self
                .names()
                .map(|n| if n == "csv" { "csv:PATH[:TARGET]" } else { n })
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let arg = match source {
            DatasetSource::Named { arg, .. } => arg.as_deref(),
            _ => None,
        };
        let table = factory(&DataRequest { source, name, arg, task })?;
        if table.task() != task {
            return Err(DataError::SourceTask { name: name.to_owned(), asked: task, got: table.task() });
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(request: &DataRequest<'_>) -> Result<Table, DataError> {
        let rows: Vec<[f32; 2]> = (0..12).map(|i| [i as f32, (i * i) as f32]).collect();
        let targets: Vec<f32> = (0..12).map(|i| (i % 3) as f32).collect();
        Table::from_rows("points", vec!["a".into(), "b".into()], &rows, &targets, request.task)
    }

    #[test]
    fn builtins_load_as_without_a_registry() {
        let data = DataRegistry::default();
        assert_eq!(data.names().collect::<Vec<_>>(), ["csv", "diabetes", "iris", "winequality"]);
        let via = data.load(&DatasetSource::Iris, TaskKind::Classification).expect("iris");
        assert_eq!(via, load(&DatasetSource::Iris, TaskKind::Classification).expect("iris"));
        assert!(matches!(
            data.load(&DatasetSource::Iris, TaskKind::Regression),
            Err(DataError::WrongTask { dataset: "iris", .. })
        ));
    }

    #[test]
    fn a_registered_source_plugs_in_by_name() {
        let mut data = DataRegistry::default();
        data.register("points", points).expect("a fresh name");
        let table = data.load(&"points".parse().unwrap(), TaskKind::Classification).expect("points");
        assert_eq!((table.len(), table.features(), table.classes()), (12, 2, Some(3)));
        let table = data.load(&"points:ignored".parse().unwrap(), TaskKind::Regression).expect("points");
        assert_eq!(table.task(), TaskKind::Regression);
    }

    #[test]
    fn unknown_names_list_the_known_ones_and_an_empty_registry_knows_none() {
        let mut data = DataRegistry::default();
        data.register("points", points).unwrap();
        let err = data.load(&"mnist".parse().unwrap(), TaskKind::Classification).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, DataError::UnknownSource { ref name, .. } if name == "mnist"), "{message}");
        assert!(message.contains("csv:PATH[:TARGET], diabetes, iris, points, winequality"), "{message}");
        let err = DataRegistry::empty().load(&DatasetSource::Iris, TaskKind::Classification).unwrap_err();
        assert!(matches!(err, DataError::UnknownSource { ref name, .. } if name == "iris"), "{err}");
    }

    #[test]
    fn taken_and_malformed_names_are_refused() {
        let mut data = DataRegistry::default();
        data.register("points", points).unwrap();
        for taken in ["points", "iris", "CSV", "Winequality"] {
            assert!(matches!(data.register(taken, points), Err(DataError::SourceNameTaken { .. })), "{taken}");
        }
        for bad in ["", "a:b", "two words", "_x", &"x".repeat(65)] {
            assert!(matches!(data.register(bad, points), Err(DataError::BadSourceName { .. })), "{bad:?}");
        }
    }

    #[test]
    fn rows_of_the_other_task_are_an_error() {
        let mut data = DataRegistry::empty();
        data.register("reals", |_: &DataRequest<'_>| {
            Table::from_rows("reals", vec!["x".into()], &[[1.0f32], [2.0]], &[0.5, 1.5], TaskKind::Regression)
        })
        .unwrap();
        let err = data.load(&"reals".parse().unwrap(), TaskKind::Classification).unwrap_err();
        assert!(matches!(err, DataError::SourceTask { asked: TaskKind::Classification, .. }), "{err}");
    }

    #[test]
    fn from_rows_names_the_bad_row() {
        let names = || vec!["a".to_owned(), "b".to_owned()];
        let err = Table::from_rows("t", names(), &[vec![1.0f32, 2.0], vec![1.0]], &[0.0, 1.0], TaskKind::Regression)
            .unwrap_err();
        assert!(matches!(err, DataError::RowWidth { row: 1, expected: 2, found: 1, .. }), "{err}");
        let err = Table::from_rows("t", names(), &[[1.0f32, f32::NAN]], &[0.0], TaskKind::Regression).unwrap_err();
        assert!(matches!(err, DataError::NotFiniteValue { row: 0, ref column, .. } if column == "b"), "{err}");
        let err = Table::from_rows("t", names(), &[[1.0f32, 2.0]], &[0.0, 1.0], TaskKind::Regression).unwrap_err();
        assert!(matches!(err, DataError::TableShape { what: "targets", .. }), "{err}");
        let err = Table::from_rows("t", names(), &[[1.0f32, 2.0], [3.0, 4.0]], &[0.5, 1.0], TaskKind::Classification)
            .unwrap_err();
        assert!(matches!(err, DataError::NotAClassValue { row: 0, .. }), "{err}");
        let err = Table::from_rows("t", names(), &[[1.0f32, 2.0], [3.0, 4.0]], &[1.0, 1.0], TaskKind::Classification)
            .unwrap_err();
        assert!(matches!(err, DataError::TooFewClasses { found: 1, .. }), "{err}");
        let t = Table::from_rows("t", names(), &[[1.0f32, 2.0], [3.0, 4.0]], &[7.0, -2.0], TaskKind::Classification)
            .unwrap();
        assert!(matches!(t.y, super::super::Labels::Class { ref labels, ref class_names, .. }
            if labels == &[1, 0] && class_names == &["-2", "7"]));
    }
}
