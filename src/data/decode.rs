//! Image decoding (format from the content, RGB8), bicubic resizing, the evaluation view and
//! the ImageNet normalisation into channel-major `f32`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::imageops::{self, FilterType};
use image::RgbImage;

/// Per-channel mean of ImageNet in [0, 1] (RGB), as torchvision and MAE.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Per-channel standard deviation of ImageNet in [0, 1] (RGB), as torchvision and MAE.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Opens `path` with its format guessed from the content (a misnamed file still decodes).
fn reader(path: &Path) -> Result<image::io::Reader<std::io::BufReader<std::fs::File>>> {
    image::io::Reader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {}", path.display()))
}

/// Width and height from the image header, without decoding the pixels.
pub(super) fn read_dimensions(path: &Path) -> Result<(u32, u32)> {
    let (w, h) = reader(path)?
        .into_dimensions()
        .with_context(|| format!("{} is not a readable JPEG or PNG image", path.display()))?;
    if w == 0 || h == 0 {
        bail!("{} has an empty ({w}x{h}) image", path.display());
    }
    Ok((w, h))
}

/// Decodes `path` to RGB8 (grey is replicated, alpha dropped, 16-bit reduced to 8-bit).
pub(super) fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let img = reader(path)?.decode().with_context(|| {
        format!(
            "cannot decode {}; the file may be truncated or corrupt",
            path.display()
        )
    })?;
    Ok(img.into_rgb8())
}

/// Python's `round` (ties to even), as torchvision uses for crop sizes and offsets.
pub(super) fn py_round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// Bicubic resize to `w x h`, skipping the work when the size already matches.
pub(super) fn resize_exact(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.dimensions() == (w, h) {
        img.clone()
    } else {
        imageops::resize(img, w, h, FilterType::CatmullRom)
    }
}

/// Resizes so the shorter side is exactly `size`, keeping the aspect ratio (the other side
/// rounded, at least `size`), with the bicubic (CatmullRom) filter.
pub fn resize_shorter_side(img: &RgbImage, size: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        (
            size,
            ((f64::from(h) * f64::from(size) / f64::from(w)).round() as u32).max(size),
        )
    } else {
        (
            ((f64::from(w) * f64::from(size) / f64::from(h)).round() as u32).max(size),
            size,
        )
    };
    resize_exact(img, nw, nh)
}

/// Evaluation view: shorter side resized to `size` (bicubic), then the centre `size x size` crop
/// with torchvision's offset rule `round((H - size) / 2)`.
pub fn resize_center_crop(img: &RgbImage, size: u32) -> RgbImage {
    let resized = resize_shorter_side(img, size);
    let (w, h) = resized.dimensions();
    let top = py_round(f64::from(h - size) / 2.0) as u32;
    let left = py_round(f64::from(w - size) / 2.0) as u32;
    imageops::crop_imm(&resized, left, top, size, size).to_image()
}

/// Writes `img` into `out` channel-major (`[3, H, W]`) as `(x / 255 - mean) / std` with the
/// ImageNet statistics. `out` must hold exactly `3 * W * H` values.
pub fn normalize_chw(img: &RgbImage, out: &mut [f32]) {
    let plane = (img.width() as usize) * (img.height() as usize);
    assert_eq!(
        out.len(),
        3 * plane,
        "normalize_chw: output holds {} values, the image needs {}",
        out.len(),
        3 * plane
    );
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px[c]) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::gradient;
    use image::Rgb;

    #[test]
    fn normalize_known_pixel() {
        // Pixel (255, 0, 128): R = (1 - 0.485) / 0.229 = 2.2489083, G = -0.456 / 0.224 = -2.0357143,
        // B = (128/255 - 0.406) / 0.225 = (0.50196078 - 0.406) / 0.225 = 0.42649235.
        let img = RgbImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                Rgb([255, 0, 128])
            } else {
                Rgb([0, 0, 0])
            }
        });
        let mut out = vec![0f32; 6];
        normalize_chw(&img, &mut out);
        let expected = [
            2.2489083,
            -0.485 / 0.229,
            -2.0357143,
            -2.0357143,
            0.42649235,
            -0.406 / 0.225,
        ];
        for (a, e) in out.iter().zip(expected) {
            assert!((a - e).abs() < 1e-5, "{out:?} vs {expected:?}");
        }
    }

    #[test]
    fn resize_center_crop_size_and_constant() {
        let img = RgbImage::from_pixel(113, 71, Rgb([37, 200, 129]));
        for size in [8u32, 32, 64, 71, 100] {
            let out = resize_center_crop(&img, size);
            assert_eq!(out.dimensions(), (size, size));
            assert!(
                out.pixels().all(|p| *p == Rgb([37, 200, 129])),
                "size {size} changed a constant image"
            );
        }
        assert_eq!(
            resize_center_crop(&gradient(40, 90), 24).dimensions(),
            (24, 24)
        );
    }

    #[test]
    fn resize_center_crop_offset_rule() {
        // Already at the short side: 20x15 -> 15x15 keeps columns round(5 / 2) = 2 (ties to even)..17.
        let img = gradient(20, 15);
        let out = resize_center_crop(&img, 15);
        assert_eq!(out, imageops::crop_imm(&img, 2, 0, 15, 15).to_image());
        // 21x15: round(6 / 2) = 3.
        let img = gradient(21, 15);
        assert_eq!(
            resize_center_crop(&img, 15),
            imageops::crop_imm(&img, 3, 0, 15, 15).to_image()
        );
    }
}
