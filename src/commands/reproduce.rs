//! `mimscope reproduce`: the main job. Trains MAE and MFF-MAE `tiny` with the same seed, data,
//! augmentation and budget, runs the three analyses on both, and writes `report.md` with every
//! figure and a summary table.
//!
//! Every stage goes through the same argument parsing as the command line (the argument list
//! is printed), so each can be rerun by hand. Rerunning `reproduce` with the same `--out`
//! skips finished training runs and resumes unfinished ones; the analyses are recomputed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::analysis::fusion::CheckpointWeights;
use crate::analysis::spectrum::Curve;
use crate::cli::{Command, ReproduceArgs};
use crate::figures::charts::median;
use crate::output::{write_atomic, CsvTable};
use crate::train::{FINAL_FILE, METRICS_FILE};

use super::hessian::HessianReport;

/// The work done for a budget of 1 (the default, sized to finish within 10 minutes on a
/// 2-core CPU); `--budget` scales training steps and Hessian batches.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub steps: u64,
    pub batch_size: usize,
    pub spectrum_images: usize,
    pub hessian_batches: usize,
    pub hessian_batch_size: usize,
    pub hessian_max_iters: usize,
}

impl Plan {
    pub fn for_budget(budget: f64) -> Result<Plan> {
        if !(budget.is_finite() && budget > 0.0) {
            bail!("--budget {budget} must be a positive number (1 = the 10-minute default)");
        }
        let scale = |x: f64| (x * budget).round().max(1.0);
        Ok(Plan {
            steps: scale(200.0) as u64,
            batch_size: 32,
            spectrum_images: 64,
            hessian_batches: scale(4.0) as usize,
            hessian_batch_size: 8,
            hessian_max_iters: 20,
        })
    }
}

/// What a reproduction found, as put in the report.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub curves: Vec<Curve>,
    pub hessian: HessianReport,
    pub fusion: Option<CheckpointWeights>,
    /// (mean loss over the last 10% of steps, last loss) of MAE and MFF.
    pub losses: [(f64, f64); 2],
}

fn parse(args: &[String]) -> Result<Command> {
    crate::note!("\n== {}", args[1..].join(" "));
    super::parse_command_line(args)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Runs the reproduction into `args.out`.
pub fn run(args: &ReproduceArgs) -> Result<Outcome> {
    let plan = Plan::for_budget(args.budget)?;
    let out = &args.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    let mut st = Stages::new(args, plan);
    let runs = [out.join("mae"), out.join("mff")];
    for (kind, dir) in ["mae", "mff"].iter().zip(&runs) {
        st.timed(format!("train {kind}"), |st| st.train(kind, dir))?;
    }
    let finals: Vec<PathBuf> = runs.iter().map(|r| r.join(FINAL_FILE)).collect();
    let curves = st.timed("spectrum".to_string(), |st| st.spectrum(&finals))?;
    let fusion = st.timed("fusion".to_string(), |st| st.fusion(&runs[1], &finals[1]))?;
    let hessian = st.timed("hessian".to_string(), |st| st.hessian(&finals))?;

    let losses = [final_loss(&runs[0])?, final_loss(&runs[1])?];
    let outcome = Outcome {
        curves,
        hessian,
        fusion,
        losses,
    };
    st.timings
        .push(("total".to_string(), started.elapsed().as_secs_f64()));
    let report = report(args, &st.plan, &outcome, &st.timings);
    write_atomic(&out.join("report.md"), report.as_bytes())?;
    crate::note!("\n{report}");
    crate::note!("report: {}", out.join("report.md").display());
    Ok(outcome)
}

/// The stages of a reproduction: each builds its command line, parses it as the command line
/// would and runs it; the time each took goes into the report.
struct Stages<'a> {
    args: &'a ReproduceArgs,
    plan: Plan,
    /// `--seed`, `--device` and (when given) `--data`, as train and hessian take them.
    common: Vec<String>,
    /// (stage, seconds).
    timings: Vec<(String, f64)>,
}

impl<'a> Stages<'a> {
    fn new(args: &'a ReproduceArgs, plan: Plan) -> Self {
        let mut common = strings(&[
            "--seed",
            &args.seed.to_string(),
            "--device",
            &args.device.device,
        ]);
        if let Some(d) = &args.data {
            common.extend(["--data".to_string(), d.display().to_string()]);
        }
        Stages {
            args,
            plan,
            common,
            timings: Vec::new(),
        }
    }

    /// Runs one stage and records its time.
    fn timed<T>(&mut self, stage: String, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let value = f(self)?;
        self.timings.push((stage, t.elapsed().as_secs_f64()));
        Ok(value)
    }

    /// Trains (or continues, or skips when finished) the `kind` run in `dir`.
    fn train(&self, kind: &str, dir: &Path) -> Result<()> {
        let (args, plan) = (self.args, &self.plan);
        let mut a = strings(&[
            "mimscope",
            "train",
            "--model",
            kind,
            "--preset",
            "tiny",
            "--steps",
            &plan.steps.to_string(),
            "--batch-size",
            &plan.batch_size.to_string(),
            "--augment",
            &args.augment,
            "--blr",
            &args.blr.to_string(),
            "--out",
            &dir.display().to_string(),
        ]);
        a.extend(self.common.clone());
        let Command::Train(train) = parse(&a)? else {
            bail!("internal: the train command line parsed as another command");
        };
        super::train_or_continue(&train)
    }

    fn spectrum(&self, finals: &[PathBuf]) -> Result<Vec<Curve>> {
        let args = self.args;
        let mut a = strings(&[
            "mimscope",
            "spectrum",
            "--images",
            &self.plan.spectrum_images.to_string(),
        ]);
        a.extend(checkpoint_args(finals));
        a.extend([
            "--out".to_string(),
            args.out.join("spectrum").display().to_string(),
        ]);
        a.extend(strings(&["--device", &args.device.device]));
        if let Some(d) = &args.data {
            a.extend(["--data".to_string(), d.display().to_string()]);
        }
        let Command::Spectrum(sp) = parse(&a)? else {
            bail!("internal: the spectrum command line parsed as another command");
        };
        super::spectrum::run(&sp.settings(), &sp.device.device()?)
    }

    /// Plots the MFF run's logged weights; returns its final checkpoint's weights.
    fn fusion(&self, mff_run: &Path, mff_final: &Path) -> Result<Option<CheckpointWeights>> {
        let fusion_dir = self.args.out.join("fusion");
        let a = strings(&[
            "mimscope",
            "fusion",
            "--out",
            &fusion_dir.display().to_string(),
            &mff_run.display().to_string(),
        ]);
        super::execute(parse(&a)?)?;
        Ok(super::fusion::checkpoint_weights(mff_final, "mff/final", &Default::default())?.ok())
    }

    fn hessian(&self, finals: &[PathBuf]) -> Result<HessianReport> {
        let plan = &self.plan;
        let mut a = strings(&[
            "mimscope",
            "hessian",
            "--batches",
            &plan.hessian_batches.to_string(),
            "--batch-size",
            &plan.hessian_batch_size.to_string(),
            "--micro-batch",
            &plan.hessian_batch_size.to_string(),
            "--max-iters",
            &plan.hessian_max_iters.to_string(),
            "--out",
            &self.args.out.join("hessian").display().to_string(),
        ]);
        a.extend(checkpoint_args(finals));
        a.extend(self.common.clone());
        let Command::Hessian(h) = parse(&a)? else {
            bail!("internal: the hessian command line parsed as another command");
        };
        super::hessian::run(&h.settings(), &h.device.device()?)
    }
}

/// `--checkpoint FILE` for each of `finals`.
fn checkpoint_args(finals: &[PathBuf]) -> Vec<String> {
    finals
        .iter()
        .flat_map(|f| ["--checkpoint".to_string(), f.display().to_string()])
        .collect()
}

/// (mean over the last 10% of logged steps, last) training loss of a run.
fn final_loss(run: &Path) -> Result<(f64, f64)> {
    let path = run.join(METRICS_FILE);
    let table = CsvTable::read(&path)?;
    let column = table
        .column("loss")
        .with_context(|| format!("{} has no `loss` column", path.display()))?;
    let losses: Vec<f64> = table
        .rows
        .iter()
        .filter_map(|r| r.get(column)?.parse().ok())
        .collect();
    let Some(&last) = losses.last() else {
        bail!("{} has no rows", path.display());
    };
    let tail = &losses[losses.len() - (losses.len() / 10).max(1)..];
    Ok((tail.iter().sum::<f64>() / tail.len() as f64, last))
}

fn high_freq(curves: &[Curve], checkpoint: &str, layer: &str) -> Option<f64> {
    curves
        .iter()
        .find(|c| c.checkpoint == checkpoint && c.layer.name == layer)
        .map(Curve::high_freq)
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.4}"))
}

/// The numbers the report's summary and findings both quote.
struct Headline {
    /// The last block's layer name (its index).
    last: String,
    /// High-frequency Δ log amplitude: MAE's and MFF's last block, MFF's fused output.
    hf_mae: Option<f64>,
    hf_mff: Option<f64>,
    hf_fused: Option<f64>,
    /// Top Hessian eigenvalue per batch, and its median, of MAE and of MFF.
    top_mae: Vec<f64>,
    med_mae: f64,
    med_mff: f64,
}

const MAE: &str = "mae/final";
const MFF: &str = "mff/final";

impl Headline {
    fn of(o: &Outcome) -> Headline {
        let last = o
            .curves
            .iter()
            .filter(|c| c.checkpoint == MAE)
            .filter_map(|c| c.layer.name.parse::<usize>().ok())
            .max()
            .unwrap_or(0)
            .to_string();
        let (top_mae, top_mff) = (o.hessian.top(MAE), o.hessian.top(MFF));
        Headline {
            hf_mae: high_freq(&o.curves, MAE, &last),
            hf_mff: high_freq(&o.curves, MFF, &last),
            hf_fused: high_freq(&o.curves, MFF, "fused"),
            last,
            med_mae: median(&top_mae),
            med_mff: median(&top_mff),
            top_mae,
        }
    }
}

/// The report's Markdown: what was run, the summary table, the paper's three findings, the
/// figures, the files and the time of each stage.
pub fn report(args: &ReproduceArgs, plan: &Plan, o: &Outcome, timings: &[(String, f64)]) -> String {
    let h = Headline::of(o);
    let mut s = String::new();
    s += &setup_paragraph(args, plan, o);
    s += &summary_table(o, &h);
    s += &findings(o, &h);
    s += &figures_and_files(timings);
    s
}

/// The title and the paragraph saying what both models ran on.
fn setup_paragraph(args: &ReproduceArgs, plan: &Plan, o: &Outcome) -> String {
    let data = args
        .data
        .as_ref()
        .map_or("the bundled photos".to_string(), |d| {
            d.display().to_string()
        });
    let mut s = String::new();
    s += "# MAE vs MFF-MAE: the MFF paper's three analyses at `tiny` scale\n\n";
    s += &format!(
        "Both models: preset `tiny`, {} steps of {} images from {data}, `{}` augmentation, blr {}, seed {}, \
         mask ratio 0.75; they differ only in the fusion. Spectra on the first {} images \
         (unmasked encoder); Hessian on {} fixed batches of {} images with fixed masks, \
         identical for both models ({}, top eigenvalue by power iteration, at most {} \
         products, tolerance 1e-3).\n\n",
        plan.steps,
        plan.batch_size,
        args.augment,
        args.blr,
        args.seed,
        plan.spectrum_images,
        plan.hessian_batches,
        plan.hessian_batch_size,
        o.hessian.method,
        plan.hessian_max_iters,
    );
    s
}

/// The summary table: loss, high-frequency amplitude, Hessian, product cost, fusion weights.
fn summary_table(o: &Outcome, h: &Headline) -> String {
    let (hf_mae, hf_mff, hf_fused) = (h.hf_mae, h.hf_mff, h.hf_fused);
    let (last, top_mae, med_mae, med_mff) = (&h.last, &h.top_mae, h.med_mae, h.med_mff);
    let (mae, mff) = (MAE, MFF);
    let mut s = String::new();
    s += "## Summary\n\n| | MAE | MFF |\n|---|---|---|\n";
    s += &format!(
        "| training loss, mean of the last 10% of steps (last step) | {:.4} ({:.4}) | {:.4} ({:.4}) |\n",
        o.losses[0].0, o.losses[0].1, o.losses[1].0, o.losses[1].1
    );
    s += &format!(
        "| high-frequency Δ log amplitude, last block (layer {last}) | {} | {} |\n",
        fmt(hf_mae),
        fmt(hf_mff)
    );
    s += &format!(
        "| high-frequency Δ log amplitude, encoder output (MFF: fused, before the norm) | {} | {} |\n",
        fmt(hf_mae),
        fmt(hf_fused)
    );
    s += &format!(
        "| median top Hessian eigenvalue over {} batches | {med_mae:.4} | {med_mff:.4} |\n",
        top_mae.len()
    );
    let cost = |ck: &str| {
        o.hessian
            .costs
            .iter()
            .find(|c| c.checkpoint == ck)
            .map_or("-".to_string(), |c| {
                format!(
                    "{:.1} ({:.2} s / {:.2} s)",
                    c.hvp_s / c.gradient_s,
                    c.hvp_s,
                    c.gradient_s
                )
            })
    };
    s += &format!(
        "| one Hessian-vector product, in gradients (seconds) | {} | {} |\n",
        cost(mae),
        cost(mff)
    );
    let weights = o.fusion.as_ref().map_or("-".to_string(), |f| {
        f.blocks
            .iter()
            .zip(&f.weights)
            .map(|(b, w)| format!("block {b}: {w:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    s += &format!("| final fusion weights (softmax) | - | {weights} |\n\n");

    s
}

/// The paper's three findings, each answered from the numbers.
fn findings(o: &Outcome, h: &Headline) -> String {
    let (hf_mae, hf_mff, hf_fused) = (h.hf_mae, h.hf_mff, h.hf_fused);
    let (med_mae, med_mff) = (h.med_mae, h.med_mff);
    let mut s = String::new();
    s += "## The paper's findings at this scale\n\n";
    s += "Computed from the numbers above, not forced: at a few hundred steps on ~100 photos \
          these are small-sample observations, not a replication.\n\n";
    if let Some(f) = &o.fusion {
        let n = f.weights.len() as f64;
        let shallow: f64 = f.weights[..f.weights.len() - 1].iter().sum();
        let init = (n - 1.0) / n;
        s += &format!(
            "1. **Weights move to shallow layers?** The shallow layers' total weight is {shallow:.4} \
             against {init:.4} at initialisation ({}{:.2e}): {}.\n",
            if shallow >= init { "+" } else { "" },
            shallow - init,
            if (shallow - init).abs() < 0.01 {
                "not visibly: the weights stayed within 0.01 of uniform"
            } else if shallow > init {
                "yes, in the direction the paper reports"
            } else {
                "no, the last layer gained weight"
            }
        );
    }
    if let (Some(a), Some(b)) = (hf_mae, hf_fused.or(hf_mff)) {
        s += &format!(
            "2. **Less high-frequency amplitude with MFF?** Encoder output: MFF {b:.4} vs MAE \
             {a:.4} ({}).\n",
            if b < a {
                "yes, MFF's is lower"
            } else {
                "no, MFF's is not lower"
            }
        );
    }
    s += &format!(
        "3. **Smaller top eigenvalue with MFF?** Median MFF {med_mff:.4} vs MAE {med_mae:.4} ({}).\n\n",
        if med_mff.abs() < med_mae.abs() {
            "yes, MFF's is smaller"
        } else {
            "no, MFF's is not smaller"
        }
    );

    s
}

/// The figures, the list of files and the time table.
fn figures_and_files(timings: &[(String, f64)]) -> String {
    let mut s = String::new();
    s += "## Figures\n\n";
    for (title, path) in [
        (
            "Relative log amplitude of every layer (colour: depth)",
            "spectrum/spectrum.png",
        ),
        (
            "High-frequency amplitude against depth",
            "spectrum/depth.png",
        ),
        (
            "MFF fusion weights during training",
            "fusion/fusion_weights.png",
        ),
        (
            "Top Hessian eigenvalue over batches",
            "hessian/eigenvalues.png",
        ),
        (
            "MAE reconstructions (original, masked, reconstruction)",
            "mae/reconstruction/reconstruction.png",
        ),
        (
            "MFF reconstructions",
            "mff/reconstruction/reconstruction.png",
        ),
    ] {
        s += &format!("### {title}\n\n![{title}]({path})\n\n");
    }
    s += "## Files\n\n- `mae/`, `mff/`: the training runs (config, metrics.csv, checkpoints, \
          final.safetensors)\n- `spectrum/spectrum.csv`, `spectrum/depth.csv`\n- \
          `mff/fusion_weights.csv`\n- `hessian/hessian.csv`, `hessian/batches.safetensors` \
          (the exact inputs and masks), `hessian/hessian_info.json`\n\n## Time\n\n| stage | seconds |\n|---|---|\n";
    for (stage, secs) in timings {
        s += &format!("| {stage} | {secs:.0} |\n");
    }
    s
}
