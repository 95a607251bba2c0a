//! `mimscope parity`: one batch through the same weights on the CPU (f32, the reference) and on
//! another device (or precision), comparing the loss, every encoder feature map (the masked
//! training forward's residual stream, MFF's fused sequence, the latent and the prediction,
//! and the unmasked encoder's layers that the spectra use) and every parameter's gradient.
//!
//! Differences are relative L2 errors, ||a - b|| / ||a|| with `a` the CPU's
//! ([`crate::compare::Diff`]), so one number per tensor whatever its scale; the gradient check also takes all gradients as one vector. The tolerances are
//! stated in [`Tolerances::for_precision`] and printed with the results; any excess is a
//! [`Problem`] (exit status 1).
//!
//! With `--kernels`, first every kernel on its own ([`crate::kernels::check`]): the op as the
//! model calls it on the device, value and input gradients in f32 and second derivatives in
//! f64, against its primitive form on the CPU, so a wrong kernel is named by itself and not
//! only through the model's error.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use crate::cli::ParityArgs;
use crate::compare::Diff;
use crate::config::{ModelConfig, TrainPrecision};

use super::Problem;
use crate::model::{Mae, Mask, ParamStore};
use crate::rng::{stream, Purpose};

/// Largest accepted relative errors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerances {
    pub loss: f64,
    /// Worst feature map.
    pub features: f64,
    /// All gradients as one vector.
    pub gradients: f64,
    /// Worst single parameter's gradient.
    pub gradient_tensor: f64,
}

impl Tolerances {
    /// f32: the same arithmetic in another order (cuBLAS's blocking, parallel reductions), so
    /// errors of a few ulp per operation through 12+2 blocks, about 1e-6 relative, with
    /// margin; a wrong kernel is off by O(1).
    ///
    /// bf16 matrix products round their inputs to 8 significant bits (2^-9 = 2e-3 relative
    /// each). Measured on the CPU against f32 (`tiny`, batch 8-32): loss 4e-6..7e-4, features
    /// 5e-3..1e-2, gradients 6e-3..2.4e-2 at initial weights and after 200 steps, but up to
    /// 9.7e-2 (worst tensor 0.23) for trained MAE weights at batch 32, where the mean gradient
    /// is small against the per-image ones whose rounding noise it sums. So the bf16 bounds
    /// are loose for gradients; they still catch a wrong kernel (error near 1).
    pub fn for_precision(p: TrainPrecision) -> Self {
        match p {
            TrainPrecision::F32 => Tolerances {
                loss: 1e-5,
                features: 1e-4,
                gradients: 1e-4,
                gradient_tensor: 1e-3,
            },
            TrainPrecision::Bf16 => Tolerances {
                loss: 5e-3,
                features: 3e-2,
                gradients: 2e-1,
                gradient_tensor: 5e-1,
            },
        }
    }
}

/// The kernels' check runs in f32 whatever the model's precision: one op's rounding in
/// another order, a few ulp on values of order 10 (the CPU's fused kernels against the
/// primitive forms stay under 2e-5, their unit tests' bound); a wrong kernel is off by O(1).
const KERNEL_F32: f64 = 1e-4;

/// Second derivatives of the kernels in f64: the CPU's fused kernels against the primitive
/// forms stay under 1e-11 (their unit test's bound); a wrong second-order backward is off by
/// O(1).
const KERNEL_HVP_F64: f64 = 1e-9;

/// One side's results, on the host in f64.
struct Side {
    loss: f64,
    features: Vec<(String, Vec<f64>)>,
    grads: BTreeMap<String, Vec<f64>>,
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn evaluate(model: &Mae, store: &ParamStore, imgs: &Tensor, mask: &Mask) -> Result<Side> {
    let out = model.forward(imgs, mask)?;
    let mut features = Vec::new();
    for (i, t) in out.encoder.layers.iter().enumerate() {
        features.push((format!("masked.layer_{i}"), host(t)?));
    }
    if let Some(f) = &out.encoder.fused {
        features.push(("masked.fused".to_string(), host(f)?));
    }
    features.push(("masked.latent".to_string(), host(&out.encoder.latent)?));
    features.push(("prediction".to_string(), host(&out.pred)?));
    let unmasked = model.forward_encoder_unmasked(imgs)?;
    for (i, t) in unmasked.layers.iter().enumerate() {
        features.push((format!("unmasked.layer_{i}"), host(t)?));
    }
    let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let grads_store = out.loss.backward()?;
    let mut grads = BTreeMap::new();
    for (name, var) in store.trainable() {
        if let Some(g) = grads_store.get(var.as_tensor()) {
            grads.insert(name.clone(), host(g)?);
        }
    }
    Ok(Side {
        loss,
        features,
        grads,
    })
}

/// The comparison, as printed.
#[derive(Debug, Clone)]
pub struct Report {
    pub lines: Vec<String>,
    /// Each tolerance exceeded, in words; empty when the device agrees.
    pub failures: Vec<String>,
}

/// The model as `args` asks, on the CPU, f32 parameters.
fn load(args: &ParityArgs) -> Result<(Mae, ParamStore)> {
    match &args.checkpoint {
        Some(path) => {
            let l = crate::checkpoint::load_model(path, DType::F32, &Device::Cpu)?;
            Ok((l.model, l.store))
        }
        None => {
            let cfg = super::bench::bench_config(args.model.model, args.model.preset);
            Ok(Mae::init(&cfg, args.seed, DType::F32, &Device::Cpu)?)
        }
    }
}

/// A copy of the CPU model's parameters on `device` (the file is read once).
fn to_device(model: &Mae, store: &ParamStore, device: &Device) -> Result<(Mae, ParamStore)> {
    let tensors = store
        .tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect::<Result<_>>()?;
    let store = ParamStore::from_tensors(tensors)?;
    Ok((
        Mae::from_store(&model.cfg, &store, DType::F32, device)?,
        store,
    ))
}

/// ||b - a|| / ||a||, `a` the CPU's reference (0 when both are 0).
fn relative_l2(a: &[f64], b: &[f64]) -> f64 {
    Diff::between(b, a).relative_l2
}

/// The relative errors of the device's side `b` against the CPU's `a`, each worst one named.
struct Errors {
    loss: f64,
    /// The worst feature map and its error.
    features: (String, f64),
    /// All gradients as one vector.
    gradients: f64,
    /// The worst single parameter's gradient and its error.
    gradient_tensor: (String, f64),
}

impl Errors {
    fn between(a: &Side, b: &Side) -> Result<Errors> {
        let worst = |pairs: Vec<(String, f64)>| {
            pairs
                .into_iter()
                .max_by(|x, y| x.1.total_cmp(&y.1))
                .unwrap_or_default()
        };
        let features = worst(
            a.features
                .iter()
                .zip(&b.features)
                .map(|((n, x), (_, y))| (n.clone(), relative_l2(x, y)))
                .collect(),
        );
        if a.grads.len() != b.grads.len() {
            bail!(
                "the CPU has gradients for {} parameters and the device for {}",
                a.grads.len(),
                b.grads.len()
            );
        }
        let gradient_tensor = worst(
            a.grads
                .iter()
                .map(|(n, x)| (n.clone(), relative_l2(x, &b.grads[n])))
                .collect(),
        );
        let flat = |s: &Side| s.grads.values().flatten().copied().collect::<Vec<f64>>();
        Ok(Errors {
            loss: (a.loss - b.loss).abs() / a.loss.abs().max(f64::MIN_POSITIVE),
            features,
            gradients: relative_l2(&flat(a), &flat(b)),
            gradient_tensor,
        })
    }

    /// Each tolerance exceeded, in words (NaN exceeds every one).
    fn failures(&self, tol: &Tolerances) -> Vec<String> {
        [
            ("loss", self.loss, tol.loss),
            ("features", self.features.1, tol.features),
            ("gradients", self.gradients, tol.gradients),
            (
                "gradient of one tensor",
                self.gradient_tensor.1,
                tol.gradient_tensor,
            ),
        ]
        .into_iter()
        .filter(|(_, value, limit)| value.is_nan() || value > limit)
        .map(|(what, value, limit)| format!("{what}: {value:.3e} > {limit:.0e}"))
        .collect()
    }
}

/// The batch of `args` for `cfg`: the first images (evaluation view) and the mask from
/// (seed, EvalMask, 0).
fn batch(args: &ParityArgs, cfg: &ModelConfig) -> Result<(Vec<f32>, Mask)> {
    let dataset = crate::train::open_dataset(args.data.as_deref())?;
    if dataset.len() < args.batch_size {
        bail!(
            "--batch-size {} but only {} images are available",
            args.batch_size,
            dataset.len()
        );
    }
    let data = dataset.eval_batch(args.batch_size, cfg.img_size as u32)?;
    crate::config::check_ratio(cfg.num_patches(), args.mask_ratio).map_err(anyhow::Error::msg)?;
    let mask = Mask::random(
        args.batch_size,
        cfg.num_patches(),
        args.mask_ratio,
        &mut stream(args.seed, Purpose::EvalMask, 0),
    );
    Ok((data, mask))
}

/// Runs both sides and compares them.
pub fn compare(args: &ParityArgs, device: &Device) -> Result<Report> {
    if args.batch_size == 0 {
        bail!("--batch-size must be positive");
    }
    let (reference, ref_store) = load(args)?;
    let (mut target, target_store) = to_device(&reference, &ref_store, device)?;
    target.set_matmul_dtype(args.precision.matmul_dtype());
    let cfg = reference.cfg.clone();
    let (data, mask) = batch(args, &cfg)?;
    let shape = (args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size);
    let a = evaluate(
        &reference,
        &ref_store,
        &Tensor::from_vec(data.clone(), shape, &Device::Cpu)?,
        &mask,
    )?;
    let b = evaluate(
        &target,
        &target_store,
        &Tensor::from_vec(data, shape, device)?,
        &mask,
    )?;
    let errors = Errors::between(&a, &b)?;
    let tol = Tolerances::for_precision(args.precision);
    let (mut lines, mut failures) = (Vec::new(), Vec::new());
    if args.kernels {
        kernel_checks(device, &mut lines, &mut failures)?;
    }
    lines.extend(report_lines(args, device, &a, &b, &errors, &tol));
    failures.extend(errors.failures(&tol));
    Ok(Report { lines, failures })
}

/// `--kernels`: every kernel on `device` against its primitive form on the CPU, a line each
/// (`kernel_<op>_<dims>_rel=`, `kernel_hvp_<op>_rel=`), and a failure for each case over its
/// tolerance ([`KERNEL_F32`], [`KERNEL_HVP_F64`], whatever `--precision`; NaN included).
fn kernel_checks(
    device: &Device,
    lines: &mut Vec<String>,
    failures: &mut Vec<String>,
) -> Result<()> {
    let mut add = |name: String, worst: f64, limit: f64| {
        lines.push(format!("{name}_rel={worst:.3e} (tolerance {limit:.0e})"));
        if worst.is_nan() || worst > limit {
            failures.push(format!("{name} off by {worst:.3e}"));
        }
    };
    for k in crate::kernels::check::all(device, DType::F32)? {
        let name = format!("kernel_{}_{}", k.op.replace(' ', "_"), dims_name(&k.dims));
        add(name, k.worst(), KERNEL_F32);
    }
    for (op, diffs) in crate::kernels::check::second_order_all(device, DType::F64)? {
        let worst =
            diffs
                .iter()
                .map(|d| d.max_rel)
                .fold(0.0, |m: f64, e| if e.is_nan() { e } else { m.max(e) });
        add(
            format!("kernel_hvp_{}", op.replace([' ', '-'], "_")),
            worst,
            KERNEL_HVP_F64,
        );
    }
    Ok(())
}

/// `4x33x192` for dims [4, 33, 192].
fn dims_name(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// The printed comparison: the set-up, both losses, each error with its tolerance.
fn report_lines(
    args: &ParityArgs,
    device: &Device,
    a: &Side,
    b: &Side,
    e: &Errors,
    tol: &Tolerances,
) -> Vec<String> {
    let weights = args.checkpoint.as_ref().map_or(
        format!(
            "{:?} {:?} seed {}",
            args.model.model, args.model.preset, args.seed
        ),
        |p| p.display().to_string(),
    );
    vec![
        format!("device={}", super::bench::describe(device)),
        format!("precision={}", args.precision.name()),
        format!("weights={weights}"),
        format!("batch_size={}", args.batch_size),
        format!("loss_cpu={:.9}", a.loss),
        format!("loss_device={:.9}", b.loss),
        format!("loss_rel={:.3e} (tolerance {:.0e})", e.loss, tol.loss),
        format!(
            "features_rel_max={:.3e} at {} of {} maps (tolerance {:.0e})",
            e.features.1,
            e.features.0,
            a.features.len(),
            tol.features
        ),
        format!(
            "gradients_rel={:.3e} over {} tensors (tolerance {:.0e})",
            e.gradients,
            a.grads.len(),
            tol.gradients
        ),
        format!(
            "gradient_tensor_rel_max={:.3e} at {} (tolerance {:.0e})",
            e.gradient_tensor.1, e.gradient_tensor.0, tol.gradient_tensor
        ),
    ]
}

/// `mimscope parity`: prints the comparison; a [`Problem`] (exit status 1) when outside the
/// tolerances.
pub fn run(args: &ParityArgs) -> Result<()> {
    let device = args.device.device()?;
    let report = compare(args, &device)?;
    for l in &report.lines {
        crate::say!("{l}");
    }
    if report.failures.is_empty() {
        crate::say!("parity=pass");
        Ok(())
    } else {
        crate::say!("parity=fail");
        Err(Problem(format!(
            "{} disagrees with the CPU beyond the tolerances: {}",
            super::bench::describe(&device),
            report.failures.join("; ")
        ))
        .into())
    }
}
