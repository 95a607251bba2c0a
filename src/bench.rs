//! `mimscope bench`: training-step and encoder-forward throughput on synthetic inputs.
//!
//! Prints machine-readable `key=value` lines. The training step is forward, backward and the
//! AdamW update at mask ratio 0.75; the forward is the unmasked encoder keeping every block
//! output (what the spectra need). Each is run once to warm up, then `iters` times; the median
//! is reported. It also times building one training batch from the bundled photos with each
//! augmentation (`data_*_batch_s`), the part of a step spent before the model runs.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand_distr::{Distribution, StandardNormal};

use crate::config::{default_fuse_layers, ModelConfig, ModelKind, Preset};
use crate::data::Augment;
use crate::model::{Mae, Mask};
use crate::rng::{stream, Purpose};
use crate::train::optim::{AdamW, DecayRule};

/// The bench's architecture: the preset, with MFF's default fused layers for `mff`.
pub fn bench_config(kind: ModelKind, preset: Preset) -> ModelConfig {
    let mut cfg = preset.config();
    if kind == ModelKind::Mff {
        cfg.fuse_layers = default_fuse_layers(cfg.depth);
    }
    cfg
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark and returns the report lines.
pub fn run(cfg: &ModelConfig, batch: usize, iters: usize, device: &Device) -> Result<Vec<String>> {
    anyhow::ensure!(
        batch > 0 && iters > 0,
        "--batch-size and --iters must be positive"
    );
    let (model, store) = Mae::init(cfg, 0, DType::F32, device)?;
    let mut opt = AdamW::new(
        store.trainable(),
        0.05,
        DecayRule {
            decay_fusion_weights: true,
        },
    )?;
    let s = cfg.img_size;
    let mut rng = stream(0, Purpose::Synthetic, 0);
    let pixels: Vec<f32> = (0..batch * 3 * s * s)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let imgs = Tensor::from_vec(pixels, (batch, 3, s, s), device)?;

    let mut train = Vec::with_capacity(iters);
    for i in 0..=iters {
        let mask = Mask::random(batch, cfg.num_patches(), 0.75, &mut rng);
        let t0 = Instant::now();
        let out = model.forward(&imgs, &mask)?;
        let grads = out.loss.backward()?;
        opt.apply(&grads, 1e-6)?;
        device.synchronize()?;
        if i > 0 {
            train.push(t0.elapsed().as_secs_f64());
        }
    }
    let mut fwd = Vec::with_capacity(iters);
    for i in 0..=iters {
        let t0 = Instant::now();
        let trace = model.forward_encoder_unmasked(&imgs)?;
        trace
            .latent
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if i > 0 {
            fwd.push(t0.elapsed().as_secs_f64());
        }
    }
    // Input pipeline on the bundled photos: decode is done once at open, so this is crop,
    // resize, flip and normalisation of one batch.
    let photos = crate::data::Dataset::bundled()?;
    let mut data = Vec::new();
    for augment in [Augment::Mae, Augment::Pixmim] {
        let mut times = Vec::with_capacity(iters);
        for i in 0..=iters {
            let t0 = Instant::now();
            photos.train_batch(i as u64, batch, s as u32, augment, 0)?;
            if i > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        data.push(median(times));
    }
    let (t, f) = (median(train), median(fwd));
    Ok(vec![
        format!("model={}", if cfg.is_mff() { "mff" } else { "mae" }),
        format!("batch_size={batch}"),
        format!(
            "threads={}",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        format!("train_step_s={t:.4}"),
        format!("train_images_per_s={:.2}", batch as f64 / t),
        format!("forward_s={f:.4}"),
        format!("forward_images_per_s={:.2}", batch as f64 / f),
        format!("data_mae_batch_s={:.4}", data[0]),
        format!("data_pixmim_batch_s={:.4}", data[1]),
    ])
}
