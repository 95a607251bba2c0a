//! Gradients against central finite differences, in f64, for every trainable tensor of every
//! variant. Independent of the PyTorch fixtures: this proves candle's backward through our
//! primitive layer norm, softmax and GELU (the fused candle ops would silently drop it).

use candle_core::{DType, Device, Tensor, Var};
use mimscope::checkpoint::load_model;
use mimscope::model::Mask;
use rand::{Rng, SeedableRng};

use crate::common::{fixture, load, to_vec};

fn loss_of(model: &mimscope::model::Mae, imgs: &Tensor, mask: &Mask) -> f64 {
    model
        .forward(imgs, mask)
        .unwrap()
        .loss
        .to_scalar::<f64>()
        .unwrap()
}

fn set_elem(var: &Var, base: &[f64], i: usize, v: f64) {
    let mut data = base.to_vec();
    data[i] = v;
    let t = Tensor::from_vec(data, var.as_tensor().shape(), &Device::Cpu).unwrap();
    var.set(&t).unwrap();
}

fn check(name: &str) {
    let loaded = load_model(
        &fixture(&format!("{name}_tiny.safetensors")),
        DType::F64,
        &Device::Cpu,
    )
    .unwrap();
    let (model, store) = (loaded.model, loaded.store);
    let io = load(&format!("{name}_tiny_io.safetensors"), DType::F64);
    let imgs = &io["images"];
    let noise: Vec<f32> = to_vec(&io["noise"]).iter().map(|&v| v as f32).collect();
    let mask = Mask::from_noise(&noise, 2, 16, 0.75);
    let out = model.forward(imgs, &mask).unwrap();
    let grads = out.loss.backward().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let eps = 1e-5;
    for (pname, var) in store.trainable() {
        let g = to_vec(
            grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {pname}")),
        );
        let base = to_vec(var.as_tensor());
        let gmax = g.iter().fold(0f64, |m, v| m.max(v.abs()));
        // Three random coordinates plus the largest-gradient one.
        let argmax = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        let mut idx = vec![argmax];
        idx.extend((0..3).map(|_| rng.random_range(0..g.len())));
        for i in idx {
            set_elem(var, &base, i, base[i] + eps);
            let up = loss_of(&model, imgs, &mask);
            set_elem(var, &base, i, base[i] - eps);
            let down = loss_of(&model, imgs, &mask);
            set_elem(var, &base, i, base[i]);
            let fd = (up - down) / (2.0 * eps);
            // gelu_erf's backward uses 6-digit constants (docs/candle.md): a ~1e-6 relative error
            // per activation, which on a small entry that is a sum of cancelling terms shows
            // relative to the tensor's gradient scale. A dropped or wrong path is off by O(1).
            let tol = 1e-5 * (g[i].abs() + gmax) + 1e-12;
            assert!(
                (g[i] - fd).abs() <= tol,
                "{name}: d loss / d {pname}[{i}]: autograd {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}

#[test]
fn mae_gradients_match_finite_differences() {
    check("mae");
}

#[test]
fn mff_gradients_match_finite_differences() {
    check("mff");
}

#[test]
fn mff_attention_gradients_match_finite_differences() {
    check("mffattn");
}

/// candle's backward pass through the accumulation sites that vendor/candle-core patches (see
/// vendor/README.md): a transposed first contribution (stored made contiguous, then used by a
/// matrix product's backward), a subtraction's right-hand side as a tensor's first
/// contribution (stored negated), a broadcast, and a tensor with three consumers. Against the
/// gradient derived by hand: L = sum(Wᵀ Xᵀ ⊙ C) + sum((d - X) ⊙ X) + sum((X - Z) ⊙ C'), so
/// dL/dW[j,k] = Σ_i C[k,i] X[i,j], dL/dX[i,j] = Σ_k C[k,i] W[j,k] + d[j] - 2 X[i,j] + C'[i,j]
/// and dL/dZ = -C' (Z's only gradient comes from a subtraction's right-hand side).
#[test]
fn backward_accumulation_matches_the_hand_derived_gradient() {
    let dev = Device::Cpu;
    let (n, m, p) = (2, 3, 4);
    let xs: Vec<f64> = (0..n * m).map(|i| 0.5 + 0.25 * i as f64).collect();
    let ws: Vec<f64> = (0..m * p).map(|i| 1.0 - 0.125 * i as f64).collect();
    let cs: Vec<f64> = (0..p * n).map(|i| (i as f64 - 3.0) * 0.75).collect();
    let ds = [2.0, -1.0, 0.5];
    let x = Var::from_tensor(&Tensor::from_vec(xs.clone(), (n, m), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::from_vec(ws.clone(), (m, p), &dev).unwrap()).unwrap();
    let c = Tensor::from_vec(cs.clone(), (p, n), &dev).unwrap();
    let d = Tensor::from_vec(ds.to_vec(), m, &dev).unwrap();
    let (xt, wt) = (x.as_tensor(), w.as_tensor());
    let u = wt.t().unwrap().matmul(&xt.t().unwrap()).unwrap(); // (p, n)
    let l1 = (&u * &c).unwrap().sum_all().unwrap();
    let s = d.broadcast_as((n, m)).unwrap().sub(xt).unwrap();
    let l2 = (&s * xt).unwrap().sum_all().unwrap();
    let z = Var::from_tensor(&Tensor::ones((n, m), DType::F64, &dev).unwrap()).unwrap();
    let c2s: Vec<f64> = (0..n * m).map(|i| 0.5 * i as f64 - 1.0).collect();
    let c2 = Tensor::from_vec(c2s.clone(), (n, m), &dev).unwrap();
    let l3 = (xt.sub(z.as_tensor()).unwrap() * &c2)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = (l1 + l2 + l3).unwrap().backward().unwrap();
    let (gx, gw) = (grads.get(xt).unwrap(), grads.get(wt).unwrap());
    assert!(gx.is_contiguous() && gw.is_contiguous());
    let (gx, gw) = (to_vec(gx), to_vec(gw));
    let gz = to_vec(grads.get(z.as_tensor()).unwrap());
    assert!(gz.iter().zip(&c2s).all(|(g, c)| *g == -c), "dL/dZ {gz:?}");
    for j in 0..m {
        for k in 0..p {
            let want: f64 = (0..n).map(|i| cs[k * n + i] * xs[i * m + j]).sum();
            assert_eq!(gw[j * p + k], want, "dL/dW[{j},{k}]");
        }
    }
    for i in 0..n {
        for j in 0..m {
            let mm: f64 = (0..p).map(|k| cs[k * n + i] * ws[j * p + k]).sum();
            let want = mm + ds[j] - 2.0 * xs[i * m + j] + c2s[i * m + j];
            assert!(
                (gx[i * m + j] - want).abs() < 1e-12,
                "dL/dX[{i},{j}]: {} vs {want}",
                gx[i * m + j]
            );
        }
    }
}
