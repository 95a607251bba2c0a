//! Layer norm over the last dimension, (x - mean) / sqrt(var + eps) * w + b with the biased
//! variance (torch.nn.LayerNorm): one fused pass forward, one backward ([`cpu`]).
//!
//! Built from candle's primitive ops a layer norm is 8 kernels forward and about 20 backward,
//! each allocating a tensor and streaming memory: on the CPU those and their page faults, not
//! the matrix products, were where a training step went (docs/candle.md).

mod cpu;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use self::cpu::{layer_norm_bwd, layer_norm_bwd2, layer_norm_fwd};
use crate::kernels::cpu::*;

/// (x - mean) / sqrt(var + eps) * w + b over the last dimension, biased variance.
///
/// On the second-order thread its backward op is recorded (with a backward pass of its own,
/// [`LayerNormBwd2`]), so a gradient taken through it can be differentiated again: there it
/// replaces the primitive form's 13 forward nodes and their backward graph.
struct LayerNorm {
    eps: f64,
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
        let packed = if crate::kernels::second_order::second_order() {
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
