//! The masked autoencoder (facebookresearch/mae `MaskedAutoencoderViT`), with MFF's fusion as
//! an optional part of the encoder.
//!
//! Shapes: B batch, C channels, L patches, K = len_keep visible patches, N = 1 + K tokens,
//! D encoder width, Dd decoder width, P = p*p*C patch length.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::fusion::Fusion;
use super::masking::{patchify, Mask};
use super::params::{init_params, ParamStore, FROZEN};
use super::pos_embed::sincos_2d;
use super::vit::{Block, LayerNorm, Linear, PatchEmbed};
use crate::config::ModelConfig;
use crate::rng::{stream, Purpose};

/// Everything the encoder computed on the way to its output.
#[derive(Debug, Clone)]
pub struct EncoderTrace {
    /// Residual stream with cls first: `layers[0]` after the patch embedding (+ position, cls
    /// prepended), `layers[i]` after block i-1; `depth + 1` entries, each (B, N, D).
    pub layers: Vec<Tensor>,
    /// Residual stream inside each block after its attention half, (B, N, D); `depth` entries.
    pub attn: Vec<Tensor>,
    /// MFF's fused sequence before the final norm, (B, N, D).
    pub fused: Option<Tensor>,
    /// After the final norm: what the decoder receives, (B, N, D).
    pub latent: Tensor,
}

/// One training forward pass.
#[derive(Debug, Clone)]
pub struct Output {
    pub encoder: EncoderTrace,
    /// Decoder prediction of every patch, (B, L, P), in the normalised-target space.
    pub pred: Tensor,
    /// Scalar loss over removed patches.
    pub loss: Tensor,
}

/// Per-patch mean and sqrt(unbiased variance + 1e-6) of (B, L, P) patches, each (B, L, 1):
/// norm_pix_loss's normalisation (torch's `.var()` divides by P - 1).
pub fn patch_stats(patches: &Tensor) -> Result<(Tensor, Tensor)> {
    let p = patches.dim(D::Minus1)?;
    let mean = patches.mean_keepdim(D::Minus1)?;
    let var = (patches
        .broadcast_sub(&mean)?
        .sqr()?
        .sum_keepdim(D::Minus1)?
        / (p as f64 - 1.0))?;
    Ok((mean, (var + 1e-6)?.sqrt()?))
}

#[derive(Debug, Clone)]
pub struct Mae {
    pub cfg: ModelConfig,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    fusion: Option<Fusion>,
    norm: LayerNorm,
    decoder_embed: Linear,
    mask_token: Tensor,
    decoder_pos_embed: Tensor,
    decoder_blocks: Vec<Block>,
    decoder_norm: LayerNorm,
    decoder_pred: Linear,
}

impl Mae {
    /// Builds the model from `vb`; tensor names are MAE's state-dict keys.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (d, dd, l) = (cfg.embed_dim, cfg.decoder_embed_dim, cfg.num_patches());
        // Position tables are frozen sin-cos tables; `Mae::init` fills them in after sampling.
        let frozen = Init::Const(0.0);
        let tokens = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(d, cfg.num_heads, cfg.mlp_hidden(), vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let decoder_blocks = (0..cfg.decoder_depth)
            .map(|i| {
                Block::new(
                    dd,
                    cfg.decoder_num_heads,
                    cfg.decoder_mlp_hidden(),
                    vb.pp("decoder_blocks").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed: PatchEmbed::new(cfg.in_chans, d, cfg.patch_size, vb.pp("patch_embed"))?,
            // normal(std=.02), as MAE initialize_weights (not truncated).
            cls_token: vb.get_with_hints((1, 1, d), "cls_token", tokens)?,
            pos_embed: vb.get_with_hints((1, l + 1, d), "pos_embed", frozen)?,
            blocks,
            fusion: if cfg.is_mff() {
                Some(Fusion::new(cfg, vb.clone())?)
            } else {
                None
            },
            norm: LayerNorm::new(d, vb.pp("norm"))?,
            decoder_embed: Linear::new(d, dd, vb.pp("decoder_embed"))?,
            mask_token: vb.get_with_hints((1, 1, dd), "mask_token", tokens)?,
            decoder_pos_embed: vb.get_with_hints((1, l + 1, dd), "decoder_pos_embed", frozen)?,
            decoder_blocks,
            decoder_norm: LayerNorm::new(dd, vb.pp("decoder_norm"))?,
            decoder_pred: Linear::new(dd, cfg.patch_dim(), vb.pp("decoder_pred"))?,
        })
    }

    /// MAE's initialisation drawn from `(seed, Init)`, and the model on those parameters.
    pub fn init(
        cfg: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<(Self, ParamStore)> {
        let mut tensors = init_params(stream(seed, Purpose::Init, 0), dtype, device, |vb| {
            Self::new(cfg, vb).map(|_| ())
        })?;
        let g = cfg.grid();
        for (name, dim) in [
            (FROZEN[0], cfg.embed_dim),
            (FROZEN[1], cfg.decoder_embed_dim),
        ] {
            let table = Tensor::from_vec(sincos_2d(dim, g), (1, g * g + 1, dim), device)?;
            tensors.insert(name.to_string(), table.to_dtype(dtype)?);
        }
        let store = ParamStore::from_tensors(tensors)?;
        let model = Self::from_store(cfg, &store, dtype, device)?;
        Ok((model, store))
    }

    /// The model on stored parameters; every name and shape must match, both ways.
    pub fn from_store(
        cfg: &ModelConfig,
        store: &ParamStore,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (vb, log) = store.builder(dtype, device);
        let model = Self::new(cfg, vb)?;
        store
            .check_complete(&log)
            .map_err(candle_core::Error::Msg)?;
        Ok(model)
    }

    /// Mixed precision: every matrix product (patch embedding, linear layers, attention,
    /// fusion projections) computed in `mm` (bf16 for training on GPUs) from f32 parameters
    /// and activations cast on the fly; `None` restores full precision. Norms, softmax, GELU,
    /// the residual stream, the loss and all gradients of parameters stay in the parameters'
    /// dtype.
    pub fn set_matmul_dtype(&mut self, mm: Option<DType>) {
        self.patch_embed.set_matmul_dtype(mm);
        for b in self.blocks.iter_mut().chain(self.decoder_blocks.iter_mut()) {
            b.set_matmul_dtype(mm);
        }
        if let Some(f) = &mut self.fusion {
            f.set_matmul_dtype(mm);
        }
        self.decoder_embed.set_matmul_dtype(mm);
        self.decoder_pred.set_matmul_dtype(mm);
    }

    pub fn fusion(&self) -> Option<&Fusion> {
        self.fusion.as_ref()
    }

    /// (B, C, H, W) -> patch tokens plus position, (B, L, D).
    fn embed(&self, imgs: &Tensor) -> Result<Tensor> {
        let l = self.cfg.num_patches();
        self.patch_embed
            .forward(imgs)?
            .broadcast_add(&self.pos_embed.narrow(1, 1, l)?)
    }

    /// Prepends cls_token + pos_embed[0]: (B, K, D) -> (B, 1+K, D).
    fn prepend_cls(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        let cls = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)?)?.broadcast_as((b, 1, d))?;
        Tensor::cat(&[&cls, x], 1)
    }

    /// Blocks, optional fusion, final norm.
    fn run_blocks(&self, x: Tensor) -> Result<EncoderTrace> {
        let mut layers = Vec::with_capacity(self.blocks.len() + 1);
        let mut attn = Vec::with_capacity(self.blocks.len());
        layers.push(x);
        for block in &self.blocks {
            let (half, next) = block.forward_halves(&layers[layers.len() - 1])?;
            attn.push(half);
            layers.push(next);
        }
        let fused = match &self.fusion {
            Some(f) => {
                let inputs: Vec<&Tensor> = self
                    .cfg
                    .fused_blocks()
                    .iter()
                    .map(|&i| &layers[i + 1])
                    .collect();
                Some(f.forward(&inputs)?)
            }
            None => None,
        };
        let last = fused.as_ref().unwrap_or(&layers[layers.len() - 1]);
        let latent = self.norm.forward(last)?;
        Ok(EncoderTrace {
            layers,
            attn,
            fused,
            latent,
        })
    }

    /// Encoder on the visible patches of `mask`: N = 1 + K tokens.
    pub fn forward_encoder(&self, imgs: &Tensor, mask: &Mask) -> Result<EncoderTrace> {
        let x = self.embed(imgs)?; // B L D
        let (b, l, d) = x.dims3()?;
        let visible = x
            .reshape((b * l, d))?
            .index_select(&mask.keep_index(x.device())?, 0)?
            .reshape((b, mask.len_keep, d))?; // B K D
        self.run_blocks(self.prepend_cls(&visible)?)
    }

    /// Encoder on every patch (no masking): N = 1 + L tokens. Used by the analyses.
    pub fn forward_encoder_unmasked(&self, imgs: &Tensor) -> Result<EncoderTrace> {
        let x = self.embed(imgs)?;
        self.run_blocks(self.prepend_cls(&x)?)
    }

    /// Decoder: (B, 1+K, D) latent -> (B, L, P) prediction.
    pub fn forward_decoder(&self, latent: &Tensor, mask: &Mask) -> Result<Tensor> {
        let x = self.decoder_embed.forward(latent)?; // B 1+K Dd
        let (b, n, dd) = x.dims3()?;
        let l = mask.num_patches;
        let mask_tokens = self.mask_token.broadcast_as((b, l + 1 - n, dd))?; // B L-K Dd
        let shuffled = Tensor::cat(&[&x.narrow(1, 1, n - 1)?, &mask_tokens], 1)?; // B L Dd
        let unshuffled = shuffled
            .reshape((b * l, dd))?
            .index_select(&mask.restore_index(x.device())?, 0)?
            .reshape((b, l, dd))?; // B L Dd, spatial order
        let mut x = Tensor::cat(&[&x.narrow(1, 0, 1)?, &unshuffled], 1)?
            .broadcast_add(&self.decoder_pos_embed)?; // B 1+L Dd
        for block in &self.decoder_blocks {
            x = block.forward(&x)?;
        }
        let x = self.decoder_norm.forward(&x)?;
        self.decoder_pred.forward(&x)?.narrow(1, 1, l) // B L P
    }

    /// The reconstruction target: patchified images, per-patch normalised with the unbiased
    /// variance when norm_pix_loss (torch's `.var()` default; eps 1e-6).
    pub fn target(&self, imgs: &Tensor) -> Result<Tensor> {
        let target = patchify(imgs, self.cfg.patch_size)?; // B L P
        if !self.cfg.norm_pix_loss {
            return Ok(target);
        }
        let (mean, std) = patch_stats(&target)?;
        target.broadcast_sub(&mean)?.broadcast_div(&std)
    }

    /// Mean squared error per patch, averaged over removed patches only.
    pub fn loss(&self, imgs: &Tensor, pred: &Tensor, mask: &Mask) -> Result<Tensor> {
        let per_patch = self.per_patch_loss(imgs, pred)?; // B L
        let m = mask.mask_tensor(per_patch.dtype(), per_patch.device())?;
        (per_patch * &m)?.sum_all()?.div(&m.sum_all()?)
    }

    /// (B, L) mean squared error of each patch.
    pub fn per_patch_loss(&self, imgs: &Tensor, pred: &Tensor) -> Result<Tensor> {
        (pred - self.target(imgs)?)?.sqr()?.mean(D::Minus1)
    }

    /// Masked forward and loss.
    pub fn forward(&self, imgs: &Tensor, mask: &Mask) -> Result<Output> {
        let encoder = self.forward_encoder(imgs, mask)?;
        let pred = self.forward_decoder(&encoder.latent, mask)?;
        let loss = self.loss(imgs, &pred, mask)?;
        Ok(Output {
            encoder,
            pred,
            loss,
        })
    }
}
