//! What every CPU kernel stands on: the float types they handle ([`Float`], f32 and f64, with
//! the f32 exp and normal functions the GELU needs), contiguous slices of candle's storage,
//! rows and chunks split over rayon's pool, loops compiled a second time for AVX2, and sums
//! added in a fixed block order so a result never depends on the thread count.
//! Sums over a row accumulate in f64 in both precisions.

use candle_core::{bail, CpuStorage, Layout, Result, Shape, WithDType};
use rayon::prelude::*;

/// The float types the kernels handle, with the functions they need.
pub(super) trait Float:
    WithDType
    + Send
    + Sync
    + Copy
    + 'static
    + std::ops::Add<Output = Self>
    + std::ops::AddAssign
    + std::ops::Mul<Output = Self>
{
    fn f(v: f64) -> Self;
    fn d(self) -> f64;
    fn exp(self) -> Self;
    /// Exact GELU, x Φ(x).
    fn gelu(self) -> Self;
    /// Its derivative, Φ(x) + x φ(x).
    fn gelu_grad(self) -> Self;
    /// Its second derivative, φ(x) (2 - x²) (in f64; only second-order work needs it).
    fn gelu_grad2(self) -> Self {
        let x = self.d();
        Self::f((-0.5 * x * x).exp() * FRAC_1_SQRT_2PI * (2.0 - x * x))
    }
}

impl Float for f32 {
    fn f(v: f64) -> Self {
        v as f32
    }
    fn d(self) -> f64 {
        self as f64
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn gelu(self) -> Self {
        let (cdf, _) = normal_f32(self);
        self * cdf
    }
    #[inline(always)]
    fn gelu_grad(self) -> Self {
        let (cdf, pdf) = normal_f32(self);
        cdf + self * pdf
    }
    /// φ(x) (2 - x²) in f32, branch-free so it vectorises (zero where φ(x) < 1e-35, as in
    /// [`normal_f32`], so no subnormals arise).
    #[inline(always)]
    fn gelu_grad2(self) -> Self {
        let h = 0.5 * self * self;
        let e = if h > 81.0 {
            0.0
        } else {
            exp_nonpositive_f32(-h)
        };
        e * FRAC_1_SQRT_2PI as f32 * (2.0 - self * self)
    }
}

impl Float for f64 {
    fn f(v: f64) -> Self {
        v
    }
    fn d(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn gelu(self) -> Self {
        0.5 * self * (1.0 + libm::erf(self * std::f64::consts::FRAC_1_SQRT_2))
    }
    fn gelu_grad(self) -> Self {
        let cdf = 0.5 * (1.0 + libm::erf(self * std::f64::consts::FRAC_1_SQRT_2));
        cdf + self * (-0.5 * self * self).exp() * FRAC_1_SQRT_2PI
    }
}

/// Elements per parallel chunk of an elementwise kernel (enough work to pay for the task).
pub(super) const CHUNK: usize = 1 << 14;

/// The contiguous slice of a storage, or an error naming the op.
pub(super) fn slice<'a, T: Float>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => bail!("{op}: expects a contiguous input"),
    }
}

/// The sum of per-block partial sums (each `len` long), added in block order: the same result
/// whatever the threads did (rayon's own reduce adds in a scheduling-dependent order).
pub(super) fn in_block_order(partial: &[Vec<f64>], len: usize) -> Vec<f64> {
    let mut total = vec![0.0; len];
    for p in partial {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// Rows of a row-wise kernel grouped so each task gets about CHUNK elements.
pub(super) fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// Dispatches a generic kernel on the storage's float type.
macro_rules! by_dtype {
    ($s:expr, $name:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("{}: f32 or f64 only", $name),
        }
    };
}
pub(super) use by_dtype;

pub(super) const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// An elementwise map over chunks on every core.
pub(super) fn map1<T: Float>(x: &[T], f: impl Fn(T) -> T + Sync + Copy) -> Vec<T> {
    let mut out = vec![T::f(0.0); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, xs)| vectorised(o, xs, xs, |a, _| f(a)));
    out
}

/// out[i] = f(a[i], b[i]), compiled a second time for AVX2 and taken where the CPU has it (the
/// build targets baseline x86-64, whose 4-lane SSE2 code is the fallback). Plain IEEE
/// arithmetic without reductions, so both give the same bits.
#[inline(always)]
pub(super) fn vectorised<T: Float>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T + Copy) {
    #[inline(always)]
    fn each<T: Float>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = f(x, y);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<T: Float>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
            each(out, a, b, f)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked above.
            return unsafe { avx2(out, a, b, f) };
        }
    }
    each(out, a, b, f)
}

/// out[i] = f(out[i], a[i]), compiled for AVX2 as [`vectorised`].
#[inline(always)]
pub(super) fn vectorised_in_place<T: Float>(out: &mut [T], a: &[T], f: impl Fn(T, T) -> T + Copy) {
    #[inline(always)]
    fn each<T: Float>(out: &mut [T], a: &[T], f: impl Fn(T, T) -> T) {
        for (o, &x) in out.iter_mut().zip(a) {
            *o = f(*o, x);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<T: Float>(out: &mut [T], a: &[T], f: impl Fn(T, T) -> T) {
            each(out, a, f)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked above.
            return unsafe { avx2(out, a, f) };
        }
    }
    each(out, a, f)
}

/// e^y for f32 y ≤ 0, branch-free so it vectorises: 2^n e^r with |r| ≤ ln 2 / 2 and Cephes'
/// degree-6 expf polynomial; results below e^-87 are not needed here (clamped).
#[inline(always)]
pub(super) fn exp_nonpositive_f32(y: f32) -> f32 {
    let y = y.max(-87.0);
    let n = (y * std::f32::consts::LOG2_E + 0.5).floor();
    // ln 2 in two parts, so n · ln 2 is subtracted without rounding error.
    let r = y - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_2e-4f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    // 2^n built from n's bits: 1.5 · 2^23 + n holds n (|n| ≤ 126) in its low mantissa bits.
    // A float-to-int cast would saturate lane by lane in scalar code.
    const MAGIC: f32 = 12_582_912.0;
    let n_bits = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// (Φ(x), φ(x)) of the standard normal in f32, branch-free: erfc by Abramowitz and Stegun
/// 7.1.26 (absolute error below 1.5e-7, the form PyTorch's vectorised CPU erf uses), taken from
/// the side where it does not cancel.
#[inline(always)]
pub(super) fn normal_f32(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let a = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * a);
    let mut poly = A[4];
    for c in [A[3], A[2], A[1], A[0]] {
        poly = poly * t + c;
    }
    // Beyond |x| = 9 √2 both are below 1e-35: zero, so no subnormals (slow on x86) arise.
    let e = if a > 9.0 {
        0.0
    } else {
        exp_nonpositive_f32(-a * a)
    };
    let tail = 0.5 * t * poly * e; // Φ(-|x|)
    let cdf = if x < 0.0 { tail } else { 1.0 - tail };
    (cdf, e * FRAC_1_SQRT_2PI as f32)
}

/// Σ a b in f64, in 8 interleaved partial sums (so the loop vectorises; AVX2 where the CPU
/// has it), added in a fixed order.
pub(super) fn dot_f64<T: Float>(a: &[T], b: &[T]) -> f64 {
    #[inline(always)]
    fn each<T: Float>(a: &[T], b: &[T]) -> f64 {
        let mut acc = [0.0f64; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f64 = ca
            .remainder()
            .iter()
            .zip(cb.remainder())
            .map(|(x, y)| x.d() * y.d())
            .sum();
        for (x, y) in ca.zip(cb) {
            for i in 0..8 {
                acc[i] += x[i].d() * y[i].d();
            }
        }
        acc.iter().sum::<f64>() + tail
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<T: Float>(a: &[T], b: &[T]) -> f64 {
            each(a, b)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked above.
            return unsafe { avx2(a, b) };
        }
    }
    each(a, b)
}

/// A layout as a matrix: (rows, last dimension).
pub(super) fn as_matrix(l: &Layout) -> (usize, usize) {
    let last = l.dims().last().copied().unwrap_or(1);
    (l.shape().elem_count() / last.max(1), last)
}

/// `dims` with the last dimension replaced by `last`.
pub(super) fn with_last(dims: &[usize], last: usize) -> Shape {
    let mut d = dims.to_vec();
    if let Some(x) = d.last_mut() {
        *x = last;
    }
    Shape::from(d)
}
