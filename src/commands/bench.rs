//! `mimscope bench`: throughput, model FLOPs and peak memory of the training step, the encoder
//! forward, Hessian-vector products and the input pipeline, on synthetic inputs.
//!
//! Prints machine-readable `key=value` lines. The training step is forward, backward and the
//! AdamW update at the given mask ratio; the forward is the unmasked encoder keeping every
//! block output (what the spectra need). Each part is run once to warm up, then `iters` times;
//! the median is reported, with the peak memory seen while it ran (device memory on a GPU,
//! resident set on the CPU; [`crate::memory`]).
//!
//! FLOPs are model FLOPs: 2 per multiply-add of every matrix product the model runs (patch
//! embedding, linear layers, the two attention products, fusion), none for elementwise work;
//! a training step counts forward and backward's two products per forward product, less the
//! patch embedding's input gradient, which nothing needs (as PyTorch's FlopCounterMode counts
//! it; the images are not differentiated).

use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use rand_distr::{Distribution, StandardNormal};

use crate::analysis::hessian::{top_eigen, PowerSettings};
use crate::analysis::hvp::Objective;
use crate::analysis::spectrum::delta_log_amplitude;
use crate::cli::BenchArgs;
use crate::config::{
    check_ratio, default_fuse_layers, len_keep, BenchPart, Fusion, ModelConfig, ModelKind, Preset,
    Projection, TrainPrecision,
};
use crate::data::Augment;
use crate::kernels::second_order::with_second_order;
use crate::memory::{Peak, Watch};
use crate::model::params::DecayRule;
use crate::model::{Mae, Mask};
use crate::rng::{stream, Purpose};
use crate::train::optim::AdamW;

/// The bench's architecture: the preset, with MFF's default fused layers for `mff`.
pub fn bench_config(kind: ModelKind, preset: Preset) -> ModelConfig {
    let mut cfg = preset.config();
    if kind == ModelKind::Mff {
        cfg.fuse_layers = default_fuse_layers(cfg.depth);
    }
    cfg
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    pub cfg: ModelConfig,
    pub batch: usize,
    pub iters: usize,
    pub precision: TrainPrecision,
    pub mask_ratio: f64,
    pub parts: Vec<BenchPart>,
    /// Images of the batch whose loss the Hessian-vector products differentiate.
    pub hvp_batch: usize,
    /// The device's peak rate in TFLOP/s, for the utilisation lines.
    pub peak_tflops: Option<f64>,
}

/// FLOPs of one (n, k) x (k, m) product.
fn mm(n: usize, k: usize, m: usize) -> f64 {
    2.0 * n as f64 * k as f64 * m as f64
}

/// One pre-norm block on `n` tokens of width `d`, MLP width `hidden`: qkv, the two attention
/// products (n queries over n keys), proj, fc1, fc2.
fn block_flops(n: usize, d: usize, hidden: usize) -> f64 {
    mm(n, d, 3 * d) + 2.0 * mm(n, d, n) + mm(n, d, d) + 2.0 * mm(n, d, hidden)
}

/// Patch embedding (run on every patch, before masking, as MAE), the blocks on `n` tokens, and
/// MFF's fusion.
fn encoder_flops(cfg: &ModelConfig, n: usize) -> f64 {
    let (l, d) = (cfg.num_patches(), cfg.embed_dim);
    let mut f = mm(l, cfg.patch_dim(), d) + cfg.depth as f64 * block_flops(n, d, cfg.mlp_hidden());
    if cfg.is_mff() {
        let shallow = cfg.fuse_layers.len();
        let per_proj = match cfg.projection {
            Projection::Linear => mm(n, d, d),
            Projection::Mlp => 2.0 * mm(n, d, d),
        };
        f += shallow as f64 * per_proj;
        if cfg.fusion == Fusion::Attention {
            // qkv over all fused tokens, the last layer's n queries over them, proj.
            let all = (shallow + 1) * n;
            f += mm(all, d, 3 * d) + 2.0 * mm(n, d, all) + mm(n, d, d);
        }
    }
    f
}

/// Model FLOPs of one image's forward pass in training (mask ratio `mask_ratio`).
pub fn forward_flops_per_image(cfg: &ModelConfig, mask_ratio: f64) -> f64 {
    let l = cfg.num_patches();
    let n = 1 + len_keep(l, mask_ratio);
    let (d, dd) = (cfg.embed_dim, cfg.decoder_embed_dim);
    encoder_flops(cfg, n)
        + mm(n, d, dd)
        + cfg.decoder_depth as f64 * block_flops(1 + l, dd, cfg.decoder_mlp_hidden())
        + mm(1 + l, dd, cfg.patch_dim())
}

/// Model FLOPs of one image's training step: 3 forward passes less the patch embedding's
/// input gradient.
pub fn train_flops_per_image(cfg: &ModelConfig, mask_ratio: f64) -> f64 {
    3.0 * forward_flops_per_image(cfg, mask_ratio)
        - mm(cfg.num_patches(), cfg.patch_dim(), cfg.embed_dim)
}

/// Model FLOPs of one image through the unmasked encoder (1 + L tokens).
pub fn encoder_forward_flops_per_image(cfg: &ModelConfig) -> f64 {
    encoder_flops(cfg, 1 + cfg.num_patches())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `f` once to warm up, then `iters` times under a memory watch: (median seconds, peak).
fn timed(
    iters: usize,
    device: &Device,
    mut f: impl FnMut(usize) -> Result<()>,
) -> Result<(f64, Peak)> {
    f(0)?;
    device.synchronize()?;
    let watch = Watch::start(device)?;
    let mut times = Vec::with_capacity(iters);
    for i in 1..=iters {
        let t0 = Instant::now();
        f(i)?;
        device.synchronize()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok((median(times), watch.finish()))
}

fn memory_lines(out: &mut Vec<String>, part: &str, p: Peak) {
    out.push(format!("{part}_memory_before_bytes={}", p.before));
    out.push(format!("{part}_memory_peak_bytes={}", p.peak));
}

/// Throughput lines of a part that processes `batch` images in `s` seconds at `flops` each.
fn rate_lines(out: &mut Vec<String>, part: &str, s: &BenchSettings, secs: f64, flops: f64) {
    out.push(format!("{part}_step_s={secs:.5}"));
    out.push(format!("{part}_images_per_s={:.2}", s.batch as f64 / secs));
    out.push(format!("{part}_flops_per_image={flops:.4e}"));
    let tflops = flops * s.batch as f64 / secs / 1e12;
    out.push(format!("{part}_tflops_per_s={tflops:.6}"));
    if let Some(peak) = s.peak_tflops {
        out.push(format!("{part}_fraction_of_peak={:.6}", tflops / peak));
    }
}

/// Runs the benchmark and returns the report lines.
pub fn run(s: &BenchSettings, device: &Device) -> Result<Vec<String>> {
    ensure!(
        s.batch > 0 && s.iters > 0 && s.hvp_batch > 0,
        "--batch-size, --iters and --hvp-batch must be positive"
    );
    // As `train`: bf16 mixed precision is for GPUs (a CPU would time an emulation that no
    // training run uses).
    ensure!(
        s.precision == TrainPrecision::F32 || !device.is_cpu(),
        "--precision {} is for GPUs (--device cuda:N); on a CPU, training runs in f32 (drop \
         --precision)",
        s.precision.name()
    );
    let cfg = &s.cfg;
    check_ratio(cfg.num_patches(), s.mask_ratio).map_err(anyhow::Error::msg)?;
    let mut out = header_lines(s, device);
    let (mut model, store) = Mae::init(cfg, 0, DType::F32, device)?;
    model.set_matmul_dtype(s.precision.matmul_dtype());
    let (imgs, masks) = synthetic_batch(s, device)?;
    if s.parts.contains(&BenchPart::Train) {
        train_lines(&mut out, s, &model, &store, &imgs, &masks, device)?;
    }
    if s.parts.contains(&BenchPart::Forward) {
        let (secs, mem) = timed(s.iters, device, |_| {
            let trace = model.forward_encoder_unmasked(&imgs)?;
            trace
                .latent
                .sum_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            Ok(())
        })?;
        let flops = encoder_forward_flops_per_image(cfg);
        rate_lines(&mut out, "forward", s, secs, flops);
        memory_lines(&mut out, "forward", mem);
    }
    if s.parts.contains(&BenchPart::Spectrum) {
        spectrum_lines(&mut out, s, &model, &imgs)?;
    }
    if s.parts.contains(&BenchPart::Hvp) || s.parts.contains(&BenchPart::Power) {
        out.extend(hvp_lines(s, &mut model, &store, &imgs, &masks[0], device)?);
    }
    if s.parts.contains(&BenchPart::Data) {
        data_lines(&mut out, s)?;
    }
    Ok(out)
}

/// What was measured where: the model, the device and the settings.
fn header_lines(s: &BenchSettings, device: &Device) -> Vec<String> {
    let cfg = &s.cfg;
    vec![
        format!("model={}", if cfg.is_mff() { "mff" } else { "mae" }),
        format!(
            "config=img {} patch {} width {} depth {} heads {} decoder {}x{}",
            cfg.img_size,
            cfg.patch_size,
            cfg.embed_dim,
            cfg.depth,
            cfg.num_heads,
            cfg.decoder_embed_dim,
            cfg.decoder_depth
        ),
        format!("device={}", describe(device)),
        format!("precision={}", s.precision.name()),
        format!("batch_size={}", s.batch),
        format!("mask_ratio={}", s.mask_ratio),
        format!(
            "threads={}",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
    ]
}

/// Standard-normal images (B, 3, S, S) on `device` and one mask per run (warm-up included),
/// all from the stream (0, Synthetic, 0).
fn synthetic_batch(s: &BenchSettings, device: &Device) -> Result<(Tensor, Vec<Mask>)> {
    let (px, l) = (s.cfg.img_size, s.cfg.num_patches());
    let mut rng = stream(0, Purpose::Synthetic, 0);
    let pixels: Vec<f32> = (0..s.batch * 3 * px * px)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let imgs = Tensor::from_vec(pixels, (s.batch, 3, px, px), device)?;
    let masks: Vec<Mask> = (0..=s.iters)
        .map(|_| Mask::random(s.batch, l, s.mask_ratio, &mut rng))
        .collect();
    Ok((imgs, masks))
}

/// The training step: forward, backward and the AdamW update, a new mask each time.
fn train_lines(
    out: &mut Vec<String>,
    s: &BenchSettings,
    model: &Mae,
    store: &crate::model::ParamStore,
    imgs: &Tensor,
    masks: &[Mask],
    device: &Device,
) -> Result<()> {
    let rule = DecayRule {
        decay_fusion_weights: true,
    };
    let mut opt = AdamW::new(store.trainable(), 0.05, rule)?;
    let (secs, mem) = timed(s.iters, device, |i| {
        let (_, grads) = crate::train::step::loss_and_grads(model, imgs, &masks[i])?;
        opt.apply(&grads, 1e-6)?;
        Ok(())
    })?;
    let flops = train_flops_per_image(&s.cfg, s.mask_ratio);
    rate_lines(out, "train", s, secs, flops);
    memory_lines(out, "train", mem);
    Ok(())
}

/// As the spectra: the embedding and every block output, cls dropped, on the host.
fn spectrum_lines(
    out: &mut Vec<String>,
    s: &BenchSettings,
    model: &Mae,
    imgs: &Tensor,
) -> Result<()> {
    let trace = model.forward_encoder_unmasked(imgs)?;
    let g = s.cfg.grid();
    let (secs, _) = timed(s.iters, &Device::Cpu, |_| {
        for layer in &trace.layers {
            let t = layer.narrow(1, 1, g * g)?;
            let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            delta_log_amplitude(&data, s.batch, g, g);
        }
        Ok(())
    })?;
    out.push(format!("spectrum_layers={}", trace.layers.len()));
    out.push(format!("spectrum_s={secs:.5}"));
    Ok(())
}

/// Input pipeline on the bundled photos (decoded once at open): crop, resize, flip and
/// normalisation of one batch, on every core, per augmentation.
fn data_lines(out: &mut Vec<String>, s: &BenchSettings) -> Result<()> {
    let photos = crate::data::Dataset::bundled()?;
    let px = s.cfg.img_size as u32;
    for (name, augment) in [("mae", Augment::Mae), ("pixmim", Augment::Pixmim)] {
        let (secs, _) = timed(s.iters, &Device::Cpu, |i| {
            photos.train_batch(i as u64, s.batch, px, augment, 0)?;
            Ok(())
        })?;
        out.push(format!("data_{name}_batch_s={secs:.5}"));
        out.push(format!(
            "data_{name}_images_per_s={:.1}",
            s.batch as f64 / secs
        ));
    }
    Ok(())
}

/// One gradient and exact Hessian-vector products of the loss of the first `hvp_batch`
/// images, in f32, on the graph-keeping worker thread. The first product also builds the
/// gradient's graph; later ones reuse it (as power iteration does).
fn hvp_lines(
    s: &BenchSettings,
    model: &mut Mae,
    store: &crate::model::ParamStore,
    imgs: &Tensor,
    mask: &Mask,
    device: &Device,
) -> Result<Vec<String>> {
    let b = s.hvp_batch.min(s.batch);
    model.set_matmul_dtype(None);
    let model = &*model;
    let imgs = imgs.narrow(0, 0, b)?;
    let mask = mask.rows(0, b);
    let rule = DecayRule {
        decay_fusion_weights: true,
    };
    let lines = with_second_order(|| {
        let mut out = vec![format!("hvp_batch={b}")];
        if s.parts.contains(&BenchPart::Power) {
            // PyHessian's top eigenvalue with 20 products and no early stop, the objective's
            // set-up (and so the first product's graph) included. Timed as the reference script
            // times it: one warm-up run, then the median of iters / 5 (at least one).
            let (secs, _) = timed((s.iters / 5).max(1), device, |_| {
                let obj = Objective::new(model, store, &imgs, &mask, b, 0.0, rule)?;
                let settings = PowerSettings {
                    max_iters: 20,
                    tol: 0.0,
                };
                let mut rng = stream(0, Purpose::PowerIteration, 0);
                top_eigen(obj.len(), 1, settings, &mut rng, |v| obj.hvp_exact(v))?;
                Ok(())
            })?;
            out.push(format!("power_s={secs:.3}"));
        }
        if !s.parts.contains(&BenchPart::Hvp) {
            return Ok(out);
        }
        let obj = Objective::new(model, store, &imgs, &mask, b, 0.0, rule)?;
        let v: Vec<f64> = {
            let mut r = stream(0, Purpose::Synthetic, 1);
            (0..obj.len())
                .map(|_| StandardNormal.sample(&mut r))
                .collect()
        };
        let (grad, _) = timed(s.iters, device, |_| obj.gradient().map(|_| ()))?;
        let watch = Watch::start(device)?;
        let t0 = Instant::now();
        obj.hvp_exact(&v)?;
        device.synchronize()?;
        let first = t0.elapsed().as_secs_f64();
        let (hvp, _) = timed(s.iters, device, |_| obj.hvp_exact(&v).map(|_| ()))?;
        let mem = watch.finish();
        out.extend([
            format!("hvp_parameters={}", obj.len()),
            format!("gradient_s={grad:.5}"),
            format!("hvp_first_s={first:.5}"),
            format!("hvp_s={hvp:.5}"),
            format!("hvp_over_gradient={:.3}", hvp / grad),
            format!("hvp_first_over_gradient={:.3}", first / grad),
        ]);
        memory_lines(&mut out, "hvp", mem);
        Ok(out)
    })?;
    Ok(lines)
}

/// `cpu`, or `cuda:N`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

impl BenchArgs {
    /// The flags as settings: the preset (MFF's default fused layers for `--model mff`).
    pub fn settings(&self) -> BenchSettings {
        BenchSettings {
            cfg: bench_config(self.model.model, self.model.preset),
            batch: self.batch_size,
            iters: self.iters,
            precision: self.precision,
            mask_ratio: self.mask_ratio,
            parts: self.parts.clone(),
            hvp_batch: self.hvp_batch,
            peak_tflops: self.peak_tflops,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_flops_of_tiny_mff_match_the_issue_figure() {
        // Issue 5 gives 47.5 GFLOP for a `tiny` MFF training step at batch 64, mask 0.75,
        // counted on the PyTorch model: 742 MFLOP per image (3 forwards would be 47.55).
        let cfg = bench_config(ModelKind::Mff, Preset::Tiny);
        let per_image = train_flops_per_image(&cfg, 0.75);
        assert!(
            (per_image * 64.0 / 47.5e9 - 1.0).abs() < 1e-3,
            "{per_image}"
        );
    }

    #[test]
    fn flops_by_hand_for_a_small_mae() {
        // 8 px, patch 4: L = 4 patches of P = 48; D 8, 1 block, 2 heads, MLP 32; decoder 4
        // wide, 1 block, MLP 16; mask 0.5 keeps 2, so n = 3 encoder and 5 decoder tokens.
        let cfg = ModelConfig {
            img_size: 8,
            embed_dim: 8,
            depth: 1,
            decoder_embed_dim: 4,
            decoder_num_heads: 1,
            ..crate::config::test_config()
        };
        assert_eq!(
            (cfg.patch_size, cfg.num_heads, cfg.decoder_depth),
            (4, 2, 1)
        );
        let patch = 2.0 * 4.0 * 48.0 * 8.0;
        let enc = 2.0 * 3.0 * 8.0 * 24.0
            + 2.0 * 2.0 * 3.0 * 8.0 * 3.0
            + 2.0 * 3.0 * 8.0 * 8.0
            + 2.0 * 2.0 * 3.0 * 8.0 * 32.0;
        let embed = 2.0 * 3.0 * 8.0 * 4.0;
        let dec = 2.0 * 5.0 * 4.0 * 12.0
            + 2.0 * 2.0 * 5.0 * 4.0 * 5.0
            + 2.0 * 5.0 * 4.0 * 4.0
            + 2.0 * 2.0 * 5.0 * 4.0 * 16.0;
        let pred = 2.0 * 5.0 * 4.0 * 48.0;
        let fwd = patch + enc + embed + dec + pred;
        assert_eq!(forward_flops_per_image(&cfg, 0.5), fwd);
        assert_eq!(train_flops_per_image(&cfg, 0.5), 3.0 * fwd - patch);
        // Unmasked encoder: 5 tokens.
        let enc5 = 2.0 * 5.0 * 8.0 * 24.0
            + 2.0 * 2.0 * 5.0 * 8.0 * 5.0
            + 2.0 * 5.0 * 8.0 * 8.0
            + 2.0 * 2.0 * 5.0 * 8.0 * 32.0;
        assert_eq!(encoder_forward_flops_per_image(&cfg), patch + enc5);
    }

    #[test]
    fn base_training_step_is_about_58_gflop_per_image() {
        // ViT-B/16 MAE at mask 0.75: 50 encoder tokens, 197 decoder tokens of width 512.
        let cfg = bench_config(ModelKind::Mae, Preset::Base);
        let f = train_flops_per_image(&cfg, 0.75);
        assert!((55e9..62e9).contains(&f), "{f:e}");
        // The unmasked ViT-B/16 encoder: 17.6 GMAC, the figure usually quoted.
        let e = encoder_forward_flops_per_image(&cfg) / 2.0;
        assert!((e / 17.6e9 - 1.0).abs() < 0.01, "{e:e}");
    }
}
