//! Quality metrics, and the closed-form least-squares baseline that trained models are
//! compared with (see "Quality anchors" in the design: compare with the best fit on the same
//! split, not with a fixed number).
//!
//! Everything accumulates in `f64` in index order, so results are deterministic. Mismatched
//! lengths or empty inputs give `NaN` (or `None`) rather than a panic: these run on reports,
//! where a missing number is better than a crashed node.

use ndarray::ArrayView2;

/// Ridge added to the diagonal of the normal equations: far below any real feature's
/// variance, yet enough to keep a constant (all-equal) feature from making them singular.
const RIDGE: f64 = 1e-9;

/// Coefficient of determination `1 − SS_res / SS_tot`, in `f64`.
///
/// When `y` is constant (`SS_tot = 0`) the ratio is undefined; like scikit-learn's `r2_score`
/// we return 1.0 for a perfect prediction and 0.0 otherwise, so a degenerate evaluation split
/// reads as "no better than the mean" instead of poisoning a report with `NaN` or `-inf`.
/// Returns `NaN` if the lengths differ or `y` is empty.
pub fn r2(pred: &[f32], y: &[f32]) -> f64 {
    if pred.len() != y.len() {
        return f64::NAN;
    }
    r2_f64(pred.iter().map(|&p| f64::from(p)), y)
}

/// [`r2`] for predictions already in `f64`.
fn r2_f64(pred: impl Iterator<Item = f64>, y: &[f32]) -> f64 {
    if y.is_empty() {
        return f64::NAN;
    }
    let mean = y.iter().map(|&v| f64::from(v)).sum::<f64>() / y.len() as f64;
    let (mut ss_res, mut ss_tot) = (0.0f64, 0.0f64);
    for (p, &target) in pred.zip(y) {
        let target = f64::from(target);
        ss_res += (p - target) * (p - target);
        ss_tot += (target - mean) * (target - mean);
    }
    if ss_tot == 0.0 {
        return if ss_res == 0.0 { 1.0 } else { 0.0 };
    }
    1.0 - ss_res / ss_tot
}

/// Mean squared error `Σ (pred − y)² / n` (not halved, unlike the training loss).
/// Returns `NaN` if the lengths differ or the inputs are empty.
pub fn mse(pred: &[f32], y: &[f32]) -> f64 {
    if pred.len() != y.len() || y.is_empty() {
        return f64::NAN;
    }
    let sum: f64 = pred
        .iter()
        .zip(y)
        .map(|(&p, &t)| {
            let d = f64::from(p) - f64::from(t);
            d * d
        })
        .sum();
    sum / y.len() as f64
}

/// Fraction of rows whose arg-max logit is the label. Ties go to the lowest index (as numpy's
/// `argmax`), NaN logits never win. Returns `NaN` if the row and label counts differ or there
/// are no rows; a label `>= classes` simply counts as wrong.
pub fn accuracy(logits: ArrayView2<'_, f32>, labels: &[u32]) -> f64 {
    if logits.nrows() != labels.len() || labels.is_empty() {
        return f64::NAN;
    }
    let correct = logits
        .rows()
        .into_iter()
        .zip(labels)
        .filter(|(row, &label)| argmax(row.iter().copied()) == Some(label as usize))
        .count();
    correct as f64 / labels.len() as f64
}

/// Index of the first maximum; `None` for an empty or all-NaN row.
fn argmax(values: impl Iterator<Item = f32>) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, v) in values.enumerate() {
        // Strictly greater: an equal later value does not replace the first one.
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// R² on `(x_eval, y_eval)` of the least-squares fit with an intercept on
/// `(x_train, y_train)`: the best any linear model can do on this split.
///
/// Features and targets are centred on the training means first (the intercept then drops out
/// of the system and the normal equations are far better conditioned), the normal equations
/// `XᵀX w = Xᵀy` are built in `f64` with a tiny ridge on the diagonal and solved by Gaussian
/// elimination with partial pivoting. Returns `None` if shapes disagree, a set is empty, or
/// the system cannot be solved to finite coefficients.
pub fn least_squares_r2(
    x_train: ArrayView2<'_, f32>,
    y_train: &[f32],
    x_eval: ArrayView2<'_, f32>,
    y_eval: &[f32],
) -> Option<f64> {
    let (n, d) = x_train.dim();
    if n == 0 || y_train.len() != n || x_eval.ncols() != d || x_eval.nrows() != y_eval.len() {
        return None;
    }
    if y_eval.is_empty() {
        return None;
    }
    let x_mean: Vec<f64> =
        x_train.columns().into_iter().map(|col| col.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64).collect();
    let y_mean = y_train.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;

    // Augmented matrix [XᵀX + λI | Xᵀy], row-major, d × (d + 1).
    let width = d + 1;
    let mut system = vec![0.0f64; d * width];
    let mut centred = vec![0.0f64; d];
    for (row, &target) in x_train.rows().into_iter().zip(y_train) {
        for ((c, &v), &m) in centred.iter_mut().zip(row).zip(&x_mean) {
            *c = f64::from(v) - m;
        }
        let t = f64::from(target) - y_mean;
        for (i, &ci) in centred.iter().enumerate() {
            let line = &mut system[i * width..(i + 1) * width];
            for (cell, &cj) in line.iter_mut().zip(&centred) {
                *cell += ci * cj;
            }
            line[d] += ci * t;
        }
    }
    for i in 0..d {
        system[i * width + i] += RIDGE;
    }
    let w = solve(&mut system, d)?;
    let intercept = y_mean - w.iter().zip(&x_mean).map(|(wi, mi)| wi * mi).sum::<f64>();
    let pred = x_eval
        .rows()
        .into_iter()
        .map(|row| intercept + row.iter().zip(&w).map(|(&v, wi)| f64::from(v) * wi).sum::<f64>());
    Some(r2_f64(pred, y_eval))
}

/// Solves the `d × d` system held in the augmented row-major matrix `a` (`d × (d + 1)`) by
/// Gaussian elimination with partial pivoting. `None` if a pivot is zero or not finite, or a
/// coefficient comes out non-finite.
fn solve(a: &mut [f64], d: usize) -> Option<Vec<f64>> {
    let width = d + 1;
    for col in 0..d {
        // Partial pivoting: the largest remaining entry of this column keeps the multipliers
        // at most 1 in magnitude, which bounds the growth of rounding errors.
        let pivot_row =
            (col..d).max_by(|&r, &s| a[r * width + col].abs().total_cmp(&a[s * width + col].abs()).then(s.cmp(&r)))?;
        let pivot = a[pivot_row * width + col];
        if !(pivot.is_finite() && pivot != 0.0) {
            return None;
        }
        if pivot_row != col {
            for k in 0..width {
                a.swap(col * width + k, pivot_row * width + k);
            }
        }
        for row in col + 1..d {
            let factor = a[row * width + col] / pivot;
            if factor != 0.0 {
                for k in col..width {
                    a[row * width + k] -= factor * a[col * width + k];
                }
            }
        }
    }
    let mut w = vec![0.0f64; d];
    for row in (0..d).rev() {
        let tail: f64 = (row + 1..d).map(|k| a[row * width + k] * w[k]).sum();
        w[row] = (a[row * width + d] - tail) / a[row * width + row];
    }
    w.iter().all(|v| v.is_finite()).then_some(w)
}

#[cfg(test)]
mod tests {
    use ndarray::{array, Array2};

    use super::super::test_util::{random_matrix, random_vec};
    use super::*;

    #[test]
    fn r2_of_perfect_prediction_is_one_and_of_the_mean_is_zero() {
        let y = [1.0f32, 2.0, 4.0, 7.0];
        assert_eq!(r2(&y, &y), 1.0);
        assert_eq!(r2(&[3.5; 4], &y), 0.0);
        assert!(r2(&[7.0, 4.0, 2.0, 1.0], &y) < 0.0);
    }

    #[test]
    fn r2_with_constant_targets_is_one_if_perfect_else_zero() {
        assert_eq!(r2(&[2.0, 2.0], &[2.0, 2.0]), 1.0);
        assert_eq!(r2(&[2.0, 2.5], &[2.0, 2.0]), 0.0);
    }

    #[test]
    fn metrics_of_mismatched_or_empty_inputs_are_nan() {
        assert!(r2(&[1.0], &[1.0, 2.0]).is_nan());
        assert!(r2(&[], &[]).is_nan());
        assert!(mse(&[1.0], &[]).is_nan());
        assert!(accuracy(Array2::<f32>::zeros((2, 3)).view(), &[0]).is_nan());
        assert!(accuracy(Array2::<f32>::zeros((0, 3)).view(), &[]).is_nan());
    }

    #[test]
    fn mse_known_value() {
        assert_eq!(mse(&[1.0, 2.0, 3.0], &[1.0, 0.0, 6.0]), 13.0 / 3.0);
    }

    #[test]
    fn accuracy_breaks_ties_toward_lowest_index_and_ignores_nan() {
        let logits = array![
            [1.0f32, 1.0, 0.0], // tie → 0
            [0.0, 2.0, 2.0],    // tie → 1
            [f32::NAN, 0.5, 0.1],
            [0.0, 0.0, 3.0],
        ];
        assert_eq!(accuracy(logits.view(), &[0, 1, 1, 2]), 1.0);
        assert_eq!(accuracy(logits.view(), &[1, 2, 0, 9]), 0.0);
    }

    #[test]
    fn least_squares_r2_recovers_an_exact_linear_relation() {
        let x = random_matrix(1, 50, 3, -1.0, 1.0);
        let y: Vec<f32> = x.rows().into_iter().map(|r| 2.0 * r[0] - 0.5 * r[1] + 0.25 * r[2] + 3.0).collect();
        let r2 = least_squares_r2(x.view(), &y, x.view(), &y).expect("well posed");
        assert!((r2 - 1.0).abs() < 1e-6, "{r2}");
        // Held out: a fresh sample from the same relation.
        let x_eval = random_matrix(2, 20, 3, -1.0, 1.0);
        let y_eval: Vec<f32> = x_eval.rows().into_iter().map(|r| 2.0 * r[0] - 0.5 * r[1] + 0.25 * r[2] + 3.0).collect();
        let held_out = least_squares_r2(x.view(), &y, x_eval.view(), &y_eval).expect("well posed");
        assert!((held_out - 1.0).abs() < 1e-6, "{held_out}");
    }

    #[test]
    fn least_squares_r2_matches_one_feature_closed_form() {
        // With one feature the fit is slope = cov(x, y) / var(x).
        let x = array![[0.0f32], [1.0], [2.0], [3.0]];
        let y = [1.0f32, 3.0, 2.0, 5.0];
        // slope 1.1, intercept 1.1: predictions 1.1, 2.2, 3.3, 4.4; SS_res 2.7, SS_tot 8.75.
        let r2 = least_squares_r2(x.view(), &y, x.view(), &y).expect("well posed");
        assert!((r2 - (1.0 - 2.7 / 8.75)).abs() < 1e-9, "{r2}");
    }

    #[test]
    fn least_squares_r2_survives_a_constant_feature_and_rejects_bad_shapes() {
        let mut x = random_matrix(3, 30, 2, -1.0, 1.0);
        x.column_mut(1).fill(4.0);
        let noise = random_vec(4, 30, -0.1, 0.1);
        let y: Vec<f32> = (0..30).map(|i| x[[i, 0]] + noise[i]).collect();
        let r2 = least_squares_r2(x.view(), &y, x.view(), &y).expect("ridge keeps it solvable");
        assert!(r2 > 0.95, "{r2}");

        assert_eq!(least_squares_r2(x.view(), &y[..29], x.view(), &y), None);
        let narrow = Array2::<f32>::zeros((30, 1));
        assert_eq!(least_squares_r2(x.view(), &y, narrow.view(), &y), None);
        let empty = Array2::<f32>::zeros((0, 2));
        assert_eq!(least_squares_r2(empty.view(), &[], x.view(), &y), None);
        assert_eq!(least_squares_r2(x.view(), &y, empty.view(), &[]), None);
    }

    #[test]
    fn least_squares_r2_of_non_finite_data_is_none() {
        let mut x = random_matrix(5, 10, 2, -1.0, 1.0);
        x[[3, 1]] = f32::NAN;
        let y = random_vec(6, 10, -1.0, 1.0);
        assert_eq!(least_squares_r2(x.view(), &y, x.view(), &y), None);
    }
}
