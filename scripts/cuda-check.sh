#!/usr/bin/env bash
# Type-check and lint the `cuda` and `cudnn` features (our CUDA custom ops, the cuDNN convolution
# path, the nvcc step of host/build.rs),
# run its GPU-free unit tests, and read the kernels' compiled code (spills; for the wgmma
# kernels also serialised wgmma and register hazards), without a GPU, with the CUDA 13.0
# toolkit ../shared/gpu/build-cuda.sh fetches into its cache (fetched here too when missing;
# cuobjdump/nvdisasm from PyPI). From the repo root: bash scripts/cuda-check.sh
# Cold: ~25 min on 2 cores (candle-kernels nvcc step); target/cuda-check caches it.
set -euo pipefail
root=$(pwd)
cache=$HOME/.cache/headshot-cuda
cuda=$cache/toolkit/nvidia/cu13
mkdir -p "$cache/wheels" "$cache/toolkit" "$cache/linklib"
if [ ! -x "$cuda/bin/nvcc" ]; then
  python3 -m pip download -q --no-deps -d "$cache/wheels" \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
    "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-runtime==13.0.96"
  for w in "$cache"/wheels/nvidia_*.whl; do python3 -m zipfile -e "$w" "$cache/toolkit"; done
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/*
fi
printf 'INPUT(%s/lib/libcudart_static.a -lrt -lpthread -ldl)\n' "$cuda" > "$cache/linklib/libcudart.so"
[ -f Cargo.lock ] || { echo "run from the workspace root"; exit 2; }
ver=$(awk '/^name = "candle-core"/{getline; gsub(/[" ]/,""); sub("version=",""); print; exit}' Cargo.lock)
patched=$cache/candle-core-$ver-dynamic-loading
if [ ! -d "$patched" ]; then
  cargo fetch -q
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-"$ver" | head -n1)
  cp -r "$src" "$patched"
  sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$patched/Cargo.toml"
  rm -f "$patched/.cargo-ok" "$patched/.cargo_vcs_info.json"
fi
saved=$(mktemp)
cp Cargo.lock "$saved"
trap 'cp "$saved" "$root/Cargo.lock"' EXIT
export CUDA_HOME=$cuda CUDA_ROOT=$cuda PATH=$cuda/bin:$PATH
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="-L native=$cache/linklib"
export CARGO_TARGET_DIR=$root/target/cuda-check
# Both feature sets: `cuda` alone, and `cudnn` (what the GPU binary is built with, which adds
# the cuDNN convolution path).
for features in cuda cudnn; do
  nice cargo clippy -p headshot-host --features $features --all-targets \
    --config "patch.crates-io.candle-core.path=\"$patched\"" -- -D warnings
done
# The unit tests of the CUDA modules that need no GPU (shape checks, launch sizes against the
# kernels' constants): nothing else runs them, CI builds without the feature.
nice cargo test -p headshot-host --features cudnn --lib \
  --config "patch.crates-io.candle-core.path=\"$patched\"" -- _cuda::
# The wgmma kernels' compiled code: no register spills, no serialised wgmma, and no
# instruction touching registers a wgmma is still writing or reading (scripts/wgmma-sass-check.py).
sass_tools=$cache/sass-tools
if [ ! -x "$sass_tools/nvidia/cu13/bin/cuobjdump" ]; then
  python3 -m pip download -q --no-deps -d "$cache/wheels" \
    "nvidia-cuda-cuobjdump==13.2.51" "nvidia-cuda-nvdisasm==13.5.37"
  for w in "$cache"/wheels/nvidia_cuda_cuobjdump-*.whl "$cache"/wheels/nvidia_cuda_nvdisasm-*.whl; do
    python3 -m zipfile -e "$w" "$sass_tools"
  done
  chmod +x "$sass_tools"/nvidia/cu13/bin/*
fi
cubin=$(mktemp --suffix=.cubin)
trap 'cp "$saved" "$root/Cargo.lock"; rm -f "$cubin" "$cubin.sass"' EXIT
# The kernels of each file at sm_90a: no spills or local memory (the convolutions hold 64
# accumulators a thread for two blocks an SM; a change that makes them spill fails here, not
# silently on the GPU); for the wgmma files also no serialised wgmma and no register hazards.
for file in flash_wgmma conv_wgmma conv_implicit; do
  if ! ptxas_log=$(nvcc -cubin -arch=sm_90a -O3 -Xptxas -v -o "$cubin" "host/kernels/$file.cu" 2>&1); then
    echo "$ptxas_log" >&2; exit 1
  fi
  grep -E "Compiling entry|registers" <<<"$ptxas_log"
  # No figures at all would pass the test below: a changed ptxas report must fail instead.
  if ! grep -qE "[0-9]+ bytes stack frame" <<<"$ptxas_log"; then
    echo "no stack frame figures in ptxas' report on $file.cu (its format changed?):" >&2
    echo "$ptxas_log" >&2; exit 1
  fi
  if grep -oE "[0-9]+ bytes (spill stores|spill loads|stack frame)" <<<"$ptxas_log" | grep -vq "^0 "; then
    echo "$file.cu spills registers or uses local memory:" >&2; echo "$ptxas_log" >&2; exit 1
  fi
  case $file in *wgmma)
    if grep -qi "serializ" <<<"$ptxas_log"; then
      echo "ptxas serialised wgmma in $file.cu:" >&2; grep -i "serializ" <<<"$ptxas_log" >&2; exit 1
    fi
    PATH=$sass_tools/nvidia/cu13/bin:$PATH cuobjdump -sass "$cubin" > "$cubin.sass"
    python3 scripts/wgmma-sass-check.py "$cubin.sass"
  esac
done
