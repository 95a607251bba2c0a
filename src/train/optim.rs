//! AdamW with per-parameter weight decay and exportable state.
//!
//! candle_nn::AdamW decays every tensor and keeps its moments private, so neither MAE's
//! no-decay groups nor an exact resume are possible with it. This is torch.optim.AdamW's update
//! (decoupled decay, bias correction, eps added after the square root), step by step:
//!   p <- p (1 - lr wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
//!   p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Result, Tensor, Var};

use crate::kernels::{adamw_update, AdamWStep};

use crate::model::params::DecayRule;

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimiser steps taken so far.
    pub step: u64,
    slots: Vec<Slot>,
}

impl AdamW {
    /// MAE's settings: betas (0.9, 0.95), eps 1e-8.
    pub fn new(params: &BTreeMap<String, Var>, weight_decay: f64, rule: DecayRule) -> Result<Self> {
        let slots = params
            .iter()
            .map(|(name, var)| {
                let t = var.as_tensor();
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    decay: rule.decays(name, t.rank()),
                    m: t.zeros_like()?,
                    v: t.zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            step: 0,
            slots,
        })
    }

    /// The parameters, in name order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// Names of the decayed and the undecayed parameters.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let (d, n): (Vec<&Slot>, Vec<&Slot>) = self.slots.iter().partition(|s| s.decay);
        (
            d.iter().map(|s| s.name.as_str()).collect(),
            n.iter().map(|s| s.name.as_str()).collect(),
        )
    }

    /// One update at learning rate `lr`. A parameter without a gradient is left alone (as
    /// torch does for `grad is None`).
    ///
    /// The update itself is [`adamw_update`] (in place on the CPU, tensor ops elsewhere).
    pub fn apply(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let decay = if s.decay && self.weight_decay != 0.0 {
                1.0 - lr * self.weight_decay
            } else {
                1.0
            };
            let step = AdamWStep {
                beta1: self.beta1,
                beta2: self.beta2,
                decay,
                rate: lr / bc1,
                bc2_sqrt: bc2.sqrt(),
                eps: self.eps,
            };
            adamw_update(&s.var, &mut s.m, &mut s.v, g, &step)?;
        }
        Ok(())
    }

    /// Moments by name: `exp_avg.{name}` and `exp_avg_sq.{name}` (torch's state names).
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            out.insert(format!("exp_avg.{}", s.name), s.m.clone());
            out.insert(format!("exp_avg_sq.{}", s.name), s.v.clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        step: u64,
    ) -> std::result::Result<(), String> {
        for s in &mut self.slots {
            for (key, slot) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let name = format!("{key}.{}", s.name);
                let t = state
                    .get(&name)
                    .ok_or_else(|| format!("optimiser state lacks `{name}`"))?;
                if t.shape() != slot.shape() {
                    return Err(format!(
                        "optimiser state `{name}` has shape {:?}, expected {:?}",
                        t.dims(),
                        slot.dims()
                    ));
                }
                // A copy: the moments are updated in place, so they must own their storage.
                *slot = t
                    .copy()
                    .map_err(|e| format!("optimiser state `{name}`: {e}"))?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_core::Device;

    /// torch.optim.AdamW's update, restated for one scalar parameter in f64.
    fn torch_adamw(p: &mut f64, m: &mut f64, v: &mut f64, g: f64, t: i32, lr: f64, wd: f64) {
        let (b1, b2, eps) = (0.9f64, 0.95f64, 1e-8);
        *p *= 1.0 - lr * wd;
        *m = b1 * *m + (1.0 - b1) * g;
        *v = b2 * *v + (1.0 - b2) * g * g;
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        *p -= lr / bc1 * *m / (v.sqrt() / bc2.sqrt() + eps);
    }

    /// A (2, 3) weight `blk.weight` (decayed) and a bias `blk.bias` (not decayed) in `dtype`.
    fn weight_and_bias(w0: &[f64; 6], b0: &[f64; 2], dtype: DType) -> BTreeMap<String, Var> {
        let var = |v: &[f64], shape: &[usize]| {
            let t = Tensor::new(v, &Device::Cpu)
                .unwrap()
                .reshape(shape)
                .unwrap();
            Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
        };
        let mut params = BTreeMap::new();
        params.insert("blk.weight".to_string(), var(w0, &[2, 3]));
        params.insert("blk.bias".to_string(), var(b0, &[2]));
        params
    }

    /// The gradients of loss = sum(c * p²) with per-element c (a transposed view for the
    /// weight): 2 c p. Also returns the weight's coefficients in its own (row-major) order.
    fn quadratic_loss_grads(
        params: &BTreeMap<String, Var>,
        c: &[f64],
        dtype: DType,
    ) -> (candle_core::backprop::GradStore, Vec<f64>) {
        let w = params["blk.weight"].as_tensor();
        let b = params["blk.bias"].as_tensor();
        let cw = Tensor::new(&c[..6], &Device::Cpu)
            .unwrap()
            .reshape((3, 2))
            .unwrap()
            .t()
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let cb = Tensor::new(&c[6..], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let loss = ((w.sqr().unwrap() * &cw).unwrap().sum_all().unwrap()
            + (b.sqr().unwrap() * &cb).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let cs: Vec<f64> = cw
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        (grads, cs)
    }

    /// Every parameter value, weight then bias, in f64.
    fn flat_values(params: &BTreeMap<String, Var>) -> Vec<f64> {
        ["blk.weight", "blk.bias"]
            .iter()
            .flat_map(|n| {
                params[*n]
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn in_place_updates_follow_torch_for_decayed_and_undecayed_tensors() {
        for dtype in [DType::F64, DType::F32] {
            let w0 = [0.5f64, -1.25, 2.0, 0.0, 3.5, -0.75];
            let b0 = [0.1f64, -0.2];
            let params = weight_and_bias(&w0, &b0, dtype);
            let mut opt = AdamW::new(
                &params,
                0.05,
                DecayRule {
                    decay_fusion_weights: true,
                },
            )
            .unwrap();
            let mut expect: Vec<(f64, f64, f64)> =
                w0.iter().chain(&b0).map(|&p| (p, 0.0, 0.0)).collect();
            for t in 1..=3 {
                let lr = 0.1 / t as f64;
                let c: Vec<f64> = (0..8).map(|i| 0.3 + 0.2 * i as f64).collect();
                let (grads, cs) = quadratic_loss_grads(&params, &c, dtype);
                for (i, e) in expect.iter_mut().enumerate() {
                    let (ci, wd) = if i < 6 { (cs[i], 0.05) } else { (c[i], 0.0) };
                    let g = 2.0 * ci * e.0;
                    torch_adamw(&mut e.0, &mut e.1, &mut e.2, g, t, lr, wd);
                }
                opt.apply(&grads, lr).unwrap();
            }
            let got = flat_values(&params);
            let tol = if dtype == DType::F64 { 1e-13 } else { 1e-6 };
            for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
                assert!(
                    (g - e.0).abs() < tol,
                    "{dtype:?} element {i}: {g} vs {}",
                    e.0
                );
            }
            // The saved moments are torch's exp_avg / exp_avg_sq.
            let st = opt.state_tensors();
            let m: Vec<f64> = st["exp_avg.blk.bias"]
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!((m[1] - expect[7].1).abs() < tol);
        }
    }
}
