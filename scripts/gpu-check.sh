#!/usr/bin/env bash
# The GPU checks of mimscope, in one go, on the GPU machine (see docs/gpu.md): parity of the
# device with the CPU, the commands on the device, training-step speed of `base` in fp32 and
# bf16 at the largest batch that fits, encoder-forward speed, the cost of a Hessian-vector
# product against a gradient, peak memory, and the share of a real training run spent waiting
# for data. It writes gpu-check.md (the report) and gpu-check.log (every command's output)
# into --out.
#
#   scripts/gpu-check.sh [--binary PATH] [--device cuda:0] [--out DIR] [--budget S] [--quick]
#
#   --binary PATH  the mimscope built by scripts/build-cuda.sh     (default: .gpu/mimscope, or
#                  unpacked from .gpu/mimscope.gz, the file to carry)
#   --device DEV   the device under test                          (default: cuda:0)
#   --out DIR      where the report and log go                    (default: gpu-check-out)
#   --budget S     the whole check's seconds: each step's limit is cut to what is left, and
#                  steps with under 10 s left are recorded as skipped (default: no limit)
#   --quick        small sizes (`tiny` for the speed part, few steps): checks this script
#                  itself, on a CPU with --device cpu, in seconds
#
# The CUDA 13 libraries are taken from the PyTorch venv (/opt/torch/.venv/.../nvidia/cu13/lib);
# the driver's libcuda.so.1 from the system. Each step has a time limit, and a step that fails
# is recorded and the script goes on; the exit status is 1 when any check failed or was
# skipped.
set -u

cd "$(dirname "$0")/.."
binary=.gpu/mimscope
device=cuda:0
out=gpu-check-out
quick=0
budget=0
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
. scripts/gpu-lib.sh
gpu_setup gpu-check.sh
report="$out/gpu-check.md"
log="$out/gpu-check.log"
: > "$log"
failed=0
skipped=0
export LD_BIND_NOW=1

say() { echo "$*" | tee -a "$report"; }
# step NAME LIMIT_S CMD...: runs CMD (output to the log and to $work/NAME.out) under a limit,
# cut to what is left of --budget; with under 10 s left it is skipped (exit status 124).
step() {
  local name="$1" limit="$2"; shift 2
  echo "== $name: $*" >> "$log"
  if ! limit=$(budget_limit "$limit" 10); then
    echo "skipped: the --budget of ${budget}s is spent" | tee "$work/$name.out" >> "$log"
    echo 124 > "$work/$name.rc"
    return 124
  fi
  local t0=$(date +%s.%N)
  timeout "$limit" "$@" > "$work/$name.out" 2>&1
  local rc=$?
  local secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  cat "$work/$name.out" >> "$log"
  echo "== $name: exit $rc after ${secs}s" >> "$log"
  echo "$rc" > "$work/$name.rc"
  return $rc
}
# value NAME KEY: the value of a key=value line of step NAME's output.
value() { grep -m1 "^$2=" "$work/$1.out" 2>/dev/null | cut -d= -f2- ; }
check() { # check NAME DESCRIPTION: a pass/fail/skipped line for step NAME.
  if [ "$(cat "$work/$1.rc" 2>/dev/null)" = 0 ]; then say "- pass: $2"
  elif grep -q '^skipped: ' "$work/$1.out" 2>/dev/null; then
    skipped=1; say "- skipped (the --budget ran out): ${2%%:*}"
  else
    failed=1; say "- **FAIL**: $2 (exit $(cat "$work/$1.rc" 2>/dev/null); see gpu-check.log, step $1)"
    tail -3 "$work/$1.out" 2>/dev/null | sed 's/^/    /' | tee -a "$report"; fi
}
# compare_csv A B COLUMN_FROM: largest |a-b| / max(|a|, 1e-12) over numeric columns >= COLUMN_FROM.
compare_csv() {
  paste -d, "$1" "$2" | awk -F, -v from="$3" 'NR > 1 { n = NF / 2; for (i = from; i <= n; i++) {
      a = $i; b = $(i + n); d = a - b; if (d < 0) d = -d; s = a < 0 ? -a : a; if (s < 1e-12) s = 1e-12;
      if (d / s > worst) worst = d / s } } END { printf "%.3e\n", worst + 0 }'
}

: > "$report"
say "# mimscope GPU check"
say ""
say "- date: $(date -u +%Y-%m-%dT%H:%MZ); device under test: $device; binary: $binary"
say "- $("$binary" --version 2>&1 | head -1)"
if command -v nvidia-smi > /dev/null; then
  say "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
  nvidia-smi >> "$log" 2>&1
fi
say "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores; glibc $(ldd --version 2>&1 | head -1 | awk '{print $NF}')"
echo "== ldd $binary" >> "$log"; ldd "$binary" >> "$log" 2>&1
if ldd "$binary" 2>&1 | grep -q "not found"; then
  say "- **FAIL**: missing libraries: $(ldd "$binary" | grep 'not found' | awk '{print $1}' | tr '\n' ' ')"
  failed=1
fi

if [ $quick = 1 ]; then
  preset=tiny; batches_f32="16 32"; batches_bf16="16 32"; hvp_preset=tiny; steps=6; iters=2
else
  preset=base; batches_f32="64 128 256 512"; batches_bf16="64 128 256 512 1024"; hvp_preset=base
  steps=30; iters=5
fi

say ""
say "## Parity with the CPU (tiny preset, the same weights and 8 bundled photos)"
step ck 300 "$binary" train --preset tiny --model mff --steps 20 --batch-size 32 --save-every 20 \
  --device cpu --out "$work/ck"
check ck "a 20-step CPU run gives the checkpoint under test"
ck="$work/ck/final.safetensors"
# The first run also checks every kernel on its own (--kernels: forward and gradients in f32,
# second derivatives in f64, against the primitive forms on the CPU), so a wrong kernel is named.
for p in "trained f32:--checkpoint $ck --precision f32 --kernels" "init f32:--precision f32" \
         "init bf16:--precision bf16" "trained bf16:--checkpoint $ck --precision bf16"; do
  name="parity_$(echo "${p%%:*}" | tr ' ' '_')"
  step "$name" 300 "$binary" parity ${p#*:} --device "$device"
  check "$name" "parity, ${p%%:*} weights: $(grep -E '^(loss_rel|features_rel_max|gradients_rel|gradient_tensor_rel_max)=' "$work/$name.out" | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
  if grep -q '^kernel_' "$work/$name.out"; then
    say "kernels (worst of value and gradients; H v in f64): $(grep -E '^kernel_' "$work/$name.out" | sed 's/ (tolerance.*//' | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
  fi
done

say ""
say "## The commands on the device"
step train_f32 300 "$binary" train --preset tiny --model mff --steps 20 --batch-size 32 \
  --save-every 20 --device "$device" --out "$work/gpu_f32"
check train_f32 "train (tiny MFF, 20 steps, f32) on $device"
if [ -f "$work/gpu_f32/metrics.csv" ] && [ -f "$work/ck/metrics.csv" ]; then
  say "  - last loss on the CPU $(tail -1 "$work/ck/metrics.csv" | cut -d, -f4), on $device $(tail -1 "$work/gpu_f32/metrics.csv" | cut -d, -f4) (same seed and batches; the difference is rounding, amplified by 20 steps)"
fi
train_precision=bf16; [ "$device" = cpu ] && train_precision=f32  # CPUs train in f32
step train_bf16 300 "$binary" train --preset tiny --model mff --steps 20 --batch-size 32 \
  --save-every 20 --precision $train_precision --device "$device" --out "$work/gpu_bf16"
check train_bf16 "train --precision $train_precision on $device"
[ -f "$work/gpu_bf16/metrics.csv" ] && say "  - last loss in $train_precision $(tail -1 "$work/gpu_bf16/metrics.csv" | cut -d, -f4)"
step reconstruct 300 "$binary" reconstruct --checkpoint "$ck" --images 8 --device "$device" \
  --out "$work/rec"
check reconstruct "reconstruct on $device"
step spectrum_cpu 300 "$binary" spectrum --checkpoint "$ck" --images 32 --sublayers --device cpu \
  --out "$work/spec_cpu"
step spectrum 300 "$binary" spectrum --checkpoint "$ck" --images 32 --sublayers --device "$device" \
  --out "$work/spec_gpu"
check spectrum "spectrum on $device"
if [ -f "$work/spec_gpu/spectrum.csv" ] && [ -f "$work/spec_cpu/spectrum.csv" ]; then
  say "  - largest relative difference of spectrum.csv from the CPU's: $(compare_csv "$work/spec_cpu/spectrum.csv" "$work/spec_gpu/spectrum.csv" 4)"
fi
step hessian_ref 300 "$binary" hessian --checkpoint "$ck" --batches 1 --batch-size 8 \
  --max-iters 20 --device cpu --out "$work/hessian_ref"
step hessian 300 "$binary" hessian --checkpoint "$ck" --batches 1 --batch-size 8 \
  --max-iters 20 --device "$device" --out "$work/hessian"
check hessian "hessian (exact HVPs, top eigenvalue) on $device"
if [ -f "$work/hessian_ref/hessian.csv" ] && [ -f "$work/hessian/hessian.csv" ]; then
  say "  - top eigenvalue on the CPU $(tail -1 "$work/hessian_ref/hessian.csv" | cut -d, -f4), on $device $(tail -1 "$work/hessian/hessian.csv" | cut -d, -f4) (power iteration to 1e-3)"
fi

say ""
say "## Speed: $preset MAE training step (mask 0.75), forward, HVP"
say ""
say "| precision | batch | train images/s | step s | TFLOP/s | of 790 TFLOP/s | peak memory GiB |"
say "|---|---|---|---|---|---|---|"
gib() { awk -v b="${1:-0}" 'BEGIN { printf "%.1f", b / 1073741824 }'; }
declare -A best
for prec in f32 bf16; do
  list=$batches_f32; [ $prec = bf16 ] && list=$batches_bf16
  for b in $list; do
    name="speed_${prec}_$b"
    if step "$name" 240 "$binary" bench --preset $preset --model mae --batch-size $b --iters $iters \
        --parts train --precision $prec --peak-tflops 790 --device "$device"; then
      best[$prec]=$b
      say "| $prec | $b | $(value $name train_images_per_s) | $(value $name train_step_s) | $(value $name train_tflops_per_s) | $(value $name train_fraction_of_peak) | $(gib "$(value $name train_memory_peak_bytes)") |"
    elif grep -q '^skipped: ' "$work/$name.out"; then
      say "| $prec | $b | skipped: the --budget ran out | | | | |"
      break
    else
      say "| $prec | $b | does not fit or failed: $(grep -m1 -io 'out of memory\|error.*' "$work/$name.out" | head -c 120) | | | | |"
      break
    fi
  done
done
say ""
say "Model FLOPs per image (training: forward and backward matrix products): $(value "speed_f32_${best[f32]:-none}" train_flops_per_image)."
for prec in f32 bf16; do
  list=$batches_f32; [ $prec = bf16 ] && list=$batches_bf16
  if [ -n "${best[$prec]:-}" ]; then :
  elif grep -q '^skipped: ' "$work/speed_${prec}_${list%% *}.out" 2>/dev/null; then
    skipped=1; say "- skipped (the --budget ran out): the $prec speed runs"
  else failed=1; say "- **FAIL**: no $prec batch ran"; fi
done
say ""
for prec in f32 bf16; do
  b=${best[$prec]:-64}
  name="forward_$prec"
  step "$name" 240 "$binary" bench --preset $preset --model mae --batch-size "$b" --iters $iters \
    --parts forward --precision $prec --peak-tflops 790 --device "$device"
  check "$name" "encoder forward ($preset, unmasked, every block kept), $prec, batch $b: $(value $name forward_images_per_s) images/s, $(value $name forward_tflops_per_s) TFLOP/s, peak memory $(gib "$(value $name forward_memory_peak_bytes)") GiB"
done
for hp in "$hvp_preset:4" "tiny:8"; do
  pr=${hp%%:*}; hb=${hp#*:}; name="hvp_${pr}_$hb"
  step "$name" 240 "$binary" bench --preset "$pr" --model mae --batch-size "$hb" --hvp-batch "$hb" \
    --iters 3 --parts hvp --device "$device"
  check "$name" "HVP ($pr, batch $hb, f32): gradient $(value $name gradient_s) s, HVP $(value $name hvp_s) s = $(value $name hvp_over_gradient) gradients (first one, building the graph: $(value $name hvp_first_over_gradient)), peak memory $(gib "$(value $name hvp_memory_peak_bytes)") GiB"
done

say ""
say "## Data loading"
b=${best[bf16]:-64}
step data 240 "$binary" bench --preset $preset --batch-size "$b" --iters 3 --parts data --device cpu
check data "decode-free augmentation of a $preset batch of $b on $(nproc) cores: MAE crop $(value data data_mae_images_per_s) images/s, PixMIM crop $(value data data_pixmim_images_per_s) images/s"
tb=64
step train_base 400 "$binary" train --preset $preset --model mff --steps $steps --batch-size $tb \
  --save-every 100000 --precision $train_precision --device "$device" --out "$work/train_base"
check train_base "a real $steps-step $train_precision training run ($preset MFF, batch $tb, bundled photos): $(grep -m1 '^data: the steps waited' "$work/train_base.out")"
[ -f "$work/train_base/metrics.csv" ] && say "  - images/s over the last 10 steps: $(tail -10 "$work/train_base/metrics.csv" | cut -d, -f5 | tr '\n' ' ')"

say ""
say "Total time: $(( $(date +%s) - started )) s. Overall: $( if [ $failed = 1 ]; then echo FAIL; elif [ $skipped = 1 ]; then echo "incomplete (steps skipped)"; else echo pass; fi)."
[ $failed = 0 ] && [ $skipped = 0 ]
