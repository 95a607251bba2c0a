//! Across the kernels: the f32 math functions against f64, and second derivatives through
//! every fused op (their recorded backward ops) against the primitive forms.

use candle_core::{DType, Device};

use super::check::{hvp_through, rel_err, second_order_all, second_order_cases};
use super::cpu::{exp_nonpositive_f32, Float};

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

#[test]
fn second_derivatives_through_the_fused_ops_match_the_primitive_forms() {
    // On the second-order thread, the op as the model calls it against its primitive form
    // (the cases: check::second_order_cases), in f64 on the CPU.
    for (name, op, reference, dims) in second_order_cases() {
        let a = hvp_through(op, dims, DType::F64, &Device::Cpu).unwrap();
        let b = hvp_through(reference, dims, DType::F64, &Device::Cpu).unwrap();
        for (what, (a, b)) in ["x", "w", "b"].iter().zip(a.iter().zip(&b)) {
            let e = rel_err(a, b);
            assert!(e < 1e-11, "{name}: (H v)_{what} off by {e:e}");
        }
    }
    // And the same through second_order_all, as parity runs it on a device.
    let all = second_order_all(&Device::Cpu, DType::F64).unwrap();
    assert_eq!(all.len(), 6);
    assert!(all.iter().all(|(_, d)| d.iter().all(|d| d.max_rel < 1e-11)));
}
