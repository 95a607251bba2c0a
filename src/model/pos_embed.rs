//! 2-D sin-cos position tables (facebookresearch/mae `util/pos_embed.py`).
//!
//! For patch k = i*G + j of a G x G grid and width D with Q = D/4, omega_d = 10000^(-d/Q):
//! dims [0,Q) = sin(j omega), [Q,2Q) = cos(j omega), [2Q,3Q) = sin(i omega), [3Q,4Q) = cos(i omega).
//! The first half encodes the *column* j (MAE's meshgrid puts w first). mmpretrain swaps the
//! halves, which is why checkpoints carry their tables and loading never regenerates them.

/// The (1 + G*G, D) table with a zero row for the cls token first, row-major, computed in f64
/// and rounded to f32 as MAE does.
pub fn sincos_2d(dim: usize, grid: usize) -> Vec<f32> {
    let q = dim / 4;
    let omega: Vec<f64> = (0..q)
        .map(|d| 1.0 / 10000f64.powf(d as f64 / q as f64))
        .collect();
    let mut out = vec![0f32; (1 + grid * grid) * dim];
    for i in 0..grid {
        for j in 0..grid {
            let row = &mut out[(1 + i * grid + j) * dim..][..dim];
            for d in 0..q {
                let (col, rw) = (j as f64 * omega[d], i as f64 * omega[d]);
                row[d] = col.sin() as f32;
                row[q + d] = col.cos() as f32;
                row[2 * q + d] = rw.sin() as f32;
                row[3 * q + d] = rw.cos() as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b_values_from_reference_md() {
        // docs/reference.md: D=768, k=1 (row 0, column 1): d0 = sin 1, d192 = cos 1, d384 = sin 0, d576 = cos 0.
        let t = sincos_2d(768, 14);
        let r = &t[2 * 768..3 * 768]; // row 1 + k with k = 1
        assert!((r[0] - 0.841471).abs() < 1e-6);
        assert!((r[192] - 0.540302).abs() < 1e-6);
        assert_eq!(r[384], 0.0);
        assert_eq!(r[576], 1.0);
        assert!(t[..768].iter().all(|&v| v == 0.0), "cls row is zero");
    }

    #[test]
    fn second_half_encodes_the_row() {
        // Patch (i=1, j=0) = k = G: first half is the table of column 0, second of row 1.
        let (d, g) = (16, 4);
        let t = sincos_2d(d, g);
        let r = &t[(1 + g) * d..(2 + g) * d];
        assert_eq!(&r[..4], &[0.0; 4]);
        assert_eq!(&r[4..8], &[1.0; 4]);
        assert!((r[8] - 1f32.sin()).abs() < 1e-7);
        assert!((r[12] - 1f32.cos()).abs() < 1e-7);
    }
}
