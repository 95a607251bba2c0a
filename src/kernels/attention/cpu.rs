//! The attention core's CPU kernels: forward, and the backward op's own backward (for exact
//! Hessian-vector products), one (image, head) per task.

use candle_core::{bail, Layout, Result};
use rayon::prelude::*;

use super::{Attention, AttentionBwd};
use crate::kernels::cpu::*;
use crate::kernels::gemm::*;
use crate::kernels::softmax::cpu::{softmax_row, softmax_row_bwd, softmax_row_bwd2};

/// The attention probabilities of one (image, head): P (nq x n) = softmax(scale · Q Kᵀ).
///
/// # Safety
/// `q` and `k` point into a qkv buffer of row stride `r`.
pub(super) unsafe fn probabilities<T: Float>(
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
    pub(super) fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
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

    pub(super) fn fwd<T: Float>(
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

impl AttentionBwd {
    /// The gradients of this op's output (dqkv) contracted with u (shaped like qkv), with
    /// respect to qkv and to the incoming gradient dO, as one buffer: B·N·3D values of the
    /// first, then B·Nq·D of the second. Per (image, head), with P, dP = dO Vᵀ and dS
    /// recomputed and U split into U_Q (the query rows), U_K, U_V:
    /// - dS̄ = scale (U_Q Kᵀ + Q U_Kᵀ); dP̄ = P (dS̄ - rowsum(dS̄ P));
    /// - P̄ = dO U_Vᵀ + dS̄ (dP - rowsum(dP P)) - dP rowsum(dS̄ P); S̄ = P (P̄ - rowsum(P̄ P));
    /// - Q̄ = scale (dS U_K + S̄ K); K̄ = scale (dSᵀ U_Q + S̄ᵀ Q); V̄ = dP̄ᵀ dO;
    /// - dŌ = P U_V + dP̄ V.
    ///
    /// One function past the crate's 80-line guide on purpose: a hot kernel whose task body is
    /// the derivation above in order, and whose pointers share one safety argument (the
    /// task's rows and columns); split up, each piece would need the whole argument again.
    pub(super) fn second<T: Float>(
        &self,
        qkv: &[T],
        g: &[T],
        u: &[T],
        l: &Layout,
    ) -> Result<Vec<T>> {
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
