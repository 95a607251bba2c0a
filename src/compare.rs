//! One way to compare numbers against a reference, for unit tests, integration tests and
//! `mimscope parity`: [`Diff`] measures, [`assert_close`] asserts elementwise tolerances and
//! names the worst element.

use candle_core::{DType, Tensor};

/// How far `actual` is from `expected`, measured once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diff {
    /// max |a - e|.
    pub max_abs: f64,
    /// Where `max_abs` is (flat index).
    pub at: usize,
    /// max |a - e| / max |e| (the largest error against the reference's scale).
    pub max_rel: f64,
    /// ||a - e|| / ||e||, 0 when both are 0.
    pub relative_l2: f64,
}

impl Diff {
    /// Compares two equally long slices (a length mismatch compares the common prefix; callers
    /// check shapes first). A NaN on either side makes every measure NaN.
    pub fn between(actual: &[f64], expected: &[f64]) -> Diff {
        let (mut max_abs, mut at, mut scale) = (0.0f64, 0, 0.0f64);
        let (mut num, mut den) = (0.0f64, 0.0f64);
        let mut nan = false;
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            let d = (a - e).abs();
            nan |= d.is_nan();
            if d > max_abs {
                (max_abs, at) = (d, i);
            }
            scale = scale.max(e.abs());
            num += d * d;
            den += e * e;
        }
        if nan {
            return Diff {
                max_abs: f64::NAN,
                at,
                max_rel: f64::NAN,
                relative_l2: f64::NAN,
            };
        }
        Diff {
            max_abs,
            at,
            max_rel: max_abs / scale.max(1e-30),
            relative_l2: if num == 0.0 { 0.0 } else { (num / den).sqrt() },
        }
    }

    /// [`Diff::between`] two tensors of the same shape, any float dtype, any device.
    pub fn tensors(actual: &Tensor, expected: &Tensor) -> candle_core::Result<Diff> {
        if actual.dims() != expected.dims() {
            candle_core::bail!(
                "shapes differ: {:?} against {:?}",
                actual.dims(),
                expected.dims()
            );
        }
        Ok(Diff::between(&values(actual)?, &values(expected)?))
    }
}

/// A tensor's elements as f64, in row-major order.
pub fn values(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
}

/// The first element (by excess) outside |a - e| <= atol + rtol |e|, described; `None` when all
/// are inside. NaN counts as outside.
pub fn check_close(actual: &[f64], expected: &[f64], rtol: f64, atol: f64) -> Option<String> {
    if actual.len() != expected.len() {
        return Some(format!(
            "{} values against {} expected",
            actual.len(),
            expected.len()
        ));
    }
    let mut worst: Option<(usize, f64)> = None;
    for (i, (x, y)) in actual.iter().zip(expected).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if (excess.is_nan() || excess > 0.0) && worst.is_none_or(|(_, w)| excess > w) {
            worst = Some((i, excess));
        }
    }
    worst.map(|(i, _)| {
        format!(
            "element {i} is {} but expected {} (rtol {rtol}, atol {atol}); max |diff| {:.3e}",
            actual[i],
            expected[i],
            Diff::between(actual, expected).max_abs
        )
    })
}

/// Panics unless `actual` and `expected` have the same shape and every element satisfies
/// |a - e| <= atol + rtol |e|, naming `what` and the worst element. For tests.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, rtol: f64, atol: f64) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let (a, e) = match (values(actual), values(expected)) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(err), _) | (_, Err(err)) => panic!("{what}: reading values: {err}"),
    };
    if let Some(msg) = check_close(&a, &e, rtol, atol) {
        panic!("{what}: {msg}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_by_hand() {
        // a - e = (0, -0.5, 2): max 2 at 2; max |e| 4 -> rel 0.5; ||a-e|| = sqrt(4.25),
        // ||e|| = sqrt(1 + 4 + 16).
        let d = Diff::between(&[1.0, 1.5, 6.0], &[1.0, 2.0, 4.0]);
        assert_eq!((d.max_abs, d.at, d.max_rel), (2.0, 2, 0.5));
        assert!((d.relative_l2 - (4.25f64 / 21.0).sqrt()).abs() < 1e-15);
        assert_eq!(Diff::between(&[0.0], &[0.0]).relative_l2, 0.0);
        assert!(Diff::between(&[f64::NAN], &[1.0]).max_abs.is_nan());
    }

    #[test]
    fn check_close_names_the_worst_element() {
        assert_eq!(
            check_close(&[1.0, 2.0], &[1.0, 2.0 + 1e-9], 0.0, 1e-8),
            None
        );
        let msg = check_close(&[1.0, 2.5, 3.2], &[1.0, 2.0, 3.0], 0.0, 0.1).unwrap();
        assert!(msg.starts_with("element 1 is 2.5"), "{msg}");
        assert!(check_close(&[f64::NAN], &[1.0], 1.0, 1.0).is_some());
        assert!(check_close(&[1.0], &[1.0, 2.0], 1.0, 1.0).is_some());
    }
}
