//! Every differentiable building block of the model, and the only module that chooses how it
//! runs: our fused CPU kernel, (later) a CUDA kernel, or the form built from candle's
//! primitive ops ([`primitive`]).
//!
//! Why our own kernels: candle's fused `layer_norm` and `softmax_last_dim` carry no backward op
//! (docs/candle.md), so anything upstream of them silently gets no gradient; and built from
//! primitive ops, the work around a ViT's matrix products (norms, softmax, GELU, layout copies)
//! was where a CPU training step went. So on the CPU each op here is one candle `CustomOp` on
//! contiguous f32/f64 tensors, one pass forward and one backward, rows split over the cores
//! with rayon; elsewhere the primitive forms, whose first and second derivatives candle knows.
//!
//! Layout: one folder per op (`mod.rs` the CustomOps and their backward wiring, `cpu.rs` the
//! CPU kernels, `tests.rs` the checks against the primitive forms; CUDA kernels go beside them
//! as `cuda.rs`), [`cpu`] and [`gemm`] what the CPU kernels share, [`second_order`] the switch
//! for exact Hessian-vector products, [`check`] the per-op comparison of a device against the
//! reference.
//!
//! Invariants: only this module looks at a tensor's device to pick a kernel; second
//! derivatives are taken only inside [`second_order::with_second_order`].

mod adamw;
mod attention;
pub mod check;
mod cpu;
mod directional;
mod gelu;
mod gemm;
mod layer_norm;
mod linear;
pub mod primitive;
pub mod second_order;
mod softmax;
#[cfg(test)]
mod tests;

pub use adamw::{adamw_update, AdamWStep};

use candle_core::{DType, Device, Result, Tensor};

/// Whether the fused CPU kernels apply to `x`: an f32/f64 CPU tensor (on any thread).
pub fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * w + b, biased variance as
/// torch.nn.LayerNorm. Fused on the CPU, on a second-order thread too.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused(x) {
        layer_norm::layer_norm(x, weight, bias, eps)
    } else {
        primitive::layer_norm(x, weight, bias, eps)
    }
}

/// Softmax over the last dimension. Fused on the CPU, on a second-order thread too.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        softmax::softmax_last_dim(x)
    } else {
        primitive::softmax_last_dim(x)
    }
}

/// Exact (erf) GELU, as torch.nn.GELU() in MAE; not the tanh approximation (`Tensor::gelu`).
/// Fused on the CPU, on a second-order thread too.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused(x) {
        gelu::gelu_erf(x)
    } else {
        primitive::gelu(x)
    }
}

/// A linear layer on the last dimension: x (..., K) · wᵀ + b, w (O, K), with the product in
/// `mm` (mixed precision, see [`lowp`]) when given.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor, mm: Option<DType>) -> Result<Tensor> {
    match mm {
        Some(dt) if dt != x.dtype() => primitive::linear(x, weight, bias, mm),
        _ if fused(x) => linear::linear(x, weight, bias),
        _ => primitive::linear(x, weight, bias, None),
    }
}

/// The attention core of multi-head attention, from the fused qkv projection (B, N, 3D) (rows
/// q | k | v, heads contiguous within each) to (B, n_query, D), heads concatenated:
/// softmax(scale · Q Kᵀ) V per head, only the last `n_query` tokens asking (every token is a
/// key and a value; `n_query = N` is self-attention). The two products in `mm` when given.
/// Fused on the CPU (one kernel per (image, head), reading q, k, v in place), on a
/// second-order thread too; elsewhere products and [`softmax_last_dim`].
pub fn attention(
    qkv: &Tensor,
    heads: usize,
    n_query: usize,
    scale: f64,
    mm: Option<DType>,
) -> Result<Tensor> {
    if mm.is_none() && fused(qkv) {
        attention::attention(qkv, heads, n_query, scale)
    } else {
        primitive::attention(qkv, heads, n_query, scale, mm, softmax_last_dim)
    }
}

/// <g, v> summed over all elements, a scalar differentiable in `g` whose backward pass hands
/// `v` on to `g` (the seed of a Hessian-vector product's second backward pass). Fused on the
/// CPU; elsewhere (g · v).sum_all().
pub fn directional(g: &Tensor, v: &Tensor) -> Result<Tensor> {
    if fused(g) && g.dtype() == v.dtype() {
        directional::directional(g, v)
    } else {
        (g * v)?.sum_all()
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

/// Shards of a CPU batch (fewer when the batch is smaller): the training step and the Hessian
/// products cut a batch into this many, each run on its own thread (`train::step`). Fixed, not
/// the machine's core count, so a seed gives the same run on any CPU.
pub const CPU_SHARDS: usize = 2;

/// How many shards a batch of `batch` images on `device` is cut into: [`CPU_SHARDS`] on the CPU
/// (candle walks a backward graph on one thread), one elsewhere.
pub fn shards(batch: usize, device: &Device) -> usize {
    if device.is_cpu() {
        CPU_SHARDS.clamp(1, batch.max(1))
    } else {
        1
    }
}

/// `(start, len)` of each of `shards` near-equal, consecutive shards of `batch` images.
pub fn shard_ranges(batch: usize, shards: usize) -> Vec<(usize, usize)> {
    let (base, extra) = (batch / shards, batch % shards);
    let mut start = 0;
    (0..shards)
        .map(|i| {
            let n = base + usize::from(i < extra);
            let r = (start, n);
            start += n;
            r
        })
        .collect()
}
