"""The verify slope: what a forward of 1, 2, 4, 8, 16 positions costs, for one sequence and for 8 sequences
at once, per execution path (`python -m benchmarks.slope`).

It decides speculation on CPUs: a round pays k drafting steps and one verify of k + 1 positions. Each
llama.cpp kernel setting runs in its own process (ggml reads it once): the verifier's batch-invariant
kernels on the patched build (``scripts/patch_ggml_invariant.py``), the same without the Q6_K 4-position
kernel (``scripts/patch_ggml_q6k_columns.py``), with stock settings, and ``llama.cpp default`` (what
llama-server runs: repacked GEMV or GEMM by width, the tiled K-quant kernel from 8 positions).
Medians of ``--repeats`` forwards after a 200-token prompt per sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WIDTHS = (1, 2, 4, 8, 16)
MODES = {
    "invariant (patched build)": {"GGML_CPU_TILED_MM": "0", "GGML_CPU_BATCH_INVARIANT": "1"},
    # scripts/patch_ggml_q6k_columns.py off: Q6_K one position at a time, as stock ggml
    "invariant, Q6_K by position": {
        "GGML_CPU_TILED_MM": "0",
        "GGML_CPU_BATCH_INVARIANT": "1",
        "GGML_CPU_Q6K_X4": "0",
    },
    "invariant (stock settings)": {"GGML_CPU_TILED_MM": "0", "GGML_CPU_Q6K_X4": "0"},
    "llama.cpp default": {"GGML_CPU_Q6K_X4": "0"},
}


def measure(model: str, repeats: int, mode: str) -> dict:
    """This process's slope (the kernel setting is in its environment; the stock settings also need the
    runner's careful mode: no repacked weights, small micro-batches, no lone query)."""
    from specdec_core import models
    from specdec_core.runtime.backends.llamacpp import LlamaCppRunner
    from specdec_core.runtime.interface import Row

    careful = mode == "invariant (stock settings)"
    runner = LlamaCppRunner(models.gguf_path(model), slots=9, context=8192, invariant=careful, patched=False)
    prompt = [(1000 + 7 * i) % 30000 for i in range(200)]
    seqs = [runner.new_sequence() for _ in range(8)]
    for s in seqs:
        runner.prefill(s, prompt)
    out: dict = {}
    for batch in (1, 8):
        for width in WIDTHS:
            times = []
            for _ in range(repeats):
                rows = [Row(s, [2000 + j for j in range(width)], keep=width) for s in seqs[:batch]]
                t0 = time.perf_counter()
                runner.forward(rows)
                times.append(time.perf_counter() - t0)
                for s in seqs[:batch]:
                    runner.rollback(s, len(prompt))
            out[f"{batch}x{width}"] = 1000 * sorted(times)[len(times) // 2]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)  # a child process's own setting
    p.add_argument("--out", default="bench-results/slope.json")
    a = p.parse_args(argv)
    if a.mode:
        print(json.dumps(measure(a.model, a.repeats, a.mode)))
        return 0
    results = {}
    for mode, env in MODES.items():
        cmd = [sys.executable, "-m", "benchmarks.slope", "--model", a.model, "--repeats", str(a.repeats)]
        run = subprocess.run(
            cmd + ["--mode", mode], env={**os.environ, **env}, capture_output=True, text=True
        )
        if run.returncode:
            raise RuntimeError(run.stderr[-2000:])
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{a.model}, llama.cpp, ms per forward (x decode step of 1 position)\n")
    print("| kernels | " + " | ".join(f"{b}x{w}" for b in (1, 8) for w in WIDTHS) + " |")
    print("|---" * (1 + 2 * len(WIDTHS)) + "|")
    for mode, row in results.items():
        base = row["1x1"]
        cells = [f"{row[f'{b}x{w}']:.0f} ({row[f'{b}x{w}'] / base:.1f}x)" for b in (1, 8) for w in WIDTHS]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"model": a.model, "ms": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
