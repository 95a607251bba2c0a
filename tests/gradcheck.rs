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
            // gelu_erf's backward uses 6-digit constants (CANDLE.md): a ~1e-6 relative error
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
