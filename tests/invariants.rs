//! Invariants and analytic cases that need no reference file.

use candle_core::{DType, Device, Tensor};
use mimscope::config::{ModelConfig, Preset};
use mimscope::model::{Mae, Mask};
use mimscope::rng::{stream, Purpose};
use rand_distr::{Distribution, StandardNormal};

use crate::common::{assert_close, to_vec};

fn small(fuse: Vec<usize>) -> ModelConfig {
    ModelConfig {
        img_size: 16,
        patch_size: 4,
        embed_dim: 32,
        depth: 4,
        num_heads: 4,
        decoder_embed_dim: 24,
        decoder_depth: 2,
        decoder_num_heads: 3,
        norm_pix_loss: true,
        fuse_layers: fuse,
        ..ModelConfig::default()
    }
}

fn inputs(b: usize, cfg: &ModelConfig, seed: u64) -> (Tensor, Mask) {
    let mut rng = stream(seed, Purpose::Synthetic, 0);
    let s = cfg.img_size;
    let px: Vec<f32> = (0..b * 3 * s * s)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let imgs = Tensor::from_vec(px, (b, 3, s, s), &Device::Cpu).unwrap();
    let mask = Mask::random(b, cfg.num_patches(), 0.75, &mut rng);
    (imgs, mask)
}

#[test]
fn every_trainable_tensor_gets_a_nonzero_gradient_at_init() {
    for cfg in [small(vec![]), small(vec![0, 2]), {
        let mut c = small(vec![1]);
        c.fusion = mimscope::config::Fusion::Attention;
        c.projection = mimscope::config::Projection::Mlp;
        c
    }] {
        let (model, store) = Mae::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let (imgs, mask) = inputs(2, &cfg, 1);
        let grads = model
            .forward(&imgs, &mask)
            .unwrap()
            .loss
            .backward()
            .unwrap();
        for (name, var) in store.trainable() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm: f64 = to_vec(g).iter().map(|v| v * v).sum();
            assert!(norm > 0.0, "{name}: zero gradient");
        }
        for frozen in mimscope::model::params::FROZEN {
            assert!(
                !store.trainable().contains_key(frozen),
                "{frozen} must not be trained"
            );
        }
    }
}

#[test]
fn initial_fusion_weights_are_uniform() {
    let cfg = small(vec![0, 1, 2]);
    let (model, _) = Mae::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let w = to_vec(&model.fusion().unwrap().weights().unwrap().unwrap());
    assert_eq!(w.len(), 4);
    for v in w {
        assert!((v - 0.25).abs() < 1e-7);
    }
}

#[test]
fn mff_weighted_towards_the_last_layer_equals_mae() {
    // With logits that put all weight on the last block, fusion passes the last block through
    // unchanged: the MFF model must give MAE's loss on MAE's shared weights.
    let mff_cfg = small(vec![0, 2]);
    let (_, mff_store) = Mae::init(&mff_cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let mut tensors = mff_store.tensors();
    tensors.insert(
        "proj_weights".into(),
        Tensor::new(&[-1e4f32, -1e4, 0.0], &Device::Cpu)
            .unwrap()
            .reshape((3, 1, 1, 1))
            .unwrap(),
    );
    let mff_store = mimscope::model::ParamStore::from_tensors(tensors.clone()).unwrap();
    let mff = Mae::from_store(&mff_cfg, &mff_store, DType::F32, &Device::Cpu).unwrap();
    tensors.retain(|k, _| !k.starts_with("proj_"));
    let mae_cfg = small(vec![]);
    let mae_store = mimscope::model::ParamStore::from_tensors(tensors).unwrap();
    let mae = Mae::from_store(&mae_cfg, &mae_store, DType::F32, &Device::Cpu).unwrap();
    let (imgs, mask) = inputs(2, &mae_cfg, 2);
    let a = mff.forward(&imgs, &mask).unwrap();
    let b = mae.forward(&imgs, &mask).unwrap();
    assert_close("latent", &a.encoder.latent, &b.encoder.latent, 0.0, 1e-6);
    assert_close("loss", &a.loss, &b.loss, 0.0, 1e-6);
}

#[test]
fn same_seed_same_init_other_seed_other_init() {
    let cfg = small(vec![0]);
    let a = Mae::init(&cfg, 9, DType::F32, &Device::Cpu)
        .unwrap()
        .1
        .tensors();
    let b = Mae::init(&cfg, 9, DType::F32, &Device::Cpu)
        .unwrap()
        .1
        .tensors();
    let c = Mae::init(&cfg, 10, DType::F32, &Device::Cpu)
        .unwrap()
        .1
        .tensors();
    for (k, t) in &a {
        assert_eq!(to_vec(t), to_vec(&b[k]), "{k}");
    }
    assert_ne!(
        to_vec(&a["blocks.0.attn.qkv.weight"]),
        to_vec(&c["blocks.0.attn.qkv.weight"])
    );
}

#[test]
fn init_follows_mae() {
    let cfg = Preset::Tiny.config();
    let (_, store) = Mae::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let t = store.tensors();
    // Xavier-uniform on the fused (3D, D) qkv: bound sqrt(6 / (D + 3D)).
    let d = cfg.embed_dim as f64;
    let qkv = to_vec(&t["blocks.3.attn.qkv.weight"]);
    let bound = (6.0 / (4.0 * d)).sqrt();
    assert!(qkv.iter().all(|v| v.abs() <= bound));
    assert!(qkv.iter().map(|v| v.abs()).fold(0.0, f64::max) > 0.95 * bound);
    // Patch embedding: xavier on the (D, 3 p^2) view.
    let pe = to_vec(&t["patch_embed.proj.weight"]);
    let bound = (6.0 / (d + 48.0)).sqrt();
    assert!(
        pe.iter().all(|v| v.abs() <= bound)
            && pe.iter().map(|v| v.abs()).fold(0.0, f64::max) > 0.9 * bound
    );
    // Tokens: normal(std .02).
    let cls = to_vec(&t["cls_token"]);
    let std = (cls.iter().map(|v| v * v).sum::<f64>() / cls.len() as f64).sqrt();
    assert!((std - 0.02).abs() < 0.004, "cls std {std}");
    assert!(to_vec(&t["blocks.0.norm1.weight"])
        .iter()
        .all(|&v| v == 1.0));
    assert!(to_vec(&t["blocks.0.attn.qkv.bias"])
        .iter()
        .all(|&v| v == 0.0));
}

#[test]
fn norm_pix_target_uses_the_unbiased_variance() {
    // One patch (p=1, C=3) with values 1, 2, 3: mean 2, unbiased var 1, so the target is
    // (-1, 0, 1) / sqrt(1 + 1e-6). The biased variance (2/3) would give +-1.2247.
    let cfg = ModelConfig {
        img_size: 1,
        patch_size: 1,
        embed_dim: 4,
        depth: 1,
        num_heads: 1,
        decoder_embed_dim: 4,
        decoder_depth: 1,
        decoder_num_heads: 1,
        norm_pix_loss: true,
        ..ModelConfig::default()
    };
    let (model, _) = Mae::init(&cfg, 0, DType::F64, &Device::Cpu).unwrap();
    let img = Tensor::new(&[1f64, 2.0, 3.0], &Device::Cpu)
        .unwrap()
        .reshape((1, 3, 1, 1))
        .unwrap();
    let t = to_vec(&model.target(&img).unwrap());
    let s = (1.0f64 + 1e-6).sqrt();
    for (a, e) in t.iter().zip([-1.0 / s, 0.0, 1.0 / s]) {
        assert!((a - e).abs() < 1e-12, "{t:?}");
    }
}

#[test]
fn loss_counts_removed_patches_only() {
    // Predictions equal to the target on removed patches give zero loss whatever the
    // visible patches hold.
    let cfg = small(vec![]);
    let (model, _) = Mae::init(&cfg, 0, DType::F64, &Device::Cpu).unwrap();
    let (imgs, mask) = inputs(2, &cfg, 4);
    let imgs = imgs.to_dtype(DType::F64).unwrap();
    let target = model.target(&imgs).unwrap();
    let m = mask
        .mask_tensor(DType::F64, &Device::Cpu)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    let noise = (target.ones_like().unwrap() * 7.0).unwrap();
    let pred = (target.broadcast_mul(&m).unwrap()
        + noise.broadcast_mul(&(1.0 - &m).unwrap()).unwrap())
    .unwrap();
    let loss = model
        .loss(&imgs, &pred, &mask)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(loss.abs() < 1e-20, "{loss}");
}

/// Relative L2 distance of two tensors.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (to_vec(a), to_vec(b));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = a.iter().map(|x| x * x).sum();
    (num / den).sqrt()
}

#[test]
fn bf16_matmuls_keep_f32_parameters_gradients_and_loss_close() {
    // Mixed precision on the CPU (training uses it on GPUs only; the arithmetic is the same):
    // every fusion kind, so projections and attention fusion are switched too.
    for cfg in [small(vec![]), small(vec![0, 2]), {
        let mut c = small(vec![1]);
        c.fusion = mimscope::config::Fusion::Attention;
        c.projection = mimscope::config::Projection::Mlp;
        c
    }] {
        let (mut model, store) = Mae::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let (imgs, mask) = inputs(4, &cfg, 2);
        let full = model.forward(&imgs, &mask).unwrap();
        let g_full = full.loss.backward().unwrap();

        model.set_matmul_dtype(Some(DType::BF16));
        let mixed = model.forward(&imgs, &mask).unwrap();
        assert_eq!(mixed.loss.dtype(), DType::F32);
        assert_eq!(mixed.pred.dtype(), DType::F32);
        let (lf, lm) = (to_vec(&full.loss)[0], to_vec(&mixed.loss)[0]);
        // bf16 rounds each product's inputs to 8 significant bits: visibly different from
        // f32, and close.
        let loss_rel = (lf - lm).abs() / lf;
        assert!(loss_rel > 1e-7 && loss_rel < 5e-3, "loss {lf} vs {lm}");
        assert!(rel(&full.encoder.latent, &mixed.encoder.latent) < 3e-2);
        let g_mixed = mixed.loss.backward().unwrap();
        let (mut num, mut den) = (0.0, 0.0);
        for (name, var) in store.trainable() {
            let a = g_full.get(var.as_tensor()).unwrap();
            let b = g_mixed
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient in bf16"));
            assert_eq!(b.dtype(), DType::F32, "{name}: gradient must reach f32");
            let (a, b) = (to_vec(a), to_vec(b));
            num += a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f64>();
            den += a.iter().map(|x| x * x).sum::<f64>();
        }
        assert!(
            (num / den).sqrt() < 5e-2,
            "gradients {:.3e}",
            (num / den).sqrt()
        );
        // The parameters never changed dtype, and switching back is exact f32 again.
        assert!(store
            .trainable()
            .values()
            .all(|v| v.as_tensor().dtype() == DType::F32));
        model.set_matmul_dtype(None);
        let again = model.forward(&imgs, &mask).unwrap();
        assert_eq!(to_vec(&again.loss), to_vec(&full.loss));
    }
}

#[test]
fn gradient_norm_guard_sees_nan_and_measures_the_norm() {
    use mimscope::model::params::DecayRule;
    use mimscope::train::{grad_norm, optim::AdamW};
    let cfg = small(vec![]);
    let (model, store) = Mae::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let opt = AdamW::new(
        store.trainable(),
        0.0,
        DecayRule {
            decay_fusion_weights: true,
        },
    )
    .unwrap();
    let (imgs, mask) = inputs(2, &cfg, 3);
    let loss = model.forward(&imgs, &mask).unwrap().loss;
    let grads = loss.backward().unwrap();
    let by_hand: f64 = store
        .trainable()
        .values()
        .map(|v| {
            to_vec(grads.get(v.as_tensor()).unwrap())
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
        })
        .sum::<f64>()
        .sqrt();
    let norm = grad_norm(&grads, &opt).unwrap();
    assert!(
        (norm - by_hand).abs() < 1e-5 * by_hand,
        "{norm} vs {by_hand}"
    );
    // One NaN pixel poisons the gradient; the guard must see it.
    let mut px = to_vec(&imgs).iter().map(|&v| v as f32).collect::<Vec<_>>();
    px[0] = f32::NAN;
    let bad = Tensor::from_vec(px, imgs.shape(), &Device::Cpu).unwrap();
    let grads = model.forward(&bad, &mask).unwrap().loss.backward().unwrap();
    assert!(!grad_norm(&grads, &opt).unwrap().is_finite());
}
