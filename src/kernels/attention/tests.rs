//! The fused attention core against the primitive form.

use candle_core::{DType, Var};

use super::attention;
use crate::kernels::check::{attention_reference, randn, rel_err};

#[test]
fn attention_and_its_gradient_match_the_primitive_form() {
    // Self-attention (nq = n) and attention fusion's last-layer queries (nq < n); head
    // widths below and above gemm's blocking.
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for (k, (b, n, h, d, nq)) in [(2, 5, 2, 3, 5), (3, 17, 3, 64, 17), (2, 12, 2, 8, 4)]
            .into_iter()
            .enumerate()
        {
            let qkv = Var::from_tensor(&randn(&[b, n, 3 * h * d], 40 + k as u64, dtype)).unwrap();
            let r = randn(&[b, nq, h * d], 50 + k as u64, dtype);
            let scale = (d as f64).powf(-0.5);
            let ya = attention(qkv.as_tensor(), h, nq, scale).unwrap();
            let yb = attention_reference(qkv.as_tensor(), h, nq).unwrap();
            assert_eq!(ya.dims(), yb.dims());
            assert!(rel_err(&ya, &yb) < tol, "{dtype:?} case {k}: value");
            let ga = (&ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (ga, gb) = (
                ga.get(qkv.as_tensor()).unwrap(),
                gb.get(qkv.as_tensor()).unwrap(),
            );
            let e = rel_err(ga, gb);
            assert!(e < tol, "{dtype:?} case {k}: dqkv off by {e:e}");
        }
    }
}
