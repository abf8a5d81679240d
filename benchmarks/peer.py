"""specdec next to llama.cpp's server on the same GGUF files, through one OpenAI client (`specdec bench --peer
llama.cpp`).

Rows: llama-server target only, llama-server with its draft model (`--spec-draft-n-max`; with
``llama-draft-q4_0`` the drafter requantized to Q4_0 as specdec's drafting file is), specdec (both
services and `specdec serve-openai`, defaults) and specdec `--no-draft`, and the same two with the
verifier on llama.cpp's stock kernels (`--no-batch-invariant`). Each runs alone on the machine, one
after the other, with the same code prompts, greedy, `--max-new` tokens, EOS ignored, non-streaming
`/v1/completions`, at each client count (threads, each sending the prompts in turn). Reports aggregate
completion tokens per second, whether every row produced the same texts, and each server's resident memory.
llama-server is built by `scripts/build_llama_server.sh` from the source llama-cpp-python vendors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

from . import servers

# specdec-stock*: the verifier on llama.cpp's stock kernels (--no-batch-invariant)
# llama-draft-q4_0: llama-server drafting with the drafter requantized to Q4_0 as specdec's drafting file
# is (its whole LM head: llama-server cannot cut it)
CONFIGS = (
    "llama",
    "llama-draft",
    "llama-draft-q4_0",
    "specdec",
    "specdec-no-draft",
    "specdec-stock",
    "specdec-stock-no-draft",
)


def code_prompts(count: int) -> list[str]:
    spec = json.loads((Path(__file__).parent / "prompts.json").read_text())
    return [p["text"] for p in spec["prompts"] if not p["chat"]][:count]


def post(url: str, body: dict, timeout: float = 900.0) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def run_clients(base: str, prompts: list[str], clients: int, max_new: int, extra: dict) -> dict:
    """``clients`` threads, each sending every prompt in turn (a different first prompt each)."""
    with urllib.request.urlopen(base + "/v1/models", timeout=10) as resp:
        model = json.loads(resp.read())["data"][0]["id"]  # the name the server answers to
    texts: dict[str, str] = {}
    tokens = [0] * clients
    errors: list[str] = []

    def client(i: int) -> None:
        for j in range(len(prompts)):
            prompt = prompts[(i + j) % len(prompts)]
            body = {"model": model, "prompt": prompt, "max_tokens": max_new, "temperature": 0.0, **extra}
            body["ignore_eos"] = True
            try:
                out = post(base + "/v1/completions", body)
            except Exception as exc:  # recorded; the row is then not comparable
                errors.append(repr(exc))
                continue
            tokens[i] += int(out["usage"]["completion_tokens"])
            texts.setdefault(prompt, out["choices"][0]["text"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "tok_s": sum(tokens) / wall,
        "tokens": sum(tokens),
        "wall_s": wall,
        "texts": texts,
        "errors": errors,
    }


def measure(a, config: str, prompts: list[str], levels: list[int], log) -> dict:
    from client.local import free_port
    from specdec_core import models

    extra = {"no_draft": True} if config.endswith("no-draft") else {}
    if config.startswith("endpoint"):  # a stack already running (the compose stack's OpenAI port)
        run_clients(a.endpoint, prompts[:1], 1, 8, extra)  # warm-up
        return {"levels": measure_levels(a.endpoint, prompts, levels, extra, config, a.max_new)}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list
    if config.startswith("llama"):
        drafter = models.gguf_path(a.drafter)
        if config == "llama-draft-q4_0":
            from specdec_core.runtime.backends import draft_file

            drafter = draft_file.derive(drafter, models.cache_root() / "drafting", "q4_0", 0)
        draft = ["-md", str(drafter), "--spec-draft-n-max", str(a.llama_draft_max)]
        args = ["-np", "8", "-c", "16384", *(draft if config.startswith("llama-draft") else [])]
        procs = [servers.start_llama(a.target, port, log, a.threads, args, a.llama_server)]
        pids = {"llama-server": procs[0].pid}
    else:
        kernels = ["--no-batch-invariant"] if "stock" in config else []
        procs = servers.start_specdec(a.target, a.drafter, port, log, kernels)
        pids = {"drafter": procs[0].proc.pid, "verifier": procs[1].proc.pid}
    try:
        servers.wait_ready(base, procs)
        run_clients(base, prompts[:1], 1, 8, extra)  # warm-up
        rss_idle = {k: rss_mb(p) for k, p in pids.items()}
        rows = measure_levels(base, prompts, levels, extra, config, a.max_new)
        rss = {k: rss_mb(p) for k, p in pids.items()}
    finally:
        servers.stop(procs)
    return {"levels": rows, "rss_mb_idle": rss_idle, "rss_mb": rss}


def measure_levels(base: str, prompts: list[str], levels: list[int], extra: dict, config: str,
                   max_new: int) -> dict:  # fmt: skip
    rows = {}
    for n in levels:
        rows[n] = run_clients(base, prompts, n, max_new, extra)
        print(f"  {config:18s} {n} clients: {rows[n]['tok_s']:6.2f} tok/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="specdec bench --peer llama.cpp", description=__doc__)
    p.add_argument("--peer", default="llama.cpp", choices=["llama.cpp"])
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--drafter", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--clients", default="1,4,8")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-new", type=int, default=96)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama-server -t")
    p.add_argument("--llama-draft-max", type=int, default=3, help="llama-server --spec-draft-n-max")
    p.add_argument(
        "--llama-server",
        default="",
        help="a llama-server binary (default: $LLAMA_SERVER, one already built, else build one)",
    )
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument(
        "--endpoint",
        default="http://127.0.0.1:8000",
        help="configs endpoint / endpoint-no-draft: an OpenAI API already running (the compose stack's)",
    )
    p.add_argument("--out", default="bench-results/peer.json")
    a = p.parse_args(argv)
    levels = [int(n) for n in a.clients.split(",")]
    prompts = code_prompts(a.prompts)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(a), "cpus": len(os.sched_getaffinity(0)), "configs": {}}
    with open(out.with_suffix(".log"), "w") as log:
        for config in a.configs.split(","):
            results["configs"][config] = measure(a, config, prompts, levels, log)
            out.write_text(json.dumps(results, indent=1))
    report(results, levels)
    out.write_text(json.dumps(results, indent=1))
    return 0


def report(results: dict, levels: list[int]) -> None:
    configs = results["configs"]
    print("\n| clients | " + " | ".join(configs) + " |")
    print("|---" * (len(configs) + 1) + "|")
    for n in levels:
        print(f"| {n} | " + " | ".join(f"{c['levels'][n]['tok_s']:.2f}" for c in configs.values()) + " |")
    texts = [c["levels"][n]["texts"] for c in configs.values() for n in levels]
    same = all(t == texts[0] for t in texts)
    results["same_texts"] = same
    print(f"\nsame texts in every row: {same}")
    for name, c in configs.items():
        if "rss_mb" in c:  # not for an endpoint this benchmark did not start
            print(f"resident memory {name}: idle {c['rss_mb_idle']} MB, after {c['rss_mb']} MB")


if __name__ == "__main__":
    sys.exit(main())
