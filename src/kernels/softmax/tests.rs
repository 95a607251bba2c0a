//! The fused softmax against the primitive form.

use candle_core::{DType, D};

use super::softmax_last_dim;
use crate::kernels::check::{assert_matches_reference, randn, rel_err};
use crate::kernels::primitive;

#[test]
fn softmax_and_its_gradient_match_the_primitive_form() {
    assert_matches_reference(
        "softmax",
        |x, _, _| softmax_last_dim(x),
        |x, _, _| primitive::softmax_last_dim(x),
    );
    // Rows sum to one, and a transposed input is taken as its values.
    let x = randn(&[6, 9], 1, DType::F64).t().unwrap();
    let y = softmax_last_dim(&x).unwrap();
    let sums = y.sum(D::Minus1).unwrap().to_vec1::<f64>().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-14));
    assert!(rel_err(&y, &primitive::softmax_last_dim(&x).unwrap()) < 1e-15);
}
