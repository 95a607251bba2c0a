//! Second-order gradients, in one place: where a gradient is differentiated again (exact
//! Hessian-vector products by double backward), and how the kernels behave there.
//!
//! candle's backward pass detaches every gradient it computes unless the calling thread keeps
//! its graphs; the vendored candle-core has a per-thread switch for that
//! (`candle_core::backprop::set_keep_graphs`, vendor/README.md). [`with_second_order`] is the
//! only place that turns it on: it runs its work on a fresh thread with the switch on, so no
//! other thread (training, rayon's pool) ever keeps graphs, and our code sets no environment
//! variable. Inside, every fused kernel records its backward op in the graph
//! ([`recorded_on_second_order`]), with a backward pass of its own, so the gradient can be
//! differentiated again; the second backward pass of a product runs on rayon's pool, whose
//! threads detach, so it records nothing and no third derivative is needed.

use candle_core::backprop::{keeps_graphs, set_keep_graphs};
use candle_core::{CustomOp2, Result, Tensor};

/// Whether the calling thread keeps gradient graphs: inside [`with_second_order`] (or on every
/// thread, if the user set candle's own `CANDLE_GRAD_DO_NOT_DETACH`).
pub fn second_order() -> bool {
    keeps_graphs()
}

/// Runs `f` on a fresh thread whose backward passes keep their graphs, so double backward gives
/// exact second derivatives there; every other thread is unaffected (tested below). A fresh
/// thread, not the caller's: a caller that is a rayon worker could otherwise run other tasks,
/// stolen while it waits, with graphs kept.
pub fn with_second_order<T: Send>(
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        let worker = s.spawn(move || {
            set_keep_graphs(true);
            f()
        });
        match worker.join() {
            Ok(result) => result,
            // The work's own panic, passed on unchanged.
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A backward op: recorded (with its own backward) on a thread that keeps gradient graphs,
/// where the gradient is differentiated again; plain elsewhere, where candle detaches anyway.
pub(super) fn recorded_on_second_order(
    a: &Tensor,
    b: &Tensor,
    op: impl CustomOp2 + Send + Sync + 'static,
) -> Result<Tensor> {
    if second_order() {
        a.apply_op2(b, op)
    } else {
        a.apply_op2_no_bwd(b, &op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// d²(x⁴)/dx² at x = 1.5 by double backward, with x⁴ as ((x·x)·x)·x: 27 when this thread
    /// keeps gradient graphs, 15.75 when it detaches them (the detached partial gradients drop
    /// terms).
    fn second_derivative_probe() -> Result<f64> {
        let x = Var::new(1.5f64, &Device::Cpu)?;
        let t = x.as_tensor();
        let y = ((t * t)? * t)?.mul(t)?;
        let g = y.backward()?;
        let dx = g.get(x.as_tensor()).expect("a gradient").clone();
        let g2 = dx.backward()?;
        Ok(g2
            .get(x.as_tensor())
            .map(|t| t.to_scalar::<f64>())
            .transpose()?
            .unwrap_or(0.0))
    }

    #[test]
    fn second_order_is_confined_to_its_thread() {
        let inside = with_second_order(|| {
            assert!(second_order());
            // A thread started from inside detaches as usual (candle's default).
            let nested = std::thread::spawn(second_derivative_probe).join().unwrap();
            Ok((second_derivative_probe()?, nested?))
        })
        .unwrap();
        assert_eq!(inside, (27.0, 15.75));
        // The caller's thread, before and after, detaches, and so does rayon's pool.
        assert!(!second_order());
        assert_eq!(second_derivative_probe().unwrap(), 15.75);
        let pooled = rayon::join(second_derivative_probe, second_derivative_probe);
        assert_eq!((pooled.0.unwrap(), pooled.1.unwrap()), (15.75, 15.75));
    }

    #[test]
    fn a_panic_inside_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| {
            with_second_order(|| -> anyhow::Result<()> { panic!("inside") })
        });
        assert!(caught.is_err());
        assert!(!second_order());
    }
}
