//! The fused layer norm against the primitive form.

use super::layer_norm;
use crate::kernels::check::assert_matches_reference;
use crate::kernels::primitive;

#[test]
fn layer_norm_and_its_gradients_match_the_primitive_form() {
    assert_matches_reference(
        "layer norm",
        |x, w, b| layer_norm(x, w, b, 1e-6),
        |x, w, b| primitive::layer_norm(x, w, b, 1e-6),
    );
}
