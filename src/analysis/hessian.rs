//! Hessian eigenvalues by power iteration with deflation, and Hutchinson's trace estimate
//! (PyHessian, as used by how-do-vits-work; docs/reference.md section 4).
//!
//! The algorithms only see a symmetric linear operator `v -> H v` on flat f64 vectors, so they
//! are tested on matrices with known spectra; [`super::hvp`] supplies the operator of a model's
//! loss.

use anyhow::Result;
use rand::Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

/// Stopping rule of the power iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerSettings {
    pub max_iters: usize,
    /// Stop when |lambda_prev - lambda| / (|lambda_prev| + 1e-6) < tol.
    pub tol: f64,
}

impl Default for PowerSettings {
    fn default() -> Self {
        PowerSettings {
            max_iters: 100,
            tol: 1e-3,
        }
    }
}

/// One eigenpair found by [`top_eigen`].
#[derive(Debug, Clone)]
pub struct Eigen {
    pub value: f64,
    /// Unit-norm eigenvector estimate.
    pub vector: Vec<f64>,
    /// Hessian-vector products spent on it.
    pub iterations: usize,
    pub converged: bool,
    /// Wall time of its search.
    pub seconds: f64,
}

/// Elements per block of the vector operations below. The blocks are fixed, not the thread
/// count, so a sum adds the same partial sums in the same order on any machine: the same seed
/// gives the same eigenvalue to the last bit.
const BLOCK: usize = 1 << 15;

/// <a, b>: each block's sum on rayon's pool, the blocks' sums added in order. A model's
/// parameter vector has millions of entries, and power iteration takes three such sums and two
/// scalings per product: on one core they were 7% of a power iteration's time, with the
/// second core idle.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot of vectors of different lengths");
    let partial: Vec<f64> = a
        .par_chunks(BLOCK)
        .zip(b.par_chunks(BLOCK))
        .map(|(x, y)| x.iter().zip(y).map(|(x, y)| x * y).sum())
        .collect();
    partial.iter().sum()
}

/// x += c * u, on rayon's pool.
pub fn add_multiple(x: &mut [f64], c: f64, u: &[f64]) {
    x.par_chunks_mut(BLOCK)
        .zip(u.par_chunks(BLOCK))
        .for_each(|(x, u)| x.iter_mut().zip(u).for_each(|(x, u)| *x += c * u));
}

/// (<a, b>, <a, a>) in one pass over the vectors, each sum exactly as [`dot`] takes it.
fn dot_and_square(a: &[f64], b: &[f64]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "dot of vectors of different lengths");
    let partial: Vec<(f64, f64)> = a
        .par_chunks(BLOCK)
        .zip(b.par_chunks(BLOCK))
        .map(|(x, y)| {
            let ab = x.iter().zip(y).map(|(x, y)| x * y).sum();
            let aa = x.iter().map(|x| x * x).sum();
            (ab, aa)
        })
        .collect();
    (
        partial.iter().map(|p| p.0).sum(),
        partial.iter().map(|p| p.1).sum(),
    )
}

/// v / (||v|| + 1e-6), PyHessian's `normalization`.
pub fn normalized(v: Vec<f64>) -> Vec<f64> {
    let square = dot(&v, &v);
    normalized_by(v, square)
}

/// v / (sqrt(square) + 1e-6) for `square` = <v, v>: [`normalized`] with the sum already taken.
fn normalized_by(mut v: Vec<f64>, square: f64) -> Vec<f64> {
    let n = square.sqrt() + 1e-6;
    v.par_chunks_mut(BLOCK)
        .for_each(|v| v.iter_mut().for_each(|x| *x /= n));
    v
}

/// v with its components along the (unit) `basis` vectors removed, then normalised
/// (PyHessian's `orthnormal`).
fn orthonormalized(mut v: Vec<f64>, basis: &[Eigen]) -> Vec<f64> {
    for e in basis {
        let c = dot(&v, &e.vector);
        add_multiple(&mut v, -c, &e.vector);
    }
    normalized(v)
}

/// A standard-normal start vector of length `n`.
pub fn gaussian(n: usize, rng: &mut impl Rng) -> Vec<f64> {
    (0..n)
        .map(|_| rng.sample::<f64, _>(StandardNormal))
        .collect()
}

/// The `k` eigenvalues of largest magnitude of the symmetric operator `hvp` on vectors of
/// length `n`, by power iteration with deflation (each search stays orthogonal to the
/// eigenvectors already found), in the order found. Start vectors come from `rng`.
///
/// Per iteration, as PyHessian: orthonormalise v against the found eigenvectors, Hv,
/// lambda = <Hv, v>, v = Hv / ||Hv||. The value reported is the newest Rayleigh quotient;
/// PyHessian keeps the previous one on convergence, which differs from it by less than `tol`
/// relative, and the newer one is the better estimate.
pub fn top_eigen(
    n: usize,
    k: usize,
    settings: PowerSettings,
    rng: &mut impl Rng,
    mut hvp: impl FnMut(&[f64]) -> Result<Vec<f64>>,
) -> Result<Vec<Eigen>> {
    let mut found: Vec<Eigen> = Vec::with_capacity(k);
    for _ in 0..k.min(n) {
        let start = std::time::Instant::now();
        let mut v = normalized(gaussian(n, rng));
        let mut value: Option<f64> = None;
        let (mut iterations, mut converged) = (0, false);
        for _ in 0..settings.max_iters {
            v = orthonormalized(v, &found);
            let hv = hvp(&v)?;
            iterations += 1;
            let (lambda, square) = dot_and_square(&hv, &v);
            v = normalized_by(hv, square);
            let prev = value.replace(lambda);
            if let Some(p) = prev {
                if (p - lambda).abs() / (p.abs() + 1e-6) < settings.tol {
                    converged = true;
                    break;
                }
            }
        }
        found.push(Eigen {
            value: value.unwrap_or(0.0),
            vector: v,
            iterations,
            converged,
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    Ok(found)
}

/// Hutchinson's estimate of tr(H): the mean of v^T H v over `samples` Rademacher vectors,
/// with its standard error.
pub fn hutchinson_trace(
    n: usize,
    samples: usize,
    rng: &mut impl Rng,
    mut hvp: impl FnMut(&[f64]) -> Result<Vec<f64>>,
) -> Result<(f64, f64)> {
    let mut vals = Vec::with_capacity(samples);
    for _ in 0..samples {
        let v: Vec<f64> = (0..n)
            .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
            .collect();
        vals.push(dot(&hvp(&v)?, &v));
    }
    let m = vals.len().max(1) as f64;
    let mean = vals.iter().sum::<f64>() / m;
    let var = vals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (m - 1.0).max(1.0);
    Ok((mean, (var / m).sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{stream, Purpose};

    /// A symmetric matrix Q diag(eig) Q^T with a random orthogonal Q (Gram-Schmidt).
    fn matrix(eig: &[f64], seed: u64) -> Vec<Vec<f64>> {
        let n = eig.len();
        let mut rng = stream(seed, Purpose::Synthetic, 0);
        let mut q: Vec<Vec<f64>> = Vec::new();
        while q.len() < n {
            let mut v = gaussian(n, &mut rng);
            for u in &q {
                let c = dot(&v, u);
                add_multiple(&mut v, -c, u);
            }
            q.push(normalized(v));
        }
        (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| (0..n).map(|k| q[k][i] * eig[k] * q[k][j]).sum())
                    .collect()
            })
            .collect()
    }

    fn apply(m: &[Vec<f64>], v: &[f64]) -> Result<Vec<f64>> {
        Ok(m.iter().map(|row| dot(row, v)).collect())
    }

    #[test]
    fn finds_eigenvalues_by_magnitude_in_order() {
        // Well separated magnitudes, one negative: power iteration must return 6, -4, 2.
        let m = matrix(&[0.3, 2.0, -4.0, 6.0, 0.1, -0.5], 1);
        let tight = PowerSettings {
            max_iters: 2000,
            tol: 1e-12,
        };
        let mut rng = stream(3, Purpose::PowerIteration, 0);
        let e = top_eigen(6, 3, tight, &mut rng, |v| apply(&m, v)).unwrap();
        let vals: Vec<f64> = e.iter().map(|e| e.value).collect();
        // The reference's v / (||v|| + 1e-6) leaves ||v||² = 1 - ~2e-6, so lambda = <Hv, v> is
        // low by a few 1e-6 relative: part of the recipe, not of the test's error.
        for (got, want) in vals.iter().zip([6.0, -4.0, 2.0]) {
            assert!((got - want).abs() / want.abs() < 1e-5, "{vals:?}");
        }
        assert!(e.iter().all(|e| e.converged));
        // Eigenvectors: H u = lambda u and mutually orthogonal.
        for e1 in &e {
            let hu = apply(&m, &e1.vector).unwrap();
            let res: f64 = hu
                .iter()
                .zip(&e1.vector)
                .map(|(h, u)| (h - e1.value * u).powi(2))
                .sum();
            assert!(res.sqrt() < 1e-4, "residual {res}");
        }
        assert!(dot(&e[0].vector, &e[1].vector).abs() < 1e-6);
    }

    #[test]
    fn blocked_vector_operations_are_exact_and_independent_of_the_thread_count() {
        // Past three blocks, with a ragged last one. Integers: every sum is exact in f64.
        let n = 3 * BLOCK + 5;
        let ones = vec![1.0; n];
        let index: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let want = (n * (n - 1) / 2) as f64;
        assert_eq!(dot(&ones, &index), want);
        let mut x = ones.clone();
        add_multiple(&mut x, -2.0, &index);
        assert!(x
            .iter()
            .enumerate()
            .all(|(i, &v)| v == 1.0 - 2.0 * i as f64));
        // Rounding: the same bits on one thread as on three (the blocks fix the order).
        let mut rng = stream(7, Purpose::Synthetic, 0);
        let (a, b) = (gaussian(n, &mut rng), gaussian(n, &mut rng));
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                (
                    dot(&a, &b),
                    normalized(a.clone()),
                    dot_and_square(&a, &b),
                    dot(&a, &a),
                )
            })
        };
        let ((d1, v1, both1, sq1), (d3, v3, both3, _)) = (on(1), on(3));
        assert_eq!(d1.to_bits(), d3.to_bits());
        assert!(v1.iter().zip(&v3).all(|(x, y)| x.to_bits() == y.to_bits()));
        // The fused pass of the power iteration takes both sums exactly as the two dots do.
        for (ab, aa) in [both1, both3] {
            assert_eq!((ab.to_bits(), aa.to_bits()), (d1.to_bits(), sq1.to_bits()));
        }
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((d1 - naive).abs() < 1e-9 * n as f64, "{d1} against {naive}");
    }

    #[test]
    fn default_tolerance_stops_early_and_says_so() {
        let m = matrix(&[1.0, 1.05, 5.0], 2);
        let mut rng = stream(4, Purpose::PowerIteration, 0);
        let e = top_eigen(3, 1, PowerSettings::default(), &mut rng, |v| apply(&m, v)).unwrap();
        assert!(e[0].converged && e[0].iterations < 100);
        assert!((e[0].value - 5.0).abs() / 5.0 < 1e-2, "{}", e[0].value);
        let capped = PowerSettings {
            max_iters: 2,
            tol: 0.0,
        };
        let e = top_eigen(3, 1, capped, &mut rng, |v| apply(&m, v)).unwrap();
        assert!(!e[0].converged && e[0].iterations == 2);
    }

    #[test]
    fn hutchinson_is_exact_on_diagonal_matrices() {
        // Rademacher v: v^T D v = tr(D) for every sample when D is diagonal.
        let d = [1.5, -2.0, 4.0, 0.25];
        let mut rng = stream(5, Purpose::PowerIteration, 0);
        let (t, se) = hutchinson_trace(4, 10, &mut rng, |v| {
            Ok(v.iter().zip(d).map(|(x, y)| x * y).collect())
        })
        .unwrap();
        assert!((t - 3.75).abs() < 1e-12 && se < 1e-12);
        // A dense matrix: unbiased, within a few standard errors.
        let m = matrix(&[3.0, -1.0, 2.0, 0.5, 1.0], 6);
        let (t, se) = hutchinson_trace(5, 400, &mut rng, |v| apply(&m, v)).unwrap();
        assert!((t - 5.5).abs() < 4.0 * se + 1e-9, "{t} +- {se}");
    }
}
