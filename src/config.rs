//! Typed configuration: the model config, its presets and validation, the checkpoint's `config`
//! JSON, a training run's config ([`TrainConfig`]) and the value enums of the command-line flags.
//! Settings as given (a preset and overrides, steps or epochs) resolve into these in
//! `config/options.rs` ([`ModelOptions`], [`TrainOptions`]). This layer imports only `data`'s
//! enums, so every layer above may use it.
//!
//! The field names are facebookresearch/mae's `MaskedAutoencoderViT` constructor arguments, plus
//! the MFF fields `fuse_layers`, `projection` and `fusion` (mmpretrain `MFFViT`). A checkpoint's
//! `__metadata__["config"]` is exactly this struct as JSON: unknown fields are an error, missing
//! ones take MAE's constructor defaults, so a checkpoint written by PyTorch with MAE's names loads.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

mod options;

pub use options::{ModelOptions, TrainOptions};

/// How each shallow fused layer is projected before fusion (MFF paper ablation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Projection {
    /// One `Linear(D, D)` per shallow layer (mmpretrain's default).
    #[default]
    Linear,
    /// `Linear(D, D)`, exact GELU, `Linear(D, D)`.
    Mlp,
}

/// How the fused layers are combined (MFF paper ablation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fusion {
    /// Softmax-normalised scalar weights, one per fused layer (mmpretrain's default).
    #[default]
    Weighted,
    /// One multi-head attention layer over the concatenated fused tokens; its output at the last
    /// layer's positions goes on.
    Attention,
}

/// Architecture of an MAE or MFF-MAE model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub decoder_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    pub mlp_ratio: f64,
    pub norm_pix_loss: bool,
    /// 0-based indices of the shallow blocks fused with the last block; empty means plain MAE.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fuse_layers: Vec<usize>,
    pub projection: Projection,
    pub fusion: Fusion,
}

impl Default for ModelConfig {
    /// facebookresearch/mae's constructor defaults.
    fn default() -> Self {
        Self {
            img_size: 224,
            patch_size: 16,
            in_chans: 3,
            embed_dim: 1024,
            depth: 24,
            num_heads: 16,
            decoder_embed_dim: 512,
            decoder_depth: 8,
            decoder_num_heads: 16,
            mlp_ratio: 4.0,
            norm_pix_loss: false,
            fuse_layers: Vec::new(),
            projection: Projection::Linear,
            fusion: Fusion::Weighted,
        }
    }
}

/// Model family chosen on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Mae,
    Mff,
}

/// Named architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// 32 px, patch 4, 192 wide, 12 blocks, 3 heads; decoder 128 x 2 blocks x 4 heads (CPU).
    Tiny,
    /// ViT-S/16 at 224 px: 384 wide, 12 blocks, 6 heads; MAE decoder.
    Small,
    /// ViT-B/16: 768 wide, 12 blocks, 12 heads; MAE decoder.
    Base,
    /// ViT-L/16: 1024 wide, 24 blocks, 16 heads; MAE decoder.
    Large,
    /// ViT-H/14: 1280 wide, 32 blocks, 16 heads; MAE decoder.
    Huge,
}

impl Preset {
    /// The preset's architecture (plain MAE, norm_pix_loss on as in MAE's pre-training recipe).
    pub fn config(self) -> ModelConfig {
        let mae_decoder = ModelConfig {
            decoder_embed_dim: 512,
            decoder_depth: 8,
            decoder_num_heads: 16,
            norm_pix_loss: true,
            ..ModelConfig::default()
        };
        match self {
            Preset::Tiny => ModelConfig {
                img_size: 32,
                patch_size: 4,
                embed_dim: 192,
                depth: 12,
                num_heads: 3,
                decoder_embed_dim: 128,
                decoder_depth: 2,
                decoder_num_heads: 4,
                ..mae_decoder
            },
            Preset::Small => ModelConfig {
                embed_dim: 384,
                depth: 12,
                num_heads: 6,
                ..mae_decoder
            },
            Preset::Base => ModelConfig {
                embed_dim: 768,
                depth: 12,
                num_heads: 12,
                ..mae_decoder
            },
            Preset::Large => ModelConfig {
                embed_dim: 1024,
                depth: 24,
                num_heads: 16,
                ..mae_decoder
            },
            Preset::Huge => ModelConfig {
                patch_size: 14,
                embed_dim: 1280,
                depth: 32,
                num_heads: 16,
                ..mae_decoder
            },
        }
    }
}

/// MFF's default shallow layers: mmpretrain's ViT-B choice [0, 2, 4, 6, 8] of 12 blocks, scaled
/// to `depth` (block index round(i * depth / 12)), without duplicates or the last block.
pub fn default_fuse_layers(depth: usize) -> Vec<usize> {
    let mut out: Vec<usize> = [0usize, 2, 4, 6, 8]
        .iter()
        .map(|&i| ((i * depth) as f64 / 12.0).round() as usize)
        .filter(|&i| i + 1 < depth)
        .collect();
    out.dedup();
    out
}

/// Parses a `--fuse-layers` value: a comma-separated list of 0-based block indices, `all`
/// (every block before the last) or `none`.
pub fn parse_fuse_layers(s: &str, depth: usize) -> Result<Vec<usize>> {
    match s.trim() {
        "all" => Ok((0..depth.saturating_sub(1)).collect()),
        "none" | "" => Ok(Vec::new()),
        list => list
            .split(',')
            .map(|t| {
                t.trim().parse::<usize>().map_err(|_| {
                    anyhow::anyhow!(
                        "--fuse-layers: `{t}` is not a block index; give 0-based indices like \
                         0,2,4,6,8, or `all`, or `none`"
                    )
                })
            })
            .collect(),
    }
}

/// floor(L * (1 - ratio)), as `int(L * (1 - mask_ratio))` in MAE: the patches a mask keeps
/// visible (here, not in `model::masking`, because validating a run needs it).
pub fn len_keep(num_patches: usize, ratio: f64) -> usize {
    (num_patches as f64 * (1.0 - ratio)) as usize
}

/// Checks that `ratio` removes at least one and keeps at least one of `num_patches`; returns
/// len_keep, or a message naming `--mask-ratio`.
pub fn check_ratio(num_patches: usize, ratio: f64) -> std::result::Result<usize, String> {
    let keep = len_keep(num_patches, ratio);
    if ratio > 0.0 && ratio < 1.0 && keep > 0 && keep < num_patches {
        Ok(keep)
    } else {
        Err(format!(
            "--mask-ratio {ratio} must be in (0, 1) and keep at least one and remove at least \
             one of the {num_patches} patches"
        ))
    }
}

/// Absolute learning rate from the base one: lr = blr * batch / 256 (MAE's linear scaling).
pub fn absolute_lr(blr: f64, batch_size: usize) -> f64 {
    blr * batch_size as f64 / 256.0
}

impl ModelConfig {
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
    /// Length of one patchified target vector, p*p*C.
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.in_chans
    }
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }
    pub fn decoder_mlp_hidden(&self) -> usize {
        (self.decoder_embed_dim as f64 * self.mlp_ratio) as usize
    }
    pub fn is_mff(&self) -> bool {
        !self.fuse_layers.is_empty()
    }
    /// Every fused block, shallow ones first, then the last block.
    pub fn fused_blocks(&self) -> Vec<usize> {
        let mut v = self.fuse_layers.clone();
        v.push(self.depth - 1);
        v
    }

    /// Checks every field; errors name the field, its value and the rule.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        for (name, v) in [
            ("img_size", c.img_size),
            ("patch_size", c.patch_size),
            ("in_chans", c.in_chans),
            ("embed_dim", c.embed_dim),
            ("depth", c.depth),
            ("num_heads", c.num_heads),
            ("decoder_embed_dim", c.decoder_embed_dim),
            ("decoder_depth", c.decoder_depth),
            ("decoder_num_heads", c.decoder_num_heads),
        ] {
            if v == 0 {
                bail!("config: {name} must be positive, got 0");
            }
        }
        if !c.img_size.is_multiple_of(c.patch_size) {
            bail!(
                "config: img_size {} is not a multiple of patch_size {}",
                c.img_size,
                c.patch_size
            );
        }
        if !c.embed_dim.is_multiple_of(c.num_heads) {
            bail!(
                "config: embed_dim {} is not divisible by num_heads {}",
                c.embed_dim,
                c.num_heads
            );
        }
        if !c.decoder_embed_dim.is_multiple_of(c.decoder_num_heads) {
            bail!(
                "config: decoder_embed_dim {} is not divisible by decoder_num_heads {}",
                c.decoder_embed_dim,
                c.decoder_num_heads
            );
        }
        if !c.embed_dim.is_multiple_of(4) || !c.decoder_embed_dim.is_multiple_of(4) {
            bail!(
                "config: embed_dim {} and decoder_embed_dim {} must be multiples of 4 (2-D sin-cos \
                 position tables)",
                c.embed_dim,
                c.decoder_embed_dim
            );
        }
        if !(c.mlp_ratio.is_finite() && c.mlp_ratio > 0.0) {
            bail!("config: mlp_ratio must be positive, got {}", c.mlp_ratio);
        }
        // The derived widths need the same care as the flags: a ratio that rounds a hidden
        // layer to no unit would reach the kernels as an empty matrix.
        for (name, width, hidden) in [
            ("embed_dim", c.embed_dim, c.mlp_hidden()),
            (
                "decoder_embed_dim",
                c.decoder_embed_dim,
                c.decoder_mlp_hidden(),
            ),
        ] {
            if hidden == 0 {
                bail!(
                    "config: mlp_ratio {} gives an MLP hidden width of 0 for {name} {width}: \
                     raise --mlp-ratio to at least {}",
                    c.mlp_ratio,
                    1.0 / width as f64
                );
            }
        }
        if c.fuse_layers.windows(2).any(|w| w[0] >= w[1]) {
            bail!(
                "config: fuse_layers {:?} must be strictly increasing (mmpretrain pairs the k-th \
                 projection with the k-th listed block, in block order)",
                c.fuse_layers
            );
        }
        for &i in &c.fuse_layers {
            if i + 1 >= c.depth {
                bail!(
                    "config: fuse_layers entry {i} is not a shallow block of a depth-{} encoder \
                     (allowed 0..={}; the last block {} is always fused)",
                    c.depth,
                    c.depth.saturating_sub(2),
                    c.depth - 1
                );
            }
        }
        Ok(())
    }

    /// The config as the checkpoint's JSON.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// Parses and validates a checkpoint's `config` JSON.
    pub fn from_json(s: &str) -> Result<Self> {
        let cfg: ModelConfig = serde_json::from_str(s).map_err(|e| {
            anyhow::anyhow!("checkpoint config JSON is not a mimscope/MAE config: {e}")
        })?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The one model config the tests use (unit and integration): 16 px, patch 4, width 32,
/// 2 blocks; norm_pix_loss on. Tests that need another shape override fields of it.
pub fn test_config() -> ModelConfig {
    ModelConfig {
        img_size: 16,
        patch_size: 4,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        decoder_embed_dim: 16,
        decoder_depth: 1,
        decoder_num_heads: 2,
        norm_pix_loss: true,
        ..ModelConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn len_keep_matches_mae() {
        assert_eq!(len_keep(196, 0.75), 49);
        assert_eq!(len_keep(64, 0.75), 16);
        assert_eq!(len_keep(16, 0.75), 4);
        assert_eq!(len_keep(10, 0.75), 2); // int(2.5)
    }

    #[test]
    fn mask_ratios_keep_and_remove_a_patch() {
        assert_eq!(check_ratio(16, 0.75), Ok(4));
        for bad in [0.0, 1.0, 0.99, -0.5, f64::NAN] {
            let e = check_ratio(16, bad).unwrap_err();
            assert!(e.contains("--mask-ratio"), "{e}");
        }
        assert_eq!(absolute_lr(1.5e-4, 4096), 1.5e-4 * 16.0);
    }

    #[test]
    fn default_fuse_layers_match_mmpretrain_for_depth_12() {
        assert_eq!(default_fuse_layers(12), vec![0, 2, 4, 6, 8]);
        assert_eq!(default_fuse_layers(24), vec![0, 4, 8, 12, 16]);
        assert_eq!(default_fuse_layers(2), vec![0]);
    }

    #[test]
    fn fuse_layer_lists_parse() {
        assert_eq!(parse_fuse_layers("all", 4).unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_fuse_layers("none", 4).unwrap(), Vec::<usize>::new());
        assert_eq!(parse_fuse_layers("0, 2", 4).unwrap(), vec![0, 2]);
        assert!(parse_fuse_layers("0,x", 4).is_err());
    }

    #[test]
    fn json_round_trip_and_strictness() {
        let mut c = Preset::Tiny.config();
        c.fuse_layers = vec![0, 2];
        let back = ModelConfig::from_json(&c.to_json().unwrap()).unwrap();
        assert_eq!(back, c);
        // Missing fields take MAE's constructor defaults.
        let m =
            ModelConfig::from_json(r#"{"embed_dim": 768, "depth": 12, "num_heads": 12}"#).unwrap();
        assert_eq!(m.img_size, 224);
        assert_eq!(m.decoder_embed_dim, 512);
        assert!(!m.is_mff());
        let err = ModelConfig::from_json(r#"{"embed_dims": 768}"#).unwrap_err();
        assert!(format!("{err:#}").contains("embed_dims"), "{err:#}");
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = Preset::Tiny.config();
        c.fuse_layers = vec![11];
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("fuse_layers"));
        let c = ModelConfig {
            patch_size: 5,
            ..Preset::Tiny.config()
        };
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("patch_size"));
    }
}

/// A resolved training run, as written to `RUN_DIR/config.json`. Derived values (absolute lr,
/// steps, warmup) are computed once by [`TrainOptions::resolve`] and stored, so a resumed run uses exactly
/// what the first one used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model_kind: ModelKind,
    pub preset: Preset,
    pub model: ModelConfig,
    /// Image folder; `None` trains on the photos bundled in the binary.
    pub data: Option<std::path::PathBuf>,
    /// Usable images found in `data` when the run was set up.
    pub dataset_size: usize,
    pub batch_size: usize,
    /// Total optimiser steps.
    pub steps: u64,
    pub warmup_steps: u64,
    /// Base learning rate; `lr = blr * batch_size / 256`.
    pub blr: f64,
    pub lr: f64,
    pub weight_decay: f64,
    pub decay_fusion_weights: bool,
    pub mask_ratio: f64,
    pub augment: crate::data::Augment,
    pub seed: u64,
    pub save_every: u64,
    /// Arithmetic of the training step (runs from before this field trained in f32).
    #[serde(default)]
    pub precision: TrainPrecision,
}

/// Arithmetic of a training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainPrecision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision: matrix products (linear layers, patch embedding, attention) in bf16
    /// with f32 accumulation; parameters, optimiser state, norms, softmax, GELU, residual
    /// stream and loss in f32. For GPUs; CPUs train in f32.
    Bf16,
}

impl TrainPrecision {
    /// The dtype matrix products are computed in, `None` for the parameters' own.
    pub fn matmul_dtype(self) -> Option<candle_core::DType> {
        match self {
            TrainPrecision::F32 => None,
            TrainPrecision::Bf16 => Some(candle_core::DType::BF16),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TrainPrecision::F32 => "f32",
            TrainPrecision::Bf16 => "bf16",
        }
    }
}

impl TrainConfig {
    /// Optimiser steps per epoch: MAE's `len(data_loader)` with drop_last, at least 1.
    pub fn steps_per_epoch(&self, dataset_size: usize) -> u64 {
        ((dataset_size / self.batch_size) as u64).max(1)
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if self.model.in_chans != 3 {
            bail!(
                "config: training reads RGB images, so in_chans must be 3 (got {})",
                self.model.in_chans
            );
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be positive");
        }
        if self.steps == 0 {
            bail!("the run has 0 steps; give --steps N or --epochs E with a positive value");
        }
        if self.warmup_steps > self.steps {
            bail!(
                "--warmup-steps {} exceeds the run's {} steps",
                self.warmup_steps,
                self.steps
            );
        }
        if !(self.blr.is_finite() && self.blr > 0.0) {
            bail!("--blr must be a positive number, got {}", self.blr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("--weight-decay must be >= 0, got {}", self.weight_decay);
        }
        check_ratio(self.model.num_patches(), self.mask_ratio).map_err(anyhow::Error::msg)?;
        if self.save_every == 0 {
            bail!("--save-every must be positive");
        }
        Ok(())
    }
}

/// How Hessian-vector products are computed (`hessian --hvp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HvpKind {
    /// Double backward.
    Exact,
    /// Central finite differences of two gradients.
    Fd,
}

/// Floating-point type of an analysis (`hessian --precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    F32,
    F64,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::F64 => candle_core::DType::F64,
        }
    }
}

/// Parts of the benchmark (`bench --parts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPart {
    /// Training step: forward, backward, AdamW.
    Train,
    /// Unmasked encoder forward, every block output kept.
    Forward,
    /// The Fourier recipe on the unmasked encoder's embedding and block outputs (spectra).
    Spectrum,
    /// One exact Hessian-vector product against one gradient (f32, `--hvp-batch` images).
    Hvp,
    /// 20 power-iteration steps with exact products, set-up included (`--hvp-batch` images);
    /// the median of `--iters` / 5 runs (at least one) after a warm-up, as the reference script.
    Power,
    /// Building one training batch from the bundled photos, per augmentation.
    Data,
}
