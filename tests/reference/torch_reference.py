#!/usr/bin/env python3
"""Independent PyTorch reference for mimscope's MAE / MFF-MAE.

Self-contained restatement (plain torch, no timm, no mmpretrain) of
  * facebookresearch/mae  models_mae.py (MaskedAutoencoderViT) + util/pos_embed.py
  * timm 0.3.2 vision_transformer Block / Attention / Mlp (as used by MAE)
  * open-mmlab/mmpretrain mmpretrain/models/selfsup/mff.py (MFFViT, weighted fusion)
  * the MFF paper's ablations (Linear-GELU-Linear projection; self-attention fusion),
    which are NOT in mmpretrain: their exact form is fixed by mimscope's spec (see README).

Writes, into tests/fixtures/ (path relative to this file):
  {mae,mff,mffattn}_tiny.safetensors      state dicts (float32) + metadata["config"]
  {mae,mff,mffattn}_tiny_io.safetensors   inputs, intermediates, loss, gradients
  pos_embed.safetensors                   MAE 2-D sin-cos tables

Everything is computed in float64 from the float32-rounded stored weights and inputs,
then stored as float32 (int64 for indices). Deterministic: fixed seeds, explicit
torch.Generator, single CPU thread; rerunning reproduces the same bytes.

Usage:  python tests/reference/torch_reference.py [--out DIR]
"""
import argparse
import hashlib
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

# Single thread: multi-threaded CPU reductions can change summation order (and thus
# the last bits) with the thread count; one thread makes the bytes machine-independent
# for a given torch build.
torch.set_num_threads(1)
torch.manual_seed(0)

LN_EPS = 1e-6  # MAE uses partial(nn.LayerNorm, eps=1e-6); torch's default 1e-5 is a trap.


# ----------------------------------------------------------------------------------------
# 2-D sin-cos position embedding (MAE util/pos_embed.py), computed in float64.
# ----------------------------------------------------------------------------------------
def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product
    # Trap: sin block first, then cos block (not interleaved).
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    assert embed_dim % 2 == 0
    # MAE calls these emb_h / emb_w, but grid[0] holds the *column* (w) coordinate
    # because of meshgrid(grid_w, grid_h) below: trap, the first half encodes the column.
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    # MAE builds the grid in float32 and so computes the table in float32; mimscope's spec
    # asks for float64 then one cast (the difference is ~1e-6 at most; see README).
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first (trap)
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        # A zero row for the cls token is prepended.
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_mae_f32(embed_dim, grid_size):
    """MAE's literal float32 arithmetic (for reporting the f32-vs-f64 gap only)."""
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float32)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


# ----------------------------------------------------------------------------------------
# timm Block (Attention + Mlp), as used by MAE: pre-norm, qkv_bias=True, no dropout.
# ----------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5  # timm: qk_scale or head_dim ** -0.5
        # Trap: one fused Linear(D, 3D) with bias; output rows ordered [q | k | v], heads
        # contiguous within each third.
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, hd)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # scale applied after the product
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)  # heads re-concatenated in order
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        # Trap: exact erf GELU (nn.GELU default), not the tanh approximation.
        return self.fc2(F.gelu(self.fc1(x), approximate="none"))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        # Conv2d k = stride = p. Trap: its weight flattens in (c, a, b) order, whereas
        # patchify() orders a patch vector as (a, b, c) (channel fastest).
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D), row-major patches


# ----------------------------------------------------------------------------------------
# MaskedAutoencoderViT (facebookresearch/mae models_mae.py), with an explicit `noise`
# argument replacing torch.rand, plus the MFF fusion options.
# ----------------------------------------------------------------------------------------
class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads,
                 decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
                 norm_pix_loss, fuse_layers=None, projection=None, fusion=None):
        super().__init__()
        self.in_chans = in_chans
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        L = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Frozen sin-cos tables, but still in the state dict (trap: must be loaded).
        self.pos_embed = nn.Parameter(torch.zeros(1, L + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LN_EPS)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss

        # ---- MFF (mmpretrain MFFViT + paper ablations) ----
        self.fuse = fuse_layers is not None
        if self.fuse:
            assert projection in ("linear", "mlp") and fusion in ("weighted", "attention")
            # mmpretrain's out_indices: the shallow layers, then always the last block.
            self.out_indices = list(fuse_layers) + [depth - 1]
            assert all(0 <= i < depth - 1 for i in fuse_layers)
            # mmpretrain collects block outputs in block order but indexes proj_layers by
            # position in out_indices; the two orders agree only for a strictly increasing
            # list, which is all this reference (and the fixtures) use.
            assert all(a < b for a, b in zip(fuse_layers, fuse_layers[1:]))
            n = len(self.out_indices)
            self.projection, self.fusion = projection, fusion
            if projection == "linear":
                # mmpretrain: one Linear(D, D) with bias per shallow layer; none for the last.
                self.proj_layers = nn.ModuleList([nn.Linear(embed_dim, embed_dim) for _ in range(n - 1)])
            else:
                # Paper ablation: Linear-GELU(exact)-Linear; Sequential indices 0 and 2.
                self.proj_layers = nn.ModuleList([
                    nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
                    for _ in range(n - 1)])
            if fusion == "weighted":
                # mmpretrain: torch.ones(n).view(-1, 1, 1, 1), softmax over dim 0.
                self.proj_weights = nn.Parameter(torch.ones(n).view(-1, 1, 1, 1))
            else:
                # Paper ablation: one self-attention over the concatenated fused tokens,
                # same form as the block attention, encoder head count.
                self.fusion_attn = Attention(embed_dim, num_heads)

    # -- MAE helpers --------------------------------------------------------------------
    def patchify(self, imgs):
        p = self.patch_embed.patch_size
        assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        # Trap: 'nchpwq->nhwpqc': element (a*p+b)*3+c, the channel varies fastest.
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p ** 2 * 3)

    @staticmethod
    def masking_indices(noise, mask_ratio):
        """MAE random_masking's index logic, with `noise` given instead of torch.rand."""
        N, L = noise.shape
        len_keep = int(L * (1 - mask_ratio))  # floor
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]  # trap: visible tokens in noise order, not spatial
        mask = torch.ones([N, L], dtype=noise.dtype, device=noise.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)  # 0 keep, 1 remove
        return ids_shuffle, ids_restore, ids_keep, mask

    def random_masking(self, x, noise, mask_ratio):
        N, L, D = x.shape
        _, ids_restore, ids_keep, mask = self.masking_indices(noise, mask_ratio)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        return x_masked, mask, ids_restore, ids_keep

    def _fuse(self, res):
        """res: list of raw block outputs h_k (B, N, D) in out_indices order."""
        projected = []
        for k, h in enumerate(res):
            # Every fused layer but the last gets its own projection; the last passes as is.
            projected.append(self.proj_layers[k](h) if k < len(res) - 1 else h)
        if self.fusion == "weighted":
            w = F.softmax(self.proj_weights, dim=0)  # (n,1,1,1), softmax over layers
            fused = (torch.stack(projected) * w).sum(dim=0)
            return fused, w.view(-1)
        # attention: tokens [P_0(h_0), ..., P_{n-2}(h_{n-2}), h_last] along the token dim;
        # output = attention output at the last N positions (those of h_last); no residual,
        # no norm.
        N = res[-1].shape[1]
        t = torch.cat(projected, dim=1)  # (B, n*N, D)
        return self.fusion_attn(t)[:, -N:, :], None

    # -- forward --------------------------------------------------------------------------
    def forward_encoder(self, imgs, noise, mask_ratio, record=None):
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]  # pos added before masking, without the cls row
        x, mask, ids_restore, ids_keep = self.random_masking(x, noise, mask_ratio)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]  # cls gets pos row 0 (zeros)
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if record is not None:
            record["_pre_blocks"] = x
        res = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if record is not None:
                record[f"block_{i}"] = x
            if self.fuse and i in self.out_indices:
                res.append(x)
        if self.fuse:
            x, w = self._fuse(res)
            if record is not None:
                record["fused"] = x
                if w is not None:
                    record["_softmax_w"] = w
        x = self.norm(x)  # final encoder norm, after fusion for MFF
        return x, mask, ids_restore, ids_keep

    def forward_encoder_unmasked(self, imgs):
        """Residual stream of the plain (unmasked) encoder: [before block 0, after each block]."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        out = [x]
        for blk in self.blocks:
            x = blk(x)
            out.append(x)
        return out

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)  # re-prepend cls
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]  # drop cls

    def forward_loss(self, imgs, pred, mask, norm_pix_loss):
        target = self.patchify(imgs)
        if norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # trap: unbiased (divides by p*p*3 - 1)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)  # per-patch MSE
        return (loss * mask).sum() / mask.sum()  # trap: masked (removed) patches only

    def forward(self, imgs, noise, mask_ratio=0.75, norm_pix_loss=None, record=None):
        if norm_pix_loss is None:
            norm_pix_loss = self.norm_pix_loss
        latent, mask, ids_restore, ids_keep = self.forward_encoder(imgs, noise, mask_ratio, record)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask, norm_pix_loss)
        if record is not None:
            record.update(latent=latent, pred=pred, mask=mask, ids_restore=ids_restore, ids_keep=ids_keep)
        return loss


# ----------------------------------------------------------------------------------------
# Configs, random (non-init) weights, fixtures.
# ----------------------------------------------------------------------------------------
BASE = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=4, num_heads=4,
            decoder_embed_dim=24, decoder_depth=2, decoder_num_heads=3, mlp_ratio=4.0,
            norm_pix_loss=True)
CONFIGS = {
    "mae": dict(BASE),
    "mff": dict(BASE, fuse_layers=[0, 2], projection="linear", fusion="weighted"),
    "mffattn": dict(BASE, fuse_layers=[1], projection="mlp", fusion="attention"),
}
SEEDS = {"mae": 101, "mff": 202, "mffattn": 303}
INPUT_SEED = 7
MASK_RATIO = 0.75
B = 2


def randomize_(model, gen):
    """Every trainable tensor random and non-trivial (not MAE's init), in float64 then cast.

    Linear / conv weights: xavier-uniform bound sqrt(6/(fan_in+fan_out)) on the 2-D view
    (fused qkv as one (3D, D) matrix; conv as (D, 3p^2)); all biases N(0, 0.1);
    LayerNorm weight 1 + N(0, 0.1), bias N(0, 0.1); cls/mask tokens N(0, 0.5);
    proj_weights N(0, 1). Parameters are visited in named_parameters() order.
    """
    ln_params = set()
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm):
            ln_params.add(id(mod.weight))
            ln_params.add(id(mod.bias))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            shape = p.shape
            if name in ("cls_token", "mask_token"):
                v = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
            elif name == "proj_weights":
                v = torch.randn(shape, generator=gen, dtype=torch.float64)
            elif id(p) in ln_params and name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
            elif name.endswith("bias"):
                v = 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
            elif name.endswith("weight"):
                fan_out = shape[0]
                fan_in = int(np.prod(shape[1:]))
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                v = (2.0 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1.0) * bound
            else:
                raise ValueError(f"unhandled parameter {name}")
            p.copy_(v.to(p.dtype))


def build_model(name):
    cfg = CONFIGS[name]
    model = MaskedAutoencoderViT(**cfg)  # float32 parameters
    gen = torch.Generator().manual_seed(SEEDS[name])
    randomize_(model, gen)
    g = int(model.patch_embed.num_patches ** 0.5)
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(
            get_2d_sincos_pos_embed(cfg["embed_dim"], g, cls_token=True)).float().unsqueeze(0))
        model.decoder_pos_embed.copy_(torch.from_numpy(
            get_2d_sincos_pos_embed(cfg["decoder_embed_dim"], g, cls_token=True)).float().unsqueeze(0))
    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    # float32 -> float64 is exact, so the f64 model computes with exactly the stored weights.
    model = model.double()
    model.load_state_dict({k: v.double() for k, v in sd.items()})
    for k, v in model.state_dict().items():
        assert torch.equal(v.float(), sd[k])
    return model, sd, cfg


def make_inputs(L):
    gen = torch.Generator().manual_seed(INPUT_SEED)
    images = torch.randn((B, 3, 16, 16), generator=gen, dtype=torch.float32)
    noise = torch.rand((B, L), generator=gen, dtype=torch.float32)
    for b in range(B):  # argsort must be tie-free so any implementation agrees
        assert len(set(noise[b].tolist())) == L
    return images, noise


def finite_difference_check(model, imgs, noise, grads, picks, eps=1e-6):
    params = dict(model.named_parameters())
    worst = 0.0
    for name, idx in picks:
        p = params[name]
        with torch.no_grad():
            orig = p[idx].item()
            p[idx] = orig + eps
            lp = model(imgs, noise, MASK_RATIO).item()
            p[idx] = orig - eps
            lm = model(imgs, noise, MASK_RATIO).item()
            p[idx] = orig
        fd = (lp - lm) / (2 * eps)
        an = grads[name][idx].item()
        rel = abs(fd - an) / max(1e-8, abs(fd), abs(an))
        worst = max(worst, rel)
        assert abs(fd - an) <= 1e-6 + 1e-5 * abs(an), (name, idx, fd, an)
        print(f"    FD {name}{list(idx)}: analytic {an:+.10e}  fd {fd:+.10e}  rel {rel:.1e}")
    return worst


def run_config(name, out_dir):
    model, sd, cfg = build_model(name)
    L = model.patch_embed.num_patches
    len_keep = int(L * (1 - MASK_RATIO))
    images32, noise32 = make_inputs(L)
    imgs, noise = images32.double(), noise32.double()

    rec = {}
    model.zero_grad(set_to_none=True)
    loss = model(imgs, noise, MASK_RATIO, norm_pix_loss=True, record=rec)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        loss_nn = model(imgs, noise, MASK_RATIO, norm_pix_loss=False)
        unmasked = model.forward_encoder_unmasked(imgs)
        patches = model.patchify(imgs)

    # ---- sanity checks ----
    assert torch.all(rec["mask"].sum(dim=1) == L - len_keep)
    assert rec["ids_keep"].shape == (B, len_keep)
    if "_softmax_w" in rec:
        assert abs(rec["_softmax_w"].sum().item() - 1.0) < 1e-12
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    assert set(grads) == set(trainable) and "pos_embed" not in grads and "decoder_pos_embed" not in grads
    for k, gr in grads.items():
        assert gr.abs().max().item() > 0, f"zero gradient for {k}"
    # Attention mixes all tokens, so only the pre-block stream is comparable between the
    # masked and unmasked encoders: cls row equal, visible rows = unmasked rows at ids_keep.
    x0 = unmasked[0]
    gathered = torch.gather(x0[:, 1:], 1, rec["ids_keep"].unsqueeze(-1).repeat(1, 1, x0.shape[-1]))
    assert torch.equal(rec["_pre_blocks"][:, 1:], gathered)
    assert torch.equal(rec["_pre_blocks"][:, :1], x0[:, :1])
    assert torch.isfinite(loss)
    # patchify element (a*p+b)*3+c of patch k=r*w+s is pixel(c, r*p+a, s*p+b).
    p_, w_ = cfg["patch_size"], cfg["img_size"] // cfg["patch_size"]
    for (n_, r, s_, a, b_, c) in [(0, 1, 2, 3, 0, 2), (1, 3, 3, 1, 2, 0), (1, 0, 1, 2, 3, 1)]:
        assert patches[n_, r * w_ + s_, (a * p_ + b_) * 3 + c] == imgs[n_, c, r * p_ + a, s_ * p_ + b_]

    cross_check_with_torch_builtins(model, rec["block_0"], patches, imgs)

    picks = [("patch_embed.proj.weight", (0, 1, 2, 3)), ("patch_embed.proj.bias", (5,)),
             ("cls_token", (0, 0, 7)), ("blocks.0.attn.qkv.weight", (40, 3)),
             ("blocks.1.attn.qkv.bias", (70,)), ("blocks.2.mlp.fc1.weight", (10, 11)),
             ("blocks.3.norm2.weight", (4,)), ("norm.bias", (9,)), ("mask_token", (0, 0, 3)),
             ("decoder_blocks.1.attn.proj.weight", (2, 20)), ("decoder_pred.bias", (47,))]
    if name == "mff":
        picks += [("proj_weights", (0, 0, 0, 0)), ("proj_weights", (2, 0, 0, 0)),
                  ("proj_layers.1.weight", (3, 30)), ("proj_layers.0.bias", (1,))]
    if name == "mffattn":
        picks += [("proj_layers.0.0.weight", (5, 6)), ("proj_layers.0.2.bias", (8,)),
                  ("fusion_attn.qkv.weight", (80, 2)), ("fusion_attn.proj.bias", (0,))]
    worst = finite_difference_check(model, imgs, noise, grads, picks)

    # ---- write ----
    meta = {"config": json.dumps(cfg)}
    f32 = lambda t: t.detach().to(torch.float32).contiguous()
    io = {
        "images": images32.contiguous(), "noise": noise32.contiguous(),
        "mask": f32(rec["mask"]),
        "ids_restore": rec["ids_restore"].to(torch.int64).contiguous(),
        "ids_keep": rec["ids_keep"].to(torch.int64).contiguous(),
        "patches": f32(patches),
        "latent": f32(rec["latent"]), "pred": f32(rec["pred"]),
        "loss": f32(loss.reshape(1)), "loss_no_norm_pix": f32(loss_nn.reshape(1)),
    }
    for i in range(cfg["depth"]):
        io[f"block_{i}"] = f32(rec[f"block_{i}"])
    if "fused" in rec:
        io["fused"] = f32(rec["fused"])
    for i, x in enumerate(unmasked):
        io[f"unmasked_{i}"] = f32(x)
    for k, gr in grads.items():
        io[f"grad.{k}"] = f32(gr)

    p_model = os.path.join(out_dir, f"{name}_tiny.safetensors")
    p_io = os.path.join(out_dir, f"{name}_tiny_io.safetensors")
    save_file(sd, p_model, metadata=meta)
    save_file(io, p_io, metadata=meta)
    print(f"  {name}: loss {loss.item():.10f}  loss_no_norm_pix {loss_nn.item():.10f}  "
          f"params {sum(v.numel() for v in sd.values())}  worst FD rel err {worst:.1e}")
    if "_softmax_w" in rec:
        print(f"    softmax(proj_weights) = {rec['_softmax_w'].tolist()}")
    return [p_model, p_io]


def cross_check_with_torch_builtins(model, x, patches, imgs):
    """Second, independent formulation of the pieces, using torch's own modules.

    A timm pre-norm Block equals nn.TransformerEncoderLayer(norm_first=True, gelu, eps 1e-6,
    dropout 0) with in_proj = qkv ([q|k|v] rows, heads contiguous), out_proj = proj,
    linear1/2 = fc1/fc2. This validates head layout, scale, LN eps and GELU form.
    """
    def as_torch_layer(blk, dim, heads):
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=blk.mlp.fc1.out_features,
                                           dropout=0.0, activation="gelu", layer_norm_eps=LN_EPS,
                                           batch_first=True, norm_first=True, dtype=torch.float64)
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(blk.attn.qkv.weight)
            layer.self_attn.in_proj_bias.copy_(blk.attn.qkv.bias)
            layer.self_attn.out_proj.weight.copy_(blk.attn.proj.weight)
            layer.self_attn.out_proj.bias.copy_(blk.attn.proj.bias)
            layer.linear1.weight.copy_(blk.mlp.fc1.weight); layer.linear1.bias.copy_(blk.mlp.fc1.bias)
            layer.linear2.weight.copy_(blk.mlp.fc2.weight); layer.linear2.bias.copy_(blk.mlp.fc2.bias)
            for a, b in ((layer.norm1, blk.norm1), (layer.norm2, blk.norm2)):
                a.weight.copy_(b.weight); a.bias.copy_(b.bias)
        return layer.eval()

    with torch.no_grad():
        blk = model.blocks[0]
        ref = as_torch_layer(blk, x.shape[-1], blk.attn.num_heads)
        # the fast path is disabled in training mode / with grad; call the python path:
        ref.train()
        assert torch.allclose(ref(x), blk(x), rtol=0, atol=1e-12)
        dblk = model.decoder_blocks[0]
        xd = torch.randn((x.shape[0], x.shape[1], dblk.norm1.normalized_shape[0]),
                         generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        refd = as_torch_layer(dblk, xd.shape[-1], dblk.attn.num_heads).train()
        assert torch.allclose(refd(xd), dblk(xd), rtol=0, atol=1e-12)
        if hasattr(model, "fusion_attn"):
            fa = model.fusion_attn
            mha = nn.MultiheadAttention(x.shape[-1], fa.num_heads, batch_first=True, dtype=torch.float64)
            mha.in_proj_weight.copy_(fa.qkv.weight); mha.in_proj_bias.copy_(fa.qkv.bias)
            mha.out_proj.weight.copy_(fa.proj.weight); mha.out_proj.bias.copy_(fa.proj.bias)
            assert torch.allclose(mha(x, x, x, need_weights=False)[0], fa(x), rtol=0, atol=1e-12)
        # Patch-embed conv == Linear over patchified vectors with the (c,a,b)->(a,b,c) permuted
        # weight (the documented trap).
        w = model.patch_embed.proj.weight  # (D, 3, p, p)
        w_lin = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (D, p*p*3), (a,b,c) order
        emb = patches @ w_lin.T + model.patch_embed.proj.bias
        assert torch.allclose(emb, model.patch_embed(imgs), rtol=0, atol=1e-12)


def check_masking_worked_example():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]], dtype=torch.float64)
    ids_shuffle, ids_restore, ids_keep, mask = MaskedAutoencoderViT.masking_indices(noise, 0.5)
    assert ids_shuffle.tolist() == [[1, 3, 2, 0]]
    assert ids_restore.tolist() == [[3, 0, 2, 1]]
    assert ids_keep.tolist() == [[1, 3]]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def write_pos_embed(out_dir):
    p768 = get_2d_sincos_pos_embed(768, 14, cls_token=True)
    p16 = get_2d_sincos_pos_embed(16, 4, cls_token=True)
    assert p768.shape == (197, 768) and p16.shape == (17, 16)
    # Trap (in the brief's wording): the documented check values "k=1: d0=0.841471,
    # d192=0.540302, d384=0, d576=1" are for PATCH k=1 (row i=0, column j=1), which is row 2
    # of the cls-prefixed table; row 1 is patch k=0 = [sin 0 | cos 0 | sin 0 | cos 0].
    assert np.all(p768[0] == 0)
    assert abs(p768[2, 0] - 0.841471) < 1e-6 and abs(p768[2, 192] - 0.540302) < 1e-6
    assert p768[2, 384] == 0.0 and p768[2, 576] == 1.0
    assert np.all(p768[1, :192] == 0) and np.all(p768[1, 192:384] == 1)
    assert np.all(p768[1, 384:576] == 0) and np.all(p768[1, 576:] == 1)
    # patch k=14 is row i=1, column j=0: the row is encoded in the second half.
    assert p768[15, 0] == 0.0 and abs(p768[15, 384] - 0.841471) < 1e-6
    gap = np.abs(p768.astype(np.float32) - get_2d_sincos_pos_embed_mae_f32(768, 14).astype(np.float32)).max()
    print(f"  pos_embed: max |f64-then-cast - MAE literal f32| over (197,768) = {gap:.3e}")
    path = os.path.join(out_dir, "pos_embed.safetensors")
    save_file({"pos_768_14": torch.from_numpy(p768).float().contiguous(),
               "pos_16_4": torch.from_numpy(p16).float().contiguous()}, path)
    return [path]


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "fixtures")))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__}  numpy {np.__version__}")
    check_masking_worked_example()
    files = write_pos_embed(args.out)
    for name in CONFIGS:
        files += run_config(name, args.out)
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        print(f"  {os.path.basename(f):32s} {len(data):8d} B  sha256 {hashlib.sha256(data).hexdigest()[:16]}")
        assert len(data) < 1_000_000
    print("all checks passed")


if __name__ == "__main__":
    main()
