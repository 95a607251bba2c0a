//! ViT pieces with facebookresearch/mae's (timm's) names and initialisation: pre-norm blocks
//! with a fused qkv projection, exact GELU MLP, LayerNorm eps 1e-6, and the patch embedding.
//!
//! Shapes: B batch, N tokens, D width, H heads, d = D/H head width, P = p*p*C patch length.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::params::xavier;
use crate::kernels as ops;

/// LayerNorm eps used by MAE everywhere (`partial(nn.LayerNorm, eps=1e-6)`).
pub const LN_EPS: f64 = 1e-6;

/// `nn.Linear` with MAE's init: xavier-uniform weight, zero bias.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
    /// Dtype of the product (mixed precision); `None`: the input's.
    mm: Option<DType>,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", xavier(in_dim, out_dim))?;
        let bias = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            mm: None,
        })
    }

    /// Computes the product in `mm` (see [`ops::lowp`]); the output keeps the input's dtype.
    pub fn set_matmul_dtype(&mut self, mm: Option<DType>) {
        self.mm = mm;
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, &self.bias, self.mm)
    }
}

/// `nn.LayerNorm(D, eps=1e-6)`, weight 1 and bias 0 at init; differentiable ([`ops::layer_norm`]).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, LN_EPS)
    }
}

/// Multi-head self-attention with one fused `qkv` projection (rows ordered q|k|v, heads
/// contiguous within each) and an output `proj`.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    /// Dtype of the two attention products; softmax stays in the input's dtype.
    mm: Option<DType>,
}

impl Attention {
    pub fn new(dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        // Xavier on the fused (3D, D) qkv matrix as a whole, as MAE's initialize_weights.
        Ok(Self {
            qkv: Linear::new(dim, 3 * dim, vb.pp("qkv"))?,
            proj: Linear::new(dim, dim, vb.pp("proj"))?,
            num_heads,
            mm: None,
        })
    }

    pub fn set_matmul_dtype(&mut self, mm: Option<DType>) {
        self.qkv.set_matmul_dtype(mm);
        self.proj.set_matmul_dtype(mm);
        self.mm = mm;
    }

    /// Attention in which only the last `n_query` tokens ask (every token is a key and value);
    /// `n_query = N` is ordinary self-attention. (B, N, D) -> (B, n_query, D).
    pub fn forward_last(&self, x: &Tensor, n_query: usize) -> Result<Tensor> {
        let hd = x.dim(2)? / self.num_heads;
        let scale = (hd as f64).powf(-0.5);
        let qkv = self.qkv.forward(x)?; // B N 3D
        let y = ops::attention(&qkv, self.num_heads, n_query, scale, self.mm)?; // B Nq D
        self.proj.forward(&y)
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_last(x, x.dim(1)?)
    }
}

/// fc1 (D -> hidden), exact GELU, fc2 (hidden -> D).
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(dim, hidden, vb.pp("fc1"))?,
            fc2: Linear::new(hidden, dim, vb.pp("fc2"))?,
        })
    }

    pub fn set_matmul_dtype(&mut self, mm: Option<DType>) {
        self.fc1.set_matmul_dtype(mm);
        self.fc2.set_matmul_dtype(mm);
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&ops::gelu(&self.fc1.forward(x)?)?)
    }
}

/// Pre-norm transformer block: x += attn(norm1(x)); x += mlp(norm2(x)).
#[derive(Debug, Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    pub fn new(dim: usize, num_heads: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(dim, vb.pp("norm1"))?,
            attn: Attention::new(dim, num_heads, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, hidden, vb.pp("mlp"))?,
        })
    }

    pub fn set_matmul_dtype(&mut self, mm: Option<DType>) {
        self.attn.set_matmul_dtype(mm);
        self.mlp.set_matmul_dtype(mm);
    }

    /// The residual stream after the attention half, and after the whole block.
    pub fn forward_halves(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let y = (&x + self.mlp.forward(&self.norm2.forward(&x)?)?)?;
        Ok((x, y))
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_halves(x)?.1)
    }
}

/// The p x p stride-p conv of `patch_embed.proj`, computed as a matmul over patches flattened in
/// the conv weight's (C, a, b) order, which is exactly the convolution. Its weight keeps the conv
/// shape (D, C, p, p) so checkpoints match MAE.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    weight: Tensor,
    bias: Tensor,
    patch: usize,
    mm: Option<DType>,
}

impl PatchEmbed {
    pub fn new(in_chans: usize, dim: usize, patch: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("proj");
        let fan_in = in_chans * patch * patch;
        // Xavier on the (D, C*p*p) view, not on the conv's own fans, as MAE initialize_weights.
        let weight =
            vb.get_with_hints((dim, in_chans, patch, patch), "weight", xavier(fan_in, dim))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            patch,
            mm: None,
        })
    }

    pub fn set_matmul_dtype(&mut self, mm: Option<DType>) {
        self.mm = mm;
    }
}

impl Module for PatchEmbed {
    /// (B, C, H, W) -> (B, L, D).
    fn forward(&self, imgs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = imgs.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let dim = self.weight.dim(0)?;
        let patches = imgs
            .reshape(vec![b, c, gh, p, gw, p])? // B C h p w p
            .permute(vec![0, 2, 4, 1, 3, 5])? // B h w C p p
            .reshape((b * gh * gw, c * p * p))?;
        let w = self.weight.reshape((dim, c * p * p))?;
        ops::lowp(&patches, self.mm)?
            .matmul(&ops::lowp(&w, self.mm)?.t()?)?
            .to_dtype(imgs.dtype())?
            .broadcast_add(&self.bias)?
            .reshape((b, gh * gw, dim))
    }
}
