//! Image folders: scanning, decoding, augmentation and batching. This module holds the
//! [`Dataset`] (scan, in-memory or on-demand decoding, batches, the bundled photos);
//! `augment.rs` the training crops and flips, `decode.rs` decoding, resizing and normalisation.
//!
//! A dataset is any folder of JPEG (`.jpg`, `.jpeg`) or PNG (`.png`) files, scanned recursively
//! in sorted path order, so the torchvision `ImageFolder` layout (`class/xxx.png`) works as is;
//! class labels are ignored (MAE pre-training is unsupervised).
//!
//! Training augmentations follow the reference recipes:
//! - [`Augment::Mae`]: `RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=3)` and a
//!   horizontal flip, as MAE's `main_pretrain.py` (<https://arxiv.org/abs/2111.06377>);
//! - [`Augment::Pixmim`]: resize the shorter side to `size`, reflect-pad 4 pixels, random
//!   `size x size` crop and a horizontal flip, the "simple resized crop" of PixMIM
//!   (<https://arxiv.org/abs/2303.02416>) used by MFF-MAE.
//!
//! Conventions: batches are flat `f32` vectors in `[B, 3, S, S]` order (channel-major per
//! sample), normalised with the ImageNet mean and std. All randomness comes from
//! [`crate::rng::stream`]: the visiting order from `(seed, Shuffle, pass)`, the crop and flip of
//! sample `k` of the infinite sample sequence from `(seed, Augment, k)`, so a batch depends only
//! on `(step, batch size, seed)`, never on threads or on which batches came before.
//! Resizing is bicubic (`FilterType::CatmullRom`, PIL's `BICUBIC` kernel); rounding follows
//! Python's `round` (ties to even) wherever torchvision rounds.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use image::RgbImage;
use rand::Rng;

use crate::rng::{self, Purpose};

mod augment;
mod decode;

pub use augment::{
    augment_image, pixmim_crop, random_resized_crop, reflect_pad, rrc_params, Augment,
};
use decode::{decode_rgb, read_dimensions};
pub use decode::{
    normalize_chw, resize_center_crop, resize_shorter_side, IMAGENET_MEAN, IMAGENET_STD,
};

/// Decoded sets up to this many bytes (RGB8) are kept in memory; larger ones decode on demand.
const IN_MEMORY_LIMIT: u64 = 1 << 30;
/// How many skipped files `open` names individually before only counting them.
const SKIP_REPORT_LIMIT: usize = 10;

/// Whether `path` has an accepted image extension (case-insensitive).
fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

/// All JPEG and PNG files under `dir` (recursively, following links), in sorted path order.
pub fn find_images(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!(
            "image folder {} does not exist or is not a folder; point the data path at a folder \
             of .jpg/.jpeg/.png images (subfolders are scanned too)",
            dir.display()
        );
    }
    let mut paths = Vec::new();
    for entry in walkdir::WalkDir::new(dir).follow_links(true) {
        let entry = entry.with_context(|| {
            format!(
                "cannot scan image folder {}; check its permissions",
                dir.display()
            )
        })?;
        if entry.file_type().is_file() && is_image_path(entry.path()) {
            paths.push(entry.into_path());
        }
    }
    paths.sort();
    Ok(paths)
}

/// Number of worker threads for decoding and augmentation.
fn worker_count(jobs: usize) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    cores.min(jobs).max(1)
}

/// `f(0..n)` on scoped worker threads, results in index order.
fn parallel_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = worker_count(n);
    if threads <= 1 {
        return (0..n).map(f).collect();
    }
    let per = n.div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| s.spawn(move || (start..(start + per).min(n)).map(f).collect::<Vec<T>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// Fills consecutive `per`-sized chunks of `out` with `f(chunk index, chunk)` on worker threads.
fn parallel_fill(
    out: &mut [f32],
    per: usize,
    f: impl Fn(usize, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    let n = out.len() / per.max(1);
    let threads = worker_count(n);
    let per_thread = n.div_ceil(threads).max(1);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = out
            .chunks_mut(per * per_thread)
            .enumerate()
            .map(|(t, group)| {
                s.spawn(move || -> Result<()> {
                    for (i, chunk) in group.chunks_mut(per).enumerate() {
                        f(t * per_thread + i, chunk)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(r) => r?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(())
    })
}

include!(concat!(env!("OUT_DIR"), "/bundled.rs"));

/// Path prefix under which the bundled photos are listed.
pub const BUNDLED_PREFIX: &str = "<bundled>";

/// A folder of training images (see the module docs).
pub struct Dataset {
    dir: PathBuf,
    paths: Vec<PathBuf>,
    /// Decoded images when the whole set fits in [`IN_MEMORY_LIMIT`]; `None` decodes on demand.
    images: Option<Vec<RgbImage>>,
    /// Files dropped by `open` (unreadable header or, in memory, failed decode).
    skipped_at_open: usize,
    /// Indices into `paths` that failed to decode on demand.
    bad: Mutex<HashSet<usize>>,
    /// Files warned about on demand (mirrors `bad.len()` without taking the lock).
    skipped_later: AtomicUsize,
    /// The permutation of the last pass asked for: (seed, pass, permutation).
    perm_cache: Mutex<Option<(u64, u64, Vec<usize>)>>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("dir", &self.dir)
            .field("len", &self.paths.len())
            .field("in_memory", &self.images.is_some())
            .field("skipped", &self.skipped())
            .finish()
    }
}

impl Dataset {
    /// Scans `dir` recursively (JPEG .jpg/.jpeg and PNG .png, case-insensitive; the torchvision
    /// ImageFolder layout class/xxx.png works because the scan is recursive), sorted path order.
    /// Reads every image's header; unreadable ones are skipped and counted. No usable image -> error
    /// naming the folder and saying what formats are accepted. Images whose total decoded size is
    /// at most 1 GiB are decoded once and kept in memory (as RGB8); larger sets are decoded on demand.
    pub fn open(dir: &Path) -> Result<Dataset> {
        Self::open_with_memory_limit(dir, IN_MEMORY_LIMIT)
    }

    /// The default set: the photographs bundled in the binary (`assets/data`: `photos/` and
    /// `labelled/`, see `assets/SOURCES.md`), decoded into memory, in sorted path order.
    pub fn bundled() -> Result<Dataset> {
        let mut paths = Vec::with_capacity(BUNDLED.len());
        let mut images = Vec::with_capacity(BUNDLED.len());
        for (name, bytes) in BUNDLED {
            let img = image::load_from_memory(bytes)
                .with_context(|| format!("decoding bundled image {name}"))?
                .to_rgb8();
            paths.push(PathBuf::from(BUNDLED_PREFIX).join(name));
            images.push(img);
        }
        if paths.is_empty() {
            bail!("this binary was built without bundled photos (assets/data was empty); pass --data DIR");
        }
        Ok(Dataset {
            dir: PathBuf::from(BUNDLED_PREFIX),
            paths,
            images: Some(images),
            skipped_at_open: 0,
            bad: Mutex::new(HashSet::new()),
            skipped_later: AtomicUsize::new(0),
            perm_cache: Mutex::new(None),
        })
    }

    /// [`Dataset::open`] keeping the set in memory only when it decodes to at most `limit` bytes.
    fn open_with_memory_limit(dir: &Path, limit: u64) -> Result<Dataset> {
        let found = find_images(dir)?;
        let headers = parallel_map(found.len(), |i| read_dimensions(&found[i]));
        let mut skipped = Vec::new();
        let mut paths = Vec::with_capacity(found.len());
        let mut bytes: u64 = 0;
        for (path, header) in found.into_iter().zip(headers) {
            match header {
                Ok((w, h)) => {
                    bytes += u64::from(w) * u64::from(h) * 3;
                    paths.push(path);
                }
                Err(e) => skipped.push(e),
            }
        }
        let images = if bytes <= limit && !paths.is_empty() {
            let decoded = parallel_map(paths.len(), |i| decode_rgb(&paths[i]));
            let mut kept_paths = Vec::with_capacity(paths.len());
            let mut kept = Vec::with_capacity(paths.len());
            for (path, img) in paths.into_iter().zip(decoded) {
                match img {
                    Ok(img) => {
                        kept_paths.push(path);
                        kept.push(img);
                    }
                    Err(e) => skipped.push(e),
                }
            }
            paths = kept_paths;
            Some(kept)
        } else {
            None
        };
        for e in skipped.iter().take(SKIP_REPORT_LIMIT) {
            crate::note!("warning: skipping {e:#}");
        }
        if skipped.len() > SKIP_REPORT_LIMIT {
            crate::note!(
                "warning: skipped {} more unreadable files in {}",
                skipped.len() - SKIP_REPORT_LIMIT,
                dir.display()
            );
        }
        if paths.is_empty() {
            bail!(
                "no usable image in {} ({} unreadable files skipped); the folder must contain JPEG \
                 (.jpg, .jpeg) or PNG (.png) images, directly or in subfolders",
                dir.display(),
                skipped.len()
            );
        }
        Ok(Dataset {
            dir: dir.to_path_buf(),
            paths,
            images,
            skipped_at_open: skipped.len(),
            bad: Mutex::new(HashSet::new()),
            skipped_later: AtomicUsize::new(0),
            perm_cache: Mutex::new(None),
        })
    }

    /// Number of usable images.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Always false: `open` refuses a folder without a usable image.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The image files, in sorted path order (index i is image i).
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Number of files skipped as unreadable so far (header or decode failures).
    pub fn skipped(&self) -> usize {
        self.skipped_at_open + self.skipped_later.load(Ordering::Relaxed)
    }

    /// Decoded RGB image i (converting grey/RGBA to RGB). A file that fails to decode here is
    /// skipped with a warning to stderr (counted in skipped()), and the next usable image
    /// (i+1, i+2, ... wrapping) is returned instead.
    pub fn image(&self, i: usize) -> Result<RgbImage> {
        let n = self.len();
        if i >= n {
            bail!(
                "image index {i} is out of range for the {n} images of {}",
                self.dir.display()
            );
        }
        if let Some(images) = &self.images {
            return Ok(images[i].clone());
        }
        for offset in 0..n {
            let j = (i + offset) % n;
            if self.is_bad(j) {
                continue;
            }
            match decode_rgb(&self.paths[j]) {
                Ok(img) => return Ok(img),
                Err(e) => {
                    if self.mark_bad(j) {
                        crate::note!("warning: skipping {e:#}");
                    }
                }
            }
        }
        bail!(
            "none of the {n} images in {} could be decoded; check that they are valid JPEG or PNG files",
            self.dir.display()
        )
    }

    fn is_bad(&self, j: usize) -> bool {
        self.bad.lock().map(|bad| bad.contains(&j)).unwrap_or(false)
    }

    /// Records `j` as undecodable; true the first time.
    fn mark_bad(&self, j: usize) -> bool {
        let first = match self.bad.lock() {
            Ok(mut bad) => bad.insert(j),
            Err(poisoned) => poisoned.into_inner().insert(j),
        };
        if first {
            self.skipped_later.fetch_add(1, Ordering::Relaxed);
        }
        first
    }

    /// Dataset index of sample `k` of the infinite sample sequence for `seed`: pass `k / len` is
    /// a Fisher-Yates permutation of `0..len` drawn from `rng::stream(seed, Shuffle, pass)`, and
    /// sample `k` is its element `k % len`. A pure function of `(k, seed)`; the permutation of
    /// the last pass asked for is cached.
    pub fn sample_index(&self, k: u64, seed: u64) -> usize {
        let n = self.len() as u64;
        let pass = k / n;
        let pos = (k % n) as usize;
        let mut cache = match self.perm_cache.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        match &*cache {
            Some((s, p, perm)) if *s == seed && *p == pass => perm[pos],
            _ => {
                let perm = permutation(self.len(), seed, pass);
                let index = perm[pos];
                *cache = Some((seed, pass, perm));
                index
            }
        }
    }

    /// One training batch as a flat f32 vec in [B,3,size,size] order (CHW per sample),
    /// ImageNet-normalised. Sample j of the batch of `step` is dataset index
    /// `sample_index(step*B + j)`, augmented with the stream
    /// `rng::stream(seed, Purpose::Augment, step*B + j)` (one stream per sample, so the result
    /// does not depend on batch composition or threads).
    pub fn train_batch(
        &self,
        step: u64,
        batch_size: usize,
        size: u32,
        augment: Augment,
        seed: u64,
    ) -> Result<Vec<f32>> {
        if size == 0 || batch_size == 0 {
            bail!("training batches need a positive image size and batch size (got size {size}, batch {batch_size})");
        }
        let first = step * batch_size as u64;
        let indices: Vec<usize> = (0..batch_size as u64)
            .map(|j| self.sample_index(first + j, seed))
            .collect();
        let per = 3 * (size as usize) * (size as usize);
        let mut out = vec![0f32; batch_size * per];
        parallel_fill(&mut out, per, |j, chunk| {
            let img = self.image(indices[j])?;
            let mut rng = rng::stream(seed, Purpose::Augment, first + j as u64);
            let view = augment_image(&img, size, augment, &mut rng);
            normalize_chw(&view, chunk);
            Ok(())
        })?;
        Ok(out)
    }

    /// Evaluation images: the first n images (or all if fewer) in sorted order, each resized so
    /// its shorter side is `size` (bicubic, CatmullRom), then centre-cropped to size x size;
    /// ImageNet-normalised, [n,3,size,size].
    pub fn eval_batch(&self, n: usize, size: u32) -> Result<Vec<f32>> {
        let idx: Vec<usize> = (0..n.min(self.len())).collect();
        self.eval_images(&idx, size)
    }

    /// The images at `indices` (sorted-order positions), prepared as [`Dataset::eval_batch`].
    pub fn eval_images(&self, indices: &[usize], size: u32) -> Result<Vec<f32>> {
        if size == 0 {
            bail!("evaluation images need a positive size (got 0)");
        }
        let per = 3 * (size as usize) * (size as usize);
        let mut out = vec![0f32; indices.len() * per];
        parallel_fill(&mut out, per, |i, chunk| {
            let img = self.image(indices[i])?;
            normalize_chw(&resize_center_crop(&img, size), chunk);
            Ok(())
        })?;
        Ok(out)
    }
}

/// The Fisher-Yates permutation of `0..n` for pass `pass` of the sample sequence.
fn permutation(n: usize, seed: u64, pass: u64) -> Vec<usize> {
    let mut rng = rng::stream(seed, Purpose::Shuffle, pass);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        perm.swap(i, j);
    }
    perm
}

#[cfg(test)]
mod tests;
