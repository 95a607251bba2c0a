//! The analyses against the independent PyTorch reference (tests/reference/analysis_reference.py,
//! torch 2.15 CPU in float64; see tests/reference/README.md): Fourier spectra of every layer,
//! the loss on a fixed batch and mask, exact Hessian-vector products and the top Hessian
//! eigenvalues (Lanczos with full reorthogonalisation there). Plus analytic cases: a model
//! small enough to build its whole Hessian column by column.

use candle_core::{DType, Device, Tensor};
use mimscope::analysis::features::features;
use mimscope::analysis::hessian::{top_eigen, PowerSettings};
use mimscope::analysis::hvp::{HvpMethod, Objective};
use mimscope::analysis::spectrum::{delta_log_amplitude, Accumulator};
use mimscope::checkpoint::load_model;
use mimscope::commands::spectrum::model_curves;
use mimscope::compare::Diff;
use mimscope::config::ModelConfig;
use mimscope::kernels::second_order::with_second_order;
use mimscope::model::params::DecayRule;
use mimscope::model::{Mae, Mask};
use mimscope::rng::{stream, Purpose};

use crate::common::{assert_close, fixture, load, to_vec};

const VARIANTS: [&str; 2] = ["mae", "mff"];

/// The fixture model in `dtype`, its io batch (images, mask from the stored noise) and the
/// reference values.
fn setup(
    name: &str,
    dtype: DType,
) -> (
    mimscope::checkpoint::Loaded,
    Tensor,
    Mask,
    std::collections::BTreeMap<String, Tensor>,
) {
    let loaded = load_model(
        &fixture(&format!("{name}_tiny.safetensors")),
        dtype,
        &Device::Cpu,
    )
    .unwrap();
    let io = load(&format!("{name}_tiny_io.safetensors"), dtype);
    let (b, l) = io["noise"].dims2().unwrap();
    let noise: Vec<f32> = to_vec(&io["noise"]).iter().map(|&x| x as f32).collect();
    let mask = Mask::from_noise(&noise, b, l, 0.75);
    let golden = load(&format!("analysis_{name}.safetensors"), DType::F64);
    (loaded, io["images"].clone(), mask, golden)
}

fn rule() -> DecayRule {
    DecayRule {
        decay_fusion_weights: true,
    }
}

/// The stored direction and product, flattened in our (name) order.
fn golden_hvp(
    obj: &Objective,
    golden: &std::collections::BTreeMap<String, Tensor>,
) -> (Vec<f64>, Vec<f64>) {
    let (mut v, mut hv) = (Vec::new(), Vec::new());
    for name in obj.names() {
        v.extend(to_vec(&golden[&format!("hvp.v.{name}")]));
        hv.extend(to_vec(&golden[&format!("hvp.hv.{name}")]));
    }
    (v, hv)
}

/// max |a - e| / max |e| ([`Diff::max_rel`]; NaN when either side has one).
fn max_rel(a: &[f64], e: &[f64]) -> f64 {
    Diff::between(a, e).max_rel
}

#[test]
fn spectra_match_the_reference() {
    // f32 features against a float64 reference: log amplitudes agree to ~1e-5.
    for name in VARIANTS {
        let (loaded, imgs, _, golden) = setup(name, DType::F32);
        let g = loaded.model.cfg.grid();
        // Maps (catch a transposed reshape, which the diagonal alone cannot show).
        for (layer, t) in features(&loaded.model, &imgs, true).unwrap() {
            let key = match layer.name.as_str() {
                "fused" => "fused".to_string(),
                n => match n.strip_suffix(".5") {
                    Some(b) => format!("attn_{b}"),
                    None => format!("layer_{n}"),
                },
            };
            let (b, _, d) = t.dims3().unwrap();
            let data: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let mut acc = Accumulator::new(g, g);
            acc.add(&data, b, d);
            let map = Tensor::new(acc.finish().map, &Device::Cpu)
                .unwrap()
                .reshape((g, g))
                .unwrap();
            assert_close(
                &format!("{name} map.{key}"),
                &map,
                &golden[&format!("map.{key}")],
                1e-4,
                1e-4,
            );
        }
        // Curves through the command's own path, in two chunks.
        let curves = model_curves(&loaded.model, name, &imgs, 1, true).unwrap();
        assert_eq!(
            curves.len(),
            2 * loaded.model.cfg.depth + 1 + usize::from(name == "mff")
        );
        for c in &curves {
            let key = match c.layer.name.as_str() {
                "fused" => "fused".to_string(),
                n => match n.strip_suffix(".5") {
                    Some(b) => format!("attn_{b}"),
                    None => format!("layer_{n}"),
                },
            };
            let got = Tensor::new(c.delta.clone(), &Device::Cpu).unwrap();
            assert_close(
                &format!("{name} spectrum.{key}"),
                &got,
                &golden[&format!("spectrum.{key}")],
                1e-4,
                1e-4,
            );
        }
    }
}

#[test]
fn fourier_recipe_matches_the_reference_on_an_8x8_grid() {
    // (2, 65, 6) tokens with a cls row of ~100 first: the cls token must be dropped.
    let golden = load("analysis_mae.safetensors", DType::F64);
    let tokens = &golden["fourier.tokens"];
    let body: Vec<f32> = to_vec(&tokens.narrow(1, 1, 64).unwrap())
        .iter()
        .map(|&x| x as f32)
        .collect();
    let d = delta_log_amplitude(&body, 2, 8, 8);
    let got = Tensor::new(d, &Device::Cpu).unwrap();
    assert_close(
        "fourier.spectrum",
        &got,
        &golden["fourier.spectrum"],
        1e-5,
        1e-5,
    );
}

#[test]
fn loss_matches_the_reference_in_f64() {
    for name in VARIANTS {
        let (loaded, imgs, mask, golden) = setup(name, DType::F64);
        let obj =
            Objective::new(&loaded.model, &loaded.store, &imgs, &mask, 2, 0.0, rule()).unwrap();
        let want = to_vec(&golden["loss_f64"])[0];
        let got = obj.loss().unwrap();
        assert!(
            (got - want).abs() < 1e-9 * want.abs(),
            "{name}: loss {got} vs {want}"
        );
    }
}

#[test]
fn exact_and_finite_difference_hvps_match_the_reference() {
    for name in VARIANTS {
        let (loaded, imgs, mask, golden) = setup(name, DType::F64);
        // Two micro-batches of one image: the split must not change the product.
        let obj =
            Objective::new(&loaded.model, &loaded.store, &imgs, &mask, 1, 0.0, rule()).unwrap();
        let (v, want) = golden_hvp(&obj, &golden);
        let exact = with_second_order(|| obj.hvp(&v, HvpMethod::Exact)).unwrap();
        // gelu_erf's backward uses 6-digit constants (docs/candle.md): ~1e-7 relative.
        assert!(
            max_rel(&exact, &want) < 1e-5,
            "{name}: exact HVP off by {:.2e}",
            max_rel(&exact, &want)
        );
        let fd = obj
            .hvp(&v, HvpMethod::FiniteDifference { eps: 1e-4 })
            .unwrap();
        assert!(
            max_rel(&fd, &want) < 1e-5,
            "{name}: fd HVP off by {:.2e}",
            max_rel(&fd, &want)
        );
        // The parameters are restored bit for bit after the finite differences.
        let again =
            Objective::new(&loaded.model, &loaded.store, &imgs, &mask, 2, 0.0, rule()).unwrap();
        assert_eq!(again.params(), obj.params());
        // Exact products refuse to run on a thread that detaches gradient graphs.
        assert!(obj.hvp(&v, HvpMethod::Exact).is_err());
    }
}

#[test]
fn f32_exact_hvp_is_close_to_the_f64_reference() {
    let (loaded, imgs, mask, golden) = setup("mff", DType::F32);
    let obj = Objective::new(&loaded.model, &loaded.store, &imgs, &mask, 2, 0.0, rule()).unwrap();
    let (v, want) = golden_hvp(&obj, &golden);
    let got = with_second_order(|| obj.hvp(&v, HvpMethod::Exact)).unwrap();
    assert!(
        max_rel(&got, &want) < 1e-4,
        "f32 exact HVP off by {:.2e}",
        max_rel(&got, &want)
    );
}

#[test]
fn top_eigenvalues_match_the_reference_lanczos() {
    let tight = PowerSettings {
        max_iters: 3000,
        tol: 1e-11,
    };
    for name in VARIANTS {
        let (loaded, imgs, mask, golden) = setup(name, DType::F64);
        let obj =
            Objective::new(&loaded.model, &loaded.store, &imgs, &mask, 2, 0.0, rule()).unwrap();
        let want = to_vec(&golden["hessian.top"]);
        let mut rng = stream(0, Purpose::PowerIteration, 0);
        let eig = with_second_order(|| {
            top_eigen(obj.len(), 3, tight, &mut rng, |v| {
                obj.hvp(v, HvpMethod::Exact)
            })
        })
        .unwrap();
        for (k, (e, w)) in eig.iter().zip(&want).enumerate() {
            // Signs kept (mff's dominant eigenvalue is negative); ~2e-6 relative bias from the
            // reference recipe's v / (||v|| + 1e-6).
            assert!(
                (e.value - w).abs() < 2e-5 * w.abs(),
                "{name} rank {}: {} vs reference {w} ({} iterations)",
                k + 1,
                e.value,
                e.iterations
            );
        }
    }
}

/// A model small enough (a few hundred parameters) to build its Hessian column by column.
fn micro_model() -> (Mae, mimscope::model::ParamStore, Tensor, Mask) {
    let cfg = ModelConfig {
        img_size: 4,
        patch_size: 2,
        embed_dim: 4,
        depth: 1,
        num_heads: 1,
        decoder_embed_dim: 4,
        decoder_depth: 1,
        decoder_num_heads: 1,
        mlp_ratio: 1.0,
        ..ModelConfig::default()
    };
    let (model, store) = Mae::init(&cfg, 3, DType::F64, &Device::Cpu).unwrap();
    let data: Vec<f64> = (0..2 * 3 * 16)
        .map(|i| ((i * 37 % 23) as f64 / 11.0) - 1.0)
        .collect();
    let imgs = Tensor::from_vec(data, (2, 3, 4, 4), &Device::Cpu).unwrap();
    let mask = Mask::random(2, 4, 0.5, &mut stream(1, Purpose::Synthetic, 0));
    (model, store, imgs, mask)
}

/// Eigenvalues of a symmetric matrix by cyclic Jacobi rotations (Golub & Van Loan 8.5).
#[allow(clippy::needless_range_loop)] // index arithmetic mirrors the textbook
fn jacobi_eigenvalues(mut a: Vec<Vec<f64>>) -> Vec<f64> {
    let n = a.len();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..n).map(|i| a[i][i]).collect()
}

#[test]
#[allow(clippy::needless_range_loop)]
fn full_hessian_of_a_micro_model_gives_the_power_iteration_eigenvalues_in_order() {
    let (model, store, imgs, mask) = micro_model();
    let obj = Objective::new(&model, &store, &imgs, &mask, 2, 0.0, rule()).unwrap();
    let n = obj.len();
    assert!(n > 100 && n < 600, "{n} parameters");
    let tight = PowerSettings {
        max_iters: 5000,
        tol: 1e-12,
    };
    let (h, eig) = with_second_order(|| {
        let mut cols = Vec::with_capacity(n);
        for j in 0..n {
            let mut e = vec![0.0; n];
            e[j] = 1.0;
            cols.push(obj.hvp(&e, HvpMethod::Exact)?);
        }
        let mut rng = stream(2, Purpose::PowerIteration, 0);
        let eig = top_eigen(n, 3, tight, &mut rng, |v| obj.hvp(v, HvpMethod::Exact))?;
        Ok((cols, eig))
    })
    .unwrap();
    // A Hessian is symmetric: column j's entry i equals column i's entry j.
    let scale = h.iter().flatten().map(|x| x.abs()).fold(0.0, f64::max);
    for i in 0..n {
        for j in 0..i {
            assert!(
                (h[j][i] - h[i][j]).abs() < 1e-7 * scale,
                "H[{i},{j}] asymmetric"
            );
        }
    }
    // Columns agree with finite differences of gradients.
    for j in [0, n / 2, n - 1] {
        let mut e = vec![0.0; n];
        e[j] = 1.0;
        let fd = obj
            .hvp(&e, HvpMethod::FiniteDifference { eps: 1e-5 })
            .unwrap();
        assert!(
            max_rel(&fd, &h[j]) < 1e-5,
            "column {j}: {:.2e}",
            max_rel(&fd, &h[j])
        );
    }
    let mut all = jacobi_eigenvalues(h);
    all.sort_by(|a, b| b.abs().total_cmp(&a.abs()));
    for (k, e) in eig.iter().enumerate() {
        assert!(
            (e.value - all[k]).abs() < 1e-5 * all[0].abs(),
            "rank {}: power iteration {} vs full Hessian {} (top five {:?})",
            k + 1,
            e.value,
            all[k],
            &all[..5]
        );
    }
}

#[test]
fn weight_decay_adds_wd_on_decayed_coordinates() {
    let (model, store, imgs, mask) = micro_model();
    let plain = Objective::new(&model, &store, &imgs, &mask, 2, 0.0, rule()).unwrap();
    let wd = 0.25;
    let decayed = Objective::new(&model, &store, &imgs, &mask, 2, wd, rule()).unwrap();
    let v: Vec<f64> = (0..plain.len())
        .map(|i| ((i % 7) as f64 - 3.0) / 5.0)
        .collect();
    let (a, b) = with_second_order(|| {
        Ok((
            plain.hvp(&v, HvpMethod::Exact)?,
            decayed.hvp(&v, HvpMethod::Exact)?,
        ))
    })
    .unwrap();
    let mut offset = 0;
    for (name, var) in store.trainable() {
        let t = var.as_tensor();
        let on = rule().decays(name, t.rank());
        for i in offset..offset + t.elem_count() {
            let want = a[i] + if on { wd * v[i] } else { 0.0 };
            assert!((b[i] - want).abs() < 1e-12, "{name}");
        }
        offset += t.elem_count();
    }
    // The finite-difference product sees the same term through the gradient.
    let fd = decayed
        .hvp(&v, HvpMethod::FiniteDifference { eps: 1e-5 })
        .unwrap();
    assert!(max_rel(&fd, &b) < 1e-5, "{:.2e}", max_rel(&fd, &b));
}
