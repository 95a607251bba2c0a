//! End-to-end runs of the real binary in temporary folders.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::write_pngs;

const SMALL: &[&str] = &[
    "--img-size",
    "16",
    "--patch-size",
    "4",
    "--embed-dim",
    "32",
    "--depth",
    "3",
    "--num-heads",
    "2",
    "--decoder-embed-dim",
    "16",
    "--decoder-depth",
    "1",
    "--decoder-num-heads",
    "2",
    "--batch-size",
    "4",
];

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mimscope"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run mimscope")
}

fn ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "mimscope {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Fails, and returns stderr.
fn fails(args: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "mimscope {args:?} should fail; stderr:\n{err}"
    );
    err
}

fn train_args<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--model",
        "mff",
        "--fuse-layers",
        "0",
        "--data",
        data,
        "--out",
        out,
    ];
    a.extend_from_slice(SMALL);
    a.extend_from_slice(extra);
    a
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// metrics.csv without the timing column.
fn metrics_without_timing(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_string())
        .collect()
}

/// Every tensor of a weights file, bit for bit (the files' headers hold metadata in hash order).
fn weights(path: &Path) -> Vec<(String, Vec<u32>)> {
    let f = mimscope::checkpoint::load_tensors(
        path,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    f.tensors
        .iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (k.clone(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn data_dir(tmp: &Path) -> PathBuf {
    let d = tmp.join("data");
    write_pngs(&d.join("a"), 5, 40, 24);
    write_pngs(&d.join("b"), 3, 20, 30);
    d
}

#[test]
fn train_reconstruct_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let run = tmp.path().join("run");
    let out = ok(&train_args(
        s(&data),
        s(&run),
        &["--steps", "4", "--save-every", "2"],
    ));
    // Batches come from the prefetching thread; the run reports how long steps waited.
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("data: the steps waited"), "{log}");
    for f in [
        "config.json",
        "metrics.csv",
        "fusion_weights.csv",
        "final.safetensors",
        "reconstruction/reconstruction.png",
        "checkpoints/step_0000002.safetensors",
        "checkpoints/step_0000002.state.safetensors",
        "checkpoints/step_0000004.safetensors",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let lines: Vec<&str> = metrics.lines().collect();
    assert_eq!(lines[0], "step,epoch,lr,loss,images_per_s");
    assert_eq!(lines.len(), 5);
    // 8 images, batch 4: 2 steps per epoch.
    assert!(lines[4].starts_with("4,2.000000,"), "{}", lines[4]);
    let fusion = std::fs::read_to_string(run.join("fusion_weights.csv")).unwrap();
    let rows: Vec<&str> = fusion.lines().collect();
    assert_eq!(rows[0], "step,layer_0,layer_2");
    assert_eq!(rows[1], "0,0.50000000,0.50000000");
    assert_eq!(rows.len(), 6, "initial row plus one per step");
    for r in &rows[1..] {
        let w: f64 = r
            .split(',')
            .skip(1)
            .map(|v| v.parse::<f64>().unwrap())
            .sum();
        assert!((w - 1.0).abs() < 1e-6, "weights sum to 1: {r}");
    }

    let rec = tmp.path().join("rec");
    let final_ck = run.join("final.safetensors");
    ok(&[
        "reconstruct",
        "--checkpoint",
        s(&final_ck),
        "--data",
        s(&data),
        "--images",
        "3",
        "--out",
        s(&rec),
    ]);
    for f in [
        "reconstruction.png",
        "losses.csv",
        "masks.safetensors",
        "inputs.safetensors",
    ] {
        assert!(rec.join(f).exists(), "{f} missing");
    }
    let losses = std::fs::read_to_string(rec.join("losses.csv")).unwrap();
    assert_eq!(losses.lines().count(), 4);
    assert!(losses.starts_with("image,loss\n"));

    let out = ok(&["inspect", s(&final_ck)]);
    let text = String::from_utf8_lossy(&out.stdout);
    // The fused blocks of `--fuse-layers 0` on 3 blocks, with weights still near 1/2.
    for needle in [
        "fused blocks",
        "block   0 ",
        "block   2 (last)",
        "fuse_layers        [0]",
    ] {
        assert!(text.contains(needle), "`{needle}` not in:\n{text}");
    }
}

#[test]
fn same_seed_same_run_and_kill_then_resume_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let a = tmp.path().join("a");
    let extra = [
        "--steps",
        "12",
        "--save-every",
        "3",
        "--seed",
        "7",
        "--preset",
        "tiny",
        "--depth",
        "6",
    ];
    let mut args_a = vec![
        "train",
        "--model",
        "mff",
        "--data",
        s(&data),
        "--out",
        s(&a),
        "--batch-size",
        "8",
    ];
    args_a.extend_from_slice(&extra);
    ok(&args_a);

    // Same seed, killed with SIGKILL once its step-6 checkpoint exists, then resumed. Wherever
    // the kill lands (on a fast machine, even after the run's end), the folder is then cut back
    // to that checkpoint: the later checkpoints and final.safetensors go, as if the kill had
    // come right after step 6's; metrics rows past step 6 stay, for the resume to drop. So the
    // resume starts from step 6 whatever the machine's speed.
    let b = tmp.path().join("b");
    let mut args_b = args_a.clone();
    args_b[6] = s(&b);
    let mut child = bin()
        .args(&args_b)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marker = b.join("checkpoints/step_0000006.safetensors");
    let deadline = Instant::now() + Duration::from_secs(900);
    // The weights are written after the optimiser state, each atomically: once the weights
    // exist, the pair is complete.
    while !marker.exists() && child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "no step-6 checkpoint in 15 minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill(); // SIGKILL; Ok or an error if the run has already ended
    child.wait().unwrap();
    assert!(
        marker.exists(),
        "the run ended without writing its step-6 checkpoint"
    );
    for step in [9, 12] {
        for f in [
            format!("checkpoints/step_{step:07}.safetensors"),
            format!("checkpoints/step_{step:07}.state.safetensors"),
        ] {
            let _ = std::fs::remove_file(b.join(f));
        }
    }
    let _ = std::fs::remove_file(b.join("final.safetensors"));
    let _ = std::fs::remove_dir_all(b.join("reconstruction"));
    ok(&["train", "--resume", s(&b)]);
    let fa = weights(&a.join("final.safetensors"));
    assert!(
        fa == weights(&b.join("final.safetensors")),
        "final weights differ between the uninterrupted and the resumed run"
    );
    assert_eq!(metrics_without_timing(&a), metrics_without_timing(&b));
    assert_eq!(
        std::fs::read_to_string(a.join("fusion_weights.csv")).unwrap(),
        std::fs::read_to_string(b.join("fusion_weights.csv")).unwrap()
    );

    // A crash right after step 4's checkpoint, leaving later rows and a torn line behind.
    let c = tmp.path().join("c");
    std::fs::create_dir_all(&c).unwrap();
    for entry in std::fs::read_dir(&a).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() && p.file_name().unwrap() != "final.safetensors" {
            std::fs::copy(&p, c.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::create_dir_all(c.join("checkpoints")).unwrap();
    for f in ["step_0000003.safetensors", "step_0000003.state.safetensors"] {
        std::fs::copy(a.join("checkpoints").join(f), c.join("checkpoints").join(f)).unwrap();
    }
    std::fs::write(
        c.join("checkpoints/step_0000006.state.safetensors"),
        b"torn",
    )
    .unwrap();
    let mut m = std::fs::read_to_string(c.join("metrics.csv")).unwrap();
    m.push_str("13,9.9,0.1");
    std::fs::write(c.join("metrics.csv"), m).unwrap();
    ok(&["train", "--resume", s(&c)]);
    assert!(
        weights(&c.join("final.safetensors")) == fa,
        "resume from step 3"
    );
    assert_eq!(metrics_without_timing(&a), metrics_without_timing(&c));
    let err = fails(&["train", "--resume", s(&c)]);
    assert!(err.contains("already complete"), "{err}");
}

#[test]
fn nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let run = tmp.path().join("run");
    let err = fails(&train_args(
        s(&data),
        s(&run),
        &[
            "--steps",
            "6",
            "--save-every",
            "1",
            "--blr",
            "1e30",
            "--warmup-steps",
            "0",
        ],
    ));
    assert!(err.contains("at step 2"), "{err}");
    assert!(err.contains("step_0000001.safetensors"), "{err}");
    assert!(run.join("checkpoints/step_0000001.safetensors").exists());
    assert!(!run.join("checkpoints/step_0000002.safetensors").exists());
}

#[test]
fn bad_inputs_get_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let out = t.join("out");

    let missing = t.join("nope");
    let err = fails(&train_args(s(&missing), s(&out), &["--steps", "1"]));
    assert!(err.contains(s(&missing)), "{err}");

    let empty = t.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "x").unwrap();
    let err = fails(&train_args(s(&empty), s(&out), &["--steps", "1"]));
    assert!(
        err.contains("no usable image") && err.contains(".png"),
        "{err}"
    );

    // A corrupt image is skipped and counted; training goes on.
    let data = data_dir(t);
    std::fs::write(data.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let run = t.join("run");
    let o = ok(&train_args(s(&data), s(&run), &["--steps", "1"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("broken.png") && err.contains("1 unreadable"),
        "{err}"
    );

    // The run folder is never overwritten.
    let err = fails(&train_args(s(&data), s(&run), &["--steps", "1"]));
    assert!(err.contains("--resume"), "{err}");

    let err = fails(&train_args(s(&data), s(&out), &["--mask-ratio", "1.5"]));
    assert!(err.contains("--mask-ratio"), "{err}");
    let mut args = train_args(s(&data), s(&out), &[]);
    args[4] = "0,7";
    let err = fails(&args);
    assert!(err.contains("fuse_layers"), "{err}");
    let err = fails(&["train", "--out", s(&out), "--device", "cuda:0"]);
    if cfg!(feature = "cuda") {
        assert!(err.contains("cuda"), "{err}");
    } else {
        // Never a silent CPU run: the build is named, and how to get one with CUDA.
        assert!(
            err.contains("built without CUDA") && err.contains("build-cuda.sh"),
            "{err}"
        );
    }
    let err = fails(&train_args(s(&data), s(&out), &["--precision", "bf16"]));
    assert!(err.contains("--precision bf16 is for GPUs"), "{err}");
    assert!(!out.join("config.json").exists(), "nothing written");

    let ck = t.join("missing.safetensors");
    let err = fails(&["inspect", s(&ck)]);
    assert!(err.contains(s(&ck)), "{err}");
    let garbage = t.join("garbage.safetensors");
    std::fs::write(&garbage, b"definitely not safetensors").unwrap();
    let err = fails(&["inspect", s(&garbage)]);
    assert!(err.contains("not a safetensors file"), "{err}");

    // A checkpoint whose tensors do not fit its config: every problem is listed.
    let final_ck = run.join("final.safetensors");
    let f = mimscope::checkpoint::load_tensors(
        &final_ck,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut tensors = f.tensors.clone();
    tensors.remove("blocks.1.mlp.fc1.bias");
    tensors.insert(
        "blocks.0.norm1.weight".into(),
        candle_core::Tensor::zeros(5, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    tensors.insert(
        "extra.weight".into(),
        candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let bad = t.join("bad.safetensors");
    mimscope::checkpoint::save_tensors(&bad, &tensors, f.metadata.clone()).unwrap();
    let err = fails(&["inspect", s(&bad)]);
    for needle in [
        "blocks.1.mlp.fc1.bias",
        "blocks.0.norm1.weight",
        "extra.weight",
    ] {
        assert!(err.contains(needle), "{needle} not named in: {err}");
    }
    // An unknown config field.
    let mut meta = f.metadata.clone();
    meta.insert("config".into(), r#"{"embed_dims": 32}"#.into());
    mimscope::checkpoint::save_tensors(&bad, &f.tensors, meta).unwrap();
    let err = fails(&["inspect", s(&bad)]);
    assert!(err.contains("embed_dims"), "{err}");
}

/// The PyTorch-written fixture checkpoints (16 px, 4 blocks): MAE and MFF fusing block 0 and 2.
fn fixtures() -> (PathBuf, PathBuf) {
    (
        crate::common::fixture("mae_tiny.safetensors"),
        crate::common::fixture("mff_tiny.safetensors"),
    )
}

/// Every record of a CSV file, header first, read with the `csv` crate (a real parser: a
/// quoted field holding commas stays one field); every record must have the header's count.
fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    r.records()
        .map(|rec| {
            let rec = rec.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            rec.iter().map(str::to_string).collect()
        })
        .collect()
}

fn assert_figure(base: &Path) {
    let png = image::open(base.with_extension("png")).expect("figure PNG decodes");
    assert!(png.width() >= 400 && png.height() >= 300);
    let svg = std::fs::read_to_string(base.with_extension("svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<text"),
        "SVG has no text"
    );
}

#[test]
fn spectrum_writes_tables_and_figures_for_every_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let (mae, mff) = fixtures();
    let out = tmp.path().join("spec");
    ok(&[
        "spectrum",
        "--checkpoint",
        s(&mae),
        "--checkpoint",
        s(&mff),
        "--data",
        s(&data),
        "--images",
        "5",
        "--batch-size",
        "2",
        "--sublayers",
        "--out",
        s(&out),
    ]);
    let rows = csv_rows(&out.join("spectrum.csv"));
    assert_eq!(
        rows[0],
        ["checkpoint", "layer", "freq", "delta_log_amplitude"]
    );
    // 4 blocks: layers 0..4 and 0.5..3.5 = 9 curves (+ fused for MFF), 2 frequencies each.
    assert_eq!(rows.len(), 1 + (9 + 10) * 2);
    assert!(rows.iter().any(|r| r[0] == "mff_tiny" && r[1] == "fused"));
    assert!(rows[1..]
        .iter()
        .filter(|r| r[2] == "0.000000")
        .all(|r| r[3] == "0.00000000"));
    let depth = csv_rows(&out.join("depth.csv"));
    assert_eq!(
        depth[0],
        ["checkpoint", "layer", "depth", "high_freq_delta"]
    );
    assert_eq!(depth.len(), 1 + 19);
    let last = depth
        .iter()
        .find(|r| r[0] == "mae_tiny" && r[1] == "4")
        .unwrap();
    assert_eq!(last[2], "1.000000");
    assert_figure(&out.join("spectrum"));
    assert_figure(&out.join("depth"));
    let err = fails(&[
        "spectrum",
        "--checkpoint",
        "nope.safetensors",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("nope.safetensors"), "{err}");
}

#[test]
fn fusion_tabulates_checkpoints_and_plots_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (mae, mff) = fixtures();
    let csv = tmp.path().join("w.csv");
    let out = ok(&[
        "fusion",
        s(&mae),
        s(&mff),
        "--csv",
        s(&csv),
        "--out",
        s(tmp.path()),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("mae_tiny.safetensors: no fusion weights"),
        "{stdout}"
    );
    // The fixture's proj_weights are random logits; the table shows their softmax.
    let t = crate::common::load("mff_tiny.safetensors", candle_core::DType::F64);
    let logits = crate::common::to_vec(&t["proj_weights"]);
    let z: f64 = logits.iter().map(|l| l.exp()).sum();
    let rows = csv_rows(&csv);
    assert_eq!(rows.len(), 1 + logits.len());
    for (row, l) in rows[1..].iter().zip(&logits) {
        let w: f64 = row[2].parse().unwrap();
        assert!((w - l.exp() / z).abs() < 1e-6, "{row:?}");
    }
    assert_eq!((rows[1][1].as_str(), rows[2][1].as_str()), ("0", "2"));
    assert_figure(&tmp.path().join("fusion_bars"));
    let err = fails(&["fusion", s(&mae)]);
    assert!(
        err.contains("none of the checkpoints has fusion weights"),
        "{err}"
    );

    // A run folder: the logged trajectory.
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("fusion_weights.csv"),
        "step,layer_0,layer_3\n0,0.5,0.5\n1,0.55,0.45\n2,0.6,0.4\n",
    )
    .unwrap();
    let out = ok(&["fusion", s(&run)]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("block 0: 0.6000"));
    assert_figure(&run.join("fusion_weights"));
    let err = fails(&["fusion", s(tmp.path())]);
    assert!(err.contains("fusion_weights.csv"), "{err}");
}

#[test]
fn hessian_uses_identical_saved_batches_for_every_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let (mae, mff) = fixtures();
    let out = tmp.path().join("h");
    ok(&[
        "hessian",
        "--checkpoint",
        s(&mae),
        "--checkpoint",
        s(&mff),
        "--data",
        s(&data),
        "--batches",
        "2",
        "--batch-size",
        "3",
        "--micro-batch",
        "2",
        "--top-k",
        "2",
        "--max-iters",
        "8",
        "--trace",
        "3",
        "--out",
        s(&out),
    ]);
    let rows = csv_rows(&out.join("hessian.csv"));
    assert_eq!(
        rows[0],
        [
            "checkpoint",
            "batch",
            "rank",
            "eigenvalue",
            "iterations",
            "converged",
            "seconds"
        ]
    );
    assert_eq!(rows.len(), 1 + 2 * 2 * 2);
    assert_eq!(csv_rows(&out.join("trace.csv")).len(), 1 + 2 * 2);
    let info = std::fs::read_to_string(out.join("hessian_info.json")).unwrap();
    assert!(
        info.contains("exact (double backward)") && info.contains("no weight decay"),
        "{info}"
    );
    assert_figure(&out.join("eigenvalues"));

    // The saved batch reproduces the loss: images as fed, mask 1 = removed. The loss does not
    // depend on the order of the visible tokens, so visible-first noise rebuilds the mask.
    let b = mimscope::checkpoint::load_tensors(
        &out.join("batches.safetensors"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(b.tensors["images_1"].dims(), [3, 3, 16, 16]);
    assert_eq!(b.tensors["mask_1"].dims(), [3, 16]);
    let m: Vec<f32> = b.tensors["mask_1"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(m.chunks(16).all(|r| r.iter().sum::<f32>() == 12.0));
    let noise: Vec<f32> = m
        .iter()
        .enumerate()
        .map(|(i, v)| v + (i % 16) as f32 * 1e-3)
        .collect();
    let mask = mimscope::model::Mask::from_noise(&noise, 3, 16, 0.75);
    let model =
        mimscope::checkpoint::load_model(&mff, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap()
            .model;
    let loss: f64 = model
        .forward(&b.tensors["images_1"], &mask)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap()
        .into();
    let logged = csv_rows(&out.join("batch_loss.csv"));
    let want: f64 = logged
        .iter()
        .find(|r| r[0] == "mff_tiny" && r[1] == "1")
        .unwrap()[2]
        .parse()
        .unwrap();
    assert!((loss - want).abs() < 1e-5 * want, "{loss} vs {want}");

    // Same batches, finite differences: the top eigenvalue agrees with the exact products.
    let fd = tmp.path().join("fd");
    ok(&[
        "hessian",
        "--checkpoint",
        s(&mff),
        "--data",
        s(&data),
        "--batches",
        "1",
        "--batch-size",
        "3",
        "--max-iters",
        "60",
        "--tol",
        "1e-6",
        "--hvp",
        "fd",
        "--precision",
        "f64",
        "--fd-eps",
        "1e-4",
        "--out",
        s(&fd),
    ]);
    let ex = tmp.path().join("ex");
    ok(&[
        "hessian",
        "--checkpoint",
        s(&mff),
        "--data",
        s(&data),
        "--batches",
        "1",
        "--batch-size",
        "3",
        "--max-iters",
        "60",
        "--tol",
        "1e-6",
        "--precision",
        "f64",
        "--out",
        s(&ex),
    ]);
    let top = |d: &Path| -> f64 { csv_rows(&d.join("hessian.csv"))[1][3].parse().unwrap() };
    assert!(
        (top(&fd) - top(&ex)).abs() < 1e-6 * top(&ex).abs(),
        "{} vs {}",
        top(&fd),
        top(&ex)
    );

    let err = fails(&[
        "hessian",
        "--checkpoint",
        s(&mae),
        "--batches",
        "0",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("--batches"), "{err}");
}

/// Tables stay valid CSV when names hold a comma, a quote and a space: spectra, Hessian,
/// losses and fusion weights of a checkpoint named `mff "fuse" 0,2,4.safetensors`, and the
/// reconstruction losses of an image named `a, "b" c.png`, read back by a real CSV parser.
#[test]
fn tables_quote_names_with_commas_quotes_and_spaces() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let image = data.join("a").join("a, \"b\" c.png");
    std::fs::rename(data.join("a").join("img00.png"), &image).unwrap();
    let (mae, mff) = fixtures();
    let label = "mff \"fuse\" 0,2,4";
    let ck = tmp.path().join(format!("{label}.safetensors"));
    std::fs::copy(&mff, &ck).unwrap();
    let out = tmp.path().join("out");
    let (spec, hess, rec, fusion) = (
        out.join("spec"),
        out.join("hess"),
        out.join("rec"),
        out.join("fusion.csv"),
    );
    ok(&[
        "spectrum",
        "--checkpoint",
        s(&mae),
        "--checkpoint",
        s(&ck),
        "--data",
        s(&data),
        "--images",
        "2",
        "--out",
        s(&spec),
    ]);
    ok(&[
        "hessian",
        "--checkpoint",
        s(&mae),
        "--checkpoint",
        s(&ck),
        "--data",
        s(&data),
        "--batches",
        "1",
        "--batch-size",
        "2",
        "--top-k",
        "1",
        "--max-iters",
        "2",
        "--trace",
        "1",
        "--out",
        s(&hess),
    ]);
    ok(&[
        "reconstruct",
        "--checkpoint",
        s(&ck),
        "--data",
        s(&data),
        "--images",
        "8",
        "--out",
        s(&rec),
    ]);
    ok(&["fusion", s(&ck), "--csv", s(&fusion), "--out", s(&out)]);

    // (table, its header, the name its rows carry, how many rows carry it)
    let image = image.display().to_string();
    for (path, header, name, count) in [
        (
            spec.join("spectrum.csv"),
            "checkpoint,layer,freq,delta_log_amplitude",
            label,
            6 * 2,
        ),
        (
            spec.join("depth.csv"),
            "checkpoint,layer,depth,high_freq_delta",
            label,
            6,
        ),
        (
            hess.join("hessian.csv"),
            "checkpoint,batch,rank,eigenvalue,iterations,converged,seconds",
            label,
            1,
        ),
        (
            hess.join("batch_loss.csv"),
            "checkpoint,batch,loss",
            label,
            1,
        ),
        (
            hess.join("trace.csv"),
            "checkpoint,batch,trace,std_error,samples",
            label,
            1,
        ),
        (rec.join("losses.csv"), "image,loss", image.as_str(), 1),
        (fusion.clone(), "checkpoint,block,weight", label, 3),
    ] {
        let rows = csv_rows(&path);
        let header: Vec<&str> = header.split(',').collect();
        assert_eq!(rows[0], header, "{}", path.display());
        for row in &rows {
            assert_eq!(row.len(), header.len(), "{}: {row:?}", path.display());
        }
        let named = rows[1..].iter().filter(|r| r[0] == name).count();
        assert_eq!(named, count, "{}: {rows:?}", path.display());
        // Every other first field is the other checkpoint or another image: nothing was
        // split off a quoted name.
        let others = &rows[1..]
            .iter()
            .filter(|r| r[0] != name && r[0] != "mae_tiny" && !r[0].ends_with("png"))
            .collect::<Vec<_>>();
        assert!(others.is_empty(), "{}: {others:?}", path.display());
    }
}

#[test]
fn recipes_run_commands_and_name_the_bad_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let (mae, mff) = fixtures();
    let recipe = tmp.path().join("r.toml");
    let out = tmp.path().join("spec");
    std::fs::write(
        &recipe,
        format!(
            "description = \"spectra\"\n[[step]]\ncommand = \"spectrum\"\ncheckpoint = [{:?}, {:?}]\n\
             data = {:?}\nimages = 2\nout = {:?}\n[[step]]\ncommand = \"fusion\"\npaths = [{:?}]\nout = {:?}\n",
            s(&mae), s(&mff), s(&data), s(&out), s(&mff), s(&out)
        ),
    )
    .unwrap();
    ok(&["run", s(&recipe)]);
    assert!(out.join("spectrum.csv").exists() && out.join("fusion_bars.png").exists());
    std::fs::write(&recipe, "[[step]]\ncommand = \"spectrum\"\nimagez = 3\n").unwrap();
    let err = fails(&["run", s(&recipe)]);
    assert!(err.contains("step 1") && err.contains("--imagez"), "{err}");
}

#[test]
fn reproduce_trains_both_models_analyses_them_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let out = tmp.path().join("repro");
    // Budget 0.02: 2 training steps per model and one Hessian batch; the pipeline, not the
    // science.
    ok(&[
        "reproduce",
        "--data",
        s(&data),
        "--budget",
        "0.02",
        "--out",
        s(&out),
    ]);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for needle in [
        "| median top Hessian eigenvalue",
        "final fusion weights",
        "spectrum/spectrum.png",
        "hessian/eigenvalues.png",
        "Weights move to shallow layers?",
    ] {
        assert!(report.contains(needle), "report lacks {needle}:\n{report}");
    }
    for f in [
        "mae/final.safetensors",
        "mff/final.safetensors",
        "mff/fusion_weights.csv",
        "spectrum/depth.csv",
        "fusion/fusion_weights.png",
        "hessian/hessian.csv",
        "hessian/batches.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // Rerunning skips the finished training runs.
    let again = ok(&[
        "reproduce",
        "--data",
        s(&data),
        "--budget",
        "0.02",
        "--out",
        s(&out),
    ]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("is complete: training skipped"));
    let err = fails(&["reproduce", "--budget", "0", "--out", s(&out)]);
    assert!(err.contains("--budget"), "{err}");
    // Another budget in the same folder would mix runs: refused, naming what differs.
    let err = fails(&[
        "reproduce",
        "--data",
        s(&data),
        "--budget",
        "0.04",
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("trained with other settings") && err.contains("steps"),
        "{err}"
    );
}

#[test]
fn analyses_read_pth_checkpoints_in_both_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let fx = crate::common::fixture;
    // MAE's encoder-only release layout: the spectra need only the encoder, and equal those of
    // the full safetensors checkpoint holding the same weights.
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let enc = fx("mae_tiny_encoder.pth");
    ok(&[
        "spectrum",
        "--checkpoint",
        s(&enc),
        "--num-heads",
        "4",
        "--data",
        s(&data),
        "--images",
        "3",
        "--out",
        s(&a),
    ]);
    let full = fx("mae_tiny.safetensors");
    ok(&[
        "spectrum",
        "--checkpoint",
        s(&full),
        "--data",
        s(&data),
        "--images",
        "3",
        "--out",
        s(&b),
    ]);
    let values = |d: &Path| -> Vec<Vec<String>> {
        csv_rows(&d.join("spectrum.csv"))
            .into_iter()
            .map(|r| r[1..].to_vec())
            .collect()
    };
    assert_eq!(values(&a), values(&b));
    // The Hessian needs the decoder: a clear error.
    let err = fails(&[
        "hessian",
        "--checkpoint",
        s(&enc),
        "--num-heads",
        "4",
        "--out",
        s(&tmp.path().join("h")),
    ]);
    assert!(err.contains("encoder only"), "{err}");
    // mmpretrain layout (backbone./neck.): the same fusion weights as the safetensors fixture.
    let mm = fx("mff_tiny_mmpretrain.pth");
    let (c1, c2) = (tmp.path().join("c1.csv"), tmp.path().join("c2.csv"));
    ok(&[
        "fusion",
        s(&mm),
        "--num-heads",
        "4",
        "--decoder-num-heads",
        "3",
        "--fuse-layers",
        "0,2",
        "--csv",
        s(&c1),
        "--out",
        s(tmp.path()),
    ]);
    ok(&[
        "fusion",
        s(&fx("mff_tiny.safetensors")),
        "--csv",
        s(&c2),
        "--out",
        s(tmp.path()),
    ]);
    let weights = |p: &Path| -> Vec<Vec<String>> {
        csv_rows(p).into_iter().map(|r| r[1..].to_vec()).collect()
    };
    assert_eq!(weights(&c1), weights(&c2));
    let err = fails(&["fusion", s(&mm)]);
    assert!(err.contains("--num-heads"), "{err}");
}

/// `key=value` lines of a command's stdout.
fn keys(out: &Output) -> std::collections::BTreeMap<String, String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn bench_reports_speed_flops_memory_and_hvp_cost() {
    let out = ok(&[
        "bench",
        "--batch-size",
        "4",
        "--iters",
        "1",
        "--parts",
        "train,forward,hvp,data",
        "--hvp-batch",
        "2",
        "--peak-tflops",
        "0.157",
    ]);
    let k = keys(&out);
    let num = |key: &str| -> f64 {
        k.get(key)
            .unwrap_or_else(|| panic!("no {key} in {k:?}"))
            .parse()
            .unwrap_or_else(|_| panic!("{key}={} is not a number", k[key]))
    };
    for key in [
        "train_step_s",
        "train_images_per_s",
        "train_tflops_per_s",
        "train_memory_peak_bytes",
        "forward_images_per_s",
        "gradient_s",
        "hvp_s",
        "hvp_first_s",
        "hvp_over_gradient",
        "data_mae_images_per_s",
        "data_pixmim_images_per_s",
    ] {
        assert!(num(key) > 0.0, "{key}");
    }
    // The printed FLOPs are the model's (tiny MFF at mask 0.75), and the rates follow from them.
    let cfg = mimscope::commands::bench::bench_config(
        mimscope::config::ModelKind::Mff,
        mimscope::config::Preset::Tiny,
    );
    let f = mimscope::commands::bench::train_flops_per_image(&cfg, 0.75);
    assert_eq!(k["train_flops_per_image"], format!("{f:.4e}"));
    let tflops = f * 4.0 / num("train_step_s") / 1e12;
    assert!((num("train_tflops_per_s") / tflops - 1.0).abs() < 1e-2);
    assert!((num("train_fraction_of_peak") / (tflops / 0.157) - 1.0).abs() < 1e-2);
    assert_eq!(num("hvp_batch"), 2.0);
    assert!(num("train_memory_peak_bytes") >= num("train_memory_before_bytes"));

    let err = fails(&["bench", "--parts", "train,nothing"]);
    assert!(err.contains("nothing"), "{err}");
    let err = fails(&["bench", "--mask-ratio", "1"]);
    assert!(err.contains("--mask-ratio"), "{err}");
    // bf16 is for GPUs, as in `train`.
    let err = fails(&["bench", "--precision", "bf16"]);
    assert!(err.contains("--precision bf16 is for GPUs"), "{err}");
}

#[test]
fn parity_of_the_cpu_with_itself_and_with_bf16() {
    let out = ok(&["parity", "--batch-size", "4", "--kernels"]);
    let k = keys(&out);
    assert_eq!(k["parity"], "pass");
    assert!(k["loss_rel"].starts_with("0.000e0"), "{k:?}");
    assert!(k["gradients_rel"].starts_with("0.000e0"), "{k:?}");
    // Every kernel on its own: the fused CPU kernels against the primitive forms, a real,
    // small difference (float rounding in another order), within the kernel tolerance.
    let kernels: Vec<f64> = k
        .iter()
        .filter(|(name, _)| name.starts_with("kernel_"))
        .map(|(_, v)| v.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(kernels.len(), 12 + 6, "{k:?}");
    assert!(kernels.iter().all(|&e| e > 0.0 && e < 1e-5), "{kernels:?}");
    // The second derivatives among them, in f64.
    let hvp = k.keys().filter(|n| n.starts_with("kernel_hvp_")).count();
    assert_eq!(hvp, 6, "{k:?}");
    // Without --kernels, the whole model only.
    let k = keys(&ok(&["parity", "--batch-size", "4"]));
    assert!(!k.keys().any(|n| n.starts_with("kernel_")), "{k:?}");
    // bf16 products: a real, small difference, within the stated tolerances.
    let out = ok(&[
        "parity",
        "--batch-size",
        "4",
        "--precision",
        "bf16",
        "--model",
        "mae",
    ]);
    let k = keys(&out);
    assert_eq!(k["parity"], "pass");
    let loss_rel: f64 = k["loss_rel"].split(' ').next().unwrap().parse().unwrap();
    assert!(loss_rel > 0.0 && loss_rel < 5e-3, "{loss_rel}");
    assert!(k["features_rel_max"].contains("(tolerance 3e-2)"), "{k:?}");
    let out = run(&["parity", "--checkpoint", "no/such.safetensors"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no/such.safetensors"), "{err}");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing checkpoint is an error"
    );
}

/// Exit status as ripgrep's: 0 success, 1 a problem found, 2 an error (clap's usage errors too).
#[test]
fn exit_status_is_0_ok_1_problem_found_2_error() {
    use candle_core::{DType, Device, Tensor};
    let code = |args: &[&str]| run(args).status.code();
    assert_eq!(code(&["--help"]), Some(0));
    let help = String::from_utf8_lossy(&run(&["--help"]).stdout).into_owned();
    assert!(help.contains("Exit status: 0"), "{help}");
    assert_eq!(code(&["train", "--no-such-flag"]), Some(2));
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.safetensors");
    let out = tmp.path().join("out");
    assert_eq!(
        code(&["reconstruct", "--checkpoint", s(&missing), "--out", s(&out)]),
        Some(2)
    );

    // A checkpoint whose prediction head is NaN: parity runs, and both sides' NaN loss is
    // outside every tolerance (NaN fails), so it reports a problem, not an error.
    let cfg = mimscope::config::test_config();
    let (_, store) = mimscope::model::Mae::init(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let mut tensors = store.tensors();
    let w = &tensors["decoder_pred.weight"];
    let nan = Tensor::full(f32::NAN, w.shape(), &Device::Cpu).unwrap();
    tensors.insert("decoder_pred.weight".to_string(), nan);
    let store = mimscope::model::ParamStore::from_tensors(tensors).unwrap();
    let nan_ckpt = tmp.path().join("nan.safetensors");
    mimscope::checkpoint::save_weights(&nan_ckpt, &cfg, &store, Default::default()).unwrap();
    let out = run(&["parity", "--checkpoint", s(&nan_ckpt), "--batch-size", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(keys(&out)["parity"], "fail");
    assert!(stderr.contains("disagrees with the CPU"), "{stderr}");
}

#[test]
fn gpu_scripts_are_valid_bash_with_help() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for script in ["scripts/build-cuda.sh", "scripts/gpu-check.sh"] {
        let path = root.join(script);
        let out = Command::new("bash").arg("-n").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new("bash")
            .arg(&path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("--out"),
            "{script} --help"
        );
    }
    // A missing binary is named, with the way to build it.
    let out = Command::new("bash")
        .arg(root.join("scripts/gpu-check.sh"))
        .args(["--binary", "/no/such/mimscope", "--out"])
        .arg(std::env::temp_dir().join("mimscope-gpu-check-test"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("build-cuda.sh"));
}

/// A closed or full output stream loses that output, never the work (`mimscope train ... 2>&1
/// | head -3`, `2>/dev/full`): the run goes on, saves and ends normally.
#[test]
fn closed_or_full_output_streams_do_not_stop_the_work() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let out = tmp.path().join("run");
    let args = train_args(s(&data), s(&out), &["--steps", "3", "--save-every", "3"]);
    // Both pipes closed before the run writes anything: every write fails with EPIPE.
    let mut child = bin()
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "train with closed pipes: {status:?}");
    assert!(out.join("final.safetensors").exists());
    assert!(out.join("reconstruction").join("losses.csv").exists());
    // A full stdout and stderr (/dev/full: every write fails with ENOSPC).
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        return; // not on this system
    };
    let ck = out.join("final.safetensors");
    let status = bin()
        .args(["inspect", s(&ck)])
        .stdout(full.try_clone().unwrap())
        .stderr(full)
        .status()
        .unwrap();
    assert!(status.success(), "inspect into /dev/full: {status:?}");
}

/// A flag value that passes its own check but gives a derived size of 0 (MLP hidden width
/// 32 x 0.001 = 0) is an error naming the flag, not a panic in a kernel.
#[test]
fn a_derived_width_of_zero_is_an_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data_dir(tmp.path());
    let out = tmp.path().join("run");
    let args = train_args(s(&data), s(&out), &["--steps", "1", "--mlp-ratio", "0.001"]);
    let result = run(&args);
    assert_eq!(result.status.code(), Some(2), "{result:?}");
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(
        err.contains("--mlp-ratio") && err.contains("hidden width of 0"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `--print-config` shows the resolved config without needing a run folder.
#[test]
fn print_config_needs_no_run_folder() {
    let out = ok(&["train", "--print-config", "--steps", "7"]);
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cfg["steps"], 7, "{cfg}");
    // Training itself still needs one.
    let err = fails(&["train", "--steps", "7"]);
    assert!(err.contains("--out"), "{err}");
}
