//! Differentiable building blocks.
//!
//! candle's fused `layer_norm` and `softmax_last_dim` carry no backward op (CANDLE.md): anything
//! upstream of them silently gets no gradient. Every linear layer, normalisation, softmax and
//! GELU of the model goes through this module, in one of two forms:
//! - on the CPU, our fused kernels with fused backward kernels ([`super::fused`]), one pass
//!   each way;
//! - elsewhere (CUDA), the same functions built from primitive ops whose first and second
//!   derivatives candle knows ([`primitive`]).
//!
//! On a thread that takes second derivatives (exact Hessian-vector products, see
//! [`set_second_order`]) the backward passes must themselves be differentiable. There the
//! fused ops record their backward ops, which have backward passes of their own (the second
//! backward pass of a product records nothing, so those need none): see [`super::fused`].

use candle_core::{DType, Result, Tensor};

thread_local! {
    static SECOND_ORDER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as one whose gradients are differentiated again: from then on its
/// fused ops record their backward ops (see the module's notes).
pub fn set_second_order(on: bool) {
    SECOND_ORDER.with(|c| c.set(on));
}

/// Whether this thread was marked by [`set_second_order`].
pub fn second_order() -> bool {
    SECOND_ORDER.with(|c| c.get())
}

/// Whether the fused CPU kernels apply to `x`: an f32/f64 CPU tensor (on any thread).
pub fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * w + b, biased variance as
/// torch.nn.LayerNorm. Fused on the CPU, on a second-order thread too.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) {
        super::fused::layer_norm(x, weight, bias, eps)
    } else {
        primitive::layer_norm(x, weight, bias, eps)
    }
}

/// Softmax over the last dimension. Fused on the CPU, on a second-order thread too.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        super::fused::softmax_last_dim(x)
    } else {
        primitive::softmax_last_dim(x)
    }
}

/// Exact (erf) GELU, as torch.nn.GELU() in MAE; not the tanh approximation (`Tensor::gelu`).
/// Fused on the CPU, on a second-order thread too.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        super::fused::gelu_erf(x)
    } else {
        primitive::gelu(x)
    }
}

/// A linear layer on the last dimension: x (..., K) · wᵀ + b, w (O, K), with the product in
/// `mm` (mixed precision, see [`lowp`]) when given.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor, mm: Option<DType>) -> Result<Tensor> {
    match mm {
        Some(dt) if dt != x.dtype() => primitive::linear(x, weight, bias, mm),
        _ if fused(x) => super::fused::linear(x, weight, bias),
        _ => primitive::linear(x, weight, bias, None),
    }
}

/// <g, v> summed over all elements, a scalar differentiable in `g` whose backward pass hands
/// `v` on to `g` (the seed of a Hessian-vector product's second backward pass). Fused on the
/// CPU; elsewhere (g · v).sum_all().
pub fn directional(g: &Tensor, v: &Tensor) -> Result<Tensor> {
    if fused(g) && g.dtype() == v.dtype() {
        super::fused::directional(g, v)
    } else {
        (g * v)?.sum_all()
    }
}

/// The forms built from candle's primitive ops (differentiable twice).
pub mod primitive {
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
