//! Linear regression: `pred = x·w + b`, loss `½(pred − y)²` per sample.
//!
//! Flat layout: `weight` `[inputs]`, then `bias` `[1]`.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, Axis};

use super::{
    check_grad, check_params, check_real, check_x, mse_head, Init, Model, ModelError, ModelSpec, ParamLayout, Targets,
    TensorInfo,
};

/// Linear regression over [`ModelSpec::inputs`] features.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    spec: ModelSpec,
    layout: ParamLayout,
}

impl Linear {
    /// Lays out the parameters; the spec's rules are checked by [`super::build`].
    pub(crate) fn new(spec: ModelSpec) -> Result<Self, ModelError> {
        let mut layout = ParamLayout::new(spec.kind);
        layout.push("weight", &[spec.inputs], Init::xavier(spec.inputs, 1))?;
        layout.push("bias", &[1], Init::Zeros)?;
        Ok(Linear { spec, layout })
    }

    /// Checks the length of `params` and splits it into `w` and `b`.
    fn split<'a>(&self, params: &'a [f32]) -> Result<(ArrayView1<'a, f32>, f32), ModelError> {
        check_params(self.layout.total, params)?;
        let (w, b) = params.split_at(self.spec.inputs);
        Ok((ArrayView1::from(w), b[0]))
    }

    /// `x·w + b`, one allocation per batch.
    fn forward(w: ArrayView1<'_, f32>, b: f32, x: ArrayView2<'_, f32>) -> Array1<f32> {
        let mut pred = x.dot(&w);
        pred.mapv_inplace(|p| p + b);
        pred
    }
}

impl Model for Linear {
    layout_accessors!();

    fn loss_grad(
        &self,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        y: Targets<'_>,
        grad: &mut [f32],
    ) -> Result<f64, ModelError> {
        let (w, b) = self.split(params)?;
        check_grad(self.layout.total, grad)?;
        let y = check_real(&self.spec, x, y)?;
        let mut pred = Self::forward(w, b, x);
        let loss = mse_head(pred.view_mut(), y, true);
        // `pred` now holds the residuals r. ∂w = xᵀ·r, accumulated row by row: this streams x
        // in memory order (a column-wise dot would stride through it) with a fixed order.
        let (gw, gb) = grad.split_at_mut(self.spec.inputs);
        gw.fill(0.0);
        let mut gw = ArrayViewMut1::from(gw);
        let mut sum = 0.0f32;
        for (row, &r) in x.axis_iter(Axis(0)).zip(pred.iter()) {
            gw.scaled_add(r, &row);
            sum += r;
        }
        gb[0] = sum;
        Ok(loss)
    }

    fn loss(&self, params: &[f32], x: ArrayView2<'_, f32>, y: Targets<'_>) -> Result<f64, ModelError> {
        let (w, b) = self.split(params)?;
        let y = check_real(&self.spec, x, y)?;
        let mut pred = Self::forward(w, b, x);
        Ok(mse_head(pred.view_mut(), y, false))
    }

    fn predict(&self, params: &[f32], x: ArrayView2<'_, f32>) -> Result<Array2<f32>, ModelError> {
        let (w, b) = self.split(params)?;
        check_x(&self.spec, x)?;
        Ok(Self::forward(w, b, x).insert_axis(Axis(1)))
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::super::test_util::{assert_gradient_matches, random_matrix, random_vec, train_adam};
    use super::super::{build, metrics, Head, ModelKind, ModelSpec, Targets};

    fn linear_spec(inputs: usize) -> ModelSpec {
        ModelSpec { kind: ModelKind::Linear, inputs, outputs: 1, hidden: 0, head: Head::Regression }
    }

    #[test]
    fn linear_gradient_matches_finite_differences() {
        let model = build(&linear_spec(4)).expect("valid spec");
        let params = random_vec(1, model.num_params(), -1.0, 1.0);
        let x = random_matrix(2, 7, 4, -1.0, 1.0);
        let y = random_vec(3, 7, -2.0, 2.0);
        assert_gradient_matches(model.as_ref(), &params, x.view(), Targets::Real(&y), 1e-2);
    }

    #[test]
    fn linear_loss_and_prediction_known_values() {
        let model = build(&linear_spec(2)).expect("valid spec");
        let params = [2.0f32, -1.0, 0.5];
        let x = ndarray::array![[1.0f32, 1.0], [0.0, 2.0]];
        let pred = model.predict(&params, x.view()).expect("valid");
        assert_eq!(pred, ndarray::array![[1.5f32], [-1.5]]);
        let y = [1.0f32, 0.5];
        let mut grad = [0.0f32; 3];
        let loss = model.loss_grad(&params, x.view(), Targets::Real(&y), &mut grad).expect("valid");
        // residuals 0.5, -2.0: loss ½(0.25 + 4), ∂w = [0.5, 0.5 − 4], ∂b = −1.5.
        assert_eq!(loss, 2.125);
        assert_eq!(grad, [0.5, -3.5, -1.5]);
    }

    #[test]
    fn linear_adam_reaches_least_squares_r2() {
        let model = build(&linear_spec(3)).expect("valid spec");
        let n = 200;
        let x = random_matrix(4, n, 3, -1.0, 1.0);
        let noise = random_vec(5, n, -0.5, 0.5);
        let w = [1.5f32, -2.0, 0.5];
        let y: Vec<f32> =
            (0..n).map(|i| x[[i, 0]] * w[0] + x[[i, 1]] * w[1] + x[[i, 2]] * w[2] + 0.3 + noise[i]).collect();
        let (params, loss) = train_adam(model.as_ref(), x.view(), Targets::Real(&y), 400, 0.05);
        // The noise alone has mean ½·E[u²] = 1/24 ≈ 0.042.
        assert!(loss < 0.05, "mean loss {loss}");
        let pred = model.predict(&params, x.view()).expect("valid");
        let r2 = metrics::r2(pred.as_slice().expect("standard layout"), &y);
        let best = metrics::least_squares_r2(x.view(), &y, x.view(), &y).expect("well posed");
        assert!((best - r2).abs() < 0.02, "trained {r2}, least squares {best}");
    }

    #[test]
    fn linear_exact_relation_reaches_tiny_loss() {
        let model = build(&linear_spec(2)).expect("valid spec");
        let x = random_matrix(6, 64, 2, -1.0, 1.0);
        let y: Vec<f32> = x.rows().into_iter().map(|r| 0.7 * r[0] - 1.2 * r[1] + 0.1).collect();
        let (_, loss) = train_adam(model.as_ref(), x.view(), Targets::Real(&y), 600, 0.02);
        assert!(loss < 1e-4, "mean loss {loss}");
    }

    #[test]
    fn linear_predict_shape_is_rows_by_one() {
        let model = build(&linear_spec(5)).expect("valid spec");
        let params = model.init_params(3);
        let x = Array2::<f32>::ones((7, 5));
        assert_eq!(model.predict(&params, x.view()).expect("valid").dim(), (7, 1));
    }
}
