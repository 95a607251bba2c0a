//! Helpers shared by the integration tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

pub fn load(name: &str, dtype: DType) -> BTreeMap<String, Tensor> {
    mimscope::checkpoint::load_tensors(&fixture(name), dtype, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e:#}"))
        .tensors
}

pub fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Asserts |a - e| <= atol + rtol |e| elementwise; on failure reports the worst element.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, rtol: f64, atol: f64) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let (a, e) = (to_vec(actual), to_vec(expected));
    let mut worst: Option<(usize, f64)> = None;
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if (excess.is_nan() || excess > 0.0) && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        let max_abs = a
            .iter()
            .zip(&e)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        panic!(
            "{what}: element {i} is {} but expected {} (rtol {rtol}, atol {atol}); max |diff| {max_abs:.3e}",
            a[i], e[i]
        );
    }
}

/// Writes `n` small random-ish RGB PNGs of `w` x `h` into `dir`.
pub fn write_pngs(dir: &Path, n: usize, w: u32, h: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..n {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 7 + y * 13 + k as u32 * 31) as u8;
            image::Rgb([v, v.wrapping_mul(3), 255 - v])
        });
        img.save(dir.join(format!("img{k:02}.png"))).unwrap();
    }
}
