//! `mimscope inspect`: what a checkpoint holds, without running it.
//!
//! The report names the file, its training step (metadata `step`, when present), every field of
//! the stored [`ModelConfig`](crate::config::ModelConfig), the number of scalars per part of the
//! model (MAE state-dict prefixes, see [`Part`]), the trainable total (everything but the frozen
//! sin-cos tables [`FROZEN`]) and, for MFF, the fused blocks with their softmax weights.
//!
//! Any file [`checkpoint::import::import`] reads can be inspected, including encoder-only ones
//! (MAE's released `mae_pretrain_vit_*.pth`): their encoder is checked by building the model
//! with zero placeholders for the decoder, which are never counted or run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use crate::checkpoint::describe::{config_lines, ParamCounts, Part};
use crate::checkpoint::import::{import, Imported};
use crate::checkpoint::{self, ModelOverrides};
use crate::config::Fusion as FusionKind;
use crate::model::params::FROZEN;
use crate::model::{Mae, ParamStore};

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

/// The `inspect` report of the checkpoint at `checkpoint` (see the module docs).
pub fn run(checkpoint: &Path) -> Result<String> {
    run_with(checkpoint, &ModelOverrides::default())
}

/// [`run`] with the architecture fields that a file without a stored config cannot tell.
pub fn run_with(checkpoint: &Path, overrides: &ModelOverrides) -> Result<String> {
    let inspecting = || format!("inspecting {}", checkpoint.display());
    let imported =
        import(checkpoint, overrides, DType::F32, &Device::Cpu).with_context(inspecting)?;
    let cfg = &imported.cfg;
    let mut tensors = imported.tensors.clone();
    if imported.encoder_only {
        tensors.extend(checkpoint::decoder_placeholders(cfg).with_context(inspecting)?);
    }
    let (model, _) = checkpoint::build_model(checkpoint, cfg, tensors, DType::F32, &Device::Cpu)
        .with_context(inspecting)?;
    let stored = ParamStore::from_tensors(imported.tensors.clone())?;
    let mut r = String::new();
    write_header(&mut r, checkpoint, &imported)?;
    write_config(&mut r, &imported)?;
    write_parameters(&mut r, &imported, &ParamCounts::of(&stored))?;
    writeln!(r)?;
    write_fusion(&mut r, &imported, &model)?;
    Ok(r)
}

/// The file, its format, step, epoch, the import's notes and the kind of model.
fn write_header(r: &mut String, checkpoint: &Path, imported: &Imported) -> Result<()> {
    let cfg = &imported.cfg;
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
    Ok(())
}

/// Every config field, with where an inferred value came from.
fn write_config(r: &mut String, imported: &Imported) -> Result<()> {
    writeln!(r, "\nconfig:")?;
    let why: BTreeMap<&str, &str> = imported
        .inferred
        .iter()
        .flatten()
        .map(|(f, w)| (*f, w.as_str()))
        .collect();
    for (name, value) in config_lines(&imported.cfg) {
        let decoder_field = name.starts_with("decoder_");
        if imported.encoder_only && decoder_field {
            writeln!(r, "  {name:<18} (no decoder in the file)")?;
        } else if let Some(w) = why.get(name) {
            writeln!(r, "  {name:<18} {value}  ({w})")?;
        } else {
            writeln!(r, "  {name:<18} {value}")?;
        }
    }
    Ok(())
}

/// The scalar counts per part, the trainable total and the total.
fn write_parameters(r: &mut String, imported: &Imported, c: &ParamCounts) -> Result<()> {
    let cfg = &imported.cfg;
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
    Ok(())
}

/// The fused blocks and, for weighted fusion, their softmax weights.
fn write_fusion(r: &mut String, imported: &Imported, model: &Mae) -> Result<()> {
    let cfg = &imported.cfg;
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{test_config, ModelConfig};

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
        let cfg = test_config();
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
            ..test_config()
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
            ..test_config()
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
