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
    ok(&train_args(
        s(&data),
        s(&run),
        &["--steps", "4", "--save-every", "2"],
    ));
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
    // The tiny preset's width keeps steps slow enough to kill the second run midway.
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

    // Same seed, killed with SIGKILL after its second checkpoint, then resumed.
    let b = tmp.path().join("b");
    let mut args_b = args_a.clone();
    args_b[6] = s(&b);
    let mut child = bin()
        .args(&args_b)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marker = b.join("checkpoints/step_0000006.safetensors");
    let t0 = Instant::now();
    while !marker.exists() && t0.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Six more steps of the tiny-width model take far longer than the 5 ms poll.
    assert!(
        !b.join("final.safetensors").exists(),
        "the run finished before it was killed"
    );
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
    assert!(err.contains("cuda"), "{err}");

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
