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

/// candle's variable for its elementwise pool's size (the calling thread included).
const CANDLE_THREADS: &str = "CANDLE_NUM_THREADS";

fn main() -> ExitCode {
    // Keep freed memory: candle allocates a new buffer for every intermediate tensor, and
    // mimalloc by default hands freed pages back to the OS after 10 ms, so the kernel zeroes
    // them again on their next use (a quarter of a CPU training step went to page faults).
    // SAFETY: sets a process-wide allocator option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // candle runs its elementwise ops on a thread pool of its own, beside rayon's pool, which
    // runs the matrix products, our fused kernels and the CPU training step's shards
    // (`train::step`). A pool of one (the calling thread) lets each shard run its own elementwise
    // ops, where a shared pool made one shard wait for the other's op (4% of the samples at its
    // barrier; 10% shorter steps without it, and no slower forward or Hessian work). Where the
    // user sizes it, its workers at least sleep at once instead of spinning for about half a
    // millisecond after every op against the cores doing the work (on 2 cores a tiny step went
    // from 0.66 to 0.55 s). Unless the user set candle's variables; set before any other thread
    // exists, and before candle reads them (at its pool's first use).
    for (var, value) in [(CANDLE_THREADS, "1"), (CANDLE_SPIN_LIMIT, "0")] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, value);
        }
    }
    // 0, 1 for a problem found (parity out of tolerance), 2 for an error; clap exits 2 itself
    // for usage errors, 0 for --help and --version.
    let result = run();
    if let Err(e) = &result {
        mimscope::note!("error: {e:#}");
    }
    ExitCode::from(mimscope::commands::exit_status(&result))
}
