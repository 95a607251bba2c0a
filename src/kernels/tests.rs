//! Across the kernels: the f32 math functions against f64, and second derivatives through
//! every fused op (their recorded backward ops) against the primitive forms.

use candle_core::{DType, Device, Tensor, Var};

use super::check::{attention_reference, gelu_from_erf, randn, rel_err};
use super::cpu::{exp_nonpositive_f32, Float};
use super::primitive;
use super::second_order::with_second_order;

#[test]
fn f32_exp_and_normal_functions_are_within_rounding_of_f64() {
    // e^y on [-87, 0]: relative error a few f32 ulps.
    let mut worst = 0.0f64;
    for i in 0..=870_000 {
        let y = -(i as f64) * 1e-4;
        let got = exp_nonpositive_f32(y as f32) as f64;
        let want = (y as f32 as f64).exp();
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 3e-7, "exp: relative error {worst:e}");
    // GELU and its derivative on [-12, 12] against the erf formula in f64 (libm): within
    // A&S 7.1.26's 1.5e-7 on Φ, scaled by |x|, plus f32 rounding (measured: 1.8e-7 and
    // 2.9e-7, 2.5 ulps of 1).
    let (mut wg, mut wd) = (0.0f64, 0.0f64);
    for i in -240_000..=240_000 {
        let x = (i as f64 * 5e-5) as f32;
        let xd = x as f64;
        let scale = xd.abs().max(1.0);
        wg = wg.max((x.gelu() as f64 - xd.gelu()).abs() / scale);
        wd = wd.max((x.gelu_grad() as f64 - xd.gelu_grad()).abs() / scale);
    }
    assert!(wg < 4e-7 && wd < 4e-7, "gelu {wg:e}, gelu' {wd:e}");
    // Tails: exactly 0 and x far out, and NaN stays NaN (the training guard needs it).
    assert_eq!((-30.0f32).gelu(), 0.0);
    assert_eq!((-30.0f32).gelu_grad(), 0.0);
    assert_eq!(30.0f32.gelu(), 30.0);
    assert_eq!(30.0f32.gelu_grad(), 1.0);
    assert!(f32::NAN.gelu().is_nan() && f32::NAN.gelu_grad().is_nan());
}

/// x w + b, w and b broadcast along the last dimension.
fn affine(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_mul(w)?.broadcast_add(b)
}

/// H v of L = Σ r ⊙ y ⊙ y, y = op(x, w, b), with respect to (x, w, b), by double backward
/// on the second-order thread, through `op`'s form there and through `reference`.
fn hvp_through(
    op: fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
    (x_dims, w_dims, y_dims): (&'static [usize], &'static [usize], &'static [usize]),
) -> [Tensor; 3] {
    with_second_order(move || {
        let x = Var::from_tensor(&randn(x_dims, 70, DType::F64))?;
        let w = Var::from_tensor(&randn(w_dims, 71, DType::F64))?;
        let b = Var::from_tensor(&randn(&w_dims[..1], 72, DType::F64))?;
        let r = randn(y_dims, 73, DType::F64);
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let y = op(xt, wt, bt)?;
        let g = (&y * &y)?.mul(&r)?.sum_all()?.backward()?;
        let mut gv = Tensor::new(0.0f64, &Device::Cpu)?;
        for (i, t) in [xt, wt, bt].into_iter().enumerate() {
            let v = randn(t.dims(), 80 + i as u64, DType::F64);
            gv = (gv + (g.get(t).unwrap() * v)?.sum_all()?)?;
        }
        let h = gv.backward()?;
        Ok([xt, wt, bt].map(|t| h.get(t).unwrap().clone()))
    })
    .unwrap()
}

#[test]
fn second_derivatives_through_the_fused_ops_match_the_primitive_forms() {
    // On the second-order thread ops::linear and ops::layer_norm are the fused ops with
    // backward passes built from candle's ops; ops::softmax_last_dim, ops::gelu and the
    // attention core the fused ops with recorded backward ops; the primitive forms are the
    // reference. The ops of one input take x w + b (elementwise) so that all three inputs
    // are reached.
    type Op = fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;
    let cases: [(&str, Op, Op, _); 6] = [
        (
            "linear",
            |x, w, b| super::linear(x, w, b, None),
            |x, w, b| primitive::linear(x, w, b, None),
            (&[2usize, 5, 4][..], &[3usize, 4][..], &[2usize, 5, 3][..]),
        ),
        (
            "layer norm",
            |x, w, b| super::layer_norm(x, w, b, 1e-6),
            |x, w, b| primitive::layer_norm(x, w, b, 1e-6),
            (&[2, 5, 6][..], &[6][..], &[2, 5, 6][..]),
        ),
        (
            "softmax",
            |x, w, b| super::softmax_last_dim(&affine(x, w, b)?),
            |x, w, b| primitive::softmax_last_dim(&affine(x, w, b)?),
            (&[2, 5, 6][..], &[6][..], &[2, 5, 6][..]),
        ),
        (
            "GELU",
            |x, w, b| super::gelu(&affine(x, w, b)?),
            |x, w, b| gelu_from_erf(&affine(x, w, b)?),
            (&[3, 7][..], &[7][..], &[3, 7][..]),
        ),
        (
            "self-attention",
            |x, w, b| super::attention(&affine(x, w, b)?, 2, 5, 3f64.powf(-0.5), None),
            |x, w, b| attention_reference(&affine(x, w, b)?, 2, 5),
            (&[2, 5, 18][..], &[18][..], &[2, 5, 6][..]),
        ),
        (
            "attention of the last 4 of 12 tokens",
            |x, w, b| super::attention(&affine(x, w, b)?, 2, 4, 8f64.powf(-0.5), None),
            |x, w, b| attention_reference(&affine(x, w, b)?, 2, 4),
            (&[2, 12, 48][..], &[48][..], &[2, 4, 16][..]),
        ),
    ];
    for (name, op, reference, dims) in cases {
        let (a, b) = (hvp_through(op, dims), hvp_through(reference, dims));
        for (what, (a, b)) in ["x", "w", "b"].iter().zip(a.iter().zip(&b)) {
            let e = rel_err(a, b);
            assert!(e < 1e-11, "{name}: (H v)_{what} off by {e:e}");
        }
    }
}
