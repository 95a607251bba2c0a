#!/usr/bin/env bash
# mimscope against PyTorch eager on the same GPU, side by side in one run: the `base` MAE
# training step and the unmasked encoder forward in fp32 and bf16 at batches 64, 128 and 256,
# and one exact Hessian-vector product; then, with --ncu, where a mimscope bf16 training step's
# GPU time goes (Nsight Compute's kernel durations, summed by kernel name). Writes
# gpu-compare.md (the tables) and gpu-compare.log (every command's output) into --out.
#
#   scripts/gpu-compare.sh [--binary PATH] [--python PY] [--out DIR] [--budget S] [--ncu]
#
#   --binary PATH  the mimscope built by scripts/build-cuda.sh     (default: .gpu/mimscope, or
#                  unpacked from .gpu/mimscope.gz, the file to carry)
#   --python PY    a Python with PyTorch for CUDA            (default: /opt/torch/.venv/bin/python)
#   --out DIR      where the tables and log go                    (default: gpu-compare-out)
#   --budget S     the whole run's seconds: runs that would start with under 15 s left are
#                  skipped (default: no limit)
#   --ncu          also profile two mimscope bf16 training steps (batch 64) under ncu
#
# PyTorch runs benches/torch_reference.py (the golden tests' restatement of MAE, explicit
# softmax attention, bf16 through torch.autocast). Both take the median of 5 steps after a
# warm-up, on random images, mask ratio 0.75.
set -u

cd "$(dirname "$0")/.."
binary=.gpu/mimscope
python=/opt/torch/.venv/bin/python
out=gpu-compare-out
budget=0
ncu=0
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --ncu) ncu=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu-compare.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
. scripts/gpu-lib.sh
gpu_setup gpu-compare.sh
report="$out/gpu-compare.md"
log="$out/gpu-compare.log"
: > "$log"
: > "$report"

say() { echo "$*" | tee -a "$report"; }
# run NAME CMD...: CMD's output to the log and $work/NAME.out, unless the budget is spent.
run() {
  local name="$1"; shift
  echo "== $name: $*" >> "$log"
  local limit
  if ! limit=$(budget_limit 300 15); then
    echo "skipped: the --budget of ${budget}s is spent" | tee "$work/$name.out" >> "$log"
    return 124
  fi
  timeout "$limit" "$@" > "$work/$name.out" 2>&1
  local rc=$?
  cat "$work/$name.out" >> "$log"
  echo "== $name: exit $rc" >> "$log"
  return $rc
}
value() { grep -m1 "^$2=" "$work/$1.out" 2>/dev/null | cut -d= -f2- ; }
# outcome NAME: "skipped" or "failed", for a run that printed no figures.
outcome() { grep -q '^skipped: ' "$work/$1.out" 2>/dev/null && echo skipped || echo failed; }
gib() { [ -n "${1:-}" ] && awk -v b="$1" 'BEGIN { printf "%.1f", b / 1073741824 }'; }
ratio() { [ -n "${1:-}" ] && [ -n "${2:-}" ] && awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

say "# mimscope against PyTorch eager on one GPU"
say ""
say "- date: $(date -u +%Y-%m-%dT%H:%MZ); $("$binary" --version 2>&1 | head -1); $("$python" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1)"
command -v nvidia-smi > /dev/null &&
  say "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
say ""
say "## base MAE (ViT-B/16, MAE decoder, mask 0.75): training step and encoder forward"
say ""
say "| precision | batch | mimscope train images/s | PyTorch train images/s | mimscope / PyTorch | mimscope peak GiB | PyTorch peak GiB | mimscope forward images/s | PyTorch forward images/s |"
say "|---|---|---|---|---|---|---|---|---|"
for prec in f32 bf16; do
  for b in 64 128 256; do
    m="m_${prec}_$b"; t="t_${prec}_$b"
    run "$m" "$binary" bench --preset base --model mae --batch-size $b --iters 5 \
      --parts train,forward --precision $prec --device cuda:0
    run "$t" "$python" benches/torch_reference.py --device cuda --preset base --model mae \
      --precision $prec --batch-size $b --iters 5 --parts train,forward
    mi=$(value "$m" train_images_per_s); ti=$(value "$t" train_images_per_s)
    say "| $prec | $b | ${mi:-$(outcome "$m")} | ${ti:-$(outcome "$t")} | $(ratio "$mi" "$ti") | $(gib "$(value "$m" train_memory_peak_bytes)") | $(gib "$(value "$t" train_memory_peak_bytes)") | $(value "$m" forward_images_per_s) | $(value "$t" forward_images_per_s) |"
  done
done
say ""
say "## One exact Hessian-vector product (base MAE, batch 4, fp32)"
run m_hvp "$binary" bench --preset base --model mae --batch-size 4 --hvp-batch 4 --iters 3 \
  --parts hvp --device cuda:0
run t_hvp "$python" benches/torch_reference.py --device cuda --preset base --model mae \
  --batch-size 4 --hvp-batch 4 --iters 3 --parts hvp
say ""
say "| | gradient with graph s | HVP s | HVP / gradient | peak GiB |"
say "|---|---|---|---|---|"
say "| mimscope | $(value m_hvp gradient_s) | $(value m_hvp hvp_s) | $(value m_hvp hvp_over_gradient) | $(gib "$(value m_hvp hvp_memory_peak_bytes)") |"
say "| PyTorch | $(value t_hvp gradient_s) | $(value t_hvp hvp_s) | $(value t_hvp hvp_over_gradient) | $(gib "$(value t_hvp hvp_memory_peak_bytes)") |"

if [ $ncu = 1 ]; then
  say ""
  say "## Where a mimscope bf16 training step's GPU time goes (base MAE, batch 64; ncu)"
  ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -z "$ncu_bin" ]; then
    say "- ncu not found"
  elif run ncu "$ncu_bin" --clock-control none --metrics gpu__time_duration.sum --csv \
      "$binary" bench --preset base --model mae --batch-size 64 --iters 1 --parts train \
      --precision bf16 --device cuda:0; then
    # Two steps ran (a warm-up and a timed one): the kernel time per step is half the sum.
    "$python" - "$work/ncu.out" "$(value ncu train_step_s)" <<'EOF' | tee -a "$report"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0] if rows else []
try:
    k = head.index("Kernel Name") if "Kernel Name" in head else head.index("Function Name")
    u, v = head.index("Metric Unit"), head.index("Metric Value")
except ValueError:
    sys.exit(f"- no ncu table in its output; its first row: {head}")
scale = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0}
by = collections.defaultdict(lambda: [0, 0.0])
for r in rows[1:]:
    name = r[k].removeprefix("void ").split("(")[0].split("<")[0].strip()
    by[name][0] += 1
    by[name][1] += float(r[v].replace(",", "")) * scale.get(r[u], 1e-9)
total = sum(t for _, t in by.values())
launches = sum(n for n, _ in by.values())
step = float(sys.argv[2]) if sys.argv[2] else float("nan")
print(f"- {launches} kernel launches, {total:.3f} s of kernel time over the bench's two steps "
      f"({launches / 2:.0f} launches and {total / 2:.3f} s per step, against a step of {step:.3f} s "
      "outside the profiler)")
print("")
print("| kernel | launches | seconds | share |")
print("|---|---|---|---|")
for name, (n, t) in sorted(by.items(), key=lambda x: -x[1][1])[:15]:
    print(f"| `{name[:70]}` | {n} | {t:.4f} | {100 * t / total:.1f}% |")
EOF
  else
    say "- ncu failed: $(tail -2 "$work/ncu.out" | tr '\n' ' ')"
  fi
fi
say ""
say "Total time: $(( $(date +%s) - started )) s."
