# One image for both roles; the compose command picks the role (docker-compose.yml, docs/compose.md).
# CPU build by default. The CUDA image (docker-compose.gpu.yml does this, tagged specdec:cu128):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t specdec:cu128 .
# Linted by hadolint in tests/test_deploy_compose.py (no ignores).
FROM python:3.11-slim

# torch comes first, from the index of the build wanted (CPU or a CUDA version); `.[server]` then keeps it
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPECDEC_HOME=/models

WORKDIR /app

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY protos protos
COPY specdec specdec
COPY specdec_core specdec_core
COPY drafter_service drafter_service
COPY verifier_service verifier_service
COPY client client
COPY benchmarks benchmarks

# `pip install .` is the light gRPC client; the servers need the `server` extra (transformers, ...). The
# import check (-P: from the installed package, not from /app) fails the build if the servers' dependencies
# did not come with it. `./[server]` is `.[server]` spelled as a path hadolint knows to be local (DL3013
# asks packages from an index for pins, not the project being built).
RUN pip install --no-cache-dir "./[server]" \
    && python -P -c "import torch, transformers, specdec.v1.specdec_pb2_grpc, verifier_service.server, drafter_service.server"

# Run as an unprivileged user. /models belongs to it, so a named volume mounted there (docker-compose's
# `models`) is created writable for it; a bind mount must be owned by uid 10001 on the host.
RUN groupadd --system --gid 10001 specdec \
    && useradd --system --uid 10001 --gid specdec --create-home --home-dir /home/specdec specdec \
    && mkdir -p /models \
    && chown specdec:specdec /models
USER 10001:10001

# Health checks are in docker-compose.yml (`specdec health --address ...`: grpc.health.v1, TLS-aware).
ENTRYPOINT ["specdec"]
