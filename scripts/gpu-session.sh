#!/usr/bin/env bash
# The one prepared script for a lent GPU (issue 7), run on the device from the repo root:
#
#   bash scripts/gpu-session.sh            (device `run` with carry ["gpu-carry"])
#
# Expects gpu-carry/ (git-ignored) to hold: headshot.xz (../shared/gpu/build-cuda.sh
# --features cudnn, then strip + xz), run-bench.sh and flux_bench_torch.py from
# ../shared/gpu/, and wheels/ with the diffusers wheel. Order: correctness first (cheap, and it
# decides whether the timings mean anything), then our model next to the diffusers twin in
# one call (same card), then the variants, then every op alone. A time budget (BUDGET seconds,
# default 520; run it with timeout_s 580) skips what no longer fits, so the device call
# returns its files in time.
# Everything lands in $OUT (or ./gpu-out).
set -u
out=${OUT:-./gpu-out}; mkdir -p "$out"
carry=gpu-carry
budget=${BUDGET:-520}
start=$SECONDS
xz -dc "$carry/headshot.xz" > /tmp/headshot && chmod +x /tmp/headshot
py=${TORCH_PY:-python3}
tdir=$("$py" -c "import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))" 2>/dev/null)
[ -n "$tdir" ] || { echo "no torch install found (TORCH_PY=$py): its CUDA libraries are needed" >&2; exit 2; }
libs=$(find "$tdir" -name 'libcublas.so*' -o -name 'libcurand.so*' -o -name 'libcudnn.so*' 2>/dev/null | xargs -r -n1 dirname | grep -v /stubs | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:-}"
# run-bench.sh puts every folder holding libcublas on the library path, /usr/local/cuda's
# stubs/ too, whose libcuda.so stub makes the driver unusable ("CUDA_ERROR_STUB_LIBRARY");
# the copy used here leaves stubs/ out and is otherwise unchanged.
sed 's#dirname | sort -u#dirname | grep -v /stubs | sort -u#' "$carry/run-bench.sh" > "$carry/run-bench.nostubs.sh"
grep -q 'grep -v /stubs' "$carry/run-bench.nostubs.sh" || { echo "run-bench.sh changed: the stubs/ filter no longer applies" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.txt" 2>&1
left() { echo $(( budget - (SECONDS - start) )); }
# run LIMIT ARGS...: one bench run, skipped when under LIMIT seconds remain.
run() {
  local limit=$1; shift
  if [ "$(left)" -lt "$limit" ]; then echo "== SKIPPED (time) $*" | tee -a "$out/session.txt"; return; fi
  # The HEADSHOT_* switches this run was given (exported with the command), then the command.
  local switches; switches=$(env | grep -E '^HEADSHOT_' | sort | tr '\n' ' ')
  echo "== $switches$* (t=$((SECONDS - start))s)" | tee -a "$out/session.txt"
  timeout "$limit" /tmp/headshot "$@" > "$out/last.txt" 2>&1; local rc=$?
  grep -E "RESULT|RATE|CHECK|MEMORY|PROFILE|model|Error|error|panick|per-row|WARN|GEMM tuned" "$out/last.txt" | tee -a "$out/session.txt"
  echo "exit $rc" | tee -a "$out/session.txt"
}

# CONFIRM=1: the defaults alone, for a short call after defaults changed: every check, ours
# vs diffusers (bf16 step and decode), the FP8 step.
if [ -n "${CONFIRM:-}" ]; then
  run 120 bench gpu --device cuda --check --attention fused
  echo "== vs torch (t=$((SECONDS - start))s)" | tee -a "$out/session.txt"
  TORCH_ARGS="--iters 3 --warmup 1" WHEELS=$carry/wheels OUT=$out/vs-torch timeout $(( $(left) < 200 ? $(left) : 200 )) bash $carry/run-bench.nostubs.sh /tmp/headshot \
    bench gpu --device cuda --attention fused --iters 3 --warmup 1 | tee -a "$out/session.txt"
  run 40 bench gpu --device cuda --attention fused --iters 3 --warmup 1 --skip-vae --fp8
  "$py" scripts/gpu-summary.py "$out" | tee "$out/summary.txt"
  exit 0
fi
# Without CONFIRM: the defaults against what they replaced and the paths still opt-in, each
# step against step 2's diffusers step (the second lending's figures: docs/BENCHMARKS.md).
# 1. Every check at the defaults (and the previous attention kernel alone, wide32).
HEADSHOT_FLASH_KERNELS=wide32 run 120 bench gpu --device cuda --check --attention fused
# 2. Ours at the defaults and the diffusers twin, same card, same call.
if [ "$(left)" -gt 60 ]; then
  echo "== vs torch (t=$((SECONDS - start))s)" | tee -a "$out/session.txt"
  TORCH_ARGS="--iters 3 --warmup 1" WHEELS=$carry/wheels OUT=$out/vs-torch timeout $(( $(left) < 200 ? $(left) : 200 )) bash $carry/run-bench.nostubs.sh /tmp/headshot \
    bench gpu --device cuda --attention fused --iters 3 --warmup 1 | tee -a "$out/session.txt"
fi
step=(bench gpu --device cuda --attention fused --iters 3 --warmup 1 --skip-vae)
# 3. FP8: the default (per row), per tensor, each with GEMM tuning, the previous kernel.
run 60 "${step[@]}" --fp8
run 60 "${step[@]}" --fp8 --fp8-scale tensor
HEADSHOT_GEMM_TUNE=on run 60 "${step[@]}" --fp8
HEADSHOT_GEMM_TUNE=on run 60 "${step[@]}" --fp8 --fp8-scale tensor
HEADSHOT_FLASH_KERNEL=wide32 run 60 "${step[@]}" --fp8
# 4. bf16 without the split linear2, with the previous kernel, both (the old defaults).
HEADSHOT_SPLIT_GEMM=off run 60 "${step[@]}"
HEADSHOT_FLASH_KERNEL=wide32 run 60 "${step[@]}"
HEADSHOT_SPLIT_GEMM=off HEADSHOT_FLASH_KERNEL=wide32 run 60 "${step[@]}"
# 5. The decoder: candle's convolutions and norm (the old default), the default of builds
#    without cuDNN.
vae_only=(bench gpu --device cuda --vae-only --iters 3 --warmup 1 --no-candle-vae)
HEADSHOT_CONV=candle HEADSHOT_GROUP_NORM=candle run 45 "${vae_only[@]}"
HEADSHOT_CONV=implicit_wide,gemm run 45 "${vae_only[@]}"
# 6. The whole decoder at 1024x1024 on every path against candle's f32 ops, then the checks
#    again with GEMM tuning on (a tuned algorithm must be as right as the heuristic's).
HEADSHOT_CHECK_ONLY=decoder_full run 90 bench gpu --device cuda --check
HEADSHOT_GEMM_TUNE=on run 90 bench gpu --device cuda --check --attention fused
# 7. Each op alone: attention kernels, GEMMs (bf16, FP8 per tensor and per row), norms, the
#    decoder's convolutions and memory-bound ops on every path.
HEADSHOT_FLASH_KERNELS=wide_lazy,wide32 run 110 bench gpu --device cuda --ops --iters 10 --warmup 2
echo "done at t=$((SECONDS - start))s" | tee -a "$out/session.txt"
# Last, so it ends the call's output: ratios to diffusers, failed checks, fallbacks.
"$py" scripts/gpu-summary.py "$out" | tee "$out/summary.txt"
