//! Training augmentations ([`Augment`]): MAE's RandomResizedCrop and PixMIM's resize,
//! reflect-pad and crop, each followed by a horizontal flip, as torchvision draws them (see the
//! crate's `data` module docs for the recipes and the random streams).

use image::imageops;
use image::RgbImage;
use rand::Rng;

use super::decode::{py_round, resize_exact, resize_shorter_side};

/// Reflect padding of the PixMIM crop, in pixels on every side.
const PIXMIM_PAD: u32 = 4;

/// Augmentation of training images.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Augment {
    /// RandomResizedCrop (scale 0.2..1, ratio 3/4..4/3, bicubic) and a horizontal flip, as MAE.
    Mae,
    /// Resize shorter side, reflect-pad 4, random crop and a horizontal flip, as PixMIM / MFF.
    Pixmim,
}

/// The training view of `img`: the crop of `augment`, then a horizontal flip with probability
/// 1/2, both drawn from `rng` in that order.
pub fn augment_image(img: &RgbImage, size: u32, augment: Augment, rng: &mut impl Rng) -> RgbImage {
    let mut view = match augment {
        Augment::Mae => random_resized_crop(img, size, rng),
        Augment::Pixmim => pixmim_crop(img, size, rng),
    };
    // torchvision RandomHorizontalFlip: flip when torch.rand(1) < p.
    if rng.random::<f64>() < 0.5 {
        imageops::flip_horizontal_in_place(&mut view);
    }
    view
}

/// The crop box `(left, top, crop width, crop height)` of torchvision's
/// `RandomResizedCrop.get_params` with scale (0.2, 1.0) and ratio (3/4, 4/3) on a `w x h` image:
/// ten tries of a random area fraction and log-uniform aspect, then a centre crop clamped to the
/// ratio range.
pub fn rrc_params(w: u32, h: u32, rng: &mut impl Rng) -> (u32, u32, u32, u32) {
    const SCALE: (f64, f64) = (0.2, 1.0);
    const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
    let area = f64::from(w) * f64::from(h);
    let (log_lo, log_hi) = (RATIO.0.ln(), RATIO.1.ln());
    for _ in 0..10 {
        let target_area = area * (SCALE.0 + (SCALE.1 - SCALE.0) * rng.random::<f64>());
        let aspect = (log_lo + (log_hi - log_lo) * rng.random::<f64>()).exp();
        let cw = py_round((target_area * aspect).sqrt());
        let ch = py_round((target_area / aspect).sqrt());
        if 0 < cw && cw <= i64::from(w) && 0 < ch && ch <= i64::from(h) {
            let (cw, ch) = (cw as u32, ch as u32);
            let top = rng.random_range(0..=h - ch);
            let left = rng.random_range(0..=w - cw);
            return (left, top, cw, ch);
        }
    }
    // Fallback to a central crop, as torchvision.
    let in_ratio = f64::from(w) / f64::from(h);
    let (cw, ch) = if in_ratio < RATIO.0 {
        (w, (py_round(f64::from(w) / RATIO.0) as u32).clamp(1, h))
    } else if in_ratio > RATIO.1 {
        ((py_round(f64::from(h) * RATIO.1) as u32).clamp(1, w), h)
    } else {
        (w, h)
    };
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// torchvision `RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=3)`: the box of
/// [`rrc_params`], resized to `size x size` with the bicubic (CatmullRom) filter.
pub fn random_resized_crop(img: &RgbImage, size: u32, rng: &mut impl Rng) -> RgbImage {
    let (left, top, cw, ch) = rrc_params(img.width(), img.height(), rng);
    let crop = imageops::crop_imm(img, left, top, cw, ch).to_image();
    resize_exact(&crop, size, size)
}

/// Index into `0..n` of position `i` of a reflect-padded axis (numpy 'reflect': the edge pixel is
/// not repeated; reflects again as often as needed).
fn reflect_index(i: i64, n: i64) -> usize {
    if n <= 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// `img` padded by `pad` pixels on every side with reflect padding (numpy/torch 'reflect':
/// the row `[1, 2, 3]` padded by 2 is `[3, 2, 1, 2, 3, 2, 1]`).
pub fn reflect_pad(img: &RgbImage, pad: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let p = i64::from(pad);
    RgbImage::from_fn(w + 2 * pad, h + 2 * pad, |x, y| {
        let sx = reflect_index(i64::from(x) - p, i64::from(w));
        let sy = reflect_index(i64::from(y) - p, i64::from(h));
        *img.get_pixel(sx as u32, sy as u32)
    })
}

/// The PixMIM / MFF crop: resize the shorter side to `size` (bicubic), reflect-pad 4 pixels on
/// every side, then a random `size x size` crop (top, then left, uniform over all valid offsets).
pub fn pixmim_crop(img: &RgbImage, size: u32, rng: &mut impl Rng) -> RgbImage {
    let padded = reflect_pad(&resize_shorter_side(img, size), PIXMIM_PAD);
    let (w, h) = padded.dimensions();
    let top = rng.random_range(0..=h - size);
    let left = rng.random_range(0..=w - size);
    imageops::crop_imm(&padded, left, top, size, size).to_image()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::gradient;
    use crate::rng::{self, Purpose};
    use image::Rgb;

    #[test]
    fn reflect_pad_row_matches_numpy() {
        // np.pad([1, 2, 3], 2, mode="reflect") == [3, 2, 1, 2, 3, 2, 1]
        let row = RgbImage::from_fn(3, 1, |x, _| Rgb([x as u8 + 1, 0, 0]));
        let padded = reflect_pad(&row, 2);
        assert_eq!(padded.dimensions(), (7, 5));
        let got: Vec<u8> = (0..7).map(|x| padded.get_pixel(x, 2)[0]).collect();
        assert_eq!(got, vec![3, 2, 1, 2, 3, 2, 1]);
        // A single row reflects onto itself vertically (np.pad([1], 2, "reflect") == [1; 5]).
        for y in 0..5 {
            assert_eq!(padded.get_pixel(2, y)[0], 1);
        }
    }

    #[test]
    fn reflect_pad_columns_and_corners() {
        // Column [10, 20, 30, 40] padded by 2 -> [30, 20, 10, 20, 30, 40, 30, 20].
        let img = RgbImage::from_fn(2, 4, |x, y| Rgb([(y as u8 + 1) * 10, x as u8, 0]));
        let padded = reflect_pad(&img, 2);
        assert_eq!(padded.dimensions(), (6, 8));
        let col: Vec<u8> = (0..8).map(|y| padded.get_pixel(2, y)[0]).collect();
        assert_eq!(col, vec![30, 20, 10, 20, 30, 40, 30, 20]);
        // Row [0, 1] padded by 2 reflects twice: [0, 1, 0, 1, 0, 1].
        let row: Vec<u8> = (0..6).map(|x| padded.get_pixel(x, 2)[1]).collect();
        assert_eq!(row, vec![0, 1, 0, 1, 0, 1]);
        // Corner (0, 0) is source (x=0, y=2) by reflecting both axes.
        assert_eq!(*padded.get_pixel(0, 0), *img.get_pixel(0, 2));
    }

    #[test]
    fn rrc_box_inside_image_with_valid_aspect_and_area() {
        for (w, h) in [(640u32, 480u32), (500, 500), (300, 700), (1024, 768)] {
            for seed in 0..500 {
                let mut r = rng::stream(seed, Purpose::Augment, 0);
                let (left, top, cw, ch) = rrc_params(w, h, &mut r);
                assert!(
                    cw > 0 && ch > 0 && left + cw <= w && top + ch <= h,
                    "{w}x{h}: {left},{top},{cw},{ch}"
                );
                let aspect = f64::from(cw) / f64::from(ch);
                // Rounding w and h to integers moves the aspect by at most ~1/min side.
                assert!(
                    (0.75 - 0.01..=4.0 / 3.0 + 0.01).contains(&aspect),
                    "aspect {aspect}"
                );
                let frac = f64::from(cw) * f64::from(ch) / (f64::from(w) * f64::from(h));
                assert!((0.2 - 0.01..=1.0).contains(&frac), "area fraction {frac}");
            }
        }
    }

    #[test]
    fn rrc_fallback_is_ratio_clamped_centre_crop() {
        // 1000x10: every try needs h >= sqrt(0.2 * 10000 * 3/4) > 10, so the fallback runs:
        // ratio 100 > 4/3 -> h = 10, w = round(13.33) = 13, left = (1000 - 13) // 2 = 493.
        let mut r = rng::stream(1, Purpose::Augment, 0);
        assert_eq!(rrc_params(1000, 10, &mut r), (493, 0, 13, 10));
        let mut r = rng::stream(1, Purpose::Augment, 0);
        assert_eq!(rrc_params(10, 1000, &mut r), (0, 493, 10, 13));
    }

    #[test]
    fn crops_have_requested_size() {
        let img = gradient(97, 61);
        for seed in 0..20 {
            let mut r = rng::stream(seed, Purpose::Augment, 0);
            assert_eq!(random_resized_crop(&img, 32, &mut r).dimensions(), (32, 32));
            assert_eq!(pixmim_crop(&img, 32, &mut r).dimensions(), (32, 32));
            assert_eq!(
                augment_image(&img, 16, Augment::Pixmim, &mut r).dimensions(),
                (16, 16)
            );
        }
    }

    #[test]
    fn pixmim_crop_of_resized_image_is_a_shifted_window() {
        // An image already at size: no resize, so the crop is a window of the padded image,
        // offset by at most 4 pixels in each direction.
        let img = gradient(16, 16);
        let padded = reflect_pad(&img, 4);
        for seed in 0..20 {
            let mut r = rng::stream(seed, Purpose::Augment, 0);
            let crop = pixmim_crop(&img, 16, &mut r);
            let found = (0..=8).any(|t| {
                (0..=8).any(|l| imageops::crop_imm(&padded, l, t, 16, 16).to_image() == crop)
            });
            assert!(
                found,
                "seed {seed}: crop is not a window of the padded image"
            );
        }
    }

    #[test]
    fn augment_serde_names() {
        assert_eq!(
            serde_json::to_string(&Augment::Pixmim).unwrap(),
            "\"pixmim\""
        );
        assert_eq!(
            serde_json::from_str::<Augment>("\"mae\"").unwrap(),
            Augment::Mae
        );
    }
}
