# One image for both roles and the OpenAI frontend; the compose command picks the role (docker-compose.yml,
# docs/compose.md). CPU build by default. The CUDA image (docker-compose.gpu.yml does this, tagged specdec:cu128):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t specdec:cu128 .
# scripts/compose.sh builds it with podman or Docker, from a base image made of Debian's packages where no
# registry is reachable. Linted by hadolint in tests/test_deploy_compose.py.
#
# Two stages: `build` fills a virtual environment at /opt/venv (compilers, wheels, the llama.cpp build); the
# image keeps only that environment, on the same base.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build

# torch comes first, from the index of the build wanted (CPU or a CUDA version), or from a wheel staged in
# deploy/wheels (TORCH_WHEEL: its file name); `.[server]` then keeps it
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_WHEEL=
# 1: llama.cpp (the CPU backend for GGUF models), from a wheel staged in deploy/wheels or compiled here
ARG LLAMACPP=1

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Compilers for llama.cpp; they stay in this stage. Versions come with BASE_IMAGE's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

COPY deploy/wheels /wheels
RUN if [ -n "${TORCH_WHEEL}" ]; then \
        pip install --no-cache-dir "/wheels/${TORCH_WHEEL}"; \
    else \
        pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"; \
    fi

# llama-cpp-python with the batch-invariance patches (scripts/build_llamacpp.sh): SIMD flags from this
# build host's CPU, so build the image on the kind of machine it will run on
COPY scripts/build_llamacpp.sh scripts/ggml_flags.sh scripts/patch_ggml_invariant.py scripts/patch_ggml_invariant_gemm.py scripts/patch_ggml_invariant_attn.py scripts/patch_ggml_q6k_columns.py scripts/patch_llama_head_rows.py scripts/
RUN if [ "${LLAMACPP}" != 1 ]; then \
        echo "LLAMACPP=${LLAMACPP}: no llama.cpp backend (every model runs on torch)"; \
    elif ls /wheels/llama_cpp_python-*.whl >/dev/null 2>&1; then \
        pip install --no-cache-dir /wheels/llama_cpp_python-*.whl; \
    else \
        SPECDEC_HOME=/tmp/llamacpp bash scripts/build_llamacpp.sh /opt/venv && rm -rf /tmp/llamacpp /root/.cache; \
    fi

# the dependencies of the servers and of the OpenAI frontend in a layer of their own (from pyproject.toml
# alone), then the project: a change to the code or the README rebuilds only the last layers
COPY pyproject.toml ./
COPY deploy/requirements.py deploy/
RUN python deploy/requirements.py server openai > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md ./
COPY protos protos
COPY specdec specdec
COPY specdec_core specdec_core
COPY drafter_service drafter_service
COPY verifier_service verifier_service
COPY client client
COPY benchmarks benchmarks
# `./[server,openai]` is `.[server,openai]` spelled as a path hadolint knows to be local (DL3013 asks
# packages from an index for pins, not the project being built)
RUN pip install --no-cache-dir "./[server,openai]"

FROM ${BASE_IMAGE}
ARG LLAMACPP=1

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    SPECDEC_HOME=/models

# llama.cpp's OpenMP runtime (torch carries its own). Versions come with BASE_IMAGE's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/venv /opt/venv

# The import check (-P: from the installed package, not from a source tree) fails the build if the servers'
# or the frontend's dependencies did not come with it, or llama.cpp's libraries do not load.
RUN python -P -c "import torch, transformers, fastapi, uvicorn, specdec.v1.specdec_pb2_grpc, verifier_service.server, drafter_service.server, client.openai_api" \
    && if [ "${LLAMACPP}" = 1 ]; then python -P -c "import llama_cpp"; fi

# Run as an unprivileged user. /models belongs to it, so a named volume mounted there (docker-compose's
# `models`) is created writable for it; a bind mount must be owned by uid 10001 on the host.
RUN groupadd --system --gid 10001 specdec \
    && useradd --system --uid 10001 --gid specdec --create-home --home-dir /home/specdec specdec \
    && mkdir -p /models \
    && chown specdec:specdec /models
USER 10001:10001

# Health checks are in docker-compose.yml (`specdec health --address ...`: grpc.health.v1, TLS-aware).
ENTRYPOINT ["specdec"]
