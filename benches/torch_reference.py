#!/usr/bin/env python3
"""PyTorch eager timings of the work `mimscope bench` times, for the side-by-side tables in docs/performance.md.

Not run by CI. Uses the plain-PyTorch restatement of MAE / MFF in tests/reference/
torch_reference.py (the model the golden tests come from), by default the `tiny` preset (32 px,
patch 4, 192 wide, 12 blocks, 3 heads; decoder 128 x 2 x 4 heads; MFF fusing blocks 0,2,4,6,8
with softmax weights), fp32, on the CPU, and prints `key=value` lines with the same keys as
`mimscope bench --parts train,forward,spectrum,hvp,power`:

  train_step_s         forward, backward and AdamW (betas 0.9/0.95, wd 0.05), batch 64, mask 0.75
  forward_step_s       unmasked encoder under no_grad, every block output kept
  spectrum_s           the Fourier recipe (docs/reference.md 3) on those 13 layers, torch.fft
  gradient_s           the loss gradient with its graph kept (create_graph=True)
  hvp_s                one exact Hessian-vector product on that retained graph
  power_s              20 power-iteration steps (PyHessian's recipe), set-up included

Each is the median of --iters runs after one warm-up. Run it beside the Rust bench, on the
same machine, at the same time of day:

  python benches/torch_reference.py --threads 2
  mimscope bench --parts train,forward,spectrum,hvp,power --hvp-batch 64

On a GPU (`scripts/gpu-compare.sh` runs it beside `mimscope bench`), for example

  python benches/torch_reference.py --device cuda --preset base --model mae \
      --precision bf16 --batch-size 256 --parts train,forward

`--precision bf16` runs the matrix products in bf16 under torch.autocast, as mimscope's bf16
does (weights, norms and softmax stay fp32); on CUDA each timing ends with a synchronize and
the parts' peak memory is printed.

Needs torch and numpy.
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import torch_reference as ref  # noqa: E402  (model code only; it sets 1 thread, reset below)

TINY = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=192, depth=12, num_heads=3,
            decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0,
            norm_pix_loss=True)
# ViT-B/16 with MAE's decoder (mimscope's `base` preset).
BASE = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
            decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
            norm_pix_loss=True)
PARTS = ("train", "forward", "spectrum", "hvp", "power")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, iters):
    fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def spectra(layers):
    """docs/reference.md section 3 on every layer: (B, 1+N, C) tokens -> half-diagonal Delta."""
    out = []
    for x in layers:
        x = x[:, 1:, :]
        b, n, c = x.shape
        h = int(round(math.sqrt(n)))
        maps = x.permute(0, 2, 1).reshape(b, c, h, h)
        la = torch.log(torch.fft.fft2(maps).abs() + 1e-6)
        la = torch.roll(la, shifts=(h // 2, h // 2), dims=(-2, -1)).mean(dim=(0, 1))
        idx = torch.arange(h // 2, device=la.device)
        d = la[h // 2 + idx, h // 2 + idx]
        out.append(d - d[0])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--hvp-batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--model", choices=["mae", "mff"], default="mff")
    ap.add_argument("--preset", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " +
                    ",".join(PARTS) + " (spectrum needs forward)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS) or ("spectrum" in parts and "forward" not in parts):
        ap.error(f"--parts takes a subset of {','.join(PARTS)}, spectrum with forward")
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = dict(TINY if args.preset == "tiny" else BASE)
    if args.model == "mff":
        cfg.update(fuse_layers=[0, 2, 4, 6, 8], projection="linear", fusion="weighted")
    model = ref.MaskedAutoencoderViT(**cfg).float().to(dev)
    b, s = args.batch_size, cfg["img_size"]
    imgs = torch.randn(b, 3, s, s).to(dev)
    noise = torch.rand(b, (s // cfg["patch_size"]) ** 2).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.05)
    print(f"torch={torch.__version__}")
    print(f"device={args.device}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    print(f"threads={torch.get_num_threads()}")
    print(f"preset={args.preset}")
    print(f"model={args.model}")
    print(f"precision={args.precision}")
    print(f"batch_size={b}")

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def peak(part):
        if dev.type == "cuda":
            print(f"{part}_memory_peak_bytes={torch.cuda.max_memory_allocated(dev)}")
            torch.cuda.reset_peak_memory_stats(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = model(imgs, noise, 0.75)
        loss.backward()
        opt.step()
    if "train" in parts:
        t = timed(step, args.iters)
        print(f"train_step_s={t:.5f}")
        print(f"train_images_per_s={b / t:.2f}")
        peak("train")
    opt = None

    layers = []

    def forward():
        nonlocal layers
        with torch.no_grad(), autocast():
            layers = model.forward_encoder_unmasked(imgs)
    if "forward" in parts:
        f = timed(forward, args.iters)
        print(f"forward_step_s={f:.5f}")
        print(f"forward_images_per_s={b / f:.2f}")
        peak("forward")
    if "spectrum" in parts:
        layers = [x.float() for x in layers]
        sp = timed(lambda: spectra(layers), args.iters)
        print(f"spectrum_s={sp:.5f}")
        print(f"spectrum_over_forward={sp / f:.3f}")
    layers = None
    if not parts & {"hvp", "power"}:
        return

    hb = args.hvp_batch
    obj_imgs, obj_noise = imgs[:hb], noise[:hb]
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient_with_graph():
        loss = model(obj_imgs, obj_noise, 0.75)
        return torch.autograd.grad(loss, params, create_graph=True)
    if "hvp" in parts:
        g_s = timed(gradient_with_graph, args.iters)
        grads = gradient_with_graph()
        v = [torch.randn_like(p) for p in params]

        def hvp():
            return torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        h_s = timed(hvp, args.iters)
        grads = None
        print(f"hvp_batch={hb}")
        print(f"gradient_s={g_s:.5f}")
        print(f"hvp_s={h_s:.5f}")
        print(f"hvp_over_gradient={h_s / g_s:.3f}")
        peak("hvp")
    if "power" not in parts:
        return

    def power():
        # PyHessian's hessian.eigenvalues(top_n=1), 20 steps, no early stop: set-up (the
        # gradient graph) included.
        g = gradient_with_graph()
        gen = torch.Generator().manual_seed(0)
        vec = [torch.randn(p.shape, generator=gen).to(dev) for p in params]
        for _ in range(20):
            norm = math.sqrt(sum((x * x).sum().item() for x in vec)) + 1e-6
            vec = [x / norm for x in vec]
            hv = torch.autograd.grad(g, params, grad_outputs=vec, retain_graph=True)
            sum(float((a * x).sum()) for a, x in zip(hv, vec))
            vec = [h.detach() for h in hv]
    p_s = timed(power, max(1, args.iters // 5))
    print(f"power_s={p_s:.3f}")
    peak("power")


if __name__ == "__main__":
    main()
