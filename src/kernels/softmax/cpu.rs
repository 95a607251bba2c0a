//! Row kernels of the softmax (the attention core uses them too), sums in f64.

use rayon::prelude::*;

use crate::kernels::cpu::*;

/// Softmax of one row, in place (max subtracted, sums in f64).
pub(in crate::kernels) fn softmax_row<T: Float>(row: &mut [T]) {
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
pub(in crate::kernels) fn softmax_row_bwd<T: Float>(y: &[T], g: &mut [T]) {
    let s: f64 = y.iter().zip(g.iter()).map(|(a, b)| a.d() * b.d()).sum();
    for (gi, yi) in g.iter_mut().zip(y) {
        *gi = T::f(yi.d() * (gi.d() - s));
    }
}

pub(in crate::kernels) fn softmax_fwd<T: Float>(x: &[T], d: usize) -> Vec<T> {
    let mut out = x.to_vec();
    out.par_chunks_mut(d * rows_per_task(d))
        .for_each(|o| o.chunks_mut(d).for_each(softmax_row));
    out
}

/// The second-order part of the softmax: for one row, with s = Σ y g and the incoming u,
/// d(dx)/dy contracted with u is u (g - s) - g Σ u y (written into `u`'s place).
pub(in crate::kernels) fn softmax_row_bwd2<T: Float>(y: &[T], g: &[T], u: &mut [T]) {
    let s: f64 = y.iter().zip(g).map(|(a, b)| a.d() * b.d()).sum();
    let uy: f64 = y.iter().zip(u.iter()).map(|(a, b)| a.d() * b.d()).sum();
    for (ui, gi) in u.iter_mut().zip(g) {
        *ui = T::f(ui.d() * (gi.d() - s) - gi.d() * uy);
    }
}

pub(in crate::kernels) fn softmax_bwd<T: Float>(y: &[T], g: &[T], d: usize) -> Vec<T> {
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
