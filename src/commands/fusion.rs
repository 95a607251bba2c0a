//! `mimscope fusion`: MFF's fusion weights, over training (a run folder) or in checkpoints.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use crate::analysis::checkpoint_labels;
use crate::analysis::fusion::{weights_csv, weights_table, CheckpointWeights, Trajectory};
use crate::checkpoint::load_encoder;
use crate::checkpoint::ModelOverrides;
use crate::figures::charts::{save, FusionBars, FusionTrajectory};
use crate::output::write_atomic;
use crate::train::FUSION_FILE;

/// What `fusion` shows.
#[derive(Debug, Clone)]
pub struct FusionSettings {
    /// Run folders (each with `fusion_weights.csv`) or checkpoint files, not mixed.
    pub paths: Vec<PathBuf>,
    /// Where figures go; default: each run folder itself, or the current folder.
    pub out: Option<PathBuf>,
    /// Checkpoints: also write the table as CSV here.
    pub csv: Option<PathBuf>,
    /// Architecture of files without a stored config.
    pub overrides: ModelOverrides,
}

/// The trajectory logged in a run folder.
pub fn read_trajectory(run_dir: &Path) -> Result<Trajectory> {
    let path = run_dir.join(FUSION_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} ({} is not an MFF run folder with weighted fusion: only those log \
             fusion weights)",
            path.display(),
            run_dir.display()
        )
    })?;
    Trajectory::parse(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The fusion weights of a checkpoint, or a message saying why it has none.
pub fn checkpoint_weights(
    path: &Path,
    label: &str,
    overrides: &ModelOverrides,
) -> Result<std::result::Result<CheckpointWeights, String>> {
    let (loaded, _) = load_encoder(path, overrides, DType::F32, &Device::Cpu)?;
    let cfg = &loaded.model.cfg;
    let Some(fusion) = loaded.model.fusion() else {
        return Ok(Err(format!(
            "{}: no fusion weights: an MAE checkpoint (no fused layers)",
            path.display()
        )));
    };
    let Some(w) = fusion.weights()? else {
        return Ok(Err(format!(
            "{}: no fusion weights: MFF with attention fusion mixes layers with attention, not \
             scalar weights",
            path.display()
        )));
    };
    Ok(Ok(CheckpointWeights {
        checkpoint: label.to_string(),
        blocks: cfg.fused_blocks(),
        weights: w.to_dtype(DType::F64)?.to_vec1::<f64>()?,
    }))
}

/// Runs the command; returns what it printed on stdout.
pub fn run(s: &FusionSettings) -> Result<String> {
    if s.paths.is_empty() {
        bail!("give a run folder (its fusion_weights.csv) or one or more checkpoint files");
    }
    let dirs = s.paths.iter().filter(|p| p.is_dir()).count();
    if dirs > 0 && dirs < s.paths.len() {
        bail!("give either run folders or checkpoint files, not both");
    }
    if dirs > 0 {
        if s.csv.is_some() {
            bail!("--csv is for checkpoints; a run folder's table is already its {FUSION_FILE}");
        }
        let mut printed = String::new();
        for dir in &s.paths {
            let t = read_trajectory(dir)?;
            let out = s.out.clone().unwrap_or_else(|| dir.clone());
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let title = format!("fusion weights during training: {}", dir.display());
            let files = save(
                &FusionTrajectory {
                    trajectory: &t,
                    title: &title,
                },
                &out.join("fusion_weights"),
            )?;
            let last = t.weights.last().cloned().unwrap_or_default();
            printed += &format!(
                "{}: {} steps; final weights {}\n",
                dir.display(),
                t.steps.last().copied().unwrap_or(0),
                t.blocks
                    .iter()
                    .zip(&last)
                    .map(|(b, w)| format!("block {b}: {w:.4}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for f in files {
                printed += &format!("wrote {}\n", f.display());
            }
        }
        return Ok(printed);
    }
    let paths: Vec<&Path> = s.paths.iter().map(PathBuf::as_path).collect();
    let labels = checkpoint_labels(&paths);
    let mut rows = Vec::new();
    let mut printed = String::new();
    for (p, l) in paths.iter().zip(&labels) {
        match checkpoint_weights(p, l, &s.overrides)? {
            Ok(r) => rows.push(r),
            Err(msg) => printed += &format!("{msg}\n"),
        }
    }
    if rows.is_empty() {
        bail!("{}none of the checkpoints has fusion weights", printed);
    }
    printed += &weights_table(&rows);
    if let Some(csv) = &s.csv {
        write_atomic(csv, weights_csv(&rows)?.as_bytes())?;
        printed += &format!("wrote {}\n", csv.display());
    }
    let out = s.out.clone().unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for f in save(&FusionBars { rows: &rows }, &out.join("fusion_bars"))? {
        printed += &format!("wrote {}\n", f.display());
    }
    Ok(printed)
}
