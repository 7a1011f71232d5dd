#!/usr/bin/env bash
# The one prepared script for a lent GPU (issue 7), run on the device from the repo root:
#
#   bash scripts/gpu-session.sh            (device `run` with carry ["gpu-carry"])
#
# Expects gpu-carry/ (git-ignored) to hold: headshot.xz (../shared/gpu/build-cuda.sh, then
# strip + xz), run-bench.sh and flux_bench_torch.py from ../shared/gpu/, and wheels/ with the
# diffusers wheel. Order: correctness first (cheap, and it decides whether the timings mean
# anything), then our model with the fused kernel next to the diffusers twin in one call
# (same card), then the plain-attention and stock-candle baselines, then FP8. Everything
# lands in $OUT (or ./gpu-out).
set -u
out=${OUT:-./gpu-out}; mkdir -p "$out"
carry=gpu-carry
xz -dc "$carry/headshot.xz" > /tmp/headshot && chmod +x /tmp/headshot
py=${TORCH_PY:-python3}
tdir=$("$py" -c "import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))" 2>/dev/null)
libs=$(find ${tdir:+"$tdir"} -name 'libcublas.so*' -o -name 'libcurand.so*' -o -name 'libcudnn.so*' 2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:-}"
run() { echo "== $*" | tee -a "$out/session.txt"; timeout 240 /tmp/headshot "$@" 2>&1 | grep -E "RESULT|CHECK|MEMORY|model|Error|error" | tee -a "$out/session.txt"; }

# 1. Every fast path against plain ops, bf16, at the full 1024x1024 shapes.
run bench gpu --check --attention fused
# 2. Ours (fused attention) and the diffusers twin, same card, same call.
WHEELS=$carry/wheels OUT=$out/vs-torch bash $carry/run-bench.sh /tmp/headshot bench gpu --attention fused --iters 3 --warmup 1 \
  | tee -a "$out/session.txt"
# 3. Baselines and variants: plain attention, candle's stock module, FP8 weights, 768x1024.
run bench gpu --attention plain --iters 3 --warmup 1 --skip-vae
run bench gpu --model stock --iters 3 --warmup 1 --skip-vae
run bench gpu --attention fused --fp8 --iters 3 --warmup 1 --skip-vae
run bench gpu --attention fused --width 768 --height 1024 --iters 3 --warmup 1
