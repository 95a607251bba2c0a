//! The linear layer on the last dimension, y = x · wᵀ + b, as one gemm that starts from the
//! bias rows; its backward products; and the bias gradient's column sums.

#[cfg(test)]
mod tests;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::second_order::recorded_on_second_order;
use crate::kernels::cpu::*;
use crate::kernels::gemm::*;

/// y (..., O) = x (..., K) · wᵀ + b with w (O, K), M rows: one gemm on every core that starts
/// from the bias rows, instead of a product, a broadcast add and, backward, a single-threaded
/// sum over the broadcast rows.
///
/// On the second-order thread its three backward ops are recorded (each with a backward pass
/// of its own), so a gradient taken through it can be differentiated again: there it replaces
/// the six forward and about sixteen backward nodes of the primitive form with one and three.
struct Linear;

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
        let db = if crate::kernels::second_order::second_order() {
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
