//! Fused CPU kernels, with fused backward kernels, for the work of a ViT around its matrix
//! products: layer norm over the last dimension, softmax over the last dimension, exact (erf)
//! GELU, the linear layer (product and bias in one op), and the attention core (scores, softmax
//! and the weighted sum per head, read from and written to the projections' layouts without
//! permuted copies); and the seed <g, v> of a Hessian-vector product's second backward pass.
//!
//! Built from candle's primitive ops, a layer norm is 8 kernels forward and about 20 backward,
//! each allocating a tensor and streaming memory: on the CPU those and their page faults, not
//! the matrix products, were where a training step went (CANDLE.md). Each op here is one pass
//! forward (a candle `CustomOp` on contiguous f32/f64 CPU tensors, rows split over the cores
//! with rayon) and one pass backward.
//!
//! Second derivatives (exact Hessian-vector products) differentiate a gradient again. On the
//! thread that builds such a gradient ([`super::ops::set_second_order`]) every op here records
//! its backward op in the graph (each asks [`super::ops::second_order`] when its backward pass
//! runs), and each backward op has a backward pass of its own: hand-derived second-derivative kernels, each tested against the primitive forms'
//! double backward. Those run in a product's second backward pass, which records nothing, so
//! no third derivative is needed.
//! Sums over a row accumulate in f64 in both precisions.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    WithDType,
};
use rayon::prelude::*;

/// The float types the kernels handle, with the functions they need.
trait Float:
    WithDType
    + Send
    + Sync
    + Copy
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::AddAssign
    + std::ops::Mul<Output = Self>
{
    fn f(v: f64) -> Self;
    fn d(self) -> f64;
    fn exp(self) -> Self;
    /// Exact GELU, x Φ(x).
    fn gelu(self) -> Self;
    /// Its derivative, Φ(x) + x φ(x).
    fn gelu_grad(self) -> Self;
    /// Its second derivative, φ(x) (2 - x²) (in f64; only second-order work needs it).
    fn gelu_grad2(self) -> Self {
        let x = self.d();
        Self::f((-0.5 * x * x).exp() * FRAC_1_SQRT_2PI * (2.0 - x * x))
    }
}

impl Float for f32 {
    fn f(v: f64) -> Self {
        v as f32
    }
    fn d(self) -> f64 {
        self as f64
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn gelu(self) -> Self {
        let (cdf, _) = normal_f32(self);
        self * cdf
    }
    #[inline(always)]
    fn gelu_grad(self) -> Self {
        let (cdf, pdf) = normal_f32(self);
        cdf + self * pdf
    }
    /// φ(x) (2 - x²) in f32, branch-free so it vectorises (zero where φ(x) < 1e-35, as in
    /// [`normal_f32`], so no subnormals arise).
    #[inline(always)]
    fn gelu_grad2(self) -> Self {
        let h = 0.5 * self * self;
        let e = if h > 81.0 {
            0.0
        } else {
            exp_nonpositive_f32(-h)
        };
        e * FRAC_1_SQRT_2PI as f32 * (2.0 - self * self)
    }
}

impl Float for f64 {
    fn f(v: f64) -> Self {
        v
    }
    fn d(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn gelu(self) -> Self {
        0.5 * self * (1.0 + libm::erf(self * std::f64::consts::FRAC_1_SQRT_2))
    }
    fn gelu_grad(self) -> Self {
        let cdf = 0.5 * (1.0 + libm::erf(self * std::f64::consts::FRAC_1_SQRT_2));
        cdf + self * (-0.5 * self * self).exp() * FRAC_1_SQRT_2PI
    }
}

/// Elements per parallel chunk of an elementwise kernel (enough work to pay for the task).
const CHUNK: usize = 1 << 14;

/// The contiguous slice of a storage, or an error naming the op.
fn slice<'a, T: Float>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{op}: expects a contiguous input"),
    }
}

/// The sum of per-block partial sums (each `len` long), added in block order: the same result
/// whatever the threads did (rayon's own reduce adds in a scheduling-dependent order).
fn in_block_order(partial: &[Vec<f64>], len: usize) -> Vec<f64> {
    let mut total = vec![0.0; len];
    for p in partial {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// Rows of a row-wise kernel grouped so each task gets about CHUNK elements.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// Dispatches a generic kernel on the storage's float type.
macro_rules! by_dtype {
    ($s:expr, $name:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => bail!("{}: f32 or f64 only", $name),
        }
    };
}

// ------------------------------------------------------------------------------------------
// Layer norm
// ------------------------------------------------------------------------------------------

/// (x - mean) / sqrt(var + eps) * w + b over the last dimension, biased variance.
///
/// On the second-order thread its backward op is recorded (with a backward pass of its own,
/// [`LayerNormBwd2`]), so a gradient taken through it can be differentiated again: there it
/// replaces the primitive form's 13 forward nodes and their backward graph.
struct LayerNorm {
    eps: f64,
}

/// Mean and 1/sqrt(var + eps) of one row, accumulated in f64.
fn row_stats<T: Float>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|v| v.d()).sum::<f64>() / n;
    let var = row
        .iter()
        .map(|v| {
            let c = v.d() - mean;
            c * c
        })
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn layer_norm_fwd<T: Float>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::f(0.0); x.len()];
    out.par_chunks_mut(d * rows_per_task(d))
        .zip(x.par_chunks(d * rows_per_task(d)))
        .for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_mut(d).zip(xs.chunks(d)) {
                let (mean, rstd) = row_stats(xrow, eps);
                for i in 0..d {
                    let xh = (xrow[i].d() - mean) * rstd;
                    orow[i] = T::f(xh * w[i].d() + b[i].d());
                }
            }
        });
    out
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        by_dtype!(s1, name, |T| {
            let (x, w, b) = (
                slice::<T>(s1, l1, name)?,
                slice::<T>(s2, l2, name)?,
                slice::<T>(s3, l3, name)?,
            );
            let out = layer_norm_fwd(x, w, b, self.eps);
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, d) = (x.elem_count(), w.elem_count());
        // One pass: dx, then dw and db, packed in one flat buffer; recorded, with a backward
        // pass of its own, where the gradient is differentiated again.
        let (g, op) = (grad.contiguous()?, LayerNormBwd { eps: self.eps });
        let packed = if super::ops::second_order() {
            x.apply_op3(w, &g, op)?
        } else {
            x.apply_op3_no_bwd(w, &g, &op)?
        };
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, d)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + d, d)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Backward of [`LayerNorm`]: with x̂ the normalised row, ĝ = g w, and r = 1/std,
/// dx = r (ĝ - mean(ĝ) - x̂ mean(ĝ x̂)); dw = Σ_rows g x̂; db = Σ_rows g.
struct LayerNormBwd {
    eps: f64,
}

fn layer_norm_bwd<T: Float>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let n = x.len();
    let mut out = vec![T::f(0.0); n + 2 * d];
    let (dx, _) = out.split_at_mut(n);
    let per = d * rows_per_task(d);
    let partial = dx
        .par_chunks_mut(per)
        .zip(x.par_chunks(per).zip(g.par_chunks(per)))
        .map(|(o, (xs, gs))| {
            let mut acc = vec![0f64; 2 * d];
            let mut xh = vec![0f64; d];
            for ((orow, xrow), grow) in o.chunks_mut(d).zip(xs.chunks(d)).zip(gs.chunks(d)) {
                let (mean, rstd) = row_stats(xrow, eps);
                let (mut sg, mut sgx) = (0.0, 0.0);
                for i in 0..d {
                    xh[i] = (xrow[i].d() - mean) * rstd;
                    let gi = grow[i].d();
                    let gh = gi * w[i].d();
                    sg += gh;
                    sgx += gh * xh[i];
                    acc[i] += gi * xh[i];
                    acc[d + i] += gi;
                }
                let (a, c) = (sg / d as f64, sgx / d as f64);
                for i in 0..d {
                    let gh = grow[i].d() * w[i].d();
                    orow[i] = T::f(rstd * (gh - a - xh[i] * c));
                }
            }
            acc
        })
        .collect::<Vec<_>>();
    for (o, v) in out[n..].iter_mut().zip(&in_block_order(&partial, 2 * d)) {
        *o = T::f(*v);
    }
    out
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
    }

    /// Runs in the second backward pass of an exact Hessian-vector product, which records no
    /// graph, so its op needs no backward of its own.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        u: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, d) = (x.elem_count(), w.elem_count());
        let op = LayerNormBwd2 {
            eps: self.eps,
            w: w.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
        };
        let packed = x.apply_op3_no_bwd(g, &u.contiguous()?, &op)?;
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(packed.narrow(0, 2 * n, d)?.reshape(w.shape())?),
            Some(packed.narrow(0, n, n)?.reshape(g.shape())?),
        ))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        by_dtype!(s1, name, |T| {
            let (x, w, g) = (
                slice::<T>(s1, l1, name)?,
                slice::<T>(s2, l2, name)?,
                slice::<T>(s3, l3, name)?,
            );
            let out = layer_norm_bwd(x, w, g, self.eps);
            let len = out.len();
            Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
        })
    }
}

/// The gradients of [`LayerNormBwd`]'s packed output (dx, dw, db) contracted with u = (u_x,
/// U_w, U_b), with respect to x, g and w, packed as (x̄, ḡ, w̄). Per row, with σ = 1/r,
/// a = g w, m = mean(a x̂), dx = r (a - mean(a) - x̂ m) and J(h) = r (h - mean(h) -
/// x̂ mean(h x̂)) the layer norm's own transposed Jacobian:
/// - ā = J(u_x): ḡ = ā w + U_w x̂ + U_b, w̄ = Σ_rows ā g;
/// - through x̂ and σ: x̂̄ = -r (m u_x + mean(u_x x̂) a) + U_w g, σ̄ = -r <u_x, dx>;
/// - x̄ = J(x̂̄) + σ̄ x̂ / D (∂σ/∂x = x̂ / D).
///
/// w is held by the op (at most 3 tensor inputs).
struct LayerNormBwd2 {
    eps: f64,
    w: Vec<f64>,
}

fn layer_norm_bwd2<T: Float>(x: &[T], g: &[T], u: &[T], w: &[f64], eps: f64) -> Vec<T> {
    let (n, d) = (x.len(), w.len());
    let (ux, rest) = u.split_at(n);
    let (uw, ub) = rest.split_at(d);
    let mut out = vec![T::f(0.0); 2 * n + d];
    let (xbar, gbar) = out.split_at_mut(n);
    let gbar = &mut gbar[..n];
    let per = d * rows_per_task(d);
    let partial = xbar
        .par_chunks_mut(per)
        .zip(gbar.par_chunks_mut(per))
        .zip(
            x.par_chunks(per)
                .zip(g.par_chunks(per))
                .zip(ux.par_chunks(per)),
        )
        .map(|((xo, go), ((xs, gs), us))| {
            let mut wbar = vec![0f64; d];
            let (mut xh, mut a, mut abar, mut hbar) =
                (vec![0f64; d], vec![0f64; d], vec![0f64; d], vec![0f64; d]);
            let rows = xo.chunks_mut(d).zip(go.chunks_mut(d));
            for ((xrow_out, grow_out), ((xrow, grow), urow)) in
                rows.zip(xs.chunks(d).zip(gs.chunks(d)).zip(us.chunks(d)))
            {
                let (mean, r) = row_stats(xrow, eps);
                let dd = d as f64;
                let (mut ma, mut m, mut mu, mut mux) = (0.0, 0.0, 0.0, 0.0);
                for i in 0..d {
                    xh[i] = (xrow[i].d() - mean) * r;
                    a[i] = grow[i].d() * w[i];
                    ma += a[i];
                    m += a[i] * xh[i];
                    mu += urow[i].d();
                    mux += urow[i].d() * xh[i];
                }
                let (ma, m, mu, mux) = (ma / dd, m / dd, mu / dd, mux / dd);
                let mut udx = 0.0;
                for i in 0..d {
                    let ui = urow[i].d();
                    udx += ui * r * (a[i] - ma - xh[i] * m);
                    abar[i] = r * (ui - mu - xh[i] * mux);
                    wbar[i] += abar[i] * grow[i].d();
                    let gb = abar[i] * w[i] + uw[i].d() * xh[i] + ub[i].d();
                    grow_out[i] = T::f(gb);
                    hbar[i] = -r * (m * ui + mux * a[i]) + uw[i].d() * grow[i].d();
                }
                let sbar = -r * udx;
                let (mut mh, mut mhx) = (0.0, 0.0);
                for i in 0..d {
                    mh += hbar[i];
                    mhx += hbar[i] * xh[i];
                }
                let (mh, mhx) = (mh / dd, mhx / dd);
                for i in 0..d {
                    xrow_out[i] = T::f(r * (hbar[i] - mh - xh[i] * mhx) + sbar * xh[i] / dd);
                }
            }
            wbar
        })
        .collect::<Vec<_>>();
    for (o, v) in out[2 * n..].iter_mut().zip(&in_block_order(&partial, d)) {
        *o = T::f(*v);
    }
    out
}

impl CustomOp3 for LayerNormBwd2 {
    fn name(&self) -> &'static str {
        "fused-layer-norm-second-derivative"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        by_dtype!(s1, name, |T| {
            let (x, g) = (slice::<T>(s1, l1, name)?, slice::<T>(s2, l2, name)?);
            let u = slice::<T>(s3, l3, name)?;
            if u.len() != x.len() + 2 * self.w.len() || g.len() != x.len() {
                bail!("{name}: mismatched gradient shapes");
            }
            let out = layer_norm_bwd2(x, g, u, &self.w, self.eps);
            let len = out.len();
            Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
        })
    }
}

/// Fused layer norm of a CPU tensor over its last dimension (f32/f64).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })
}

/// A backward op: recorded (with its own backward) on a thread that keeps gradient graphs,
/// where the gradient is differentiated again; plain elsewhere, where candle detaches anyway.
fn recorded_on_second_order(
    a: &Tensor,
    b: &Tensor,
    op: impl CustomOp2 + Send + Sync + 'static,
) -> Result<Tensor> {
    if super::ops::second_order() {
        a.apply_op2(b, op)
    } else {
        a.apply_op2_no_bwd(b, &op)
    }
}

// ------------------------------------------------------------------------------------------
// Softmax over the last dimension
// ------------------------------------------------------------------------------------------

struct Softmax;

/// Softmax of one row, in place (max subtracted, sums in f64).
fn softmax_row<T: Float>(row: &mut [T]) {
    let max = row.iter().map(|v| v.d()).fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = T::f(v.d() - max).exp();
        sum += v.d();
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v = T::f(v.d() * inv));
}

/// The softmax gradient of one row, in place: g <- y (g - Σ g y).
fn softmax_row_bwd<T: Float>(y: &[T], g: &mut [T]) {
    let s: f64 = y.iter().zip(g.iter()).map(|(a, b)| a.d() * b.d()).sum();
    for (gi, yi) in g.iter_mut().zip(y) {
        *gi = T::f(yi.d() * (gi.d() - s));
    }
}

fn softmax_fwd<T: Float>(x: &[T], d: usize) -> Vec<T> {
    let mut out = x.to_vec();
    out.par_chunks_mut(d * rows_per_task(d))
        .for_each(|o| o.chunks_mut(d).for_each(softmax_row));
    out
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let d = as_matrix(l).1;
        by_dtype!(s, name, |T| {
            let out = softmax_fwd(slice::<T>(s, l, name)?, d);
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        recorded_on_second_order(res, &grad.contiguous()?, SoftmaxBwd).map(Some)
    }
}

/// dx = y (g - Σ g y) per row.
struct SoftmaxBwd;

/// The second-order part of the softmax: for one row, with s = Σ y g and the incoming u,
/// d(dx)/dy contracted with u is u (g - s) - g Σ u y (written into `u`'s place).
fn softmax_row_bwd2<T: Float>(y: &[T], g: &[T], u: &mut [T]) {
    let s: f64 = y.iter().zip(g).map(|(a, b)| a.d() * b.d()).sum();
    let uy: f64 = y.iter().zip(u.iter()).map(|(a, b)| a.d() * b.d()).sum();
    for (ui, gi) in u.iter_mut().zip(g) {
        *ui = T::f(ui.d() * (gi.d() - s) - gi.d() * uy);
    }
}

/// dy of [`SoftmaxBwd`] (its value dx = y (g - Σ g y)) for an incoming gradient u.
struct SoftmaxBwdDy;

impl CustomOp3 for SoftmaxBwdDy {
    fn name(&self) -> &'static str {
        "fused-softmax-backward-dy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let d = as_matrix(l1).1;
        by_dtype!(s1, name, |T| {
            let (y, g) = (slice::<T>(s1, l1, name)?, slice::<T>(s2, l2, name)?);
            let mut out = slice::<T>(s3, l3, name)?.to_vec();
            let per = d * rows_per_task(d);
            out.par_chunks_mut(per)
                .zip(y.par_chunks(per).zip(g.par_chunks(per)))
                .for_each(|(o, (ys, gs))| {
                    for ((orow, yrow), grow) in o.chunks_mut(d).zip(ys.chunks(d)).zip(gs.chunks(d))
                    {
                        softmax_row_bwd2(yrow, grow, orow);
                    }
                });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}

fn softmax_bwd<T: Float>(y: &[T], g: &[T], d: usize) -> Vec<T> {
    let mut out = g.to_vec();
    let per = d * rows_per_task(d);
    out.par_chunks_mut(per)
        .zip(y.par_chunks(per))
        .for_each(|(o, ys)| {
            for (orow, yrow) in o.chunks_mut(d).zip(ys.chunks(d)) {
                softmax_row_bwd(yrow, orow);
            }
        });
    out
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-backward"
    }

    /// dx is linear in g (its gradient is the same kernel applied to u) and bilinear in y.
    /// Runs in the second backward pass of an exact Hessian-vector product, which records no
    /// graph, so these ops need no backward of their own.
    fn bwd(
        &self,
        y: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        u: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let u = u.contiguous()?;
        let dy = y.apply_op3_no_bwd(g, &u, &SoftmaxBwdDy)?;
        let dg = y.apply_op2_no_bwd(&u, &SoftmaxBwd)?;
        Ok((Some(dy), Some(dg)))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let d = as_matrix(l1).1;
        by_dtype!(s1, name, |T| {
            let out = softmax_bwd(slice::<T>(s1, l1, name)?, slice::<T>(s2, l2, name)?, d);
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}

/// Fused softmax of a CPU tensor over its last dimension (f32/f64).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

// ------------------------------------------------------------------------------------------
// Exact GELU
// ------------------------------------------------------------------------------------------

struct Gelu;

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// An elementwise map over chunks on every core.
fn map1<T: Float>(x: &[T], f: impl Fn(T) -> T + Sync + Copy) -> Vec<T> {
    let mut out = vec![T::f(0.0); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, xs)| vectorised(o, xs, xs, |a, _| f(a)));
    out
}

/// out[i] = f(a[i], b[i]), compiled a second time for AVX2 and taken where the CPU has it (the
/// build targets baseline x86-64, whose 4-lane SSE2 code is the fallback). Plain IEEE
/// arithmetic without reductions, so both give the same bits.
#[inline(always)]
fn vectorised<T: Float>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T + Copy) {
    #[inline(always)]
    fn each<T: Float>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = f(x, y);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<T: Float>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
            each(out, a, b, f)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked above.
            return unsafe { avx2(out, a, b, f) };
        }
    }
    each(out, a, b, f)
}

/// out[i] = f(out[i], a[i]), compiled for AVX2 as [`vectorised`].
#[inline(always)]
fn vectorised_in_place<T: Float>(out: &mut [T], a: &[T], f: impl Fn(T, T) -> T + Copy) {
    #[inline(always)]
    fn each<T: Float>(out: &mut [T], a: &[T], f: impl Fn(T, T) -> T) {
        for (o, &x) in out.iter_mut().zip(a) {
            *o = f(*o, x);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<T: Float>(out: &mut [T], a: &[T], f: impl Fn(T, T) -> T) {
            each(out, a, f)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked above.
            return unsafe { avx2(out, a, f) };
        }
    }
    each(out, a, f)
}

/// e^y for f32 y ≤ 0, branch-free so it vectorises: 2^n e^r with |r| ≤ ln 2 / 2 and Cephes'
/// degree-6 expf polynomial; results below e^-87 are not needed here (clamped).
#[inline(always)]
fn exp_nonpositive_f32(y: f32) -> f32 {
    let y = y.max(-87.0);
    let n = (y * std::f32::consts::LOG2_E + 0.5).floor();
    // ln 2 in two parts, so n · ln 2 is subtracted without rounding error.
    let r = y - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_2e-4f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    // 2^n built from n's bits: 1.5 · 2^23 + n holds n (|n| ≤ 126) in its low mantissa bits.
    // A float-to-int cast would saturate lane by lane in scalar code.
    const MAGIC: f32 = 12_582_912.0;
    let n_bits = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// (Φ(x), φ(x)) of the standard normal in f32, branch-free: erfc by Abramowitz and Stegun
/// 7.1.26 (absolute error below 1.5e-7, the form PyTorch's vectorised CPU erf uses), taken from
/// the side where it does not cancel.
#[inline(always)]
fn normal_f32(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let a = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * a);
    let mut poly = A[4];
    for c in [A[3], A[2], A[1], A[0]] {
        poly = poly * t + c;
    }
    // Beyond |x| = 9 √2 both are below 1e-35: zero, so no subnormals (slow on x86) arise.
    let e = if a > 9.0 {
        0.0
    } else {
        exp_nonpositive_f32(-a * a)
    };
    let tail = 0.5 * t * poly * e; // Φ(-|x|)
    let cdf = if x < 0.0 { tail } else { 1.0 - tail };
    (cdf, e * FRAC_1_SQRT_2PI as f32)
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        by_dtype!(s, name, |T| {
            let out = map1(slice::<T>(s, l, name)?, T::gelu);
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        recorded_on_second_order(&arg.contiguous()?, &grad.contiguous()?, GeluBwd).map(Some)
    }
}

/// g · GELU'(x).
struct GeluBwd;

/// u · g · GELU''(x): the x-gradient of [`GeluBwd`] for an incoming u.
struct GeluBwdDx;

impl CustomOp3 for GeluBwdDx {
    fn name(&self) -> &'static str {
        "fused-gelu-backward-dx"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        by_dtype!(s1, name, |T| {
            let x = slice::<T>(s1, l1, name)?;
            let (g, u) = (slice::<T>(s2, l2, name)?, slice::<T>(s3, l3, name)?);
            let mut out = vec![T::f(0.0); x.len()];
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .for_each(|((o, xs), (gs, us))| {
                    vectorised(o, gs, us, |g, u| u * g);
                    vectorised_in_place(o, xs, |gu, x| gu * x.gelu_grad2());
                });
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-backward"
    }

    /// Runs in the second backward pass of an exact Hessian-vector product, which records no
    /// graph, so these ops need no backward of their own.
    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        u: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let u = u.contiguous()?;
        let dx = x.apply_op3_no_bwd(g, &u, &GeluBwdDx)?;
        let dg = x.apply_op2_no_bwd(&u, &GeluBwd)?;
        Ok((Some(dx), Some(dg)))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        by_dtype!(s1, name, |T| {
            let (x, g) = (slice::<T>(s1, l1, name)?, slice::<T>(s2, l2, name)?);
            let mut out = vec![T::f(0.0); x.len()];
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|(o, (xs, gs))| vectorised(o, xs, gs, |x, g| g * x.gelu_grad()));
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}

/// Fused exact GELU of a CPU tensor (f32/f64).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

// ------------------------------------------------------------------------------------------
// Attention core
// ------------------------------------------------------------------------------------------

/// softmax(scale · Q Kᵀ) V for every (image, head), read straight from the fused qkv
/// projection (B, N, 3D) (q | k | v, heads contiguous within each) and written straight into
/// (B, Nq, D), heads concatenated: no permuted copies. Only the last `n_query` tokens ask.
/// Each (image, head) is one task: two single-threaded gemm calls and a row softmax.
#[derive(Clone, Copy)]
struct Attention {
    heads: usize,
    n_query: usize,
    scale: f64,
}

/// Raw pointers shared by the tasks, which write disjoint (image, head) blocks.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn ptr(self) -> *mut T {
        self.0
    }
}

/// dst (m x n) = beta · lhs (m x k) · rhs (k x n), each given by (pointer, row stride, column
/// stride), on the calling thread.
///
/// # Safety
/// The pointers must cover the strided matrices, and dst must not alias the inputs.
unsafe fn mm<T: Float>(
    dims: (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    beta: f64,
) {
    gemm_into(dims, dst, lhs, rhs, beta, false, gemm::Parallelism::None)
}

/// dst (m x n) = beta · lhs (m x k) · rhs (k x n), plus dst's previous values when
/// `accumulate`, each matrix given by (pointer, row stride, column stride). gemm splits the
/// output, never the inner dimension, across threads, so results do not depend on `par`.
///
/// # Safety
/// The pointers must cover the strided matrices, and dst must not alias the inputs.
unsafe fn gemm_into<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    beta: f64,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        T::f(if accumulate { 1.0 } else { 0.0 }),
        T::f(beta),
        false,
        false,
        false,
        par,
    )
}

/// gemm on the calling thread (inside a task of a parallel loop).
const SERIAL: gemm::Parallelism = gemm::Parallelism::None;

/// gemm on every core of rayon's pool.
fn all_cores() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// The attention probabilities of one (image, head): P (nq x n) = softmax(scale · Q Kᵀ).
///
/// # Safety
/// `q` and `k` point into a qkv buffer of row stride `r`.
unsafe fn probabilities<T: Float>(
    q: *const T,
    k: *const T,
    r: usize,
    (nq, n, d): (usize, usize, usize),
    scale: f64,
    p: &mut [T],
) {
    mm(
        (nq, n, d),
        (p.as_mut_ptr(), n, 1),
        (q, r, 1),
        (k, 1, r),
        scale,
    );
    p.chunks_mut(n).for_each(softmax_row);
}

impl Attention {
    /// (B, N, D, d, R = 3D) of a qkv layout.
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
        let (b, n, r) = l.shape().dims3()?;
        let dim = r / 3;
        if r % 3 != 0 || dim % self.heads != 0 || self.n_query == 0 || self.n_query > n {
            bail!(
                "fused attention: qkv {:?} does not fit {} heads",
                l.dims(),
                self.heads
            );
        }
        Ok((b, n, dim, dim / self.heads, r))
    }

    fn fwd<T: Float>(
        &self,
        qkv: &[T],
        (b, n, dim, d, r): (usize, usize, usize, usize, usize),
    ) -> Vec<T> {
        let (h, nq) = (self.heads, self.n_query);
        let mut out = vec![T::f(0.0); b * nq * dim];
        let (src, dst) = (Shared(qkv.as_ptr() as *mut T), Shared(out.as_mut_ptr()));
        (0..b * h).into_par_iter().for_each_init(
            || vec![T::f(0.0); nq * n],
            |p, task| {
                let (bi, hi) = (task / h, task % h);
                // SAFETY: every pointer stays inside image bi's rows of qkv and out, and the
                // task writes only its head's columns of out.
                unsafe {
                    let base = (src.ptr() as *const T).add(bi * n * r + hi * d);
                    let q = base.add((n - nq) * r);
                    probabilities(q, base.add(dim), r, (nq, n, d), self.scale, p);
                    let o = dst.ptr().add(bi * nq * dim + hi * d);
                    mm(
                        (nq, d, n),
                        (o, dim, 1),
                        (p.as_ptr(), n, 1),
                        (base.add(2 * dim), r, 1),
                        1.0,
                    );
                }
            },
        );
        out
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let dims = self.dims(l)?;
        by_dtype!(s, name, |T| {
            let out = self.fwd(slice::<T>(s, l, name)?, dims);
            Ok((
                T::to_cpu_storage_owned(out),
                Shape::from((dims.0, self.n_query, dims.2)),
            ))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        recorded_on_second_order(arg, &grad.contiguous()?, AttentionBwd(*self)).map(Some)
    }
}

/// Gradient of [`Attention`] with respect to qkv, P recomputed: dV = Pᵀ dO, dP = dO Vᵀ,
/// dS = P (dP - rowsum(dP P)), dQ = scale dS K, dK = scale dSᵀ Q.
struct AttentionBwd(Attention);

impl CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
    }

    /// Runs in the second backward pass of an exact Hessian-vector product, which records no
    /// graph, so its op needs no backward of its own.
    fn bwd(
        &self,
        qkv: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        u: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = qkv.apply_op3_no_bwd(g, &u.contiguous()?, &AttentionBwd2(self.0))?;
        let n = qkv.elem_count();
        let dqkv = both.narrow(0, 0, n)?.reshape(qkv.shape())?;
        let dg = both.narrow(0, n, g.elem_count())?.reshape(g.shape())?;
        Ok((Some(dqkv), Some(dg)))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (b, n, dim, d, r) = self.0.dims(l1)?;
        let Attention {
            heads: h,
            n_query: nq,
            scale,
        } = self.0;
        by_dtype!(s1, name, |T| {
            let (qkv, g) = (slice::<T>(s1, l1, name)?, slice::<T>(s2, l2, name)?);
            if g.len() != b * nq * dim {
                bail!("{name}: gradient of {} values for {b}x{nq}x{dim}", g.len());
            }
            let mut out = vec![T::f(0.0); qkv.len()];
            let (src, gp, dst) = (
                Shared(qkv.as_ptr() as *mut T),
                Shared(g.as_ptr() as *mut T),
                Shared(out.as_mut_ptr()),
            );
            (0..b * h).into_par_iter().for_each_init(
                || (vec![T::f(0.0); nq * n], vec![T::f(0.0); nq * n]),
                |(p, dp), task| {
                    let (bi, hi) = (task / h, task % h);
                    // SAFETY: as in the forward; the task writes only its head's columns of
                    // image bi's rows of out (q, k and v thirds).
                    unsafe {
                        let base = (src.ptr() as *const T).add(bi * n * r + hi * d);
                        let (q, k, v) = (base.add((n - nq) * r), base.add(dim), base.add(2 * dim));
                        let go = (gp.ptr() as *const T).add(bi * nq * dim + hi * d);
                        let obase = dst.ptr().add(bi * n * r + hi * d);
                        probabilities(q, k, r, (nq, n, d), scale, p);
                        // dV (n x d) = Pᵀ dO.
                        mm(
                            (n, d, nq),
                            (obase.add(2 * dim), r, 1),
                            (p.as_ptr(), 1, n),
                            (go, dim, 1),
                            1.0,
                        );
                        // dP (nq x n) = dO Vᵀ, then dS in place.
                        mm(
                            (nq, n, d),
                            (dp.as_mut_ptr(), n, 1),
                            (go, dim, 1),
                            (v, 1, r),
                            1.0,
                        );
                        for (prow, dprow) in p.chunks(n).zip(dp.chunks_mut(n)) {
                            softmax_row_bwd(prow, dprow);
                        }
                        // dQ (nq x d) = scale dS K; dK (n x d) = scale dSᵀ Q.
                        mm(
                            (nq, d, n),
                            (obase.add((n - nq) * r), r, 1),
                            (dp.as_ptr(), n, 1),
                            (k, r, 1),
                            scale,
                        );
                        mm(
                            (n, d, nq),
                            (obase.add(dim), r, 1),
                            (dp.as_ptr(), 1, n),
                            (q, r, 1),
                            scale,
                        );
                    }
                },
            );
            Ok((T::to_cpu_storage_owned(out), l1.shape().clone()))
        })
    }
}

impl AttentionBwd {
    /// The gradients of this op's output (dqkv) contracted with u (shaped like qkv), with
    /// respect to qkv and to the incoming gradient dO, as one buffer: B·N·3D values of the
    /// first, then B·Nq·D of the second. Per (image, head), with P, dP = dO Vᵀ and dS
    /// recomputed and U split into U_Q (the query rows), U_K, U_V:
    /// - dS̄ = scale (U_Q Kᵀ + Q U_Kᵀ); dP̄ = P (dS̄ - rowsum(dS̄ P));
    /// - P̄ = dO U_Vᵀ + dS̄ (dP - rowsum(dP P)) - dP rowsum(dS̄ P); S̄ = P (P̄ - rowsum(P̄ P));
    /// - Q̄ = scale (dS U_K + S̄ K); K̄ = scale (dSᵀ U_Q + S̄ᵀ Q); V̄ = dP̄ᵀ dO;
    /// - dŌ = P U_V + dP̄ V.
    fn second<T: Float>(&self, qkv: &[T], g: &[T], u: &[T], l: &Layout) -> Result<Vec<T>> {
        let (b, n, dim, d, r) = self.0.dims(l)?;
        let Attention {
            heads: h,
            n_query: nq,
            scale,
        } = self.0;
        if g.len() != b * nq * dim || u.len() != qkv.len() {
            bail!("fused attention's second derivative: mismatched gradient shapes");
        }
        let mut out = vec![T::f(0.0); qkv.len() + g.len()];
        let (qbar, gbar) = out.split_at_mut(qkv.len());
        let (src, gp, up) = (
            Shared(qkv.as_ptr() as *mut T),
            Shared(g.as_ptr() as *mut T),
            Shared(u.as_ptr() as *mut T),
        );
        let (dq, dg) = (Shared(qbar.as_mut_ptr()), Shared(gbar.as_mut_ptr()));
        (0..b * h).into_par_iter().for_each_init(
            || vec![T::f(0.0); 6 * nq * n],
            |buf, task| {
                let (bi, hi) = (task / h, task % h);
                let (p, rest) = buf.split_at_mut(nq * n);
                let (dp, rest) = rest.split_at_mut(nq * n);
                let (ds, rest) = rest.split_at_mut(nq * n);
                let (dsb, rest) = rest.split_at_mut(nq * n);
                let (pb, dpb) = rest.split_at_mut(nq * n);
                let c = scale;
                // SAFETY: as in the backward; the task reads image bi's rows of qkv, u and dO
                // and writes only its head's columns of image bi's rows of both outputs.
                unsafe {
                    let at = |m: *const T| m.add(bi * n * r + hi * d);
                    let base = at(src.ptr());
                    let (q, k, v) = (base.add((n - nq) * r), base.add(dim), base.add(2 * dim));
                    let ub = at(up.ptr());
                    let (uq, uk, uv) = (ub.add((n - nq) * r), ub.add(dim), ub.add(2 * dim));
                    let go = (gp.ptr() as *const T).add(bi * nq * dim + hi * d);
                    let ob = dq.ptr().add(bi * n * r + hi * d);
                    let (oq, ok, ov) = (ob.add((n - nq) * r), ob.add(dim), ob.add(2 * dim));
                    let og = dg.ptr().add(bi * nq * dim + hi * d);
                    let m = |x: &[T]| (x.as_ptr(), n, 1);
                    let mt = |x: &[T]| (x.as_ptr(), 1, n);
                    probabilities(q, k, r, (nq, n, d), c, p);
                    mm(
                        (nq, n, d),
                        (dp.as_mut_ptr(), n, 1),
                        (go, dim, 1),
                        (v, 1, r),
                        1.0,
                    );
                    ds.copy_from_slice(dp);
                    for (prow, row) in p.chunks(n).zip(ds.chunks_mut(n)) {
                        softmax_row_bwd(prow, row);
                    }
                    let dsb_ = (dsb.as_mut_ptr(), n, 1);
                    gemm_into((nq, n, d), dsb_, (uq, r, 1), (k, 1, r), c, false, SERIAL);
                    gemm_into((nq, n, d), dsb_, (q, r, 1), (uk, 1, r), c, true, SERIAL);
                    dpb.copy_from_slice(dsb);
                    for (prow, row) in p.chunks(n).zip(dpb.chunks_mut(n)) {
                        softmax_row_bwd(prow, row);
                    }
                    // dS̄ becomes its contribution to P̄.
                    for ((prow, dprow), row) in p.chunks(n).zip(dp.chunks(n)).zip(dsb.chunks_mut(n))
                    {
                        softmax_row_bwd2(prow, dprow, row);
                    }
                    mm(
                        (nq, n, d),
                        (pb.as_mut_ptr(), n, 1),
                        (go, dim, 1),
                        (uv, 1, r),
                        1.0,
                    );
                    pb.iter_mut().zip(dsb.iter()).for_each(|(a, b)| *a += *b);
                    for (prow, row) in p.chunks(n).zip(pb.chunks_mut(n)) {
                        softmax_row_bwd(prow, row); // S̄
                    }
                    gemm_into((nq, d, n), (oq, r, 1), m(ds), (uk, r, 1), c, false, SERIAL);
                    gemm_into((nq, d, n), (oq, r, 1), m(pb), (k, r, 1), c, true, SERIAL);
                    gemm_into((n, d, nq), (ok, r, 1), mt(ds), (uq, r, 1), c, false, SERIAL);
                    gemm_into((n, d, nq), (ok, r, 1), mt(pb), (q, r, 1), c, true, SERIAL);
                    mm((n, d, nq), (ov, r, 1), mt(dpb), (go, dim, 1), 1.0);
                    gemm_into(
                        (nq, d, n),
                        (og, dim, 1),
                        m(p),
                        (uv, r, 1),
                        1.0,
                        false,
                        SERIAL,
                    );
                    gemm_into(
                        (nq, d, n),
                        (og, dim, 1),
                        m(dpb),
                        (v, r, 1),
                        1.0,
                        true,
                        SERIAL,
                    );
                }
            },
        );
        Ok(out)
    }
}

/// [`AttentionBwd::second`] as an op on (qkv, dO, u).
struct AttentionBwd2(Attention);

impl CustomOp3 for AttentionBwd2 {
    fn name(&self) -> &'static str {
        "fused-attention-second-derivative"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        by_dtype!(s1, name, |T| {
            let (qkv, g) = (slice::<T>(s1, l1, name)?, slice::<T>(s2, l2, name)?);
            let out = AttentionBwd(self.0).second(qkv, g, slice::<T>(s3, l3, name)?, l1)?;
            let len = out.len();
            Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
        })
    }
}

/// Fused attention core of a CPU (B, N, 3D) qkv tensor: (B, n_query, D).
pub fn attention(qkv: &Tensor, heads: usize, n_query: usize, scale: f64) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(Attention {
        heads,
        n_query,
        scale,
    })
}

// ------------------------------------------------------------------------------------------
// Linear layer
// ------------------------------------------------------------------------------------------

/// y (..., O) = x (..., K) · wᵀ + b with w (O, K), M rows: one gemm on every core that starts
/// from the bias rows, instead of a product, a broadcast add and, backward, a single-threaded
/// sum over the broadcast rows.
///
/// On the second-order thread its three backward ops are recorded (each with a backward pass
/// of its own), so a gradient taken through it can be differentiated again: there it replaces
/// the six forward and about sixteen backward nodes of the primitive form with one and three.
struct Linear;

/// A layout as a matrix: (rows, last dimension).
fn as_matrix(l: &Layout) -> (usize, usize) {
    let last = l.dims().last().copied().unwrap_or(1);
    (l.shape().elem_count() / last.max(1), last)
}

/// `dims` with the last dimension replaced by `last`.
fn with_last(dims: &[usize], last: usize) -> Shape {
    let mut d = dims.to_vec();
    if let Some(x) = d.last_mut() {
        *x = last;
    }
    Shape::from(d)
}

/// (M, K, O) of a linear layer's operands, checked.
fn linear_dims(x: &Layout, w: &Layout, b: &Layout) -> Result<(usize, usize, usize)> {
    let (m, k) = as_matrix(x);
    let (o, kw) = w.shape().dims2()?;
    let ob = b.shape().dims1()?;
    if x.dims().is_empty() || k != kw || o != ob {
        bail!(
            "fused linear: input {:?}, weight {:?}, bias {:?} do not fit",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    Ok((m, k, o))
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (m, k, o) = linear_dims(lx, lw, lb)?;
        by_dtype!(sx, name, |T| {
            let (x, w, b) = (
                slice::<T>(sx, lx, name)?,
                slice::<T>(sw, lw, name)?,
                slice::<T>(sb, lb, name)?,
            );
            let mut y = vec![T::f(0.0); m * o];
            y.par_chunks_mut(o * rows_per_task(o))
                .for_each(|rows| rows.chunks_mut(o).for_each(|r| r.copy_from_slice(b)));
            // SAFETY: x is m x k, w is o x k (read as its transpose), y is m x o; y is fresh.
            unsafe {
                gemm_into(
                    (m, o, k),
                    (y.as_mut_ptr(), o, 1),
                    (x.as_ptr(), k, 1),
                    (w.as_ptr(), 1, k),
                    1.0,
                    true,
                    all_cores(),
                )
            };
            Ok((T::to_cpu_storage_owned(y), with_last(lx.dims(), o)))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let db = if super::ops::second_order() {
            g.apply_op1(ColumnSum)?
        } else {
            g.apply_op1_no_bwd(&ColumnSum)?
        };
        Ok((
            Some(recorded_on_second_order(&g, w, LinearProduct::Input)?),
            Some(recorded_on_second_order(&g, x, LinearProduct::Weight)?),
            Some(db),
        ))
    }
}

/// a (..., K) · mᵀ for m (O, K): the linear layer's product without a bias (in a product's
/// second backward pass, which records nothing).
fn times_transpose(a: &Tensor, m: &Tensor) -> Result<Tensor> {
    a.contiguous()?
        .apply_op2_no_bwd(&m.contiguous()?, &LinearProduct::Output)
}

/// A fresh buffer of `len` values that `product` fills completely: a gemm that does not read
/// its destination, with inner dimension `inner`. No zero-filling first (a pass over the
/// output that the product overwrites); with `inner` 0 gemm multiplies nothing, so the buffer
/// is zero-filled then.
///
/// # Safety
/// `product`, given the buffer's pointer, must write all `len` values when `inner` > 0.
unsafe fn gemm_output<T: Float>(len: usize, inner: usize, product: impl FnOnce(*mut T)) -> Vec<T> {
    if inner == 0 {
        let mut out = vec![T::f(0.0); len];
        product(out.as_mut_ptr());
        return out;
    }
    let mut out: Vec<std::mem::MaybeUninit<T>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit values need no initialisation.
    unsafe { out.set_len(len) };
    product(out.as_mut_ptr().cast());
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: every value was written (the caller's promise); MaybeUninit<T> has T's layout.
    unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast(), out.len(), out.capacity()) }
}

/// The products of a linear layer without its bias, each of its first operand with the second:
/// its backward pass's, from the output gradient g (..., O), M rows, dx = g · w (..., K) and
/// dw = gᵀ · x (O, K); and the forward's, x (..., K) · wᵀ (..., O) for w (O, K), which the
/// second backward pass of those two needs ([`times_transpose`]).
enum LinearProduct {
    Input,
    Weight,
    Output,
}

impl CustomOp2 for LinearProduct {
    fn name(&self) -> &'static str {
        "fused-linear-product"
    }

    /// Both products are bilinear: for an incoming u, dx = g w gives ḡ = u wᵀ and w̄ = gᵀ u;
    /// dw = gᵀ x gives ḡ = x uᵀ and x̄ = g u. Runs in the second backward pass of an exact
    /// Hessian-vector product, which records no graph, so these need no backward of their own.
    fn bwd(
        &self,
        g: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        u: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let u = u.contiguous()?;
        Ok(match self {
            LinearProduct::Input => (
                Some(times_transpose(&u, a)?),
                Some(g.apply_op2_no_bwd(&u, &LinearProduct::Weight)?),
            ),
            LinearProduct::Weight => (
                Some(times_transpose(a, &u)?),
                Some(g.apply_op2_no_bwd(&u, &LinearProduct::Input)?),
            ),
            // Applied only in that second pass, where nothing is recorded.
            LinearProduct::Output => {
                bail!("{}: the forward's product has no backward op", self.name())
            }
        })
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (m, o) = as_matrix(lg);
        let (r, c) = as_matrix(l2);
        let (rows, k, shape) = match self {
            LinearProduct::Input if r == o => (m, c, with_last(lg.dims(), c)),
            LinearProduct::Weight if r == m => (o, c, Shape::from((o, c))),
            LinearProduct::Output if c == o && l2.dims().len() == 2 => {
                (m, r, with_last(lg.dims(), r))
            }
            _ => bail!(
                "{name}: gradient {:?} and operand {:?}",
                lg.dims(),
                l2.dims()
            ),
        };
        by_dtype!(sg, name, |T| {
            let (g, a) = (slice::<T>(sg, lg, name)?, slice::<T>(s2, l2, name)?);
            // g as m x o, or read as its transpose o x m; a as inner x k, or (Output, a is
            // k x inner) read as its transpose.
            let (lhs, inner, rhs) = match self {
                LinearProduct::Input => ((g.as_ptr(), o, 1), o, (a.as_ptr(), k, 1)),
                LinearProduct::Weight => ((g.as_ptr(), 1, o), m, (a.as_ptr(), k, 1)),
                LinearProduct::Output => ((g.as_ptr(), o, 1), o, (a.as_ptr(), 1, o)),
            };
            // SAFETY: the strides describe the row-major g and a exactly; out is fresh, rows x
            // k, and the product writes all of it.
            let out = unsafe {
                gemm_output(rows * k, inner, |out| {
                    gemm_into(
                        (rows, k, inner),
                        (out, k, 1),
                        lhs,
                        rhs,
                        1.0,
                        false,
                        all_cores(),
                    )
                })
            };
            Ok((T::to_cpu_storage_owned(out), shape))
        })
    }
}

/// Sums of a matrix's columns (the bias gradient), over row blocks of fixed size on every core
/// and then over the blocks in order, so the result does not depend on the thread count.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }

    /// Every row gets the incoming gradient.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.broadcast_as(arg.shape())?))
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (_, o) = as_matrix(l);
        by_dtype!(s, name, |T| {
            let g = slice::<T>(s, l, name)?;
            let block = o * rows_per_task(o);
            let partial: Vec<Vec<f64>> = g
                .par_chunks(block.max(1))
                .map(|rows| {
                    let mut acc = vec![0.0f64; o];
                    for r in rows.chunks(o) {
                        acc.iter_mut().zip(r).for_each(|(a, v)| *a += v.d());
                    }
                    acc
                })
                .collect();
            let out: Vec<T> = in_block_order(&partial, o).into_iter().map(T::f).collect();
            Ok((T::to_cpu_storage_owned(out), Shape::from(o)))
        })
    }
}

/// Fused linear layer of a CPU (..., K) f32/f64 input: (..., O), without reshapes (whose
/// backward passes would each be another pass over the gradient).
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}

// ------------------------------------------------------------------------------------------
// Directional derivative of a gradient
// ------------------------------------------------------------------------------------------

/// <g, v> for a gradient g (its graph kept) and a fixed direction v of the same shape: the
/// scalar whose backward pass gives H v. As (g · v).sum_all() it was three passes over every
/// parameter more than needed (the product forward; backward, the sum's gradient broadcast
/// into a filled tensor and the product's gradient g · ones): here the backward pass hands v
/// itself on to g, unscaled when the incoming gradient is 1 (as it is from the sum of these).
struct Directional;

impl CustomOp2 for Directional {
    fn name(&self) -> &'static str {
        "directional-derivative"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        if lg.dims() != lv.dims() {
            bail!(
                "{name}: gradient {:?}, direction {:?}",
                lg.dims(),
                lv.dims()
            );
        }
        by_dtype!(sg, name, |T| {
            let (g, v) = (slice::<T>(sg, lg, name)?, slice::<T>(sv, lv, name)?);
            let partial: Vec<Vec<f64>> = g
                .par_chunks(CHUNK)
                .zip(v.par_chunks(CHUNK))
                .map(|(g, v)| vec![dot_f64(g, v)])
                .collect();
            let total = T::f(in_block_order(&partial, 1)[0]);
            Ok((T::to_cpu_storage_owned(vec![total]), Shape::from(())))
        })
    }

    fn bwd(
        &self,
        _g: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let dg = if scale == 1.0 {
            v.clone()
        } else {
            v.affine(scale, 0.0)?
        };
        Ok((Some(dg), None))
    }
}

/// Σ a b in f64, in 8 interleaved partial sums (so the loop vectorises; AVX2 where the CPU
/// has it), added in a fixed order.
fn dot_f64<T: Float>(a: &[T], b: &[T]) -> f64 {
    #[inline(always)]
    fn each<T: Float>(a: &[T], b: &[T]) -> f64 {
        let mut acc = [0.0f64; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f64 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x.d() * y.d())
            .sum();
        for (x, y) in ca.zip(cb) {
            for i in 0..8 {
                acc[i] += x[i].d() * y[i].d();
            }
        }
        acc.iter().sum::<f64>() + tail
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<T: Float>(a: &[T], b: &[T]) -> f64 {
            each(a, b)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked above.
            return unsafe { avx2(a, b) };
        }
    }
    each(a, b)
}

/// <g, v> (a scalar) of two CPU f32/f64 tensors of one shape, differentiable in g (see
/// [`Directional`]).
pub fn directional(g: &Tensor, v: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&v.contiguous()?, Directional)
}

#[cfg(test)]
mod tests {
    use super::super::ops::primitive;
    use super::*;
    use candle_core::{DType, Device, Var, D};

    fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                2.0 * z
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let b = b
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let scale = a.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
            / scale
    }

    /// Value and the gradients of <f(x, w, b), r> w.r.t. x, w, b, for an op and its
    /// primitive form, in f64 and f32 (the f32 tolerance allows its rounding).
    fn compare(
        name: &str,
        fused: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
        reference: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
    ) {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            // Row widths below and above a task's chunk; a transposed (strided) input.
            for (k, dims) in [vec![3usize, 5, 7], vec![4, 33, 192], vec![2, 3, 700]]
                .into_iter()
                .enumerate()
            {
                let d = *dims.last().unwrap();
                let x = Var::from_tensor(&randn(&dims, k as u64, dtype)).unwrap();
                let w = Var::from_tensor(&randn(&[d], 10 + k as u64, dtype)).unwrap();
                let b = Var::from_tensor(&randn(&[d], 20 + k as u64, dtype)).unwrap();
                let r = randn(&dims, 30 + k as u64, dtype);
                let (ya, yb) = (
                    fused(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap(),
                    reference(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap(),
                );
                assert!(max_rel(&yb, &ya) < tol, "{name} {dtype:?} {dims:?}: value");
                let ga = (&ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = (&yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for (what, v) in [("x", &x), ("w", &w), ("b", &b)] {
                    match (ga.get(v.as_tensor()), gb.get(v.as_tensor())) {
                        (Some(a), Some(b)) => {
                            let e = max_rel(b, a);
                            assert!(e < tol, "{name} {dtype:?} {dims:?}: d{what} off by {e:e}")
                        }
                        (None, None) => {}
                        _ => panic!("{name} {dtype:?}: d{what} present on one side only"),
                    }
                }
            }
        }
    }

    #[test]
    fn layer_norm_and_its_gradients_match_the_primitive_form() {
        compare(
            "layer norm",
            |x, w, b| layer_norm(x, w, b, 1e-6),
            |x, w, b| primitive::layer_norm(x, w, b, 1e-6),
        );
    }

    #[test]
    fn softmax_and_its_gradient_match_the_primitive_form() {
        compare(
            "softmax",
            |x, _, _| softmax_last_dim(x),
            |x, _, _| primitive::softmax_last_dim(x),
        );
        // Rows sum to one, and a transposed input is taken as its values.
        let x = randn(&[6, 9], 1, DType::F64).t().unwrap();
        let y = softmax_last_dim(&x).unwrap();
        let sums = y.sum(D::Minus1).unwrap().to_vec1::<f64>().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-14));
        assert!(max_rel(&primitive::softmax_last_dim(&x).unwrap(), &y) < 1e-15);
    }

    #[test]
    fn gelu_and_its_gradient_match_the_erf_formula() {
        // The reference is 0.5 x (1 + erf(x / sqrt 2)) from primitive ops, not candle's
        // gelu_erf, whose backward has 6-digit constants.
        compare(
            "gelu",
            |x, _, _| gelu_erf(x),
            |x, _, _| {
                let e = (x / std::f64::consts::SQRT_2)?.erf()?;
                (x * 0.5)? * (e + 1.0)?
            },
        );
        let x = Tensor::new(&[0.0f64, 1.0, -2.0], &Device::Cpu).unwrap();
        let y = gelu_erf(&x).unwrap().to_vec1::<f64>().unwrap();
        // Φ(1) = 0.841344746068543, Φ(-2) = 0.0227501319481792 (tables).
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 0.841344746068543).abs() < 1e-15);
        assert!((y[2] + 2.0 * 0.0227501319481792).abs() < 1e-15);
    }

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
                assert!(max_rel(&yb, &ya) < tol, "{dtype:?} {m}x{k}x{o}: value");
                let ga = (&ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = (&yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for (what, v) in [("x", xt), ("w", wt), ("b", bt)] {
                    let e = max_rel(gb.get(v).unwrap(), ga.get(v).unwrap());
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

    #[test]
    fn f32_exp_and_normal_functions_are_within_rounding_of_f64() {
        // e^y on [-87, 0]: relative error a few f32 ulps.
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let y = -(i as f64) * 1e-4;
            let got = exp_nonpositive_f32(y as f32) as f64;
            let want = (y as f32 as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "exp: relative error {worst:e}");
        // GELU and its derivative on [-12, 12] against the erf formula in f64 (libm): within
        // A&S 7.1.26's 1.5e-7 on Φ, scaled by |x|, plus f32 rounding (measured: 1.8e-7 and
        // 2.9e-7, 2.5 ulps of 1).
        let (mut wg, mut wd) = (0.0f64, 0.0f64);
        for i in -240_000..=240_000 {
            let x = (i as f64 * 5e-5) as f32;
            let xd = x as f64;
            let scale = xd.abs().max(1.0);
            wg = wg.max((x.gelu() as f64 - xd.gelu()).abs() / scale);
            wd = wd.max((x.gelu_grad() as f64 - xd.gelu_grad()).abs() / scale);
        }
        assert!(wg < 4e-7 && wd < 4e-7, "gelu {wg:e}, gelu' {wd:e}");
        // Tails: exactly 0 and x far out, and NaN stays NaN (the training guard needs it).
        assert_eq!((-30.0f32).gelu(), 0.0);
        assert_eq!((-30.0f32).gelu_grad(), 0.0);
        assert_eq!(30.0f32.gelu(), 30.0);
        assert_eq!(30.0f32.gelu_grad(), 1.0);
        assert!(f32::NAN.gelu().is_nan() && f32::NAN.gelu_grad().is_nan());
    }

    /// The attention core from primitive ops, as `vit::Attention` computes it off the fused
    /// path: (B, N, 3D) qkv -> (B, nq, D).
    fn attention_reference(qkv: &Tensor, h: usize, nq: usize) -> candle_core::Result<Tensor> {
        let (b, n, r) = qkv.dims3()?;
        let (dim, d) = (r / 3, r / 3 / h);
        let t = qkv.reshape((b, n, 3, h, d))?.permute((2, 0, 3, 1, 4))?;
        let q = t.get(0)?.narrow(2, n - nq, nq)?.contiguous()?;
        let (k, v) = (t.get(1)?.contiguous()?, t.get(2)?.contiguous()?);
        let s = (q * (d as f64).powf(-0.5))?.matmul(&k.t()?)?;
        primitive::softmax_last_dim(&s)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, nq, dim))
    }

    #[test]
    fn attention_and_its_gradient_match_the_primitive_form() {
        // Self-attention (nq = n) and attention fusion's last-layer queries (nq < n); head
        // widths below and above gemm's blocking.
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            for (k, (b, n, h, d, nq)) in [(2, 5, 2, 3, 5), (3, 17, 3, 64, 17), (2, 12, 2, 8, 4)]
                .into_iter()
                .enumerate()
            {
                let qkv =
                    Var::from_tensor(&randn(&[b, n, 3 * h * d], 40 + k as u64, dtype)).unwrap();
                let r = randn(&[b, nq, h * d], 50 + k as u64, dtype);
                let scale = (d as f64).powf(-0.5);
                let ya = attention(qkv.as_tensor(), h, nq, scale).unwrap();
                let yb = attention_reference(qkv.as_tensor(), h, nq).unwrap();
                assert_eq!(ya.dims(), yb.dims());
                assert!(max_rel(&yb, &ya) < tol, "{dtype:?} case {k}: value");
                let ga = (&ya * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = (&yb * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let (ga, gb) = (
                    ga.get(qkv.as_tensor()).unwrap(),
                    gb.get(qkv.as_tensor()).unwrap(),
                );
                let e = max_rel(gb, ga);
                assert!(e < tol, "{dtype:?} case {k}: dqkv off by {e:e}");
            }
        }
    }

    #[test]
    fn gelu_second_derivative_on_the_second_order_thread_is_analytic() {
        // d²/dx² of Σ gelu(x) by double backward through the fused GELU's recorded backward op.
        let got = crate::analysis::hvp::with_second_order(|| {
            let x = Var::new(&[0.7f64, -1.3, 3.1], &Device::Cpu)?;
            let y = super::super::ops::gelu(x.as_tensor())?.sum_all()?;
            let g = y.backward()?;
            let dx = g.get(x.as_tensor()).unwrap().clone();
            let h = dx.sum_all()?.backward()?;
            Ok(h.get(x.as_tensor()).unwrap().to_vec1::<f64>()?)
        })
        .unwrap();
        // GELU'' = φ(x) (2 - x²).
        for (x, g) in [0.7f64, -1.3, 3.1].iter().zip(&got) {
            let phi = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!((g - phi * (2.0 - x * x)).abs() < 1e-12, "{x}: {g}");
        }
    }

    #[test]
    fn f32_gelu_second_derivative_matches_the_f64_formula() {
        // The vectorised f32 form of φ(x) (2 - x²) against the f64 one, out to the tails
        // where it is cut to zero (no subnormals, which are slow on x86).
        for i in -1500..=1500 {
            let x = i as f32 / 100.0;
            let (got, want) = (x.gelu_grad2() as f64, (x as f64).gelu_grad2());
            assert!((got - want).abs() < 3e-7, "{x}: {got} against {want}");
            assert!(
                got == 0.0 || got.abs() >= f32::MIN_POSITIVE as f64,
                "{x}: {got}"
            );
        }
        // GELU''(0) = 2 φ(0) = 2 / √(2π); GELU''(√2) = 0.
        assert!((0f32.gelu_grad2() - 0.797_884_6).abs() < 1e-7);
        assert!(std::f32::consts::SQRT_2.gelu_grad2().abs() < 1e-7);
    }

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
            assert_eq!(max_rel(&dg, &(&v * 2.0).unwrap()), 0.0);
            let dg = (d * 3.0).unwrap().backward().unwrap();
            let dg = dg.get(g.as_tensor()).unwrap();
            assert!(max_rel(dg, &(&v * 3.0).unwrap()) < 1e-15);
        }
    }

    /// x Φ(x) from candle's erf, whose derivative candle knows exactly; not `gelu_erf`
    /// (primitive::gelu), whose backward pass rounds 1/√(2π) to 0.398942 (7e-7 relative).
    fn gelu_from_erf(x: &Tensor) -> candle_core::Result<Tensor> {
        ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?.mul(x)? * 0.5
    }

    /// x w + b, w and b broadcast along the last dimension.
    fn affine(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_mul(w)?.broadcast_add(b)
    }

    /// H v of L = Σ r ⊙ y ⊙ y, y = op(x, w, b), with respect to (x, w, b), by double backward
    /// on the second-order thread, through `op`'s form there and through `reference`.
    fn hvp_through(
        op: fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
        (x_dims, w_dims, y_dims): (&'static [usize], &'static [usize], &'static [usize]),
    ) -> [Tensor; 3] {
        crate::analysis::hvp::with_second_order(move || {
            let x = Var::from_tensor(&randn(x_dims, 70, DType::F64))?;
            let w = Var::from_tensor(&randn(w_dims, 71, DType::F64))?;
            let b = Var::from_tensor(&randn(&w_dims[..1], 72, DType::F64))?;
            let r = randn(y_dims, 73, DType::F64);
            let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let y = op(xt, wt, bt)?;
            let g = (&y * &y)?.mul(&r)?.sum_all()?.backward()?;
            let mut gv = Tensor::new(0.0f64, &Device::Cpu)?;
            for (i, t) in [xt, wt, bt].into_iter().enumerate() {
                let v = randn(t.dims(), 80 + i as u64, DType::F64);
                gv = (gv + (g.get(t).unwrap() * v)?.sum_all()?)?;
            }
            let h = gv.backward()?;
            Ok([xt, wt, bt].map(|t| h.get(t).unwrap().clone()))
        })
        .unwrap()
    }

    #[test]
    fn second_derivatives_through_the_fused_ops_match_the_primitive_forms() {
        // On the second-order thread ops::linear and ops::layer_norm are the fused ops with
        // backward passes built from candle's ops; ops::softmax_last_dim, ops::gelu and the
        // attention core the fused ops with recorded backward ops; the primitive forms are the
        // reference. The ops of one input take x w + b (elementwise) so that all three inputs
        // are reached.
        type Op = fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>;
        let cases: [(&str, Op, Op, _); 6] = [
            (
                "linear",
                |x, w, b| super::super::ops::linear(x, w, b, None),
                |x, w, b| primitive::linear(x, w, b, None),
                (&[2usize, 5, 4][..], &[3usize, 4][..], &[2usize, 5, 3][..]),
            ),
            (
                "layer norm",
                |x, w, b| super::super::ops::layer_norm(x, w, b, 1e-6),
                |x, w, b| primitive::layer_norm(x, w, b, 1e-6),
                (&[2, 5, 6][..], &[6][..], &[2, 5, 6][..]),
            ),
            (
                "softmax",
                |x, w, b| super::super::ops::softmax_last_dim(&affine(x, w, b)?),
                |x, w, b| primitive::softmax_last_dim(&affine(x, w, b)?),
                (&[2, 5, 6][..], &[6][..], &[2, 5, 6][..]),
            ),
            (
                "GELU",
                |x, w, b| super::super::ops::gelu(&affine(x, w, b)?),
                |x, w, b| gelu_from_erf(&affine(x, w, b)?),
                (&[3, 7][..], &[7][..], &[3, 7][..]),
            ),
            (
                "self-attention",
                |x, w, b| attention(&affine(x, w, b)?, 2, 5, 3f64.powf(-0.5)),
                |x, w, b| attention_reference(&affine(x, w, b)?, 2, 5),
                (&[2, 5, 18][..], &[18][..], &[2, 5, 6][..]),
            ),
            (
                "attention of the last 4 of 12 tokens",
                |x, w, b| attention(&affine(x, w, b)?, 2, 4, 8f64.powf(-0.5)),
                |x, w, b| attention_reference(&affine(x, w, b)?, 2, 4),
                (&[2, 12, 48][..], &[48][..], &[2, 4, 16][..]),
            ),
        ];
        for (name, op, reference, dims) in cases {
            let (a, b) = (hvp_through(op, dims), hvp_through(reference, dims));
            for (what, (a, b)) in ["x", "w", "b"].iter().zip(a.iter().zip(&b)) {
                let e = max_rel(b, a);
                assert!(e < 1e-11, "{name}: (H v)_{what} off by {e:e}");
            }
        }
    }
}
