//! Checkpoints written by other code: facebookresearch/mae and mmpretrain key names, `.pth` or
//! safetensors, with the architecture inferred from tensor shapes when the file stores no
//! mimscope config; and `mimscope convert`, which writes them in mimscope's own format.
//!
//! [`import`] is the one entry point: it reads the file ([`crate::pth`] for `.pth` archives),
//! renames mmpretrain keys to MAE's ([`mmpretrain_key`], REFERENCE.md sections 1-2), and takes
//! the config from the file's `config` metadata or from [`infer_config`]. Shapes fix every field
//! but three, which come from [`ModelOverrides`] (the command-line flags) or a stated default:
//! `num_heads` / `decoder_num_heads` (the preset of the same width, see [`Preset`]), the fused
//! block indices (mmpretrain's list scaled by [`default_fuse_layers`], only when the file's
//! fusion count matches it) and `norm_pix_loss` (on, as MAE's and MFF's released runs).
//!
//! A file without decoder tensors (MAE's released `mae_pretrain_vit_*.pth`) imports with
//! [`Imported::encoder_only`] set: `inspect` reads it, but the model is always built whole, so
//! [`crate::checkpoint::load_model`] and `convert` refuse it with a message saying so.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::ValueEnum;

use crate::checkpoint::{self, CONFIG_KEY};
use crate::config::{
    default_fuse_layers, parse_fuse_layers, Fusion, ModelConfig, Preset, Projection,
};
use crate::pth::{self, Format};

/// Architecture fields that tensor shapes cannot tell; `None` takes the default described in
/// the module docs. Applied on top of a stored config too.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelOverrides {
    pub num_heads: Option<usize>,
    pub decoder_num_heads: Option<usize>,
    /// A `--fuse-layers` value (see [`parse_fuse_layers`]).
    pub fuse_layers: Option<String>,
    pub norm_pix_loss: Option<bool>,
}

impl ModelOverrides {
    fn is_empty(&self) -> bool {
        *self == ModelOverrides::default()
    }
}

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

/// The MAE name of an mmpretrain MAE / MFF pre-training key (REFERENCE.md sections 1-2).
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

/// Whether a state dict (MAE names) has any decoder tensor.
pub fn has_decoder<'a>(mut keys: impl Iterator<Item = &'a String>) -> bool {
    keys.any(|k| k == "mask_token" || k.starts_with("decoder_"))
}

/// A config inferred from tensor shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Inferred {
    pub cfg: ModelConfig,
    /// No decoder tensors: the decoder fields are the MAE preset's, not the file's.
    pub encoder_only: bool,
    /// Where each field's value came from, in field order.
    pub why: Vec<(&'static str, String)>,
}

/// Distinct `i` of the keys `{prefix}{i}.*`, which must be 0..n; returns n.
fn count_indexed(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> Result<usize> {
    let found: BTreeSet<usize> = shapes
        .keys()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse().ok())
        .collect();
    let n = found.len();
    if let Some(missing) = (0..n).find(|i| !found.contains(i)) {
        bail!(
            "`{prefix}{missing}.*` is missing although the file has `{prefix}` indices {:?}",
            found
        );
    }
    Ok(n)
}

/// Where the flags that errors ask for are.
const FLAGS_HINT: &str = "; it is a flag of `mimscope convert` and `mimscope inspect`: convert \
                          the file once, and every command reads the converted one";

/// The standard head count of a width: the preset with that `embed_dim` (or
/// `decoder_embed_dim` for the decoder).
fn preset_heads(width: usize, decoder: bool) -> Option<(usize, Preset)> {
    Preset::value_variants().iter().find_map(|&p| {
        let c = p.config();
        match decoder {
            false if c.embed_dim == width => Some((c.num_heads, p)),
            true if c.decoder_embed_dim == width => Some((c.decoder_num_heads, p)),
            _ => None,
        }
    })
}

fn preset_name(p: Preset) -> String {
    format!("{p:?}").to_lowercase()
}

/// The architecture of a state dict with MAE names, from its tensor shapes (see the module
/// docs for the fields that shapes cannot tell).
pub fn infer_config(
    shapes: &BTreeMap<String, Vec<usize>>,
    ov: &ModelOverrides,
) -> Result<Inferred> {
    let get = |name: &str, what: &str| -> Result<&[usize]> {
        shapes.get(name).map(Vec::as_slice).with_context(|| {
            format!(
                "no `{name}` tensor, which gives {what}; is this an MAE or MFF pre-training \
                 checkpoint?"
            )
        })
    };
    let mut why = Vec::new();

    let pe = get(
        "patch_embed.proj.weight",
        "embed_dim, in_chans and patch_size",
    )?;
    let &[d, c, p, p2] = pe else {
        bail!("`patch_embed.proj.weight` has shape {pe:?}, not (embed_dim, in_chans, p, p)");
    };
    if p != p2 || p == 0 {
        bail!("`patch_embed.proj.weight` has shape {pe:?}: the patch is not square");
    }
    let src = format!("patch_embed.proj.weight {pe:?}");
    why.push(("patch_size", src.clone()));
    why.push(("in_chans", src.clone()));
    why.push(("embed_dim", src));

    let pos = get("pos_embed", "img_size")?;
    let &[1, n, d_pos] = pos else {
        bail!("`pos_embed` has shape {pos:?}, not (1, 1 + patches, embed_dim)");
    };
    let l = n.saturating_sub(1);
    let g = (l as f64).sqrt().round() as usize;
    if d_pos != d || l == 0 || g * g != l {
        bail!(
            "`pos_embed` has shape {pos:?}: expected (1, 1 + g*g, {d}) for a square grid of g*g \
             patches plus cls"
        );
    }
    let img_size = g * p;
    why.push((
        "img_size",
        format!("pos_embed {pos:?}: {g}x{g} patches of {p} px, plus cls"),
    ));

    let depth = count_indexed(shapes, "blocks.")?;
    if depth == 0 {
        bail!("no encoder blocks (`blocks.{{i}}.*`); is this an MAE or MFF checkpoint?");
    }
    why.push(("depth", format!("blocks.0 .. blocks.{}", depth - 1)));

    let fc1 = get("blocks.0.mlp.fc1.weight", "mlp_ratio")?;
    let &[hidden, d_fc1] = fc1 else {
        bail!("`blocks.0.mlp.fc1.weight` has shape {fc1:?}, not (hidden, embed_dim)");
    };
    let mlp_ratio = hidden as f64 / d as f64;
    if d_fc1 != d || (d as f64 * mlp_ratio) as usize != hidden {
        bail!("`blocks.0.mlp.fc1.weight` has shape {fc1:?}, not (hidden, {d})");
    }
    why.push(("mlp_ratio", format!("blocks.0.mlp.fc1.weight {fc1:?}")));

    let num_heads = match ov.num_heads {
        Some(h) => {
            why.push(("num_heads", "--num-heads".into()));
            h
        }
        None => {
            let (h, preset) = preset_heads(d, false).with_context(|| {
                format!(
                    "cannot infer num_heads: weights do not store it, and no preset is {d} wide \
                     (the standard widths are 192, 384, 768, 1024, 1280); pass --num-heads N \
                     (N divides {d}){FLAGS_HINT}"
                )
            })?;
            why.push((
                "num_heads",
                format!(
                    "not in the weights: the {} preset's, which is {d} wide; --num-heads to change",
                    preset_name(preset)
                ),
            ));
            h
        }
    };

    let encoder_only = !has_decoder(shapes.keys());
    let mae = Preset::Base.config();
    let (decoder_embed_dim, decoder_depth, decoder_num_heads) = if encoder_only {
        let none = "no decoder in the file (encoder only); MAE's decoder shown".to_string();
        why.push(("decoder_embed_dim", none.clone()));
        why.push(("decoder_depth", none.clone()));
        why.push(("decoder_num_heads", none));
        (
            mae.decoder_embed_dim,
            mae.decoder_depth,
            mae.decoder_num_heads,
        )
    } else {
        let de = get("decoder_embed.weight", "decoder_embed_dim")?;
        let &[dd, d_de] = de else {
            bail!("`decoder_embed.weight` has shape {de:?}, not (decoder_embed_dim, embed_dim)");
        };
        if d_de != d {
            bail!("`decoder_embed.weight` has shape {de:?}, not (decoder_embed_dim, {d})");
        }
        why.push(("decoder_embed_dim", format!("decoder_embed.weight {de:?}")));
        let ddepth = count_indexed(shapes, "decoder_blocks.")?;
        if ddepth == 0 {
            bail!("the file has decoder tensors but no decoder blocks (`decoder_blocks.{{i}}.*`)");
        }
        why.push((
            "decoder_depth",
            format!("decoder_blocks.0 .. decoder_blocks.{}", ddepth - 1),
        ));
        let dfc1 = get("decoder_blocks.0.mlp.fc1.weight", "the decoder's MLP width")?;
        if dfc1 != [(dd as f64 * mlp_ratio) as usize, dd] {
            bail!(
                "`decoder_blocks.0.mlp.fc1.weight` has shape {dfc1:?}, but mimscope's config has \
                 one mlp_ratio ({mlp_ratio} from the encoder), which makes it ({}, {dd})",
                (dd as f64 * mlp_ratio) as usize
            );
        }
        let pred = get("decoder_pred.weight", "the decoder's output width")?;
        if pred != [p * p * c, dd] {
            bail!(
                "`decoder_pred.weight` has shape {pred:?}; MAE's pixel loss needs ({}, {dd}): \
                 p*p*C = {p}*{p}*{c} values per patch",
                p * p * c
            );
        }
        let dh = match ov.decoder_num_heads {
            Some(h) => {
                why.push(("decoder_num_heads", "--decoder-num-heads".into()));
                h
            }
            None => {
                let (h, preset) = preset_heads(dd, true).with_context(|| {
                    format!(
                        "cannot infer decoder_num_heads: weights do not store it, and no preset \
                         has a {dd}-wide decoder (MAE's is 512 with 16 heads); pass \
                         --decoder-num-heads N (N divides {dd}){FLAGS_HINT}"
                    )
                })?;
                why.push((
                    "decoder_num_heads",
                    format!(
                        "not in the weights: the {} preset's, whose decoder is {dd} \
                         wide; --decoder-num-heads to change",
                        preset_name(preset)
                    ),
                ));
                h
            }
        };
        (dd, ddepth, dh)
    };

    let norm_pix_loss = match ov.norm_pix_loss {
        Some(v) => {
            why.push(("norm_pix_loss", "--no-norm-pix-loss".into()));
            v
        }
        None => {
            why.push((
                "norm_pix_loss",
                "not in the weights: on, as MAE's and MFF's released runs; \
                 --no-norm-pix-loss to change"
                    .into(),
            ));
            true
        }
    };

    // MFF: proj_layers.{k} for every shallow fused layer, and either proj_weights (n,1,1,1)
    // for weighted fusion or fusion_attn.* for attention fusion.
    let projs = count_indexed(shapes, "proj_layers.")?;
    let has_attn = shapes.keys().any(|k| k.starts_with("fusion_attn."));
    let (shallow, fusion) = match (shapes.get("proj_weights"), has_attn) {
        (Some(_), true) => {
            bail!("the file has both `proj_weights` and `fusion_attn.*`: one fusion kind only")
        }
        (Some(w), false) => {
            let &[n, 1, 1, 1] = w.as_slice() else {
                bail!("`proj_weights` has shape {w:?}, not (fused layers, 1, 1, 1)");
            };
            if n != projs + 1 {
                bail!(
                    "`proj_weights` weighs {n} layers, so {} shallow layers need a projection, but \
                     the file has {projs} `proj_layers`",
                    n.saturating_sub(1)
                );
            }
            (projs, Fusion::Weighted)
        }
        (None, true) if projs == 0 => {
            bail!("the file has `fusion_attn.*` but no `proj_layers`: nothing is fused")
        }
        (None, true) => (projs, Fusion::Attention),
        (None, false) if projs > 0 => bail!(
            "the file has {projs} `proj_layers` but neither `proj_weights` nor `fusion_attn.*`"
        ),
        (None, false) => (0, Fusion::Weighted),
    };
    let projection = if shallow == 0 || shapes.contains_key("proj_layers.0.weight") {
        Projection::Linear
    } else if shapes.contains_key("proj_layers.0.0.weight") {
        Projection::Mlp
    } else {
        bail!(
            "`proj_layers.0` has neither `.weight` (linear) nor `.0.weight` (Linear-GELU-Linear)"
        );
    };
    let fuse_layers = if shallow == 0 {
        if let Some(s) = &ov.fuse_layers {
            if !parse_fuse_layers(s, depth)?.is_empty() {
                bail!(
                    "--fuse-layers {s}: the file has no fusion tensors (`proj_layers`, \
                     `proj_weights`, `fusion_attn`); it is plain MAE"
                );
            }
        }
        Vec::new()
    } else {
        match &ov.fuse_layers {
            Some(s) => {
                let list = parse_fuse_layers(s, depth)?;
                if list.len() != shallow {
                    bail!(
                        "--fuse-layers {s} lists {} block(s), but the file fuses {shallow} shallow \
                         blocks ({shallow} `proj_layers`) and the last; give {shallow} 0-based \
                         indices",
                        list.len()
                    );
                }
                why.push(("fuse_layers", "--fuse-layers".into()));
                list
            }
            None => {
                let list = default_fuse_layers(depth);
                if list.len() != shallow {
                    bail!(
                        "cannot infer fuse_layers: weights do not store which blocks are fused; \
                         the file fuses {shallow} shallow blocks ({shallow} `proj_layers`) and \
                         the last, but mmpretrain's default for {depth} blocks is {list:?}; pass \
                         --fuse-layers with the {shallow} 0-based block indices (the model's \
                         out_indices without the last block){FLAGS_HINT}"
                    );
                }
                why.push((
                    "fuse_layers",
                    format!(
                        "not in the weights: mmpretrain's [0,2,4,6,8] scaled to {depth} blocks, \
                         which matches the file's {shallow} proj_layers; --fuse-layers to change"
                    ),
                ));
                list
            }
        }
    };
    if shallow > 0 {
        let src = match fusion {
            Fusion::Weighted => format!("proj_weights {:?}", shapes["proj_weights"]),
            Fusion::Attention => "fusion_attn.*".into(),
        };
        why.push((
            "projection",
            format!("proj_layers.0 keys ({shallow} layers)"),
        ));
        why.push(("fusion", src));
    }

    let cfg = ModelConfig {
        img_size,
        patch_size: p,
        in_chans: c,
        embed_dim: d,
        depth,
        num_heads,
        decoder_embed_dim,
        decoder_depth,
        decoder_num_heads,
        mlp_ratio,
        norm_pix_loss,
        fuse_layers,
        projection,
        fusion,
    };
    cfg.validate().context("the inferred config is invalid")?;
    // Field order, for reports.
    let order = [
        "img_size",
        "patch_size",
        "in_chans",
        "embed_dim",
        "depth",
        "num_heads",
        "decoder_embed_dim",
        "decoder_depth",
        "decoder_num_heads",
        "mlp_ratio",
        "norm_pix_loss",
        "fuse_layers",
        "projection",
        "fusion",
    ];
    why.sort_by_key(|(f, _)| order.iter().position(|o| o == f));
    Ok(Inferred {
        cfg,
        encoder_only,
        why,
    })
}

/// Applies overrides to a stored config.
fn apply_overrides(cfg: &mut ModelConfig, ov: &ModelOverrides) -> Result<()> {
    if let Some(h) = ov.num_heads {
        cfg.num_heads = h;
    }
    if let Some(h) = ov.decoder_num_heads {
        cfg.decoder_num_heads = h;
    }
    if let Some(s) = &ov.fuse_layers {
        cfg.fuse_layers = parse_fuse_layers(s, cfg.depth)?;
    }
    if let Some(v) = ov.norm_pix_loss {
        cfg.norm_pix_loss = v;
    }
    cfg.validate()
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
    let format = pth::sniff(path)?;
    let (raw, mut metadata, source) = if format != Format::Other || is_torch_extension(path) {
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
        (f.tensors, metadata, source)
    } else {
        let f = checkpoint::load_tensors(path, dtype, device)?;
        (f.tensors, f.metadata, Source::Safetensors)
    };
    let (mut tensors, layout) =
        to_mae_names(raw, &mut notes).with_context(|| format!("in {}", path.display()))?;
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

    let stored = metadata.remove(CONFIG_KEY);
    let (cfg, inferred, encoder_only) = match stored {
        Some(json) => {
            let mut cfg =
                ModelConfig::from_json(&json).with_context(|| format!("in {}", path.display()))?;
            if !ov.is_empty() {
                apply_overrides(&mut cfg, ov).with_context(|| {
                    format!("overriding the config stored in {}", path.display())
                })?;
                notes.push("flags override the config stored in the file".into());
            }
            metadata.insert(CONFIG_KEY.to_string(), json);
            (cfg, None, !has_decoder(tensors.keys()))
        }
        None => {
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
            (inf.cfg, Some(inf.why), inf.encoder_only)
        }
    };
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

/// `mimscope convert`: imports `input` and writes it to `output` in mimscope's format (MAE
/// names, `config` metadata), atomically. Returns the report to print.
pub fn run(input: &Path, output: &Path, ov: &ModelOverrides) -> Result<String> {
    if output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!(
            "convert writes safetensors: name the output file *.safetensors (got {})",
            output.display()
        );
    }
    let imp = import(input, ov, DType::F32, &Device::Cpu)?;
    if imp.encoder_only {
        return Err(encoder_only_error(input));
    }
    let (_, store) = checkpoint::build_model(
        input,
        &imp.cfg,
        imp.tensors.clone(),
        DType::F32,
        &Device::Cpu,
    )?;

    let mut r = String::new();
    writeln!(r, "read: {}", input.display())?;
    writeln!(r, "  {}", imp.describe())?;
    if let Source::Pth {
        top_level, epoch, ..
    } = &imp.source
    {
        writeln!(r, "  top-level entries: {}", top_level.join(", "))?;
        if let Some(e) = epoch {
            writeln!(r, "  epoch: {e}")?;
        }
    }
    if imp.layout == KeyLayout::Mmpretrain {
        writeln!(
            r,
            "  renamed {} tensors from mmpretrain to MAE names: backbone.layers.{{i}} -> \
             blocks.{{i}}, neck.decoder_blocks.{{i}} -> decoder_blocks.{{i}} (ln1/ln2 -> \
             norm1/norm2, ffn.layers.0.0 -> mlp.fc1, ffn.layers.1 -> mlp.fc2), \
             backbone.patch_embed.projection -> patch_embed.proj, backbone.ln1 -> norm, \
             neck.ln1 -> decoder_norm, other backbone./neck. prefixes dropped",
            imp.tensors.len()
        )?;
    }
    for note in &imp.notes {
        writeln!(r, "  note: {note}")?;
    }
    match &imp.inferred {
        None => writeln!(r, "config (stored in the file):")?,
        Some(_) => writeln!(r, "config (inferred; the file stores none):")?,
    }
    let why: HashMap<&str, &str> = imp
        .inferred
        .iter()
        .flatten()
        .map(|(f, w)| (*f, w.as_str()))
        .collect();
    for (field, value) in crate::inspect::config_lines(&imp.cfg) {
        let from = why.get(field).map(|w| format!("  ({w})"));
        writeln!(r, "  {field:<18} {value}{}", from.unwrap_or_default())?;
    }

    let mut metadata: HashMap<String, String> = imp
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != CONFIG_KEY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    metadata.insert("converted_from".into(), name);
    checkpoint::save_weights(output, &imp.cfg, &store, metadata)
        .with_context(|| format!("writing {}", output.display()))?;
    let scalars: usize = store.tensors().values().map(|t| t.elem_count()).sum();
    writeln!(
        r,
        "wrote: {} ({} tensors, {scalars} scalars, config in its metadata)",
        output.display(),
        store.tensors().len()
    )?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmpretrain_keys_map_to_mae_names() {
        // REFERENCE.md section 1 ("mmpretrain names") and section 2 (MFF keys).
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

    /// Name -> shape of the tensors `infer_config` reads, for an MAE / MFF-MAE of these sizes
    /// (fc1 of every block, so the depth counts work).
    fn shapes(
        d: usize,
        depth: usize,
        img: usize,
        p: usize,
        decoder: Option<(usize, usize)>,
    ) -> BTreeMap<String, Vec<usize>> {
        let mut s = BTreeMap::new();
        s.insert("patch_embed.proj.weight".into(), vec![d, 3, p, p]);
        s.insert("pos_embed".into(), vec![1, (img / p) * (img / p) + 1, d]);
        for i in 0..depth {
            s.insert(format!("blocks.{i}.mlp.fc1.weight"), vec![4 * d, d]);
        }
        if let Some((dd, ddepth)) = decoder {
            s.insert("decoder_embed.weight".into(), vec![dd, d]);
            s.insert("mask_token".into(), vec![1, 1, dd]);
            for i in 0..ddepth {
                s.insert(
                    format!("decoder_blocks.{i}.mlp.fc1.weight"),
                    vec![4 * dd, dd],
                );
            }
            s.insert("decoder_pred.weight".into(), vec![p * p * 3, dd]);
        }
        s
    }

    fn add_mff(s: &mut BTreeMap<String, Vec<usize>>, d: usize, n_shallow: usize) {
        for k in 0..n_shallow {
            s.insert(format!("proj_layers.{k}.weight"), vec![d, d]);
        }
        s.insert("proj_weights".into(), vec![n_shallow + 1, 1, 1, 1]);
    }

    #[test]
    fn vit_b_mff_is_inferred_with_mae_defaults() {
        // mmpretrain's MFF ViT-B/16: 12 blocks, out_indices [0,2,4,6,8,11], decoder 512 x 8.
        let mut s = shapes(768, 12, 224, 16, Some((512, 8)));
        add_mff(&mut s, 768, 5);
        let inf = infer_config(&s, &ModelOverrides::default()).unwrap();
        let expected = ModelConfig {
            fuse_layers: vec![0, 2, 4, 6, 8],
            ..Preset::Base.config()
        };
        assert_eq!(inf.cfg, expected);
        assert!(!inf.encoder_only);
        let fields: Vec<&str> = inf.why.iter().map(|(f, _)| *f).collect();
        assert_eq!(fields.len(), 14, "{fields:?}");
        // ViT-L and ViT-H widths take 16 heads; the encoder-only file gets MAE's decoder.
        let inf =
            infer_config(&shapes(1024, 24, 224, 16, None), &ModelOverrides::default()).unwrap();
        assert_eq!(inf.cfg.num_heads, 16);
        assert!(inf.encoder_only);
        assert_eq!(inf.cfg.decoder_embed_dim, 512);
        let inf = infer_config(
            &shapes(1280, 32, 224, 14, Some((512, 8))),
            &ModelOverrides::default(),
        )
        .unwrap();
        assert_eq!(inf.cfg, Preset::Huge.config());
    }

    #[test]
    fn what_shapes_cannot_tell_needs_flags() {
        let s = shapes(32, 4, 16, 4, Some((24, 2)));
        let err = format!(
            "{:#}",
            infer_config(&s, &ModelOverrides::default()).unwrap_err()
        );
        assert!(err.contains("--num-heads") && err.contains("32"), "{err}");
        let ov = ModelOverrides {
            num_heads: Some(4),
            ..Default::default()
        };
        let err = format!("{:#}", infer_config(&s, &ov).unwrap_err());
        assert!(
            err.contains("--decoder-num-heads") && err.contains("24"),
            "{err}"
        );
        let ov = ModelOverrides {
            num_heads: Some(4),
            decoder_num_heads: Some(3),
            norm_pix_loss: Some(false),
            ..Default::default()
        };
        let cfg = infer_config(&s, &ov).unwrap().cfg;
        assert_eq!(
            (cfg.img_size, cfg.patch_size, cfg.depth, cfg.decoder_depth),
            (16, 4, 4, 2)
        );
        assert!(!cfg.norm_pix_loss && !cfg.is_mff());
        // A head count that does not divide the width is the config's own error.
        let ov = ModelOverrides {
            num_heads: Some(5),
            decoder_num_heads: Some(3),
            ..Default::default()
        };
        let err = format!("{:#}", infer_config(&s, &ov).unwrap_err());
        assert!(err.contains("num_heads 5"), "{err}");
    }

    #[test]
    fn fused_blocks_default_only_when_the_count_matches() {
        let ov = ModelOverrides {
            num_heads: Some(4),
            decoder_num_heads: Some(3),
            ..Default::default()
        };
        // 4 blocks: mmpretrain's list scales to [0, 1, 2], three shallow layers.
        let mut s = shapes(32, 4, 16, 4, Some((24, 2)));
        add_mff(&mut s, 32, 3);
        assert_eq!(
            infer_config(&s, &ov).unwrap().cfg.fuse_layers,
            vec![0, 1, 2]
        );
        let mut s = shapes(32, 4, 16, 4, Some((24, 2)));
        add_mff(&mut s, 32, 2);
        let err = format!("{:#}", infer_config(&s, &ov).unwrap_err());
        assert!(
            err.contains("--fuse-layers") && err.contains("[0, 1, 2]"),
            "{err}"
        );
        let with = |list: &str| ModelOverrides {
            fuse_layers: Some(list.into()),
            ..ov.clone()
        };
        let cfg = infer_config(&s, &with("0,2")).unwrap().cfg;
        assert_eq!(cfg.fuse_layers, vec![0, 2]);
        assert_eq!(
            (cfg.projection, cfg.fusion),
            (Projection::Linear, Fusion::Weighted)
        );
        let err = format!("{:#}", infer_config(&s, &with("0")).unwrap_err());
        assert!(
            err.contains("lists 1 block(s)") && err.contains("fuses 2"),
            "{err}"
        );
        // Plain MAE with --fuse-layers is an error, `none` is fine.
        let s = shapes(32, 4, 16, 4, Some((24, 2)));
        assert!(infer_config(&s, &with("0,2")).is_err());
        assert!(infer_config(&s, &with("none")).is_ok());
    }

    #[test]
    fn attention_fusion_and_mlp_projection_are_recognised() {
        let mut s = shapes(32, 4, 16, 4, Some((24, 2)));
        s.insert("proj_layers.0.0.weight".into(), vec![32, 32]);
        s.insert("proj_layers.0.2.weight".into(), vec![32, 32]);
        s.insert("fusion_attn.qkv.weight".into(), vec![96, 32]);
        let ov = ModelOverrides {
            num_heads: Some(4),
            decoder_num_heads: Some(3),
            fuse_layers: Some("1".into()),
            ..Default::default()
        };
        let cfg = infer_config(&s, &ov).unwrap().cfg;
        assert_eq!(
            (cfg.fuse_layers, cfg.projection, cfg.fusion),
            (vec![1], Projection::Mlp, Fusion::Attention)
        );
        s.insert("proj_weights".into(), vec![2, 1, 1, 1]);
        assert!(format!("{:#}", infer_config(&s, &ov).unwrap_err()).contains("both"));
    }

    #[test]
    fn inconsistent_shapes_are_named() {
        let ov = ModelOverrides {
            num_heads: Some(4),
            decoder_num_heads: Some(3),
            ..Default::default()
        };
        let mut s = shapes(32, 4, 16, 4, Some((24, 2)));
        s.insert("pos_embed".into(), vec![1, 16, 32]);
        assert!(format!("{:#}", infer_config(&s, &ov).unwrap_err()).contains("pos_embed"));
        let mut s = shapes(32, 4, 16, 4, Some((24, 2)));
        s.remove("blocks.2.mlp.fc1.weight");
        let err = format!("{:#}", infer_config(&s, &ov).unwrap_err());
        assert!(err.contains("blocks.2"), "{err}");
        let mut s = shapes(32, 4, 16, 4, Some((24, 2)));
        s.insert("decoder_pred.weight".into(), vec![10, 24]);
        let err = format!("{:#}", infer_config(&s, &ov).unwrap_err());
        assert!(err.contains("decoder_pred") && err.contains("48"), "{err}");
        let err = format!("{:#}", infer_config(&BTreeMap::new(), &ov).unwrap_err());
        assert!(err.contains("patch_embed.proj.weight"), "{err}");
    }
}
