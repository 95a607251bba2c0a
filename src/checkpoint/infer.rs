//! The architecture of a checkpoint that stores no mimscope config, from its tensor shapes.
//!
//! Shapes fix every field but three, which come from [`ModelOverrides`] (the command-line
//! flags) or a stated default: `num_heads` / `decoder_num_heads` (the preset of the same width,
//! see [`Preset`]), the fused block indices (mmpretrain's list scaled by
//! [`default_fuse_layers`], only when the file's fusion count matches it) and `norm_pix_loss`
//! (on, as MAE's and MFF's released runs). [`infer_config`] reads the shapes part by part
//! (encoder, decoder, fusion), in that order, so the first inconsistency met is the one named;
//! every field records where its value came from, for the reports of `inspect` and `convert`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use super::describe::config_lines;
use crate::config::{
    default_fuse_layers, parse_fuse_layers, Fusion, ModelConfig, Preset, Projection,
};

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
    pub(super) fn is_empty(&self) -> bool {
        *self == ModelOverrides::default()
    }
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

/// Tensor name -> shape.
type Shapes = BTreeMap<String, Vec<usize>>;

/// Where each inferred field's value came from, `(field, reason)`.
type Why = Vec<(&'static str, String)>;

/// The shape of tensor `name`, which gives `what`.
fn shape<'a>(shapes: &'a Shapes, name: &str, what: &str) -> Result<&'a [usize]> {
    shapes.get(name).map(Vec::as_slice).with_context(|| {
        format!(
            "no `{name}` tensor, which gives {what}; is this an MAE or MFF pre-training \
             checkpoint?"
        )
    })
}

/// The side of the model whose head count the weights do not store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Encoder,
    Decoder,
}

impl Side {
    /// The config field of its head count and the flag that sets it.
    fn field_and_flag(self) -> (&'static str, &'static str) {
        match self {
            Side::Encoder => ("num_heads", "--num-heads"),
            Side::Decoder => ("decoder_num_heads", "--decoder-num-heads"),
        }
    }
}

/// The standard head count of a width: the preset with that `embed_dim` (or
/// `decoder_embed_dim` for the decoder).
fn preset_heads(width: usize, side: Side) -> Option<(usize, Preset)> {
    Preset::value_variants().iter().find_map(|&p| {
        let c = p.config();
        match side {
            Side::Encoder if c.embed_dim == width => Some((c.num_heads, p)),
            Side::Decoder if c.decoder_embed_dim == width => Some((c.decoder_num_heads, p)),
            _ => None,
        }
    })
}

fn preset_name(p: Preset) -> String {
    format!("{p:?}").to_lowercase()
}

/// The head count of a `width`-wide side: the flag's value, else that of the preset as wide.
fn heads(side: Side, width: usize, flag_value: Option<usize>, why: &mut Why) -> Result<usize> {
    let (field, flag) = side.field_and_flag();
    if let Some(h) = flag_value {
        why.push((field, flag.into()));
        return Ok(h);
    }
    let (h, preset) = preset_heads(width, side).with_context(|| {
        let no_preset = match side {
            Side::Encoder => format!(
                "no preset is {width} wide (the standard widths are 192, 384, 768, 1024, 1280)"
            ),
            Side::Decoder => {
                format!("no preset has a {width}-wide decoder (MAE's is 512 with 16 heads)")
            }
        };
        format!(
            "cannot infer {field}: weights do not store it, and {no_preset}; pass {flag} N \
             (N divides {width}){FLAGS_HINT}"
        )
    })?;
    let whose = match side {
        Side::Encoder => "which is",
        Side::Decoder => "whose decoder is",
    };
    why.push((
        field,
        format!(
            "not in the weights: the {} preset's, {whose} {width} wide; {flag} to change",
            preset_name(preset)
        ),
    ));
    Ok(h)
}

/// The encoder's sizes.
struct EncoderShape {
    img_size: usize,
    patch_size: usize,
    in_chans: usize,
    embed_dim: usize,
    depth: usize,
    mlp_ratio: f64,
}

/// The encoder's sizes, from `patch_embed`, `pos_embed` and the blocks.
fn encoder_shape(shapes: &Shapes, why: &mut Why) -> Result<EncoderShape> {
    let pe = shape(
        shapes,
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

    let pos = shape(shapes, "pos_embed", "img_size")?;
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
    why.push((
        "img_size",
        format!("pos_embed {pos:?}: {g}x{g} patches of {p} px, plus cls"),
    ));

    let depth = count_indexed(shapes, "blocks.")?;
    if depth == 0 {
        bail!("no encoder blocks (`blocks.{{i}}.*`); is this an MAE or MFF checkpoint?");
    }
    why.push(("depth", format!("blocks.0 .. blocks.{}", depth - 1)));

    let fc1 = shape(shapes, "blocks.0.mlp.fc1.weight", "mlp_ratio")?;
    let &[hidden, d_fc1] = fc1 else {
        bail!("`blocks.0.mlp.fc1.weight` has shape {fc1:?}, not (hidden, embed_dim)");
    };
    let mlp_ratio = hidden as f64 / d as f64;
    if d_fc1 != d || (d as f64 * mlp_ratio) as usize != hidden {
        bail!("`blocks.0.mlp.fc1.weight` has shape {fc1:?}, not (hidden, {d})");
    }
    why.push(("mlp_ratio", format!("blocks.0.mlp.fc1.weight {fc1:?}")));
    Ok(EncoderShape {
        img_size: g * p,
        patch_size: p,
        in_chans: c,
        embed_dim: d,
        depth,
        mlp_ratio,
    })
}

/// The decoder's sizes.
struct DecoderShape {
    embed_dim: usize,
    depth: usize,
    num_heads: usize,
}

/// MAE's decoder, for a file without one (encoder only).
fn mae_decoder(why: &mut Why) -> DecoderShape {
    let none = "no decoder in the file (encoder only); MAE's decoder shown".to_string();
    why.push(("decoder_embed_dim", none.clone()));
    why.push(("decoder_depth", none.clone()));
    why.push(("decoder_num_heads", none));
    let mae = Preset::Base.config();
    DecoderShape {
        embed_dim: mae.decoder_embed_dim,
        depth: mae.decoder_depth,
        num_heads: mae.decoder_num_heads,
    }
}

/// The decoder's sizes, from its tensors, checked against the encoder's.
fn decoder_shape(
    shapes: &Shapes,
    enc: &EncoderShape,
    heads_flag: Option<usize>,
    why: &mut Why,
) -> Result<DecoderShape> {
    let (d, p, c, mlp_ratio) = (enc.embed_dim, enc.patch_size, enc.in_chans, enc.mlp_ratio);
    let de = shape(shapes, "decoder_embed.weight", "decoder_embed_dim")?;
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
    let dfc1 = shape(
        shapes,
        "decoder_blocks.0.mlp.fc1.weight",
        "the decoder's MLP width",
    )?;
    if dfc1 != [(dd as f64 * mlp_ratio) as usize, dd] {
        bail!(
            "`decoder_blocks.0.mlp.fc1.weight` has shape {dfc1:?}, but mimscope's config has \
             one mlp_ratio ({mlp_ratio} from the encoder), which makes it ({}, {dd})",
            (dd as f64 * mlp_ratio) as usize
        );
    }
    let pred = shape(shapes, "decoder_pred.weight", "the decoder's output width")?;
    if pred != [p * p * c, dd] {
        bail!(
            "`decoder_pred.weight` has shape {pred:?}; MAE's pixel loss needs ({}, {dd}): \
             p*p*C = {p}*{p}*{c} values per patch",
            p * p * c
        );
    }
    Ok(DecoderShape {
        embed_dim: dd,
        depth: ddepth,
        num_heads: heads(Side::Decoder, dd, heads_flag, why)?,
    })
}

/// `norm_pix_loss`: the flag's value, else on.
fn norm_pix_loss(flag_value: Option<bool>, why: &mut Why) -> bool {
    match flag_value {
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
    }
}

/// The fusion part of the config.
struct FusionShape {
    fuse_layers: Vec<usize>,
    projection: Projection,
    fusion: Fusion,
}

/// MFF: `proj_layers.{k}` for every shallow fused layer, and either `proj_weights` (n,1,1,1)
/// for weighted fusion or `fusion_attn.*` for attention fusion. Plain MAE has none of them.
fn fusion_shape(
    shapes: &Shapes,
    depth: usize,
    fuse_flag: Option<&str>,
    why: &mut Why,
) -> Result<FusionShape> {
    let (shallow, fusion) = fusion_kind(shapes)?;
    let projection = if shallow == 0 || shapes.contains_key("proj_layers.0.weight") {
        Projection::Linear
    } else if shapes.contains_key("proj_layers.0.0.weight") {
        Projection::Mlp
    } else {
        bail!(
            "`proj_layers.0` has neither `.weight` (linear) nor `.0.weight` (Linear-GELU-Linear)"
        );
    };
    let fuse_layers = fused_blocks(shallow, depth, fuse_flag, why)?;
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
    Ok(FusionShape {
        fuse_layers,
        projection,
        fusion,
    })
}

/// The number of shallow fused layers (`proj_layers`) and the fusion kind.
fn fusion_kind(shapes: &Shapes) -> Result<(usize, Fusion)> {
    let projs = count_indexed(shapes, "proj_layers.")?;
    let has_attn = shapes.keys().any(|k| k.starts_with("fusion_attn."));
    Ok(match (shapes.get("proj_weights"), has_attn) {
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
    })
}

/// The `shallow` fused block indices of a `depth`-block model: the `--fuse-layers` value, else
/// mmpretrain's default when it fuses as many.
fn fused_blocks(
    shallow: usize,
    depth: usize,
    fuse_flag: Option<&str>,
    why: &mut Why,
) -> Result<Vec<usize>> {
    if shallow == 0 {
        if let Some(s) = fuse_flag {
            if !parse_fuse_layers(s, depth)?.is_empty() {
                bail!(
                    "--fuse-layers {s}: the file has no fusion tensors (`proj_layers`, \
                     `proj_weights`, `fusion_attn`); it is plain MAE"
                );
            }
        }
        return Ok(Vec::new());
    }
    if let Some(s) = fuse_flag {
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
        return Ok(list);
    }
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
    Ok(list)
}

/// The architecture of a state dict with MAE names, from its tensor shapes (see the module
/// docs for the fields that shapes cannot tell).
pub fn infer_config(
    shapes: &BTreeMap<String, Vec<usize>>,
    ov: &ModelOverrides,
) -> Result<Inferred> {
    let mut why = Why::new();
    let enc = encoder_shape(shapes, &mut why)?;
    let num_heads = heads(Side::Encoder, enc.embed_dim, ov.num_heads, &mut why)?;
    let encoder_only = !has_decoder(shapes.keys());
    let dec = if encoder_only {
        mae_decoder(&mut why)
    } else {
        decoder_shape(shapes, &enc, ov.decoder_num_heads, &mut why)?
    };
    let norm_pix_loss = norm_pix_loss(ov.norm_pix_loss, &mut why);
    let fused = fusion_shape(shapes, enc.depth, ov.fuse_layers.as_deref(), &mut why)?;
    let cfg = ModelConfig {
        img_size: enc.img_size,
        patch_size: enc.patch_size,
        in_chans: enc.in_chans,
        embed_dim: enc.embed_dim,
        depth: enc.depth,
        num_heads,
        decoder_embed_dim: dec.embed_dim,
        decoder_depth: dec.depth,
        decoder_num_heads: dec.num_heads,
        mlp_ratio: enc.mlp_ratio,
        norm_pix_loss,
        fuse_layers: fused.fuse_layers,
        projection: fused.projection,
        fusion: fused.fusion,
    };
    cfg.validate().context("the inferred config is invalid")?;
    // Reports list the fields in the config's order, the one `config_lines` shows.
    let order: Vec<&str> = config_lines(&cfg).into_iter().map(|(f, _)| f).collect();
    why.sort_by_key(|(f, _)| order.iter().position(|o| o == f));
    Ok(Inferred {
        cfg,
        encoder_only,
        why,
    })
}

/// Applies overrides to a stored config.
pub(super) fn apply_overrides(cfg: &mut ModelConfig, ov: &ModelOverrides) -> Result<()> {
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

#[cfg(test)]
mod tests;
