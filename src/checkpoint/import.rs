//! Checkpoints written by other code: facebookresearch/mae and mmpretrain key names, `.pth` or
//! safetensors, with or without a stored mimscope config.
//!
//! [`import`] is the one entry point: it reads the file ([`super::pth`] for `.pth` archives),
//! renames mmpretrain keys to MAE's ([`mmpretrain_key`], docs/reference.md sections 1-2), and takes
//! the config from the file's `config` metadata (with [`ModelOverrides`] applied on top) or
//! infers it from the tensor shapes ([`super::infer`], which documents the three fields shapes
//! cannot tell and their defaults).
//!
//! A file without decoder tensors (MAE's released `mae_pretrain_vit_*.pth`) imports with
//! [`Imported::encoder_only`] set: `inspect` reads it, but the model is always built whole, so
//! [`super::load_model`] and `convert` refuse it with [`encoder_only_error`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::infer::{apply_overrides, has_decoder, infer_config, ModelOverrides};
use super::pth::{self, Format};
use super::{load_tensors, CONFIG_KEY};
use crate::config::ModelConfig;

/// The key naming of a state dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// facebookresearch/mae's names, which are mimscope's.
    Mae,
    /// mmpretrain's `MAE` / `MFF` models: `backbone.*` (MAEViT / MFFViT) and `neck.*`
    /// (MAEPretrainDecoder).
    Mmpretrain,
}

/// What an mmpretrain state-dict key becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MmKey {
    /// The MAE name of the tensor.
    Renamed(String),
    /// A buffer mimscope's model has no use for, with the reason it can be skipped.
    Ignored(&'static str),
    /// Not part of an MAE / MFF pre-training model.
    Unknown,
}

/// Buffers that mmpretrain models may save and mimscope does not need.
const IGNORED_BUFFERS: [(&str, &str); 2] = [
    (
        "data_preprocessor.mean",
        "the data preprocessor's normalisation constants (mimscope normalises with ImageNet's)",
    ),
    (
        "data_preprocessor.std",
        "the data preprocessor's normalisation constants (mimscope normalises with ImageNet's)",
    ),
];

/// One transformer block's tensor, mmpretrain `TransformerEncoderLayer` -> timm `Block`
/// (mmpretrain/models/backbones/vision_transformer.py: `ln1`, `attn.qkv`, `attn.proj`, `ln2`,
/// and mmcv's `FFN`, whose `layers` are Sequential(Sequential(Linear, act, drop), Linear, drop)).
fn mmpretrain_block(sub: &str) -> Option<String> {
    const RENAMES: [(&str, &str); 6] = [
        ("ln1.", "norm1."),
        ("ln2.", "norm2."),
        ("attn.qkv.", "attn.qkv."),
        ("attn.proj.", "attn.proj."),
        ("ffn.layers.0.0.", "mlp.fc1."),
        ("ffn.layers.1.", "mlp.fc2."),
    ];
    RENAMES
        .iter()
        .find_map(|(theirs, ours)| sub.strip_prefix(theirs).map(|rest| format!("{ours}{rest}")))
}

/// `{i}.{sub}` of a block list -> `{prefix}.{i}.{renamed sub}`.
fn mmpretrain_blocks(rest: &str, prefix: &str) -> Option<String> {
    let (i, sub) = rest.split_once('.')?;
    i.parse::<usize>().ok()?;
    Some(format!("{prefix}.{i}.{}", mmpretrain_block(sub)?))
}

/// The MAE name of an mmpretrain MAE / MFF pre-training key (docs/reference.md sections 1-2).
pub fn mmpretrain_key(key: &str) -> MmKey {
    if let Some((_, why)) = IGNORED_BUFFERS.iter().find(|(k, _)| *k == key) {
        return MmKey::Ignored(why);
    }
    let renamed = if let Some(k) = key.strip_prefix("backbone.") {
        match k {
            "cls_token" | "pos_embed" | "proj_weights" => Some(k.to_string()),
            _ => {
                if let Some(rest) = k.strip_prefix("patch_embed.projection.") {
                    Some(format!("patch_embed.proj.{rest}"))
                } else if let Some(rest) = k.strip_prefix("layers.") {
                    mmpretrain_blocks(rest, "blocks")
                } else if let Some(rest) = k.strip_prefix("ln1.") {
                    // VisionTransformer's final norm (`final_norm=True`) is `ln1`.
                    Some(format!("norm.{rest}"))
                } else if k.starts_with("proj_layers.") || k.starts_with("fusion_attn.") {
                    Some(k.to_string())
                } else {
                    None
                }
            }
        }
    } else if let Some(k) = key.strip_prefix("neck.") {
        match k {
            "mask_token" | "decoder_pos_embed" => Some(k.to_string()),
            _ => {
                if k.starts_with("decoder_embed.") || k.starts_with("decoder_pred.") {
                    Some(k.to_string())
                } else if let Some(rest) = k.strip_prefix("decoder_blocks.") {
                    mmpretrain_blocks(rest, "decoder_blocks")
                } else {
                    // MAEPretrainDecoder's final norm: mmpretrain/models/necks/mae_neck.py builds
                    // it with mmcv's `build_norm_layer(norm_cfg, decoder_embed_dim, postfix=1)`,
                    // which names a LayerNorm `ln` + postfix, and registers it under that name
                    // (`self.add_module(self.decoder_norm_name, ...)`): `neck.ln1.*`;
                    // `decoder_norm` is only a property.
                    k.strip_prefix("ln1.")
                        .map(|rest| format!("decoder_norm.{rest}"))
                }
            }
        }
    } else {
        None
    };
    renamed.map_or(MmKey::Unknown, MmKey::Renamed)
}

/// The layout of a state dict, by its keys: mmpretrain when any key is under `backbone.` or
/// `neck.`.
pub fn detect_layout<'a>(mut keys: impl Iterator<Item = &'a String>) -> KeyLayout {
    if keys.any(|k| k.starts_with("backbone.") || k.starts_with("neck.")) {
        KeyLayout::Mmpretrain
    } else {
        KeyLayout::Mae
    }
}

/// Renames a state dict to MAE's names. MAE-named dicts pass unchanged (the model check lists
/// any tensor it does not use); mmpretrain keys that are not part of MAE / MFF are an error
/// naming every one, ignorable buffers a note.
pub fn to_mae_names(
    tensors: BTreeMap<String, Tensor>,
    notes: &mut Vec<String>,
) -> Result<(BTreeMap<String, Tensor>, KeyLayout)> {
    let layout = detect_layout(tensors.keys());
    if layout == KeyLayout::Mae {
        return Ok((tensors, layout));
    }
    let mut out = BTreeMap::new();
    let mut unknown = Vec::new();
    for (key, t) in tensors {
        match mmpretrain_key(&key) {
            MmKey::Renamed(name) => {
                if out.contains_key(&name) {
                    bail!("two mmpretrain keys map to `{name}` (the second is `{key}`)");
                }
                out.insert(name, t);
            }
            MmKey::Ignored(why) => notes.push(format!("ignored `{key}`: {why}")),
            MmKey::Unknown => unknown.push(format!("`{key}` {:?}", t.dims())),
        }
    }
    if !unknown.is_empty() {
        bail!(
            "tensors that are not part of an MAE / MFF pre-training model (mmpretrain's \
             backbone + neck): {}; mimscope reads pre-training checkpoints, not fine-tuned \
             classifiers or other architectures",
            unknown.join(", ")
        );
    }
    Ok((out, layout))
}

/// Where an imported file came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Pth {
        wrapper: pth::Wrapper,
        top_level: Vec<String>,
        epoch: Option<i64>,
    },
    Safetensors,
}

/// A checkpoint read into MAE names, with its config.
#[derive(Debug)]
pub struct Imported {
    pub cfg: ModelConfig,
    /// Every tensor under its MAE name, in the requested dtype and device.
    pub tensors: BTreeMap<String, Tensor>,
    /// The safetensors metadata (for a `.pth`: `epoch`, when recorded).
    pub metadata: HashMap<String, String>,
    pub source: Source,
    pub layout: KeyLayout,
    /// `None` when the config was stored in the file; else where each field came from.
    pub inferred: Option<Vec<(&'static str, String)>>,
    /// No decoder tensors (MAE's released `mae_pretrain_vit_*.pth`).
    pub encoder_only: bool,
    /// Things the import skipped or assumed, one sentence each (callers print them).
    pub notes: Vec<String>,
}

impl Imported {
    /// One line on what the file was.
    pub fn describe(&self) -> String {
        let names = match self.layout {
            KeyLayout::Mae => "facebookresearch/mae names",
            KeyLayout::Mmpretrain => "mmpretrain names (renamed to MAE's)",
        };
        let config = if self.inferred.is_some() {
            "config inferred from tensor shapes"
        } else {
            "stored config"
        };
        match &self.source {
            Source::Pth { wrapper, .. } => {
                format!("PyTorch .pth, state dict in {wrapper}, {names}, {config}")
            }
            Source::Safetensors => format!("safetensors, {names}, {config}"),
        }
    }
}

/// The message for commands that need the whole model, given an encoder-only file.
pub fn encoder_only_error(path: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{} holds the encoder only (no `decoder_*` or `mask_token` tensors, like MAE's released \
         mae_pretrain_vit_*.pth); mimscope builds the whole model (encoder and decoder) for \
         every command but `inspect`, so use a checkpoint with the decoder: MAE's *_full.pth or \
         mae_visualize_vit_*.pth, or an mmpretrain MAE/MFF pre-training checkpoint (backbone + \
         neck)",
        path.display()
    )
}

fn is_torch_extension(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("pth" | "pt" | "ckpt" | "bin")
    )
}

/// Reads any supported checkpoint (see the module docs) into MAE names and a config.
pub fn import(path: &Path, ov: &ModelOverrides, dtype: DType, device: &Device) -> Result<Imported> {
    let mut notes = Vec::new();
    let Raw {
        tensors,
        metadata,
        source,
    } = read_raw(path, dtype, device, &mut notes)?;
    let (mut tensors, layout) =
        to_mae_names(tensors, &mut notes).with_context(|| format!("in {}", path.display()))?;
    if tensors.get("proj_weights").map(|t| t.dims()) == Some(&[1, 1, 1, 1][..])
        && !tensors.keys().any(|k| k.starts_with("proj_layers."))
    {
        // mmpretrain's MFFViT with out_indices = [last block]: softmax of one weight is 1.
        tensors.remove("proj_weights");
        notes.push(
            "dropped `proj_weights` of shape (1,1,1,1): fusing only the last block is plain MAE"
                .into(),
        );
    }
    let (cfg, inferred, encoder_only) = config_of(path, &tensors, &metadata, ov, &mut notes)?;
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?.to_device(device)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    Ok(Imported {
        cfg,
        tensors,
        metadata,
        source,
        layout,
        inferred,
        encoder_only,
        notes,
    })
}

/// A file as read, before renaming.
struct Raw {
    /// Under the file's own names.
    tensors: BTreeMap<String, Tensor>,
    /// The safetensors metadata, or a `.pth`'s `epoch`.
    metadata: HashMap<String, String>,
    source: Source,
}

/// Reads a `.pth` (by its first bytes or extension) or safetensors file.
fn read_raw(path: &Path, dtype: DType, device: &Device, notes: &mut Vec<String>) -> Result<Raw> {
    let format = pth::sniff(path)?;
    if format == Format::Other && !is_torch_extension(path) {
        let f = load_tensors(path, dtype, device)?;
        return Ok(Raw {
            tensors: f.tensors,
            metadata: f.metadata,
            source: Source::Safetensors,
        });
    }
    let f = pth::read(path)?;
    for e in &f.other_entries {
        // torch's own record of module versions, in every nn.Module state dict.
        if e != "_metadata" {
            notes.push(format!("ignored `{e}` in the state dict: not a tensor"));
        }
    }
    let mut metadata = HashMap::new();
    if let Some(e) = f.epoch {
        metadata.insert("epoch".to_string(), e.to_string());
    }
    let source = Source::Pth {
        wrapper: f.wrapper,
        top_level: f.top_level,
        epoch: f.epoch,
    };
    Ok(Raw {
        tensors: f.tensors,
        metadata,
        source,
    })
}

/// A config, where each inferred field came from (`None`: stored) and whether the file is
/// encoder-only, as [`Imported`] holds them.
type ConfigOf = (ModelConfig, Option<Vec<(&'static str, String)>>, bool);

/// The config stored in `metadata` with the overrides applied, else the one inferred from the
/// shapes of `tensors` (MAE names).
fn config_of(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &HashMap<String, String>,
    ov: &ModelOverrides,
    notes: &mut Vec<String>,
) -> Result<ConfigOf> {
    let Some(json) = metadata.get(CONFIG_KEY) else {
        let shapes = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        let inf = infer_config(&shapes, ov).with_context(|| {
            format!(
                "{} stores no mimscope config, so it is inferred from the tensor shapes",
                path.display()
            )
        })?;
        return Ok((inf.cfg, Some(inf.why), inf.encoder_only));
    };
    let mut cfg = ModelConfig::from_json(json).with_context(|| format!("in {}", path.display()))?;
    if !ov.is_empty() {
        apply_overrides(&mut cfg, ov)
            .with_context(|| format!("overriding the config stored in {}", path.display()))?;
        notes.push("flags override the config stored in the file".into());
    }
    Ok((cfg, None, !has_decoder(tensors.keys())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmpretrain_keys_map_to_mae_names() {
        // docs/reference.md section 1 ("mmpretrain names") and section 2 (MFF keys).
        for (theirs, ours) in [
            ("backbone.cls_token", "cls_token"),
            ("backbone.pos_embed", "pos_embed"),
            (
                "backbone.patch_embed.projection.weight",
                "patch_embed.proj.weight",
            ),
            ("backbone.layers.0.ln1.weight", "blocks.0.norm1.weight"),
            ("backbone.layers.11.ln2.bias", "blocks.11.norm2.bias"),
            (
                "backbone.layers.3.attn.qkv.weight",
                "blocks.3.attn.qkv.weight",
            ),
            (
                "backbone.layers.3.attn.proj.bias",
                "blocks.3.attn.proj.bias",
            ),
            (
                "backbone.layers.2.ffn.layers.0.0.weight",
                "blocks.2.mlp.fc1.weight",
            ),
            (
                "backbone.layers.2.ffn.layers.1.bias",
                "blocks.2.mlp.fc2.bias",
            ),
            ("backbone.ln1.weight", "norm.weight"),
            ("backbone.proj_layers.4.bias", "proj_layers.4.bias"),
            ("backbone.proj_layers.0.2.weight", "proj_layers.0.2.weight"),
            ("backbone.proj_weights", "proj_weights"),
            ("neck.mask_token", "mask_token"),
            ("neck.decoder_pos_embed", "decoder_pos_embed"),
            ("neck.decoder_embed.weight", "decoder_embed.weight"),
            (
                "neck.decoder_blocks.7.ffn.layers.0.0.bias",
                "decoder_blocks.7.mlp.fc1.bias",
            ),
            (
                "neck.decoder_blocks.0.ln1.weight",
                "decoder_blocks.0.norm1.weight",
            ),
            ("neck.ln1.bias", "decoder_norm.bias"),
            ("neck.decoder_pred.weight", "decoder_pred.weight"),
        ] {
            assert_eq!(
                mmpretrain_key(theirs),
                MmKey::Renamed(ours.to_string()),
                "{theirs}"
            );
        }
        for unknown in [
            "head.fc.weight",
            "target_generator.tokenizer.weight",
            "backbone.layers.0.attn.gamma1.weight",
            "backbone.layers.x.ln1.weight",
            "backbone.ln2.weight",
            "neck.norm.weight",
            "blocks.0.norm1.weight",
        ] {
            assert_eq!(mmpretrain_key(unknown), MmKey::Unknown, "{unknown}");
        }
        assert!(matches!(
            mmpretrain_key("data_preprocessor.mean"),
            MmKey::Ignored(_)
        ));
    }

    fn zeros(dims: &[usize]) -> Tensor {
        Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn unknown_mmpretrain_tensors_are_all_named() {
        let mut t = BTreeMap::new();
        t.insert("backbone.cls_token".to_string(), zeros(&[1, 1, 4]));
        t.insert("head.fc.weight".to_string(), zeros(&[2, 4]));
        t.insert(
            "backbone.layers.0.attn.gamma1.weight".to_string(),
            zeros(&[4]),
        );
        t.insert("data_preprocessor.std".to_string(), zeros(&[3, 1, 1]));
        let mut notes = Vec::new();
        let err = format!("{:#}", to_mae_names(t, &mut notes).unwrap_err());
        assert!(
            err.contains("head.fc.weight") && err.contains("gamma1"),
            "{err}"
        );
        assert!(!err.contains("cls_token"), "{err}");
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("data_preprocessor.std"));
    }

    #[test]
    fn mae_names_pass_unchanged() {
        let mut t = BTreeMap::new();
        t.insert("cls_token".to_string(), zeros(&[1, 1, 4]));
        t.insert("head.weight".to_string(), zeros(&[2, 4]));
        let (out, layout) = to_mae_names(t, &mut Vec::new()).unwrap();
        assert_eq!(layout, KeyLayout::Mae);
        assert_eq!(out.len(), 2);
    }
}
