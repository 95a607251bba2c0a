//! The seed <g, v> of a Hessian-vector product's second backward pass, as one op.

#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::kernels::cpu::*;

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

/// <g, v> (a scalar) of two CPU f32/f64 tensors of one shape, differentiable in g (see
/// [`Directional`]).
pub fn directional(g: &Tensor, v: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op2(&v.contiguous()?, Directional)
}
