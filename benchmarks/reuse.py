"""What reusing earlier requests' work is worth, through the OpenAI API on the real pair (issue #21).

* ``--workload shared-prompt``: 8 clients at once, each sending one chat request that starts with the
  same ~1,000-token system prompt (after one warm-up request with it, as a deployment's earlier traffic
  would have made), 32 reply tokens: time to first token p50 and aggregate tokens per second, specdec
  with its prefix cache on and off, and llama-server (``-np 8``).
* ``--workload json``: 16 requests in sequence, each asking for the same JSON shape about a different
  person: tokens per second over requests 2-16, specdec's prompt lookup (``drafter: "ngram"``) with the
  cross-request index (``--lookup-index-tokens``) and on the current request alone, specdec's default
  drafter, and llama-server with its ``ngram-cache`` speculation. Interleaved: every system is up at
  once (idle while another answers), and each request goes to each of them in turn, the order rotating
  from one request to the next, so that this shared machine's drift weighs on all of them alike.

Greedy; every system answers with its own outputs. Run:
``python -m benchmarks.reuse --workload json --out docs/results/reuse_json.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from . import servers

NAMES = ["Ada Moreau", "Bram Kovac", "Chen Liu", "Dara Okafor", "Emil Strand", "Fatima Haddad", "Goran Ilic",
         "Hana Sato", "Ivan Petrov", "Jule Weber", "Kofi Mensah", "Lena Novak", "Mateo Ruiz", "Nia Brooks",
         "Omar Farouk", "Priya Nair"]  # fmt: skip
CITIES = ["Lyon", "Zagreb", "Chengdu", "Lagos", "Bergen", "Beirut", "Split", "Kyoto"]
JOBS = ["a nurse", "a welder", "a data analyst", "a teacher", "a pilot", "an architect", "a chef", "a lawyer"]
HOBBIES = ["chess", "climbing", "baking", "cycling", "painting", "sailing", "gardening", "running"]
JSON_ASK = (
    "Return only a JSON object with the keys name, age, city, occupation and hobbies (a list) for this "
    "person:\n{bio}"
)
WORKLOADS = {
    "shared-prompt": ("specdec", "specdec-no-cache", "llama"),
    "json": ("specdec-lookup-index", "specdec-lookup", "specdec", "llama-ngram-cache"),
}


def bios() -> list[str]:
    return [
        f"{name} is {24 + 3 * i} years old and lives in {CITIES[i % 8]}, where {name.split()[0]} works as "
        f"{JOBS[(i * 3) % 8]}. In the evenings {name.split()[0]} enjoys {HOBBIES[i % 8]} and "
        f"{HOBBIES[(i + 3) % 8]}."
        for i, name in enumerate(NAMES)
    ]


def system_prompt() -> str:
    """About 1,000 tokens of house rules (this repository's README, from its top)."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return "You answer questions about the specdec project. Its README:\n\n" + text[:3900]


def chat(base: str, model: str, messages: list[dict], max_tokens: int, extra: dict) -> dict:
    """One streamed chat request (servers.stream_chat)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
    return servers.stream_chat(base, body)


def shared_prompt(base: str, model: str, extra: dict) -> dict:
    system = {"role": "system", "content": system_prompt()}
    questions = [f"In one sentence: what does section {i + 1} of the README cover?" for i in range(8)]
    chat(base, model, [system, {"role": "user", "content": "Say ready."}], 4, extra)  # earlier traffic
    rows: list[dict] = [{} for _ in questions]

    def client(i: int) -> None:
        rows[i] = chat(base, model, [system, {"role": "user", "content": questions[i]}], 32, extra)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"ttft_p50_s": statistics.median(r["ttft_s"] for r in rows),
            "tok_s": sum(r["completion_tokens"] for r in rows) / wall, "requests": rows}  # fmt: skip


def json_requests(targets: dict[str, tuple[str, str]]) -> dict[str, dict]:
    """The 16 requests, each sent to every config of ``targets`` (name -> (base URL, model)) in turn."""
    names = list(targets)
    rows: dict[str, list[dict]] = {name: [] for name in names}
    for i, bio in enumerate(bios()):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            base, model = targets[name]
            ask = [{"role": "user", "content": JSON_ASK.format(bio=bio)}]
            row = chat(base, model, ask, 96, {})
            rows[name].append(row)
            print(f"    {i + 1:2d} {name}: {row['completion_tokens']} tokens, "
                  f"{row['completion_tokens'] / row['wall_s']:.2f} tok/s", flush=True)  # fmt: skip
    return {
        name: {
            "tok_s_2_16": sum(r["completion_tokens"] for r in got[1:]) / sum(r["wall_s"] for r in got[1:]),
            "tok_s_9_16": sum(r["completion_tokens"] for r in got[8:]) / sum(r["wall_s"] for r in got[8:]),
            "requests": got,
        }  # fmt: skip
        for name, got in rows.items()
    }


def start(a, config: str, port: int, log) -> list:
    if config.startswith("llama"):
        args = ["-np", "8", "-c", "16384"] if a.workload == "shared-prompt" else ["-np", "1", "-c", "8192"]
        if config == "llama-ngram-cache":
            args += ["--spec-type", "ngram-cache"]
        return [servers.start_llama(a.target, port, log, a.threads, args, a.llama_server)]
    off = ["--prefix-cache-tokens", "0"] if config == "specdec-no-cache" else []
    index = ["--lookup-index-tokens", "0"] if config == "specdec-lookup" else []
    lookup = "ngram" if config.startswith("specdec-lookup") else ""
    return servers.start_specdec(a.target, a.drafter, port, log, [*off, *index], off, lookup)


def measure(a, config: str, log) -> dict:
    from client.local import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs = start(a, config, port, log)
    try:
        servers.wait_ready(base, procs)
        print(f"  {config}", flush=True)
        return shared_prompt(base, servers.served_model(base), {})
    finally:
        servers.stop(procs)


def measure_interleaved(a, configs: list[str], log) -> dict[str, dict]:
    from client.local import free_port

    procs: list = []
    targets: dict[str, tuple[str, str]] = {}
    try:
        for config in configs:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            started = start(a, config, port, log)
            procs += started
            servers.wait_ready(base, started)
            targets[config] = (base, servers.served_model(base))
        return json_requests(targets)
    finally:
        servers.stop(procs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reuse", description=__doc__)
    p.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--drafter", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama-server -t")
    p.add_argument(
        "--llama-server", default="", help="a llama-server binary (default: as the peer benchmark)"
    )
    p.add_argument("--configs", default="", help="comma-separated (default: all of the workload's)")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    out = Path(a.out or f"bench-results/reuse_{a.workload}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(a), "cpus": len(os.sched_getaffinity(0)), "configs": {}}
    configs = a.configs.split(",") if a.configs else list(WORKLOADS[a.workload])
    with open(out.with_suffix(".log"), "w") as log:
        if a.workload == "json":
            results["configs"] = measure_interleaved(a, configs, log)
        for config in configs if a.workload != "json" else []:
            results["configs"][config] = measure(a, config, log)
            out.write_text(json.dumps(results, indent=1))
    for config, row in results["configs"].items():
        print(f"  {config}: { ({k: v for k, v in row.items() if k != 'requests'}) }", flush=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
