# Shared by scripts/gpu-check.sh and scripts/gpu-compare.sh, which source it after parsing
# their arguments into `binary`, `out` and `budget`.

# gpu_setup NAME: checks --budget, makes `out` absolute, makes `work` (a temporary folder,
# removed on exit), points `binary` at the unpacked $binary.gz where only that was carried,
# puts the PyTorch venv's CUDA 13 libraries on LD_LIBRARY_PATH and sets `started`.
gpu_setup() {
  local name="$1"
  case "$budget" in
    ''|*[!0-9]*) echo "$name: --budget takes whole seconds, not '$budget'" >&2; exit 2 ;;
  esac
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  if [ ! -x "$binary" ] && [ -f "$binary.gz" ]; then
    gunzip -c "$binary.gz" > "$work/mimscope" && chmod +x "$work/mimscope" && binary="$work/mimscope"
  fi
  if [ ! -x "$binary" ]; then
    echo "$name: no mimscope binary at $binary (build it with scripts/build-cuda.sh)" >&2
    exit 2
  fi
  local lib
  for lib in /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib; do
    [ -d "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  started=$(date +%s)
}

# budget_limit LIMIT MIN: prints LIMIT (seconds) cut to what is left of --budget, or fails
# when under MIN seconds are left. Without a budget, prints LIMIT.
budget_limit() {
  local limit="$1" min="$2"
  if [ "$budget" -gt 0 ]; then
    local left=$(( budget - ($(date +%s) - started) ))
    [ "$left" -lt "$min" ] && return 1
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "$limit"
}
