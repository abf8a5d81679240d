"""Patch the llama.cpp source vendored by llama-cpp-python so that, with GGML_CPU_BATCH_INVARIANT=1 in the
environment, a position's arithmetic on the CPU does not depend on how many positions share its forward.

Stock ggml picks kernels by batch width, and they round differently: repacked K-quant weights multiply
groups of 4 positions with a GEMM kernel and the rest with a GEMV kernel; flash attention splits a lone
query's KV across threads (512+ cells) and tiles 64+ queries. With the variable set:

* repacked weights: every position goes through the GEMV kernel (each weight chunk stays in cache while
  its positions run, so a few positions cost little more than one), quantized row by row;
* flash attention: the reference path (each query walks its own cells; the stock ``use_ref`` switch);

and the library exports ``ggml_cpu_specdec_batch_invariant`` so the runner can tell a patched build (the
tiled K-quant matmul is turned off by its own stock switch, GGML_CPU_TILED_MM=0). Without the variable the
build behaves as stock. Used by scripts/build_llamacpp.sh; fails loudly if the source moved.

Usage: python patch_ggml_invariant.py LLAMA_CPP_SOURCE_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

FLAG = """
static bool ggml_cpu_specdec_invariant_flag(void) {
    static const bool on = [] {
        const char * env = getenv("GGML_CPU_BATCH_INVARIANT");
        return env != nullptr && atoi(env) != 0;
    }();
    return on;
}
"""

EDITS = {
    "ggml/src/ggml-cpu/repack.cpp": [
        ("#include <cstring>\n", "#include <cstring>\n#include <cstdlib>\n" + FLAG),
        (
            "        if (nrows > 3) {\n",
            "        const int64_t nrows4 = ggml_cpu_specdec_invariant_flag() ? 0 : nrows - (nrows % 4);\n"
            "        if (nrows4 > 0) {\n",
        ),
        (
            "                                                             nrows - (nrows % 4), ncols);",
            "                                                             nrows4, ncols);",
        ),
        (
            "        for (int iter = nrows - (nrows % 4); iter < nrows; iter++) {",
            "        for (int iter = nrows4; iter < nrows; iter++) {",
        ),
        (
            "            for (int64_t i11 = ith * 4; i11 < ne11 - ne11 % 4; i11 += nth * 4) {",
            "            const int64_t n4 = ggml_cpu_specdec_invariant_flag() ? 0 : ne11 - ne11 % 4;\n"
            "            for (int64_t i11 = ith * 4; i11 < n4; i11 += nth * 4) {",
        ),
        (
            "            const int64_t i11_processed = ne11 - ne11 % 4;",
            "            const int64_t i11_processed = n4;",
        ),
    ],
    "ggml/src/ggml-cpu/ops.cpp": [
        ("#include <algorithm>\n", "#include <algorithm>\n#include <cstdlib>\n" + FLAG),
        (
            "    const bool use_ref = params->use_ref;\n",
            "    const bool use_ref = params->use_ref || ggml_cpu_specdec_invariant_flag();\n",
        ),
    ],
    "ggml/src/ggml-cpu/ggml-cpu.cpp": [
        (
            "void ggml_backend_cpu_set_use_ref(ggml_backend_t backend_cpu, bool use_ref) {",
            'extern "C" __attribute__((visibility("default"))) int ggml_cpu_specdec_batch_invariant(void);\n'
            "int ggml_cpu_specdec_batch_invariant(void) { return 1; }\n\n"
            "void ggml_backend_cpu_set_use_ref(ggml_backend_t backend_cpu, bool use_ref) {",
        ),
    ],
}


def apply(root: str, edits: dict[str, list[tuple[str, str]]], marker: str) -> None:
    """Make ``edits`` (file -> (old, new) pairs, each old text found exactly once) under ``root``; a file
    that already holds ``marker`` was patched before and is left alone. Fails loudly if the source moved."""
    for rel, pairs in edits.items():
        path = Path(root) / rel
        text = path.read_text()
        if marker in text:
            continue  # patched already
        for old, new in pairs:
            if text.count(old) != 1:
                raise SystemExit(f"{rel}: expected one {old.strip()[:60]!r}, found {text.count(old)}")
            text = text.replace(old, new)
        path.write_text(text)


def main(root: str) -> int:
    apply(root, EDITS, "ggml_cpu_specdec")
    print(f"patched {root} for GGML_CPU_BATCH_INVARIANT")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
