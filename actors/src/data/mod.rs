//! Datasets, held-out splits and the job's deterministic partitions.
//!
//! Phalanx promises that every sample of every epoch contributes exactly once and that a run with
//! faults ends bit-identical to one without. On the data side that means: the rows a partition
//! feeds at `(epoch, step)` must be a *pure function* of `(seed, partition, epoch, step)`, so a
//! shard that restarts on another node replays exactly the batch the dead one would have fed.
//! Nothing here reads a clock, a `HashMap` order or an OS random source; every shuffle is a
//! ChaCha8 stream seeded from a documented mix ([`derive_seed`]) of the job seed.
//!
//! ```text
//!  DatasetSource ──load(task)──▶ Table ──prepare(seed, test_fraction)──▶ Prepared
//!  "iris", "csv:PATH:TARGET"        n × d                                  ├─ train (standardised)
//!                                                                          ├─ test  (same scaling)
//!                                                                          └─ mean / std
//!  Partitions::new(train.len(), P, B, seed)      P blocks of the shuffled train rows (fixed per job)
//!        │
//!        └─ batch(p, epoch, step) ──▶ row indices ──Table::rows──▶ (x: k × d, targets)
//!           = chunk `step` of the (seed, p, epoch) shuffle of partition p's rows
//! ```
//!
//! The entry points are [`load`], [`prepare()`] and [`Partitions`]; a shard that feeds one
//! partition step after step uses a [`PartitionFeed`], which shuffles once per epoch.
//!
//! ```
//! use phalanx_actors::data::{load, prepare, DatasetSource, Partitions, TaskKind};
//!
//! let source: DatasetSource = "iris".parse()?;
//! let table = load(&source, TaskKind::Classification)?;
//! let prepared = prepare(table, 7, 0.2)?;
//! assert_eq!((prepared.train.len(), prepared.test.len()), (120, 30));
//!
//! let parts = Partitions::new(prepared.train.len(), 4, 32, 7)?;
//! let rows = parts.batch(2, 0, 1)?; // partition 2, epoch 0, step 1
//! let (x, y) = prepared.train.rows(&rows)?;
//! assert_eq!(x.nrows(), y.len());
//! // A pure function: asking again (on any node, after any restart) gives the same rows.
//! assert_eq!(rows, Partitions::new(120, 4, 32, 7)?.batch(2, 0, 1)?);
//! # Ok::<(), phalanx_actors::data::DataError>(())
//! ```

use std::path::PathBuf;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod partition;
mod prepare;
mod registry;
mod source;

pub use partition::{PartitionFeed, Partitions};
pub use prepare::{prepare, split_sizes, Prepared};
pub use registry::{DataFactory, DataRegistry, DataRequest};
pub use source::{load, DatasetSource, Labels, OwnedTargets, Table, TaskKind};

/// Everything that can go wrong while loading, splitting or partitioning data.
///
/// Every message is one line and names the thing at fault: the file, the 1-based line (the CSV
/// header is line 1), the column, the offending value, the partition or the step.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A dataset source string is not one of the accepted forms.
    #[error("bad dataset source {text:?}: {reason}")]
    BadSource {
        /// The text that was parsed (shortened if long).
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A task kind string is neither `regression` nor `classification`.
    #[error("unknown task {text:?} (expected regression or classification)")]
    BadTask {
        /// The text that was parsed (shortened if long).
        text: String,
    },
    /// A built-in dataset was asked for a task it does not have.
    #[error("dataset {dataset} is a {supported} dataset, not {asked}")]
    WrongTask {
        /// The built-in dataset's name.
        dataset: &'static str,
        /// The task that was asked for.
        asked: TaskKind,
        /// The only task the dataset supports.
        supported: TaskKind,
    },
    /// The CSV file does not exist.
    #[error("csv file not found: {}{}", .path.display(), colon_hint(.did_you_mean))]
    FileNotFound {
        /// The path that was opened.
        path: PathBuf,
        /// An existing file the source string may have meant: `PATH:TARGET` read as one path.
        did_you_mean: Option<PathBuf>,
    },
    /// The CSV file exists but cannot be read (permissions, a directory, an I/O error).
    #[error("cannot read csv file {}: {source}", .path.display())]
    Unreadable {
        /// The path that was opened.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The CSV file is not well-formed CSV (for example invalid UTF-8).
    #[error("malformed csv file {} line {line}: {reason}", .path.display())]
    Csv {
        /// The file.
        path: PathBuf,
        /// 1-based line number of the record that failed.
        line: u64,
        /// What the parser found.
        reason: String,
    },
    /// The CSV file has no header row.
    #[error("csv file {} is empty (a header row is required)", .path.display())]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// The CSV file has a header but no data rows.
    #[error("csv file {} has a header but no data rows", .path.display())]
    NoDataRows {
        /// The file.
        path: PathBuf,
    },
    /// A header cell is empty.
    #[error("csv file {} line 1: column {column} has an empty name", .path.display())]
    EmptyColumnName {
        /// The file.
        path: PathBuf,
        /// 1-based column number.
        column: usize,
    },
    /// Two header cells have the same name.
    #[error("csv file {} line 1: duplicate column name {name:?} (columns {first} and {second})", .path.display())]
    DuplicateColumn {
        /// The file.
        path: PathBuf,
        /// The repeated name.
        name: String,
        /// 1-based column number of the first occurrence.
        first: usize,
        /// 1-based column number of the repeat.
        second: usize,
    },
    /// The file has a single column, so there is a target but no feature.
    #[error("csv file {} has a single column {column:?}: need at least one feature besides the target", .path.display())]
    SingleColumn {
        /// The file.
        path: PathBuf,
        /// The only column's name.
        column: String,
    },
    /// The named target column is not in the header.
    #[error("csv file {} line 1: no target column {target:?}; columns are {columns}", .path.display())]
    MissingTarget {
        /// The file.
        path: PathBuf,
        /// The target that was asked for.
        target: String,
        /// The header's column names (shortened if there are many).
        columns: String,
    },
    /// A data row has a different number of fields than the header.
    #[error("csv file {} line {line}: expected {expected} fields, found {found}", .path.display())]
    RaggedRow {
        /// The file.
        path: PathBuf,
        /// 1-based line number of the row.
        line: u64,
        /// Number of header fields.
        expected: usize,
        /// Number of fields in this row.
        found: usize,
    },
    /// A cell is not a number.
    #[error("csv file {} line {line} column {column:?}: {value:?} is not a number", .path.display())]
    NotNumeric {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The column's name.
        column: String,
        /// The cell (shortened if long).
        value: String,
    },
    /// A cell is a number but not a finite `f32` (NaN, infinite, or out of range).
    #[error("csv file {} line {line} column {column:?}: {value:?} is not a finite f32", .path.display())]
    NotFinite {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The column's name.
        column: String,
        /// The cell (shortened if long).
        value: String,
    },
    /// A classification target cell is not an integer class label.
    #[error("csv file {} line {line} column {column:?}: class label {value:?} is not an integer", .path.display())]
    NotAClass {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// The target column's name.
        column: String,
        /// The cell (shortened if long).
        value: String,
    },
    /// A classification target has fewer than two distinct classes.
    #[error("dataset {dataset} column {column:?}: classification needs at least 2 classes, found {found}")]
    TooFewClasses {
        /// The dataset (a file path for CSV sources).
        dataset: String,
        /// The target column's name.
        column: String,
        /// Distinct classes found.
        found: usize,
    },
    /// A table's parts disagree in size.
    #[error("table {table}: {what} has {found} entries, expected {expected}")]
    TableShape {
        /// The table's name.
        table: String,
        /// Which part is off (`"targets"`, `"feature names"`, `"class names"`).
        what: &'static str,
        /// The size it should have.
        expected: usize,
        /// The size it has.
        found: usize,
    },
    /// A class label is not below the table's class count.
    #[error("table {table}: class label {label} is out of range for {classes} classes")]
    LabelOutOfRange {
        /// The table's name.
        table: String,
        /// The label.
        label: u32,
        /// The class count.
        classes: usize,
    },
    /// More rows than `u32` row indices can address.
    #[error("{rows} rows exceed the limit of {max} rows")]
    TooManyRows {
        /// The number of rows.
        rows: usize,
        /// The largest supported number.
        max: u64,
    },
    /// A row index is past the end of the table.
    #[error("row index {index} is out of range for {rows} rows")]
    RowOutOfRange {
        /// The index.
        index: u32,
        /// The table's row count.
        rows: usize,
    },
    /// A test fraction outside `[0, 1)`.
    #[error("test fraction {value} is not in [0, 1)")]
    BadTestFraction {
        /// The fraction asked for.
        value: f64,
    },
    /// The split would leave no training row.
    #[error(
        "cannot split {rows} rows with test fraction {test_fraction}: {test_rows} test rows leave no training row"
    )]
    NoTrainRows {
        /// Rows in the table.
        rows: usize,
        /// The fraction asked for.
        test_fraction: f64,
        /// Rows the test set would take.
        test_rows: usize,
    },
    /// Zero partitions were asked for.
    #[error("partition count must be at least 1, got 0")]
    ZeroPartitions,
    /// A batch size of zero was asked for.
    #[error("batch size must be at least 1, got 0")]
    ZeroBatchSize,
    /// More partitions than training rows, so some partition would be empty.
    #[error("{partitions} partitions exceed the {rows} training rows")]
    MorePartitionsThanRows {
        /// Partitions asked for.
        partitions: u32,
        /// Training rows.
        rows: usize,
    },
    /// A partition number past the job's partition count.
    #[error("partition {partition} is out of range for {partitions} partitions")]
    PartitionOutOfRange {
        /// The partition asked for.
        partition: u32,
        /// The job's partition count.
        partitions: u32,
    },
    /// A step past the end of the epoch.
    #[error("step {step} is out of range for {steps} steps per epoch")]
    StepOutOfRange {
        /// The step in the epoch asked for.
        step: u32,
        /// Steps per epoch.
        steps: u32,
    },
    /// A row given to [`Table::from_rows`] has a different number of features than the names.
    #[error("table {table} row {row}: {found} features, expected {expected}")]
    RowWidth {
        /// The table's name.
        table: String,
        /// 0-based row.
        row: usize,
        /// Number of feature names.
        expected: usize,
        /// Number of values in the row.
        found: usize,
    },
    /// A value given to [`Table::from_rows`] is NaN or infinite.
    #[error("table {table} row {row} column {column:?}: the value is not finite")]
    NotFiniteValue {
        /// The table's name.
        table: String,
        /// 0-based row.
        row: usize,
        /// The feature's name, or `target`.
        column: String,
    },
    /// A classification target given to [`Table::from_rows`] is not an integer.
    #[error("table {table} row {row}: class target {value} is not an integer")]
    NotAClassValue {
        /// The table's name.
        table: String,
        /// 0-based row.
        row: usize,
        /// The target.
        value: f64,
    },
    /// A dataset names a source that is not registered.
    #[error("no data source named {name:?} here (known: {known})")]
    UnknownSource {
        /// The name asked for.
        name: String,
        /// The sources there are, with their forms (`csv:PATH[:TARGET]`), sorted.
        known: String,
    },
    /// A source name that breaks the naming rules (see [`DatasetSource`]).
    #[error("bad data source name {name:?}: {reason}")]
    BadSourceName {
        /// The name given (shortened if long).
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A source name registered twice, or a built-in source's name registered again.
    #[error("data source name {name:?} is taken (a built-in source's name, or registered already)")]
    SourceNameTaken {
        /// The name.
        name: String,
    },
    /// A registered source returned rows for another task than the job's.
    #[error("data source {name} returned {got} rows for a {asked} job")]
    SourceTask {
        /// The source's name.
        name: String,
        /// The job's task.
        asked: TaskKind,
        /// The task of the rows it returned.
        got: TaskKind,
    },
    /// A (deserialised) partition set breaks an invariant that [`Partitions::new`] guarantees.
    #[error("inconsistent partitions: {reason}")]
    InconsistentPartitions {
        /// Which invariant is broken, with the values.
        reason: String,
    },
}

fn colon_hint(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => {
            format!(" (the file {} exists: write csv:{}: to use it with the default target)", p.display(), p.display())
        }
        None => String::new(),
    }
}

/// Longest text (in chars) an error message quotes from its input.
const QUOTE_MAX_CHARS: usize = 48;

/// Shortens untrusted text quoted in an error so a message stays one readable line.
pub(crate) fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The SplitMix64 output function (Steele, Lea and Flood 2014; constants as in Vigna's
/// `splitmix64.c`): adds the golden gamma `0x9E37_79B9_7F4A_7C15`, then two xor-shift-multiply
/// rounds. A bijection on `u64` with good avalanche, fixed forever, unlike std's `DefaultHasher`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives a seed from a domain tag and a list of values:
/// `h = splitmix64(domain); for v in values { h = splitmix64(h ^ v) }`.
///
/// The domain keeps different uses of one job seed (the test split, the partition assignment,
/// the per-epoch shuffles) from drawing the same stream.
///
/// ```
/// use phalanx_actors::data::derive_seed;
/// assert_eq!(derive_seed(1, &[2, 3]), derive_seed(1, &[2, 3]));
/// assert_ne!(derive_seed(1, &[2, 3]), derive_seed(1, &[3, 2]));
/// ```
pub fn derive_seed(domain: u64, values: &[u64]) -> u64 {
    values.iter().fold(splitmix64(domain), |h, &v| splitmix64(h ^ v))
}

/// Shuffles `items` with a ChaCha8 stream seeded by `ChaCha8Rng::seed_from_u64(seed)`.
///
/// Fisher–Yates from the last position down: position `i` swaps with `j`, uniform in `0..=i`,
/// drawn by Lemire's widening multiply of `next_u64()` with rejection. Written out here rather
/// than taken from `rand::seq` so that the order cannot change with a `rand` release.
pub fn seeded_shuffle<T>(seed: u64, items: &mut [T]) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for i in (1..items.len()).rev() {
        // `i < items.len() <= isize::MAX`, so both casts are lossless.
        let j = uniform_below(&mut rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// A uniform draw from `0..bound` (`bound > 0`), without modulo bias.
fn uniform_below(rng: &mut ChaCha8Rng, bound: u64) -> u64 {
    // Lemire, "Fast random integer generation in an interval" (2019): the high word of
    // `x * bound` is uniform once the low words below `2^64 mod bound` are rejected.
    let threshold = bound.wrapping_neg() % bound;
    loop {
        let wide = u128::from(rng.next_u64()) * u128::from(bound);
        if (wide as u64) >= threshold {
            return (wide >> 64) as u64;
        }
    }
}

/// Largest row count that `u32` row indices can address.
pub(crate) const MAX_ROWS: u64 = u32::MAX as u64;

/// Checks that `rows` fits `u32` row indices.
pub(crate) fn check_row_count(rows: usize) -> Result<(), DataError> {
    if rows as u64 > MAX_ROWS {
        return Err(DataError::TooManyRows { rows, max: MAX_ROWS });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_reference_values() {
        // First outputs of Vigna's splitmix64.c seeded with 0 (state advances by the gamma).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn derive_seed_depends_on_domain_and_order() {
        assert_ne!(derive_seed(1, &[5]), derive_seed(2, &[5]));
        assert_ne!(derive_seed(1, &[5, 6]), derive_seed(1, &[6, 5]));
        assert_ne!(derive_seed(1, &[0]), derive_seed(1, &[0, 0]));
    }

    #[test]
    fn seeded_shuffle_is_a_deterministic_permutation() {
        let mut a: Vec<u32> = (0..1000).collect();
        let mut b = a.clone();
        seeded_shuffle(42, &mut a);
        seeded_shuffle(42, &mut b);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
        let mut c: Vec<u32> = (0..1000).collect();
        seeded_shuffle(43, &mut c);
        assert_ne!(a, c);
    }

    #[test]
    fn seeded_shuffle_is_pinned() {
        // Pins the stream so an accidental change of the algorithm or of rand_chacha shows up.
        let mut v: Vec<u32> = (0..10).collect();
        seeded_shuffle(0, &mut v);
        assert_eq!(v, PINNED_SHUFFLE_OF_TEN);
    }

    /// `seeded_shuffle(0, 0..10)`, recorded when the algorithm was written.
    const PINNED_SHUFFLE_OF_TEN: [u32; 10] = [6, 1, 8, 3, 2, 9, 0, 5, 4, 7];

    #[test]
    fn seeded_shuffle_handles_tiny_slices() {
        let mut empty: [u8; 0] = [];
        seeded_shuffle(1, &mut empty);
        let mut one = [9u8];
        seeded_shuffle(1, &mut one);
        assert_eq!(one, [9]);
    }

    #[test]
    fn uniform_below_stays_in_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for bound in [1u64, 2, 3, 7, 1 << 63, u64::MAX] {
            for _ in 0..100 {
                assert!(uniform_below(&mut rng, bound) < bound);
            }
        }
    }

    #[test]
    fn quote_shortens_long_text_on_a_char_boundary() {
        assert_eq!(quote("abc"), "abc");
        let long = "é".repeat(100);
        let q = quote(&long);
        assert_eq!(q.chars().count(), QUOTE_MAX_CHARS + 1);
        assert!(q.ends_with('…'));
    }
}
