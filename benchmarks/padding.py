"""What padding a forward to a group of 4 positions buys on the llama.cpp runner (`python -m
benchmarks.padding`; docs/serving.md, "Padding").

Forwards of 1-9 positions of one sequence, and of 2 and 3 sequences decoding one position each, after a
200-token prompt, with ``padded_width`` on and off (the runner's ``pad`` switch, toggled in one process,
the settings interleaved forward by forward so the machine's drift weighs on both). Medians, ms.
"""

from __future__ import annotations

import argparse
import json
import time


def measure(model: str, repeats: int) -> dict:
    from specdec_core import models
    from specdec_core.runtime.backends.llamacpp import LlamaCppRunner
    from specdec_core.runtime.interface import Row

    runner = LlamaCppRunner(models.gguf_path(model), slots=4, context=4096)
    prompt = [(1000 + 7 * i) % 30000 for i in range(200)]
    seqs = [runner.new_sequence() for _ in range(3)]
    for s in seqs:
        runner.prefill(s, prompt)
    shapes = [(1, w) for w in range(1, 10)] + [(2, 1), (3, 1)]
    times: dict = {pad: {shape: [] for shape in shapes} for pad in (True, False)}
    for _ in range(repeats):
        for shape in shapes:
            for pad in (True, False):
                batch, width = shape
                runner.pad = pad
                rows = [Row(s, [2000 + j for j in range(width)], keep=width) for s in seqs[:batch]]
                t0 = time.perf_counter()
                runner.forward(rows)
                times[pad][shape].append(time.perf_counter() - t0)
                for s in seqs[:batch]:
                    runner.rollback(s, len(prompt))
    return {
        ("padded" if pad else "not padded"): {
            f"{b}x{w}": round(1000 * sorted(t)[len(t) // 2], 1) for (b, w), t in by_shape.items()
        }
        for pad, by_shape in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default="bench-results/padding.json")
    a = p.parse_args(argv)
    result = measure(a.model, a.repeats)
    shapes = list(result["padded"])
    print("| setting | " + " | ".join(shapes) + " |")
    print("|---" * (len(shapes) + 1) + "|")
    for name, row in result.items():
        print(f"| {name} | " + " | ".join(f"{row[s]:.0f}" for s in shapes) + " |")
    from pathlib import Path

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": a.model, "repeats": a.repeats, "ms": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
