use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use clap::Parser;

use mimscope::cli::{Cli, Command};
use mimscope::reconstruct::ReconstructArgs;
use mimscope::train::{self, Start};

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Train(args) => {
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
            let (final_ck, cfg) = train::train(&run_dir, start, &device)?;
            // The run ends with reconstructions of its first training images.
            let rec = ReconstructArgs {
                checkpoint: final_ck,
                data: cfg.data.clone(),
                images: 8,
                seed: cfg.seed,
                mask_ratio: cfg.mask_ratio,
                out: run_dir.join("reconstruction"),
            };
            mimscope::reconstruct::run(&rec, &device)?;
        }
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
            mimscope::reconstruct::run(&args, &device)?;
        }
        Command::Inspect { checkpoint, arch } => print!(
            "{}",
            mimscope::inspect::run_with(&checkpoint, &arch.overrides())?
        ),
        Command::Bench(a) => {
            let device = a.device.device()?;
            let cfg = mimscope::bench::bench_config(a.model.model, a.model.preset);
            for line in mimscope::bench::run(&cfg, a.batch_size, a.iters, &device)? {
                println!("{line}");
            }
        }
        Command::Convert(a) => print!(
            "{}",
            mimscope::convert::run(&a.input, &a.output, &a.arch.overrides())?
        ),
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
