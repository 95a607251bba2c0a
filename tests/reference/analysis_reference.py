#!/usr/bin/env python3
"""Golden values for mimscope's analyses (Fourier spectra, loss, Hessian eigenvalues).

Independent of mimscope's Rust code: the model is torch_reference.py's plain-PyTorch
restatement of facebookresearch/mae (and mmpretrain's MFF), the FFT is numpy's
(cross-checked with torch.fft), the Hessian uses exact Hessian-vector products by double
backprop (torch.autograd.grad with create_graph=True).

For the `mae` and `mff` fixtures it loads tests/fixtures/{name}_tiny.safetensors into the
reference model, runs everything in float64, and writes tests/fixtures/analysis_{name}.safetensors:

  spectrum.layer_{i}, map.layer_{i}   i = 0..depth   (unmasked encoder residual stream)
  spectrum.attn_{b},  map.attn_{b}    b = 0..depth-1 (x + attn(norm1(x)) inside block b)
  spectrum.fused,     map.fused       MFF only (fused sequence, before the final norm)
  loss, loss_f64                      pre-training loss on the fixture batch / fixed mask
  hessian.top                         top-3 Hessian eigenvalues by |lambda| (Lanczos)
  hessian.top_residual                ||H y - lambda y|| of their unit Ritz vectors
  hessian.power_top1, hessian.power_iters   docs/reference.md section 4 power iteration (info)
  hvp.v.{param}, hvp.hv.{param}       a random unit direction v and the exact H v
  fourier.tokens/spectrum/map         standalone 8x8-grid test vector for the recipe

See tests/reference/README.md ("Analysis golden values") for the conventions.

Usage:  python tests/reference/analysis_reference.py [--out DIR]
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402  (model code; importing it runs no fixtures)

torch.set_num_threads(1)
torch.manual_seed(0)
F64 = torch.float64
FFT_EPS = 1e-6          # log(|F| + 1e-6), docs/reference.md section 3
FROZEN = ("pos_embed", "decoder_pos_embed")
NAMES = ("mae", "mff")
# Seeds of the explicit generators (one per use, so each stream is independent).
SEED_HVP_V = 11         # hvp.v direction
SEED_LANCZOS = 12       # Lanczos start vector
SEED_LANCZOS_2 = 13     # second Lanczos run (cross-check only)
SEED_POWER_TIGHT = 14   # tight power iteration (cross-check only)
SEED_POWER_PYH = 15     # docs/reference.md / PyHessian power iteration (stored, info only)
LANCZOS_STEPS = 150
TOP_K = 3


# ----------------------------------------------------------------------------------------
# Section 3: Fourier analysis of feature maps
# ----------------------------------------------------------------------------------------
def tokens_to_maps(tokens, drop_cls=True):
    """(B, 1+N, C) residual-stream tokens -> (B, C, h, w) maps, tokens reshaped row-major.

    The map for channel c is tokens[:, :, c] reshaped to (h, w) (token k = r*w + s).
    """
    x = tokens[:, 1:, :] if drop_cls else tokens
    B, N, C = x.shape
    h = int(round(math.sqrt(N)))
    assert h * h == N, "square token grid expected"
    return np.ascontiguousarray(x.permute(0, 2, 1).reshape(B, C, h, h).detach().cpu().numpy())


def fourier_np(maps):
    """numpy version: returns (mean log-amplitude map after fftshift (h,w), Delta (h/2,))."""
    B, C, h, w = maps.shape
    assert h == w and h % 2 == 0, "the recipe takes the half-diagonal of an even square map"
    f = np.fft.fft2(maps.astype(np.float64), axes=(-2, -1))      # per sample and channel
    la = np.log(np.abs(f) + FFT_EPS)
    la = np.fft.fftshift(la, axes=(-2, -1))                       # shift by (h/2, w/2)
    amap = la.mean(axis=(0, 1))                                   # mean over batch, channels
    diag = np.array([amap[h // 2 + m, w // 2 + m] for m in range(h // 2)])  # no Nyquist
    return amap, diag - diag[0]


def fourier_torch(maps):
    """torch.fft version of the same recipe, used only to cross-check fourier_np."""
    t = torch.from_numpy(maps).to(F64)
    B, C, h, w = t.shape
    la = torch.log(torch.fft.fft2(t).abs() + FFT_EPS)
    la = torch.roll(la, shifts=(h // 2, w // 2), dims=(-2, -1))   # fftshift for even sizes
    amap = la.mean(dim=(0, 1))
    idx = torch.arange(h // 2)
    diag = amap[h // 2 + idx, w // 2 + idx]
    return amap.numpy(), (diag - diag[0]).numpy()


def check_constant_map():
    """docs/reference.md check: a constant map c gives Delta(m>0) = log(1e-6) - log(c*h*w + 1e-6)."""
    for (h, c) in ((4, 2.5), (14, 0.37), (8, 3.0)):
        maps = np.full((2, 3, h, h), c, dtype=np.float64)
        _, d = fourier_np(maps)
        _, dt = fourier_torch(maps)
        want = math.log(FFT_EPS) - math.log(c * h * h + FFT_EPS)
        assert d[0] == 0.0 and np.all(np.abs(d[1:] - want) < 1e-9), (h, c, d, want)
        assert np.all(np.abs(dt[1:] - want) < 1e-9)
        print(f"  constant-map check h={h:2d} c={c}: Delta(m>0) = {d[1]:.12f}, "
              f"expected log(1e-6)-log(c*h*w+1e-6) = {want:.12f}")


def synthetic_fourier_case(h=8, C=6, B=2):
    """A standalone test vector with more frequencies than the tiny models' 4x4 grid.

    tokens (B, 1+h*h, C), float32, cls row included (and dropped by the recipe): per sample
    and channel a random-walk field (cumulative sums of N(0,1) over rows and columns, so the
    spectrum decays) plus a channel-dependent offset; the cls row is large so that keeping it
    by mistake is visible. The golden values are computed in float64 from the float32 tokens.
    """
    g = torch.Generator().manual_seed(21)
    field = torch.randn((B, C, h, h), generator=g, dtype=F64).cumsum(-1).cumsum(-2)
    field = field + torch.arange(C, dtype=F64).view(1, C, 1, 1) * 0.5
    tokens = field.reshape(B, C, h * h).permute(0, 2, 1)            # token k = r*h + s
    cls = 100.0 + torch.randn((B, 1, C), generator=g, dtype=F64)
    tokens = torch.cat([cls, tokens], dim=1).to(torch.float32)
    maps = tokens_to_maps(tokens.to(F64))
    amap, d = fourier_np(maps)
    amap_t, d_t = fourier_torch(maps)
    assert np.abs(amap - amap_t).max() < 1e-12 and np.abs(d - d_t).max() < 1e-12
    # the map is not transpose-symmetric, so it catches a column-major reshape
    assert np.abs(amap - amap.T).max() > 1e-2
    return {"fourier.tokens": tokens.contiguous(),
            "fourier.spectrum": torch.from_numpy(d).to(torch.float32),
            "fourier.map": torch.from_numpy(amap).to(torch.float32).contiguous()}


def spectra(model, imgs, io, cfg):
    """Spectra of the unmasked encoder: layer_i, attn_b (and fused for MFF)."""
    out = {}
    feats = {}
    with torch.no_grad():
        stream = model.forward_encoder_unmasked(imgs)       # [before block 0, after each block]
        assert len(stream) == cfg["depth"] + 1
        for i, x in enumerate(stream):
            # agrees with the io fixture's float32 copy of the same stream
            assert torch.allclose(x, io[f"unmasked_{i}"].to(F64), rtol=0, atol=1e-5)
            feats[f"layer_{i}"] = x
        for b, blk in enumerate(model.blocks):
            x = stream[b]
            a = x + blk.attn(blk.norm1(x))                    # after the attention residual
            assert torch.equal(a + blk.mlp(blk.norm2(a)), stream[b + 1])
            feats[f"attn_{b}"] = a
        if model.fuse:
            res = [stream[i + 1] for i in model.out_indices]  # raw block outputs, cls included
            fused, _ = model._fuse(res)                         # token-wise, before final norm
            feats["fused"] = fused
    for key, x in feats.items():
        maps = tokens_to_maps(x)
        amap, d = fourier_np(maps)
        amap_t, d_t = fourier_torch(maps)
        assert np.abs(amap - amap_t).max() < 1e-12 and np.abs(d - d_t).max() < 1e-12
        assert d[0] == 0.0 and d.shape == (maps.shape[2] // 2,)
        out[f"spectrum.{key}"] = torch.from_numpy(d).to(torch.float32)
        out[f"map.{key}"] = torch.from_numpy(amap).to(torch.float32).contiguous()
    return out


# ----------------------------------------------------------------------------------------
# Section 4: Hessian of the pre-training loss on the fixed batch and fixed mask
# ----------------------------------------------------------------------------------------
class Objective:
    """loss(theta) on the fixture batch; theta = all trainable parameters, no weight decay."""

    def __init__(self, model, imgs, noise, mask_ratio):
        self.model, self.imgs, self.noise, self.mask_ratio = model, imgs, noise, mask_ratio
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        assert sorted(self.frozen) == sorted(FROZEN), self.frozen.keys()
        self.theta0 = [dict(model.named_parameters())[n].detach().clone() for n in self.names]
        self.shapes = [t.shape for t in self.theta0]
        self.sizes = [t.numel() for t in self.theta0]
        self.P = sum(self.sizes)

    def loss(self, plist):
        params = dict(zip(self.names, plist))
        params.update(self.frozen)
        return torch.func.functional_call(self.model, params, (self.imgs, self.noise, self.mask_ratio))

    def flat(self, tl):
        return torch.cat([t.reshape(-1) for t in tl])

    def split(self, v):
        return [c.view(s) for c, s in zip(torch.split(v, self.sizes), self.shapes)]

    def grad_at(self, theta_flat):
        leaves = [t.clone().requires_grad_(True) for t in self.split(theta_flat)]
        return self.flat(torch.autograd.grad(self.loss(leaves), leaves))


class HVP:
    """Exact Hessian-vector products by double backprop at theta0 (graph built once)."""

    def __init__(self, obj):
        self.obj = obj
        self.leaves = [t.clone().requires_grad_(True) for t in obj.theta0]
        self.loss = obj.loss(self.leaves)
        self.grads = torch.autograd.grad(self.loss, self.leaves, create_graph=True)
        self.count = 0

    def __call__(self, v):
        self.count += 1
        hv = torch.autograd.grad(self.grads, self.leaves, grad_outputs=self.obj.split(v),
                                 retain_graph=True, allow_unused=True, materialize_grads=True)
        return self.obj.flat(hv).detach()


def lanczos(op, P, steps, gen):
    """Lanczos with full reorthogonalisation (twice, classical Gram-Schmidt) in float64.

    Returns the Ritz values (ascending), the Lanczos basis Q (k, P), the eigenvectors S of
    T (k, k), and the last beta (for the residual estimate |beta_k * S[-1, i]|).
    """
    q = torch.randn(P, generator=gen, dtype=F64)
    Q = torch.zeros(steps + 1, P, dtype=F64)
    Q[0] = q / q.norm()
    alphas, betas = [], []
    k = steps
    for j in range(steps):
        w = op(Q[j])
        a = torch.dot(w, Q[j])
        w = w - a * Q[j]
        if j > 0:
            w = w - betas[-1] * Q[j - 1]
        for _ in range(2):
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        b = w.norm()
        alphas.append(a)
        if b <= 1e-12 * max(1.0, abs(a.item())):  # invariant subspace found
            k = j + 1
            betas.append(b)
            break
        betas.append(b)
        Q[j + 1] = w / b
    k = len(alphas)
    T = torch.diag(torch.stack(alphas))
    if k > 1:
        off = torch.stack(betas[: k - 1])
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    return theta, Q[:k], S, betas[k - 1]


def top_by_magnitude(op, P, steps, seed, k_top):
    theta, Q, S, beta_last = lanczos(op, P, steps, torch.Generator().manual_seed(seed))
    order = sorted(range(len(theta)), key=lambda i: -abs(theta[i].item()))[:k_top]
    vals = torch.stack([theta[i] for i in order])
    vecs = [Q.T @ S[:, i] for i in order]
    est = torch.stack([abs(beta_last * S[-1, i]) for i in order])
    return vals, vecs, est, theta


def power_tight(op, P, gen, tol=1e-14, max_iter=20000):
    """Plain power iteration, Rayleigh quotient, stop after 3 consecutive tiny changes."""
    v = torch.randn(P, generator=gen, dtype=F64)
    v = v / v.norm()
    lam_prev, calm = None, 0
    for it in range(1, max_iter + 1):
        hv = op(v)
        lam = torch.dot(hv, v).item()
        v = hv / hv.norm()
        if lam_prev is not None and abs(lam - lam_prev) <= tol * abs(lam):
            calm += 1
            if calm >= 3:
                return lam, v, it
        else:
            calm = 0
        lam_prev = lam
    return lam, v, max_iter


def power_pyhessian(op, obj, gen, tol=1e-3, max_iter=100):
    """docs/reference.md section 4 / PyHessian hessian.eigenvalues(top_n=1), literally.

    v ~ N(0,1) per parameter (named_parameters order), v/(||v||+1e-6); each step
    orthonormalise (no earlier eigenvectors: just normalise with +1e-6), Hv, lambda=<Hv,v>,
    v = Hv/(||Hv||+1e-6); stop when |lambda_prev - lambda|/(|lambda_prev|+1e-6) < tol.
    As PyHessian, the value returned on a stop is lambda_prev (the loop breaks before
    updating it). Returns (value, number of HVPs, last lambda).
    """
    def normalise(x):
        return x / (x.norm().item() + 1e-6)
    v = obj.flat([torch.randn(s, generator=gen, dtype=F64) for s in obj.shapes])
    v = normalise(v)
    eig, tmp, n = None, None, 0
    for i in range(max_iter):
        v = normalise(v)
        hv = op(v)
        n += 1
        tmp = torch.dot(hv, v).item()
        v = normalise(hv)
        if eig is None:
            eig = tmp
        elif abs(eig - tmp) / (abs(eig) + 1e-6) < tol:
            break
        else:
            eig = tmp
    return eig, n, tmp


def hessian_analysis(obj):
    out = {}
    t0 = time.time()
    hvp = HVP(obj)
    P = obj.P

    # -- random direction and its exact H v --------------------------------------------
    g = torch.Generator().manual_seed(SEED_HVP_V)
    v = obj.flat([torch.randn(s, generator=g, dtype=F64) for s in obj.shapes])
    # Unit global norm, then rounded to float32 (so an f32 implementation can feed exactly
    # the same direction; the f64 copy is exact). hv is the exact H v for the stored v.
    v = (v / v.norm()).to(torch.float32).to(F64)
    assert abs(v.norm().item() - 1.0) < 1e-6
    hv = hvp(v)
    # symmetry check: <u, H v> == <H u, v>
    u = torch.randn(P, generator=torch.Generator().manual_seed(99), dtype=F64)
    hu = hvp(u)
    sym = abs(torch.dot(u, hv).item() - torch.dot(hu, v).item()) / abs(torch.dot(u, hv).item())
    assert sym < 1e-10, sym
    # central finite differences of float64 gradients along v
    eps = 1e-5
    fd = (obj.grad_at(obj.flat(obj.theta0) + eps * v) - obj.grad_at(obj.flat(obj.theta0) - eps * v)) / (2 * eps)
    fd_rel = ((fd - hv).norm() / hv.norm()).item()
    fd_max = ((fd - hv).abs().max() / hv.abs().max()).item()
    print(f"    HVP vs central FD of gradients (eps {eps}): ||fd-Hv||/||Hv|| = {fd_rel:.2e}, "
          f"max|fd-Hv|/max|Hv| = {fd_max:.2e}; symmetry rel err {sym:.1e}; ||Hv|| = {hv.norm().item():.6e}")
    assert fd_rel < 1e-6, fd_rel
    for name, vv, hh in zip(obj.names, obj.split(v), obj.split(hv)):
        out[f"hvp.v.{name}"] = vv.contiguous().clone()
        out[f"hvp.hv.{name}"] = hh.contiguous().clone()

    # -- top-3 by magnitude: Lanczos with full reorthogonalisation ---------------------
    vals, vecs, _, theta = top_by_magnitude(hvp, P, LANCZOS_STEPS, SEED_LANCZOS, TOP_K + 2)
    res = []
    for lam, y in zip(vals, vecs):
        res.append((hvp(y) - lam * y).norm().item())
    print(f"    Lanczos ({len(theta)} steps): Ritz range [{theta[0].item():.10g}, {theta[-1].item():.10g}]")
    for i in range(len(vals)):
        print(f"      |lambda| #{i + 1}: {vals[i].item():+.12e}  ||Hy - lambda y|| = {res[i]:.2e}")
    top = vals[:TOP_K]
    # well separated in magnitude (else the order would be ill-defined) and converged
    for i in range(TOP_K):
        assert res[i] < 1e-8 * abs(vals[0].item()), res
        gap = abs(vals[i].item()) - abs(vals[i + 1].item())
        assert gap > 1e-6 * abs(vals[0].item()), ("near tie in |lambda|", vals)
    # independent second Lanczos run (other start vector)
    vals2, _, _, _ = top_by_magnitude(hvp, P, LANCZOS_STEPS, SEED_LANCZOS_2, TOP_K)
    rel2 = ((vals2 - top).abs() / top.abs()).max().item()
    print(f"    second Lanczos run (other start): max rel diff of top-{TOP_K} = {rel2:.1e}")
    assert rel2 < 1e-10, (vals2, top)
    # plain power iteration, tight tolerance
    lam_p, v_p, it_p = power_tight(hvp, P, torch.Generator().manual_seed(SEED_POWER_TIGHT))
    res_p = (hvp(v_p) - lam_p * v_p).norm().item()
    rel_p = abs(lam_p - top[0].item()) / abs(top[0].item())
    print(f"    tight power iteration: {lam_p:+.12e} after {it_p} HVPs (||Hv - lambda v|| = {res_p:.1e}); "
          f"Lanczos top-1 {top[0].item():+.12e}; rel diff {rel_p:.1e}")
    assert rel_p < 1e-9, (lam_p, top[0].item())
    # docs/reference.md recipe (PyHessian), information only
    lam_r, n_r, last_r = power_pyhessian(hvp, obj, torch.Generator().manual_seed(SEED_POWER_PYH))
    print(f"    docs/reference.md power iteration (tol 1e-3, max 100): {lam_r:+.10e} after {n_r} HVPs "
          f"(last Rayleigh quotient {last_r:+.10e}; rel diff to Lanczos "
          f"{abs(lam_r - top[0].item()) / abs(top[0].item()):.1e})")

    out["hessian.top"] = top.clone()
    out["hessian.top_residual"] = torch.tensor(res[:TOP_K], dtype=F64)
    out["hessian.power_top1"] = torch.tensor([lam_r], dtype=F64)
    out["hessian.power_iters"] = torch.tensor([n_r], dtype=torch.int64)
    print(f"    Hessian part: {hvp.count} HVPs, {time.time() - t0:.1f} s")
    return out, hvp.loss.detach()


# ----------------------------------------------------------------------------------------
def canonicalise_header(path):
    """Rewrite the safetensors header with the __metadata__ keys sorted.

    safetensors (Rust) keeps the metadata in a HashMap, so with two or more keys their order
    in the JSON header, and thus the file's bytes, changes from run to run. The tensor
    entries are already in a fixed order. Same JSON text otherwise, same header length
    (padded with spaces, as safetensors pads), so the data offsets are unchanged.
    """
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))  # dicts keep the file order
    meta = header.pop("__metadata__")
    canon = {"__metadata__": {k: meta[k] for k in sorted(meta)}}
    canon.update(header)
    text = json.dumps(canon, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    assert len(text) <= n and len(bytes(data[8:8 + n]).rstrip(b" ")) == len(text), "header format changed"
    data[8:8 + n] = text + b" " * (n - len(text))
    with open(path, "wb") as fh:
        fh.write(bytes(data))


def load_fixture(fix_dir, name):
    with safe_open(os.path.join(fix_dir, f"{name}_tiny.safetensors"), "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(os.path.join(fix_dir, f"{name}_tiny_io.safetensors"), "pt") as f:
        io = {k: f.get_tensor(k) for k in f.keys()}
        assert f.metadata()["config"] == meta["config"]
    cfg = json.loads(meta["config"])
    model = ref.MaskedAutoencoderViT(**cfg).double()
    model.load_state_dict({k: v.to(F64) for k, v in sd.items()}, strict=True)  # f32->f64 exact
    model.eval()
    return model, cfg, meta["config"], io


def provenance(name, cfg, mask_ratio):
    return (
        f"tests/reference/analysis_reference.py; torch {torch.__version__}, numpy {np.__version__}, "
        f"python {sys.version.split()[0]}; CPU, 1 thread, float64 throughout. "
        f"Model: torch_reference.MaskedAutoencoderViT loaded from {name}_tiny.safetensors. "
        f"Inputs: images and noise of {name}_tiny_io.safetensors; mask ratio {mask_ratio} "
        f"(mask from noise by argsort as MAE; equals the io fixture's mask). "
        "spectrum.layer_i / map.layer_i (f32): unmasked encoder (all patches), residual stream, "
        "no final norm; i=0 is patch_embed+pos_embed (before block 0), i>0 the output of block i-1. "
        "spectrum.attn_b / map.attn_b (f32): x + attn(norm1(x)) inside block b (before the MLP). "
        "spectrum.fused / map.fused (f32, MFF only): the fused sequence of the unmasked forward, "
        "before the final norm. Recipe: drop cls; map of channel c = tokens[:,:,c] reshaped "
        "row-major to (h,w); fft2 per sample and channel; log(|F|+1e-6); fftshift; mean over batch "
        "and channels = map (h,w); spectrum[m] = map[h/2+m, w/2+m] - map[h/2, w/2], m=0..h/2-1. "
        "fourier.tokens (f32, (2,65,6)), fourier.spectrum (f32, (4,)), fourier.map (f32, (8,8)): "
        "a standalone 8x8-grid test vector for the same recipe (tokens include a cls row). "
        "loss (f32, (1,)) and loss_f64 (f64, (1,)): norm_pix loss on removed patches. "
        "Hessian of that loss w.r.t. all trainable params (all but pos_embed, decoder_pos_embed), "
        "no weight decay, exact HVPs by double backprop: hessian.top (f64, (3,)) top-3 eigenvalues "
        f"sorted by |lambda| descending, signs kept (Lanczos, {LANCZOS_STEPS} steps, full "
        "reorthogonalisation); hessian.top_residual (f64, (3,)) ||Hy - lambda y|| of the unit Ritz "
        "vectors; hvp.v.{param} (f64) a global-unit-norm N(0,1) direction rounded to f32 values, hvp.hv.{param} (f64) "
        "exact H v; hessian.power_top1 (f64, (1,)) and hessian.power_iters (i64, (1,), number of "
        "HVPs) from the docs/reference.md section 4 power iteration (tol 1e-3, max 100, PyHessian returns "
        "the previous lambda on stop), information only."
    )


def run(name, fix_dir, out_dir):
    t0 = time.time()
    model, cfg, cfg_json, io = load_fixture(fix_dir, name)
    mask_ratio = ref.MASK_RATIO
    imgs, noise = io["images"].to(F64), io["noise"].to(F64)
    L = noise.shape[1]
    _, _, ids_keep, mask = model.masking_indices(noise, mask_ratio)
    assert torch.equal(mask.float(), io["mask"]) and torch.equal(ids_keep, io["ids_keep"])
    assert abs(io["mask"].mean().item() - mask_ratio) < 1e-12 and len(ids_keep[0]) == int(L * (1 - mask_ratio))
    print(f"  {name}: {json.dumps(cfg)}")

    out = spectra(model, imgs, io, cfg)
    out.update(synthetic_fourier_case())

    obj = Objective(model, imgs, noise, mask_ratio)
    # gradients agree with the io fixture (float32 copies)
    g = obj.split(obj.grad_at(obj.flat(obj.theta0)))
    for n, gr in zip(obj.names, g):
        ref_g = io[f"grad.{n}"].to(F64)
        assert torch.allclose(gr, ref_g, rtol=1e-5, atol=1e-7 * ref_g.abs().max().item()), n
    assert set(obj.names) == {k[len("grad."):] for k in io if k.startswith("grad.")}
    print(f"    {len(obj.names)} trainable tensors, {obj.P} parameters")

    hess, loss = hessian_analysis(obj)
    assert abs(loss.item() - io["loss"].item()) <= 1e-6 * abs(loss.item())
    out.update(hess)
    out["loss"] = loss.reshape(1).to(torch.float32)
    out["loss_f64"] = loss.reshape(1).to(F64)
    print(f"    loss {loss.item():.12f}  hessian.top {[f'{x:+.10e}' for x in out['hessian.top'].tolist()]}")
    for k in sorted(out):
        if k.startswith("spectrum."):
            print(f"    {k:18s} {[round(x, 6) for x in out[k].tolist()]}")

    out = {k: v.contiguous() for k, v in out.items()}
    path = os.path.join(out_dir, f"analysis_{name}.safetensors")
    prov = provenance(name, cfg, mask_ratio)
    assert prov.isascii() and cfg_json.isascii()
    save_file(out, path, metadata={"config": cfg_json, "provenance": prov})
    canonicalise_header(path)
    with safe_open(path, "pt") as f:  # the rewritten file reads back identically
        assert f.metadata() == {"config": cfg_json, "provenance": prov}
        for k in out:
            assert torch.equal(f.get_tensor(k), out[k]), k
    print(f"    {name}: {time.time() - t0:.1f} s")
    return path


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    fix_dir = os.path.normpath(os.path.join(here, "..", "fixtures"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=fix_dir)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    print(f"torch {torch.__version__}  numpy {np.__version__}")
    check_constant_map()
    files = [run(name, fix_dir, args.out) for name in NAMES]
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        print(f"  {os.path.basename(f):28s} {len(data):8d} B  sha256 {hashlib.sha256(data).hexdigest()}")
    print(f"all checks passed ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
