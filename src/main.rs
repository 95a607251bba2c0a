use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::Parser;

use mimscope::cli::Cli;

fn run() -> Result<()> {
    mimscope::commands::execute(Cli::parse().command)
}

/// mimalloc's `mi_option_purge_delay` (position 15 of `mi_option_e` in mimalloc.h, v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Keep freed memory: candle allocates a new buffer for every intermediate tensor, and
    // mimalloc by default hands freed pages back to the OS after 10 ms, so the kernel zeroes
    // them again on their next use (a quarter of a CPU training step went to page faults).
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
