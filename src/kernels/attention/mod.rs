//! The attention core, softmax(scale · Q Kᵀ) V per (image, head), read straight from the fused
//! qkv projection and written straight into the heads-concatenated output: no permuted
//! copies. The CustomOps and their wiring are here; the kernels in [`cpu`].

mod cpu;

use self::cpu::probabilities;
#[cfg(test)]
mod tests;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::second_order::recorded_on_second_order;
use super::softmax::cpu::softmax_row_bwd;
use crate::kernels::cpu::*;
use crate::kernels::gemm::*;

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
