#!/usr/bin/env bash
# llama-server and llama-bench, the peer of `specdec bench --peer llama.cpp`, built from the llama.cpp
# source that the pinned llama-cpp-python sdist vendors (the very kernels the llamacpp backend runs), with
# the same CPU flags. Installed under $SPECDEC_HOME/llama.cpp/bin; prints the llama-server path.
# About 8 minutes on 2 cores, once.
set -euo pipefail
VERSION=0.3.36
home="${SPECDEC_HOME:-$HOME/.cache/specdec}/llama.cpp"
if [ -x "$home/bin/llama-server" ] && "$home/bin/llama-server" --version >/dev/null 2>&1; then
    echo "$home/bin/llama-server"
    exit 0
fi
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$work" "llama-cpp-python==$VERSION" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
# shellcheck disable=SC2046
# the binaries find their libraries beside them ($ORIGIN), not in the build tree this script deletes
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_OPENSSL=OFF \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' \
    $(bash "$(dirname "$0")/ggml_flags.sh") >&2
cmake --build "$work/build" -j "$(nproc)" --target llama-server llama-bench >&2
mkdir -p "$home/bin"
cp -P "$work"/build/bin/llama-server "$work"/build/bin/llama-bench "$work"/build/bin/*.so* "$home/bin/"
echo "$home/bin/llama-server"
