//! Peak memory while a piece of work runs, sampled on a background thread: memory in use on
//! the GPU (the driver's free/total, so the whole device: the CUDA context, candle's cached
//! allocations and anything else on it) for a CUDA device, the process's resident set for the
//! CPU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Result;
use candle_core::Device;

type Probe = Box<dyn Fn() -> Option<u64> + Send>;

/// What a [`Watch`] measured, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peak {
    /// In use when the watch started.
    pub before: u64,
    /// The most seen while it ran (at least `before`).
    pub peak: u64,
}

/// Samples memory use every `period` until [`Watch::finish`].
pub struct Watch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    before: u64,
    handle: Option<JoinHandle<()>>,
}

/// Resident set size of this process, from /proc/self/statm (its second field, in pages);
/// `None` where there is no /proc. statm is one short line: /proc/self/status, which a watch
/// read every 2 ms, took 1.6% of a CPU power-iteration bench's samples.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// The OS's memory page size in bytes.
fn page_size() -> u64 {
    static SIZE: OnceLock<u64> = OnceLock::new();
    *SIZE.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(size).unwrap_or(4096)
    })
}

fn probe(device: &Device) -> Result<Probe> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let ctx = d.cuda_stream().context().clone();
            Ok(Box::new(move || {
                ctx.mem_get_info()
                    .ok()
                    .map(|(free, total)| (total - free) as u64)
            }))
        }
        Device::Cpu => Ok(Box::new(resident_bytes)),
        #[allow(unreachable_patterns)]
        other => anyhow::bail!("memory use of {other:?} is not measured"),
    }
}

impl Watch {
    pub fn start(device: &Device) -> Result<Self> {
        Self::with_probe(probe(device)?, Duration::from_millis(2))
    }

    fn with_probe(probe: Probe, period: Duration) -> Result<Self> {
        let before = probe().unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(before));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::Builder::new()
            .name("memory-watch".into())
            .spawn(move || loop {
                if let Some(now) = probe() {
                    p.fetch_max(now, Ordering::Relaxed);
                }
                if s.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(period);
            })?;
        Ok(Self {
            stop,
            peak,
            before,
            handle: Some(handle),
        })
    }

    /// Stops sampling (after one last sample) and returns what was seen.
    pub fn finish(mut self) -> Peak {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        Peak {
            before: self.before,
            peak: self.peak.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_is_the_largest_sample_and_the_last_is_taken() {
        let values = Arc::new(std::sync::Mutex::new(vec![5u64, 9, 7]));
        let v = values.clone();
        let w = Watch::with_probe(
            Box::new(move || {
                let mut v = v.lock().unwrap();
                if v.len() > 1 {
                    Some(v.remove(0))
                } else {
                    v.first().copied()
                }
            }),
            Duration::from_millis(1),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        values.lock().unwrap()[0] = 11;
        let p = w.finish();
        assert_eq!(p.before, 5);
        assert_eq!(p.peak, 11);
    }

    /// `VmRSS` of /proc/self/status, in bytes: the same count as statm's, reported in kB.
    fn status_rss() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    #[test]
    fn resident_bytes_agree_with_the_status_file() {
        // Read in between two reads of the other file; other tests allocate beside this one,
        // so it must lie within the two readings, give or take a few MiB of their churn.
        let slack = 16 << 20;
        for _ in 0..3 {
            let (a, r, b) = (status_rss(), resident_bytes().unwrap(), status_rss());
            let (lo, hi) = (a.min(b), a.max(b));
            if r + slack >= lo && r <= hi + slack {
                assert!(r % page_size() == 0 && r > 0);
                return;
            }
        }
        panic!("statm's resident set does not match VmRSS");
    }

    #[test]
    fn resident_set_grows_with_a_touched_allocation() {
        let w = Watch::start(&Device::Cpu).unwrap();
        let big = vec![1u8; 64 << 20];
        std::thread::sleep(Duration::from_millis(30));
        let p = w.finish();
        assert!(big.iter().map(|&b| b as u64).sum::<u64>() == 64 << 20);
        // Other tests run beside this one, so only what holds regardless: the 64 MiB were
        // resident while sampled, and the peak is at least the start.
        assert!(p.peak >= 64 << 20 && p.peak >= p.before, "{p:?}");
    }
}
