//! Checkpoints written by other code: the `.pth` fixtures of tests/reference/pth_reference.py
//! (the safetensors fixtures of torch_reference.py, re-saved with torch.save in mmpretrain's and
//! facebookresearch/mae's layouts; see tests/reference/README.md), `mimscope convert`, and
//! `inspect` on such files.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use mimscope::checkpoint::import::{import, KeyLayout, Source};
use mimscope::checkpoint::pth::{self, Wrapper};
use mimscope::checkpoint::ModelOverrides;
use mimscope::checkpoint::{load_model, load_model_with, load_tensors, save_tensors};
use mimscope::config::{ModelConfig, Preset};
use mimscope::model::{Mae, Mask};

use crate::common::{assert_close, fixture, load, to_vec};

/// The flags the fixtures need: their widths (32, decoder 24) are no preset's.
fn tiny_flags(fuse: Option<&str>) -> ModelOverrides {
    ModelOverrides {
        num_heads: Some(4),
        decoder_num_heads: Some(3),
        fuse_layers: fuse.map(str::to_string),
        norm_pix_loss: None,
    }
}

/// Every tensor's f32 bits, by name.
fn bits(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, (Vec<usize>, Vec<u32>)> {
    tensors
        .iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (
                k.clone(),
                (t.dims().to_vec(), v.iter().map(|x| x.to_bits()).collect()),
            )
        })
        .collect()
}

/// The config that torch_reference.py stored in a safetensors fixture.
fn stored_config(name: &str) -> ModelConfig {
    let f = load_tensors(&fixture(name), DType::F32, &Device::Cpu).unwrap();
    ModelConfig::from_json(&f.metadata["config"]).unwrap()
}

#[test]
fn mmpretrain_pth_holds_the_mff_fixture() {
    let path = fixture("mff_tiny_mmpretrain.pth");
    let raw = pth::read(&path).unwrap();
    assert_eq!(raw.wrapper, Wrapper::StateDict);
    assert_eq!(raw.top_level, vec!["meta", "state_dict"]);
    assert_eq!(raw.epoch, Some(300)); // meta.epoch
    assert_eq!(raw.other_entries, vec!["_metadata"]);
    assert!(raw.tensors.contains_key("neck.ln1.weight"));
    assert!(raw.tensors.contains_key("backbone.ln1.weight"));

    let imp = import(&path, &tiny_flags(Some("0,2")), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(imp.layout, KeyLayout::Mmpretrain);
    assert!(!imp.encoder_only);
    assert!(imp.notes.is_empty(), "{:?}", imp.notes);
    assert_eq!(
        bits(&imp.tensors),
        bits(&load("mff_tiny.safetensors", DType::F32))
    );
    // Shapes + the three flags give exactly the reference's config.
    assert_eq!(imp.cfg, stored_config("mff_tiny.safetensors"));
    assert!(imp.inferred.is_some());
}

#[test]
fn facebookresearch_pth_holds_the_mae_fixture() {
    let path = fixture("mae_tiny_fbmae.pth");
    let raw = pth::read(&path).unwrap();
    assert_eq!(raw.wrapper, Wrapper::Model);
    // The optimizer state, scaler and argparse Namespace parse, and are not read.
    assert_eq!(
        raw.top_level,
        vec!["args", "epoch", "model", "optimizer", "scaler"]
    );
    assert_eq!(raw.epoch, Some(3));
    let imp = import(&path, &tiny_flags(None), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(imp.layout, KeyLayout::Mae);
    assert_eq!(
        bits(&imp.tensors),
        bits(&load("mae_tiny.safetensors", DType::F32))
    );
    assert_eq!(imp.cfg, stored_config("mae_tiny.safetensors"));
    assert_eq!(imp.metadata.get("epoch").map(String::as_str), Some("3"));
}

#[test]
fn encoder_only_pth_is_inspected_but_not_loaded() {
    let path = fixture("mae_tiny_encoder.pth");
    let imp = import(&path, &tiny_flags(None), DType::F32, &Device::Cpu).unwrap();
    assert!(imp.encoder_only);
    let mut encoder = load("mae_tiny.safetensors", DType::F32);
    encoder.retain(|k, _| !k.starts_with("decoder_") && k != "mask_token");
    assert_eq!(bits(&imp.tensors), bits(&encoder));

    let err = load_model_with(&path, &tiny_flags(None), DType::F32, &Device::Cpu)
        .err()
        .expect("an encoder-only file cannot build the model");
    let err = format!("{err:#}");
    assert!(
        err.contains("encoder only") && err.contains("inspect"),
        "{err}"
    );

    let report = mimscope::commands::inspect::run_with(&path, &tiny_flags(None)).unwrap();
    let scalars: usize = encoder.values().map(|t| t.elem_count()).sum();
    let total = report
        .lines()
        .find(|l| l.trim_start().starts_with("total ") && !l.contains("trainable"))
        .unwrap_or_else(|| panic!("no total: {report}"));
    let count = scalars.to_string();
    let with_commas = format!(
        "{},{}",
        &count[..count.len() - 3],
        &count[count.len() - 3..]
    );
    assert!(total.ends_with(&with_commas), "{total} vs {scalars}");
    assert!(report.contains("decoder (none in the file)"), "{report}");
    assert!(
        report.contains("decoder_depth      (no decoder in the file)"),
        "{report}"
    );
}

#[test]
fn model_from_the_mmpretrain_pth_gives_the_reference_loss() {
    let loaded = load_model_with(
        &fixture("mff_tiny_mmpretrain.pth"),
        &tiny_flags(Some("0,2")),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let io = load("mff_tiny_io.safetensors", DType::F32);
    let (b, l) = io["noise"].dims2().unwrap();
    let noise: Vec<f32> = io["noise"].flatten_all().unwrap().to_vec1().unwrap();
    let mask = Mask::from_noise(&noise, b, l, 0.75);
    let out = loaded.model.forward(&io["images"], &mask).unwrap();
    // Same tolerances as tests/parity.rs (f32 against the float64 reference).
    assert_close("pth pred", &out.pred, &io["pred"], 1e-4, 1e-5);
    assert_close(
        "pth loss",
        &out.loss.reshape(1).unwrap(),
        &io["loss"],
        1e-5,
        0.0,
    );
    let w = loaded.model.fusion().unwrap().weights().unwrap().unwrap();
    // README: softmax(proj_weights) for mff = [0.19674, 0.33211, 0.47114].
    let w = to_vec(&w);
    for (got, want) in w.iter().zip([0.19674, 0.33211, 0.47114]) {
        assert!((got - want).abs() < 1e-5, "{w:?}");
    }
}

#[test]
fn odd_tensor_layouts_read_exactly() {
    // pth_reference.py odd_layouts(): every value is an arange, stored as a view.
    let raw = pth::read(&fixture("odd_layouts.pth")).unwrap();
    assert_eq!(raw.wrapper, Wrapper::Bare);
    assert_eq!(raw.other_entries, vec!["not_a_tensor"]);
    let t = &raw.tensors;
    let check = |name: &str, dims: &[usize], values: &[f64]| {
        assert_eq!(t[name].dims(), dims, "{name}");
        assert_eq!(to_vec(&t[name]), values, "{name}");
    };
    // arange(6).reshape(2,3).t(): column-major view.
    check("transposed", &[3, 2], &[0., 3., 1., 4., 2., 5.]);
    // arange(12).reshape(3,4)[:, ::2].
    check("strided", &[3, 2], &[0., 2., 4., 6., 8., 10.]);
    // arange(20)[5:11].view(2,3): offset 5 into a storage shared with `shared_whole`.
    check("offset_view", &[2, 3], &[5., 6., 7., 8., 9., 10.]);
    check(
        "shared_whole",
        &[20],
        &(0..20).map(f64::from).collect::<Vec<_>>(),
    );
    for (name, dtype) in [
        ("half", DType::F16),
        ("bfloat16", DType::BF16),
        ("double", DType::F64),
        ("long", DType::I64),
    ] {
        assert_eq!(t[name].dtype(), dtype, "{name}");
        check(name, &[4], &[0., 1., 2., 3.]);
    }
    check("scalar", &[], &[2.5]);
}

#[test]
fn unreadable_files_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = |path: &Path| {
        format!(
            "{:#}",
            load_model(path, DType::F32, &Device::Cpu)
                .err()
                .expect("must fail")
        )
    };
    let e = err(&fixture("no_weights.pth"));
    assert!(
        e.contains("no state dict")
            && e.contains("`state_dict`")
            && e.contains("`model`")
            && e.contains("epoch, meta, note"),
        "{e}"
    );
    let e = err(&fixture("legacy_format.pth"));
    assert!(e.contains("legacy") && e.contains("torch.save"), "{e}");
    let junk = tmp.path().join("junk.pth");
    std::fs::write(&junk, b"<html>not found</html>").unwrap();
    let e = err(&junk);
    assert!(
        e.contains("not a PyTorch checkpoint") && e.contains("junk.pth"),
        "{e}"
    );
    // A zip signature with nothing behind it.
    let cut = tmp.path().join("cut.pth");
    let bytes = std::fs::read(fixture("mae_tiny_fbmae.pth")).unwrap();
    std::fs::write(&cut, &bytes[..1000]).unwrap();
    let e = err(&cut);
    assert!(e.contains("cut.pth") && e.contains("truncated"), "{e}");
    // Heads of a width no preset has.
    let e = err(&fixture("mae_tiny_fbmae.pth"));
    assert!(e.contains("--num-heads") && e.contains("32 wide"), "{e}");
}

/// `mmpretrain` name of an MAE key (independent of the crate's mapping: docs/reference.md sections
/// 1-2 and mmpretrain's `neck.ln1` decoder norm).
fn to_mmpretrain(key: &str) -> String {
    let block = |sub: &str| {
        for (ours, theirs) in [
            ("norm1.", "ln1."),
            ("norm2.", "ln2."),
            ("mlp.fc1.", "ffn.layers.0.0."),
            ("mlp.fc2.", "ffn.layers.1."),
            ("attn.", "attn."),
        ] {
            if let Some(rest) = sub.strip_prefix(ours) {
                return format!("{theirs}{rest}");
            }
        }
        panic!("{sub}")
    };
    let split = |rest: &str| {
        let (i, sub) = rest.split_once('.').unwrap();
        format!("{i}.{}", block(sub))
    };
    if let Some(rest) = key.strip_prefix("blocks.") {
        format!("backbone.layers.{}", split(rest))
    } else if let Some(rest) = key.strip_prefix("decoder_blocks.") {
        format!("neck.decoder_blocks.{}", split(rest))
    } else if let Some(rest) = key.strip_prefix("patch_embed.proj.") {
        format!("backbone.patch_embed.projection.{rest}")
    } else if let Some(rest) = key.strip_prefix("norm.") {
        format!("backbone.ln1.{rest}")
    } else if let Some(rest) = key.strip_prefix("decoder_norm.") {
        format!("neck.ln1.{rest}")
    } else if key.starts_with("decoder_") || key == "mask_token" {
        format!("neck.{key}")
    } else {
        format!("backbone.{key}")
    }
}

#[test]
fn standard_widths_need_no_flags() {
    // The tiny preset as MFF with mmpretrain's default fused blocks, saved with mmpretrain names
    // and no config: load_model infers the whole config, heads and fused blocks included.
    let cfg = ModelConfig {
        fuse_layers: vec![0, 2, 4, 6, 8],
        ..Preset::Tiny.config()
    };
    let (_, store) = Mae::init(&cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let renamed: BTreeMap<String, Tensor> = store
        .tensors()
        .into_iter()
        .map(|(k, t)| (to_mmpretrain(&k), t))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mmpretrain_names.safetensors");
    save_tensors(&path, &renamed, HashMap::new()).unwrap();
    let loaded = load_model(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.cfg, cfg);
    assert_eq!(bits(&loaded.store.tensors()), bits(&store.tensors()));
    let imp = import(&path, &ModelOverrides::default(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(imp.source, Source::Safetensors);
    assert_eq!(imp.layout, KeyLayout::Mmpretrain);
}

// ---- the real binary -------------------------------------------------------------------

fn mimscope(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mimscope"))
        .args(args)
        .output()
        .expect("run mimscope")
}

fn ok(args: &[&str]) -> String {
    let out = mimscope(args);
    assert!(
        out.status.success(),
        "mimscope {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let out = mimscope(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "mimscope {args:?} should fail");
    err
}

const FLAGS: [&str; 4] = ["--num-heads", "4", "--decoder-num-heads", "3"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn convert_then_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mff.safetensors");
    let pth = fixture("mff_tiny_mmpretrain.pth");
    let mut args = vec!["convert", s(&pth), s(&out)];
    args.extend(FLAGS);
    args.extend(["--fuse-layers", "0,2"]);
    let report = ok(&args);
    for needle in [
        "mmpretrain",
        "neck.ln1 -> decoder_norm",
        "fuse_layers        [0, 2]  (--fuse-layers)",
        "norm_pix_loss      true  (not in the weights",
        "epoch: 300",
        "wrote:",
    ] {
        assert!(report.contains(needle), "{needle} not in:\n{report}");
    }
    // The output is the reference's weights and config, in mimscope's format.
    let written = load_tensors(&out, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        bits(&written.tensors),
        bits(&load("mff_tiny.safetensors", DType::F32))
    );
    assert_eq!(
        ModelConfig::from_json(&written.metadata["config"]).unwrap(),
        stored_config("mff_tiny.safetensors")
    );
    assert_eq!(
        written.metadata["converted_from"],
        "mff_tiny_mmpretrain.pth"
    );

    // inspect reads the converted file without flags, and the .pth with them, alike.
    let converted = ok(&["inspect", s(&out)]);
    let mut args = vec!["inspect", s(&pth)];
    args.extend(FLAGS);
    args.extend(["--fuse-layers", "0,2"]);
    let direct = ok(&args);
    let from = |r: &str, start: &str| r[r.find(start).unwrap()..].to_string();
    assert_eq!(
        from(&converted, "parameters"),
        from(&direct, "parameters"),
        "{converted}\n{direct}"
    );
    assert!(
        converted.contains("block   3 (last) 0.471144"),
        "{converted}"
    );
    assert!(direct.contains("mmpretrain names"), "{direct}");

    // A safetensors without config converts too (here with --no-norm-pix-loss).
    let bare = tmp.path().join("bare.safetensors");
    save_tensors(
        &bare,
        &load("mae_tiny.safetensors", DType::F32),
        HashMap::new(),
    )
    .unwrap();
    let out2 = tmp.path().join("mae.safetensors");
    let mut args = vec!["convert", s(&bare), s(&out2), "--no-norm-pix-loss"];
    args.extend(FLAGS);
    ok(&args);
    let cfg = load_model(&out2, DType::F32, &Device::Cpu)
        .unwrap()
        .model
        .cfg;
    let expected = ModelConfig {
        norm_pix_loss: false,
        ..stored_config("mae_tiny.safetensors")
    };
    assert_eq!(cfg, expected);
}

#[test]
fn convert_errors_name_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    let pth = fixture("mff_tiny_mmpretrain.pth");
    // Heads of a width no preset has.
    let e = fails(&["convert", s(&pth), s(&out)]);
    assert!(e.contains("--num-heads N"), "{e}");
    // Fused blocks: mmpretrain's default scaled to 4 blocks is 3 shallow blocks, the file has 2.
    let mut args = vec!["convert", s(&pth), s(&out)];
    args.extend(FLAGS);
    let e = fails(&args);
    assert!(
        e.contains("--fuse-layers") && e.contains("[0, 1, 2]"),
        "{e}"
    );
    args.extend(["--fuse-layers", "1"]);
    let e = fails(&args);
    assert!(
        e.contains("lists 1 block(s)") && e.contains("fuses 2"),
        "{e}"
    );
    // Encoder only.
    let enc = fixture("mae_tiny_encoder.pth");
    let mut args = vec!["convert", s(&enc), s(&out)];
    args.extend(FLAGS);
    let e = fails(&args);
    assert!(e.contains("encoder only") && e.contains("_full.pth"), "{e}");
    // The output must be safetensors.
    let mut args = vec!["convert", s(&pth), "out.pth"];
    args.extend(FLAGS);
    let e = fails(&args);
    assert!(e.contains("*.safetensors"), "{e}");
    assert!(!out.exists());
}
