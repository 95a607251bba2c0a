//! The fused linear layer against the primitive form.

use candle_core::{DType, Device, Tensor, Var};

use super::{linear, ColumnSum};
use crate::kernels::check::{randn, rel_err};
use crate::kernels::primitive;

#[test]
fn linear_and_its_gradients_match_the_primitive_form() {
    // Shapes below and above gemm's blocking, and a row count that leaves a short last
    // block for the bias gradient's column sums.
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for (c, (m, k, o)) in [(3, 5, 7), (1088, 192, 576), (97, 300, 13)]
            .into_iter()
            .enumerate()
        {
            let seed = 60 + 4 * c as u64;
            let x = Var::from_tensor(&randn(&[m, k], seed, dtype)).unwrap();
            let w = Var::from_tensor(&randn(&[o, k], seed + 1, dtype)).unwrap();
            let b = Var::from_tensor(&randn(&[o], seed + 2, dtype)).unwrap();
            let r = randn(&[m, o], seed + 3, dtype);
            let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let ya = linear(xt, wt, bt).unwrap();
            let yb = primitive::linear(xt, wt, bt, None).unwrap();
            assert_eq!(ya.dims(), &[m, o]);
            assert!(rel_err(&ya, &yb) < tol, "{dtype:?} {m}x{k}x{o}: value");
            let ga = (&ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (what, v) in [("x", xt), ("w", wt), ("b", bt)] {
                let e = rel_err(ga.get(v).unwrap(), gb.get(v).unwrap());
                assert!(e < tol, "{dtype:?} {m}x{k}x{o}: d{what} off by {e:e}");
            }
        }
    }
    // The bias gradient is the column sums, exactly for small integers.
    let g = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap();
    let sums = g
        .apply_op1_no_bwd(&ColumnSum)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(sums, [9.0, 12.0]);
}
