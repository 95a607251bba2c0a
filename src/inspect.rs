//! `mimscope inspect`: what a checkpoint holds, without running it.
//!
//! The report names the file, its training step (metadata `step`, when present), every field of
//! the stored [`ModelConfig`], the number of scalars per part of the model (MAE state-dict
//! prefixes, see [`Part`]), the trainable total (everything but the frozen sin-cos tables
//! [`FROZEN`]) and, for MFF, the fused blocks with their softmax weights.
//!
//! Any file [`crate::convert::import`] reads can be inspected, including encoder-only ones
//! (MAE's released `mae_pretrain_vit_*.pth`): their encoder is checked by building the model
//! with zero placeholders for the decoder, which are never counted or run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use crate::checkpoint;
use crate::config::{Fusion as FusionKind, ModelConfig};
use crate::convert::{self, ModelOverrides};
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

/// `12345678` -> `12,345,678`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Every config field, one `name = value` line each, in declaration order.
pub(crate) fn config_lines(cfg: &ModelConfig) -> Vec<(&'static str, String)> {
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

/// The `inspect` report of the checkpoint at `checkpoint` (see the module docs).
pub fn run(checkpoint: &Path) -> Result<String> {
    run_with(checkpoint, &ModelOverrides::default())
}

/// [`run`] with the architecture fields that a file without a stored config cannot tell.
pub fn run_with(checkpoint: &Path, overrides: &ModelOverrides) -> Result<String> {
    let inspecting = || format!("inspecting {}", checkpoint.display());
    let imported = convert::import(checkpoint, overrides, DType::F32, &Device::Cpu)
        .with_context(inspecting)?;
    let cfg = &imported.cfg;
    let mut tensors = imported.tensors.clone();
    if imported.encoder_only {
        tensors.extend(checkpoint::decoder_placeholders(cfg).with_context(inspecting)?);
    }
    let (model, _) = checkpoint::build_model(checkpoint, cfg, tensors, DType::F32, &Device::Cpu)
        .with_context(inspecting)?;
    let stored = ParamStore::from_tensors(imported.tensors.clone())?;
    let mut r = String::new();
    writeln!(r, "checkpoint: {}", checkpoint.display())?;
    writeln!(r, "format: {}", imported.describe())?;
    match imported.metadata.get("step") {
        Some(step) => writeln!(r, "step: {step}")?,
        None => writeln!(r, "step: (not recorded)")?,
    }
    if let Some(epoch) = imported.metadata.get("epoch") {
        writeln!(r, "epoch: {epoch}")?;
    }
    for note in &imported.notes {
        writeln!(r, "note: {note}")?;
    }
    if cfg.is_mff() {
        writeln!(
            r,
            "model: MFF-MAE ({} fusion, {} projection)",
            format!("{:?}", cfg.fusion).to_lowercase(),
            format!("{:?}", cfg.projection).to_lowercase()
        )?;
    } else {
        writeln!(r, "model: MAE (no fusion)")?;
    }
    if imported.encoder_only {
        writeln!(
            r,
            "encoder only: the file has no decoder (commands other than inspect need one)"
        )?;
    }

    writeln!(r, "\nconfig:")?;
    let why: BTreeMap<&str, &str> = imported
        .inferred
        .iter()
        .flatten()
        .map(|(f, w)| (*f, w.as_str()))
        .collect();
    for (name, value) in config_lines(cfg) {
        let decoder_field = name.starts_with("decoder_");
        if imported.encoder_only && decoder_field {
            writeln!(r, "  {name:<18} (no decoder in the file)")?;
        } else if let Some(w) = why.get(name) {
            writeln!(r, "  {name:<18} {value}  ({w})")?;
        } else {
            writeln!(r, "  {name:<18} {value}")?;
        }
    }

    let c = ParamCounts::of(&stored);
    let mut rows: Vec<(String, usize)> = vec![
        ("patch_embed".into(), c.part(Part::PatchEmbed)),
        ("cls_token + pos_embed".into(), c.part(Part::ClsPos)),
        (
            format!("encoder blocks ({})", cfg.depth),
            c.part(Part::Blocks),
        ),
        ("final norm".into(), c.part(Part::Norm)),
    ];
    if cfg.is_mff() {
        let pieces: Vec<String> = [
            ("proj_layers", Part::ProjLayers),
            ("proj_weights", Part::ProjWeights),
            ("fusion_attn", Part::FusionAttn),
        ]
        .iter()
        .filter(|(_, p)| c.part(*p) > 0)
        .map(|(name, p)| format!("{name} {}", thousands(c.part(*p))))
        .collect();
        rows.push((format!("fusion ({})", pieces.join(", ")), c.fusion()));
    }
    let decoder = if imported.encoder_only {
        "decoder (none in the file)".to_string()
    } else {
        format!(
            "decoder ({} blocks, mask_token, decoder_pos_embed)",
            cfg.decoder_depth
        )
    };
    rows.push((decoder, c.part(Part::Decoder)));
    if c.part(Part::Other) > 0 {
        rows.push(("other".into(), c.part(Part::Other)));
    }
    rows.push((
        format!("total trainable (excludes frozen {})", FROZEN.join(", ")),
        c.trainable,
    ));
    rows.push(("total".into(), c.total));
    writeln!(r, "\nparameters (scalars):")?;
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    for (name, n) in &rows {
        writeln!(r, "  {name:<width$} {:>12}", thousands(*n))?;
    }
    writeln!(r)?;
    match model.fusion() {
        None => writeln!(r, "fusion: MAE (no fusion)")?,
        Some(f) => match f.weights()? {
            None => {
                debug_assert_eq!(cfg.fusion, FusionKind::Attention);
                writeln!(r, "fused blocks (0-based): {:?}", cfg.fused_blocks())?;
                writeln!(r, "attention fusion: no scalar weights")?;
            }
            Some(w) => {
                let w = w.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                writeln!(r, "fused blocks (0-based) and softmax weights:")?;
                for (block, weight) in cfg.fused_blocks().iter().zip(&w) {
                    let last = if *block + 1 == cfg.depth {
                        " (last)"
                    } else {
                        ""
                    };
                    writeln!(r, "  block {block:>3}{last:<7} {weight:.6}")?;
                }
            }
        },
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Fusion as FusionKind, ModelConfig};
    use crate::model::Mae;
    use std::collections::HashMap;

    fn tiny() -> ModelConfig {
        crate::config::test_config()
    }

    fn save(
        dir: &Path,
        cfg: &ModelConfig,
        meta: HashMap<String, String>,
    ) -> (std::path::PathBuf, ParamStore) {
        let (_, store) = Mae::init(cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let path = dir.join("m.safetensors");
        checkpoint::save_weights(&path, cfg, &store, meta).unwrap();
        (path, store)
    }

    /// Scalars of one ViT block of width d and MLP width 4d:
    /// norm1 2d, qkv d*3d+3d, proj d*d+d, norm2 2d, fc1 d*4d+4d, fc2 4d*d+d.
    fn block(d: usize) -> usize {
        2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    }

    #[test]
    fn counts_match_a_hand_count_and_add_up() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = tiny();
        let (path, store) = save(tmp.path(), &cfg, HashMap::new());
        let c = ParamCounts::of(&store);
        // D 32, Dd 16, p 4, L 16, P 48.
        assert_eq!(c.part(Part::PatchEmbed), 32 * 48 + 32); // 1568
        assert_eq!(c.part(Part::ClsPos), 32 + 17 * 32); // 576
        assert_eq!(block(32), 12704);
        assert_eq!(c.part(Part::Blocks), 2 * 12704);
        assert_eq!(c.part(Part::Norm), 64);
        // decoder_embed 32*16+16, mask_token 16, decoder_pos_embed 17*16, one block,
        // decoder_norm 32, decoder_pred 16*48+48.
        assert_eq!(c.part(Part::Decoder), 528 + 16 + 272 + block(16) + 32 + 816); // 4944
        assert_eq!(c.fusion(), 0);
        assert_eq!(c.part(Part::Other), 0);
        assert_eq!(c.total, 32560);
        assert_eq!(c.per_part.values().sum::<usize>(), c.total);
        assert_eq!(c.trainable, 32560 - 17 * 32 - 17 * 16);

        let report = run(&path).unwrap();
        assert!(report.contains(&path.display().to_string()));
        assert!(report.contains("MAE (no fusion)"), "{report}");
        assert!(report.contains("step: (not recorded)"), "{report}");
        assert!(report.contains("32,560"), "{report}");
        assert!(report.contains("31,744"), "{report}");
        for field in [
            "img_size",
            "patch_size",
            "decoder_num_heads",
            "norm_pix_loss",
            "fuse_layers",
            "fusion",
        ] {
            assert!(report.contains(field), "missing {field}: {report}");
        }
    }

    #[test]
    fn fresh_mff_weights_are_uniform() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = ModelConfig {
            depth: 3,
            fuse_layers: vec![0, 1],
            ..tiny()
        };
        let meta = HashMap::from([("step".to_string(), "42".to_string())]);
        let (path, store) = save(tmp.path(), &cfg, meta);
        let c = ParamCounts::of(&store);
        assert_eq!(c.part(Part::ProjLayers), 2 * (32 * 32 + 32));
        assert_eq!(c.part(Part::ProjWeights), 3);
        assert_eq!(c.per_part.values().sum::<usize>(), c.total);
        let report = run(&path).unwrap();
        assert!(report.contains("step: 42"), "{report}");
        assert!(report.contains("MFF-MAE"), "{report}");
        for block in [0, 1, 2] {
            let line = report
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("block {block:>3}")))
                .unwrap_or_else(|| panic!("no line for block {block}: {report}"));
            assert!(line.ends_with("0.333333"), "{line}");
        }
    }

    #[test]
    fn attention_fusion_has_no_scalar_weights() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = ModelConfig {
            fuse_layers: vec![0],
            fusion: FusionKind::Attention,
            ..tiny()
        };
        let (path, store) = save(tmp.path(), &cfg, HashMap::new());
        let c = ParamCounts::of(&store);
        assert_eq!(c.part(Part::ProjWeights), 0);
        // fusion_attn: qkv 32*96+96, proj 32*32+32.
        assert_eq!(c.part(Part::FusionAttn), 3168 + 1056);
        let report = run(&path).unwrap();
        assert!(
            report.contains("attention fusion: no scalar weights"),
            "{report}"
        );
    }

    #[test]
    fn missing_file_is_named() {
        let e = run(Path::new("/no/such/ckpt.safetensors")).unwrap_err();
        assert!(
            format!("{e:#}").contains("/no/such/ckpt.safetensors"),
            "{e:#}"
        );
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(86_859_496), "86,859,496");
    }
}
