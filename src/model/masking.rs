//! Patchify and MAE's random masking (facebookresearch/mae `models_mae.py`).
//!
//! Patchify: (B, C, H, W) -> (B, h*w, p*p*C) with patch k = r*w + s and element
//! e = (a*p + b)*C + c = pixel (c, r*p + a, s*p + b): the channel varies fastest.
//! Masking: per sample, noise ~ U[0,1) per patch; ids_shuffle = argsort(noise) (small noise is
//! kept); ids_restore = argsort(ids_shuffle); the first len_keep = floor(L (1 - r)) of
//! ids_shuffle are visible, in noise order; mask (1 = removed) is 0 for them.

use candle_core::{Device, Result, Tensor};
use rand::Rng;

use crate::config::len_keep;

/// (B, C, H, W) -> (B, L, p*p*C), channel fastest.
pub fn patchify(imgs: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = imgs.dims4()?;
    let (gh, gw) = (h / p, w / p);
    imgs.reshape(vec![b, c, gh, p, gw, p])? // B C h p w p
        .permute(vec![0, 2, 4, 3, 5, 1])? // B h w p p C
        .reshape((b, gh * gw, p * p * c))
}

/// Inverse of [`patchify`] for a square image: (B, L, p*p*C) -> (B, C, H, W).
pub fn unpatchify(x: &Tensor, p: usize, c: usize) -> Result<Tensor> {
    let (b, l, _) = x.dims3()?;
    let g = (l as f64).sqrt().round() as usize;
    x.reshape(vec![b, g, g, p, p, c])? // B h w p p C
        .permute(vec![0, 5, 1, 3, 2, 4])? // B C h p w p
        .reshape((b, c, g * p, g * p))
}

/// Indices of one masked batch; everything is (B, ...) row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub batch: usize,
    pub num_patches: usize,
    pub len_keep: usize,
    /// (B, len_keep): visible patches in noise order.
    pub ids_keep: Vec<u32>,
    /// (B, L): position of each patch in the shuffled order.
    pub ids_restore: Vec<u32>,
    /// (B, L): 1 = removed, 0 = visible.
    pub mask: Vec<f32>,
}

fn argsort(v: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    idx.sort_by(|&a, &b| v[a as usize].total_cmp(&v[b as usize]));
    idx
}

impl Mask {
    /// MAE's masking from given noise (B*L values).
    pub fn from_noise(noise: &[f32], batch: usize, num_patches: usize, ratio: f64) -> Mask {
        let l = num_patches;
        let keep = len_keep(l, ratio);
        let mut ids_keep = Vec::with_capacity(batch * keep);
        let mut ids_restore = Vec::with_capacity(batch * l);
        let mut mask = Vec::with_capacity(batch * l);
        for row in noise.chunks(l).take(batch) {
            let shuffle = argsort(row);
            let mut restore = vec![0u32; l];
            for (pos, &id) in shuffle.iter().enumerate() {
                restore[id as usize] = pos as u32;
            }
            ids_keep.extend_from_slice(&shuffle[..keep]);
            mask.extend(
                restore
                    .iter()
                    .map(|&r| if (r as usize) < keep { 0.0 } else { 1.0 }),
            );
            ids_restore.extend(restore);
        }
        Mask {
            batch,
            num_patches: l,
            len_keep: keep,
            ids_keep,
            ids_restore,
            mask,
        }
    }

    /// Noise drawn from `rng` (U[0,1) per patch), then [`Mask::from_noise`].
    pub fn random(batch: usize, num_patches: usize, ratio: f64, rng: &mut impl Rng) -> Mask {
        let noise: Vec<f32> = (0..batch * num_patches)
            .map(|_| rng.random::<f32>())
            .collect();
        Mask::from_noise(&noise, batch, num_patches, ratio)
    }

    /// Flat row indices b*L + ids_keep[b, j] into a (B*L, D) view, as a (B*K,) u32 tensor.
    pub fn keep_index(&self, device: &Device) -> Result<Tensor> {
        self.flat_index(&self.ids_keep, self.len_keep, device)
    }

    /// Flat row indices b*L + ids_restore[b, j], as a (B*L,) u32 tensor.
    pub fn restore_index(&self, device: &Device) -> Result<Tensor> {
        self.flat_index(&self.ids_restore, self.num_patches, device)
    }

    fn flat_index(&self, ids: &[u32], per_row: usize, device: &Device) -> Result<Tensor> {
        let l = self.num_patches as u32;
        let flat: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (i / per_row) as u32 * l + id)
            .collect();
        Tensor::from_vec(flat, ids.len(), device)
    }

    /// Rows `start..start + n` of this mask (a micro-batch).
    pub fn rows(&self, start: usize, n: usize) -> Mask {
        let (k, l) = (self.len_keep, self.num_patches);
        Mask {
            batch: n,
            num_patches: l,
            len_keep: k,
            ids_keep: self.ids_keep[start * k..(start + n) * k].to_vec(),
            ids_restore: self.ids_restore[start * l..(start + n) * l].to_vec(),
            mask: self.mask[start * l..(start + n) * l].to_vec(),
        }
    }

    /// The (B, L) mask tensor, 1 = removed.
    pub fn mask_tensor(&self, dtype: candle_core::DType, device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.mask.clone(), (self.batch, self.num_patches), device)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_worked_example() {
        // docs/reference.md: noise [.9,.1,.5,.3], r=.5 -> ids_shuffle [1,3,2,0],
        // ids_restore [3,0,2,1], keep [1,3], mask [1,0,1,0].
        let m = Mask::from_noise(&[0.9, 0.1, 0.5, 0.3], 1, 4, 0.5);
        assert_eq!(m.ids_keep, vec![1, 3]);
        assert_eq!(m.ids_restore, vec![3, 0, 2, 1]);
        assert_eq!(m.mask, vec![1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn patchify_puts_channel_fastest() -> Result<()> {
        // Pixel value encodes (c, y, x) so every element can be located.
        let (c, h, p) = (3usize, 4usize, 2usize);
        let data: Vec<f32> = (0..c * h * h).map(|i| i as f32).collect();
        let img = Tensor::from_vec(data, (1, c, h, h), &Device::Cpu)?;
        let x = patchify(&img, p)?;
        assert_eq!(x.dims(), &[1, 4, 12]);
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        for k in 0..4 {
            let (r, s) = (k / 2, k % 2);
            for a in 0..p {
                for b in 0..p {
                    for ch in 0..c {
                        let e = (a * p + b) * c + ch;
                        let want = (ch * h * h + (r * p + a) * h + (s * p + b)) as f32;
                        assert_eq!(v[k * 12 + e], want, "patch {k} element {e}");
                    }
                }
            }
        }
        let back = unpatchify(&x, p, c)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            img.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
