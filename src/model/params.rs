//! Named parameters and how a model gets them.
//!
//! A model is built by its `new(cfg, vb)` constructors from a [`VarBuilder`] whose backend is
//! one of two kinds:
//! - [`init_params`] samples each requested tensor from the init hint its constructor gives
//!   (MAE's initialisation), with our seeded RNG, because candle's CPU RNG cannot be seeded;
//! - [`ParamStore::builder`] hands out stored tensors and records every name asked for, so that
//!   [`ParamStore::check_complete`] can list what is missing, mis-shaped or unexpected, both
//!   ways, in one error.
//!
//! Trainable tensors are `Var`s; MAE's frozen sin-cos tables are plain tensors. [`DecayRule`]
//! tells by name and rank which trainable tensors weight decay applies to (training and the
//! Hessian's objective share it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Tensors that are stored in checkpoints but never trained (`requires_grad=False` in MAE).
pub const FROZEN: [&str; 2] = ["pos_embed", "decoder_pos_embed"];

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

/// The run's rule (a method of the run config, defined here beside the rule so that `config`
/// stays below `model` in the layering).
impl crate::config::TrainConfig {
    pub fn decay_rule(&self) -> DecayRule {
        DecayRule {
            decay_fusion_weights: self.decay_fusion_weights,
        }
    }
}

/// Every tensor of a model by its MAE state-dict name, in name order.
#[derive(Debug, Clone)]
pub struct ParamStore {
    trainable: BTreeMap<String, Var>,
    frozen: BTreeMap<String, Tensor>,
}

impl ParamStore {
    /// Wraps loaded or initialised tensors; names in [`FROZEN`] stay plain tensors.
    pub fn from_tensors(tensors: BTreeMap<String, Tensor>) -> Result<Self> {
        let mut trainable = BTreeMap::new();
        let mut frozen = BTreeMap::new();
        for (name, t) in tensors {
            if FROZEN.contains(&name.as_str()) {
                frozen.insert(name, t);
            } else {
                trainable.insert(name, Var::from_tensor(&t)?);
            }
        }
        Ok(Self { trainable, frozen })
    }

    /// Trainable parameters in name order.
    pub fn trainable(&self) -> &BTreeMap<String, Var> {
        &self.trainable
    }

    /// Every tensor (trainable and frozen) in name order, as tensors.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut all: BTreeMap<String, Tensor> = self.frozen.clone();
        for (k, v) in &self.trainable {
            all.insert(k.clone(), v.as_tensor().clone());
        }
        all
    }

    /// A builder that serves these tensors and records the names asked for.
    pub fn builder(&self, dtype: DType, device: &Device) -> (VarBuilder<'static>, StoreLog) {
        let log = StoreLog::default();
        let backend = StoreBackend {
            tensors: self.tensors(),
            log: log.clone(),
        };
        (
            VarBuilder::from_backend(Box::new(backend), dtype, device.clone()),
            log,
        )
    }

    /// Errors listing every tensor the model asked for but the store lacks or has with another
    /// shape, and every stored tensor the model never asked for.
    pub fn check_complete(&self, log: &StoreLog) -> std::result::Result<(), String> {
        let asked = log.asked.lock().map_err(|e| e.to_string())?;
        let problems = log.problems.lock().map_err(|e| e.to_string())?;
        let unexpected: Vec<String> = self
            .tensors()
            .into_keys()
            .filter(|k| !asked.contains(k))
            .collect();
        let mut msg = problems.clone();
        if !unexpected.is_empty() {
            msg.push(format!(
                "unexpected tensors (not part of this architecture): {}",
                unexpected.join(", ")
            ));
        }
        if msg.is_empty() {
            Ok(())
        } else {
            Err(msg.join("; "))
        }
    }
}

/// What a [`StoreBackend`] was asked for.
#[derive(Debug, Clone, Default)]
pub struct StoreLog {
    asked: std::sync::Arc<Mutex<BTreeSet<String>>>,
    problems: std::sync::Arc<Mutex<Vec<String>>>,
}

struct StoreBackend {
    tensors: BTreeMap<String, Tensor>,
    log: StoreLog,
}

impl SimpleBackend for StoreBackend {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Ok(mut asked) = self.log.asked.lock() {
            asked.insert(name.to_string());
        }
        let problem = match self.tensors.get(name) {
            Some(t) if t.shape() == &s => return t.to_dtype(dtype)?.to_device(dev),
            Some(t) => format!(
                "`{name}` has shape {:?}, the model needs {:?}",
                t.dims(),
                s.dims()
            ),
            None => format!("missing tensor `{name}` of shape {:?}", s.dims()),
        };
        if let Ok(mut p) = self.log.problems.lock() {
            p.push(problem);
        }
        // A placeholder lets construction go on so that every problem is reported at once;
        // `check_complete` turns the list into an error before the model is used.
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("missing tensor `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Samples every tensor a constructor asks for from its init hint, in request order, with a
/// seeded stream.
struct InitBackend {
    rng: Mutex<ChaCha8Rng>,
    out: std::sync::Arc<Mutex<BTreeMap<String, Tensor>>>,
}

impl SimpleBackend for InitBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let n = s.elem_count();
        let mut rng = self
            .rng
            .lock()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let data: Vec<f64> = match h {
            Init::Const(c) => vec![c; n],
            Init::Uniform { lo, up } => (0..n)
                .map(|_| lo + (up - lo) * rng.random::<f64>())
                .collect(),
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut *rng);
                    mean + stdev * z
                })
                .collect(),
            Init::Kaiming { .. } => {
                candle_core::bail!("`{name}`: Kaiming init is not part of MAE's initialisation")
            }
        };
        let t = Tensor::from_vec(data, s, dev)?.to_dtype(dtype)?;
        self.out
            .lock()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("`{name}` requested without a shape during initialisation")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Runs `build` against a sampling backend and returns every tensor it asked for.
pub fn init_params<F>(
    rng: ChaCha8Rng,
    dtype: DType,
    device: &Device,
    build: F,
) -> Result<BTreeMap<String, Tensor>>
where
    F: FnOnce(VarBuilder<'static>) -> Result<()>,
{
    let out = std::sync::Arc::new(Mutex::new(BTreeMap::new()));
    let backend = InitBackend {
        rng: Mutex::new(rng),
        out: out.clone(),
    };
    build(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))?;
    let map = out
        .lock()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        .clone();
    Ok(map)
}

/// Xavier-uniform hint for a (fan_out, fan_in) matrix, as torch.nn.init.xavier_uniform_.
pub fn xavier(fan_in: usize, fan_out: usize) -> Init {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_rule_exempts_norms_biases_and_optionally_fusion_logits() {
        let on = DecayRule {
            decay_fusion_weights: true,
        };
        let off = DecayRule {
            decay_fusion_weights: false,
        };
        assert!(on.decays("blocks.0.attn.qkv.weight", 2));
        assert!(on.decays("cls_token", 3));
        assert!(!on.decays("blocks.0.norm1.weight", 1));
        assert!(!on.decays("blocks.0.attn.qkv.bias", 1));
        assert!(!on.decays("patch_embed.proj.bias", 2));
        assert!(on.decays("proj_weights", 1));
        assert!(!off.decays("proj_weights", 1));
        assert!(off.describe().contains("--no-decay-fusion-weights"));
    }
}
