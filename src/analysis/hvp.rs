//! The pre-training loss on one fixed batch and mask as a function of the trainable
//! parameters, with its gradient and Hessian-vector products, on flat f64 vectors (parameters
//! in name order, each flattened row-major).
//!
//! Two ways to multiply by the Hessian:
//! - exact, by double backward: the gradient is built with its graph kept, and the gradient of
//!   <g, v> is H v. candle keeps gradient graphs only on a thread whose switch is on, so exact
//!   products run inside [`with_second_order`] (`kernels::second_order`), and nowhere else;
//! - central finite differences of two gradients, (g(θ + εv) - g(θ - εv)) / 2ε, which needs no
//!   switch and checks the exact products.
//!
//! With one micro-batch, exact products reuse the gradient graph built by the first product
//! (each product is then one extra backward pass); with several, each product rebuilds them.
//! On the CPU each micro-batch is cut into shards as a training batch is
//! ([`crate::kernels::shards`]): their gradient graphs are built in parallel, each on a
//! graph-keeping thread of its own, and their products taken in parallel on rayon's pool
//! (whose threads detach), then added in shard order.
//!
//! The batch may be split into micro-batches to bound memory: every image has the same number
//! of removed patches, so the batch loss is the mean of per-image losses and a micro-batch of n
//! of B images contributes n/B of its own loss, gradient and Hessian.
//!
//! Weight decay, when asked for, adds (wd/2) ||θ_d||² over the decayed tensors (MAE's rule) to
//! the objective: its gradient wd θ_d and Hessian wd on those coordinates are added exactly.

use std::sync::Mutex;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

use super::hessian::{add_multiple, dot};
use crate::kernels::second_order::{second_order, with_second_order};
use crate::kernels::{directional, shard_ranges, shards};
use crate::model::params::DecayRule;
use crate::model::{Mae, Mask, ParamStore};

/// How Hessian-vector products are computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HvpMethod {
    /// Double backward (exact up to float rounding).
    Exact,
    /// Central differences of gradients with step `eps` along the unit direction.
    FiniteDifference { eps: f64 },
}

impl HvpMethod {
    pub fn describe(&self) -> String {
        match self {
            HvpMethod::Exact => "exact (double backward)".to_string(),
            HvpMethod::FiniteDifference { eps } => {
                format!("central finite differences of gradients (eps {eps:e})")
            }
        }
    }
}

/// Per shard of a micro-batch: the gradient of each parameter, its graph kept, and the shard's
/// share of the micro-batch's images.
type ShardGraphs = Vec<(Vec<Tensor>, f64)>;

/// The loss of a model on one fixed batch and mask.
pub struct Objective<'a> {
    model: &'a Mae,
    names: Vec<String>,
    vars: Vec<Var>,
    /// Weight-decay coefficient per tensor (0 where not decayed).
    decay: Vec<f64>,
    offsets: Vec<usize>,
    /// Micro-batches: images and the matching rows of the mask, with their weight n/B.
    chunks: Vec<(Tensor, Mask, f64)>,
    /// The parameters at construction, flat (restored after every finite difference).
    theta: Vec<f64>,
    /// Exact products with a single micro-batch: the gradient with its graph, per shard with
    /// the shard's share, built once and reused by every product (each product is then one
    /// backward pass per shard, the shards in parallel).
    graph: Mutex<Option<ShardGraphs>>,
}

impl<'a> Objective<'a> {
    /// `images` (B, C, H, W) with `mask` (B rows), split into micro-batches of at most
    /// `micro_batch` images; `weight_decay` 0 leaves it out of the objective.
    pub fn new(
        model: &'a Mae,
        store: &ParamStore,
        images: &Tensor,
        mask: &Mask,
        micro_batch: usize,
        weight_decay: f64,
        rule: DecayRule,
    ) -> Result<Objective<'a>> {
        let b = images.dim(0)?;
        if b != mask.batch || b == 0 {
            bail!(
                "{b} images but a mask for {} (must match and be > 0)",
                mask.batch
            );
        }
        let mb = micro_batch.clamp(1, b);
        let mut chunks = Vec::new();
        for start in (0..b).step_by(mb) {
            let n = mb.min(b - start);
            chunks.push((
                images.narrow(0, start, n)?,
                mask.rows(start, n),
                n as f64 / b as f64,
            ));
        }
        let (mut names, mut vars, mut decay, mut offsets) = (vec![], vec![], vec![], vec![0]);
        for (name, var) in store.trainable() {
            let rank = var.as_tensor().rank();
            decay.push(if rule.decays(name, rank) {
                weight_decay
            } else {
                0.0
            });
            names.push(name.clone());
            vars.push(var.clone());
            offsets.push(offsets[offsets.len() - 1] + var.as_tensor().elem_count());
        }
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let theta = flatten(&ts)?;
        Ok(Objective {
            model,
            names,
            vars,
            decay,
            offsets,
            chunks,
            theta,
            graph: Mutex::new(None),
        })
    }

    /// Number of parameters (the length of every vector here).
    pub fn len(&self) -> usize {
        self.offsets[self.offsets.len() - 1]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    fn dtype(&self) -> DType {
        self.vars[0].as_tensor().dtype()
    }

    fn device(&self) -> Device {
        self.vars[0].as_tensor().device().clone()
    }

    /// The parameters as one flat vector.
    pub fn params(&self) -> &[f64] {
        &self.theta
    }

    /// Splits a flat vector into tensors shaped like the parameters.
    pub fn unflatten(&self, v: &[f64]) -> Result<Vec<Tensor>> {
        if v.len() != self.len() {
            bail!("vector of {} values for {} parameters", v.len(), self.len());
        }
        let dev = self.device();
        let dtype = self.dtype();
        self.vars
            .par_iter()
            .enumerate()
            .map(|(i, var)| {
                let part = &v[self.offsets[i]..self.offsets[i + 1]];
                let shape = var.as_tensor().shape();
                // One pass straight to the parameters' type where it is f32 (rounding as
                // to_dtype does).
                Ok(if dtype == DType::F32 {
                    let part: Vec<f32> = part.iter().map(|&x| x as f32).collect();
                    Tensor::from_vec(part, shape, &dev)?
                } else {
                    Tensor::from_vec(part.to_vec(), shape, &dev)?.to_dtype(dtype)?
                })
            })
            .collect()
    }

    fn decay_term(&self, v: &[f64], out: &mut [f64]) {
        for (i, &wd) in self.decay.iter().enumerate() {
            if wd != 0.0 {
                let part = self.offsets[i]..self.offsets[i + 1];
                add_multiple(&mut out[part.clone()], wd, &v[part]);
            }
        }
    }

    /// The objective's value.
    pub fn loss(&self) -> Result<f64> {
        let mut total = 0.0;
        for (imgs, mask, w) in &self.chunks {
            let l = self.model.forward(imgs, mask)?.loss;
            total += w * l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        let mut reg = vec![0.0; self.len()];
        self.decay_term(&self.theta, &mut reg);
        Ok(total + 0.5 * dot(&reg, &self.theta))
    }

    /// The objective's gradient.
    pub fn gradient(&self) -> Result<Vec<f64>> {
        self.gradient_at(&self.theta)
    }

    /// The gradient with the parameters currently set to `theta` (for the decay term).
    fn gradient_at(&self, theta: &[f64]) -> Result<Vec<f64>> {
        let mut g = vec![0.0; self.len()];
        for (imgs, mask, w) in &self.chunks {
            let grads = self.model.forward(imgs, mask)?.loss.backward()?;
            self.add_products(&mut g, &[*w], &[self.collect(&grads)?])?;
        }
        self.decay_term(theta, &mut g);
        Ok(g)
    }

    /// Each parameter's entry of `grads`, zeros where the loss does not reach it.
    fn collect(&self, grads: &candle_core::backprop::GradStore) -> Result<Vec<Tensor>> {
        self.vars
            .iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect()
    }

    /// H v by central differences: (g(θ + εv) - g(θ - εv)) / 2ε; the parameters are restored
    /// bit for bit afterwards.
    pub fn hvp_finite_difference(&self, v: &[f64], eps: f64) -> Result<Vec<f64>> {
        let saved: Vec<Tensor> = self
            .vars
            .iter()
            .map(|x| x.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        let result = (|| {
            let mut out = vec![0.0; self.len()];
            for sign in [1.0, -1.0] {
                let shifted: Vec<f64> = self
                    .theta
                    .iter()
                    .zip(v)
                    .map(|(t, d)| t + sign * eps * d)
                    .collect();
                for (var, t) in self.vars.iter().zip(self.unflatten(&shifted)?) {
                    var.set(&t)?;
                }
                add_multiple(&mut out, sign / (2.0 * eps), &self.gradient_at(&shifted)?);
            }
            Ok(out)
        })();
        for (var, t) in self.vars.iter().zip(&saved) {
            var.set(t)?;
        }
        // The decay term is linear in θ, so the difference already holds wd v exactly (up to
        // rounding); nothing to add.
        result
    }

    /// H v by double backward. Must run inside [`with_second_order`]; fails otherwise.
    pub fn hvp_exact(&self, v: &[f64]) -> Result<Vec<f64>> {
        if !second_order() {
            bail!(
                "exact Hessian-vector products must run inside with_second_order (this thread \
                 detaches gradient graphs)"
            );
        }
        let vt = self.unflatten(v)?;
        let mut out = vec![0.0; self.len()];
        let single = self.chunks.len() == 1;
        for (imgs, mask, w) in &self.chunks {
            let mut cache = self.graph.lock().unwrap_or_else(|e| e.into_inner());
            let shards = match cache.as_ref() {
                Some(g) if single => g.clone(),
                _ => {
                    let g = self.gradient_graphs(imgs, mask)?;
                    if single {
                        *cache = Some(g.clone());
                    }
                    g
                }
            };
            drop(cache);
            // The shards' backward passes through their own graphs at once, on rayon's pool
            // (whose threads detach), so the products and kernels inside share its workers.
            let products: Vec<Result<Vec<Tensor>>> = shards
                .par_iter()
                .map(|(g, _)| {
                    let mut gv = Tensor::zeros((), self.dtype(), &self.device())?;
                    for (gi, vi) in g.iter().zip(&vt) {
                        gv = (gv + directional(gi, vi)?)?;
                    }
                    self.collect(&gv.backward()?)
                })
                .collect();
            let products = products.into_iter().collect::<Result<Vec<_>>>()?;
            let weights: Vec<f64> = shards.iter().map(|(_, share)| w * share).collect();
            self.add_products(&mut out, &weights, &products)?;
        }
        self.decay_term(v, &mut out);
        Ok(out)
    }

    /// out += Σ_s weights[s] · products[s] (each a list of tensors shaped like the parameters,
    /// a shard's product or a gradient), the shards added in order for every value, parameters in parallel: one pass over the
    /// products, read where they lie.
    fn add_products(
        &self,
        out: &mut [f64],
        weights: &[f64],
        products: &[Vec<Tensor>],
    ) -> Result<()> {
        let mut parts: Vec<(usize, &mut [f64])> = Vec::with_capacity(self.vars.len());
        let mut rest = out;
        for i in 0..self.vars.len() {
            let (part, tail) = rest.split_at_mut(self.offsets[i + 1] - self.offsets[i]);
            parts.push((i, part));
            rest = tail;
        }
        parts.into_par_iter().try_for_each(|(i, part)| {
            for (c, product) in weights.iter().zip(products) {
                add_scaled(part, *c, &product[i])?;
            }
            Ok(())
        })
    }

    /// The gradient of the loss on `imgs` with `mask`, its graph kept, as one gradient per
    /// shard with the shard's share of the images (see [`crate::train::step`]). Shards past the
    /// first are built in parallel, each on a graph-keeping thread of its own.
    fn gradient_graphs(&self, imgs: &Tensor, mask: &Mask) -> Result<ShardGraphs> {
        let b = imgs.dim(0)?;
        let build = |start: usize, n: usize| -> Result<(Vec<Tensor>, f64)> {
            let loss = self
                .model
                .forward(&imgs.narrow(0, start, n)?, &mask.rows(start, n))?
                .loss;
            Ok((self.collect(&loss.backward()?)?, n as f64 / b as f64))
        };
        let ranges = shard_ranges(b, shards(b, imgs.device()));
        if ranges.len() == 1 {
            return Ok(vec![build(0, b)?]);
        }
        std::thread::scope(|s| {
            let running: Vec<_> = ranges
                .iter()
                .map(|&(start, n)| s.spawn(move || with_second_order(|| build(start, n))))
                .collect();
            running
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a gradient-graph thread panicked"))?
                })
                .collect()
        })
    }

    /// H v with `method`.
    pub fn hvp(&self, v: &[f64], method: HvpMethod) -> Result<Vec<f64>> {
        match method {
            HvpMethod::Exact => self.hvp_exact(v),
            HvpMethod::FiniteDifference { eps } => self.hvp_finite_difference(v, eps),
        }
    }
}

/// out += c · t for a tensor `t` of out's length (any shape), read in place when it is a
/// contiguous f32/f64 CPU tensor.
fn add_scaled(out: &mut [f64], c: f64, t: &Tensor) -> Result<()> {
    if t.elem_count() != out.len() {
        bail!("{} values for a part of {}", t.elem_count(), out.len());
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            match cpu {
                candle_core::CpuStorage::F32(x) => {
                    add_each(out, &x[a..b], |x| c * x as f64);
                    return Ok(());
                }
                candle_core::CpuStorage::F64(x) => {
                    add_each(out, &x[a..b], |x| c * x);
                    return Ok(());
                }
                _ => {}
            }
        }
    }
    let x = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    add_each(out, &x, |x| c * x);
    Ok(())
}

/// out[i] += f(x[i]).
fn add_each<T: Copy>(out: &mut [f64], x: &[T], f: impl Fn(T) -> f64) {
    out.iter_mut().zip(x).for_each(|(o, &x)| *o += f(x));
}

/// Tensors concatenated into one flat f64 vector.
fn flatten(ts: &[Tensor]) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(ts.iter().map(Tensor::elem_count).sum());
    for t in ts {
        out.extend(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_scaled_reads_every_layout() {
        // Contiguous f32, a contiguous view at an offset (rows 1..3 of 4), a transposed
        // (strided) view and f64: each adds c · t in row-major order of t's shape.
        let m = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 3))
            .unwrap();
        let cases = [
            (m.clone(), (0..12).map(|i| i as f64).collect::<Vec<_>>()),
            (
                m.narrow(0, 1, 2).unwrap(),
                (3..9).map(|i| i as f64).collect(),
            ),
            (
                m.t().unwrap(),
                vec![0., 3., 6., 9., 1., 4., 7., 10., 2., 5., 8., 11.],
            ),
            (
                m.to_dtype(DType::F64).unwrap(),
                (0..12).map(|i| i as f64).collect(),
            ),
        ];
        for (t, want) in cases {
            let mut out = vec![1.0; want.len()];
            add_scaled(&mut out, 0.5, &t).unwrap();
            let want: Vec<f64> = want.iter().map(|w| 1.0 + 0.5 * w).collect();
            assert_eq!(out, want, "{:?} {:?}", t.dims(), t.stride());
        }
        assert!(add_scaled(&mut [0.0; 5], 1.0, &m).is_err());
    }
}
