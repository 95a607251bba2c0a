//! Exact (erf) GELU, x Φ(x), as torch.nn.GELU() in MAE (not the tanh approximation): an
//! elementwise map forward and backward over chunks on every core; the elementwise bodies
//! are [`Float::gelu`], [`Float::gelu_grad`] and [`Float::gelu_grad2`] (`kernels/cpu.rs`).

#[cfg(test)]
mod tests;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::second_order::recorded_on_second_order;
use crate::kernels::cpu::*;

struct Gelu;

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
