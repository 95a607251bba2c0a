use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use mimscope::cli::{Cli, Command};
use mimscope::train::{self, Start};

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train(args) => {
            let device = args.device.device()?;
            if let Some(dir) = &args.resume {
                train::train(dir, Start::Resume, &device)?;
                return Ok(());
            }
            let dataset = train::open_dataset(args.data.as_deref())?;
            let cfg = args.resolve(dataset.len())?;
            if args.print_config {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
                return Ok(());
            }
            let out = args.out.as_ref().context("--out RUN_DIR is required")?;
            train::train(out, Start::Fresh(cfg), &device)?;
        }
        Command::Reconstruct(a) => {
            let device = a.device.device()?;
            let args = mimscope::reconstruct::ReconstructArgs {
                checkpoint: a.checkpoint,
                data: a.data,
                images: a.images,
                seed: a.seed,
                mask_ratio: a.mask_ratio,
                out: a.out,
            };
            mimscope::reconstruct::run(&args, &device)?;
        }
        Command::Inspect { checkpoint } => print!("{}", mimscope::inspect::run(&checkpoint)?),
        Command::Bench(a) => {
            let device = a.device.device()?;
            let cfg = mimscope::bench::bench_config(a.model.model, a.model.preset);
            for line in mimscope::bench::run(&cfg, a.batch_size, a.iters, &device)? {
                println!("{line}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
