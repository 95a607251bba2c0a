//! `mimscope spectrum`: Fourier spectra of encoder features for one or more checkpoints.
//!
//! Output folder: `spectrum.csv` (checkpoint,layer,freq,delta_log_amplitude), `depth.csv`
//! (checkpoint,layer,depth,high_freq_delta), `spectrum.{png,svg}` (curves of every layer
//! coloured by depth, one panel per checkpoint) and `depth.{png,svg}` (the high-frequency
//! value against depth, one line per checkpoint).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::analysis::checkpoint_labels;
use crate::analysis::features::features;
use crate::analysis::spectrum::{depth_csv, frequencies, spectrum_csv, Accumulator, Curve};
use crate::checkpoint::load_encoder;
use crate::checkpoint::ModelOverrides;
use crate::cli::SpectrumArgs;
use crate::figures::charts::{save, DepthLines, SpectrumPanels};
use crate::model::Mae;
use crate::output::write_atomic;
use crate::train::open_dataset;

/// What `spectrum` computes.
#[derive(Debug, Clone)]
pub struct SpectrumSettings {
    pub checkpoints: Vec<PathBuf>,
    /// Image folder; None = the bundled photos.
    pub data: Option<PathBuf>,
    /// The first `images` images in sorted path order.
    pub images: usize,
    /// Images per forward pass (bounds memory).
    pub batch_size: usize,
    /// Also the stream after each block's attention half.
    pub sublayers: bool,
    pub out: PathBuf,
    /// Architecture of files without a stored config.
    pub overrides: ModelOverrides,
}

/// The spectrum of every analysed layer of `model` on `images` (N, C, H, W), forwarded
/// `batch_size` images at a time; log amplitudes are summed over all images before the mean.
pub fn model_curves(
    model: &Mae,
    checkpoint: &str,
    images: &Tensor,
    batch_size: usize,
    sublayers: bool,
) -> Result<Vec<Curve>> {
    let g = model.cfg.grid();
    let n = images.dim(0)?;
    let mut accs: Vec<(crate::analysis::features::Layer, Accumulator)> = Vec::new();
    for start in (0..n).step_by(batch_size.max(1)) {
        let chunk = images.narrow(0, start, batch_size.max(1).min(n - start))?;
        for (k, (layer, t)) in features(model, &chunk, sublayers)?.into_iter().enumerate() {
            let (b, l, d) = t.dims3()?;
            if l != g * g {
                bail!("layer {} has {l} tokens, not the {g}x{g} grid", layer.name);
            }
            let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if accs.len() <= k {
                accs.push((layer, Accumulator::new(g, g)));
            }
            accs[k].1.add(&data, b, d);
        }
    }
    Ok(accs
        .into_iter()
        .map(|(layer, acc)| Curve {
            checkpoint: checkpoint.to_string(),
            layer,
            freq: frequencies(g),
            delta: acc.finish().delta_diagonal(),
        })
        .collect())
}

/// Runs the analysis and writes tables and figures; returns the curves.
pub fn run(s: &SpectrumSettings, device: &Device) -> Result<Vec<Curve>> {
    if s.checkpoints.is_empty() {
        bail!("no checkpoint: pass --checkpoint FILE (repeat it to compare several)");
    }
    if s.images == 0 || s.batch_size == 0 {
        bail!("--images and --batch-size must be at least 1");
    }
    let ds = open_dataset(s.data.as_deref())?;
    let paths: Vec<&Path> = s.checkpoints.iter().map(PathBuf::as_path).collect();
    let labels = checkpoint_labels(&paths);
    // Images per model input size, decoded once.
    let mut inputs: BTreeMap<usize, Tensor> = BTreeMap::new();
    let mut curves = Vec::new();
    for (path, label) in paths.iter().zip(&labels) {
        let (loaded, _) = load_encoder(path, &s.overrides, DType::F32, device)?;
        let size = loaded.model.cfg.img_size;
        let imgs = match inputs.entry(size) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let n = s.images.min(ds.len());
                let data = ds.eval_batch(n, size as u32)?;
                e.insert(Tensor::from_vec(data, (n, 3, size, size), device)?)
            }
        };
        crate::note!(
            "spectrum: {label} ({}) on {} images of {size}px",
            path.display(),
            imgs.dim(0)?
        );
        let c = model_curves(&loaded.model, label, imgs, s.batch_size, s.sublayers)
            .with_context(|| format!("analysing {}", path.display()))?;
        curves.extend(c);
    }
    write_outputs(&s.out, &curves)?;
    Ok(curves)
}

/// Writes the two tables and the two figures of `curves` into `out`.
pub fn write_outputs(out: &Path, curves: &[Curve]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(&out.join("spectrum.csv"), spectrum_csv(curves)?.as_bytes())?;
    write_atomic(&out.join("depth.csv"), depth_csv(curves)?.as_bytes())?;
    save(&SpectrumPanels { curves }, &out.join("spectrum"))?;
    save(&DepthLines { curves }, &out.join("depth"))?;
    crate::note!(
        "spectrum: wrote spectrum.csv, depth.csv and figures to {}",
        out.display()
    );
    Ok(())
}

impl SpectrumArgs {
    /// The flags as settings.
    pub fn settings(&self) -> SpectrumSettings {
        SpectrumSettings {
            checkpoints: self.checkpoints.clone(),
            data: self.data.clone(),
            images: self.images,
            batch_size: self.batch_size,
            sublayers: self.sublayers,
            out: self.out.clone(),
            overrides: self.arch.overrides(),
        }
    }
}
