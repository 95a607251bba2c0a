//! One AdamW update of a parameter and its moments (torch.optim.AdamW's rule, see
//! `train::optim`): on the CPU in place, one pass per tensor and no allocation (but for a
//! gradient that arrives strided); elsewhere with tensor ops.

use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use rayon::prelude::*;

/// The constants of one step for one parameter.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub beta1: f64,
    pub beta2: f64,
    /// 1 - lr wd for a decayed parameter, 1 otherwise.
    pub decay: f64,
    /// lr / (1 - beta1^t).
    pub rate: f64,
    /// sqrt(1 - beta2^t).
    pub bc2_sqrt: f64,
    pub eps: f64,
}

/// m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g²; p <- p decay - rate m / (sqrt(v)/bc2_sqrt + eps).
pub fn adamw_update(
    var: &Var,
    m: &mut Tensor,
    v: &mut Tensor,
    g: &Tensor,
    s: &AdamWStep,
) -> Result<()> {
    let p = var.as_tensor();
    if p.device().is_cpu() && matches!(p.dtype(), DType::F32 | DType::F64) {
        let g = g.contiguous()?;
        let moment = |beta, square| Moment { beta, square };
        m.inplace_op2(&g, &moment(s.beta1, false))?;
        v.inplace_op2(&g, &moment(s.beta2, true))?;
        let update = Update {
            decay: s.decay,
            rate: s.rate,
            bc2_sqrt: s.bc2_sqrt,
            eps: s.eps,
        };
        return p.inplace_op3(m, v, &update);
    }
    let mut p = p.detach();
    if s.decay != 1.0 {
        p = (p * s.decay)?;
    }
    *m = ((&*m * s.beta1)? + (g * (1.0 - s.beta1))?)?;
    *v = ((&*v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let denom = ((v.sqrt()? / s.bc2_sqrt)? + s.eps)?;
    let update = (m.div(&denom)? * s.rate)?;
    var.set(&(p - update)?)
}

/// Elements per parallel chunk of the in-place updates.
const CHUNK: usize = 1 << 15;

/// The contiguous range of a layout.
fn range(l: &Layout) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => bail!("adamw: expects contiguous tensors"),
    }
}

/// m <- beta m + (1 - beta) g, or with g² for the second moment; in place.
struct Moment {
    beta: f64,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let (dr, gr) = (range(dl)?, range(gl)?);
        let square = self.square;
        macro_rules! run {
            ($t:ty, $m:expr, $g:expr) => {{
                let (b, c) = (self.beta as $t, (1.0 - self.beta) as $t);
                $m[dr]
                    .par_chunks_mut(CHUNK)
                    .zip($g[gr].par_chunks(CHUNK))
                    .for_each(|(m, g)| {
                        for (mi, &gi) in m.iter_mut().zip(g) {
                            let x = if square { gi * gi } else { gi };
                            *mi = *mi * b + x * c;
                        }
                    })
            }};
        }
        match (dst, g) {
            (CpuStorage::F32(m), CpuStorage::F32(g)) => run!(f32, m, g),
            (CpuStorage::F64(m), CpuStorage::F64(g)) => run!(f64, m, g),
            _ => bail!("adamw: f32 or f64 tensors of one dtype only"),
        }
        Ok(())
    }
}

/// p <- p decay - rate m / (sqrt(v) / bc2_sqrt + eps), in place: torch's AdamW with decay =
/// 1 - lr wd, rate = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t).
struct Update {
    decay: f64,
    rate: f64,
    bc2_sqrt: f64,
    eps: f64,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let (pr, mr, vr) = (range(dl)?, range(ml)?, range(vl)?);
        macro_rules! run {
            ($t:ty, $p:expr, $m:expr, $v:expr) => {{
                let (decay, rate, bc2, eps) = (
                    self.decay as $t,
                    self.rate as $t,
                    self.bc2_sqrt as $t,
                    self.eps as $t,
                );
                $p[pr]
                    .par_chunks_mut(CHUNK)
                    .zip($m[mr].par_chunks(CHUNK).zip($v[vr].par_chunks(CHUNK)))
                    .for_each(|(p, (m, v))| {
                        for ((pi, &mi), &vi) in p.iter_mut().zip(m).zip(v) {
                            *pi = *pi * decay - mi / (vi.sqrt() / bc2 + eps) * rate;
                        }
                    })
            }};
        }
        match (dst, m, v) {
            (CpuStorage::F32(p), CpuStorage::F32(m), CpuStorage::F32(v)) => run!(f32, p, m, v),
            (CpuStorage::F64(p), CpuStorage::F64(m), CpuStorage::F64(v)) => run!(f64, p, m, v),
            _ => bail!("adamw: f32 or f64 tensors of one dtype only"),
        }
        Ok(())
    }
}
