"""What streaming on a time quantum costs (``serve-verifier --stream-quantum-ms``, docs/reliability.md).

One drafter service and one verifier per quantum (0 = a message per round), all up at once; every prompt
goes to each verifier in turn, so the machine's drift weighs on all alike. Reported per quantum: time to
the first token (p50), tokens per second over the whole generation, and messages per generation.
Run: ``python -m benchmarks.stream_quantum --out docs/results/stream_quantum.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPTS = ("def quicksort(items):\n", "Write a Python function that parses an ISO date.", "class Stack:\n",
           "import json\n\ndef load(path):\n")  # fmt: skip


def stream_one(address: str, prompt: str, max_new: int) -> dict:
    from client import SpecDecClient

    with SpecDecClient(address) as client:
        t0, first, tokens, messages = time.perf_counter(), None, 0, 0
        for piece in client.stream(prompt, max_new_tokens=max_new, ignore_eos=True):
            if piece.token_ids and first is None:
                first = time.perf_counter() - t0
            tokens += len(piece.token_ids)
            messages += 1
        wall = time.perf_counter() - t0
    return {"ttft_s": first, "tok_s": tokens / wall, "messages": messages}


def main(argv: list[str] | None = None) -> int:
    from client.local import launch

    p = argparse.ArgumentParser(prog="python -m benchmarks.stream_quantum", description=__doc__)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--drafter", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--quanta-ms", default="0,100,250")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--out", default="bench-results/stream_quantum.json")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - the services' log for the whole run
    drafter = launch("drafter", a.drafter, log_file=log)
    quanta = [int(q) for q in a.quanta_ms.split(",")]
    verifiers = {q: launch("verifier", a.target, args=["--drafter", drafter.address,
                                                       "--stream-quantum-ms", str(q)], log_file=log)
                 for q in quanta}  # fmt: skip
    rows: dict[int, list[dict]] = {q: [] for q in quanta}
    try:
        for turn, prompt in enumerate(PROMPTS * a.repeats):
            # the order rotates: whoever goes first pays for the prompt in the shared drafter's cache
            for q in quanta[turn % len(quanta) :] + quanta[: turn % len(quanta)]:
                rows[q].append(stream_one(verifiers[q].address, prompt, a.max_new))
    finally:
        for verifier in verifiers.values():
            verifier.stop()
        drafter.stop()
    summary = {
        q: {
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in got),
            "tok_s": statistics.mean(r["tok_s"] for r in got),
            "messages": statistics.mean(r["messages"] for r in got),
            "runs": got,
        }  # fmt: skip
        for q, got in rows.items()
    }
    for q, s in summary.items():
        print(f"quantum {q} ms: TTFT p50 {s['ttft_p50_s']:.3f} s, {s['tok_s']:.2f} tok/s, "
              f"{s['messages']:.1f} messages per generation")  # fmt: skip
    out.write_text(json.dumps({"args": vars(a), "quanta": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
