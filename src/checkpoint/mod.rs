//! Checkpoints: safetensors files with facebookresearch/mae's state-dict names.
//!
//! A weights file holds every model tensor under its MAE key (MFF adds `proj_layers.{k}.*` and
//! `proj_weights`, attention fusion `fusion_attn.*`) and `__metadata__["config"]`, the
//! [`ModelConfig`] JSON, so a checkpoint rebuilds its model alone and PyTorch reads it with
//! `safetensors.torch.load_file`. Training state (AdamW moments and the step) lives in a second
//! file beside it. Every file is written to a temporary name, synced, then renamed, so a crash
//! never leaves a half-written checkpoint under the final name.
//!
//! [`load_model`] also reads checkpoints written by other code (PyTorch `.pth`, mmpretrain key
//! names, no stored config) through [`import::import`].
//!
//! The folder: this file (our own safetensors checkpoints and the models built from them),
//! [`pth`] (the torch zip reader), [`import`] (foreign files and key renames), [`infer`] (the
//! config from tensor shapes, [`ModelOverrides`]) and [`describe`] (config lines and parameter
//! counts, for reports). Nothing here imports `commands`.

pub mod describe;
pub mod import;
pub mod infer;
pub mod pth;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::model::{Mae, ParamStore};
use import::{encoder_only_error, Imported};
pub use infer::ModelOverrides;

/// Metadata key of the model config JSON.
pub const CONFIG_KEY: &str = "config";

/// A loaded safetensors file.
#[derive(Debug)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

/// Saves tensors (converted to contiguous CPU f32) with metadata, atomically.
pub fn save_tensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                t.to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .contiguous()?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    let bytes = safetensors::serialize(cpu.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
        .with_context(|| format!("serialising {}", path.display()))?;
    crate::output::write_atomic(path, &bytes)
}

/// Reads a safetensors file; every tensor is converted to `dtype` on `device`.
pub fn load_tensors(path: &Path, dtype: DType, device: &Device) -> Result<TensorFile> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "reading checkpoint {} (does the file exist?)",
            path.display()
        )
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| {
        format!(
            "{} is not a safetensors file (truncated or another format?)",
            path.display()
        )
    })?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let raw = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("decoding the tensors of {}", path.display()))?;
    let mut tensors = BTreeMap::new();
    for (k, t) in raw {
        tensors.insert(k, t.to_dtype(dtype)?.to_device(device)?);
    }
    Ok(TensorFile { tensors, metadata })
}

/// Saves a model's weights with its config.
pub fn save_weights(
    path: &Path,
    cfg: &ModelConfig,
    store: &ParamStore,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    metadata.insert(CONFIG_KEY.to_string(), cfg.to_json()?);
    save_tensors(path, &store.tensors(), metadata)
}

/// A model loaded from a checkpoint.
pub struct Loaded {
    pub model: Mae,
    pub store: ParamStore,
    pub metadata: HashMap<String, String>,
}

/// Loads a weights file, rebuilds its model from the stored config, and checks every tensor
/// name and shape both ways. Besides mimscope's safetensors, it reads PyTorch `.pth` files and
/// safetensors without a stored config, in facebookresearch/mae or mmpretrain key names, with
/// the config inferred from the shapes and defaults (see [`import`] and [`infer`]); notes on what was
/// assumed go to stderr. For the fields shapes cannot tell, use [`load_model_with`].
pub fn load_model(path: &Path, dtype: DType, device: &Device) -> Result<Loaded> {
    load_model_with(path, &ModelOverrides::default(), dtype, device)
}

/// [`load_model`] with the architecture fields that a file without a stored config cannot tell
/// (heads, fused blocks, norm_pix_loss); they also override a stored config.
pub fn load_model_with(
    path: &Path,
    overrides: &ModelOverrides,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    let imported = import_noting(path, overrides, dtype, device)?;
    if imported.encoder_only {
        return Err(encoder_only_error(path));
    }
    loaded(path, imported, dtype, device)
}

/// [`import::import`], printing its notes on what was assumed.
fn import_noting(
    path: &Path,
    overrides: &ModelOverrides,
    dtype: DType,
    device: &Device,
) -> Result<Imported> {
    let imported = import::import(path, overrides, dtype, device)?;
    for note in &imported.notes {
        crate::note!("note: {note}");
    }
    if imported.inferred.is_some() {
        crate::note!(
            "note: {} stores no mimscope config; inferred {}",
            path.display(),
            imported.cfg.to_json()?
        );
    }
    Ok(imported)
}

/// The model built from an import.
fn loaded(path: &Path, imported: Imported, dtype: DType, device: &Device) -> Result<Loaded> {
    let (model, store) = build_model(path, &imported.cfg, imported.tensors, dtype, device)?;
    Ok(Loaded {
        model,
        store,
        metadata: imported.metadata,
    })
}

/// The model of `cfg` on `tensors` (MAE names) read from `path`, every tensor name and shape
/// checked both ways.
pub fn build_model(
    path: &Path,
    cfg: &ModelConfig,
    tensors: BTreeMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<(Mae, ParamStore)> {
    let store = ParamStore::from_tensors(tensors)?;
    let model = Mae::from_store(cfg, &store, dtype, device).map_err(|e| {
        anyhow::anyhow!(
            "{} does not match its config ({}): {e}",
            path.display(),
            cfg.to_json().unwrap_or_default()
        )
    })?;
    Ok((model, store))
}

/// For analyses of the encoder alone (spectra, fusion weights): [`load_model_with`], except that a
/// file holding only the encoder (MAE's released `mae_pretrain_vit_*.pth`) gets zero
/// placeholders for the decoder, which these analyses never run. The flag says which happened.
pub fn load_encoder(
    path: &Path,
    overrides: &ModelOverrides,
    dtype: DType,
    device: &Device,
) -> Result<(Loaded, bool)> {
    let mut imported = import_noting(path, overrides, dtype, device)?;
    let encoder_only = imported.encoder_only;
    if encoder_only {
        crate::note!(
            "note: {} holds the encoder only; its decoder is zero placeholders, never run",
            path.display()
        );
        imported
            .tensors
            .extend(decoder_placeholders(&imported.cfg)?);
    }
    Ok((loaded(path, imported, dtype, device)?, encoder_only))
}

/// Zero placeholders for the decoder of `cfg` (`decoder_*` and `mask_token`, drawn from a
/// one-block model of the same decoder, then zeroed), so that an encoder-only file can be built
/// into a whole model.
pub fn decoder_placeholders(cfg: &ModelConfig) -> Result<BTreeMap<String, Tensor>> {
    let scratch = ModelConfig {
        depth: 1,
        fuse_layers: Vec::new(),
        ..cfg.clone()
    };
    let (_, store) = Mae::init(&scratch, 0, DType::F32, &Device::Cpu)?;
    let mut out = BTreeMap::new();
    for (name, t) in store.tensors() {
        if name == "mask_token" || name.starts_with("decoder_") {
            out.insert(name, t.zeros_like()?);
        }
    }
    Ok(out)
}

/// File names of the checkpoint after `step` optimiser steps.
pub fn checkpoint_paths(dir: &Path, step: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("step_{step:07}.safetensors")),
        dir.join(format!("step_{step:07}.state.safetensors")),
    )
}

/// The newest complete checkpoint in `dir`: the highest step whose weights and state both exist.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<u64>> {
    if !dir.exists() {
        return Ok(None);
    }
    let mut best = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step_")
            .and_then(|s| s.strip_suffix(".state.safetensors"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let (weights, _) = checkpoint_paths(dir, step);
        if weights.exists() && best.is_none_or(|b| step > b) {
            best = Some(step);
        }
    }
    Ok(best)
}
