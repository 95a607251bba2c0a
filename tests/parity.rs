//! Golden parity against the PyTorch reference (tests/reference/torch_reference.py, torch 2.15
//! CPU, float64 maths rounded to f32; see tests/reference/README.md). The same f32 weights,
//! images and masking noise go through our f32 model; every intermediate, the loss and the
//! gradient of every trainable tensor must match.

use candle_core::{DType, Device, Tensor};
use mimscope::checkpoint::load_model;
use mimscope::model::{masking::patchify, Mae, Mask, ParamStore};

use crate::common::{assert_close, fixture, load, to_vec};

// f32 forward against a float64 reference: activations of order 1 agree to ~1e-6; the
// tolerances leave an order of magnitude of room and still catch any real bug (a wrong eps,
// tanh GELU or biased variance moves values by >1e-3).
const RTOL: f64 = 1e-4;
const ATOL: f64 = 1e-5;

fn check_variant(name: &str) {
    let loaded = load_model(
        &fixture(&format!("{name}_tiny.safetensors")),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("PyTorch-written checkpoint must load: {e:#}"));
    let (model, store) = (loaded.model, loaded.store);
    let io = load(&format!("{name}_tiny_io.safetensors"), DType::F32);
    let cfg = model.cfg.clone();
    let imgs = &io["images"];
    let (b, l) = io["noise"].dims2().unwrap();
    let noise: Vec<f32> = io["noise"].flatten_all().unwrap().to_vec1().unwrap();
    let mask = Mask::from_noise(&noise, b, l, 0.75);

    // Masking indices are exact.
    let as_u32 = |t: &Tensor| to_vec(t).iter().map(|&v| v as u32).collect::<Vec<_>>();
    assert_eq!(mask.ids_keep, as_u32(&io["ids_keep"]), "{name}: ids_keep");
    assert_eq!(
        mask.ids_restore,
        as_u32(&io["ids_restore"]),
        "{name}: ids_restore"
    );
    assert_eq!(
        mask.mask,
        to_vec(&io["mask"])
            .iter()
            .map(|&v| v as f32)
            .collect::<Vec<_>>()
    );
    assert_close(
        "patchify",
        &patchify(imgs, cfg.patch_size).unwrap(),
        &io["patches"],
        0.0,
        0.0,
    );

    let out = model.forward(imgs, &mask).unwrap();
    for i in 0..cfg.depth {
        assert_close(
            &format!("{name} block_{i}"),
            &out.encoder.layers[i + 1],
            &io[&format!("block_{i}")],
            RTOL,
            ATOL,
        );
    }
    if cfg.is_mff() {
        assert_close(
            &format!("{name} fused"),
            out.encoder.fused.as_ref().unwrap(),
            &io["fused"],
            RTOL,
            ATOL,
        );
    } else {
        assert!(out.encoder.fused.is_none());
    }
    assert_close(
        &format!("{name} latent"),
        &out.encoder.latent,
        &io["latent"],
        RTOL,
        ATOL,
    );
    assert_close(&format!("{name} pred"), &out.pred, &io["pred"], RTOL, ATOL);
    assert_close(
        &format!("{name} loss"),
        &out.loss.reshape(1).unwrap(),
        &io["loss"],
        1e-5,
        0.0,
    );

    // Unmasked encoder: residual stream after the embedding and after every block.
    let trace = model.forward_encoder_unmasked(imgs).unwrap();
    assert_eq!(trace.layers.len(), cfg.depth + 1);
    for (i, layer) in trace.layers.iter().enumerate() {
        assert_close(
            &format!("{name} unmasked_{i}"),
            layer,
            &io[&format!("unmasked_{i}")],
            RTOL,
            ATOL,
        );
    }

    // Gradients of every trainable tensor, against torch.autograd.
    let grads = out.loss.backward().unwrap();
    let mut checked = 0;
    for (pname, var) in store.trainable() {
        let expected = io
            .get(&format!("grad.{pname}"))
            .unwrap_or_else(|| panic!("{name}: fixture lacks grad.{pname}"));
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: `{pname}` received no gradient"));
        // Gradients are smaller than activations; scale atol with the tensor's magnitude.
        let scale = to_vec(expected).iter().fold(0f64, |m, v| m.max(v.abs()));
        assert_close(
            &format!("{name} grad.{pname}"),
            g,
            expected,
            1e-3,
            1e-4 * scale + 1e-8,
        );
        checked += 1;
    }
    let expected_count = io.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(
        checked, expected_count,
        "{name}: every reference gradient is compared"
    );

    // The same weights without norm_pix_loss.
    let mut plain = cfg.clone();
    plain.norm_pix_loss = false;
    let m2 = Mae::from_store(&plain, &store, DType::F32, &Device::Cpu).unwrap();
    let loss2 = m2.forward(imgs, &mask).unwrap().loss;
    assert_close(
        &format!("{name} loss_no_norm_pix"),
        &loss2.reshape(1).unwrap(),
        &io["loss_no_norm_pix"],
        1e-5,
        0.0,
    );
}

#[test]
fn mae_matches_pytorch() {
    check_variant("mae");
}

#[test]
fn mff_weighted_linear_matches_pytorch() {
    check_variant("mff");
}

#[test]
fn mff_attention_mlp_matches_pytorch() {
    check_variant("mffattn");
}

#[test]
fn position_tables_match_mae() {
    let t = load("pos_embed.safetensors", DType::F32);
    let ours = mimscope::model::pos_embed::sincos_2d(768, 14);
    let ours = Tensor::from_vec(ours, (197, 768), &Device::Cpu).unwrap();
    assert_close("pos_768_14", &ours, &t["pos_768_14"], 0.0, 1e-6);
    let ours = Tensor::from_vec(
        mimscope::model::pos_embed::sincos_2d(16, 4),
        (17, 16),
        &Device::Cpu,
    )
    .unwrap();
    assert_close("pos_16_4", &ours, &t["pos_16_4"], 0.0, 1e-6);
}

#[test]
fn init_writes_mae_tables_and_names() {
    // A fresh model has exactly the reference's tensor names and shapes, and MAE's frozen tables.
    let reference = load("mff_tiny.safetensors", DType::F32);
    let cfg = load_model(&fixture("mff_tiny.safetensors"), DType::F32, &Device::Cpu)
        .unwrap()
        .model
        .cfg;
    let (_, store): (Mae, ParamStore) = Mae::init(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let ours = store.tensors();
    let names = |m: &std::collections::BTreeMap<String, Tensor>| {
        m.iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&ours), names(&reference));
    assert_close(
        "pos_embed",
        &ours["pos_embed"],
        &reference["pos_embed"],
        0.0,
        1e-6,
    );
    assert_close(
        "decoder_pos_embed",
        &ours["decoder_pos_embed"],
        &reference["decoder_pos_embed"],
        0.0,
        1e-6,
    );
}
