//! The fused <g, v> against the dot product, and the direction its backward pass hands on.

use candle_core::{DType, Var};

use super::directional;
use crate::kernels::check::{randn, rel_err};

#[test]
fn directional_is_the_dot_product_and_hands_the_direction_back() {
    for dtype in [DType::F32, DType::F64] {
        let g = Var::from_tensor(&randn(&[3, 70_000], 90, dtype)).unwrap();
        let v = randn(&[3, 70_000], 91, dtype);
        let d = directional(g.as_tensor(), &v).unwrap();
        let want: f64 = (g.as_tensor().to_dtype(DType::F64).unwrap()
            * v.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
        let got = d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        assert!(
            (got - want).abs() < 1e-6 * want.abs(),
            "{dtype:?}: {got} vs {want}"
        );
        // Through the sum of two such terms the incoming gradient is 1: v itself comes
        // back; scaled by 3, 3 v.
        let two = (d.clone() + directional(g.as_tensor(), &v).unwrap()).unwrap();
        let dg = two.backward().unwrap().get(g.as_tensor()).unwrap().clone();
        assert_eq!(rel_err(&(&v * 2.0).unwrap(), &dg), 0.0);
        let dg = (d * 3.0).unwrap().backward().unwrap();
        let dg = dg.get(g.as_tensor()).unwrap();
        assert!(rel_err(&(&v * 3.0).unwrap(), dg) < 1e-15);
    }
}
