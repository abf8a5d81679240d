#!/bin/sh
# The wheels the GPU check needs beyond the device machine's image (PyTorch, transformers 5.17, grpcio of its
# own version, no network there; /work/.library/device/KINDS.md lists it): this project's gRPC runtime at the
# versions its committed stubs were generated for. Run here, where PyPI answers; it fills .whl/ (git-ignored),
# which the device run carries and benchmarks/gpu_run.sh installs. transformers stays the image's: the tests
# pass on 5.17 too (PYTHONPATH overlay of transformers 5.17.0 + huggingface_hub 1.33.0, this project's suite).
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl \
    "grpcio==$(version grpcio)" "grpcio-health-checking==$(version grpcio-health-checking)" \
    "grpcio-reflection==$(version grpcio-reflection)" "protobuf==$(version protobuf)"
ls -la .whl
