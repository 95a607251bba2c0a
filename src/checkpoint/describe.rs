//! What a model is made of, for reports: its config as field/value lines ([`config_lines`],
//! the one list of the config's fields in declaration order that `inspect`, `convert` and
//! [`super::infer`] share) and its scalar counts per part ([`ParamCounts`], by MAE state-dict
//! prefix, see [`Part`]).

use std::collections::BTreeMap;

use crate::config::ModelConfig;
use crate::model::params::FROZEN;
use crate::model::ParamStore;

/// A part of the model, by the MAE state-dict name of its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// `patch_embed.*`
    PatchEmbed,
    /// `cls_token`, `pos_embed`
    ClsPos,
    /// `blocks.*`
    Blocks,
    /// `norm.*` (the encoder's final norm)
    Norm,
    /// MFF `proj_layers.*`
    ProjLayers,
    /// MFF `proj_weights`
    ProjWeights,
    /// MFF attention fusion `fusion_attn.*`
    FusionAttn,
    /// `decoder_*` and `mask_token`
    Decoder,
    /// Anything else (none in a valid checkpoint; listed so that the parts always add up).
    Other,
}

impl Part {
    /// The part a tensor belongs to.
    pub fn of(name: &str) -> Part {
        let head = name.split('.').next().unwrap_or(name);
        match head {
            "patch_embed" => Part::PatchEmbed,
            "cls_token" | "pos_embed" => Part::ClsPos,
            "blocks" => Part::Blocks,
            "norm" => Part::Norm,
            "proj_layers" => Part::ProjLayers,
            "proj_weights" => Part::ProjWeights,
            "fusion_attn" => Part::FusionAttn,
            "mask_token" => Part::Decoder,
            h if h.starts_with("decoder_") => Part::Decoder,
            _ => Part::Other,
        }
    }
}

/// Scalar counts of one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamCounts {
    pub per_part: BTreeMap<Part, usize>,
    /// Every tensor except [`FROZEN`].
    pub trainable: usize,
    pub total: usize,
}

impl ParamCounts {
    pub fn of(store: &ParamStore) -> ParamCounts {
        let mut per_part = BTreeMap::new();
        let (mut trainable, mut total) = (0, 0);
        for (name, t) in store.tensors() {
            let n = t.elem_count();
            *per_part.entry(Part::of(&name)).or_insert(0) += n;
            total += n;
            if !FROZEN.contains(&name.as_str()) {
                trainable += n;
            }
        }
        ParamCounts {
            per_part,
            trainable,
            total,
        }
    }

    pub fn part(&self, p: Part) -> usize {
        self.per_part.get(&p).copied().unwrap_or(0)
    }

    /// proj_layers + proj_weights + fusion_attn.
    pub fn fusion(&self) -> usize {
        self.part(Part::ProjLayers) + self.part(Part::ProjWeights) + self.part(Part::FusionAttn)
    }
}

/// Every config field, one `name = value` line each, in declaration order.
pub fn config_lines(cfg: &ModelConfig) -> Vec<(&'static str, String)> {
    // Destructured without `..`: a new config field fails to compile here until it is shown.
    let ModelConfig {
        img_size,
        patch_size,
        in_chans,
        embed_dim,
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
    } = cfg;
    vec![
        ("img_size", img_size.to_string()),
        ("patch_size", patch_size.to_string()),
        ("in_chans", in_chans.to_string()),
        ("embed_dim", embed_dim.to_string()),
        ("depth", depth.to_string()),
        ("num_heads", num_heads.to_string()),
        ("decoder_embed_dim", decoder_embed_dim.to_string()),
        ("decoder_depth", decoder_depth.to_string()),
        ("decoder_num_heads", decoder_num_heads.to_string()),
        ("mlp_ratio", mlp_ratio.to_string()),
        ("norm_pix_loss", norm_pix_loss.to_string()),
        ("fuse_layers", format!("{fuse_layers:?}")),
        ("projection", format!("{projection:?}").to_lowercase()),
        ("fusion", format!("{fusion:?}").to_lowercase()),
    ]
}
