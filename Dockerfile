# syntax=docker/dockerfile:1
# mirrorgate container images: small, non-root, multi-stage.
#
#   CPU image (default target):  docker build -t mirrorgate .
#     slimmer, without torch:    docker build --build-arg MIRRORGATE_TORCH=none -t mirrorgate .
#   Slim gateway (http backends, gates, PostgreSQL; no onnxruntime, no torch):
#                                docker build --target gateway -t mirrorgate:gateway .
#   CUDA image:                  docker build --target cuda -t mirrorgate:cuda .
#   Flagger loadtester with the mirrorgate CLI (runs the pinned suite as a webhook):
#                                docker build --target flagger-loadtester -t mirrorgate-loadtester .
#
# Every install step is in deploy/docker/install.sh; tests/deploy/test_image_recipe.py runs
# that script in a clean virtual environment and starts the server with this file's own
# ENTRYPOINT, CMD, ENV and HEALTHCHECK, so the recipe cannot rot while no Docker engine runs
# in CI. Keep build stages to COPY plus the one install.sh RUN that the test replays.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG FLAGGER_LOADTESTER_IMAGE=ghcr.io/fluxcd/flagger-loadtester:0.34.0

# ---- the project's sources, as the build stages see them --------------------------------
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
COPY gates/ gates/
COPY storage/ storage/
COPY deploy/docker/install.sh deploy/docker/install.sh

# ---- CPU virtual environment: onnxruntime + torch's CPU-only build ----------------------
FROM source AS build-cpu
ARG MIRRORGATE_TORCH=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1
RUN MIRRORGATE_ONNXRUNTIME=cpu deploy/docker/install.sh /src /opt/mirrorgate

# ---- slim gateway virtual environment: the core install plus psycopg ---------------------
FROM source AS build-gateway
ENV PIP_NO_CACHE_DIR=1
RUN MIRRORGATE_TORCH=none MIRRORGATE_ONNXRUNTIME=none deploy/docker/install.sh /src /opt/mirrorgate

# ---- CUDA virtual environment: onnxruntime-gpu + torch's CUDA build ---------------------
# Both bring the CUDA runtime and cuDNN as pip wheels (nvidia-*), so the base stays the
# plain Python image; the driver comes from the host through the NVIDIA container toolkit.
FROM source AS build-cuda
ARG TORCH_VERSION=2.13.0
ARG ONNXRUNTIME_GPU_VERSION=>=1.20
ENV PIP_NO_CACHE_DIR=1
RUN MIRRORGATE_TORCH=cuda MIRRORGATE_ONNXRUNTIME=gpu deploy/docker/install.sh /src /opt/mirrorgate

# ---- what every runtime image shares ------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-base
# A fixed numeric uid so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 mirrorgate \
 && useradd --system --uid 10001 --gid mirrorgate --home-dir /var/lib/mirrorgate \
      --create-home --shell /usr/sbin/nologin mirrorgate
COPY deploy/docker/mirrorgate.yaml /etc/mirrorgate/mirrorgate.yaml
COPY deploy/docker/healthcheck.py /usr/local/lib/mirrorgate/healthcheck.py
ENV PATH=/opt/mirrorgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The working directory holds the default SQLite file; production uses PostgreSQL.
WORKDIR /var/lib/mirrorgate
USER 10001:10001
EXPOSE 8080
# Docker's own check; Kubernetes uses the probes in deploy/kubernetes/deployment.yaml.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "/usr/local/lib/mirrorgate/healthcheck.py"]
# SIGTERM starts the drain bounded by server.shutdown_timeout_s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mirrorgate"]
CMD ["serve", "--config", "/etc/mirrorgate/mirrorgate.yaml"]

# ---- CUDA image ---------------------------------------------------------------------------
FROM runtime-base AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/opt/mirrorgate/lib/python3.11/site-packages/nvidia/cudnn/lib:/opt/mirrorgate/lib/python3.11/site-packages/nvidia/cublas/lib:/opt/mirrorgate/lib/python3.11/site-packages/nvidia/cuda_runtime/lib:/opt/mirrorgate/lib/python3.11/site-packages/nvidia/cufft/lib:/opt/mirrorgate/lib/python3.11/site-packages/nvidia/curand/lib:/opt/mirrorgate/lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib
COPY --from=build-cuda /opt/mirrorgate /opt/mirrorgate

# ---- slim gateway image: serves `http` backends (Triton, KServe, MLServer) -------------
FROM runtime-base AS gateway
COPY --from=build-gateway /opt/mirrorgate /opt/mirrorgate

# ---- Flagger loadtester that can run `mirrorgate suite run` (deploy/flagger/) ------------
FROM ${FLAGGER_LOADTESTER_IMAGE} AS flagger-loadtester-upstream

FROM runtime-base AS flagger-loadtester
USER 0
# curl for the verdict webhooks; the loadtester's bash tasks run in this image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=flagger-loadtester-upstream /home/app/loadtester /usr/local/bin/flagger-loadtester
COPY --from=build-cpu /opt/mirrorgate /opt/mirrorgate
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["flagger-loadtester"]
CMD ["-port=8080", "-log-level=info", "-timeout=1h"]

# ---- CPU image: the default target, so it stays last -----------------------------------
FROM runtime-base AS runtime
COPY --from=build-cpu /opt/mirrorgate /opt/mirrorgate
