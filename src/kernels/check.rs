//! Each kernel on a device against its reference form, value and gradients: the kernels'
//! unit tests use it on the CPU (fused kernel against primitive form), and `mimscope parity`
//! uses [`all`] to check every op of a device (CUDA) against the primitive forms on the CPU.
//!
//! A case is an op y = f(x, w, b) with seeded inputs; its check is the value and the gradients
//! of <y, r> for a seeded r, w.r.t. x, w and b, each as a [`Diff`] against the reference.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::compare::Diff;

/// An op of three inputs (an op of fewer ignores the rest).
pub type Op3<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

/// 2 z for z standard normal, from a ChaCha8 stream of `seed`, in `dtype` on `device`.
pub fn seeded(shape: &[usize], seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            2.0 * z
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// A gradient of the op against the reference's.
#[derive(Debug, Clone, PartialEq)]
pub enum GradCheck {
    Both(Diff),
    /// Neither side has one (the op does not depend on that input).
    Neither,
    /// Only one side has one: a gradient that silently vanished, or appeared.
    OneSide,
}

/// One case of one op.
#[derive(Debug, Clone)]
pub struct OpCheck {
    pub op: &'static str,
    pub dims: Vec<usize>,
    pub value: Diff,
    /// The gradients w.r.t. x, w, b, in that order.
    pub grads: [(&'static str, GradCheck); 3],
}

impl OpCheck {
    /// The largest relative error (max |a - e| / max |e|) of the value and the gradients;
    /// infinite when a gradient is on one side only, NaN when a NaN appeared.
    pub fn worst(&self) -> f64 {
        self.grads
            .iter()
            .map(|(_, g)| match g {
                GradCheck::Both(d) => d.max_rel,
                GradCheck::Neither => 0.0,
                GradCheck::OneSide => f64::INFINITY,
            })
            .fold(
                self.value.max_rel,
                |m, e| if e.is_nan() { e } else { m.max(e) },
            )
    }
}

/// The input shapes of a case; x, w, b and r (the output's shape) are seeded from `seed`,
/// `10 + seed`, `20 + seed` and `30 + seed`, as the kernels' tests have always seeded them.
pub struct Case {
    pub x: Vec<usize>,
    pub w: Vec<usize>,
    pub b: Vec<usize>,
    pub seed: u64,
}

/// `op` on `device` against `reference` on the CPU, both in `dtype`, for the inputs of `case`.
pub fn compare_op(
    name: &'static str,
    case: &Case,
    dtype: DType,
    device: &Device,
    op: Op3,
    reference: Op3,
) -> Result<OpCheck> {
    let s = case.seed;
    let inputs = [
        seeded(&case.x, s, dtype, &Device::Cpu)?,
        seeded(&case.w, 10 + s, dtype, &Device::Cpu)?,
        seeded(&case.b, 20 + s, dtype, &Device::Cpu)?,
    ];
    let run = |f: Op3, device: &Device| -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let vars = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(device)?))
            .collect::<Result<Vec<_>>>()?;
        let y = f(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        )?;
        let r = seeded(y.dims(), 30 + s, dtype, device)?;
        let g = (&y * &r)?.sum_all()?.backward()?;
        let grads = vars.iter().map(|v| g.get(v.as_tensor()).cloned()).collect();
        Ok((y, grads))
    };
    let (ya, ga) = run(op, device)?;
    let (yb, gb) = run(reference, &Device::Cpu)?;
    let mut grads = [
        ("x", GradCheck::Neither),
        ("w", GradCheck::Neither),
        ("b", GradCheck::Neither),
    ];
    for (slot, (a, b)) in grads.iter_mut().zip(ga.iter().zip(&gb)) {
        slot.1 = match (a, b) {
            (Some(a), Some(b)) => GradCheck::Both(Diff::tensors(a, b)?),
            (None, None) => GradCheck::Neither,
            _ => GradCheck::OneSide,
        };
    }
    Ok(OpCheck {
        op: name,
        dims: case.x.clone(),
        value: Diff::tensors(&ya, &yb)?,
        grads,
    })
}

/// The attention core from primitive ops (no mixed precision, the primitive softmax):
/// (B, N, 3D) qkv -> (B, nq, D), heads `h`, scale 1/√d.
pub fn attention_reference(qkv: &Tensor, h: usize, nq: usize) -> Result<Tensor> {
    let d = qkv.dim(2)? / 3 / h;
    let softmax: fn(&Tensor) -> Result<Tensor> = super::primitive::softmax_last_dim;
    super::primitive::attention(qkv, h, nq, (d as f64).powf(-0.5), None, softmax)
}

/// 0.5 x (1 + erf(x / √2)) from primitive ops, whose derivative candle knows exactly; not
/// candle's `gelu_erf` (primitive::gelu), whose backward pass rounds 1/√(2π) to 0.398942.
pub fn gelu_from_erf(x: &Tensor) -> Result<Tensor> {
    let e = (x / std::f64::consts::SQRT_2)?.erf()?;
    (x * 0.5)? * (e + 1.0)?
}

/// Every kernel, as the model calls it (the dispatching functions of [`super`]) on `device`
/// in `dtype`, against its primitive form on the CPU: a row width below and one above a CPU
/// task's chunk for the row ops, a large and a ragged linear layer, self-attention and
/// attention of the last tokens.
pub fn all(device: &Device, dtype: DType) -> Result<Vec<OpCheck>> {
    use super::primitive as p;
    let case = |x: &[usize], w: &[usize], b: &[usize], seed| Case {
        x: x.to_vec(),
        w: w.to_vec(),
        b: b.to_vec(),
        seed,
    };
    let rows = [
        case(&[4, 33, 192], &[192], &[192], 1),
        case(&[2, 3, 700], &[700], &[700], 2),
    ];
    let mut out = Vec::new();
    for c in &rows {
        let ln: Op3 = &|x, w, b| super::layer_norm(x, w, b, 1e-6);
        let ln_ref: Op3 = &|x, w, b| p::layer_norm(x, w, b, 1e-6);
        out.push(compare_op("layer norm", c, dtype, device, ln, ln_ref)?);
        let sm: Op3 = &|x, _, _| super::softmax_last_dim(x);
        let sm_ref: Op3 = &|x, _, _| p::softmax_last_dim(x);
        out.push(compare_op("softmax", c, dtype, device, sm, sm_ref)?);
        let ge: Op3 = &|x, _, _| super::gelu(x);
        let ge_ref: Op3 = &|x, _, _| gelu_from_erf(x);
        out.push(compare_op("gelu", c, dtype, device, ge, ge_ref)?);
        let dir: Op3 = &|x, _, _| super::directional(x, &x.ones_like()?);
        let dir_ref: Op3 = &|x, _, _| x.sum_all();
        out.push(compare_op("directional", c, dtype, device, dir, dir_ref)?);
    }
    for (m, k, o, seed) in [(1088, 192, 576, 3), (97, 300, 13, 4)] {
        let c = case(&[m, k], &[o, k], &[o], seed);
        let lin: Op3 = &|x, w, b| super::linear(x, w, b, None);
        let lin_ref: Op3 = &|x, w, b| p::linear(x, w, b, None);
        out.push(compare_op("linear", &c, dtype, device, lin, lin_ref)?);
    }
    for (b, n, h, d, nq, seed) in [(3, 17, 3, 64, 17, 5), (2, 12, 2, 8, 4, 6)] {
        let c = case(&[b, n, 3 * h * d], &[1], &[1], seed);
        let scale = (d as f64).powf(-0.5);
        let att: Op3 = &|x, _, _| super::attention(x, h, nq, scale, None);
        let att_ref: Op3 = &|x, _, _| attention_reference(x, h, nq);
        out.push(compare_op("attention", &c, dtype, device, att, att_ref)?);
    }
    Ok(out)
}

/// An op of three inputs that can run on the second-order thread (a plain function).
pub type SendOp = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

/// x w + b, w and b broadcast along the last dimension: ops of one input take it, so that a
/// second derivative reaches all three inputs.
pub fn affine(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(w)?.broadcast_add(b)
}

/// The shapes of a second-order case: x, w (b is w's first dimension) and the output.
pub type SecondOrderDims = (&'static [usize], &'static [usize], &'static [usize]);

/// Every kernel's second-order case: the op as the model calls it, its primitive form (the
/// reference), and the shapes. Linear and layer norm are the fused ops with backward passes
/// built from candle's ops; softmax, GELU and the attention core the fused ops with recorded
/// backward ops.
pub fn second_order_cases() -> [(&'static str, SendOp, SendOp, SecondOrderDims); 6] {
    use super::primitive as p;
    [
        (
            "linear",
            |x, w, b| super::linear(x, w, b, None),
            |x, w, b| p::linear(x, w, b, None),
            (&[2, 5, 4], &[3, 4], &[2, 5, 3]),
        ),
        (
            "layer norm",
            |x, w, b| super::layer_norm(x, w, b, 1e-6),
            |x, w, b| p::layer_norm(x, w, b, 1e-6),
            (&[2, 5, 6], &[6], &[2, 5, 6]),
        ),
        (
            "softmax",
            |x, w, b| super::softmax_last_dim(&affine(x, w, b)?),
            |x, w, b| p::softmax_last_dim(&affine(x, w, b)?),
            (&[2, 5, 6], &[6], &[2, 5, 6]),
        ),
        (
            "GELU",
            |x, w, b| super::gelu(&affine(x, w, b)?),
            |x, w, b| gelu_from_erf(&affine(x, w, b)?),
            (&[3, 7], &[7], &[3, 7]),
        ),
        (
            "self-attention",
            |x, w, b| super::attention(&affine(x, w, b)?, 2, 5, 3f64.powf(-0.5), None),
            |x, w, b| attention_reference(&affine(x, w, b)?, 2, 5),
            (&[2, 5, 18], &[18], &[2, 5, 6]),
        ),
        (
            "attention of the last 4 of 12 tokens",
            |x, w, b| super::attention(&affine(x, w, b)?, 2, 4, 8f64.powf(-0.5), None),
            |x, w, b| attention_reference(&affine(x, w, b)?, 2, 4),
            (&[2, 12, 48], &[48], &[2, 4, 16]),
        ),
    ]
}

/// H v of L = Σ r ⊙ y ⊙ y, y = op(x, w, b), with respect to (x, w, b), by double backward
/// inside [`with_second_order`](super::second_order::with_second_order), on `device` in
/// `dtype`, the inputs seeded 70-73 and v 80-82; returned on the CPU.
pub fn hvp_through(
    op: SendOp,
    (x_dims, w_dims, y_dims): SecondOrderDims,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<[Tensor; 3]> {
    let device = device.clone();
    super::second_order::with_second_order(move || {
        let x = Var::from_tensor(&seeded(x_dims, 70, dtype, &device)?)?;
        let w = Var::from_tensor(&seeded(w_dims, 71, dtype, &device)?)?;
        let b = Var::from_tensor(&seeded(&w_dims[..1], 72, dtype, &device)?)?;
        let r = seeded(y_dims, 73, dtype, &device)?;
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let y = op(xt, wt, bt)?;
        let g = (&y * &y)?.mul(&r)?.sum_all()?.backward()?;
        let mut gv = Tensor::zeros((), dtype, &device)?;
        for (i, t) in [xt, wt, bt].into_iter().enumerate() {
            let v = seeded(t.dims(), 80 + i as u64, dtype, &device)?;
            let gt = g
                .get(t)
                .ok_or_else(|| anyhow::anyhow!("no gradient for an input"))?;
            gv = (gv + (gt * v)?.sum_all()?)?;
        }
        let h = gv.backward()?;
        let mut out = Vec::with_capacity(3);
        for t in [xt, wt, bt] {
            let ht = h
                .get(t)
                .ok_or_else(|| anyhow::anyhow!("no second derivative for an input"))?;
            out.push(ht.to_device(&Device::Cpu)?);
        }
        Ok([out[0].clone(), out[1].clone(), out[2].clone()])
    })
}

/// Every kernel's H v on `device` in `dtype` against its primitive form's on the CPU in the
/// same dtype: per case, the (H v)_x, (H v)_w and (H v)_b differences.
pub fn second_order_all(
    device: &Device,
    dtype: DType,
) -> anyhow::Result<Vec<(&'static str, [Diff; 3])>> {
    let mut out = Vec::new();
    for (name, op, reference, dims) in second_order_cases() {
        let a = hvp_through(op, dims, dtype, device)?;
        let b = hvp_through(reference, dims, dtype, &Device::Cpu)?;
        let d = |i: usize| Diff::tensors(&a[i], &b[i]);
        out.push((name, [d(0)?, d(1)?, d(2)?]));
    }
    Ok(out)
}

/// The tests' inputs: [`seeded`] on the CPU.
#[cfg(test)]
pub(crate) fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    seeded(shape, seed, dtype, &Device::Cpu).unwrap()
}

/// max |a - e| / max |e| ([`Diff::max_rel`]) of two tensors of one shape.
#[cfg(test)]
pub(crate) fn rel_err(actual: &Tensor, expected: &Tensor) -> f64 {
    Diff::tensors(actual, expected).unwrap().max_rel
}

/// Asserts that `op` matches `reference` on the CPU, value and the gradients of <f(x, w, b), r>
/// w.r.t. x, w, b, in f64 and f32 (the f32 tolerance allows its rounding), for row widths
/// below and above a CPU task's chunk.
#[cfg(test)]
pub(crate) fn assert_matches_reference(
    name: &'static str,
    op: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    reference: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        for (k, dims) in [vec![3usize, 5, 7], vec![4, 33, 192], vec![2, 3, 700]]
            .into_iter()
            .enumerate()
        {
            let d = *dims.last().unwrap();
            let case = Case {
                x: dims.clone(),
                w: vec![d],
                b: vec![d],
                seed: k as u64,
            };
            let c = compare_op(name, &case, dtype, &Device::Cpu, &op, &reference).unwrap();
            assert!(c.value.max_rel < tol, "{name} {dtype:?} {dims:?}: value");
            for (what, g) in &c.grads {
                match g {
                    GradCheck::Both(e) => assert!(
                        e.max_rel < tol,
                        "{name} {dtype:?} {dims:?}: d{what} off by {:e}",
                        e.max_rel
                    ),
                    GradCheck::Neither => {}
                    GradCheck::OneSide => {
                        panic!("{name} {dtype:?}: d{what} present on one side only")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cpu_kernel_matches_its_primitive_form() {
        // The f32 and f64 tolerances of the kernels' own tests.
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let checks = all(&Device::Cpu, dtype).unwrap();
            assert_eq!(checks.len(), 12);
            for c in checks {
                assert!(c.worst() < tol, "{} {:?} {dtype:?}: {c:?}", c.op, c.dims);
            }
        }
    }

    #[test]
    fn a_vanished_gradient_is_reported() {
        // A detached output has no gradient; the reference has one.
        let c = case_of_one();
        let gone: Op3 = &|x, _, _| x.detach().sqr();
        let kept: Op3 = &|x, _, _| x.sqr();
        let check = compare_op("sqr", &c, DType::F64, &Device::Cpu, gone, kept).unwrap();
        assert_eq!(check.grads[0].1, GradCheck::OneSide);
        assert_eq!(check.worst(), f64::INFINITY);
        assert_eq!(check.value.max_abs, 0.0);
    }

    fn case_of_one() -> Case {
        Case {
            x: vec![3, 4],
            w: vec![4],
            b: vec![4],
            seed: 9,
        }
    }
}
