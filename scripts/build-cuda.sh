#!/usr/bin/env bash
# Builds the release mimscope with the `cuda` feature for compute capability 9.0 (H100/H200)
# on a machine without a GPU or a CUDA install, and prints the binary's path.
#
# CUDA 13.0 comes from pinned PyPI wheels unpacked into one folder (see docs/gpu.md
# for why each is needed and why 13.0 exactly: newer nvcc writes PTX that driver 580 cannot
# load). libcuda.so comes with the GPU driver, so the linker gets a generated stub with the
# driver's soname; it is never shipped, the GPU machine's real libcuda.so.1 is loaded there.
#
#   scripts/build-cuda.sh [--prefix DIR] [--target-dir DIR] [--out DIR]
#
#   --prefix DIR      where the wheels and link folder go      (default: .cuda)
#   --target-dir DIR  cargo's target folder; keep it, a cold   (default: target/cuda)
#                     build takes 20-30 minutes on 2 cores, a relink seconds
#   --out DIR         the stripped binary goes here, and       (default: .gpu)
#                     mimscope.gz to carry to the GPU machine
#                     (scripts/gpu-check.sh unpacks it)
set -euo pipefail

cd "$(dirname "$0")/.."
prefix=.cuda
target_dir=target/cuda
out=.gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --target-dir) target_dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build-cuda.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$prefix" "$out"
prefix="$(cd "$prefix" && pwd)"

wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
)
toolkit="$prefix/toolkit"
cuda="$toolkit/nvidia/cu13"
stamp="$prefix/toolkit.stamp"
if [ ! -x "$cuda/bin/nvcc" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${wheels[*]}" ]; then
  echo "== installing CUDA 13.0 wheels into $toolkit (about 675 MB)"
  rm -rf "$toolkit"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$toolkit" "${wheels[@]}"
  echo "${wheels[*]}" > "$stamp"
fi
"$cuda/bin/nvcc" --version | tail -2

# The linker wants unversioned names; the wheels ship libcublas.so.13 and the like.
link="$prefix/link"
rm -rf "$link"
mkdir -p "$link"
for lib in cudart cublas cublasLt curand nvrtc; do
  real=$(ls "$cuda"/lib/lib$lib.so.* 2>/dev/null | sort | head -1)
  if [ -z "$real" ]; then
    echo "build-cuda.sh: lib$lib.so.* is missing from $cuda/lib; delete $prefix and rerun" >&2
    exit 1
  fi
  ln -s "$real" "$link/lib$lib.so"
done

# Stub libcuda.so.1: one symbol per driver function cudarc declares.
cudarc=$(cargo metadata --format-version 1 --locked --features cuda |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
cudarc="$(dirname "$cudarc")"
grep -oP '^\s+fn \Kcu[A-Za-z0-9_]+(?=\()' "$cudarc/src/driver/sys/mod.rs" | sort -u |
  sed 's/.*/int &(void) { return 999; }/' > "$link/cuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/cuda_stub.c"
echo "== stub libcuda.so with $(wc -l < "$link/cuda_stub.c") driver symbols"

export PATH="$cuda/bin:$PATH"
export CUDA_ROOT="$cuda"
export CUDA_PATH="$cuda"
export CUDA_COMPUTE_CAP=90
export LIBRARY_PATH="$link${LIBRARY_PATH:+:$LIBRARY_PATH}"
echo "== cargo build --release --features cuda --target-dir $target_dir"
cargo build --release --locked --features cuda --target-dir "$target_dir" --bin mimscope
# Stripped (the release profile keeps line tables: 140 MB) and gzipped (22 MB; half of it is
# the sm_90a kernels), so it fits the 64 MiB that can be carried to the GPU machine.
strip --strip-all -o "$out/mimscope" "$target_dir/release/mimscope"
gzip -9 -c "$out/mimscope" > "$out/mimscope.gz.tmp"
mv "$out/mimscope.gz.tmp" "$out/mimscope.gz"
echo "== built: $(pwd)/$out/mimscope ($(du -h "$out/mimscope" | cut -f1)), gzipped to carry: $(pwd)/$out/mimscope.gz ($(du -h "$out/mimscope.gz" | cut -f1))"
