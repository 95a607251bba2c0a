//! `mimscope train`: a new run or `--resume`, then reconstructions of the run's first images;
//! and [`train_or_continue`], the train step of `reproduce` and recipes.
//!
//! The flags resolve through [`crate::config::TrainOptions`], so a run started here and one a
//! chain starts get the same config for the same flags.

use std::path::Path;

use anyhow::{Context, Result};

use super::reconstruct::{self, ReconstructArgs};
use crate::cli::{ModelArgs, TrainArgs};
use crate::config::{ModelOptions, TrainConfig, TrainOptions};
use crate::train::{self, Start, FINAL_FILE};

impl From<&ModelArgs> for ModelOptions {
    fn from(a: &ModelArgs) -> Self {
        ModelOptions {
            model: a.model,
            preset: a.preset,
            img_size: a.img_size,
            patch_size: a.patch_size,
            embed_dim: a.embed_dim,
            depth: a.depth,
            num_heads: a.num_heads,
            decoder_embed_dim: a.decoder_embed_dim,
            decoder_depth: a.decoder_depth,
            decoder_num_heads: a.decoder_num_heads,
            mlp_ratio: a.mlp_ratio,
            norm_pix_loss: a.norm_pix_loss,
            fuse_layers: a.fuse_layers.clone(),
            projection: a.projection,
            fusion: a.fusion,
        }
    }
}

impl From<&TrainArgs> for TrainOptions {
    fn from(a: &TrainArgs) -> Self {
        TrainOptions {
            model: ModelOptions::from(&a.model),
            data: a.data.clone(),
            steps: a.steps,
            epochs: a.epochs,
            batch_size: a.batch_size,
            blr: a.blr,
            warmup_steps: a.warmup_steps,
            warmup_epochs: a.warmup_epochs,
            weight_decay: a.weight_decay,
            decay_fusion_weights: !a.no_decay_fusion_weights,
            mask_ratio: a.mask_ratio,
            augment: a.augment,
            seed: a.seed,
            save_every: a.save_every,
            precision: a.precision,
        }
    }
}

impl TrainArgs {
    /// Flags -> validated run config. `dataset_size` converts epochs to steps.
    pub fn resolve(&self, dataset_size: usize) -> Result<TrainConfig> {
        TrainOptions::from(self).resolve(dataset_size)
    }
}

/// `train`: a new run or `--resume`, ending with reconstructions of its first images.
pub(super) fn run(args: &TrainArgs) -> Result<()> {
    let device = args.device.device()?;
    let (run_dir, start) = match &args.resume {
        Some(dir) => (dir.clone(), Start::Resume),
        None => {
            let dataset = train::open_dataset(args.data.as_deref())?;
            let cfg = args.resolve(dataset.len())?;
            if args.print_config {
                crate::say!("{}", serde_json::to_string_pretty(&cfg)?);
                return Ok(());
            }
            let out = args.out.clone().context("--out RUN_DIR is required")?;
            (out, Start::Fresh(cfg, dataset))
        }
    };
    train_and_reconstruct(&run_dir, start, &device)
}

/// Trains, then reconstructs the run's first 8 images into `RUN_DIR/reconstruction`.
fn train_and_reconstruct(run_dir: &Path, start: Start, device: &candle_core::Device) -> Result<()> {
    let (final_ck, cfg) = train::train(run_dir, start, device)?;
    let rec = ReconstructArgs {
        checkpoint: final_ck,
        data: cfg.data.clone(),
        images: 8,
        seed: cfg.seed,
        mask_ratio: cfg.mask_ratio,
        out: run_dir.join("reconstruction"),
    };
    reconstruct::run(&rec, device)
}

/// A train step of a chain: skipped when its run folder already holds `final.safetensors`,
/// resumed when it holds an unfinished run, started otherwise. So an interrupted `reproduce`
/// or recipe continues where it stopped.
pub fn train_or_continue(args: &TrainArgs) -> Result<()> {
    let Some(out) = args.out.as_deref().filter(|_| args.resume.is_none()) else {
        return run(args);
    };
    if is_started_run(out) {
        check_same_settings(out, args)?;
    }
    if out.join(FINAL_FILE).exists() {
        crate::note!("{} is complete: training skipped", out.display());
        return Ok(());
    }
    if is_started_run(out) {
        crate::note!(
            "{} holds an unfinished run: resuming it with its saved config",
            out.display()
        );
        return train_and_reconstruct(out, Start::Resume, &args.device.device()?);
    }
    run(args)
}

/// Refuses to continue or reuse a run trained with other settings than `args` asks for.
fn check_same_settings(run_dir: &Path, args: &TrainArgs) -> Result<()> {
    let path = run_dir.join(train::CONFIG_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let stored: TrainConfig =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let wanted = args.resolve(stored.dataset_size)?;
    let (a, b) = (
        serde_json::to_value(&stored)?,
        serde_json::to_value(&wanted)?,
    );
    if a != b {
        let diff: Vec<String> = match (a.as_object(), b.as_object()) {
            (Some(a), Some(b)) => a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(*v))
                .map(|(k, v)| {
                    format!(
                        "{k}: {v} there, {} asked",
                        b.get(k).unwrap_or(&serde_json::Value::Null)
                    )
                })
                .collect(),
            _ => vec![],
        };
        anyhow::bail!(
            "{} was trained with other settings ({}); choose another output folder or delete it",
            run_dir.display(),
            diff.join("; ")
        );
    }
    Ok(())
}

fn is_started_run(dir: &Path) -> bool {
    dir.join(train::CONFIG_FILE).exists()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command, TrainArgs};
    use crate::data::Augment;

    fn parse(args: &[&str]) -> TrainArgs {
        let mut full = vec!["mimscope", "train", "--out", "x"];
        full.extend_from_slice(args);
        match Cli::parse_from(full).command {
            Command::Train(t) => t,
            _ => unreachable!(),
        }
    }

    #[test]
    fn mff_without_shallow_layers_is_mae() {
        let mae = parse(&["--model", "mae"]).resolve(100).unwrap();
        let mff = parse(&["--model", "mff", "--fuse-layers", "none"])
            .resolve(100)
            .unwrap();
        assert_eq!(mae.model, mff.model);
        assert!(!mff.model.is_mff());
    }

    #[test]
    fn defaults_and_derived_values() {
        let c = parse(&["--model", "mff"]).resolve(1000).unwrap();
        assert_eq!(c.model.fuse_layers, vec![0, 2, 4, 6, 8]);
        assert_eq!(c.augment, Augment::Pixmim);
        assert_eq!(c.steps, 200);
        assert_eq!(c.warmup_steps, 20);
        assert!((c.lr - 1.5e-4 * 64.0 / 256.0).abs() < 1e-15);
        // 1000 images / batch 64 = 15 steps per epoch (drop_last).
        let c = parse(&["--epochs", "2", "--warmup-epochs", "1"])
            .resolve(1000)
            .unwrap();
        assert_eq!((c.steps, c.warmup_steps), (30, 15));
        let c = parse(&[
            "--embed-dim",
            "96",
            "--depth",
            "4",
            "--norm-pix-loss",
            "false",
        ])
        .resolve(10)
        .unwrap();
        assert_eq!(
            (c.model.embed_dim, c.model.depth, c.model.norm_pix_loss),
            (96, 4, false)
        );
        assert!(parse(&["--model", "mae", "--fuse-layers", "0"])
            .resolve(10)
            .is_err());
        assert!(parse(&["--warmup-steps", "300"]).resolve(10).is_err());
    }
}
