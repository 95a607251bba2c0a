"""Cross-check a mimscope checkpoint and its `reconstruct` outputs in PyTorch (not run by CI).

Usage: python tests/reference/check_mimscope_run.py CHECKPOINT RECONSTRUCT_OUT

Loads the mimscope-written safetensors checkpoint into torch_reference.MaskedAutoencoderViT,
built from the checkpoint's own `config` metadata, with load_state_dict(strict=True) (so the
names and shapes are exactly MAE's / mmpretrain's), then recomputes the loss of every image of
RECONSTRUCT_OUT/inputs.safetensors under the mask of RECONSTRUCT_OUT/masks.safetensors and
compares it with RECONSTRUCT_OUT/losses.csv. The loss depends on the set of removed patches
only, so the masking noise is rebuilt from the mask (removed patches get the larger noise).
"""
import csv
import json
import os
import sys

import safetensors
import safetensors.torch
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import MaskedAutoencoderViT  # noqa: E402


def main():
    ckpt, rec = sys.argv[1], sys.argv[2]
    with safetensors.safe_open(ckpt, "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    for k, v in dict(fuse_layers=None, projection=None, fusion=None).items():
        cfg.setdefault(k, v)
    model = MaskedAutoencoderViT(**cfg).double()
    sd = safetensors.torch.load_file(ckpt)
    model.load_state_dict({k: v.double() for k, v in sd.items()}, strict=True)
    imgs = safetensors.torch.load_file(os.path.join(rec, "inputs.safetensors"))["images"].double()
    mask = safetensors.torch.load_file(os.path.join(rec, "masks.safetensors"))["mask"].double()
    with open(os.path.join(rec, "losses.csv")) as f:
        ours = [float(r["loss"]) for r in csv.DictReader(f)]
    n, L = mask.shape
    ratio = float(mask[0].sum()) / L
    worst = 0.0
    with torch.no_grad():
        for i in range(n):
            noise = mask[i:i + 1] + torch.arange(L, dtype=torch.float64) / (10 * L)
            loss = float(model(imgs[i:i + 1], noise, mask_ratio=ratio))
            rel = abs(loss - ours[i]) / abs(loss)
            worst = max(worst, rel)
            print(f"image {i}: pytorch {loss:.6f} mimscope {ours[i]:.6f} rel.diff {rel:.2e}")
    print(f"strict load OK ({len(sd)} tensors); worst relative loss difference {worst:.2e}")
    assert worst < 1e-4, "mimscope and PyTorch disagree"


if __name__ == "__main__":
    main()
