#!/usr/bin/env bash
# CMake flags for ggml on this CPU, shared by the llama-cpp-python build (scripts/build_llamacpp.sh) and the
# llama-server peer (scripts/build_llama_server.sh). On x86_64 the SIMD extensions are named one by one
# from /proc/cpuinfo with AMX off: some VMs list AMX but fault on its instructions (SIGILL in
# ggml_backend_amx_mul_mat), so GGML_NATIVE (which would pick it) stays off there. Elsewhere: native.
set -euo pipefail
if [ "$(uname -m)" != "x86_64" ]; then
    echo "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF"
    exit 0
fi
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
echo "-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DLLAMA_CURL=OFF" \
    "-DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)" \
    "-DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)" \
    "-DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)" \
    "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
