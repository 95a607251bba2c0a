//! Tests of [`super::infer_config`]: shape maps of the presets and of tiny models, with and
//! without the flags that shapes cannot replace.

use super::*;

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
    let inf = infer_config(&shapes(1024, 24, 224, 16, None), &ModelOverrides::default()).unwrap();
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
