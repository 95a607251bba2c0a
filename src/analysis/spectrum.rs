//! Fourier analysis of feature maps (Park & Kim, "How Do Vision Transformers Work?", ICLR 2022;
//! reused by the MFF paper's frequency plots), docs/reference.md section 3.
//!
//! For one feature tensor of N = h*w tokens (cls dropped) and C channels: every (sample, channel)
//! map is reshaped row-major to (h, w), transformed by a 2-D FFT (rows, then columns), turned
//! into log(|F| + 1e-6), and averaged over samples and channels. After fftshift the zero
//! frequency sits at (h/2, w/2); the curve is the half diagonal (h/2+m, w/2+m) for
//! m = 0..h/2-1 minus its first element (the DC value): the relative log amplitude
//! Delta log amplitude at frequency m*2*pi/h. Pure functions on slices; no tensors.

use anyhow::Result;
use rayon::prelude::*;
use rustfft::num_complex::Complex;
use std::sync::Arc;

use rustfft::{Fft, FftPlanner};

use super::features::Layer;
use crate::output::csv_text;

/// log(|F| + EPS), as the reference.
pub const EPS: f64 = 1e-6;

/// Sums log amplitudes of (h, w) maps over any number of feature batches.
#[derive(Debug, Clone)]
pub struct Accumulator {
    h: usize,
    w: usize,
    /// Unshifted sum of log(|F| + EPS), (h, w) row-major.
    sum: Vec<f64>,
    /// Number of maps added.
    count: usize,
}

impl Accumulator {
    pub fn new(h: usize, w: usize) -> Accumulator {
        Accumulator {
            h,
            w,
            sum: vec![0.0; h * w],
            count: 0,
        }
    }

    /// Adds the `batch * channels` maps of `tokens`, a (batch, h*w, channels) row-major array:
    /// the map of (b, c) is `tokens[b, :, c]` read row-major as (h, w).
    ///
    /// The maps are real, which halves the work twice: two channels go through one complex
    /// row transform (as real and imaginary part, separated afterwards), and only the columns
    /// 0..=w/2 are transformed and summed, since |F(k, l)| = |F(-k, -l)| fills in the rest.
    ///
    /// Samples are transformed in parallel, in fixed groups whose partial sums are added in
    /// group order, so the result does not depend on the threads.
    pub fn add(&mut self, tokens: &[f32], batch: usize, channels: usize) {
        let (h, w) = (self.h, self.w);
        let n = h * w;
        assert_eq!(
            tokens.len(),
            batch * n * channels,
            "tokens are not (B, h*w, C)"
        );
        let mut planner = FftPlanner::<f64>::new();
        let plan = GroupPlan {
            h,
            w,
            half: w / 2 + 1,
            channels,
            pairs: channels.div_ceil(2),
            row_fft: planner.plan_fft_forward(w),
            col_fft: planner.plan_fft_forward(h),
        };
        // About 64k map entries per group.
        let per_group = ((1 << 16) / (n * channels).max(1)).max(1);
        let partials: Vec<Vec<f64>> = tokens
            .par_chunks(per_group * n * channels)
            .map(|group| plan.group_sums(group))
            .collect();
        for p in &partials {
            self.add_mirrored(p, plan.half);
        }
        self.count += batch * channels;
    }

    /// Adds a group's sums over (k, l), l = 0..=w/2, to the whole (h, w) map: columns past
    /// w/2 mirror, (k, l) has the amplitude of (-k, -l).
    fn add_mirrored(&mut self, partial: &[f64], half: usize) {
        let (h, w) = (self.h, self.w);
        for k in 0..h {
            for l in 0..w {
                let (kk, ll) = if l < half {
                    (k, l)
                } else {
                    ((h - k) % h, w - l)
                };
                self.sum[k * w + l] += partial[kk * half + ll];
            }
        }
    }
    /// The mean log-amplitude map, fftshifted so the zero frequency is at (h/2, w/2).
    pub fn finish(&self) -> LogAmplitude {
        let (h, w) = (self.h, self.w);
        let scale = 1.0 / self.count.max(1) as f64;
        let mut map = vec![0.0; h * w];
        for i in 0..h {
            for j in 0..w {
                // fftshift: shifted[k] = original[(k - n/2) mod n] (numpy's roll by n/2).
                let (si, sj) = ((i + h / 2) % h, (j + w / 2) % w);
                map[si * w + sj] = self.sum[i * w + j] * scale;
            }
        }
        LogAmplitude { h, w, map }
    }
}

/// What every group of samples in [`Accumulator::add`] shares: the sizes and the two FFTs.
///
/// The work is split per sample into three steps (load channel pairs, row transforms and
/// their separation, column transforms and amplitudes); each step's inner loops stay whole,
/// so the split costs a call per sample and nothing per value (measured: 64 samples of
/// 14x14x192 in release, 6.6 ms split against 6.8 ms as one function, identical sums).
struct GroupPlan {
    h: usize,
    w: usize,
    /// Columns 0..=w/2: the half of the transform a real map needs.
    half: usize,
    channels: usize,
    /// Channel pairs (c, c + 1), one complex map each.
    pairs: usize,
    row_fft: Arc<dyn Fft<f64>>,
    col_fft: Arc<dyn Fft<f64>>,
}

impl GroupPlan {
    /// Sums of log(|F| + EPS) over the samples of `group`, laid out (h, half).
    fn group_sums(&self, group: &[f32]) -> Vec<f64> {
        let (h, n, half) = (self.h, self.h * self.w, self.half);
        let zero = Complex::new(0.0, 0.0);
        let mut sum = vec![0.0; h * half];
        // Products of |F| + EPS per frequency, turned into one logarithm every few maps
        // (ln a + ln b = ln ab): a logarithm per value was most of the analysis' time.
        let mut prod = vec![1.0f64; h * half];
        let mut pending = 0;
        // Channel pairs (c, c + 1) as one complex map each, (pairs, h, w); then the
        // columns of every channel's transform, (channels, half, h).
        let mut maps = vec![zero; self.pairs * n];
        let mut cols = vec![zero; self.channels * half * h];
        let mut scratch = vec![
            zero;
            self.row_fft
                .get_inplace_scratch_len()
                .max(self.col_fft.get_inplace_scratch_len())
        ];
        for sample in group.chunks_exact(n * self.channels) {
            self.load_pairs(sample, &mut maps);
            self.row_fft.process_with_scratch(&mut maps, &mut scratch); // every row
            self.separate_pairs(&maps, &mut cols);
            self.col_fft.process_with_scratch(&mut cols, &mut scratch); // every column
            self.multiply_amplitudes(&cols, &mut sum, &mut prod, &mut pending);
        }
        flush_logs(&mut sum, &mut prod);
        sum
    }

    /// One sample's (h*w, channels) tokens as channel pairs: map p holds channel 2p as its
    /// real and channel 2p + 1 (or 0) as its imaginary part.
    fn load_pairs(&self, sample: &[f32], maps: &mut [Complex<f64>]) {
        let n = self.h * self.w;
        for (t, token) in sample.chunks_exact(self.channels).enumerate() {
            for (p, two) in token.chunks(2).enumerate() {
                let im = two.get(1).copied().unwrap_or(0.0);
                maps[p * n + t] = Complex::new(two[0] as f64, im as f64);
            }
        }
    }

    /// Splits the row transforms of the pairs into each channel's, transposed to columns.
    /// Z = A + iB row by row: A[l] = (Z[l] + conj Z[-l]) / 2 and B[l] = (Z[l] - conj Z[-l]) / 2i.
    fn separate_pairs(&self, maps: &[Complex<f64>], cols: &mut [Complex<f64>]) {
        let (h, w, half, n) = (self.h, self.w, self.half, self.h * self.w);
        for p in 0..self.pairs {
            let (ca, cb) = (2 * p, 2 * p + 1);
            for i in 0..h {
                let row = &maps[p * n + i * w..p * n + (i + 1) * w];
                for l in 0..half {
                    let (z, zm) = (row[l], row[(w - l) % w]);
                    cols[(ca * half + l) * h + i] =
                        Complex::new(0.5 * (z.re + zm.re), 0.5 * (z.im - zm.im));
                    if cb < self.channels {
                        cols[(cb * half + l) * h + i] =
                            Complex::new(0.5 * (z.im + zm.im), -0.5 * (z.re - zm.re));
                    }
                }
            }
        }
    }

    /// Multiplies |F| + EPS of every channel's transform into `prod`, flushing the
    /// products' logarithms into `sum` every 8 maps (or at once when one grows extreme).
    fn multiply_amplitudes(
        &self,
        cols: &[Complex<f64>],
        sum: &mut [f64],
        prod: &mut [f64],
        pending: &mut usize,
    ) {
        let (h, half) = (self.h, self.half);
        for map in cols.chunks_exact(half * h) {
            let mut extreme = false;
            for l in 0..half {
                for k in 0..h {
                    // |F| as sqrt(re² + im²): Complex::norm's hypot is careful about
                    // overflow, which these values never reach, and several times slower.
                    let f = map[l * h + k];
                    let p = &mut prod[k * half + l];
                    *p *= (f.re * f.re + f.im * f.im).sqrt() + EPS;
                    extreme |= !(1e-150..=1e150).contains(p);
                }
            }
            *pending += 1;
            // 8 factors of at most 1e18 (or at least 1e-6) stay far inside f64's range;
            // anything larger is flushed at once.
            if *pending == 8 || extreme {
                flush_logs(sum, prod);
                *pending = 0;
            }
        }
    }
}

/// Mean log amplitude over samples and channels, zero frequency at (h/2, w/2).
#[derive(Debug, Clone, PartialEq)]
pub struct LogAmplitude {
    pub h: usize,
    pub w: usize,
    /// (h, w) row-major.
    pub map: Vec<f64>,
}

impl LogAmplitude {
    /// The half diagonal from the centre minus its DC value: h/2 values (the Nyquist corner
    /// is never included), at frequencies [`frequencies`].
    pub fn delta_diagonal(&self) -> Vec<f64> {
        let (h, w) = (self.h, self.w);
        let (ci, cj) = (h / 2, w / 2);
        let dc = self.map[ci * w + cj];
        (0..h / 2)
            .map(|m| self.map[(ci + m) * w + (cj + m)] - dc)
            .collect()
    }
}

/// Frequencies of [`LogAmplitude::delta_diagonal`] in units of pi: m*2/h for m = 0..h/2-1.
pub fn frequencies(h: usize) -> Vec<f64> {
    (0..h / 2).map(|m| 2.0 * m as f64 / h as f64).collect()
}

/// Adds ln of each product to its sum and resets the products to 1.
fn flush_logs(sum: &mut [f64], prod: &mut [f64]) {
    for (s, p) in sum.iter_mut().zip(prod.iter_mut()) {
        *s += p.ln();
        *p = 1.0;
    }
}

/// The relative log-amplitude curve of one (batch, h*w, channels) feature array.
pub fn delta_log_amplitude(tokens: &[f32], batch: usize, h: usize, w: usize) -> Vec<f64> {
    let channels = tokens.len() / (batch * h * w).max(1);
    let mut acc = Accumulator::new(h, w);
    acc.add(tokens, batch, channels);
    acc.finish().delta_diagonal()
}

/// The relative log-amplitude curve of one layer of one checkpoint: a block of the
/// `spectrum.csv` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub checkpoint: String,
    pub layer: Layer,
    /// Frequencies in units of pi.
    pub freq: Vec<f64>,
    pub delta: Vec<f64>,
}

impl Curve {
    /// Delta log amplitude at the highest frequency (the depth plot's value).
    pub fn high_freq(&self) -> f64 {
        self.delta.last().copied().unwrap_or(0.0)
    }
}

/// `spectrum.csv`: checkpoint,layer,freq,delta_log_amplitude.
pub fn spectrum_csv(curves: &[Curve]) -> Result<String> {
    let rows = curves.iter().flat_map(|c| {
        c.freq.iter().zip(&c.delta).map(|(f, d)| {
            [
                c.checkpoint.clone(),
                c.layer.name.clone(),
                format!("{f:.6}"),
                format!("{d:.8}"),
            ]
        })
    });
    csv_text(
        &["checkpoint", "layer", "freq", "delta_log_amplitude"],
        rows,
    )
}

/// `depth.csv`: checkpoint,layer,depth,high_freq_delta.
pub fn depth_csv(curves: &[Curve]) -> Result<String> {
    let rows = curves.iter().map(|c| {
        [
            c.checkpoint.clone(),
            c.layer.name.clone(),
            format!("{:.6}", c.layer.depth),
            format!("{:.8}", c.high_freq()),
        ]
    });
    csv_text(&["checkpoint", "layer", "depth", "high_freq_delta"], rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A constant map c: F(0,0) = c*h*w and F = 0 elsewhere, so (docs/reference.md section 3)
    /// Delta(m > 0) = log(1e-6) - log(c*h*w + 1e-6).
    #[test]
    fn constant_map_has_the_analytic_curve() {
        let (h, w, c) = (8, 8, 0.7f32);
        let d = delta_log_amplitude(&vec![c; 2 * h * w * 3], 2, h, w);
        assert_eq!(d.len(), 4);
        assert_eq!(d[0], 0.0);
        let want = EPS.ln() - (c as f64 * 64.0 + EPS).ln();
        for v in &d[1..] {
            assert!((v - want).abs() < 1e-9, "{v} vs {want}");
        }
    }

    /// A pure cosine along the diagonal, cos(2 pi k (i + j) / h), puts h*w/2 at (k, k) and at
    /// (-k, -k) and nothing elsewhere (not even at DC): the curve is
    /// log(h*w/2 + 1e-6) - log(1e-6) at m = k and 0 at every other m.
    #[test]
    fn diagonal_cosine_lands_on_its_frequency() {
        let (h, w, k) = (8usize, 8usize, 2usize);
        let tokens: Vec<f32> = (0..h * w)
            .map(|t| {
                let (i, j) = (t / w, t % w);
                (2.0 * std::f64::consts::PI * (k * (i + j)) as f64 / h as f64).cos() as f32
            })
            .collect();
        let mut acc = Accumulator::new(h, w);
        acc.add(&tokens, 1, 1);
        let la = acc.finish();
        // |F| = h*w/2 at (h/2 + k, w/2 + k) after the shift, ~0 at the DC centre.
        let peak = la.map[(h / 2 + k) * w + (w / 2 + k)];
        assert!((peak - (32.0f64 + EPS).ln()).abs() < 1e-6, "peak {peak}");
        let d = la.delta_diagonal();
        assert!(
            (d[k] - ((32.0f64 + EPS).ln() - EPS.ln())).abs() < 1e-6,
            "{d:?}"
        );
        assert!(d[1].abs() < 1e-3 && d[3].abs() < 1e-3, "{d:?}");
    }

    /// Channels and samples are averaged: one channel constant 1 and one channel constant 2
    /// give the mean of their two log maps.
    #[test]
    fn averages_over_samples_and_channels() {
        let (h, w) = (4, 4);
        let mut tokens = vec![0f32; h * w * 2];
        for t in 0..h * w {
            tokens[t * 2] = 1.0;
            tokens[t * 2 + 1] = 2.0;
        }
        let d = delta_log_amplitude(&tokens, 1, h, w);
        let dc = (16f64 + EPS).ln() / 2.0 + (32f64 + EPS).ln() / 2.0;
        assert!((d[1] - (EPS.ln() - dc)).abs() < 1e-9);
    }

    /// The sum of log(|F| + EPS) over maps, one logarithm per value and per map, straight
    /// from the DFT definition (independent of rustfft and of the product trick).
    fn naive_log_sum(tokens: &[f32], batch: usize, h: usize, w: usize, c: usize) -> Vec<f64> {
        let mut sum = vec![0.0; h * w];
        for b in 0..batch {
            for ch in 0..c {
                for (u, s) in sum.iter_mut().enumerate() {
                    let (ku, kv) = ((u / w) as f64, (u % w) as f64);
                    let (mut re, mut im) = (0.0f64, 0.0f64);
                    for t in 0..h * w {
                        let (i, j) = ((t / w) as f64, (t % w) as f64);
                        let x = tokens[(b * h * w + t) * c + ch] as f64;
                        let a =
                            -2.0 * std::f64::consts::PI * (ku * i / h as f64 + kv * j / w as f64);
                        re += x * a.cos();
                        im += x * a.sin();
                    }
                    *s += ((re * re + im * im).sqrt() + EPS).ln();
                }
            }
        }
        sum
    }

    /// The sums match one logarithm per value of a plain DFT: with amplitudes from 1e-6 to 1e39
    /// (eight of the largest would overflow f64, so products are flushed early), with an odd
    /// channel count (the last channel transformed without a partner), odd widths and heights
    /// (the mirrored half), and non-square maps.
    #[test]
    fn sums_match_a_plain_dft_with_a_log_per_value() {
        for (h, w, c, batch) in [(4usize, 4usize, 3usize, 7usize), (3, 5, 2, 4), (5, 6, 1, 3)] {
            let tokens: Vec<f32> = (0..batch * h * w * c)
                .map(|k| {
                    let scale = [1e-9f64, 1.0, 5e37][(k / 5) % 3];
                    (scale * (1.0 + ((k * 37) % 11) as f64 - 5.0)) as f32
                })
                .collect();
            let mut acc = Accumulator::new(h, w);
            acc.add(&tokens, batch, c);
            let want = naive_log_sum(&tokens, batch, h, w, c);
            for (got, want) in acc.sum.iter().zip(&want) {
                assert!(
                    (got - want).abs() < 1e-9 * want.abs().max(1.0),
                    "{h}x{w}, {c} channels: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn frequencies_are_in_units_of_pi() {
        assert_eq!(frequencies(8), vec![0.0, 0.25, 0.5, 0.75]);
        assert_eq!(frequencies(14).len(), 7);
    }
}
