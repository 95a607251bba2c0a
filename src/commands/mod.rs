//! Every subcommand's work: [`execute`] runs a parsed command. The analysis commands take
//! resolved settings, run their analysis, and write tables (CSV) and figures (PNG and SVG) into
//! their output folder; `reproduce` and `run` chain commands through [`execute`], so a recipe
//! step behaves exactly as the same command typed on the command line.

pub mod bench;
pub mod fusion;
pub mod hessian;
pub mod parity;
pub mod recipe;
pub mod reconstruct;
pub mod reproduce;
pub mod spectrum;

use std::path::Path;

use anyhow::{Context, Result};
use clap::Parser;

use crate::cli::{Command, TrainArgs};
use reconstruct::ReconstructArgs;
use crate::train::{self, Start, FINAL_FILE};

/// Parses a full command line (`mimscope <command> ...`) as the binary does; clap's message,
/// usage included, becomes the error.
pub fn parse_command_line(args: &[String]) -> Result<Command> {
    crate::cli::Cli::try_parse_from(args)
        .map(|c| c.command)
        .map_err(|e| anyhow::anyhow!("{}", e.render()))
}

/// Runs one parsed command.
pub fn execute(command: Command) -> Result<()> {
    run_command(command).map_err(|e| {
        if format!("{e:#}").contains("OUT_OF_MEMORY") {
            e.context(
                "the GPU ran out of memory: lower --batch-size (hessian: --micro-batch; \
                 spectrum: --batch-size)",
            )
        } else {
            e
        }
    })
}

fn run_command(command: Command) -> Result<()> {
    match command {
        Command::Train(args) => train_command(&args),
        Command::Reconstruct(a) => {
            let device = a.device.device()?;
            let args = ReconstructArgs {
                checkpoint: a.checkpoint,
                data: a.data,
                images: a.images,
                seed: a.seed,
                mask_ratio: a.mask_ratio,
                out: a.out,
            };
            reconstruct::run(&args, &device)
        }
        Command::Inspect { checkpoint, arch } => {
            print!(
                "{}",
                crate::inspect::run_with(&checkpoint, &arch.overrides())?
            );
            Ok(())
        }
        Command::Convert(a) => {
            print!(
                "{}",
                crate::convert::run(&a.input, &a.output, &a.arch.overrides())?
            );
            Ok(())
        }
        Command::Bench(a) => {
            let device = a.device.device()?;
            for line in bench::run(&a.settings(), &device)? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Parity(a) => parity::run(&a),
        Command::Spectrum(a) => spectrum::run(&a.settings(), &a.device.device()?).map(|_| ()),
        Command::Fusion(a) => {
            let s = fusion::FusionSettings {
                paths: a.paths,
                out: a.out,
                csv: a.csv,
                overrides: a.arch.overrides(),
            };
            print!("{}", fusion::run(&s)?);
            Ok(())
        }
        Command::Hessian(a) => hessian::run(&a.settings(), &a.device.device()?).map(|_| ()),
        Command::Reproduce(a) => reproduce::run(&a).map(|_| ()),
        Command::Run(a) => recipe::run(&a.recipe),
    }
}

/// `train`: a new run or `--resume`, ending with reconstructions of its first images.
fn train_command(args: &TrainArgs) -> Result<()> {
    let device = args.device.device()?;
    let (run_dir, start) = match &args.resume {
        Some(dir) => (dir.clone(), Start::Resume),
        None => {
            let dataset = train::open_dataset(args.data.as_deref())?;
            let cfg = args.resolve(dataset.len())?;
            if args.print_config {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
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
        return train_command(args);
    };
    if is_started_run(out) {
        check_same_settings(out, args)?;
    }
    if out.join(FINAL_FILE).exists() {
        eprintln!("{} is complete: training skipped", out.display());
        return Ok(());
    }
    if is_started_run(out) {
        eprintln!(
            "{} holds an unfinished run: resuming it with its saved config",
            out.display()
        );
        return train_and_reconstruct(out, Start::Resume, &args.device.device()?);
    }
    train_command(args)
}

/// Refuses to continue or reuse a run trained with other settings than `args` asks for.
fn check_same_settings(run_dir: &Path, args: &TrainArgs) -> Result<()> {
    let path = run_dir.join(train::CONFIG_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let stored: crate::config::TrainConfig =
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
