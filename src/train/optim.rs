//! AdamW with per-parameter weight decay and exportable state.
//!
//! candle_nn::AdamW decays every tensor and keeps its moments private, so neither MAE's
//! no-decay groups nor an exact resume are possible with it. This is torch.optim.AdamW's update
//! (decoupled decay, bias correction, eps added after the square root), step by step:
//!   p <- p (1 - lr wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
//!   p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Result, Tensor, Var};

/// The parameters excluded from weight decay, as a printed rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecayRule {
    /// Also decay the MFF fusion logits `proj_weights` (mmpretrain does, by omission).
    pub decay_fusion_weights: bool,
}

impl DecayRule {
    /// MAE's rule (`optim_factory.param_groups_weight_decay`): no decay for 1-D tensors and
    /// biases; cls_token and mask_token are 3-D and so decayed, as in MAE.
    pub fn decays(&self, name: &str, rank: usize) -> bool {
        if name == "proj_weights" {
            return self.decay_fusion_weights;
        }
        !(rank <= 1 || name.ends_with(".bias"))
    }

    pub fn describe(&self) -> String {
        format!(
            "no weight decay on 1-D tensors and biases (norms, biases), as facebookresearch/mae; \
             cls_token and mask_token decayed, as MAE; fusion logits proj_weights {}",
            if self.decay_fusion_weights {
                "decayed, as mmpretrain"
            } else {
                "not decayed (--no-decay-fusion-weights)"
            }
        )
    }
}

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
    pub fn apply(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let mut p = s.var.as_tensor().detach();
            if s.decay && self.weight_decay != 0.0 {
                p = (p * (1.0 - lr * self.weight_decay))?;
            }
            s.m = ((&s.m * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            s.v = ((&s.v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((s.v.sqrt()? / bc2.sqrt())? + self.eps)?;
            let update = (s.m.div(&denom)? * (lr / bc1))?;
            s.var.set(&(p - update)?)?;
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
                *slot = t.clone();
            }
        }
        self.step = step;
        Ok(())
    }
}
