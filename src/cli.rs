//! Command-line interface: clap derive only, the flags and their help.
//!
//! Nothing here resolves or validates: each command's module turns its flags into settings
//! (`TrainArgs::resolve` and the `--device` and architecture flags in `commands/`,
//! `SpectrumArgs::settings` in `commands/spectrum.rs`, ...), and models and runs resolve in
//! [`crate::config`]. The value enums the flags take live in `config` and `data`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    BenchPart, Fusion, HvpKind, ModelKind, Precision, Preset, Projection, TrainPrecision,
};
use crate::data::Augment;

/// The exit status, as the top-level help states it (ripgrep's convention).
const EXIT_STATUS: &str = "Exit status: 0 when the command succeeded; 1 when it ran and found a \
problem (`parity` outside its tolerances); 2 for an error: bad flags or input, a missing or \
unreadable file, a failed write.";

/// Masked image modelling (MAE, MFF-MAE) training and analysis.
#[derive(Debug, Parser)]
#[command(name = "mimscope", version, about, after_help = EXIT_STATUS)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pre-train an MAE or MFF-MAE model, or resume a run.
    Train(TrainArgs),
    /// Reconstruct masked images with a checkpoint.
    Reconstruct(ReconstructCli),
    /// Show a checkpoint's config, parameter counts and fusion weights.
    Inspect {
        /// A weights file: mimscope's .safetensors, or a .pth / .safetensors from mmpretrain or
        /// facebookresearch/mae (its config is inferred; see `mimscope convert --help`).
        checkpoint: PathBuf,
        #[command(flatten)]
        arch: ImportArgs,
    },
    /// Time the training step, the encoder forward, Hessian-vector products and data loading
    /// (images/s, model FLOPs, peak memory) on synthetic inputs.
    Bench(BenchArgs),
    /// Check a device against the CPU: loss, encoder features and gradients of one batch from
    /// the same weights and inputs, within stated tolerances (exit status 1 when outside).
    Parity(ParityArgs),
    /// Fourier spectra (relative log amplitude) of encoder features, per layer and checkpoint.
    Spectrum(SpectrumArgs),
    /// MFF fusion weights: the trajectory of a run folder, or the weights of checkpoints.
    Fusion(FusionArgs),
    /// Top Hessian eigenvalues of the pre-training loss by power iteration, per batch.
    Hessian(HessianArgs),
    /// The main job: train MAE and MFF `tiny`, run all three analyses, write report.md.
    Reproduce(ReproduceArgs),
    /// Run a recipe: a TOML file of commands (see analyses/).
    Run(RunArgs),
    /// Convert a PyTorch checkpoint (.pth from mmpretrain's MAE/MFF or facebookresearch/mae),
    /// or a safetensors file without mimscope's config, into mimscope's format.
    ///
    /// Keys are renamed to MAE's; the architecture comes from the tensor shapes, except what
    /// weights do not store: the head counts (default: the preset of the same width), the fused
    /// MFF blocks (default: mmpretrain's [0,2,4,6,8] scaled to the depth, when the file fuses
    /// that many) and norm_pix_loss (default on). Every command also reads such files
    /// directly when these defaults fit.
    Convert(ConvertArgs),
}

/// Where to compute.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Architecture flags: a preset, then any field overridden.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model family: plain MAE, or MAE with Multi-level Feature Fusion.
    #[arg(long, value_enum, default_value = "mae")]
    pub model: ModelKind,
    /// Architecture preset; every field can be overridden by the flags below.
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Input image size (pixels, square).
    #[arg(long)]
    pub img_size: Option<usize>,
    /// Patch size (pixels).
    #[arg(long)]
    pub patch_size: Option<usize>,
    /// Encoder width.
    #[arg(long)]
    pub embed_dim: Option<usize>,
    /// Encoder blocks.
    #[arg(long)]
    pub depth: Option<usize>,
    /// Encoder attention heads.
    #[arg(long)]
    pub num_heads: Option<usize>,
    /// Decoder width.
    #[arg(long)]
    pub decoder_embed_dim: Option<usize>,
    /// Decoder blocks.
    #[arg(long)]
    pub decoder_depth: Option<usize>,
    /// Decoder attention heads.
    #[arg(long)]
    pub decoder_num_heads: Option<usize>,
    /// MLP hidden width over block width.
    #[arg(long)]
    pub mlp_ratio: Option<f64>,
    /// Per-patch normalised pixel targets (MAE's norm_pix_loss); presets use true.
    #[arg(long)]
    pub norm_pix_loss: Option<bool>,
    /// MFF: shallow blocks fused with the last one, 0-based (`0,2,4,6,8`), `all` or `none`.
    /// Default: mmpretrain's [0,2,4,6,8] for 12 blocks, scaled to other depths.
    #[arg(long)]
    pub fuse_layers: Option<String>,
    /// MFF: projection of each shallow layer.
    #[arg(long, value_enum, default_value = "linear")]
    pub projection: Projection,
    /// MFF: how fused layers are combined.
    #[arg(long, value_enum, default_value = "weighted")]
    pub fusion: Fusion,
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image folder (searched recursively for JPEG and PNG; ImageFolder layout works).
    /// Default: the photos bundled with mimscope.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Optimiser steps (default 200 when --epochs is not given).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Epochs (passes over the data, MAE's drop_last batches, at least one step each).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Base learning rate; the absolute one is blr * batch / 256.
    #[arg(long, default_value_t = 1.5e-4)]
    pub blr: f64,
    /// Linear warmup steps (default: 10% of the steps, MAE's 40 of 400 epochs).
    #[arg(long, conflicts_with = "warmup_epochs")]
    pub warmup_steps: Option<u64>,
    /// Linear warmup in epochs.
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Exempt the MFF fusion logits `proj_weights` from weight decay (mmpretrain decays them).
    #[arg(long)]
    pub no_decay_fusion_weights: bool,
    /// Fraction of patches removed.
    #[arg(long, default_value_t = 0.75)]
    pub mask_ratio: f64,
    /// Augmentation: MAE's RandomResizedCrop+flip or PixMIM's resize+reflect-pad crop+flip.
    /// Default: mae for --model mae, pixmim for --model mff (each paper's recipe).
    #[arg(long, value_enum)]
    pub augment: Option<Augment>,
    /// Seed of everything random (init, data order, crops, masks).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 50)]
    pub save_every: u64,
    /// Run folder (must be new or empty).
    #[arg(long, required_unless_present_any = ["resume", "print_config"])]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its newest checkpoint, with its saved config
    /// (only --device may be given with it).
    #[arg(long, conflicts_with_all = [
        "model", "preset", "img_size", "patch_size", "embed_dim", "depth", "num_heads",
        "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio", "norm_pix_loss",
        "fuse_layers", "projection", "fusion", "data", "steps", "epochs", "batch_size", "blr",
        "warmup_steps", "warmup_epochs", "weight_decay", "no_decay_fusion_weights", "mask_ratio",
        "augment", "seed", "save_every", "out", "print_config", "precision",
    ])]
    pub resume: Option<PathBuf>,
    /// Arithmetic: f32, or bf16 mixed precision (bf16 matrix products, f32 master weights,
    /// optimiser state, norms, softmax and loss; a non-finite gradient stops the run before the
    /// update). bf16 needs --device cuda:N.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: TrainPrecision,
    /// Print the resolved config and exit.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ReconstructCli {
    /// Weights file: mimscope's .safetensors, or a .pth / .safetensors with MAE's or mmpretrain's
    /// names whose config can be inferred (else `mimscope convert` it first).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Image folder; default: the bundled photos.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// How many images (the first ones in sorted path order).
    #[arg(long, default_value_t = 8)]
    pub images: usize,
    /// Seed of the masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of patches removed.
    #[arg(long, default_value_t = 0.75)]
    pub mask_ratio: f64,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: BenchModel,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Timed repetitions after one warm-up (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Arithmetic of the training step and forward (bf16: mixed precision, as `train`).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: TrainPrecision,
    /// Fraction of patches removed in the training step.
    #[arg(long, default_value_t = 0.75)]
    pub mask_ratio: f64,
    /// What to time, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "train,forward,data"
    )]
    pub parts: Vec<BenchPart>,
    /// Images in the loss whose Hessian-vector products `--parts hvp,power` time.
    #[arg(long, default_value_t = 8)]
    pub hvp_batch: usize,
    /// The device's peak rate in TFLOP/s, to print the fraction of it reached (e.g. 790 for
    /// bf16 dense on an H100/H200).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Compare a device with the CPU on one batch.
#[derive(Debug, Clone, Args)]
pub struct ParityArgs {
    /// Weights (mimscope .safetensors or .pth); default: `--preset`/`--model` initialised from
    /// `--seed`.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[command(flatten)]
    pub model: BenchModel,
    /// Images (the first ones of the bundled photos, or of --data, in sorted order).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Image folder; default: the bundled photos.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Seed of the initialisation (without --checkpoint) and of the mask.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of patches removed.
    #[arg(long, default_value_t = 0.75)]
    pub mask_ratio: f64,
    /// Arithmetic on the device (the CPU reference is always f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: TrainPrecision,
    /// First every kernel on its own, as the model calls it on the device, against its
    /// primitive form on the CPU: value and gradients in f32, second derivatives (H v) in
    /// f64; so a wrong kernel is named by itself, before the whole model is compared.
    #[arg(long)]
    pub kernels: bool,
    /// The device compared with the CPU.
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The bench's model: like [`ModelArgs`] but MFF by default.
#[derive(Debug, Clone, Args)]
pub struct BenchModel {
    #[arg(long, value_enum, default_value = "mff")]
    pub model: ModelKind,
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
}

#[derive(Debug, Clone, Args)]
pub struct SpectrumArgs {
    /// Weights file (.safetensors or .pth); repeat to compare several in one figure.
    #[arg(long = "checkpoint", required = true)]
    pub checkpoints: Vec<PathBuf>,
    /// Image folder; default: the bundled photos.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// How many images (the first ones in sorted path order).
    #[arg(long, default_value_t = 64)]
    pub images: usize,
    /// Images per forward pass (memory only; the result does not depend on it).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Also analyse the stream after each block's attention residual (layers `i.5`).
    #[arg(long)]
    pub sublayers: bool,
    /// Output folder (tables and figures).
    #[arg(long)]
    pub out: PathBuf,
    /// Architecture of checkpoints that store no mimscope config (.pth).
    #[command(flatten)]
    pub arch: ImportArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct FusionArgs {
    /// A run folder (plots its fusion_weights.csv), or checkpoint files (tabulates their weights).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Folder for the figures; default: the run folder, or the current folder for checkpoints.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Checkpoints: also write the table (checkpoint,block,weight) to this CSV file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Architecture of checkpoints that store no mimscope config (.pth).
    #[command(flatten)]
    pub arch: ImportArgs,
}

#[derive(Debug, Clone, Args)]
pub struct HessianArgs {
    /// Weights file (.safetensors or .pth); repeat to compare several on identical batches.
    #[arg(long = "checkpoint", required = true)]
    pub checkpoints: Vec<PathBuf>,
    /// Image folder; default: the bundled photos.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Number of fixed mini-batches (one top-k search each).
    #[arg(long, default_value_t = 4)]
    pub batches: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Images per forward/backward pass within a batch (memory only).
    #[arg(long, default_value_t = 16)]
    pub micro_batch: usize,
    /// Eigenvalues per batch, by deflation.
    #[arg(long, default_value_t = 1)]
    pub top_k: usize,
    /// Power-iteration cap per eigenvalue.
    #[arg(long, default_value_t = 100)]
    pub max_iters: usize,
    /// Stop when the eigenvalue changes by less than this, relatively.
    #[arg(long, default_value_t = 1e-3)]
    pub tol: f64,
    /// Seed of the masks and of the power-iteration start vectors.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of patches removed.
    #[arg(long, default_value_t = 0.75)]
    pub mask_ratio: f64,
    /// Add (wd/2)·||θ||² over the decayed tensors (MAE's rule) to the objective; 0 = loss only.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Hessian-vector products: exact double backward, or finite differences of gradients.
    #[arg(long, value_enum, default_value = "exact")]
    pub hvp: HvpKind,
    /// Finite-difference step along the unit direction (with --hvp fd).
    #[arg(long, default_value_t = 1e-3)]
    pub fd_eps: f64,
    /// Also estimate the trace (Hutchinson) with this many Rademacher samples per batch.
    #[arg(long, default_value_t = 0, num_args = 0..=1, default_missing_value = "50")]
    pub trace: usize,
    /// Floating-point type of the computation.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Architecture of checkpoints that store no mimscope config (.pth).
    #[command(flatten)]
    pub arch: ImportArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ReproduceArgs {
    /// Output folder (runs, analyses and report.md); rerunning skips finished training.
    #[arg(long, default_value = "runs/reproduce")]
    pub out: PathBuf,
    /// Image folder; default: the bundled photos.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Work multiplier: training steps and Hessian batches scale with it (1 = about 2
    /// minutes on a 2-core CPU).
    #[arg(long, default_value_t = 1.0)]
    pub budget: f64,
    /// Seed of both runs and of the analyses.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Augmentation of both runs (the same for both, so only the fusion differs).
    #[arg(long, default_value = "mae", value_parser = ["mae", "pixmim"])]
    pub augment: String,
    /// Base learning rate of both runs (lr = blr x batch / 256), MAE's default.
    #[arg(long, default_value_t = 1.5e-4)]
    pub blr: f64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Recipe file (TOML): `[[step]]` tables, each a `command` and its flags.
    pub recipe: PathBuf,
}

/// What a checkpoint's tensor shapes cannot tell; used when the file stores no mimscope config
/// (and overriding a stored one).
#[derive(Debug, Clone, Default, Args)]
pub struct ImportArgs {
    /// Encoder attention heads (default: the preset of the same width: 192 -> 3, 384 -> 6,
    /// 768 -> 12, 1024 and 1280 -> 16).
    #[arg(long)]
    pub num_heads: Option<usize>,
    /// Decoder attention heads (default: the preset of the same decoder width: 512 -> 16 as
    /// MAE's, 128 -> 4).
    #[arg(long)]
    pub decoder_num_heads: Option<usize>,
    /// MFF: the shallow fused blocks, 0-based, e.g. `0,2,4,6,8` (mmpretrain's out_indices
    /// without the last block). Default: that list scaled to the depth, if the file fuses as
    /// many blocks.
    #[arg(long)]
    pub fuse_layers: Option<String>,
    /// Raw-pixel loss targets (default: norm_pix_loss on, as MAE's and MFF's released runs).
    #[arg(long)]
    pub no_norm_pix_loss: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// Input checkpoint: .pth (torch.save zip; weights under `state_dict`, `model` or bare) or
    /// .safetensors.
    pub input: PathBuf,
    /// Output weights file (.safetensors), written atomically.
    pub output: PathBuf,
    #[command(flatten)]
    pub arch: ImportArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_takes_no_run_flags() {
        let ok = Cli::try_parse_from(["mimscope", "train", "--resume", "r", "--device", "cpu"]);
        assert!(ok.is_ok());
        for flag in [
            ["--steps", "5"],
            ["--blr", "1"],
            ["--out", "x"],
            ["--model", "mff"],
        ] {
            let mut args = vec!["mimscope", "train", "--resume", "r"];
            args.extend(flag);
            let err = Cli::try_parse_from(args).unwrap_err().to_string();
            assert!(err.contains("cannot be used with"), "{flag:?}: {err}");
        }
    }
}
