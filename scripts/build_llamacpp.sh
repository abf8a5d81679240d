#!/usr/bin/env bash
# llama-cpp-python (the llama.cpp backend, specdec_core/runtime/backends/llamacpp.py) compiled for this CPU
# with the batch-invariance patches (scripts/patch_ggml_invariant.py, then patch_ggml_invariant_gemm.py and
# patch_ggml_invariant_attn.py; off unless GGML_CPU_BATCH_INVARIANT=1, which the verifier's runner sets)
# and the Q6_K 4-position kernel (patch_ggml_q6k_columns.py; the same bits, on in every process), and the
# drafting file's cut LM head (patch_llama_head_rows.py; only files that carry specdec.head_rows), once,
# cached as a wheel under $SPECDEC_HOME/wheels, then installed into the venv given (default .venv). A fresh
# 2-core machine compiles it in about 4-7 minutes; later setups reuse the wheel. SPECDEC_LLAMACPP=0 skips it
# (the services then run every model on torch).
# `build_llamacpp.sh --print-wheel` prints the cached wheel's path, if any, and builds nothing (scripts/compose.sh).
set -euo pipefail
VENV=${1:-.venv}
VERSION=0.3.36
PATCH=invariant5  # bump when scripts/patch_*.py change
here="$(cd "$(dirname "$0")" && pwd)"
if [ "${SPECDEC_LLAMACPP:-1}" = "0" ]; then
    echo "SPECDEC_LLAMACPP=0: llama-cpp-python not installed (torch backend only)"
    exit 0
fi
cache="${SPECDEC_HOME:-$HOME/.cache/specdec}/wheels/llama-cpp-$VERSION-$PATCH-$(uname -m)"
if [ "$VENV" = "--print-wheel" ]; then
    ls "$cache"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1
    exit 0
fi
mkdir -p "$cache"
wheel=$(ls "$cache"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $VERSION for this CPU (about 7 minutes on 2 cores, once)"
    start=$(date +%s)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$VENV/bin/python" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$work" \
        "llama-cpp-python==$VERSION"
    tar -xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
    "$VENV/bin/python" "$here/patch_ggml_invariant.py" "$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
    "$VENV/bin/python" "$here/patch_ggml_invariant_gemm.py" "$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
    "$VENV/bin/python" "$here/patch_ggml_invariant_attn.py" "$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
    "$VENV/bin/python" "$here/patch_ggml_q6k_columns.py" "$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
    "$VENV/bin/python" "$here/patch_llama_head_rows.py" "$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
    CMAKE_ARGS="$(bash "$here/ggml_flags.sh")" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$VENV/bin/python" -m pip wheel -q --no-deps -w "$cache" "$work/llama_cpp_python-$VERSION"
    wheel=$(ls "$cache"/llama_cpp_python-"$VERSION"-*.whl | head -1)
    echo "built $(basename "$wheel") in $(( $(date +%s) - start )) s"
fi
"$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$wheel"
"$VENV/bin/python" -m pip install -q "$wheel"
