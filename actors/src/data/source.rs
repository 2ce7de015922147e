//! Where data comes from: the built-in datasets of `linfa-datasets` and CSV files, loaded into a
//! [`Table`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ndarray::{Array1, Array2, Axis};
use serde::{Deserialize, Serialize};

use super::{check_row_count, quote, DataError};

/// Where the data comes from.
///
/// The string form (used by [`FromStr`], [`fmt::Display`] and serde) is one of
/// `diabetes`, `iris`, `winequality` (ASCII case ignored), `csv:PATH` or `csv:PATH:TARGET`,
/// or `NAME` / `NAME:ARG` for a source registered in a [`DataRegistry`](super::DataRegistry)
/// (a name of ASCII letters, digits, `_`, `-` and `.`, starting with a letter or a digit; the
/// argument is everything after the first `:`, handed to the source as it is).
///
/// A CSV spec is split at its **last** `:`. The part after it is the target column when it is
/// a plausible column name: non-empty, without `/` or `\`, and without surrounding whitespace.
/// When it is empty (`csv:PATH:`) there is no target and `PATH` is everything before that last
/// `:` — the way to name a path that itself contains `:`. Otherwise (`csv:C:\data\x.csv`) the
/// whole remainder is the path. Display writes that trailing `:` whenever the path contains a
/// `:`, so display → parse gives back the same value for every target without `:`, `/`, `\` or
/// surrounding whitespace.
///
/// Parsing never looks at the file system: the same job string must mean the same thing on every
/// node. When a file is not found, the error points at a file named `PATH:TARGET` if one exists.
///
/// ```
/// use std::path::PathBuf;
/// use phalanx_actors::data::DatasetSource;
///
/// let s: DatasetSource = "csv:data/wine.csv:quality".parse()?;
/// assert_eq!(s, DatasetSource::Csv { path: PathBuf::from("data/wine.csv"), target: Some("quality".into()) });
/// assert_eq!(s.to_string(), "csv:data/wine.csv:quality");
/// let odd: DatasetSource = "csv:runs/12:30.csv:".parse()?;
/// assert_eq!(odd, DatasetSource::Csv { path: PathBuf::from("runs/12:30.csv"), target: None });
/// let mine: DatasetSource = "rings:600".parse()?;
/// assert_eq!(mine, DatasetSource::Named { name: "rings".into(), arg: Some("600".into()) });
/// # Ok::<(), phalanx_actors::data::DataError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DatasetSource {
    /// scikit-learn's diabetes data (regression), 10 standardised features.
    Diabetes,
    /// Fisher's iris flowers (classification), 4 features, 3 classes.
    Iris,
    /// Red wine quality (classification), 11 features, quality scores 3..=8 as 6 classes.
    Winequality,
    /// A CSV file with a header row.
    Csv {
        /// The file to read.
        path: PathBuf,
        /// The target column's name; `None` means the last column.
        target: Option<String>,
    },
    /// A source registered by name in a [`DataRegistry`](super::DataRegistry).
    Named {
        /// The registry name.
        name: String,
        /// What follows the first `:`, if anything does.
        arg: Option<String>,
    },
}

const CSV_PREFIX: &str = "csv:";
const SOURCE_FORMS: &str =
    "expected diabetes, iris, winequality, csv:PATH, csv:PATH:TARGET or a registered source's NAME[:ARG]";

/// Whether `name` is a built-in source's name (`csv` included), ASCII case ignored.
pub(crate) fn is_builtin_source_name(name: &str) -> bool {
    ["csv", "diabetes", "iris", "winequality"].iter().any(|b| name.eq_ignore_ascii_case(b))
}

/// Longest registered source name accepted.
pub(crate) const MAX_SOURCE_NAME_LEN: usize = 64;

/// Checks a registered source's name: 1 to 64 ASCII letters, digits, `_`, `-` or `.`, starting
/// with a letter or a digit.
pub(crate) fn check_source_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("a source name cannot be empty");
    }
    if name.len() > MAX_SOURCE_NAME_LEN {
        return Err("a source name has at most 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("a source name starts with a letter or a digit");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
        return Err("a source name has only ASCII letters, digits, `_`, `-` and `.`");
    }
    Ok(())
}

impl DatasetSource {
    /// The task a built-in dataset supports; `None` for CSV files, which can be either.
    pub fn builtin_task(&self) -> Option<TaskKind> {
        match self {
            Self::Diabetes => Some(TaskKind::Regression),
            Self::Iris | Self::Winequality => Some(TaskKind::Classification),
            Self::Csv { .. } | Self::Named { .. } => None,
        }
    }

    /// The name a [`DataRegistry`](super::DataRegistry) knows this source by: `diabetes`,
    /// `iris`, `winequality`, `csv`, or a registered source's name.
    pub fn registry_name(&self) -> &str {
        match self {
            Self::Diabetes => "diabetes",
            Self::Iris => "iris",
            Self::Winequality => "winequality",
            Self::Csv { .. } => "csv",
            Self::Named { name, .. } => name,
        }
    }
}

/// Splits the part after `csv:` into a path and an optional target (see [`DatasetSource`]).
fn split_csv_spec(rest: &str) -> (&str, Option<&str>) {
    let Some(colon) = rest.rfind(':') else {
        return (rest, None);
    };
    let (head, tail) = (&rest[..colon], &rest[colon + 1..]);
    if tail.is_empty() {
        (head, None)
    } else if is_plausible_column(tail) {
        (head, Some(tail))
    } else {
        (rest, None)
    }
}

fn is_plausible_column(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\', ':']) && name.trim() == name
}

impl FromStr for DatasetSource {
    type Err = DataError;

    fn from_str(text: &str) -> Result<Self, DataError> {
        let bad = |reason| DataError::BadSource { text: quote(text), reason };
        for (name, source) in [("diabetes", Self::Diabetes), ("iris", Self::Iris), ("winequality", Self::Winequality)] {
            if text.eq_ignore_ascii_case(name) {
                return Ok(source);
            }
        }
        let rest = match (text.get(..CSV_PREFIX.len()), text.get(CSV_PREFIX.len()..)) {
            (Some(prefix), Some(rest)) if prefix.eq_ignore_ascii_case(CSV_PREFIX) => rest,
            _ => {
                let (name, arg) = match text.split_once(':') {
                    Some((name, arg)) => (name, (!arg.is_empty()).then(|| arg.to_owned())),
                    None => (text, None),
                };
                // `csv` alone is the csv form without its path, and `iris:x` is no source:
                // the built-in names are taken.
                if is_builtin_source_name(name) || check_source_name(name).is_err() {
                    return Err(bad(SOURCE_FORMS));
                }
                return Ok(Self::Named { name: name.to_owned(), arg });
            }
        };
        let (path, target) = split_csv_spec(rest);
        if path.is_empty() {
            return Err(bad("the csv path is empty"));
        }
        Ok(Self::Csv { path: PathBuf::from(path), target: target.map(str::to_owned) })
    }
}

impl fmt::Display for DatasetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Diabetes => f.write_str("diabetes"),
            Self::Iris => f.write_str("iris"),
            Self::Winequality => f.write_str("winequality"),
            Self::Csv { path, target } => {
                let path = path.to_string_lossy();
                match target {
                    Some(target) => write!(f, "{CSV_PREFIX}{path}:{target}"),
                    None if path.contains(':') => write!(f, "{CSV_PREFIX}{path}:"),
                    None => write!(f, "{CSV_PREFIX}{path}"),
                }
            }
            Self::Named { name, arg: Some(arg) } => write!(f, "{name}:{arg}"),
            Self::Named { name, arg: None } => f.write_str(name),
        }
    }
}

impl TryFrom<String> for DatasetSource {
    type Error = DataError;

    fn try_from(text: String) -> Result<Self, DataError> {
        text.parse()
    }
}

impl From<DatasetSource> for String {
    fn from(source: DatasetSource) -> Self {
        source.to_string()
    }
}

/// Whether the target is a real value or a class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Predict a real number; the target column may hold any finite value.
    Regression,
    /// Predict one of `K >= 2` classes; the target column holds integer labels.
    Classification,
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Regression => "regression",
            Self::Classification => "classification",
        })
    }
}

impl FromStr for TaskKind {
    type Err = DataError;

    /// Parses `regression` or `classification` (ASCII case ignored).
    fn from_str(text: &str) -> Result<Self, DataError> {
        if text.eq_ignore_ascii_case("regression") {
            Ok(Self::Regression)
        } else if text.eq_ignore_ascii_case("classification") {
            Ok(Self::Classification)
        } else {
            Err(DataError::BadTask { text: quote(text) })
        }
    }
}

/// The targets of every row of a [`Table`].
#[derive(Clone, Debug, PartialEq)]
pub enum Labels {
    /// Regression targets.
    Real(Vec<f32>),
    /// Classification targets.
    Class {
        /// Per row, a class in `0..classes`.
        labels: Vec<u32>,
        /// The number of classes `K`.
        classes: usize,
        /// Per class, its original label (for example `"3"` for wine quality 3).
        class_names: Vec<String>,
    },
}

impl Labels {
    /// The number of rows.
    pub fn len(&self) -> usize {
        match self {
            Self::Real(values) => values.len(),
            Self::Class { labels, .. } => labels.len(),
        }
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The task these targets are for.
    pub fn task(&self) -> TaskKind {
        match self {
            Self::Real(_) => TaskKind::Regression,
            Self::Class { .. } => TaskKind::Classification,
        }
    }
}

/// The targets of a gathered batch of rows, in the batch's order.
#[derive(Clone, Debug, PartialEq)]
pub enum OwnedTargets {
    /// Regression targets.
    Real(Vec<f32>),
    /// Class labels in `0..classes`.
    Class(Vec<u32>),
}

impl OwnedTargets {
    /// The number of rows.
    pub fn len(&self) -> usize {
        match self {
            Self::Real(values) => values.len(),
            Self::Class(labels) => labels.len(),
        }
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A loaded table: `n` rows × `d` features (row-major `Array2<f32>`) plus targets.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    /// A name for messages: the dataset's name or the CSV path.
    pub name: String,
    /// One name per feature column.
    pub feature_names: Vec<String>,
    /// The features, one row per sample.
    pub x: Array2<f32>,
    /// The targets, one per row.
    pub y: Labels,
}

impl Table {
    /// Builds a table after checking that its parts agree: one target per row, one name per
    /// feature, class labels below the class count and one name per class.
    pub fn new(
        name: impl Into<String>,
        feature_names: Vec<String>,
        x: Array2<f32>,
        y: Labels,
    ) -> Result<Self, DataError> {
        let table = Self { name: name.into(), feature_names, x, y };
        table.check()?;
        Ok(table)
    }

    /// Builds a table from rows of `f32` features and one `f32` target per row: what a source
    /// registered in a [`DataRegistry`](super::DataRegistry) returns.
    ///
    /// For [`TaskKind::Regression`] the targets are the values. For
    /// [`TaskKind::Classification`] they must be integers (`3.0`); their distinct values,
    /// sorted ascending, become classes `0..K` with `K >= 2`, named as written (`"3"`), as for a
    /// CSV file. Every value must be finite.
    ///
    /// ```
    /// use phalanx_actors::data::{Table, TaskKind};
    ///
    /// let rows = [[0.5f32, 1.0], [1.5, -2.0], [2.0, 0.0]];
    /// let table = Table::from_rows("demo", vec!["a".into(), "b".into()], &rows, &[1.0, 0.0, 1.0], TaskKind::Classification)?;
    /// assert_eq!((table.len(), table.features(), table.classes()), (3, 2, Some(2)));
    /// # Ok::<(), phalanx_actors::data::DataError>(())
    /// ```
    pub fn from_rows<R: AsRef<[f32]>>(
        name: impl Into<String>,
        feature_names: Vec<String>,
        rows: &[R],
        targets: &[f32],
        task: TaskKind,
    ) -> Result<Table, DataError> {
        let name = name.into();
        check_row_count(rows.len())?;
        if targets.len() != rows.len() {
            return Err(DataError::TableShape {
                table: name,
                what: "targets",
                expected: rows.len(),
                found: targets.len(),
            });
        }
        let width = feature_names.len();
        let mut x = Vec::with_capacity(rows.len().saturating_mul(width));
        for (row, values) in rows.iter().enumerate() {
            let values = values.as_ref();
            if values.len() != width {
                return Err(DataError::RowWidth { table: name, row, expected: width, found: values.len() });
            }
            if let Some(column) = values.iter().position(|v| !v.is_finite()) {
                return Err(DataError::NotFiniteValue { table: name, row, column: quote(&feature_names[column]) });
            }
            x.extend_from_slice(values);
        }
        if let Some(row) = targets.iter().position(|v| !v.is_finite()) {
            return Err(DataError::NotFiniteValue { table: name, row, column: "target".to_owned() });
        }
        let y = match task {
            TaskKind::Regression => Labels::Real(targets.to_vec()),
            TaskKind::Classification => {
                let mut values = Vec::with_capacity(targets.len());
                for (row, &t) in targets.iter().enumerate() {
                    let t = f64::from(t);
                    if t.fract() != 0.0 || t.abs() > MAX_CLASS_MAGNITUDE {
                        return Err(DataError::NotAClassValue { table: name, row, value: t });
                    }
                    // Integral and within ±2^53, so the cast is exact.
                    values.push(t as i64);
                }
                let (labels, class_names) = index_classes(&values);
                if class_names.len() < 2 {
                    return Err(DataError::TooFewClasses {
                        dataset: name,
                        column: "target".to_owned(),
                        found: class_names.len(),
                    });
                }
                Labels::Class { labels, classes: class_names.len(), class_names }
            }
        };
        let x = Array2::from_shape_vec((rows.len(), width), x).map_err(|_| DataError::TableShape {
            table: name.clone(),
            what: "feature cells",
            expected: rows.len().saturating_mul(width),
            found: 0,
        })?;
        Table::new(name, feature_names, x, y)
    }

    fn check(&self) -> Result<(), DataError> {
        let shape = |what, expected, found| DataError::TableShape { table: self.name.clone(), what, expected, found };
        if self.y.len() != self.x.nrows() {
            return Err(shape("targets", self.x.nrows(), self.y.len()));
        }
        if self.feature_names.len() != self.x.ncols() {
            return Err(shape("feature names", self.x.ncols(), self.feature_names.len()));
        }
        check_row_count(self.x.nrows())?;
        if let Labels::Class { labels, classes, class_names } = &self.y {
            if class_names.len() != *classes {
                return Err(shape("class names", *classes, class_names.len()));
            }
            if let Some(&label) = labels.iter().find(|&&l| l as usize >= *classes) {
                return Err(DataError::LabelOutOfRange { table: self.name.clone(), label, classes: *classes });
            }
        }
        Ok(())
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.x.nrows()
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Regression or classification, from the targets.
    pub fn task(&self) -> TaskKind {
        self.y.task()
    }

    /// The number of feature columns `d`.
    pub fn features(&self) -> usize {
        self.x.ncols()
    }

    /// The number of classes for a classification table.
    pub fn classes(&self) -> Option<usize> {
        match &self.y {
            Labels::Real(_) => None,
            Labels::Class { classes, .. } => Some(*classes),
        }
    }

    /// Gathers the given rows, in the given order (repeats allowed): features `k × d` and the
    /// matching targets.
    ///
    /// Fails with [`DataError::RowOutOfRange`] when an index is past the end, for example when a
    /// shard pairs [`super::Partitions`] with a table that has changed on disk.
    pub fn rows(&self, indices: &[u32]) -> Result<(Array2<f32>, OwnedTargets), DataError> {
        // Guard against a table whose public fields were edited out of step.
        let rows = self.x.nrows().min(self.y.len());
        let mut picked = Vec::with_capacity(indices.len());
        for &index in indices {
            if index as usize >= rows {
                return Err(DataError::RowOutOfRange { index, rows });
            }
            picked.push(index as usize);
        }
        let x = self.x.select(Axis(0), &picked);
        let y = match &self.y {
            Labels::Real(values) => OwnedTargets::Real(picked.iter().map(|&i| values[i]).collect()),
            Labels::Class { labels, .. } => OwnedTargets::Class(picked.iter().map(|&i| labels[i]).collect()),
        };
        Ok((x, y))
    }

    /// A new table made of the given rows, in the given order, keeping names and class count.
    pub fn subset(&self, indices: &[u32]) -> Result<Table, DataError> {
        let (x, targets) = self.rows(indices)?;
        let y = match (targets, &self.y) {
            (OwnedTargets::Class(labels), Labels::Class { classes, class_names, .. }) => {
                Labels::Class { labels, classes: *classes, class_names: class_names.clone() }
            }
            (OwnedTargets::Class(labels), Labels::Real(_)) => {
                // `rows` keeps the target kind, so this arm is never taken; stay total anyway.
                Labels::Real(labels.into_iter().map(|l| l as f32).collect())
            }
            (OwnedTargets::Real(values), _) => Labels::Real(values),
        };
        Ok(Table { name: self.name.clone(), feature_names: self.feature_names.clone(), x, y })
    }
}

/// What [`load`] reads without a registry, as unknown-source errors list it.
pub(crate) const BUILTIN_SOURCES: [&str; 4] = ["csv:PATH[:TARGET]", "diabetes", "iris", "winequality"];

/// Loads a built-in dataset or a CSV file for a task (a registered source needs its
/// [`DataRegistry`](super::DataRegistry): here it is [`DataError::UnknownSource`]).
///
/// Built-ins support one task each ([`DatasetSource::builtin_task`]); asking for the other is
/// [`DataError::WrongTask`]. A CSV file needs a header row; its target is the named column or
/// the last one, and every other column is a numeric feature. For classification the target
/// cells must be integers (`3` or `3.0`); the distinct values, sorted ascending, become classes
/// `0..K` with `K >= 2`. Cells are trimmed of surrounding whitespace.
pub fn load(source: &DatasetSource, task: TaskKind) -> Result<Table, DataError> {
    let table = match source {
        DatasetSource::Diabetes => {
            check_builtin_task("diabetes", TaskKind::Regression, task)?;
            let data = linfa_datasets::diabetes();
            Table::new(
                "diabetes",
                data.feature_names().to_vec(),
                data.records().mapv(|v| v as f32),
                Labels::Real(data.targets().iter().map(|&v| v as f32).collect()),
            )?
        }
        DatasetSource::Iris => {
            check_builtin_task("iris", TaskKind::Classification, task)?;
            let data = linfa_datasets::iris();
            let mut table = builtin_classification("iris", data.records(), data.targets(), data.feature_names())?;
            if let Labels::Class { class_names, .. } = &mut table.y {
                // linfa's iris.csv numbers the species as scikit-learn does.
                if *class_names == ["0", "1", "2"] {
                    *class_names = IRIS_SPECIES.iter().map(|s| (*s).to_owned()).collect();
                }
            }
            table
        }
        DatasetSource::Winequality => {
            check_builtin_task("winequality", TaskKind::Classification, task)?;
            let data = linfa_datasets::winequality();
            builtin_classification("winequality", data.records(), data.targets(), data.feature_names())?
        }
        DatasetSource::Csv { path, target } => load_csv(path, target.as_deref(), task)?,
        DatasetSource::Named { name, .. } => {
            return Err(DataError::UnknownSource { name: name.clone(), known: BUILTIN_SOURCES.join(", ") })
        }
    };
    tracing::debug!(
        source = %source,
        rows = table.len(),
        features = table.features(),
        classes = ?table.classes(),
        "loaded dataset"
    );
    Ok(table)
}

/// Iris class names in the order of their numeric labels 0, 1, 2.
const IRIS_SPECIES: [&str; 3] = ["setosa", "versicolor", "virginica"];

fn check_builtin_task(dataset: &'static str, supported: TaskKind, asked: TaskKind) -> Result<(), DataError> {
    if asked == supported {
        Ok(())
    } else {
        Err(DataError::WrongTask { dataset, asked, supported })
    }
}

/// Converts the parts of a linfa-datasets classification set (`Dataset<f64, usize, Ix1>`).
fn builtin_classification(
    name: &str,
    records: &Array2<f64>,
    targets: &Array1<usize>,
    feature_names: &[String],
) -> Result<Table, DataError> {
    let values: Vec<i64> = targets.iter().map(|&v| i64::try_from(v).unwrap_or(i64::MAX)).collect();
    let (labels, class_names) = index_classes(&values);
    if class_names.len() < 2 {
        return Err(DataError::TooFewClasses {
            dataset: name.to_owned(),
            column: "target".to_owned(),
            found: class_names.len(),
        });
    }
    Table::new(
        name,
        feature_names.to_vec(),
        records.mapv(|v| v as f32),
        Labels::Class { labels, classes: class_names.len(), class_names },
    )
}

/// Maps distinct values, sorted ascending, to `0..K`; returns the labels and the values' names.
fn index_classes(values: &[i64]) -> (Vec<u32>, Vec<String>) {
    let mut ids: BTreeMap<i64, u32> = values.iter().map(|&v| (v, 0)).collect();
    for (id, slot) in ids.values_mut().enumerate() {
        // At most one class per row and rows fit u32 (checked by callers' row limits).
        *slot = u32::try_from(id).unwrap_or(u32::MAX);
    }
    let labels = values.iter().map(|v| ids.get(v).copied().unwrap_or(u32::MAX)).collect();
    let names = ids.keys().map(|v| v.to_string()).collect();
    (labels, names)
}

/// Most column names a [`DataError::MissingTarget`] message lists.
const LISTED_COLUMNS_MAX: usize = 20;

fn list_columns(names: &[String]) -> String {
    let mut listed: Vec<String> = names.iter().take(LISTED_COLUMNS_MAX).map(|n| format!("{:?}", quote(n))).collect();
    if names.len() > LISTED_COLUMNS_MAX {
        listed.push(format!("… and {} more", names.len() - LISTED_COLUMNS_MAX));
    }
    listed.join(", ")
}

/// Largest magnitude accepted for an integer class label: every integer up to it is exact in
/// `f64`, so `"3.0"` and `"3"` cannot be confused with a neighbour.
const MAX_CLASS_MAGNITUDE: f64 = 9_007_199_254_740_992.0; // 2^53

fn load_csv(path: &Path, target: Option<&str>, task: TaskKind) -> Result<Table, DataError> {
    let bytes = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            // The source string may have split a file name like `runs/a:b` at its colon.
            let did_you_mean = target
                .map(|t| PathBuf::from(format!("{}:{t}", path.to_string_lossy())))
                .filter(|joined| joined.is_file());
            DataError::FileNotFound { path: path.to_owned(), did_you_mean }
        } else {
            DataError::Unreadable { path: path.to_owned(), source }
        }
    })?;
    let mut lines = LineCounter::new(&bytes);
    let mut reader =
        csv::ReaderBuilder::new().has_headers(false).flexible(true).trim(csv::Trim::All).from_reader(bytes.as_slice());

    let mut record = csv::StringRecord::new();
    if !read_record(&mut reader, &mut record, path, &mut lines)? {
        return Err(DataError::EmptyFile { path: path.to_owned() });
    }
    let names: Vec<String> = record.iter().map(str::to_owned).collect();
    check_header(path, &names)?;
    let target_col = match target {
        Some(target) => names.iter().position(|n| n == target).ok_or_else(|| DataError::MissingTarget {
            path: path.to_owned(),
            target: quote(target),
            columns: list_columns(&names),
        })?,
        None => names.len() - 1, // check_header guarantees two or more columns
    };
    let target_name = &names[target_col];

    let mut features: Vec<f32> = Vec::new();
    let mut real_targets: Vec<f32> = Vec::new();
    let mut class_values: Vec<i64> = Vec::new();
    let mut rows: usize = 0;
    while read_record(&mut reader, &mut record, path, &mut lines)? {
        let line = lines.line_at(record.position().map_or(bytes.len() as u64, csv::Position::byte));
        if record.len() != names.len() {
            return Err(DataError::RaggedRow {
                path: path.to_owned(),
                line,
                expected: names.len(),
                found: record.len(),
            });
        }
        for (col, cell) in record.iter().enumerate() {
            let cell_error = |make: fn(PathBuf, u64, String, String) -> DataError| {
                make(path.to_owned(), line, quote(&names[col]), quote(cell))
            };
            if col != target_col {
                features.push(parse_f32(cell).map_err(cell_error)?);
            } else if task == TaskKind::Regression {
                real_targets.push(parse_f32(cell).map_err(cell_error)?);
            } else {
                class_values.push(parse_class(cell).map_err(cell_error)?);
            }
        }
        rows += 1;
        check_row_count(rows)?;
    }
    if rows == 0 {
        return Err(DataError::NoDataRows { path: path.to_owned() });
    }

    let feature_names: Vec<String> =
        names.iter().enumerate().filter(|&(col, _)| col != target_col).map(|(_, n)| n.clone()).collect();
    let name = path.display().to_string();
    let x = Array2::from_shape_vec((rows, feature_names.len()), features).map_err(|_| DataError::TableShape {
        table: name.clone(),
        what: "feature cells",
        expected: rows * feature_names.len(),
        found: 0,
    })?;
    let y = match task {
        TaskKind::Regression => Labels::Real(real_targets),
        TaskKind::Classification => {
            let (labels, class_names) = index_classes(&class_values);
            if class_names.len() < 2 {
                return Err(DataError::TooFewClasses {
                    dataset: name,
                    column: quote(target_name),
                    found: class_names.len(),
                });
            }
            Labels::Class { labels, classes: class_names.len(), class_names }
        }
    };
    Table::new(name, feature_names, x, y)
}

/// Reads the next record, turning a parse error into [`DataError::Csv`] with its line.
fn read_record(
    reader: &mut csv::Reader<&[u8]>,
    record: &mut csv::StringRecord,
    path: &Path,
    lines: &mut LineCounter<'_>,
) -> Result<bool, DataError> {
    reader.read_record(record).map_err(|err| {
        let line = err.position().map_or(lines.line, |pos| lines.line_at(pos.byte()));
        let reason = match err.kind() {
            csv::ErrorKind::Utf8 { err, .. } => {
                format!("invalid UTF-8 in field {}", err.field() + 1)
            }
            _ => err.to_string(),
        };
        DataError::Csv { path: path.to_owned(), line, reason }
    })
}

/// Turns the byte offsets of csv records into 1-based line numbers.
///
/// `csv::Position::line` miscounts after blank lines and with `\r\n` endings (csv 1.4), so lines
/// are counted here: a record's position is where the reader stood before it, which may be
/// inside a line ending or before skipped blank lines, so those are stepped over first.
struct LineCounter<'a> {
    bytes: &'a [u8],
    /// Offset up to which line endings have been counted.
    counted: usize,
    /// 1-based line number at `counted`.
    line: u64,
}

impl<'a> LineCounter<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, counted: 0, line: 1 }
    }

    /// The line of the first byte at or after `offset` that is not a line ending.
    fn line_at(&mut self, offset: u64) -> u64 {
        let mut start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.bytes.len());
        while matches!(self.bytes.get(start), Some(b'\r' | b'\n')) {
            start += 1;
        }
        if start < self.counted {
            // Records arrive in order; recount from the top if one ever does not.
            (self.counted, self.line) = (0, 1);
        }
        for i in self.counted..start {
            // A line ends at `\n`, or at a `\r` that is not the first half of `\r\n`.
            let ends = match self.bytes[i] {
                b'\n' => true,
                b'\r' => self.bytes.get(i + 1) != Some(&b'\n'),
                _ => false,
            };
            self.line += u64::from(ends);
        }
        self.counted = start;
        self.line
    }
}

fn check_header(path: &Path, names: &[String]) -> Result<(), DataError> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (col, name) in names.iter().enumerate() {
        if name.is_empty() {
            return Err(DataError::EmptyColumnName { path: path.to_owned(), column: col + 1 });
        }
        if let Some(&first) = seen.get(name.as_str()) {
            return Err(DataError::DuplicateColumn {
                path: path.to_owned(),
                name: quote(name),
                first,
                second: col + 1,
            });
        }
        seen.insert(name, col + 1);
    }
    if names.len() < 2 {
        return Err(DataError::SingleColumn {
            path: path.to_owned(),
            column: names.first().map(|n| quote(n)).unwrap_or_default(),
        });
    }
    Ok(())
}

/// The error constructor for a bad cell: `(path, line, column, value)`.
type CellError = fn(PathBuf, u64, String, String) -> DataError;

fn not_numeric(path: PathBuf, line: u64, column: String, value: String) -> DataError {
    DataError::NotNumeric { path, line, column, value }
}

fn not_finite(path: PathBuf, line: u64, column: String, value: String) -> DataError {
    DataError::NotFinite { path, line, column, value }
}

fn not_a_class(path: PathBuf, line: u64, column: String, value: String) -> DataError {
    DataError::NotAClass { path, line, column, value }
}

/// Parses a finite `f32`; values that overflow `f32` count as not finite.
fn parse_f32(cell: &str) -> Result<f32, CellError> {
    let value: f32 = cell.parse().map_err(|_| not_numeric as CellError)?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(not_finite)
    }
}

/// Parses an integer class label written as an integer or an integral float (`3`, `3.0`).
fn parse_class(cell: &str) -> Result<i64, CellError> {
    if let Ok(value) = cell.parse::<i64>() {
        return Ok(value);
    }
    let value: f64 = cell.parse().map_err(|_| not_a_class as CellError)?;
    if value.is_finite() && value.fract() == 0.0 && value.abs() <= MAX_CLASS_MAGNITUDE {
        // Integral and within ±2^53, so the cast is exact.
        Ok(value as i64)
    } else {
        Err(not_a_class)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn write_csv(contents: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(contents.as_bytes()).expect("write temp file");
        file.flush().expect("flush temp file");
        file
    }

    fn csv_source(file: &tempfile::NamedTempFile, target: Option<&str>) -> DatasetSource {
        DatasetSource::Csv { path: file.path().to_owned(), target: target.map(str::to_owned) }
    }

    fn load_err(contents: &str, target: Option<&str>, task: TaskKind) -> DataError {
        let file = write_csv(contents);
        match load(&csv_source(&file, target), task) {
            Ok(table) => panic!("expected an error, loaded {table:?}"),
            Err(err) => err,
        }
    }

    #[test]
    fn builtin_iris_loads_150_by_4_with_3_named_classes() {
        let t = load(&DatasetSource::Iris, TaskKind::Classification).expect("iris");
        assert_eq!((t.len(), t.features()), (150, 4));
        assert_eq!(t.classes(), Some(3));
        assert_eq!(t.task(), TaskKind::Classification);
        assert_eq!(t.feature_names.len(), 4);
        let Labels::Class { labels, class_names, .. } = &t.y else {
            panic!("iris has class labels");
        };
        assert_eq!(class_names, &["setosa", "versicolor", "virginica"]);
        for class in 0..3 {
            assert_eq!(labels.iter().filter(|&&l| l == class).count(), 50);
        }
    }

    #[test]
    fn builtin_diabetes_loads_441_by_10_regression() {
        // scikit-learn's copy has 442 rows; linfa-datasets 0.8.1 reads its header-less CSVs
        // with `has_headers = true`, which drops the first row of both data and targets.
        let t = load(&DatasetSource::Diabetes, TaskKind::Regression).expect("diabetes");
        assert_eq!((t.len(), t.features()), (441, 10));
        assert_eq!(t.classes(), None);
        assert_eq!(t.task(), TaskKind::Regression);
        assert!(t.x.iter().all(|v| v.is_finite()));
        let Labels::Real(y) = &t.y else {
            panic!("diabetes has real targets");
        };
        assert!(y.iter().all(|&v| (25.0..=346.0).contains(&v)));
    }

    #[test]
    fn builtin_winequality_loads_1599_by_11_with_6_classes() {
        let t = load(&DatasetSource::Winequality, TaskKind::Classification).expect("wine");
        assert_eq!((t.len(), t.features()), (1599, 11));
        assert_eq!(t.classes(), Some(6));
        let Labels::Class { class_names, .. } = &t.y else {
            panic!("winequality has class labels");
        };
        assert_eq!(class_names, &["3", "4", "5", "6", "7", "8"]);
    }

    #[test]
    fn builtin_with_wrong_task_names_dataset_and_supported_task() {
        for (source, asked) in [
            (DatasetSource::Diabetes, TaskKind::Classification),
            (DatasetSource::Iris, TaskKind::Regression),
            (DatasetSource::Winequality, TaskKind::Regression),
        ] {
            let err = load(&source, asked).expect_err("wrong task");
            assert!(matches!(err, DataError::WrongTask { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&source.to_string()), "{msg}");
            assert!(msg.contains(&asked.to_string()), "{msg}");
            let supported = source.builtin_task().expect("built-in");
            assert!(msg.contains(&supported.to_string()), "{msg}");
        }
    }

    #[test]
    fn source_parses_builtins_and_displays_them_back() {
        for text in ["diabetes", "iris", "winequality"] {
            let s: DatasetSource = text.parse().expect("built-in");
            assert_eq!(s.to_string(), text);
        }
        assert_eq!("IRIS".parse::<DatasetSource>().ok(), Some(DatasetSource::Iris));
    }

    #[test]
    fn source_splits_csv_spec_at_last_colon_only_for_plausible_targets() {
        let csv =
            |p: &str, t: Option<&str>| DatasetSource::Csv { path: PathBuf::from(p), target: t.map(str::to_owned) };
        let cases = [
            ("csv:data.csv", csv("data.csv", None)),
            ("csv:data.csv:quality", csv("data.csv", Some("quality"))),
            ("csv:a:b.csv:y", csv("a:b.csv", Some("y"))),
            ("csv:a:b.csv:", csv("a:b.csv", None)),
            ("csv:C:\\data\\x.csv", csv("C:\\data\\x.csv", None)),
            ("csv:C:/data/x.csv", csv("C:/data/x.csv", None)),
            ("csv:x.csv: y", csv("x.csv: y", None)),
            ("CSV:x.csv", csv("x.csv", None)),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<DatasetSource>().ok(), Some(want), "{text}");
        }
    }

    #[test]
    fn source_rejects_malformed_names_and_empty_paths() {
        for text in ["", "csv:", "csv::y", "csv", "ｃsv:x", "two words", ":x", "-a", "iris:x", "Diabetes:"] {
            let err = text.parse::<DatasetSource>().expect_err(text);
            assert!(matches!(err, DataError::BadSource { .. }), "{text}: {err:?}");
        }
    }

    #[test]
    fn other_names_are_registered_sources_with_an_optional_argument() {
        let named =
            |name: &str, arg: Option<&str>| DatasetSource::Named { name: name.into(), arg: arg.map(Into::into) };
        let cases = [
            ("mnist", named("mnist", None)),
            ("rings:600", named("rings", Some("600"))),
            ("rings:", named("rings", None)),
            ("my.source-2:a:b", named("my.source-2", Some("a:b"))),
        ];
        for (text, want) in cases {
            let got: DatasetSource = text.parse().expect(text);
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string().parse::<DatasetSource>().ok(), Some(want), "{text} round trip");
            assert_eq!(got.builtin_task(), None);
        }
        // Without a registry, a named source is unknown, and the error lists what there is.
        let err = load(&named("mnist", None), TaskKind::Classification).unwrap_err();
        assert!(matches!(err, DataError::UnknownSource { ref name, .. } if name == "mnist"), "{err}");
        assert!(err.to_string().contains("iris"), "{err}");
    }

    #[test]
    fn source_serde_goes_through_the_string_form() {
        let s = DatasetSource::Csv { path: PathBuf::from("runs/12:30.csv"), target: None };
        let text: String = s.clone().into();
        assert_eq!(text, "csv:runs/12:30.csv:");
        assert_eq!(DatasetSource::try_from(text).ok(), Some(s));
    }

    proptest! {
        #[test]
        fn source_display_then_parse_round_trips(
            path in "[a-z0-9:./_ -]{1,20}",
            target in proptest::option::of("[A-Za-z0-9_.]([A-Za-z0-9_. -]{0,8}[A-Za-z0-9_.])?"),
        ) {
            let s = DatasetSource::Csv { path: PathBuf::from(&path), target };
            let back: DatasetSource = s.to_string().parse().expect("display output parses");
            prop_assert_eq!(back, s);
        }

        #[test]
        fn source_parse_never_panics(text in "\\PC{0,40}") {
            let _ = text.parse::<DatasetSource>();
        }
    }

    #[test]
    fn task_kind_parses_and_displays() {
        for task in [TaskKind::Regression, TaskKind::Classification] {
            assert_eq!(task.to_string().parse::<TaskKind>().ok(), Some(task));
        }
        assert!(matches!("clustering".parse::<TaskKind>(), Err(DataError::BadTask { .. })));
    }

    const GOOD: &str = "a, b ,label,y\n1,2,3,0.5\n 4 ,5e0,5.0,-1\n7,8,3,2\n";

    #[test]
    fn csv_regression_with_default_target_uses_last_column() {
        let file = write_csv(GOOD);
        let t = load(&csv_source(&file, None), TaskKind::Regression).expect("good csv");
        assert_eq!((t.len(), t.features()), (3, 3));
        assert_eq!(t.feature_names, ["a", "b", "label"]);
        assert_eq!(t.y, Labels::Real(vec![0.5, -1.0, 2.0]));
        assert_eq!(t.x.row(1).to_vec(), vec![4.0, 5.0, 5.0]);
        assert_eq!(t.name, file.path().display().to_string());
    }

    #[test]
    fn csv_classification_with_named_target_maps_sorted_values() {
        let file = write_csv(GOOD);
        let t = load(&csv_source(&file, Some("label")), TaskKind::Classification).expect("good csv");
        assert_eq!(t.feature_names, ["a", "b", "y"]);
        assert_eq!(t.y, Labels::Class { labels: vec![0, 1, 0], classes: 2, class_names: vec!["3".into(), "5".into()] });
        assert_eq!(t.x.row(2).to_vec(), vec![7.0, 8.0, 2.0]);
    }

    #[test]
    fn csv_classification_sorts_negative_and_float_written_labels() {
        let t = {
            let file = write_csv("x,c\n1,10\n2,-2.0\n3,3\n4,10.0\n");
            load(&csv_source(&file, None), TaskKind::Classification).expect("labels")
        };
        assert_eq!(
            t.y,
            Labels::Class {
                labels: vec![2, 0, 1, 2],
                classes: 3,
                class_names: vec!["-2".into(), "3".into(), "10".into()],
            }
        );
    }

    #[test]
    fn csv_missing_file_is_file_not_found() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nope.csv");
        let source = DatasetSource::Csv { path: path.clone(), target: None };
        let err = load(&source, TaskKind::Regression).expect_err("missing");
        assert!(matches!(err, DataError::FileNotFound { did_you_mean: None, .. }), "{err:?}");
        assert!(err.to_string().contains("nope.csv"), "{err}");
    }

    #[test]
    fn csv_missing_file_hints_at_path_with_colon() {
        let dir = tempfile::tempdir().expect("temp dir");
        let real = dir.path().join("run:7");
        std::fs::write(&real, GOOD).expect("write");
        let text = format!("csv:{}", real.display());
        let source: DatasetSource = text.parse().expect("parses");
        let err = load(&source, TaskKind::Regression).expect_err("split at the colon");
        assert!(matches!(err, DataError::FileNotFound { did_you_mean: Some(_), .. }), "{err:?}");
        assert!(err.to_string().contains(&format!("csv:{}:", real.display())), "{err}");
        // The documented escape works.
        let fixed: DatasetSource = format!("{text}:").parse().expect("parses");
        assert!(load(&fixed, TaskKind::Regression).is_ok());
    }

    #[test]
    fn csv_directory_is_unreadable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = DatasetSource::Csv { path: dir.path().to_owned(), target: None };
        let err = load(&source, TaskKind::Regression).expect_err("a directory");
        assert!(matches!(err, DataError::Unreadable { .. }), "{err:?}");
    }

    #[test]
    fn csv_empty_file_is_empty_file() {
        for contents in ["", "\n\n"] {
            let err = load_err(contents, None, TaskKind::Regression);
            assert!(matches!(err, DataError::EmptyFile { .. }), "{err:?}");
        }
    }

    #[test]
    fn csv_header_only_is_no_data_rows() {
        let err = load_err("a,b\n", None, TaskKind::Regression);
        assert!(matches!(err, DataError::NoDataRows { .. }), "{err:?}");
    }

    #[test]
    fn csv_missing_target_lists_the_columns() {
        let err = load_err(GOOD, Some("quality"), TaskKind::Regression);
        assert!(matches!(err, DataError::MissingTarget { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("\"quality\""), "{msg}");
        assert!(msg.contains("\"a\", \"b\", \"label\", \"y\""), "{msg}");
    }

    #[test]
    fn csv_ragged_row_names_line_and_counts() {
        let err = load_err("a,b,c\n1,2,3\n\n4,5\n", None, TaskKind::Regression);
        assert!(matches!(err, DataError::RaggedRow { line: 4, expected: 3, found: 2, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("line 4") && msg.contains("expected 3 fields, found 2"), "{msg}");
    }

    #[test]
    fn csv_line_numbers_count_blank_lines_crlf_and_quoted_newlines() {
        let cases = [
            ("a,y\n1,2\n\n\nx,3\n", 5),
            ("a,y\r\n1,2\r\n\r\nx,3\r\n", 4),
            ("a,y\r1,2\rx,3", 3),
            // Quoted cells spanning lines 2–4 (trimmed to "1" and "2"); the bad row is line 5.
            ("a,y\n\"1\n\",\"2\r\n\"\nx,3\n", 5),
            ("\n\na,y\n1,2\nx,3\n", 5),
            ("\u{feff}a,y\n1,2\nx,3\n", 3),
        ];
        for (contents, want) in cases {
            let err = load_err(contents, None, TaskKind::Classification);
            let line = match &err {
                DataError::NotNumeric { line, .. } | DataError::NotAClass { line, .. } => *line,
                other => panic!("{contents:?}: {other:?}"),
            };
            assert_eq!(line, want, "{contents:?}: {err}");
        }
    }

    #[test]
    fn line_counter_steps_over_line_endings_and_recounts_backwards() {
        let bytes = b"a\r\nb\rc\n\nd";
        let mut lines = LineCounter::new(bytes);
        assert_eq!(lines.line_at(0), 1);
        assert_eq!(lines.line_at(1), 2); // inside "\r\n": the record starts at 'b'
        assert_eq!(lines.line_at(4), 3);
        assert_eq!(lines.line_at(7), 5);
        assert_eq!(lines.line_at(u64::MAX), 5);
        assert_eq!(lines.line_at(3), 2);
    }

    #[test]
    fn csv_non_numeric_cell_names_line_column_and_value() {
        let err = load_err("a,b,y\n1,2,3\n1,abc,3\n", None, TaskKind::Regression);
        assert!(matches!(err, DataError::NotNumeric { line: 3, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("line 3") && msg.contains("\"b\"") && msg.contains("\"abc\""), "{msg}");
        let empty = load_err("a,b,y\n1,,3\n", None, TaskKind::Regression);
        assert!(matches!(empty, DataError::NotNumeric { line: 2, .. }), "{empty:?}");
    }

    #[test]
    fn csv_non_finite_cells_are_rejected() {
        for cell in ["NaN", "inf", "-infinity", "1e39"] {
            let err = load_err(&format!("a,y\n1,1\n{cell},2\n"), None, TaskKind::Regression);
            assert!(matches!(err, DataError::NotFinite { line: 3, .. }), "{cell}: {err:?}");
            assert!(err.to_string().contains(cell), "{err}");
        }
        let target = load_err("a,y\n1,nan\n", None, TaskKind::Regression);
        assert!(matches!(target, DataError::NotFinite { line: 2, .. }), "{target:?}");
    }

    #[test]
    fn csv_single_column_is_rejected() {
        let err = load_err("y\n1\n2\n", None, TaskKind::Regression);
        assert!(matches!(err, DataError::SingleColumn { .. }), "{err:?}");
        assert!(err.to_string().contains("\"y\""), "{err}");
    }

    #[test]
    fn csv_duplicate_column_names_are_rejected() {
        let err = load_err("a,b, a\n1,2,3\n", None, TaskKind::Regression);
        assert!(matches!(err, DataError::DuplicateColumn { first: 1, second: 3, .. }), "{err:?}");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn csv_empty_column_name_is_rejected() {
        let err = load_err(",a,y\n0,1,2\n", None, TaskKind::Regression);
        assert!(matches!(err, DataError::EmptyColumnName { column: 1, .. }), "{err:?}");
    }

    #[test]
    fn csv_non_integer_class_names_line_and_value() {
        for cell in ["2.5", "cat", "1e300"] {
            let err = load_err(&format!("a,y\n1,1\n2,{cell}\n"), None, TaskKind::Classification);
            assert!(matches!(err, DataError::NotAClass { line: 3, .. }), "{cell}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains("line 3") && msg.contains(cell), "{msg}");
        }
    }

    #[test]
    fn csv_single_class_is_too_few_classes() {
        let err = load_err("a,y\n1,4\n2,4.0\n", None, TaskKind::Classification);
        assert!(matches!(err, DataError::TooFewClasses { found: 1, .. }), "{err:?}");
    }

    #[test]
    fn csv_invalid_utf8_is_a_csv_error() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(b"a,y\n1,2\n\xff,3\n").expect("write");
        let err = load(&csv_source(&file, None), TaskKind::Regression).expect_err("bad utf-8");
        assert!(matches!(err, DataError::Csv { .. }), "{err:?}");
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn csv_long_cells_are_shortened_in_messages() {
        let long = "x".repeat(10_000);
        let err = load_err(&format!("a,y\n{long},1\n"), None, TaskKind::Regression);
        assert!(err.to_string().len() < 300, "{err}");
    }

    #[test]
    fn csv_errors_are_one_line() {
        let err = load_err("\"a\nb\",y\n1,\"x\ny\"\n", None, TaskKind::Regression);
        assert!(!err.to_string().contains('\n'), "{err}");
    }

    #[test]
    fn table_rows_gathers_in_order_and_rejects_out_of_range() {
        let t = load(&DatasetSource::Iris, TaskKind::Classification).expect("iris");
        let (x, y) = t.rows(&[149, 0, 149]).expect("in range");
        assert_eq!(x.nrows(), 3);
        assert_eq!(x.row(0), t.x.row(149));
        assert_eq!(x.row(1), t.x.row(0));
        assert_eq!(y, OwnedTargets::Class(vec![2, 0, 2]));
        let err = t.rows(&[3, 150]).expect_err("past the end");
        assert!(matches!(err, DataError::RowOutOfRange { index: 150, rows: 150 }), "{err:?}");
    }

    #[test]
    fn table_new_checks_shapes_and_labels() {
        let x = Array2::<f32>::zeros((2, 1));
        assert!(matches!(
            Table::new("t", vec!["a".into()], x.clone(), Labels::Real(vec![1.0])),
            Err(DataError::TableShape { what: "targets", .. })
        ));
        assert!(matches!(
            Table::new("t", vec![], x.clone(), Labels::Real(vec![1.0, 2.0])),
            Err(DataError::TableShape { what: "feature names", .. })
        ));
        let bad_label = Labels::Class { labels: vec![0, 2], classes: 2, class_names: vec!["a".into(), "b".into()] };
        assert!(matches!(
            Table::new("t", vec!["a".into()], x, bad_label),
            Err(DataError::LabelOutOfRange { label: 2, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn csv_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut file = tempfile::NamedTempFile::new().expect("temp file");
            file.write_all(&bytes).expect("write");
            for task in [TaskKind::Regression, TaskKind::Classification] {
                let _ = load(&csv_source(&file, None), task);
                let _ = load(&csv_source(&file, Some("a")), task);
            }
        }

        #[test]
        fn csv_arbitrary_csv_like_text_never_panics(text in "[ab0-9.,\"\n eE+-]{0,200}") {
            let file = write_csv(&text);
            for task in [TaskKind::Regression, TaskKind::Classification] {
                if let Ok(t) = load(&csv_source(&file, None), task) {
                    prop_assert!(!t.is_empty() && t.features() > 0);
                    prop_assert_eq!(t.y.len(), t.len());
                }
            }
        }

        #[test]
        fn csv_written_numbers_load_back_exactly(
            rows in proptest::collection::vec(
                (proptest::collection::vec(-1e6f32..1e6, 3), 0u8..4),
                1..40,
            ),
        ) {
            let mut text = String::from("f0,f1,f2,class\n");
            for (features, class) in &rows {
                // `{:?}` prints the shortest string that parses back to the same f32.
                text.push_str(&format!("{:?}, {:?} ,{:?},{class}\n", features[0], features[1], features[2]));
            }
            let file = write_csv(&text);
            let distinct: std::collections::BTreeSet<u8> = rows.iter().map(|r| r.1).collect();
            match load(&csv_source(&file, Some("class")), TaskKind::Classification) {
                Ok(t) => {
                    prop_assert_eq!(t.len(), rows.len());
                    for (r, (features, _)) in rows.iter().enumerate() {
                        prop_assert_eq!(t.x.row(r).to_vec(), features.clone());
                    }
                    prop_assert_eq!(t.classes(), Some(distinct.len()));
                }
                Err(DataError::TooFewClasses { found, .. }) => prop_assert_eq!(found, distinct.len()),
                Err(other) => prop_assert!(false, "unexpected error {}", other),
            }
        }
    }
}
