#!/usr/bin/env python3
"""PyTorch `.pth` fixtures for mimscope's checkpoint import (`mimscope convert`).

Reads the weights that torch_reference.py wrote (tests/fixtures/{mff,mae}_tiny.safetensors, MAE
key names) and saves them again with `torch.save`, in the layouts that the official checkpoints
use:

  mff_tiny_mmpretrain.pth   open-mmlab/mmpretrain (mmengine CheckpointHook, as published):
                            {"meta": {...}, "state_dict": OrderedDict(backbone.* / neck.* keys)}
  mae_tiny_fbmae.pth        facebookresearch/mae util/misc.py save_model (a training checkpoint,
                            *_full.pth style): {"model": sd, "optimizer": ..., "epoch": 3,
                            "scaler": ..., "args": argparse.Namespace}
  mae_tiny_encoder.pth      facebookresearch/mae's released mae_pretrain_vit_*.pth style:
                            {"model": encoder-only sd}
  odd_layouts.pth           a bare state dict of small arange tensors stored in unusual ways
                            (transposed views, a strided slice, a view at an offset into a shared
                            storage, float16, bfloat16, float64, int64, a non-tensor entry)
  no_weights.pth            a dict with neither `state_dict` nor `model` nor tensors
  legacy_format.pth         torch's pre-1.6 (non-zip) serialisation

The mmpretrain names are written from docs/reference.md sections 1-2 and mmpretrain's sources
(mmpretrain/models/backbones/vision_transformer.py TransformerEncoderLayer: ln1, attn.qkv,
attn.proj, ln2, ffn.layers.0.0, ffn.layers.1; VisionTransformer final norm `ln1`;
mmpretrain/models/necks/mae_neck.py MAEPretrainDecoder: decoder norm built with mmcv's
build_norm_layer(norm_cfg, dim, postfix=1), so named `ln1`; mmpretrain/models/selfsup/mff.py:
proj_layers, proj_weights). State dicts are OrderedDicts carrying a `_metadata` attribute, as
`nn.Module.state_dict()` and mmengine's get_state_dict return them, so the pickle holds the
extra non-tensor `_metadata` entry that real files have.

Usage:  python tests/reference/pth_reference.py [--out DIR]   (after torch_reference.py)
"""
import argparse
import collections
import hashlib
import os
import re

import torch
from safetensors.torch import load_file

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.normpath(os.path.join(HERE, "..", "fixtures"))

BLOCK_RENAMES = [  # MAE (timm Block) -> mmpretrain TransformerEncoderLayer
    ("norm1.", "ln1."),
    ("norm2.", "ln2."),
    ("mlp.fc1.", "ffn.layers.0.0."),
    ("mlp.fc2.", "ffn.layers.1."),
    ("attn.qkv.", "attn.qkv."),
    ("attn.proj.", "attn.proj."),
]


def block_to_mmpretrain(sub):
    for ours, theirs in BLOCK_RENAMES:
        if sub.startswith(ours):
            return theirs + sub[len(ours):]
    raise KeyError(f"unknown block tensor {sub}")


def mae_to_mmpretrain(key):
    """One MAE state-dict key -> its mmpretrain MAE/MFF key."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m:
        return f"backbone.layers.{m[1]}.{block_to_mmpretrain(m[2])}"
    m = re.fullmatch(r"decoder_blocks\.(\d+)\.(.+)", key)
    if m:
        return f"neck.decoder_blocks.{m[1]}.{block_to_mmpretrain(m[2])}"
    if key.startswith("patch_embed.proj."):
        return "backbone.patch_embed.projection." + key[len("patch_embed.proj."):]
    if key.startswith("norm."):
        return "backbone.ln1." + key[len("norm."):]
    if key.startswith("decoder_norm."):
        return "neck.ln1." + key[len("decoder_norm."):]
    if key in ("cls_token", "pos_embed", "proj_weights") or key.startswith("proj_layers."):
        return "backbone." + key
    if key in ("mask_token", "decoder_pos_embed") or key.startswith(("decoder_embed.", "decoder_pred.")):
        return "neck." + key
    raise KeyError(f"no mmpretrain name for {key}")


def module_order(key):
    """Sort key imitating nn.Module registration order (MAEViT then neck), for realistic files."""
    order = ["cls_token", "pos_embed", "patch_embed", "blocks", "norm", "proj_layers",
             "proj_weights", "decoder_embed", "mask_token", "decoder_pos_embed",
             "decoder_blocks", "decoder_norm", "decoder_pred"]
    head = key.split(".")[0]
    idx = int(key.split(".")[1]) if head in ("blocks", "decoder_blocks", "proj_layers") else 0
    return (order.index(head), idx, key)


def state_dict(tensors, rename=lambda k: k):
    """An OrderedDict with `_metadata`, as nn.Module.state_dict() returns. Every tensor is a
    fresh contiguous clone (own storage), as in a real state dict."""
    sd = collections.OrderedDict()
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    for k in sorted(tensors, key=module_order):
        sd[rename(k)] = tensors[k].clone().contiguous()
    return sd


def mmpretrain_meta():
    # The entries mmengine's CheckpointHook writes (cfg text shortened), plus a nested dict.
    return {
        "mmengine_version": "0.8.4",
        "cfg": "model = dict(\n    type='MFF',\n    backbone=dict(type='MFFViT', arch='b', "
               "patch_size=16, mask_ratio=0.75, out_indices=[0, 2, 4, 6, 8, 11]),\n"
               "    neck=dict(type='MAEPretrainDecoder', embed_dim=768, decoder_embed_dim=512, "
               "decoder_depth=8, decoder_num_heads=16),\n"
               "    head=dict(type='MAEPretrainHead', norm_pix=True, patch_size=16))\n",
        "seed": 0,
        "experiment_name": "mff_vit-base-p16_8xb512-amp-coslr-300e_in1k_20230729_101215",
        "time": "20230801_064420",
        "epoch": 300,
        "iter": 93600,
        "dataset_meta": {},
        "hook_msgs": {"last_ckpt": "work_dirs/mff/epoch_300.pth", "best_score": None},
        "lr": [1.2e-05, -0.5],
        "amp": True,
    }


def mae_args():
    # facebookresearch/mae main_pretrain.py's parsed arguments (args.lr filled in as it does).
    return argparse.Namespace(
        batch_size=64, epochs=800, accum_iter=1, model="mae_vit_tiny_patch4", input_size=16,
        mask_ratio=0.75, norm_pix_loss=True, weight_decay=0.05, lr=3.75e-05, blr=1.5e-4,
        min_lr=0.0, warmup_epochs=40, data_path="/datasets01/imagenet_full_size/061417/",
        output_dir="./output_dir", log_dir="./output_dir", device="cuda", seed=0, resume="",
        start_epoch=0, num_workers=10, pin_mem=True, world_size=1, local_rank=-1,
        dist_on_itp=False, dist_url="env://", distributed=False)


def mae_optimizer(sd):
    # AdamW state for the first two parameters only (keeps the file small), param_groups as
    # MAE's param_groups_weight_decay builds them.
    names = list(sd)
    state = {}
    for i in range(2):
        t = sd[names[i]]
        state[i] = {"step": torch.tensor(3.0), "exp_avg": torch.full_like(t, 0.25),
                    "exp_avg_sq": torch.full_like(t, 0.0625)}
    return {
        "state": state,
        "param_groups": [
            {"lr": 3.75e-05, "betas": (0.9, 0.95), "eps": 1e-08, "weight_decay": 0.0,
             "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
             "differentiable": False, "fused": None, "params": [0]},
            {"lr": 3.75e-05, "betas": (0.9, 0.95), "eps": 1e-08, "weight_decay": 0.05,
             "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
             "differentiable": False, "fused": None, "params": [1]},
        ],
    }


def odd_layouts():
    """Values are arange(n) in float32 (see the Rust test for the expected element order)."""
    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    shared = torch.arange(20, dtype=torch.float32)
    sd = collections.OrderedDict()
    sd["transposed"] = a.t()                      # (3,2), strides (1,3): column-major view
    sd["strided"] = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, ::2]  # (3,2) strides (4,2)
    sd["offset_view"] = shared[5:11].view(2, 3)   # storage offset 5 into a shared 20-element storage
    sd["shared_whole"] = shared                   # the same storage, whole
    sd["half"] = torch.arange(4, dtype=torch.float16)
    sd["bfloat16"] = torch.arange(4, dtype=torch.bfloat16)
    sd["double"] = torch.arange(4, dtype=torch.float64)
    sd["long"] = torch.arange(4, dtype=torch.int64)
    sd["scalar"] = torch.tensor(2.5)
    sd["not_a_tensor"] = "hello"
    return sd


def write(path, obj, **kw):
    torch.save(obj, path, **kw)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=FIXTURES)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__}")
    mff = load_file(os.path.join(FIXTURES, "mff_tiny.safetensors"))
    mae = load_file(os.path.join(FIXTURES, "mae_tiny.safetensors"))

    files = []
    files.append(write(os.path.join(args.out, "mff_tiny_mmpretrain.pth"),
                       {"meta": mmpretrain_meta(), "state_dict": state_dict(mff, mae_to_mmpretrain)}))
    sd = state_dict(mae)
    files.append(write(os.path.join(args.out, "mae_tiny_fbmae.pth"), {
        "model": sd,
        "optimizer": mae_optimizer(sd),
        "epoch": 3,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000, "_growth_tracker": 7},
        "args": mae_args(),
    }))
    decoder = ("decoder_", "mask_token")
    encoder = {k: v for k, v in mae.items() if not k.startswith(decoder)}
    files.append(write(os.path.join(args.out, "mae_tiny_encoder.pth"), {"model": state_dict(encoder)}))
    files.append(write(os.path.join(args.out, "odd_layouts.pth"), odd_layouts()))
    files.append(write(os.path.join(args.out, "no_weights.pth"),
                       {"meta": {"epoch": 3}, "epoch": 3, "note": "weights saved elsewhere"}))
    files.append(write(os.path.join(args.out, "legacy_format.pth"),
                       {"model": {"w": torch.arange(2.0)}}, _use_new_zipfile_serialization=False))

    # Round trips: every file loads back in torch with the tensors it was given.
    ck = torch.load(files[0], map_location="cpu", weights_only=False)
    assert set(ck["state_dict"]) == {mae_to_mmpretrain(k) for k in mff}
    for k, v in mff.items():
        assert torch.equal(ck["state_dict"][mae_to_mmpretrain(k)], v)
    assert "neck.ln1.weight" in ck["state_dict"] and "backbone.ln1.weight" in ck["state_dict"]
    ck = torch.load(files[1], map_location="cpu", weights_only=False)
    assert all(torch.equal(ck["model"][k], v) for k, v in mae.items()) and len(ck["model"]) == len(mae)
    assert ck["args"].norm_pix_loss is True
    ck = torch.load(files[2], map_location="cpu", weights_only=True)
    assert len(ck["model"]) == len(encoder) and "norm.weight" in ck["model"]
    ck = torch.load(files[3], map_location="cpu", weights_only=True)
    assert not ck["transposed"].is_contiguous() and not ck["strided"].is_contiguous()
    assert ck["offset_view"].storage_offset() == 5

    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        print(f"  {os.path.basename(f):26s} {len(data):8d} B  sha256 {hashlib.sha256(data).hexdigest()}")
        assert len(data) < 400_000
    print("all checks passed")


if __name__ == "__main__":
    main()
