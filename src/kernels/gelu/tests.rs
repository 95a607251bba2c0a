//! The fused GELU against the erf formula, its second derivative on a second-order thread,
//! and the f32 second derivative against the f64 one.

use candle_core::{Device, Tensor, Var};

use super::gelu_erf;
use crate::kernels::check::assert_matches_reference;
use crate::kernels::cpu::Float;
use crate::kernels::second_order::with_second_order;

#[test]
fn gelu_and_its_gradient_match_the_erf_formula() {
    // The reference is 0.5 x (1 + erf(x / sqrt 2)) from primitive ops, not candle's
    // gelu_erf, whose backward has 6-digit constants.
    assert_matches_reference(
        "gelu",
        |x, _, _| gelu_erf(x),
        |x, _, _| {
            let e = (x / std::f64::consts::SQRT_2)?.erf()?;
            (x * 0.5)? * (e + 1.0)?
        },
    );
    let x = Tensor::new(&[0.0f64, 1.0, -2.0], &Device::Cpu).unwrap();
    let y = gelu_erf(&x).unwrap().to_vec1::<f64>().unwrap();
    // Φ(1) = 0.841344746068543, Φ(-2) = 0.0227501319481792 (tables).
    assert_eq!(y[0], 0.0);
    assert!((y[1] - 0.841344746068543).abs() < 1e-15);
    assert!((y[2] + 2.0 * 0.0227501319481792).abs() < 1e-15);
}

#[test]
fn gelu_second_derivative_on_the_second_order_thread_is_analytic() {
    // d²/dx² of Σ gelu(x) by double backward through the fused GELU's recorded backward op.
    let got = with_second_order(|| {
        let x = Var::new(&[0.7f64, -1.3, 3.1], &Device::Cpu)?;
        let y = crate::kernels::gelu(x.as_tensor())?.sum_all()?;
        let g = y.backward()?;
        let dx = g.get(x.as_tensor()).unwrap().clone();
        let h = dx.sum_all()?.backward()?;
        Ok(h.get(x.as_tensor()).unwrap().to_vec1::<f64>()?)
    })
    .unwrap();
    // GELU'' = φ(x) (2 - x²).
    for (x, g) in [0.7f64, -1.3, 3.1].iter().zip(&got) {
        let phi = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        assert!((g - phi * (2.0 - x * x)).abs() < 1e-12, "{x}: {g}");
    }
}

#[test]
fn f32_gelu_second_derivative_matches_the_f64_formula() {
    // The vectorised f32 form of φ(x) (2 - x²) against the f64 one, out to the tails
    // where it is cut to zero (no subnormals, which are slow on x86).
    for i in -1500..=1500 {
        let x = i as f32 / 100.0;
        let (got, want) = (x.gelu_grad2() as f64, (x as f64).gelu_grad2());
        assert!((got - want).abs() < 3e-7, "{x}: {got} against {want}");
        assert!(
            got == 0.0 || got.abs() >= f32::MIN_POSITIVE as f64,
            "{x}: {got}"
        );
    }
    // GELU''(0) = 2 φ(0) = 2 / √(2π); GELU''(√2) = 0.
    assert!((0f32.gelu_grad2() - 0.797_884_6).abs() < 1e-7);
    assert!(std::f32::consts::SQRT_2.gelu_grad2().abs() < 1e-7);
}
