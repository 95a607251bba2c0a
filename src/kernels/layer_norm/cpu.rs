//! The layer norm's CPU kernels: forward, backward, and the backward's own backward (for
//! exact Hessian-vector products), rows split over the cores.

use rayon::prelude::*;

use crate::kernels::cpu::*;

/// Mean and 1/sqrt(var + eps) of one row, accumulated in f64.
pub(super) fn row_stats<T: Float>(row: &[T], eps: f64) -> (f64, f64) {
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

pub(super) fn layer_norm_fwd<T: Float>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
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

pub(super) fn layer_norm_bwd<T: Float>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
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

pub(super) fn layer_norm_bwd2<T: Float>(x: &[T], g: &[T], u: &[T], w: &[f64], eps: f64) -> Vec<T> {
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
