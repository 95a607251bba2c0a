//! Matrix products into strided buffers for the CPU kernels (the `gemm` crate, candle's own CPU
//! gemm): on the calling thread inside a parallel task, or on every core of rayon's pool.

use super::cpu::Float;

/// Raw pointers shared by the tasks, which write disjoint (image, head) blocks.
#[derive(Clone, Copy)]
pub(super) struct Shared<T>(pub(super) *mut T);

unsafe impl<T> Send for Shared<T> {}

unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(super) fn ptr(self) -> *mut T {
        self.0
    }
}

/// dst (m x n) = beta · lhs (m x k) · rhs (k x n), each given by (pointer, row stride, column
/// stride), on the calling thread.
///
/// # Safety
/// The pointers must cover the strided matrices, and dst must not alias the inputs.
pub(super) unsafe fn mm<T: Float>(
    dims: (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    beta: f64,
) {
    gemm_into(dims, dst, lhs, rhs, beta, false, gemm::Parallelism::None)
}

/// dst (m x n) = beta · lhs (m x k) · rhs (k x n), plus dst's previous values when
/// `accumulate`, each matrix given by (pointer, row stride, column stride). gemm splits the
/// output, never the inner dimension, across threads, so results do not depend on `par`.
///
/// # Safety
/// The pointers must cover the strided matrices, and dst must not alias the inputs.
pub(super) unsafe fn gemm_into<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: (*mut T, usize, usize),
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    beta: f64,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2 as isize,
        dst.1 as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        T::f(if accumulate { 1.0 } else { 0.0 }),
        T::f(beta),
        false,
        false,
        false,
        par,
    )
}

/// gemm on the calling thread (inside a task of a parallel loop).
pub(super) const SERIAL: gemm::Parallelism = gemm::Parallelism::None;

/// gemm on every core of rayon's pool.
pub(super) fn all_cores() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// A fresh buffer of `len` values that `product` fills completely: a gemm that does not read
/// its destination, with inner dimension `inner`. No zero-filling first (a pass over the
/// output that the product overwrites); with `inner` 0 gemm multiplies nothing, so the buffer
/// is zero-filled then.
///
/// # Safety
/// `product`, given the buffer's pointer, must write all `len` values when `inner` > 0.
pub(super) unsafe fn gemm_output<T: Float>(
    len: usize,
    inner: usize,
    product: impl FnOnce(*mut T),
) -> Vec<T> {
    if inner == 0 {
        let mut out = vec![T::f(0.0); len];
        product(out.as_mut_ptr());
        return out;
    }
    let mut out: Vec<std::mem::MaybeUninit<T>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit values need no initialisation.
    unsafe { out.set_len(len) };
    product(out.as_mut_ptr().cast());
    let mut out = std::mem::ManuallyDrop::new(out);
    // SAFETY: every value was written (the caller's promise); MaybeUninit<T> has T's layout.
    unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast(), out.len(), out.capacity()) }
}
