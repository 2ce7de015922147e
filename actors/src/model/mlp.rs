//! Multi-layer perceptron with one hidden ReLU layer:
//! `h = relu(x·W1 + b1)`, `out = h·W2 + b2`, then the regression or classification head.
//!
//! Flat layout: `w1` `[inputs × hidden]`, `b1` `[hidden]`, `w2` `[hidden × outputs]`,
//! `b2` `[outputs]`, all row-major.

use ndarray::{Array2, ArrayView2, Zip};

use super::{
    affine, affine_backward, apply_head, check_batch, check_grad, check_params, check_x, grad_matrix, matmul_into,
    param_matrix, Init, Model, ModelError, ModelSpec, ParamLayout, Targets, TensorInfo,
};

/// The parameter tensors of one call, borrowed from the flat vector.
struct Params<'a> {
    w1: ArrayView2<'a, f32>,
    b1: &'a [f32],
    w2: ArrayView2<'a, f32>,
    b2: &'a [f32],
}

/// One-hidden-layer ReLU network with either head.
#[derive(Clone, Debug)]
pub(crate) struct Mlp {
    spec: ModelSpec,
    layout: ParamLayout,
    /// Lengths of `w1`, `b1`, `w2` (where each next tensor starts).
    lens: [usize; 3],
}

impl Mlp {
    /// Lays out the parameters; the spec's rules are checked by [`super::build`].
    pub(crate) fn new(spec: ModelSpec) -> Result<Self, ModelError> {
        let ModelSpec { inputs, outputs, hidden, .. } = spec;
        let mut layout = ParamLayout::new(spec.kind);
        let w1 = layout.push("w1", &[inputs, hidden], Init::he(inputs))?;
        let b1 = layout.push("b1", &[hidden], Init::Zeros)?;
        let w2 = layout.push("w2", &[hidden, outputs], Init::xavier(hidden, outputs))?;
        layout.push("b2", &[outputs], Init::Zeros)?;
        Ok(Mlp { spec, layout, lens: [w1.len(), b1.len(), w2.len()] })
    }

    /// Checks the length of `params` and splits it into the four tensors.
    fn split<'a>(&self, params: &'a [f32]) -> Result<Params<'a>, ModelError> {
        check_params(self.layout.total, params)?;
        let ModelSpec { inputs, outputs, hidden, .. } = self.spec;
        let (w1, rest) = params.split_at(self.lens[0]);
        let (b1, rest) = rest.split_at(self.lens[1]);
        let (w2, b2) = rest.split_at(self.lens[2]);
        Ok(Params { w1: param_matrix(w1, inputs, hidden)?, b1, w2: param_matrix(w2, hidden, outputs)?, b2 })
    }

    /// Forward pass: the hidden activations `relu(x·W1 + b1)` and the raw outputs.
    fn forward(p: &Params<'_>, x: ArrayView2<'_, f32>) -> (Array2<f32>, Array2<f32>) {
        let mut hidden = affine(x, p.w1, p.b1);
        // `z <= 0` rather than `max(z, 0)`: a NaN stays NaN and shows up in the loss instead
        // of being silently clamped to 0.
        hidden.mapv_inplace(|z| if z <= 0.0 { 0.0 } else { z });
        let out = affine(hidden.view(), p.w2, p.b2);
        (hidden, out)
    }
}

impl Model for Mlp {
    layout_accessors!();

    fn loss_grad(
        &self,
        params: &[f32],
        x: ArrayView2<'_, f32>,
        y: Targets<'_>,
        grad: &mut [f32],
    ) -> Result<f64, ModelError> {
        let p = self.split(params)?;
        check_grad(self.layout.total, grad)?;
        let y = check_batch(&self.spec, x, y)?;
        let ModelSpec { inputs, outputs, hidden: width, .. } = self.spec;

        let (hidden, mut out) = Self::forward(&p, x);
        let loss = apply_head(&mut out, y, true);
        // `out` now holds ∂loss/∂out.
        let (gw1, rest) = grad.split_at_mut(self.lens[0]);
        let (gb1, rest) = rest.split_at_mut(self.lens[1]);
        let (gw2, gb2) = rest.split_at_mut(self.lens[2]);
        affine_backward(hidden.view(), out.view(), grad_matrix(gw2, width, outputs)?, gb2);

        // ∂h = ∂out·W2ᵀ, then through the ReLU: only units that were active pass gradient.
        // (At z == 0 exactly we take the subgradient 0.)
        let mut d_hidden = Array2::<f32>::zeros((x.nrows(), width));
        matmul_into(&out.view(), &p.w2.t(), 0.0, &mut d_hidden.view_mut());
        // A select, not a branch: whether a unit is active is a coin toss per element, and a
        // mispredicted branch per element cost more than every matrix product of the step.
        // Same bits as `if h <= 0.0 { *d = 0.0 }` for every input (a NaN `h` keeps `d`).
        Zip::from(&mut d_hidden).and(&hidden).for_each(|d, &h| *d = if h <= 0.0 { 0.0 } else { *d });
        affine_backward(x, d_hidden.view(), grad_matrix(gw1, inputs, width)?, gb1);
        Ok(loss)
    }

    fn loss(&self, params: &[f32], x: ArrayView2<'_, f32>, y: Targets<'_>) -> Result<f64, ModelError> {
        let p = self.split(params)?;
        let y = check_batch(&self.spec, x, y)?;
        let (_, mut out) = Self::forward(&p, x);
        Ok(apply_head(&mut out, y, false))
    }

    fn predict(&self, params: &[f32], x: ArrayView2<'_, f32>) -> Result<Array2<f32>, ModelError> {
        let p = self.split(params)?;
        check_x(&self.spec, x)?;
        Ok(Self::forward(&p, x).1)
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, ArrayView2};

    use super::super::test_util::{assert_gradient_matches, random_labels, random_matrix, random_vec, train_adam};
    use super::super::{build, metrics, Head, Model, ModelKind, ModelSpec, Targets};
    use super::Mlp;

    fn mlp_spec(inputs: usize, outputs: usize, hidden: usize, head: Head) -> ModelSpec {
        ModelSpec { kind: ModelKind::Mlp, inputs, outputs, hidden, head }
    }

    /// Smallest `|x·W1 + b1|` over the batch: how far the batch is from a ReLU kink.
    fn kink_margin(model: &Mlp, params: &[f32], x: ArrayView2<'_, f32>) -> f32 {
        let p = model.split(params).expect("valid params");
        let pre = x.dot(&p.w1) + ndarray::ArrayView1::from(p.b1);
        pre.iter().fold(f32::INFINITY, |m, z| m.min(z.abs()))
    }

    /// Random parameters whose pre-activations all stay at least `margin` away from 0, so a
    /// finite-difference probe never steps across a ReLU kink (where the loss has no
    /// derivative and the numeric estimate would be meaningless). Seeds are tried in order,
    /// so the choice is deterministic.
    fn params_away_from_kinks(model: &Mlp, x: ArrayView2<'_, f32>, margin: f32) -> Vec<f32> {
        (0..1000)
            .map(|seed| random_vec(seed, model.num_params(), -1.0, 1.0))
            .find(|params| kink_margin(model, params, x) >= margin)
            .expect("some seed keeps every unit away from its kink")
    }

    fn check_head(head: Head, outputs: usize) {
        let spec = mlp_spec(3, outputs, 5, head);
        let model = Mlp::new(spec).expect("valid spec");
        let x = random_matrix(2, 6, 3, -1.0, 1.0);
        // A probe moves a pre-activation by at most step · max|x| = 0.01; keep 5× that away.
        let step = 1e-2;
        let params = params_away_from_kinks(&model, x.view(), 0.05);
        let real = random_vec(3, 6, -2.0, 2.0);
        let labels = random_labels(4, 6, outputs as u32);
        let y = match head {
            Head::Regression => Targets::Real(&real),
            Head::Classification => Targets::Class(&labels),
        };
        assert_gradient_matches(&model, &params, x.view(), y, step);
    }

    #[test]
    fn mlp_regression_gradient_matches_finite_differences_away_from_relu_kinks() {
        check_head(Head::Regression, 1);
    }

    #[test]
    fn mlp_classification_gradient_matches_finite_differences_away_from_relu_kinks() {
        check_head(Head::Classification, 4);
    }

    #[test]
    fn mlp_dead_units_get_zero_gradient() {
        // b1 hugely negative: every hidden unit is off, so W1 and b1 get no gradient.
        let model = Mlp::new(mlp_spec(2, 1, 3, Head::Regression)).expect("valid spec");
        let mut params = model.init_params(9);
        let [w1_len, b1_len, _] = model.lens;
        params[w1_len..w1_len + b1_len].fill(-100.0);
        let x = random_matrix(1, 5, 2, -1.0, 1.0);
        let y = [1.0f32; 5];
        let mut grad = vec![f32::NAN; model.num_params()];
        model.loss_grad(&params, x.view(), Targets::Real(&y), &mut grad).expect("valid");
        assert!(grad[..w1_len + b1_len].iter().all(|&g| g == 0.0));
        // The output bias still learns: ∂b2 = Σ (b2 − y) = −5.
        assert_eq!(grad[grad.len() - 1], -5.0);
    }

    #[test]
    fn mlp_adam_learns_xor() {
        let model = build(&mlp_spec(2, 2, 16, Head::Classification)).expect("valid spec");
        let n = 80;
        // Points away from the axes, labelled by the sign of x0·x1: not linearly separable.
        let raw = random_matrix(5, n, 2, 0.2, 1.0);
        let signs = random_labels(6, n * 2, 2);
        let x = Array2::from_shape_fn((n, 2), |(i, j)| if signs[2 * i + j] == 1 { -raw[[i, j]] } else { raw[[i, j]] });
        let labels: Vec<u32> = x.rows().into_iter().map(|r| u32::from(r[0] * r[1] > 0.0)).collect();
        let (params, loss) = train_adam(model.as_ref(), x.view(), Targets::Class(&labels), 400, 0.03);
        let logits = model.predict(&params, x.view()).expect("valid");
        let accuracy = metrics::accuracy(logits.view(), &labels);
        assert!(accuracy >= 0.95, "accuracy {accuracy}, mean loss {loss}");
        assert!(loss < 0.2, "mean loss {loss}");
    }

    #[test]
    fn mlp_adam_fits_a_nonlinear_regression() {
        let model = build(&mlp_spec(2, 1, 16, Head::Regression)).expect("valid spec");
        let n = 100;
        let x = random_matrix(7, n, 2, -1.0, 1.0);
        let y: Vec<f32> = x.rows().into_iter().map(|r| r[0].abs() + 0.5 * r[1]).collect();
        let initial = model.loss(&model.init_params(1), x.view(), Targets::Real(&y)).expect("valid") / n as f64;
        let (params, loss) = train_adam(model.as_ref(), x.view(), Targets::Real(&y), 500, 0.02);
        assert!(loss < 0.01 && loss < initial / 10.0, "mean loss {loss}, initial {initial}");
        let pred = model.predict(&params, x.view()).expect("valid");
        let r2 = metrics::r2(pred.as_slice().expect("standard layout"), &y);
        // A linear fit cannot bend around |x0|; the MLP must beat it clearly.
        let linear = metrics::least_squares_r2(x.view(), &y, x.view(), &y).expect("well posed");
        assert!(r2 > 0.95 && r2 > linear + 0.1, "mlp {r2}, linear {linear}");
    }
}
