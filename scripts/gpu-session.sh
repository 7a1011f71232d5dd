#!/usr/bin/env bash
# The one prepared script for a lent GPU (issue 7), run on the device from the repo root:
#
#   bash scripts/gpu-session.sh            (device `run` with carry ["gpu-carry"])
#
# Expects gpu-carry/ (git-ignored) to hold: headshot.xz (../shared/gpu/build-cuda.sh
# --features cudnn, then strip + xz), run-bench.sh and flux_bench_torch.py from
# ../shared/gpu/, and wheels/ with the diffusers wheel. Order: correctness first (cheap, and it
# decides whether the timings mean anything), then every op alone, then our model next to the
# diffusers twin in one call (same card), then the variants. A time budget (BUDGET seconds,
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

# 1. Every fast path against plain ops, bf16, at the full 1024x1024 shapes, with the mma.sync
#    attention kernels. The Hopper wgmma kernels have never run: each then gets a process of its
#    own with the attention checks only, since a kernel that faults leaves the CUDA context
#    unusable for every check after it.
mma_sync=pipe4,wide,wide32,wide32_lazy,wide_lazy
HEADSHOT_FLASH_KERNELS=$mma_sync run 120 bench gpu --device cuda --check --attention fused
for kernel in wgmma wgmma_pipe; do
  HEADSHOT_FLASH_KERNELS=$kernel HEADSHOT_CHECK_ONLY=attention run 45 bench gpu --device cuda --check --attention fused
done
# 2. Each op alone: attention kernels, GEMMs (cuBLASLt epilogue, plain, FP8), norms.
#    (SHORT=1: after the comparison with diffusers and FP8 instead, and nothing else.)
[ -z "${SHORT:-}" ] && HEADSHOT_FLASH_KERNELS=$mma_sync run 110 bench gpu --device cuda --ops --iters 10 --warmup 2
# 3. Ours (fused attention, cuBLASLt GEMMs) and the diffusers twin, same card, same call.
if [ "$(left)" -gt 60 ]; then
  echo "== vs torch (t=$((SECONDS - start))s)" | tee -a "$out/session.txt"
  TORCH_ARGS="--iters 3 --warmup 1" WHEELS=$carry/wheels OUT=$out/vs-torch timeout $(( $(left) < 200 ? $(left) : 200 )) bash $carry/run-bench.nostubs.sh /tmp/headshot \
    bench gpu --device cuda --attention fused --iters 3 --warmup 1 | tee -a "$out/session.txt"
fi
# 4. Variants, each step time against step 3's diffusers step (what no longer fits is
#    skipped):
#    - the decoder's CUDA paths, the decode alone on random latents (--vae-only: no
#      transformer is built, ~15 s a run), decode times against step 3's, all but one with
#      the fused norm: cuDNN with tensor-core math (what PyTorch asks of cuDNN; candle leaves
#      the default math), NCHW and then NHWC (cuDNN transforms there and back); the implicit
#      path's prep pass with cuDNN convolving its image (cuDNN for the rest too); our
#      implicit-GEMM kernels with cuDNN, then with the GEMMs, for the convolutions they do
#      not take (the same with the wide tile, then with the wgmma kernel); cuDNN with
#      candle's norm; the fused norm alone. Each prints PROFILE lines: its stages, slowest
#      first; candle's AutoEncoder decode is timed in the first run only; then the whole
#      decoder at full size with each path, checked against candle's f32 ops;
#    - whole steps with the wgmma_pipe attention kernel, bf16 and all-on FP8 (the largest
#      expected gain on the transformer);
#    - the rest of wgmma (the two-stage kernel, with the split GEMM, the kernels alone);
#    - every other opt-in path together, FP8 and bf16, then each alone: FP8 per tensor and per
#      row, GEMM tuning, the lazy attention kernel, the split linear2;
#    - --check with tuning;
#    - the older variants (other flash kernels, 768x1024, plain GEMMs, plain attention,
#      candle's stock module).
vae_only=(bench gpu --device cuda --vae-only --iters 3 --warmup 1)
HEADSHOT_GROUP_NORM=fused HEADSHOT_CONV=cudnn run 45 "${vae_only[@]}"
for conv in cudnn_nhwc implicit_cudnn,cudnn implicit,cudnn implicit,gemm implicit_wide,gemm \
  implicit_wgmma,gemm; do
  HEADSHOT_GROUP_NORM=fused HEADSHOT_CONV=$conv run 45 "${vae_only[@]}" --no-candle-vae
done
HEADSHOT_CONV=cudnn run 45 "${vae_only[@]}" --no-candle-vae
HEADSHOT_GROUP_NORM=fused run 45 "${vae_only[@]}" --no-candle-vae
# The whole decoder at 1024x1024 with each path against candle's f32 ops: the main --check's
# decoders are small, and a path becomes the default only on its full-size row too.
HEADSHOT_CHECK_ONLY=decoder_full run 90 bench gpu --device cuda --check
HEADSHOT_FLASH_KERNEL=wgmma_pipe run 60 bench gpu --device cuda --attention fused --iters 3 --warmup 1 --skip-vae
HEADSHOT_GEMM_TUNE=on HEADSHOT_FLASH_KERNEL=wgmma_pipe run 60 bench gpu --device cuda --attention fused --fp8 --fp8-scale row --iters 3 --warmup 1 --skip-vae
HEADSHOT_FLASH_KERNEL=wgmma run 60 bench gpu --device cuda --attention fused --iters 3 --warmup 1 --skip-vae
HEADSHOT_FLASH_KERNEL=wgmma_pipe HEADSHOT_SPLIT_GEMM=on run 60 bench gpu --device cuda --attention fused --iters 3 --warmup 1 --skip-vae
HEADSHOT_FLASH_KERNELS=wgmma,wgmma_pipe,wide32_lazy,wide32 run 60 bench gpu --device cuda --ops --iters 10 --warmup 2 --skip-vae
HEADSHOT_GEMM_TUNE=on HEADSHOT_FLASH_KERNEL=wide32_lazy run 60 bench gpu --device cuda --attention fused --fp8 --fp8-scale row --iters 3 --warmup 1 --skip-vae
HEADSHOT_FLASH_KERNEL=wide32_lazy HEADSHOT_SPLIT_GEMM=on run 60 bench gpu --device cuda --attention fused --iters 3 --warmup 1 --skip-vae
run 60 bench gpu --device cuda --attention fused --fp8 --iters 3 --warmup 1 --skip-vae
# FP8 with per-row scales (model.fp8_scale = "row"): one pass over the activations, joined
# inputs read in place. Falls back to per-tensor (logged "keeping per-tensor scales") where
# cuBLASLt refuses the scaling mode; step 1's fp8_rows_* names say which ran.
run 60 bench gpu --device cuda --attention fused --fp8 --fp8-scale row --iters 3 --warmup 1 --skip-vae
# The FP8 GEMMs with cuBLASLt's first candidates timed per shape (logged "GEMM tuned").
HEADSHOT_GEMM_TUNE=on run 60 bench gpu --device cuda --attention fused --fp8 --fp8-scale row --iters 3 --warmup 1 --skip-vae
HEADSHOT_GEMM_TUNE=on run 60 bench gpu --device cuda --attention fused --fp8 --iters 3 --warmup 1 --skip-vae
# bf16 with the lazy-softmax attention kernel (step 2's op_attention_wide32_lazy row alone).
HEADSHOT_FLASH_KERNEL=wide32_lazy run 60 bench gpu --device cuda --attention fused --iters 3 --warmup 1 --skip-vae
# bf16 with the single block's linear2 as two GEMMs over its input's parts (no join copy).
HEADSHOT_SPLIT_GEMM=on run 60 bench gpu --device cuda --attention fused --iters 3 --warmup 1 --skip-vae
# The checks again with GEMM tuning on: a tuned algorithm must be as right as the heuristic's.
HEADSHOT_GEMM_TUNE=on HEADSHOT_FLASH_KERNELS=$mma_sync run 90 bench gpu --device cuda --check --attention fused
if [ -n "${SHORT:-}" ]; then
  HEADSHOT_FLASH_KERNELS=$mma_sync run 30 bench gpu --device cuda --ops --iters 5 --warmup 1 --skip-vae
  echo "done at t=$((SECONDS - start))s" | tee -a "$out/session.txt"
  "$py" scripts/gpu-summary.py "$out" | tee "$out/summary.txt"
  exit 0
fi
HEADSHOT_FLASH_KERNEL=pipe4 run 45 bench gpu --device cuda --attention fused --iters 3 --warmup 1 --skip-vae
run 60 bench gpu --device cuda --attention fused --width 768 --height 1024 --iters 3 --warmup 1
run 45 bench gpu --device cuda --attention fused --gemm plain --iters 3 --warmup 1 --skip-vae
run 45 bench gpu --device cuda --attention plain --iters 3 --warmup 1 --skip-vae
run 45 bench gpu --device cuda --model stock --iters 3 --warmup 1 --skip-vae
echo "done at t=$((SECONDS - start))s" | tee -a "$out/session.txt"
# Last, so it ends the call's output: ratios to diffusers, failed checks, fallbacks.
"$py" scripts/gpu-summary.py "$out" | tee "$out/summary.txt"
