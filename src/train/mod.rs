//! The pre-training loop: data, masking, forward, backward, AdamW, metrics and checkpoints.
//!
//! Everything random is a pure function of (seed, step): the images of a batch, their crops,
//! the masks. So a run resumed from the checkpoint after step s draws exactly what the
//! uninterrupted run drew, and the final weights are bit-identical on CPU.
//!
//! Run directory: `config.json` (the resolved [`TrainConfig`]), `metrics.csv`,
//! `fusion_weights.csv` (weighted MFF only; step 0 is the initial 1/n),
//! `checkpoints/step_XXXXXXX{.safetensors,.state.safetensors}` and `final.safetensors`.

pub mod optim;
pub mod schedule;
pub mod step;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::{self, checkpoint_paths, latest_checkpoint};
use crate::config::{TrainConfig, TrainPrecision};
use crate::data::Dataset;
use crate::model::{Mae, Mask, ParamStore};
use crate::output::{write_atomic, CsvLog};
use crate::rng::{stream, Purpose};
use optim::AdamW;

pub const CONFIG_FILE: &str = "config.json";
pub const METRICS_FILE: &str = "metrics.csv";
pub const FUSION_FILE: &str = "fusion_weights.csv";
pub const FINAL_FILE: &str = "final.safetensors";

/// The training images of a run: a folder, or the photos bundled in the binary.
pub fn open_dataset(data: Option<&Path>) -> Result<Dataset> {
    match data {
        Some(dir) => Dataset::open(dir),
        None => Dataset::bundled(),
    }
}

/// Batches built ahead of the step that uses them (data loading overlaps compute).
const PREFETCH: usize = 2;

/// The mask of `step`, from the stream (seed, Mask, step).
pub fn batch_mask(cfg: &TrainConfig, step: u64) -> Mask {
    Mask::random(
        cfg.batch_size,
        cfg.model.num_patches(),
        cfg.mask_ratio,
        &mut stream(cfg.seed, Purpose::Mask, step),
    )
}

/// Metadata stored beside the config in every checkpoint of a run.
fn checkpoint_metadata(cfg: &TrainConfig, step: u64) -> Result<HashMap<String, String>> {
    let mut m = HashMap::new();
    m.insert("step".to_string(), step.to_string());
    m.insert("mask_ratio".to_string(), cfg.mask_ratio.to_string());
    m.insert("format".to_string(), "pt".to_string());
    m.insert("mimscope_train".to_string(), serde_json::to_string(cfg)?);
    Ok(m)
}

/// The fusion log's row after `step`: softmax(proj_weights), or None without scalar weights.
fn fusion_row(step: u64, model: &Mae) -> Result<Option<Vec<String>>> {
    let Some(w) = model.fusion().map(|f| f.weights()).transpose()?.flatten() else {
        return Ok(None);
    };
    let w = w.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut row = vec![step.to_string()];
    row.extend(w.iter().map(|v| format!("{v:.8}")));
    Ok(Some(row))
}

fn fusion_header(cfg: &TrainConfig) -> Vec<String> {
    let mut cols = vec!["step".to_string()];
    cols.extend(
        cfg.model
            .fused_blocks()
            .iter()
            .map(|b| format!("layer_{b}")),
    );
    cols
}

const METRICS_HEADER: [&str; 5] = ["step", "epoch", "lr", "loss", "images_per_s"];

/// bf16 training is for GPUs: a CPU run refuses it before anything is written.
fn check_precision(cfg: &TrainConfig, device: &Device, resuming: bool) -> Result<()> {
    if cfg.precision != TrainPrecision::F32 && device.is_cpu() {
        bail!(
            "--precision {} is for GPUs (--device cuda:N); on a CPU, training runs in f32 \
             (drop --precision){}",
            cfg.precision.name(),
            if resuming {
                "; this run was started in that precision, so resume it on a GPU"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Where a run starts.
#[allow(clippy::large_enum_variant)] // built once per run
pub enum Start {
    /// A new run in an empty or absent folder, on its already opened images.
    Fresh(TrainConfig, Dataset),
    /// Continue the run in this folder from its newest checkpoint.
    Resume,
}

/// Runs (or resumes) training in `run_dir`. Returns the final checkpoint's path and the run's
/// config.
pub fn train(run_dir: &Path, start: Start, device: &Device) -> Result<(PathBuf, TrainConfig)> {
    let ckpt_dir = run_dir.join("checkpoints");
    let resuming = matches!(start, Start::Resume);
    let (cfg, dataset) = match start {
        Start::Fresh(cfg, dataset) => (create_run(run_dir, &ckpt_dir, cfg, device)?, dataset),
        Start::Resume => reopen_run(run_dir, device)?,
    };
    if resuming && run_dir.join(FINAL_FILE).exists() {
        bail!(
            "run {} is already complete ({} exists); start a new run with another --out",
            run_dir.display(),
            FINAL_FILE
        );
    }
    log_data(&cfg, &dataset);

    // Model and optimiser, fresh or from the newest checkpoint.
    let resume_step = if resuming {
        latest_checkpoint(&ckpt_dir)?
    } else {
        None
    };
    let (mut model, store, opt) = match resume_step {
        Some(step) => load_checkpoint(&cfg, &ckpt_dir, step, device)?,
        None => {
            if resuming {
                crate::note!(
                    "no checkpoint in {} yet: starting the run over",
                    ckpt_dir.display()
                );
            }
            init_model(&cfg, device)?
        }
    };
    model.set_matmul_dtype(cfg.precision.matmul_dtype());
    let first = resume_step.unwrap_or(0);
    log_schedule(&cfg, &opt);
    let (metrics, fusion) = open_logs(run_dir, &cfg, &model, resume_step)?;

    let last_good = resume_step.map(|s| checkpoint_paths(&ckpt_dir, s).0);
    let mut run = Loop {
        cfg: &cfg,
        device,
        ckpt_dir,
        steps_per_epoch: cfg.steps_per_epoch(dataset.len()),
        progress: Progress::new(first, cfg.steps),
        model,
        store,
        opt,
        metrics,
        fusion,
        last_good,
        waited: std::time::Duration::ZERO,
    };
    let started = Instant::now();
    run.all_steps(&dataset, first)?;
    run.progress.finish();
    let total = started.elapsed().as_secs_f64();
    if total > 0.0 && cfg.steps > first {
        crate::note!(
            "data: the steps waited {:.1} s for batches (and their copy to the device), {:.1}% \
             of {total:.1} s of training",
            run.waited.as_secs_f64(),
            100.0 * run.waited.as_secs_f64() / total
        );
    }
    let final_path = run_dir.join(FINAL_FILE);
    checkpoint::save_weights(
        &final_path,
        &cfg.model,
        &run.store,
        checkpoint_metadata(&cfg, cfg.steps)?,
    )?;
    crate::note!("final checkpoint: {}", final_path.display());
    Ok((final_path, cfg))
}

/// A new run: refuses a non-empty folder, then writes the folder and its `config.json`.
fn create_run(
    run_dir: &Path,
    ckpt_dir: &Path,
    cfg: TrainConfig,
    device: &Device,
) -> Result<TrainConfig> {
    check_precision(&cfg, device, false)?;
    if run_dir.exists()
        && std::fs::read_dir(run_dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    {
        bail!(
            "run folder {} already exists and is not empty; continue it with \
             `mimscope train --resume {}` or choose another --out",
            run_dir.display(),
            run_dir.display()
        );
    }
    std::fs::create_dir_all(ckpt_dir)
        .with_context(|| format!("creating {}", ckpt_dir.display()))?;
    write_atomic(
        &run_dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    Ok(cfg)
}

/// A run to resume: its stored config and its images (warning when their count changed).
fn reopen_run(run_dir: &Path, device: &Device) -> Result<(TrainConfig, Dataset)> {
    let path = run_dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is {} a mimscope run folder?)",
            path.display(),
            run_dir.display()
        )
    })?;
    let cfg = serde_json::from_str::<TrainConfig>(&text)
        .with_context(|| format!("parsing {}", path.display()))?;
    check_precision(&cfg, device, true)?;
    let dataset = open_dataset(cfg.data.as_deref())?;
    if dataset.len() != cfg.dataset_size {
        crate::note!(
            "warning: the run started with {} usable images and now finds {}: the \
             resumed run will not draw the batches the original would have",
            cfg.dataset_size,
            dataset.len()
        );
    }
    Ok((cfg, dataset))
}

fn log_data(cfg: &TrainConfig, dataset: &Dataset) {
    crate::note!(
        "data: {} images from {}{}",
        dataset.len(),
        cfg.data
            .as_ref()
            .map_or("the bundled photos".to_string(), |d| d
                .display()
                .to_string()),
        if dataset.skipped() > 0 {
            format!(" ({} unreadable files skipped)", dataset.skipped())
        } else {
            String::new()
        }
    );
}

/// Model, parameters and optimiser state as the checkpoint after `step` stored them.
fn load_checkpoint(
    cfg: &TrainConfig,
    ckpt_dir: &Path,
    step: u64,
    device: &Device,
) -> Result<(Mae, ParamStore, AdamW)> {
    let (weights, state) = checkpoint_paths(ckpt_dir, step);
    let loaded = checkpoint::load_model(&weights, DType::F32, device)?;
    let mut opt = AdamW::new(loaded.store.trainable(), cfg.weight_decay, cfg.decay_rule())?;
    let st = checkpoint::load_tensors(&state, DType::F32, device)?;
    opt.load_state(&st.tensors, step)
        .map_err(|e| anyhow::anyhow!("{}: {e}", state.display()))?;
    crate::note!("resuming from {} (step {step})", weights.display());
    Ok((loaded.model, loaded.store, opt))
}

/// A freshly initialised model (from the run's seed) and optimiser.
fn init_model(cfg: &TrainConfig, device: &Device) -> Result<(Mae, ParamStore, AdamW)> {
    let (model, store) = Mae::init(&cfg.model, cfg.seed, DType::F32, device)?;
    let opt = AdamW::new(store.trainable(), cfg.weight_decay, cfg.decay_rule())?;
    Ok((model, store, opt))
}

fn log_schedule(cfg: &TrainConfig, opt: &AdamW) {
    let (decayed, undecayed) = opt.groups();
    crate::note!(
        "optimiser: AdamW betas (0.9, 0.95), weight decay {} on {} tensors, none on {}: {}",
        cfg.weight_decay,
        decayed.len(),
        undecayed.len(),
        cfg.decay_rule().describe()
    );
    crate::note!(
        "schedule: lr {:.3e} = blr {:.3e} x batch {} / 256, {} warmup steps then half-cosine over {} steps",
        cfg.lr, cfg.blr, cfg.batch_size, cfg.warmup_steps, cfg.steps
    );
}

/// `metrics.csv` and (weighted MFF) `fusion_weights.csv`. Resuming from a checkpoint keeps
/// their rows up to it; otherwise the files start anew, the fusion log with the initial row.
fn open_logs(
    run_dir: &Path,
    cfg: &TrainConfig,
    model: &Mae,
    keep: Option<u64>,
) -> Result<(CsvLog, Option<CsvLog>)> {
    let metrics = CsvLog::open(&run_dir.join(METRICS_FILE), &METRICS_HEADER, keep)?;
    let fusion = match fusion_row(keep.unwrap_or(0), model)? {
        Some(row0) => {
            let header = fusion_header(cfg);
            let header: Vec<&str> = header.iter().map(String::as_str).collect();
            let mut log = CsvLog::open(&run_dir.join(FUSION_FILE), &header, keep)?;
            if keep.is_none() {
                log.row(&row0)?;
            }
            Some(log)
        }
        None => None,
    };
    Ok((metrics, fusion))
}

/// What the step loop updates: model, optimiser, logs and the last checkpoint written.
struct Loop<'a> {
    cfg: &'a TrainConfig,
    device: &'a Device,
    ckpt_dir: PathBuf,
    steps_per_epoch: u64,
    progress: Progress,
    model: Mae,
    store: ParamStore,
    opt: AdamW,
    metrics: CsvLog,
    fusion: Option<CsvLog>,
    last_good: Option<PathBuf>,
    /// Time the steps spent waiting for their batch (and its copy to the device).
    waited: std::time::Duration,
}

impl Loop<'_> {
    /// Steps `first..cfg.steps`. Batches are decoded and augmented on a producer thread,
    /// PREFETCH steps ahead of the optimiser. Each batch is a pure function of (seed, step),
    /// so this changes no result.
    fn all_steps(&mut self, dataset: &Dataset, first: u64) -> Result<()> {
        let cfg = self.cfg;
        std::thread::scope(|scope| -> Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<f32>>>(PREFETCH);
            scope.spawn(move || {
                for step in first..cfg.steps {
                    let batch = dataset.train_batch(
                        step,
                        cfg.batch_size,
                        cfg.model.img_size as u32,
                        cfg.augment,
                        cfg.seed,
                    );
                    // A closed channel means the loop stopped (an error): nothing more to build.
                    if tx.send(batch).is_err() {
                        break;
                    }
                }
            });
            for step in first..cfg.steps {
                self.step(step, &rx)?;
            }
            Ok(())
        })
    }

    /// One optimiser step on the batch of `step`, then its log rows and (every save_every
    /// steps, and at the end) its checkpoint.
    fn step(&mut self, step: u64, batches: &Receiver<Result<Vec<f32>>>) -> Result<()> {
        let cfg = self.cfg;
        let t0 = Instant::now();
        let lr = schedule::lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr);
        let data = batches
            .recv()
            .context("the data-loading thread stopped unexpectedly")??;
        let s = cfg.model.img_size;
        let imgs = Tensor::from_vec(data, (cfg.batch_size, 3, s, s), self.device)?;
        // Waiting for the batch and copying it to the device (nothing on the CPU).
        self.waited += t0.elapsed();
        let mask = batch_mask(cfg, step);
        // Forward and backward (on the CPU in shards, see `step`); nothing is updated yet.
        let (loss, grads) = step::loss_and_grads(&self.model, &imgs, &mask)?;
        self.check_finite(step, lr, loss, &grads)?;
        self.opt.apply(&grads, lr)?;
        let done = step + 1;
        let ips = cfg.batch_size as f64 / t0.elapsed().as_secs_f64();
        let epoch = done as f64 / self.steps_per_epoch as f64;
        self.metrics.row([
            done.to_string(),
            format!("{epoch:.6}"),
            format!("{lr:.6e}"),
            format!("{loss:.6}"),
            format!("{ips:.2}"),
        ])?;
        if let (Some(log), Some(row)) = (self.fusion.as_mut(), fusion_row(done, &self.model)?) {
            log.row(&row)?;
        }
        self.progress.update(done, lr, loss, ips);
        if done.is_multiple_of(cfg.save_every) || done == cfg.steps {
            let (weights, state) = checkpoint_paths(&self.ckpt_dir, done);
            save_state(&state, &self.opt, cfg, done)?;
            checkpoint::save_weights(
                &weights,
                &cfg.model,
                &self.store,
                checkpoint_metadata(cfg, done)?,
            )?;
            self.last_good = Some(weights);
        }
        Ok(())
    }

    /// Stops before the update when the loss (or, in bf16, the gradient norm) is not finite.
    fn check_finite(
        &self,
        step: u64,
        lr: f64,
        loss: f64,
        grads: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        let last_good = || {
            self.last_good
                .as_ref()
                .map_or("none (no checkpoint was written yet)".to_string(), |p| {
                    p.display().to_string()
                })
        };
        if !loss.is_finite() {
            bail!(
                "loss is {loss} at step {} (lr {lr:.3e}); stopped before updating the weights. \
                 The last good checkpoint is {}. Lower --blr, lengthen --warmup-steps, or check \
                 the data",
                step + 1,
                last_good()
            );
        }
        if self.cfg.precision != TrainPrecision::F32 {
            // NaN guard: bf16 has f32's exponent range, so no loss scaling, but a product
            // that overflows or loses everything must not reach the f32 master weights.
            let norm = grad_norm(grads, &self.opt)?;
            if !norm.is_finite() {
                bail!(
                    "the gradient norm is {norm} at step {} ({} matmuls, loss {loss}); \
                     stopped before updating the weights. The last good checkpoint is {}. \
                     Start again with --precision f32, or lower --blr",
                    step + 1,
                    self.cfg.precision.name(),
                    last_good()
                );
            }
        }
        Ok(())
    }
}

/// The L2 norm of the gradients of the optimiser's parameters (non-finite when any entry is).
pub fn grad_norm(grads: &candle_core::backprop::GradStore, opt: &AdamW) -> Result<f64> {
    let mut total: Option<Tensor> = None;
    for var in opt.vars() {
        if let Some(g) = grads.get(var.as_tensor()) {
            let sq = g.to_dtype(DType::F32)?.sqr()?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + sq)?,
                None => sq,
            });
        }
    }
    Ok(match total {
        Some(t) => t.to_dtype(DType::F64)?.to_scalar::<f64>()?.sqrt(),
        None => 0.0,
    })
}

fn save_state(path: &Path, opt: &AdamW, cfg: &TrainConfig, step: u64) -> Result<()> {
    checkpoint::save_tensors(path, &opt.state_tensors(), checkpoint_metadata(cfg, step)?)
}

/// A progress bar on a terminal, a plain log line otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    first: u64,
    start: Instant,
    every: u64,
}

impl Progress {
    fn new(first: u64, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            b.set_position(first);
            b.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        Self {
            bar,
            total,
            first,
            start: Instant::now(),
            every: (total / 50).max(1),
        }
    }

    fn update(&self, done: u64, lr: f64, loss: f64, ips: f64) {
        let msg = format!("lr {lr:.3e} loss {loss:.4} {ips:.1} img/s");
        match &self.bar {
            Some(b) => {
                b.set_position(done);
                b.set_message(msg);
            }
            None if done.is_multiple_of(self.every) || done == self.total => {
                let per_step = self.start.elapsed().as_secs_f64() / (done - self.first) as f64;
                let eta = per_step * (self.total - done) as f64;
                crate::note!("step {done}/{} {msg} eta {eta:.0}s", self.total);
            }
            None => {}
        }
    }

    /// Replaces the bar by a plain line, so later messages start on a line of their own.
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
            crate::note!(
                "step {}/{} {} ({:.0}s)",
                b.position(),
                self.total,
                b.message(),
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}
