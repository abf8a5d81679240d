"""A multi-turn chat through the OpenAI API: time to first token per turn, prefix cache on and off, and
llama-server on the same GGUF files (which keeps each slot's last prompt by default).

Each turn resends the whole conversation and adds a user message pasting a different function of this
repository (of similar size) with a question about it; the reply (greedy, streamed) joins the history.
Every system answers with its own replies, as a chat does. Reported per turn: prompt tokens, cached
tokens (specdec's ``usage.prompt_tokens_details``), time to first token, and the reply's tokens per
second. Run: ``python -m benchmarks.chat_turns --out docs/results/chat_turns.json``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

from . import servers

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("specdec", "specdec-no-draft", "specdec-stock", "specdec-no-cache", "llama")
SOURCES = (  # functions of this repository of similar size (270-290 tokens each), pasted one per turn
    ("specdec_core/runtime/admission.py", "slot"),
    ("specdec_core/runtime/factory.py", "choose_backend"),
    ("specdec_core/runtime/scheduler.py", "_forward"),
    ("specdec_core/draft_length/probing.py", "interval"),
    ("specdec_core/drafting.py", "_steps"),
    ("specdec_core/decoder.py", "commit"),
)


def snippets() -> list[str]:
    out = []
    for path, name in SOURCES:
        text = (ROOT / path).read_text()
        node = next(
            n
            for n in ast.walk(ast.parse(text))
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name
        )
        out.append("\n".join(text.splitlines()[node.lineno - 1 : node.end_lineno]))
    return out


def chat_turn(base: str, messages: list[dict], max_tokens: int, user: str, extra: dict | None = None) -> dict:
    """One streamed chat request: its reply, time to first content, usage."""
    body = {"model": servers.served_model(base), "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "user": user, **(extra or {})}  # fmt: skip
    row = servers.stream_chat(base, body)
    first, wall, completion = row["ttft_s"], row["wall_s"], row["completion_tokens"]
    row["decode_tok_s"] = (completion - 1) / (wall - first) if wall > first and completion > 1 else 0.0
    row["reply"] = row.pop("text")
    return row


def conversation(base: str, turns: int, max_tokens: int, user: str, extra: dict) -> list[dict]:
    messages: list[dict] = [{"role": "system", "content": "You are a careful senior Python reviewer."}]
    rows = []
    for i, code in enumerate(snippets()[:turns]):
        ask = "Explain what this function does" if i == 0 else "Now this one: what does it do"
        messages.append({"role": "user", "content": f"{ask}, in two sentences?\n\n```python\n{code}\n```"})
        row = chat_turn(base, messages, max_tokens, user, extra)
        messages.append({"role": "assistant", "content": row["reply"]})
        rows.append(row)
        cached = row["cached_tokens"]
        print(
            f"    turn {i + 1}: prompt {row['prompt_tokens']:5d} tokens"
            + (f" ({cached} cached)" if cached is not None else "")
            + f", first token {row['ttft_s']:6.2f} s, reply {row['decode_tok_s']:5.2f} tok/s",
            flush=True,
        )
    return rows


def start(a, config: str, port: int, log) -> list:
    if config == "llama":  # one slot for the one conversation, the cells of specdec's default cache
        return [
            servers.start_llama(a.target, port, log, a.threads, ["-np", "1", "-c", "16384"], a.llama_server)
        ]
    extra = ["--prefix-cache-tokens", "0"] if config == "specdec-no-cache" else []
    kernels = ["--no-batch-invariant"] if config == "specdec-stock" else []  # llama.cpp's stock kernels
    return servers.start_specdec(a.target, a.drafter, port, log, [*extra, *kernels], extra)


def measure(a, config: str, log) -> list[dict]:
    from client.local import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs = start(a, config, port, log)
    try:
        servers.wait_ready(base, procs)
        chat_turn(base, [{"role": "user", "content": "Say hi."}], 4, "warm-up")  # load, first-call costs
        print(f"  {config}", flush=True)
        extra = {"no_draft": True} if config == "specdec-no-draft" else {}
        return conversation(base, a.turns, a.max_tokens, "bench", extra)
    finally:
        servers.stop(procs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.chat_turns", description=__doc__)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--drafter", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama-server -t")
    p.add_argument(
        "--llama-server", default="", help="a llama-server binary (default: as the peer benchmark)"
    )
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default="bench-results/chat_turns.json")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(a), "cpus": len(os.sched_getaffinity(0)), "configs": {}}
    with open(out.with_suffix(".log"), "w") as log:
        for config in a.configs.split(","):
            results["configs"][config] = measure(a, config, log)
            out.write_text(json.dumps(results, indent=1))
    print("\nturn  " + "  ".join(f"{c:>18s}" for c in results["configs"]))
    for i in range(a.turns):
        cells = [
            f"{rows[i]['ttft_s']:8.2f} s ({rows[i]['prompt_tokens']:4d})"
            for rows in results["configs"].values()
        ]
        print(f"{i + 1:4d}  " + "  ".join(f"{c:>18s}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
