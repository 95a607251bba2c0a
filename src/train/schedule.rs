//! MAE's learning-rate schedule (`util/lr_sched.py`), per iteration: linear warmup from 0, then
//! half-cosine to 0. MAE evaluates it at the fractional epoch `it / iters_per_epoch`; in steps
//! this is the same curve.

use std::f64::consts::PI;

/// Learning rate for the optimiser step with 0-based index `step` of `total`, warming up over
/// `warmup` steps to `peak`.
pub fn lr_at(step: u64, total: u64, warmup: u64, peak: f64) -> f64 {
    if step < warmup {
        peak * step as f64 / warmup as f64
    } else if total <= warmup {
        peak
    } else {
        let t = (step - warmup) as f64 / (total - warmup) as f64;
        peak * 0.5 * (1.0 + (PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        // Analytic values: warmup is linear from 0; the cosine starts at the peak, is half way
        // at the middle of the decay and reaches 0 only after the last step.
        assert_eq!(lr_at(0, 10, 2, 1.0), 0.0);
        assert_eq!(lr_at(1, 10, 2, 1.0), 0.5);
        assert_eq!(lr_at(2, 10, 2, 1.0), 1.0);
        assert!((lr_at(6, 10, 2, 1.0) - 0.5).abs() < 1e-12);
        assert!(lr_at(9, 10, 2, 1.0) > 0.0);
        assert_eq!(lr_at(0, 10, 0, 2.0), 2.0);
    }
}
