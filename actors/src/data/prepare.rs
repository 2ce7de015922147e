//! The held-out split and standardisation.
//!
//! Statistics come from the training rows only (no information from the test rows leaks into
//! training), are computed in `f64` in row order (so they are bit-reproducible), and are applied
//! to both sets.

use super::{check_row_count, derive_seed, seeded_shuffle, DataError, Labels, Table};

/// Domain tag of the test-split shuffle in [`derive_seed`]: ASCII `phx.test`.
const SPLIT_DOMAIN: u64 = u64::from_be_bytes(*b"phx.test");

/// A table split into standardised train and test sets.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    /// Training rows, in shuffled order, each feature standardised with the train statistics.
    pub train: Table,
    /// Held-out rows, standardised with the same statistics; empty when the fraction is 0.
    pub test: Table,
    /// Per feature, the train mean that was subtracted.
    pub feature_mean: Vec<f64>,
    /// Per feature, the train standard deviation divided by (population, `ddof = 0`); 1 for a
    /// constant column.
    pub feature_std: Vec<f64>,
    /// For regression, the target's train `(mean, std)`: the tables hold `(y - mean) / std`.
    /// Scaling does not change R². `None` for classification.
    pub target_scale: Option<(f64, f64)>,
}

impl Prepared {
    /// Maps a prediction of the standardised target back to the original units.
    ///
    /// Identity for classification tables (no target scale).
    pub fn target_to_original(&self, y: f32) -> f32 {
        match self.target_scale {
            Some((mean, std)) => (f64::from(y) * std + mean) as f32,
            None => y,
        }
    }
}

/// How many rows go to `(train, test)` for `rows` rows and a test fraction.
///
/// The test set takes `round(rows × test_fraction)` rows, at least 1 when the fraction is
/// positive; at least one training row must remain. The fraction must lie in `[0, 1)`.
///
/// ```
/// use phalanx_actors::data::split_sizes;
/// assert_eq!(split_sizes(150, 0.2)?, (120, 30));
/// assert_eq!(split_sizes(3, 0.01)?, (2, 1));
/// assert_eq!(split_sizes(10, 0.0)?, (10, 0));
/// assert!(split_sizes(1, 0.5).is_err());
/// # Ok::<(), phalanx_actors::data::DataError>(())
/// ```
pub fn split_sizes(rows: usize, test_fraction: f64) -> Result<(usize, usize), DataError> {
    if !(0.0..1.0).contains(&test_fraction) {
        return Err(DataError::BadTestFraction { value: test_fraction });
    }
    let test_rows = if test_fraction == 0.0 {
        0
    } else {
        // In [0, rows] because the fraction is below 1; the float-to-int cast saturates.
        ((rows as f64 * test_fraction).round() as usize).clamp(1, rows.max(1))
    };
    if test_rows >= rows {
        return Err(DataError::NoTrainRows { rows, test_fraction, test_rows });
    }
    Ok((rows - test_rows, test_rows))
}

/// Splits `table` into held-out test rows and training rows, then standardises both with the
/// training statistics.
///
/// Row indices are shuffled with a ChaCha8 stream seeded by `derive_seed(SPLIT_DOMAIN, [seed])`
/// (the domain is ASCII `phx.test` as a big-endian `u64`); the first [`split_sizes`]`.1`
/// shuffled rows are the test set and the rest, in shuffled order, the training set. Each
/// feature becomes
/// `(x - mean) / std` with the train mean and population std (a column that is constant over
/// the training rows gets std 1 and its exact value as mean, so it becomes 0). Regression
/// targets are standardised the same way and the scale is kept in
/// [`Prepared::target_scale`].
///
/// ```
/// use phalanx_actors::data::{load, prepare, DatasetSource, TaskKind};
/// let table = load(&DatasetSource::Diabetes, TaskKind::Regression)?;
/// let p = prepare(table, 1, 0.2)?;
/// assert_eq!((p.train.len(), p.test.len()), (353, 88));
/// assert!(p.target_scale.is_some());
/// # Ok::<(), phalanx_actors::data::DataError>(())
/// ```
pub fn prepare(table: Table, seed: u64, test_fraction: f64) -> Result<Prepared, DataError> {
    let rows = table.len();
    check_row_count(rows)?;
    let (_, test_rows) = split_sizes(rows, test_fraction)?;
    // `rows` fits u32 (checked above), so every index does.
    let mut order: Vec<u32> = (0..rows).map(|i| i as u32).collect();
    seeded_shuffle(derive_seed(SPLIT_DOMAIN, &[seed]), &mut order);
    let (test_idx, train_idx) = order.split_at(test_rows);
    let mut train = table.subset(train_idx)?;
    let mut test = table.subset(test_idx)?;

    let (feature_mean, feature_std): (Vec<f64>, Vec<f64>) =
        train.x.columns().into_iter().map(|column| standard_scale(column.iter().copied())).unzip();
    for t in [&mut train, &mut test] {
        for mut row in t.x.rows_mut() {
            for ((v, &mean), &std) in row.iter_mut().zip(&feature_mean).zip(&feature_std) {
                *v = standardise(*v, mean, std);
            }
        }
    }

    let target_scale = match &train.y {
        Labels::Real(values) => Some(standard_scale(values.iter().copied())),
        Labels::Class { .. } => None,
    };
    if let Some((mean, std)) = target_scale {
        for t in [&mut train, &mut test] {
            if let Labels::Real(values) = &mut t.y {
                for v in values.iter_mut() {
                    *v = standardise(*v, mean, std);
                }
            }
        }
    }

    tracing::debug!(
        table = %table.name,
        seed,
        train_rows = train.len(),
        test_rows = test.len(),
        "prepared split"
    );
    Ok(Prepared { train, test, feature_mean, feature_std, target_scale })
}

fn standardise(v: f32, mean: f64, std: f64) -> f32 {
    ((f64::from(v) - mean) / std) as f32
}

/// The `(mean, population std)` of a column in `f64`, summed in order; a constant (or empty)
/// column gets its exact value as mean and std 1.
fn standard_scale(values: impl Iterator<Item = f32> + Clone) -> (f64, f64) {
    let mut first: Option<f32> = None;
    let mut constant = true;
    let mut count = 0usize;
    let mut sum = 0.0f64;
    for v in values.clone() {
        match first {
            None => first = Some(v),
            Some(f) => constant &= f.to_bits() == v.to_bits(),
        }
        count += 1;
        sum += f64::from(v);
    }
    let Some(first) = first else {
        return (0.0, 1.0);
    };
    if constant {
        // The two-pass std of a constant column is a few ulps, not 0; dividing by it would
        // blow rounding noise up to O(1) values.
        return (f64::from(first), 1.0);
    }
    let n = count as f64;
    let mean = sum / n;
    let var = values.map(|v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
    let std = var.sqrt();
    if std.is_finite() && std > 0.0 {
        (mean, std)
    } else {
        (mean, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load, DatasetSource, TaskKind};
    use ndarray::Array2;

    fn iris() -> Table {
        load(&DatasetSource::Iris, TaskKind::Classification).expect("iris")
    }

    fn diabetes() -> Table {
        load(&DatasetSource::Diabetes, TaskKind::Regression).expect("diabetes")
    }

    #[test]
    fn prepare_is_deterministic_for_a_seed() {
        let a = prepare(iris(), 5, 0.2).expect("prepare");
        let b = prepare(iris(), 5, 0.2).expect("prepare");
        assert_eq!(a, b);
        // Bit-identical, not just equal as floats.
        let bits = |p: &Prepared| p.train.x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
    }

    #[test]
    fn prepare_differs_for_another_seed() {
        let a = prepare(iris(), 5, 0.2).expect("prepare");
        let b = prepare(iris(), 6, 0.2).expect("prepare");
        assert_ne!(a.train.x, b.train.x);
        assert_ne!(a.feature_mean, b.feature_mean);
    }

    #[test]
    fn prepare_train_features_have_mean_0_std_1() {
        for p in [prepare(iris(), 1, 0.25).expect("iris"), prepare(diabetes(), 2, 0.2).expect("diabetes")] {
            for column in p.train.x.columns() {
                let (mean, std) = standard_scale(column.iter().copied());
                assert!(mean.abs() < 1e-6, "mean {mean}");
                assert!((std - 1.0).abs() < 1e-5, "std {std}");
            }
        }
    }

    #[test]
    fn prepare_standardises_regression_target_and_maps_it_back() {
        let raw = diabetes();
        let p = prepare(raw.clone(), 3, 0.2).expect("prepare");
        let (mean, std) = p.target_scale.expect("regression keeps a target scale");
        assert!(mean > 100.0 && std > 10.0, "{mean} {std}");
        let Labels::Real(y) = &p.train.y else {
            panic!("regression targets");
        };
        let (m, s) = standard_scale(y.iter().copied());
        assert!(m.abs() < 1e-6 && (s - 1.0).abs() < 1e-5, "{m} {s}");
        let Labels::Real(raw_y) = &raw.y else {
            panic!("regression targets");
        };
        // Every standardised target maps back to one of the original values.
        let back = p.target_to_original(y[0]);
        assert!(raw_y.iter().any(|&v| (v - back).abs() < 1e-3), "{back}");
    }

    #[test]
    fn prepare_splits_disjoint_train_and_test_covering_all_rows() {
        // Tag each row with its index as the only feature's value to follow it through.
        let n = 101;
        let x = Array2::from_shape_fn((n, 2), |(r, c)| if c == 0 { r as f32 } else { 1.0 });
        let table =
            Table::new("tagged", vec!["row".into(), "one".into()], x, Labels::Real((0..n).map(|r| r as f32).collect()))
                .expect("table");
        let p = prepare(table, 9, 0.3).expect("prepare");
        assert_eq!((p.train.len(), p.test.len()), (71, 30));
        let (mean, std) = (p.feature_mean[0], p.feature_std[0]);
        let original = |t: &Table| -> Vec<usize> {
            t.x.column(0).iter().map(|&v| (f64::from(v) * std + mean).round() as usize).collect()
        };
        let mut all = original(&p.train);
        all.extend(original(&p.test));
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        // The constant column becomes exactly 0 with std 1.
        assert_eq!(p.feature_std[1], 1.0);
        assert!(p.train.x.column(1).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn prepare_keeps_class_count_and_names_in_both_sets() {
        let p = prepare(iris(), 4, 0.1).expect("prepare");
        assert_eq!(p.train.classes(), Some(3));
        assert_eq!(p.test.classes(), Some(3));
        assert_eq!(p.target_scale, None);
        assert_eq!(p.test.feature_names, p.train.feature_names);
    }

    #[test]
    fn prepare_with_zero_fraction_gives_empty_test() {
        let p = prepare(iris(), 4, 0.0).expect("prepare");
        assert_eq!((p.train.len(), p.test.len()), (150, 0));
        assert_eq!(p.test.features(), 4);
    }

    #[test]
    fn prepare_rejects_bad_fractions_and_tiny_tables() {
        for f in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
            let err = prepare(iris(), 0, f).expect_err("bad fraction");
            assert!(matches!(err, DataError::BadTestFraction { .. }), "{f}: {err:?}");
        }
        let one = iris().subset(&[0]).expect("subset");
        let err = prepare(one.clone(), 0, 0.5).expect_err("no train row");
        assert!(matches!(err, DataError::NoTrainRows { rows: 1, test_rows: 1, .. }), "{err:?}");
        assert!(prepare(one, 0, 0.0).is_ok());
        let empty = iris().subset(&[]).expect("subset");
        assert!(matches!(prepare(empty, 0, 0.0), Err(DataError::NoTrainRows { rows: 0, .. })));
    }

    #[test]
    fn split_sizes_rounds_and_keeps_one_row_each_side() {
        assert_eq!(split_sizes(441, 0.2).ok(), Some((353, 88)));
        assert_eq!(split_sizes(10, 0.01).ok(), Some((9, 1)));
        assert_eq!(split_sizes(10, 0.94).ok(), Some((1, 9)));
        // round(9.9) = 10 would leave no training row.
        assert!(split_sizes(10, 0.99).is_err());
        assert!(split_sizes(2, 0.99).is_err());
    }
}
