//! One training step's loss and gradients, with the batch split into shards on the CPU.
//!
//! candle walks a backward graph on one thread, and between its ops one of two CPU cores
//! waited (a tiny training step kept 1.56-1.66 of 2 cores busy). MAE's loss couples the images
//! of a batch only through its mean: every image has the same number of removed patches, so
//! the batch loss is the mean of the per-image losses, and a shard of n of B images contributes
//! n/B of its own loss and gradient. So on the CPU the batch is cut into
//! [`crate::kernels::CPU_SHARDS`] shards,
//! each run forward and backward on its own thread of rayon's pool (the matrix products and
//! fused kernels inside share the pool), and their gradients are added in shard order.
//!
//! The shard count is fixed, not the machine's core count, so a seed gives the same run on any
//! CPU; the sum differs from the unsplit batch's only by float rounding (the golden training
//! tests decide). Elsewhere (CUDA) the batch runs whole.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use crate::kernels::{shard_ranges, shards};
use crate::model::{Mae, Mask};

/// The masked-reconstruction loss of `model` on `imgs` (B, C, H, W) with `mask` (B rows) and
/// its gradients: the loss as f64, and a store with the gradient of every parameter it depends
/// on (and of the first shard's activations).
pub fn loss_and_grads(model: &Mae, imgs: &Tensor, mask: &Mask) -> Result<(f64, GradStore)> {
    let b = imgs.dim(0)?;
    let n = shards(b, imgs.device());
    if n == 1 {
        let loss = model.forward(imgs, mask)?.loss;
        let value = scalar(&loss)?;
        return Ok((value, loss.backward()?));
    }
    let parts: Vec<Result<(f64, GradStore)>> = shard_ranges(b, n)
        .into_par_iter()
        .map(|(start, len)| {
            let loss = model
                .forward(&imgs.narrow(0, start, len)?, &mask.rows(start, len))?
                .loss;
            let w = len as f64 / b as f64;
            let value = scalar(&loss)? * w;
            Ok((value, (loss * w)?.backward()?))
        })
        .collect();
    let mut parts = parts.into_iter();
    let (mut loss, mut grads) = parts.next().expect("at least one shard")?;
    for part in parts {
        let (l, g) = part?;
        loss += l;
        grads = add_grads(grads, g)?;
    }
    Ok((loss, grads))
}

fn scalar(loss: &Tensor) -> Result<f64> {
    loss.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// `acc + other` for the tensors both reached (the parameters), acc's first; the rest of
/// `other` (its shard's activations) is dropped.
fn add_grads(mut acc: GradStore, other: GradStore) -> Result<GradStore> {
    let shared: Vec<_> = acc
        .get_ids()
        .filter(|id| other.get_id(**id).is_some())
        .copied()
        .collect();
    let sums: Vec<Result<Tensor>> = shared
        .par_iter()
        .map(|&id| match (acc.get_id(id), other.get_id(id)) {
            (Some(a), Some(b)) => a.add(b),
            _ => unreachable!("both stores hold every listed id"),
        })
        .collect();
    for (id, sum) in shared.into_iter().zip(sums) {
        acc.insert_id(id, sum?);
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::Diff;
    use crate::kernels::CPU_SHARDS;

    use crate::model::ParamStore;
    use candle_core::Device;

    /// Loss and gradients of the batch run whole, as one graph.
    fn unsplit(model: &Mae, imgs: &Tensor, mask: &Mask) -> (f64, GradStore) {
        let loss = model.forward(imgs, mask).unwrap().loss;
        (scalar(&loss).unwrap(), loss.backward().unwrap())
    }

    /// Sharded and unsplit runs agree: the loss, and every parameter's gradient, in f64 (so a
    /// wrong shard weight, row range or a gradient left out of the sum shows far above
    /// rounding). An odd batch makes the shards unequal, 3 and 2 images.
    #[test]
    fn sharded_loss_and_gradients_match_the_whole_batch() {
        let cfg = crate::config::ModelConfig {
            fuse_layers: vec![0],
            ..crate::config::test_config()
        };
        let (model, store): (Mae, ParamStore) =
            Mae::init(&cfg, 7, DType::F64, &Device::Cpu).unwrap();
        let b = 5;
        let s = cfg.img_size;
        let mut rng = crate::rng::stream(3, crate::rng::Purpose::Synthetic, 0);
        let data: Vec<f64> = (0..b * 3 * s * s)
            .map(|_| rand::Rng::random::<f64>(&mut rng) * 2.0 - 1.0)
            .collect();
        let imgs = Tensor::from_vec(data, (b, 3, s, s), &Device::Cpu).unwrap();
        let mask = Mask::random(b, cfg.num_patches(), 0.75, &mut rng);
        assert_eq!(shards(b, &Device::Cpu), 2);

        let (loss, grads) = loss_and_grads(&model, &imgs, &mask).unwrap();
        let (want_loss, want) = unsplit(&model, &imgs, &mask);
        assert!(
            (loss - want_loss).abs() <= 1e-13 * want_loss.abs(),
            "loss {loss} vs {want_loss}"
        );
        let mut checked = 0;
        for (name, var) in store.trainable() {
            let w = want
                .get(var.as_tensor())
                .expect("every parameter has a gradient");
            let g = grads
                .get(var.as_tensor())
                .expect("sharded gradient missing");
            // max |g - w| <= 1e-12 max |w|.
            let d = Diff::tensors(g, w).unwrap();
            assert!(
                d.max_rel <= 1e-12,
                "{name}: |diff| {}, relative {}",
                d.max_abs,
                d.max_rel
            );
            checked += 1;
        }
        assert!(checked > 10, "only {checked} parameters");
    }

    #[test]
    fn shards_cover_the_batch_in_order() {
        assert_eq!(shard_ranges(64, 2), vec![(0, 32), (32, 32)]);
        assert_eq!(shard_ranges(5, 2), vec![(0, 3), (3, 2)]);
        assert_eq!(shard_ranges(7, 3), vec![(0, 3), (3, 2), (5, 2)]);
        assert_eq!(shard_ranges(1, 1), vec![(0, 1)]);
        let cpu = candle_core::Device::Cpu;
        assert_eq!(shards(64, &cpu), CPU_SHARDS);
        assert_eq!(shards(1, &cpu), 1);
    }
}
