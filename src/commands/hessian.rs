//! `mimscope hessian`: top Hessian eigenvalues of the pre-training loss, per batch and
//! checkpoint, on identical batches and masks for every checkpoint.
//!
//! Batch k holds the images k*B .. k*B+B-1 in sorted path order (wrapping around), resized and
//! centre-cropped as `reconstruct`, with the mask drawn from (seed, HessianMask, k). They are
//! written to `batches.safetensors` before any eigenvalue is computed, so anyone can recompute
//! the numbers. Output: `hessian.csv`, `batch_loss.csv`, `trace.csv` (with --trace),
//! `hessian_info.json` (method, objective, cost of a gradient and of one product) and
//! `eigenvalues.{png,svg}`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::analysis::checkpoint_labels;
use crate::analysis::hessian::{hutchinson_trace, top_eigen, PowerSettings};
use crate::analysis::hvp::{HvpMethod, Objective};
use crate::checkpoint::ModelOverrides;
use crate::checkpoint::{load_model_with, save_tensors, Loaded};
use crate::cli::HessianArgs;
use crate::config::{check_ratio, HvpKind, ModelConfig};
use crate::figures::charts::{save, EigenDistribution};
use crate::kernels::second_order::with_second_order;
use crate::model::params::DecayRule;
use crate::model::Mask;
use crate::output::{write_atomic, write_csv};
use crate::rng::{stream, Purpose};
use crate::train::open_dataset;

/// What `hessian` computes.
#[derive(Debug, Clone)]
pub struct HessianSettings {
    pub checkpoints: Vec<PathBuf>,
    pub data: Option<PathBuf>,
    pub batches: usize,
    pub batch_size: usize,
    /// Images per forward/backward pass inside a batch (bounds memory; the result does not
    /// depend on it beyond rounding).
    pub micro_batch: usize,
    pub top_k: usize,
    pub power: PowerSettings,
    pub seed: u64,
    pub mask_ratio: f64,
    /// 0: the objective is the loss alone.
    pub weight_decay: f64,
    pub method: HvpMethod,
    /// Hutchinson samples per batch; 0 = no trace.
    pub trace_samples: usize,
    pub dtype: DType,
    pub out: PathBuf,
    /// Architecture of files without a stored config.
    pub overrides: ModelOverrides,
}

/// One row of `hessian.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct EigenRow {
    pub checkpoint: String,
    pub batch: usize,
    pub rank: usize,
    pub eigenvalue: f64,
    pub iterations: usize,
    pub converged: bool,
    pub seconds: f64,
}

/// Time of one gradient and of one Hessian-vector product of a checkpoint (first batch).
#[derive(Debug, Clone)]
pub struct Cost {
    pub checkpoint: String,
    pub gradient_s: f64,
    /// The first product (exact, one micro-batch: builds the gradient graph).
    pub first_hvp_s: f64,
    /// A later product, as power iteration repeats it.
    pub hvp_s: f64,
}

/// Everything `hessian` measured.
#[derive(Debug, Clone)]
pub struct HessianReport {
    pub rows: Vec<EigenRow>,
    /// (checkpoint, batch, loss).
    pub losses: Vec<(String, usize, f64)>,
    /// (checkpoint, batch, trace, standard error).
    pub traces: Vec<(String, usize, f64, f64)>,
    pub costs: Vec<Cost>,
    pub method: String,
    pub objective: String,
}

impl HessianReport {
    /// Top eigenvalue (rank 1) of every batch of `checkpoint`.
    pub fn top(&self, checkpoint: &str) -> Vec<f64> {
        self.rows
            .iter()
            .filter(|r| r.checkpoint == checkpoint && r.rank == 1)
            .map(|r| r.eigenvalue)
            .collect()
    }
}

/// The fixed batches: images (B, C, H, W) and masks, with the file names used.
pub fn make_batches(
    s: &HessianSettings,
    cfg: &ModelConfig,
    device: &Device,
) -> Result<Vec<(Tensor, Mask, Vec<String>)>> {
    let ds = open_dataset(s.data.as_deref())?;
    let size = cfg.img_size;
    let (n, b) = (ds.len(), s.batch_size);
    let mut out = Vec::new();
    for k in 0..s.batches {
        let idx: Vec<usize> = (0..b).map(|j| (k * b + j) % n).collect();
        let data = ds.eval_images(&idx, size as u32)?;
        let imgs = Tensor::from_vec(data, (b, 3, size, size), device)?;
        let mask = Mask::random(
            b,
            cfg.num_patches(),
            s.mask_ratio,
            &mut stream(s.seed, Purpose::HessianMask, k as u64),
        );
        let names = idx
            .iter()
            .map(|&i| {
                ds.paths()[i]
                    .file_name()
                    .map_or(String::new(), |f| f.to_string_lossy().into_owned())
            })
            .collect();
        out.push((imgs, mask, names));
    }
    Ok(out)
}

fn check(s: &HessianSettings) -> Result<()> {
    if s.checkpoints.is_empty() {
        bail!("no checkpoint: pass --checkpoint FILE (repeat it to compare several)");
    }
    if s.batches == 0 || s.batch_size == 0 || s.micro_batch == 0 {
        bail!("--batches, --batch-size and --micro-batch must be at least 1");
    }
    if s.top_k == 0 || s.power.max_iters == 0 {
        bail!("--top-k and --max-iters must be at least 1");
    }
    if s.power.tol.is_nan() || s.power.tol <= 0.0 {
        bail!("--tol {} must be positive", s.power.tol);
    }
    if s.weight_decay.is_nan() || s.weight_decay < 0.0 {
        bail!("--weight-decay {} must be >= 0", s.weight_decay);
    }
    if let HvpMethod::FiniteDifference { eps } = s.method {
        if eps.is_nan() || eps <= 0.0 {
            bail!("--fd-eps {eps} must be positive");
        }
    }
    Ok(())
}

/// Runs the analysis and writes its tables and figure.
pub fn run(s: &HessianSettings, device: &Device) -> Result<HessianReport> {
    check(s)?;
    let paths: Vec<&Path> = s.checkpoints.iter().map(PathBuf::as_path).collect();
    let labels = checkpoint_labels(&paths);
    std::fs::create_dir_all(&s.out).with_context(|| format!("creating {}", s.out.display()))?;

    // Batches from the first checkpoint's input size; every checkpoint must share it. The
    // first model is loaded once and analysed below.
    let first_model = load_model_with(paths[0], &s.overrides, s.dtype, device)?;
    let first = first_model.model.cfg.clone();
    let mut preloaded = Some(first_model);
    check_ratio(first.num_patches(), s.mask_ratio).map_err(anyhow::Error::msg)?;
    let batches = make_batches(s, &first, device)?;
    save_batches(&s.out.join("batches.safetensors"), &batches, s)?;

    let objective = if s.weight_decay > 0.0 {
        format!(
            "pre-training loss + ({}/2)·||θ_d||² over the weight-decayed tensors (MAE's rule)",
            s.weight_decay
        )
    } else {
        "pre-training loss on a fixed batch and mask, no weight decay".to_string()
    };
    crate::note!(
        "hessian: {} batches of {} images (mask ratio {}), top {} eigenvalues, Hessian-vector \
         products: {}; objective: {objective}",
        s.batches,
        s.batch_size,
        s.mask_ratio,
        s.top_k,
        s.method.describe()
    );
    let mut report = HessianReport {
        rows: vec![],
        losses: vec![],
        traces: vec![],
        costs: vec![],
        method: s.method.describe(),
        objective,
    };
    let (first, batches) = (&first, &batches[..]);
    for (path, label) in paths.iter().zip(&labels) {
        let loaded = match preloaded.take() {
            Some(l) => l,
            None => load_model_with(path, &s.overrides, s.dtype, device)?,
        };
        let r = &mut report;
        let work = move || analyse_checkpoint(s, path, label, loaded, first, batches, r);
        match s.method {
            HvpMethod::Exact => with_second_order(work)?,
            HvpMethod::FiniteDifference { .. } => work()?,
        }
    }
    write_outputs(&s.out, &report, &labels, s)?;
    Ok(report)
}

fn analyse_checkpoint(
    s: &HessianSettings,
    path: &Path,
    label: &str,
    loaded: Loaded,
    first: &ModelConfig,
    batches: &[(Tensor, Mask, Vec<String>)],
    report: &mut HessianReport,
) -> Result<()> {
    check_same_input(s, path, &loaded.model.cfg, first)?;
    let rule = DecayRule {
        decay_fusion_weights: true,
    };
    for (k, (imgs, mask, _)) in batches.iter().enumerate() {
        let imgs = imgs.to_dtype(s.dtype)?;
        let obj = Objective::new(
            &loaded.model,
            &loaded.store,
            &imgs,
            mask,
            s.micro_batch,
            s.weight_decay,
            rule,
        )?;
        let loss = obj.loss()?;
        if !loss.is_finite() {
            bail!(
                "{}: the loss on batch {k} is {loss}; is the checkpoint broken?",
                path.display()
            );
        }
        report.losses.push((label.to_string(), k, loss));
        if k == 0 {
            report.costs.push(measure_cost(&obj, s.method, label)?);
        }
        report.rows.extend(top_eigenvalues(s, &obj, label, k)?);
        if s.trace_samples > 0 {
            let mut rng = stream(s.seed, Purpose::PowerIteration, (1 << 32) + k as u64);
            let (tr, se) = hutchinson_trace(obj.len(), s.trace_samples, &mut rng, |v| {
                obj.hvp(v, s.method)
            })?;
            crate::note!("hessian: {label} batch {k} trace {tr:.4} ± {se:.4}");
            report.traces.push((label.to_string(), k, tr, se));
        }
    }
    Ok(())
}

/// Every checkpoint must take the first one's input size, so they all see identical batches.
fn check_same_input(
    s: &HessianSettings,
    path: &Path,
    cfg: &ModelConfig,
    first: &ModelConfig,
) -> Result<()> {
    if (cfg.img_size, cfg.patch_size, cfg.in_chans)
        != (first.img_size, first.patch_size, first.in_chans)
    {
        bail!(
            "{} takes {}px images in {}px patches, but {} takes {}px in {}px: compare checkpoints \
             with the same input size so they see identical batches",
            path.display(),
            cfg.img_size,
            cfg.patch_size,
            s.checkpoints[0].display(),
            first.img_size,
            first.patch_size
        );
    }
    Ok(())
}

/// Cost of one product against one gradient, both after a warm-up gradient (the first pass
/// of a process pays for its allocations). With one micro-batch the first exact product also
/// builds the gradient graph the later ones reuse, so the second product is the one power
/// iteration repeats.
fn measure_cost(obj: &Objective, method: HvpMethod, label: &str) -> Result<Cost> {
    obj.gradient()?;
    let t = Instant::now();
    obj.gradient()?;
    let grad_s = t.elapsed().as_secs_f64();
    let probe = vec![1.0 / (obj.len() as f64).sqrt(); obj.len()];
    let t = Instant::now();
    obj.hvp(&probe, method)?;
    let first_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    obj.hvp(&probe, method)?;
    let hvp_s = t.elapsed().as_secs_f64();
    crate::note!(
        "hessian: {label}: {} parameters; one gradient {grad_s:.2} s, one Hessian-vector \
         product {hvp_s:.2} s = {:.1} gradients (the first {first_s:.2} s)",
        obj.len(),
        hvp_s / grad_s
    );
    Ok(Cost {
        checkpoint: label.to_string(),
        gradient_s: grad_s,
        first_hvp_s: first_s,
        hvp_s,
    })
}

/// The top `s.top_k` eigenvalues on batch `k`, by power iteration from the stream
/// (seed, PowerIteration, k).
fn top_eigenvalues(
    s: &HessianSettings,
    obj: &Objective,
    label: &str,
    k: usize,
) -> Result<Vec<EigenRow>> {
    let mut rng = stream(s.seed, Purpose::PowerIteration, k as u64);
    let eig = top_eigen(obj.len(), s.top_k, s.power, &mut rng, |v| {
        obj.hvp(v, s.method)
    })?;
    let mut rows = Vec::new();
    for (r, e) in eig.iter().enumerate() {
        crate::note!(
            "hessian: {label} batch {k} rank {}: {:.6} ({} products{})",
            r + 1,
            e.value,
            e.iterations,
            if e.converged { "" } else { ", not converged" }
        );
        rows.push(EigenRow {
            checkpoint: label.to_string(),
            batch: k,
            rank: r + 1,
            eigenvalue: e.value,
            iterations: e.iterations,
            converged: e.converged,
            seconds: e.seconds,
        });
    }
    Ok(rows)
}

fn save_batches(
    path: &Path,
    batches: &[(Tensor, Mask, Vec<String>)],
    s: &HessianSettings,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    let mut meta = HashMap::new();
    for (k, (imgs, mask, names)) in batches.iter().enumerate() {
        tensors.insert(format!("images_{k}"), imgs.clone());
        tensors.insert(
            format!("mask_{k}"),
            mask.mask_tensor(DType::F32, imgs.device())?,
        );
        meta.insert(format!("files_{k}"), serde_json::to_string(names)?);
    }
    meta.insert("seed".into(), s.seed.to_string());
    meta.insert("mask_ratio".into(), s.mask_ratio.to_string());
    meta.insert(
        "about".into(),
        "images_k: (B,3,H,W) ImageNet-normalised as fed to the model; mask_k: (B,L) 1 = removed"
            .into(),
    );
    save_tensors(path, &tensors, meta)
}

/// `hessian.csv`, `batch_loss.csv` and (with traces) `trace.csv`.
fn write_tables(out: &Path, r: &HessianReport, trace_samples: usize) -> Result<()> {
    let header = [
        "checkpoint",
        "batch",
        "rank",
        "eigenvalue",
        "iterations",
        "converged",
        "seconds",
    ];
    let rows = r.rows.iter().map(|row| {
        [
            row.checkpoint.clone(),
            row.batch.to_string(),
            row.rank.to_string(),
            format!("{:.8e}", row.eigenvalue),
            row.iterations.to_string(),
            row.converged.to_string(),
            format!("{:.3}", row.seconds),
        ]
    });
    write_csv(&out.join("hessian.csv"), &header, rows)?;
    let rows = r
        .losses
        .iter()
        .map(|(c, k, l)| [c.clone(), k.to_string(), format!("{l:.8}")]);
    write_csv(
        &out.join("batch_loss.csv"),
        &["checkpoint", "batch", "loss"],
        rows,
    )?;
    if !r.traces.is_empty() {
        let rows = r.traces.iter().map(|(c, k, t, se)| {
            [
                c.clone(),
                k.to_string(),
                format!("{t:.8e}"),
                format!("{se:.8e}"),
                trace_samples.to_string(),
            ]
        });
        let header = ["checkpoint", "batch", "trace", "std_error", "samples"];
        write_csv(&out.join("trace.csv"), &header, rows)?;
    }
    Ok(())
}

fn write_outputs(
    out: &Path,
    r: &HessianReport,
    labels: &[String],
    s: &HessianSettings,
) -> Result<()> {
    write_tables(out, r, s.trace_samples)?;
    let info = serde_json::json!({
        "method": r.method,
        "objective": r.objective,
        "weight_decay": s.weight_decay,
        "dtype": format!("{:?}", s.dtype),
        "batches": s.batches,
        "batch_size": s.batch_size,
        "micro_batch": s.micro_batch,
        "mask_ratio": s.mask_ratio,
        "seed": s.seed,
        "top_k": s.top_k,
        "max_iters": s.power.max_iters,
        "tol": s.power.tol,
        "cost": r.costs.iter().map(|c| serde_json::json!({
            "checkpoint": c.checkpoint,
            "gradient_seconds": c.gradient_s,
            "first_hvp_seconds": c.first_hvp_s,
            "hvp_seconds": c.hvp_s,
            "hvp_over_gradient": c.hvp_s / c.gradient_s,
        })).collect::<Vec<_>>(),
    });
    write_atomic(
        &out.join("hessian_info.json"),
        serde_json::to_string_pretty(&info)?.as_bytes(),
    )?;
    let series: Vec<(String, Vec<f64>)> = labels.iter().map(|l| (l.clone(), r.top(l))).collect();
    save(
        &EigenDistribution { series: &series },
        &out.join("eigenvalues"),
    )?;
    crate::note!(
        "hessian: wrote hessian.csv, batches.safetensors and figures to {}",
        out.display()
    );
    Ok(())
}

impl HessianArgs {
    /// The flags as settings.
    pub fn settings(&self) -> HessianSettings {
        HessianSettings {
            checkpoints: self.checkpoints.clone(),
            data: self.data.clone(),
            batches: self.batches,
            batch_size: self.batch_size,
            micro_batch: self.micro_batch,
            top_k: self.top_k,
            power: PowerSettings {
                max_iters: self.max_iters,
                tol: self.tol,
            },
            seed: self.seed,
            mask_ratio: self.mask_ratio,
            weight_decay: self.weight_decay,
            method: match self.hvp {
                HvpKind::Exact => HvpMethod::Exact,
                HvpKind::Fd => HvpMethod::FiniteDifference { eps: self.fd_eps },
            },
            trace_samples: self.trace,
            dtype: self.precision.dtype(),
            out: self.out.clone(),
            overrides: self.arch.overrides(),
        }
    }
}
