"""What the drafting file buys the 0.5B drafter on llama.cpp (`python -m benchmarks.drafting_file`;
docs/serving.md, "The drafting file").

Three files of the same drafter, loaded side by side in one process: the GGUF as it is (Q4_K_M), its Q4_0
requantization with the whole LM head, and the drafting file (Q4_0, the head cut to ``--head-rows``
tokens). For each: the median time of a drafting step (one position after a 300-token context, the
drafting steps of the three files interleaved so the machine's drift weighs on all), and how often its
greedy token is the target's: the target (the verifier's runner, batch invariant) writes ``--max-new``
greedy tokens for every prompt of benchmarks/prompts.json, and each drafter reads prompt and continuation
in one forward, its argmax at each position compared with the target's next token (what a greedy round
would accept, position by position), plus the share of the target's tokens its head holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def measure(target: str, drafter: str, head_rows: int, max_new: int, steps: int) -> dict:
    from specdec_core import models
    from specdec_core.runtime.backends import draft_file
    from specdec_core.runtime.backends.llamacpp import LlamaCppRunner, init_backend

    init_backend()
    src = models.gguf_path(drafter)
    cache = models.cache_root() / "drafting"
    files = {
        "gguf as is": src,
        "q4_0, whole head": draft_file.derive(src, cache, "q4_0", 0),
        f"q4_0, head {head_rows}": draft_file.derive(src, cache, "q4_0", head_rows),
    }
    runners = {
        name: LlamaCppRunner(path, slots=2, context=4096, invariant=False) for name, path in files.items()
    }
    times = step_times(runners, steps)
    agree, held = agreement(runners, target, max_new)
    return {
        name: {
            "step_ms": round(1000 * sorted(t)[len(t) // 2], 1),
            "agreement": round(agree[name][0] / agree[name][1], 4),
            "head_holds": round(held[name][0] / held[name][1], 4),
            "file_mb": round(files[name].stat().st_size / 2**20),
        }
        for name, t in times.items()
    }


def step_times(runners: dict, steps: int) -> dict[str, list[float]]:
    """Seconds of each drafting step per runner, the runners' steps interleaved."""
    context = [(1000 + 7 * i) % 30000 for i in range(300)]
    seqs = {name: r.new_sequence() for name, r in runners.items()}
    for name, r in runners.items():
        r.prefill(seqs[name], context)
    times: dict[str, list[float]] = {name: [] for name in runners}
    token = 2000
    for _ in range(steps):
        for name, r in runners.items():
            t0 = time.perf_counter()
            logits = r.extend(seqs[name], [token])
            times[name].append(time.perf_counter() - t0)
        token = int(logits.argmax())
    for name, r in runners.items():
        r.release(seqs[name])
    return times


def agreement(runners: dict, target: str, max_new: int) -> tuple[dict, dict]:
    """Per runner: [greedy tokens equal to the target's next token, tokens] and [target tokens its head
    holds, tokens], over the target's greedy continuations of benchmarks/prompts.json."""
    import torch

    from specdec_core import models
    from specdec_core.runtime.backends.llamacpp import LlamaCppRunner

    spec = json.loads((Path(__file__).parent / "prompts.json").read_text())
    tok = models.load_tokenizer(target)
    verifier = LlamaCppRunner(models.gguf_path(target), slots=2, context=4096)
    agree = {name: [0, 0] for name in runners}
    held = {name: [0, 0] for name in runners}
    for p in spec["prompts"]:
        text = tok.apply_chat_template([{"role": "user", "content": p["text"]}], tokenize=False,
                                       add_generation_prompt=True) if p["chat"] else p["text"]  # fmt: skip
        ids = tok(text)["input_ids"]
        seq = verifier.new_sequence()
        logits = verifier.extend(seq, ids)
        out = []
        for _ in range(max_new):
            out.append(int(logits.reshape(-1, logits.shape[-1])[-1].argmax()))
            logits = verifier.extend(seq, out[-1:])
        verifier.release(seq)
        for name, r in runners.items():
            s = r.new_sequence()
            guesses = r.extend(s, ids + out[:-1], keep=len(out)).argmax(-1).tolist()
            r.release(s)
            agree[name][0] += sum(g == t for g, t in zip(guesses, out))
            agree[name][1] += len(out)
            head = r.llama.head
            held[name][0] += (
                len(out) if head is None else int(torch.isin(torch.tensor(out), torch.from_numpy(head)).sum())
            )
            held[name][1] += len(out)
    return agree, held


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--drafter", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--head-rows", type=int, default=32768)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="bench-results/drafting_file.json")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    result = measure(a.target, a.drafter, a.head_rows, a.max_new, a.steps)
    print("| drafter file | step ms | agreement with the target's greedy | target tokens in its head | MB |")
    print("|---|---|---|---|---|")
    for name, row in result.items():
        print(
            f"| {name} | {row['step_ms']:.1f} | {row['agreement']:.3f} | {row['head_holds']:.3f} | {row['file_mb']} |"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python -m benchmarks.drafting_file", *argv]),
                               "results": result}, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
