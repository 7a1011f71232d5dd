# Runpod serverless image: `headshot worker` on CUDA.
#
#   docker build -t headshot .                                    # weights from the HF cache at run time
#   docker build --build-arg BAKE_WEIGHTS=1 --secret id=hf_token,env=HF_TOKEN -t headshot .   # weights inside
#
# Not built in CI (no Docker engine there); see README "Docker image".

# 12.9 or later: cuBLASLt's per-row FP8 scaling (`model.fp8_scale = "row"`) needs it; with
# an older toolkit the worker keeps per-tensor scales (checked at load, logged).
ARG CUDA_VERSION=12.9.1

# --- build: Rust + CUDA toolkit, the worker with --features cudnn (CUDA + cuDNN: the decoder's
# fastest default path, 39.6 against 44.8 ms a 1024x1024 decode on an H100) ------------------
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu24.04 AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0 \
 && /root/.cargo/bin/rustup target add wasm32-wasip2
ENV PATH=/root/.cargo/bin:$PATH
# Hopper (H100/H200); set 80 for A100, 89 for L4/L40/4090.
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features cudnn -p headshot-host --bin headshot \
 && strip target/release/headshot

# --- optional: bake the weights in ---------------------------------------------------------
FROM python:3.12-slim AS weights
ARG BAKE_WEIGHTS=0
ARG HF_REPO=black-forest-labs/FLUX.1-schnell
RUN --mount=type=secret,id=hf_token \
    mkdir -p /models/flux \
 && if [ "$BAKE_WEIGHTS" = "1" ]; then \
      pip install --no-cache-dir -q huggingface_hub \
      && HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" \
         huggingface-cli download "$HF_REPO" --local-dir /models/flux \
           --include "*.json" "*.txt" "ae.safetensors" "flux1-*.safetensors" "text_encoder/*" "text_encoder_2/*" "tokenizer/*" "tokenizer_2/*"; \
    fi

# --- run: CUDA runtime + the binary --------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/headshot /usr/local/bin/headshot
COPY --from=weights /models /models
# The defaults are built into the binary; this copy documents every key and is the file the
# worker reads (CMD below), so an image built FROM this one, or a mount over it, can change
# them. HEADSHOT__* variables override it.
COPY config/default.toml /etc/headshot/headshot.toml
COPY test_input.json /app/test_input.json
WORKDIR /app
# Baked weights: HEADSHOT__MODEL__SOURCE=dir:/models/flux. Otherwise the hub, cached in
# HF_HOME (mount a network volume there so workers share one download).
ENV HEADSHOT__MODEL__SOURCE=hub:black-forest-labs/FLUX.1-schnell \
    HEADSHOT__MODEL__LOAD=eager \
    HEADSHOT__DATA_DIR=/data \
    HF_HOME=/runpod-volume/hf \
    HEADSHOT_LOG_FORMAT=json
# Runpod sets RUNPOD_WEBHOOK_GET_JOB & co.; without them the worker runs ./test_input.json once.
# (On Runpod, RUNPOD_ENDPOINT_ID switches the logs to Runpod's line format whatever
# HEADSHOT_LOG_FORMAT says; the JSON setting serves elsewhere.)
# The config file is in the entrypoint, so it is read whatever command replaces CMD.
ENTRYPOINT ["headshot", "--config", "/etc/headshot/headshot.toml"]
CMD ["worker"]
