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
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::{self, checkpoint_paths, latest_checkpoint};
use crate::config::{TrainConfig, TrainPrecision};
use crate::data::Dataset;
use crate::model::{Mae, Mask};
use crate::output::write_atomic;
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

/// A CSV file appended to row by row and flushed after each row.
struct Csv {
    file: std::fs::File,
}

impl Csv {
    /// Opens `path` for appending; a fresh file gets `header`. On resume, rows after
    /// `keep_through` (written after the checkpoint, or cut off by a kill) are dropped first.
    fn open(path: &Path, header: &str, keep_through: Option<u64>) -> Result<Self> {
        if let Some(step) = keep_through {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let mut kept = String::new();
            for (i, line) in text.split_inclusive('\n').enumerate() {
                let complete = line.ends_with('\n');
                let row_step = line.split(',').next().and_then(|s| s.parse::<u64>().ok());
                if (i == 0 && line.trim_end() == header)
                    || (complete && row_step.is_some_and(|s| s <= step))
                {
                    kept.push_str(line);
                }
            }
            if kept.is_empty() {
                kept = format!("{header}\n");
            }
            write_atomic(path, kept.as_bytes())?;
        } else {
            write_atomic(path, format!("{header}\n").as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    fn row(&mut self, line: &str) -> Result<()> {
        self.file.write_all(format!("{line}\n").as_bytes())?;
        self.file.flush()?;
        Ok(())
    }
}

fn fusion_row(step: u64, model: &Mae) -> Result<Option<String>> {
    let Some(w) = model.fusion().map(|f| f.weights()).transpose()?.flatten() else {
        return Ok(None);
    };
    let w = w.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let cols: Vec<String> = w.iter().map(|v| format!("{v:.8}")).collect();
    Ok(Some(format!("{step},{}", cols.join(","))))
}

fn fusion_header(cfg: &TrainConfig) -> String {
    let cols: Vec<String> = cfg
        .model
        .fused_blocks()
        .iter()
        .map(|b| format!("layer_{b}"))
        .collect();
    format!("step,{}", cols.join(","))
}

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
        Start::Fresh(cfg, dataset) => {
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
            std::fs::create_dir_all(&ckpt_dir)
                .with_context(|| format!("creating {}", ckpt_dir.display()))?;
            write_atomic(
                &run_dir.join(CONFIG_FILE),
                serde_json::to_string_pretty(&cfg)?.as_bytes(),
            )?;
            (cfg, dataset)
        }
        Start::Resume => {
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
                eprintln!(
                    "warning: the run started with {} usable images and now finds {}: the \
                     resumed run will not draw the batches the original would have",
                    cfg.dataset_size,
                    dataset.len()
                );
            }
            (cfg, dataset)
        }
    };
    if resuming && run_dir.join(FINAL_FILE).exists() {
        bail!(
            "run {} is already complete ({} exists); start a new run with another --out",
            run_dir.display(),
            FINAL_FILE
        );
    }

    eprintln!(
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

    // Model and optimiser, fresh or from the newest checkpoint.
    let resume_step = if resuming {
        latest_checkpoint(&ckpt_dir)?
    } else {
        None
    };
    let (model, store, mut opt) = match resume_step {
        Some(step) => {
            let (weights, state) = checkpoint_paths(&ckpt_dir, step);
            let loaded = checkpoint::load_model(&weights, DType::F32, device)?;
            let mut opt = AdamW::new(loaded.store.trainable(), cfg.weight_decay, cfg.decay_rule())?;
            let st = checkpoint::load_tensors(&state, DType::F32, device)?;
            opt.load_state(&st.tensors, step)
                .map_err(|e| anyhow::anyhow!("{}: {e}", state.display()))?;
            eprintln!("resuming from {} (step {step})", weights.display());
            (loaded.model, loaded.store, opt)
        }
        None => {
            if resuming {
                eprintln!(
                    "no checkpoint in {} yet: starting the run over",
                    ckpt_dir.display()
                );
            }
            let (model, store) = Mae::init(&cfg.model, cfg.seed, DType::F32, device)?;
            let opt = AdamW::new(store.trainable(), cfg.weight_decay, cfg.decay_rule())?;
            (model, store, opt)
        }
    };
    let mut model = model;
    model.set_matmul_dtype(cfg.precision.matmul_dtype());
    let first = resume_step.unwrap_or(0);
    let (decayed, undecayed) = opt.groups();
    eprintln!(
        "optimiser: AdamW betas (0.9, 0.95), weight decay {} on {} tensors, none on {}: {}",
        cfg.weight_decay,
        decayed.len(),
        undecayed.len(),
        cfg.decay_rule().describe()
    );
    eprintln!(
        "schedule: lr {:.3e} = blr {:.3e} x batch {} / 256, {} warmup steps then half-cosine over {} steps",
        cfg.lr, cfg.blr, cfg.batch_size, cfg.warmup_steps, cfg.steps
    );

    // Resuming from a checkpoint keeps the CSV rows up to it; otherwise the files start anew.
    let keep = resume_step;
    let mut metrics = Csv::open(
        &run_dir.join(METRICS_FILE),
        "step,epoch,lr,loss,images_per_s",
        keep,
    )?;
    let mut fusion = match fusion_row(first, &model)? {
        Some(row0) => {
            let mut csv = Csv::open(&run_dir.join(FUSION_FILE), &fusion_header(&cfg), keep)?;
            if keep.is_none() {
                csv.row(&row0)?;
            }
            Some(csv)
        }
        None => None,
    };

    let steps_per_epoch = cfg.steps_per_epoch(dataset.len());
    let progress = Progress::new(first, cfg.steps);
    let mut last_good = resume_step.map(|s| checkpoint_paths(&ckpt_dir, s).0);
    let started = Instant::now();
    let mut waited = std::time::Duration::ZERO;
    // Batches are decoded and augmented on a producer thread, PREFETCH steps ahead of the
    // optimiser. Each batch is a pure function of (seed, step), so this changes no result.
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<f32>>>(PREFETCH);
        let (ds, c) = (&dataset, &cfg);
        scope.spawn(move || {
            for step in first..c.steps {
                let batch = ds.train_batch(
                    step,
                    c.batch_size,
                    c.model.img_size as u32,
                    c.augment,
                    c.seed,
                );
                // A closed channel means the loop stopped (an error): nothing more to build.
                if tx.send(batch).is_err() {
                    break;
                }
            }
        });
        let s = cfg.model.img_size;
        for step in first..cfg.steps {
            let t0 = Instant::now();
            let lr = schedule::lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr);
            let data = rx
                .recv()
                .context("the data-loading thread stopped unexpectedly")??;
            let imgs = Tensor::from_vec(data, (cfg.batch_size, 3, s, s), device)?;
            // Waiting for the batch and copying it to the device (nothing on the CPU).
            waited += t0.elapsed();
            let mask = batch_mask(&cfg, step);
            // Forward and backward (on the CPU in shards, see `step`); nothing is updated yet.
            let (loss, grads) = step::loss_and_grads(&model, &imgs, &mask)?;
            if !loss.is_finite() {
                bail!(
                "loss is {loss} at step {} (lr {lr:.3e}); stopped before updating the weights. \
                 The last good checkpoint is {}. Lower --blr, lengthen --warmup-steps, or check \
                 the data",
                step + 1,
                last_good
                    .as_ref()
                    .map_or("none (no checkpoint was written yet)".to_string(), |p| p
                        .display()
                        .to_string())
            );
            }
            if cfg.precision != TrainPrecision::F32 {
                // NaN guard: bf16 has f32's exponent range, so no loss scaling, but a product
                // that overflows or loses everything must not reach the f32 master weights.
                let norm = grad_norm(&grads, &opt)?;
                if !norm.is_finite() {
                    bail!(
                        "the gradient norm is {norm} at step {} ({} matmuls, loss {loss}); \
                         stopped before updating the weights. The last good checkpoint is {}. \
                         Start again with --precision f32, or lower --blr",
                        step + 1,
                        cfg.precision.name(),
                        last_good
                            .as_ref()
                            .map_or("none (no checkpoint was written yet)".to_string(), |p| p
                                .display()
                                .to_string())
                    );
                }
            }
            opt.apply(&grads, lr)?;
            let done = step + 1;
            let ips = cfg.batch_size as f64 / t0.elapsed().as_secs_f64();
            let epoch = done as f64 / steps_per_epoch as f64;
            metrics.row(&format!("{done},{epoch:.6},{lr:.6e},{loss:.6},{ips:.2}"))?;
            if let (Some(csv), Some(row)) = (fusion.as_mut(), fusion_row(done, &model)?) {
                csv.row(&row)?;
            }
            progress.update(done, lr, loss, ips);
            if done % cfg.save_every == 0 || done == cfg.steps {
                let (weights, state) = checkpoint_paths(&ckpt_dir, done);
                save_state(&state, &opt, &cfg, done)?;
                checkpoint::save_weights(
                    &weights,
                    &cfg.model,
                    &store,
                    checkpoint_metadata(&cfg, done)?,
                )?;
                last_good = Some(weights);
            }
        }
        Ok(())
    })?;
    progress.finish();
    let total = started.elapsed().as_secs_f64();
    if total > 0.0 && cfg.steps > first {
        eprintln!(
            "data: the steps waited {:.1} s for batches (and their copy to the device), {:.1}% \
             of {total:.1} s of training",
            waited.as_secs_f64(),
            100.0 * waited.as_secs_f64() / total
        );
    }
    let final_path = run_dir.join(FINAL_FILE);
    checkpoint::save_weights(
        &final_path,
        &cfg.model,
        &store,
        checkpoint_metadata(&cfg, cfg.steps)?,
    )?;
    eprintln!("final checkpoint: {}", final_path.display());
    Ok((final_path, cfg))
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
                eprintln!("step {done}/{} {msg} eta {eta:.0}s", self.total);
            }
            None => {}
        }
    }

    /// Replaces the bar by a plain line, so later messages start on a line of their own.
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
            eprintln!(
                "step {}/{} {} ({:.0}s)",
                b.position(),
                self.total,
                b.message(),
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}
