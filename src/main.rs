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

/// candle's variable for how many times its elementwise pool's workers spin between ops.
const CANDLE_SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

fn main() -> ExitCode {
    // Keep freed memory: candle allocates a new buffer for every intermediate tensor, and
    // mimalloc by default hands freed pages back to the OS after 10 ms, so the kernel zeroes
    // them again on their next use (a quarter of a CPU training step went to page faults).
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // candle runs its elementwise ops on a thread pool of its own, whose workers spin for about
    // half a millisecond after every op, while the matrix products and our fused kernels run on
    // rayon's pool: with as many threads as cores in each, the spinning took cores from the
    // work (on 2 cores a tiny training step went from 0.66 to 0.55 s without it). So candle's
    // workers sleep at once, unless the user set candle's variable. Set before any other thread
    // exists, and before candle reads it (at its pool's first use).
    if std::env::var_os(CANDLE_SPIN_LIMIT).is_none() {
        std::env::set_var(CANDLE_SPIN_LIMIT, "0");
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
