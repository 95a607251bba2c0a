//! Differentiable building blocks.
//!
//! candle's fused `layer_norm` and `softmax_last_dim` carry no backward op (CANDLE.md): anything
//! upstream of them silently gets no gradient. Every normalisation and softmax of the model goes
//! through this module, built from primitive ops whose first and second derivatives candle
//! knows. It is the one place where fused kernels with a backward can later be slotted in.

use candle_core::{DType, Result, Tensor, D};

/// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * w + b, biased variance as
/// torch.nn.LayerNorm.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last dimension. The max is detached before `exp`: it only shifts the
/// exponent for stability and cancels in the ratio, so the gradient is unchanged.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Exact (erf) GELU, as torch.nn.GELU() in MAE; not the tanh approximation (`Tensor::gelu`).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// `t` in the matrix-product dtype `mm` (mixed precision), or itself when `mm` is `None` or
/// already its dtype. The cast is differentiable: its gradient comes back in `t`'s dtype, so
/// f32 parameters get f32 gradients.
pub fn lowp(t: &Tensor, mm: Option<DType>) -> Result<Tensor> {
    match mm {
        Some(dt) if dt != t.dtype() => t.to_dtype(dt),
        _ => Ok(t.clone()),
    }
}
