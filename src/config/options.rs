//! Settings as given (a preset and the fields overridden, steps or epochs, ...) resolved into
//! validated configs: [`ModelOptions::resolve`] gives a [`ModelConfig`], [`TrainOptions::resolve`]
//! a [`TrainConfig`] with its derived values (absolute lr, steps, warmup) computed once.
//!
//! These are plain values, one field per `train` flag, so the command line (`cli.rs`, clap only)
//! and anything else that starts a run resolve the same way; `None` means "not given", and the
//! defaults applied here are the ones `train --help` states.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::{
    absolute_lr, default_fuse_layers, parse_fuse_layers, Fusion, ModelConfig, ModelKind, Preset,
    Projection, TrainConfig, TrainPrecision,
};
use crate::data::Augment;

/// An architecture as asked for: a preset, then any field overridden.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOptions {
    pub model: ModelKind,
    pub preset: Preset,
    pub img_size: Option<usize>,
    pub patch_size: Option<usize>,
    pub embed_dim: Option<usize>,
    pub depth: Option<usize>,
    pub num_heads: Option<usize>,
    pub decoder_embed_dim: Option<usize>,
    pub decoder_depth: Option<usize>,
    pub decoder_num_heads: Option<usize>,
    pub mlp_ratio: Option<f64>,
    pub norm_pix_loss: Option<bool>,
    /// MFF only: `0,2,4,6,8`, `all` or `none`; `None` = mmpretrain's list scaled to the depth.
    pub fuse_layers: Option<String>,
    /// MFF only.
    pub projection: Projection,
    /// MFF only.
    pub fusion: Fusion,
}

impl ModelOptions {
    /// The preset with every override applied, validated.
    pub fn resolve(&self) -> Result<ModelConfig> {
        let mut c = self.preset.config();
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        over!(
            img_size,
            patch_size,
            embed_dim,
            depth,
            num_heads,
            decoder_embed_dim,
            decoder_depth,
            decoder_num_heads,
            mlp_ratio,
            norm_pix_loss
        );
        match self.model {
            ModelKind::Mae => {
                if self.fuse_layers.is_some() {
                    bail!("--fuse-layers applies to --model mff only");
                }
            }
            ModelKind::Mff => {
                c.fuse_layers = match &self.fuse_layers {
                    Some(s) => parse_fuse_layers(s, c.depth)?,
                    None => default_fuse_layers(c.depth),
                };
                c.projection = self.projection;
                c.fusion = self.fusion;
            }
        }
        c.validate()?;
        Ok(c)
    }
}

/// A training run as asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    pub model: ModelOptions,
    /// Image folder; `None` = the bundled photos.
    pub data: Option<PathBuf>,
    /// `None` with `epochs` also `None`: 200 steps.
    pub steps: Option<u64>,
    pub epochs: Option<f64>,
    pub batch_size: usize,
    pub blr: f64,
    /// `None` with `warmup_epochs` also `None`: 10% of the steps (MAE's 40 of 400 epochs).
    pub warmup_steps: Option<u64>,
    pub warmup_epochs: Option<f64>,
    pub weight_decay: f64,
    pub decay_fusion_weights: bool,
    pub mask_ratio: f64,
    /// `None`: each paper's recipe, mae for MAE and pixmim for MFF.
    pub augment: Option<Augment>,
    pub seed: u64,
    pub save_every: u64,
    pub precision: TrainPrecision,
}

impl TrainOptions {
    /// The validated run config; `dataset_size` converts epochs to steps.
    pub fn resolve(&self, dataset_size: usize) -> Result<TrainConfig> {
        let model = self.model.resolve()?;
        if self.batch_size == 0 {
            bail!("--batch-size must be positive");
        }
        let steps_per_epoch = ((dataset_size / self.batch_size) as u64).max(1);
        let epochs_to_steps = |e: f64, flag: &str| -> Result<u64> {
            if !(e.is_finite() && e >= 0.0) {
                bail!("{flag} must be a non-negative number, got {e}");
            }
            Ok((e * steps_per_epoch as f64).round() as u64)
        };
        let steps = match (self.steps, self.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => epochs_to_steps(e, "--epochs")?,
            (None, None) => 200,
        };
        let warmup_steps = match (self.warmup_steps, self.warmup_epochs) {
            (Some(w), _) => w,
            (None, Some(e)) => epochs_to_steps(e, "--warmup-epochs")?,
            (None, None) => steps / 10,
        };
        let cfg = TrainConfig {
            model_kind: self.model.model,
            preset: self.model.preset,
            model,
            data: self.data.clone(),
            dataset_size,
            batch_size: self.batch_size,
            steps,
            warmup_steps,
            blr: self.blr,
            lr: absolute_lr(self.blr, self.batch_size),
            weight_decay: self.weight_decay,
            decay_fusion_weights: self.decay_fusion_weights,
            mask_ratio: self.mask_ratio,
            augment: self.augment.unwrap_or(match self.model.model {
                ModelKind::Mae => Augment::Mae,
                ModelKind::Mff => Augment::Pixmim,
            }),
            seed: self.seed,
            save_every: self.save_every,
            precision: self.precision,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
