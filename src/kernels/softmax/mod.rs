//! Softmax over the last dimension: one fused pass forward, one backward ([`cpu`]); the
//! backward op records a backward of its own on a second-order thread.

pub(super) mod cpu;
#[cfg(test)]
mod tests;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use self::cpu::{softmax_bwd, softmax_fwd, softmax_row_bwd2};
use super::second_order::recorded_on_second_order;
use crate::kernels::cpu::*;

struct Softmax;

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
