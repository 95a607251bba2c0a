//! Multi-level Feature Fusion (MFF; Liu et al., ICCV 2023; mmpretrain `MFFViT`).
//!
//! Shallow block outputs h_0..h_{n-2} (raw residual stream, cls + visible tokens) are each
//! projected (`proj_layers.{k}`), the last block's output h_{n-1} passes unprojected, and the n
//! sequences are combined:
//! - `weighted`: fused = sum_k softmax(w)_k P_k(h_k), with logits `proj_weights` of shape
//!   (n,1,1,1) initialised to ones, so every weight starts at 1/n;
//! - `attention`: one multi-head attention layer (`fusion_attn`) over the concatenation
//!   [P_0(h_0), ..., h_{n-1}] along tokens, of which the outputs at h_{n-1}'s positions go on
//!   (no residual, no norm).
//!
//! The fused sequence then goes through the encoder's final norm into the unchanged decoder.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::vit::{Attention, Linear};
use crate::config::{Fusion as FusionKind, ModelConfig, Projection};
use crate::kernels as ops;

/// One shallow layer's projection.
#[derive(Debug, Clone)]
enum Proj {
    Linear(Linear),
    /// Linear-GELU-Linear, named like `nn.Sequential` (`.0`, `.2`).
    Mlp(Linear, Linear),
}

impl Proj {
    fn new(kind: Projection, dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            Projection::Linear => Proj::Linear(Linear::new(dim, dim, vb)?),
            Projection::Mlp => Proj::Mlp(
                Linear::new(dim, dim, vb.pp("0"))?,
                Linear::new(dim, dim, vb.pp("2"))?,
            ),
        })
    }
}

impl Proj {
    fn set_matmul_dtype(&mut self, mm: Option<DType>) {
        match self {
            Proj::Linear(l) => l.set_matmul_dtype(mm),
            Proj::Mlp(a, b) => {
                a.set_matmul_dtype(mm);
                b.set_matmul_dtype(mm);
            }
        }
    }
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Linear(l) => l.forward(x),
            Proj::Mlp(a, b) => b.forward(&ops::gelu(&a.forward(x)?)?),
        }
    }
}

#[derive(Debug, Clone)]
enum Combine {
    /// Raw logits `proj_weights`, (n,1,1,1).
    Weighted(Tensor),
    Attention(Attention),
}

/// The fusion part of an MFF encoder.
#[derive(Debug, Clone)]
pub struct Fusion {
    projs: Vec<Proj>,
    combine: Combine,
}

impl Fusion {
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.fuse_layers.len() + 1;
        let projs = (0..n - 1)
            .map(|k| Proj::new(cfg.projection, cfg.embed_dim, vb.pp("proj_layers").pp(k)))
            .collect::<Result<Vec<_>>>()?;
        let combine = match cfg.fusion {
            // Ones, as mmpretrain: every layer starts with weight 1/n after the softmax.
            FusionKind::Weighted => Combine::Weighted(vb.get_with_hints(
                (n, 1, 1, 1),
                "proj_weights",
                Init::Const(1.0),
            )?),
            FusionKind::Attention => Combine::Attention(Attention::new(
                cfg.embed_dim,
                cfg.num_heads,
                vb.pp("fusion_attn"),
            )?),
        };
        Ok(Self { projs, combine })
    }

    /// Matrix products of the projections (and attention fusion) in `mm`; the weighted sum
    /// stays in the inputs' dtype.
    pub fn set_matmul_dtype(&mut self, mm: Option<DType>) {
        for p in &mut self.projs {
            p.set_matmul_dtype(mm);
        }
        if let Combine::Attention(a) = &mut self.combine {
            a.set_matmul_dtype(mm);
        }
    }

    /// The softmax-normalised fusion weights (shallow layers first, then the last), or `None`
    /// for attention fusion.
    pub fn weights(&self) -> Result<Option<Tensor>> {
        match &self.combine {
            Combine::Weighted(w) => {
                let n = w.dim(0)?;
                Ok(Some(
                    ops::softmax_last_dim(&w.reshape((1, n))?)?.reshape(n)?,
                ))
            }
            Combine::Attention(_) => Ok(None),
        }
    }

    /// `layers`: the fused block outputs (shallow ones in `fuse_layers` order, then the last),
    /// each (B, N, D). Returns the fused (B, N, D) sequence.
    pub fn forward(&self, layers: &[&Tensor]) -> Result<Tensor> {
        let (last, shallow) = layers
            .split_last()
            .ok_or_else(|| candle_core::Error::Msg("fusion needs at least one layer".into()))?;
        let projected = shallow
            .iter()
            .zip(&self.projs)
            .map(|(h, p)| p.forward(h))
            .collect::<Result<Vec<_>>>()?;
        match &self.combine {
            Combine::Weighted(_) => {
                let w = self
                    .weights()?
                    .ok_or_else(|| candle_core::Error::Msg("no weights".into()))?;
                let n = projected.len();
                let mut fused = last.broadcast_mul(&w.get(n)?)?;
                for (k, p) in projected.iter().enumerate() {
                    fused = (fused + p.broadcast_mul(&w.get(k)?)?)?;
                }
                Ok(fused)
            }
            Combine::Attention(attn) => {
                let n_last = last.dim(1)?;
                let mut all: Vec<&Tensor> = projected.iter().collect();
                all.push(last);
                let tokens = Tensor::cat(&all, 1)?; // B n*N D
                attn.forward_last(&tokens, n_last)
            }
        }
    }
}
