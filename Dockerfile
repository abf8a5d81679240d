# One image for both roles; the command picks the role (see docker-compose.yml).
# CPU build by default; for GPUs pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 SPECDEC_HOME=/models
WORKDIR /app
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==2.13.0
COPY pyproject.toml README.md ./
COPY protos protos
COPY specdec specdec
COPY specdec_core specdec_core
COPY drafter_service drafter_service
COPY verifier_service verifier_service
COPY client client
COPY benchmarks benchmarks
COPY scripts scripts
RUN pip install --no-cache-dir . && python -c "import specdec.v1.specdec_pb2_grpc"
ENTRYPOINT ["specdec"]
