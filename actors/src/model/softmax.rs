//! Softmax (multinomial logistic) regression: `logits = x·W + b`, softmax cross-entropy.
//!
//! Flat layout: `weight` `[inputs × classes]` row-major, then `bias` `[classes]`.

use ndarray::{Array2, ArrayView2};

use super::{
    affine, affine_backward, check_class, check_grad, check_params, check_x, param_matrix, softmax_ce_head, Init,
    Model, ModelError, ModelSpec, ParamLayout, Targets, TensorInfo,
};

/// Softmax regression over [`ModelSpec::inputs`] features and [`ModelSpec::outputs`] classes.
#[derive(Clone, Debug)]
pub(crate) struct Softmax {
    spec: ModelSpec,
    layout: ParamLayout,
    /// Length of `weight`, where `bias` starts.
    weight_len: usize,
}

impl Softmax {
    /// Lays out the parameters; the spec's rules are checked by [`super::build`].
    pub(crate) fn new(spec: ModelSpec) -> Result<Self, ModelError> {
        let mut layout = ParamLayout::new(spec.kind);
        let weight = layout.push("weight", &[spec.inputs, spec.outputs], Init::xavier(spec.inputs, spec.outputs))?;
        layout.push("bias", &[spec.outputs], Init::Zeros)?;
        Ok(Softmax { spec, layout, weight_len: weight.len() })
    }

    /// Checks the length of `params` and splits it into `W` and `b`.
    fn split<'a>(&self, params: &'a [f32]) -> Result<(ArrayView2<'a, f32>, &'a [f32]), ModelError> {
        check_params(self.layout.total, params)?;
        let (w, b) = params.split_at(self.weight_len);
        Ok((param_matrix(w, self.spec.inputs, self.spec.outputs)?, b))
    }
}

impl Model for Softmax {
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
        let labels = check_class(&self.spec, x, y)?;
        let mut logits = affine(x, w, b);
        let loss = softmax_ce_head(logits.view_mut(), labels, true);
        let (gw, gb) = grad.split_at_mut(self.weight_len);
        affine_backward(x, logits.view(), gw, gb);
        Ok(loss)
    }

    fn loss(&self, params: &[f32], x: ArrayView2<'_, f32>, y: Targets<'_>) -> Result<f64, ModelError> {
        let (w, b) = self.split(params)?;
        let labels = check_class(&self.spec, x, y)?;
        let mut logits = affine(x, w, b);
        Ok(softmax_ce_head(logits.view_mut(), labels, false))
    }

    fn predict(&self, params: &[f32], x: ArrayView2<'_, f32>) -> Result<Array2<f32>, ModelError> {
        let (w, b) = self.split(params)?;
        check_x(&self.spec, x)?;
        Ok(affine(x, w, b))
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array2;

    use super::super::test_util::{assert_gradient_matches, random_labels, random_matrix, random_vec, train_adam};
    use super::super::{build, metrics, Head, ModelKind, ModelSpec, Targets};

    fn softmax_spec(inputs: usize, classes: usize) -> ModelSpec {
        ModelSpec { kind: ModelKind::Softmax, inputs, outputs: classes, hidden: 0, head: Head::Classification }
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        let model = build(&softmax_spec(3, 4)).expect("valid spec");
        let params = random_vec(1, model.num_params(), -1.0, 1.0);
        let x = random_matrix(2, 8, 3, -1.5, 1.5);
        let labels = random_labels(3, 8, 4);
        assert_gradient_matches(model.as_ref(), &params, x.view(), Targets::Class(&labels), 1e-2);
    }

    #[test]
    fn softmax_uniform_logits_give_ln_classes_per_sample() {
        let model = build(&softmax_spec(2, 5)).expect("valid spec");
        let params = vec![0.0f32; model.num_params()];
        let x = random_matrix(4, 6, 2, -1.0, 1.0);
        let labels = [0u32, 1, 2, 3, 4, 0];
        let loss = model.loss(&params, x.view(), Targets::Class(&labels)).expect("valid");
        assert!((loss - 6.0 * 5f64.ln()).abs() < 1e-5, "{loss}");
        let logits = model.predict(&params, x.view()).expect("valid");
        assert_eq!(logits.dim(), (6, 5));
    }

    #[test]
    fn softmax_adam_separates_blobs() {
        let model = build(&softmax_spec(2, 3)).expect("valid spec");
        let centres = [[2.0f32, 0.0], [-1.0, 1.7], [-1.0, -1.7]];
        let n = 90;
        let jitter = random_matrix(5, n, 2, -0.6, 0.6);
        let labels: Vec<u32> = (0..n).map(|i| (i % 3) as u32).collect();
        let x = Array2::from_shape_fn((n, 2), |(i, j)| centres[i % 3][j] + jitter[[i, j]]);
        let (params, loss) = train_adam(model.as_ref(), x.view(), Targets::Class(&labels), 300, 0.05);
        assert!(loss < 0.1, "mean loss {loss}");
        let logits = model.predict(&params, x.view()).expect("valid");
        assert_eq!(metrics::accuracy(logits.view(), &labels), 1.0);
    }
}
