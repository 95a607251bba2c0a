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

/// The attention core as products and a softmax: (B, N, 3D) qkv (rows q | k | v, heads
/// contiguous within each) -> (B, n_query, D), the last `n_query` tokens asking, the two
/// products in `mm` when given. `softmax` is the model's dispatched one off the fused path
/// (`kernels::attention`) and [`softmax_last_dim`] here for the tests' reference.
pub fn attention(
    qkv: &Tensor,
    heads: usize,
    n_query: usize,
    scale: f64,
    mm: Option<DType>,
    softmax: fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    use super::lowp;
    let (b, n, r) = qkv.dims3()?;
    let (dim, h) = (r / 3, heads);
    let hd = dim / h;
    let qkv_dt = qkv.dtype();
    let qkv = qkv.reshape((b, n, 3, h, hd))?.permute((2, 0, 3, 1, 4))?; // 3 B H N d
    let q = qkv.get(0)?.narrow(2, n - n_query, n_query)?.contiguous()?; // B H Nq d
    let k = qkv.get(1)?.contiguous()?; // B H N d
    let v = qkv.get(2)?.contiguous()?; // B H N d
    let scores = lowp(&(q * scale)?, mm)?
        .matmul(&lowp(&k, mm)?.t()?)?
        .to_dtype(qkv_dt)?; // B H Nq N
    lowp(&softmax(&scores)?, mm)?
        .matmul(&lowp(&v, mm)?)? // B H Nq d
        .to_dtype(qkv_dt)?
        .transpose(1, 2)? // B Nq H d
        .reshape((b, n_query, dim))
}
