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

pub use mimscope::compare::assert_close;

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
