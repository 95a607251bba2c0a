//! The kernels' forms built from candle's primitive ops, whose first and second derivatives
//! candle knows: the fallback off the CPU (CUDA, until its own kernels land) and the tests'
//! reference for the fused kernels.

use candle_core::{DType, Result, Tensor, D};

pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// The max is detached before `exp`: it only shifts the exponent for stability and cancels
/// in the ratio, so the gradient is unchanged.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// (..., in) -> (rows, in) @ (in, out) -> (..., out), the product in `mm` when given; the
/// output keeps x's dtype.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor, mm: Option<DType>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = dims.pop().unwrap_or(0);
    let x2 = x.reshape((dims.iter().product::<usize>(), k))?;
    let y = super::lowp(&x2, mm)?
        .matmul(&super::lowp(weight, mm)?.t()?)?
        .to_dtype(x.dtype())?
        .broadcast_add(bias)?;
    dims.push(weight.dim(0)?);
    y.reshape(dims)
}
