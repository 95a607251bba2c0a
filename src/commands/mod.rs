//! Every subcommand's work, one module each: [`execute`] runs a parsed command. Each module
//! turns its command's flags (`crate::cli`, clap only) into settings (`SpectrumArgs::settings`,
//! `TrainArgs::resolve`, ...); the flags every command shares, `--device` and the architecture
//! of imported files, resolve here. The analysis commands run their analysis and write tables
//! (CSV) and figures (PNG and SVG) into their output folder; `reproduce` and `run` chain
//! commands through [`execute`], so a recipe step behaves exactly as the same command typed on
//! the command line.
//!
//! Exit status, as ripgrep's: a command that runs and finds a problem (`parity` outside its
//! tolerances) returns a [`Problem`] as its error, which `main` maps to 1; any other error to 2
//! ([`exit_status`]).

pub mod bench;
pub mod convert;
pub mod fusion;
pub mod hessian;
pub mod inspect;
pub mod parity;
pub mod recipe;
pub mod reconstruct;
pub mod reproduce;
pub mod spectrum;
pub mod train;

pub use train::train_or_continue;

use anyhow::{bail, Result};
use clap::Parser;

use crate::checkpoint::ModelOverrides;
use crate::cli::{Command, DeviceArgs, ImportArgs};

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
        Command::Train(args) => train::run(&args),
        Command::Reconstruct(a) => reconstruct::run(&(&a).into(), &a.device.device()?),
        Command::Inspect { checkpoint, arch } => {
            crate::say_text!("{}", inspect::run_with(&checkpoint, &arch.overrides())?);
            Ok(())
        }
        Command::Convert(a) => {
            crate::say_text!(
                "{}",
                convert::run(&a.input, &a.output, &a.arch.overrides())?
            );
            Ok(())
        }
        Command::Bench(a) => {
            let device = a.device.device()?;
            for line in bench::run(&a.settings(), &device)? {
                crate::say!("{line}");
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
            crate::say_text!("{}", fusion::run(&s)?);
            Ok(())
        }
        Command::Hessian(a) => hessian::run(&a.settings(), &a.device.device()?).map(|_| ()),
        Command::Reproduce(a) => reproduce::run(&a).map(|_| ()),
        Command::Run(a) => recipe::run(&a.recipe),
    }
}

/// What a command found, as opposed to an error that kept it from running: `parity` outside its
/// tolerances. Returned as the error (so chains stop at it, with its message), it gives exit
/// status 1 where any other error gives 2 ([`exit_status`]).
#[derive(Debug)]
pub struct Problem(pub String);

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Problem {}

/// The process's exit status for a command's result, as ripgrep's: 0 success, 1 a [`Problem`]
/// (anywhere in the error's context chain, so a recipe step's one counts), 2 any other error.
/// clap's own usage errors exit 2 before any command runs.
pub fn exit_status(result: &Result<()>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(e) if e.chain().any(|c| c.is::<Problem>()) => 1,
        Err(_) => 2,
    }
}

impl DeviceArgs {
    /// `--device`: `cpu`, or `cuda:N` (`cuda` = `cuda:0`) in a build with the `cuda` feature.
    pub fn device(&self) -> Result<candle_core::Device> {
        match self.device.as_str() {
            "cpu" => Ok(candle_core::Device::Cpu),
            d if d.starts_with("cuda") => {
                let idx: usize = match d.strip_prefix("cuda").unwrap_or("") {
                    "" => 0,
                    rest => rest.trim_start_matches(':').parse().map_err(|_| {
                        anyhow::anyhow!("--device {d}: write cuda:N with N the GPU index")
                    })?,
                };
                if cfg!(feature = "cuda") {
                    candle_core::Device::new_cuda(idx).map_err(|e| {
                        let e = match e {
                            candle_core::Error::WithBacktrace { inner, .. } => *inner,
                            e => e,
                        };
                        anyhow::anyhow!(
                            "--device {d}: CUDA could not start GPU {idx} ({e}). Check that \
                             `nvidia-smi` lists it, and that the CUDA 13 libraries (libcudart, \
                             libcublas, libcurand) are on LD_LIBRARY_PATH, as \
                             scripts/gpu-check.sh sets it"
                        )
                    })
                } else {
                    bail!(
                        "--device {d}: this mimscope was built without CUDA; build one with \
                         scripts/build-cuda.sh (or `cargo build --release --features cuda` \
                         where CUDA is installed; see docs/gpu.md)"
                    )
                }
            }
            d => bail!("--device {d}: expected `cpu` or `cuda:N`"),
        }
    }
}

impl ImportArgs {
    /// The architecture flags of files that store no mimscope config.
    pub fn overrides(&self) -> ModelOverrides {
        ModelOverrides {
            num_heads: self.num_heads,
            decoder_num_heads: self.decoder_num_heads,
            fuse_layers: self.fuse_layers.clone(),
            norm_pix_loss: self.no_norm_pix_loss.then_some(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn exit_status_tells_problems_from_errors() {
        assert_eq!(exit_status(&Ok(())), 0);
        let problem: Result<()> = Err(Problem("outside the tolerances".into()).into());
        assert_eq!(exit_status(&problem), 1);
        // Context added on the way up (a recipe step) keeps it a problem.
        assert_eq!(exit_status(&problem.context("recipe r.toml step 2")), 1);
        let error: Result<()> = Err(anyhow::anyhow!("reading x.safetensors"));
        assert_eq!(exit_status(&error.context("step 1")), 2);
    }
}
