"""``specdec demo``: both services as local processes on the built-in Qwen pair, with and without drafting,
one client and then four at once."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from specdec_core import models

from .client import SpecDecClient
from .local import launch

DEMO_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Explain in two sentences what a hash map is.",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("specdec demo", description=__doc__)
    p.add_argument("--drafter-model", default=models.DEFAULT_DRAFTER)
    p.add_argument("--target-model", default=models.DEFAULT_TARGET)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-draft-tokens", type=int, default=0, help="0: the verifier's default (adaptive)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients in the last part (0: skip it)")
    p.add_argument("--prompts", type=int, default=len(DEMO_PROMPTS), help="how many demo prompts to run")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    from specdec_core.runtime.backends import llamacpp

    convert = not (llamacpp.available() and a.device == "cpu")  # llama.cpp runs the GGUF files as they are
    for name in (a.drafter_model, a.target_model):
        if name in models.BUILTIN_MODELS:
            print(f"== model {name}: {models.fetch(name, convert=convert)}", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="specdec-demo-"))
    print(f"== starting drafter and verifier (logs in {logs})", flush=True)
    with open(logs / "drafter.log", "w") as dlog, open(logs / "verifier.log", "w") as vlog:
        drafter = launch("drafter", a.drafter_model, args=["--device", a.device], log_file=dlog)
        try:
            verifier = launch(
                "verifier",
                a.target_model,
                log_file=vlog,
                # both roles on this machine's cores: the verifier sees it (drafter Info) and prefills alone
                args=["--device", a.device, "--drafter", drafter.address],
            )
        except Exception:
            drafter.stop()
            raise
        try:
            spec_tps = run_prompts(verifier.address, drafter.address, a)
            if a.clients > 1:
                run_concurrent(verifier.address, drafter.address, a)
        finally:
            codes = verifier.stop(), drafter.stop()
            print(f"== services stopped (exit codes {codes[0]}, {codes[1]})")
    compare_llama_server(a, spec_tps, logs)
    return 0


def llama_server_binary() -> str | None:
    """llama.cpp's server where one is at hand and runs (a build whose libraries are gone does not):
    $LLAMA_SERVER, the one scripts/build_llama_server.sh built, or on the PATH."""
    import shutil
    import subprocess

    built = models.cache_root() / "llama.cpp" / "bin" / "llama-server"
    for candidate in (os.environ.get("LLAMA_SERVER", ""), str(built), shutil.which("llama-server") or ""):
        if candidate and os.access(candidate, os.X_OK):
            try:
                subprocess.run([candidate, "--version"], capture_output=True, timeout=30, check=True)
            except (OSError, subprocess.SubprocessError):
                continue
            return candidate
    return None


def compare_llama_server(a, spec_tps: float, logs: Path) -> None:
    """The same prompts, one at a time, through llama-server on the target's GGUF file (target only)."""
    import json
    import subprocess
    import urllib.request

    from .local import free_port, wait_http

    server = llama_server_binary()
    gguf = models.gguf_source(a.target_model, download=False) if a.device == "cpu" else None
    if server is None or gguf is None:
        print(
            "\n== llama.cpp: no llama-server here (scripts/build_llama_server.sh builds one to compare with)"
        )
        return
    port = free_port()
    cmd = [
        server,
        "-m",
        str(gguf),
        "-t",
        str(len(os.sched_getaffinity(0))),
        "-c",
        "4096",
        "--port",
        str(port),
    ]
    with open(logs / "llama-server.log", "w") as log:
        proc = subprocess.Popen(cmd + ["--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(base + "/health", proc, timeout_s=300)
        except (RuntimeError, TimeoutError):
            print(f"\n== llama.cpp: llama-server did not start (log: {logs / 'llama-server.log'})")
            return
        tokens, wall = 0, 0.0
        for prompt in DEMO_PROMPTS[: a.prompts]:
            body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": a.max_new_tokens}
            req = urllib.request.Request(
                base + "/v1/chat/completions", json.dumps({**body, "temperature": 0}).encode(),
                {"Content-Type": "application/json"},
            )  # fmt: skip
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=600) as resp:
                tokens += json.loads(resp.read())["usage"]["completion_tokens"]
            wall += time.perf_counter() - t0
        llama_tps = tokens / wall
        print(
            f"\n== llama.cpp's llama-server on the same GGUF, target only: {llama_tps:.2f} tok/s; "
            f"specdec speculative {spec_tps:.2f} tok/s ({spec_tps / llama_tps:.2f}x)"
        )
    finally:
        proc.terminate()
        proc.wait(30)


# each mode its own tenant: the prefix cache is scoped per tenant, so the second run of a prompt (target
# only) does not find the first one's (speculative) prompt cached and start sooner for it
TENANTS = {False: "demo-speculative", True: "demo-target-only"}


def run_prompts(verifier: str, drafter: str, a) -> float:
    totals = {"spec": [0, 0.0], "base": [0, 0.0]}
    with SpecDecClient(verifier, drafter) as client:
        for prompt in DEMO_PROMPTS[: a.prompts]:
            print(f"\n--- prompt: {prompt}\n", flush=True)
            stats: dict = {}
            for piece in client.stream(
                prompt,
                chat=True,
                max_new_tokens=a.max_new_tokens,
                num_draft_tokens=a.num_draft_tokens,
                tenant=TENANTS[False],
            ):
                sys.stdout.write(piece.text)
                sys.stdout.flush()
                stats = piece.stats or stats
            base = client.generate(
                prompt, chat=True, max_new_tokens=a.max_new_tokens, no_draft=True, tenant=TENANTS[True]
            ).stats
            print(
                f"\n\n    speculative: {stats['tokens_per_s']:.2f} tok/s, acceptance {stats['acceptance_rate']:.2f}, "
                f"{stats['accepted'] / max(stats['rounds'], 1):.2f} accepted/round, "
                f"{stats['target_passes']} target passes for {stats['new_tokens']} tokens"
            )
            print(
                f"    target only: {base['tokens_per_s']:.2f} tok/s  ->  speed-up {stats['tokens_per_s'] / base['tokens_per_s']:.2f}x"
            )
            for key, s in (("spec", stats), ("base", base)):
                totals[key][0] += s["new_tokens"]
                totals[key][1] += s["wall_s"]
    spec_tps, base_tps = (totals[k][0] / totals[k][1] for k in ("spec", "base"))
    print(
        f"\n== overall: speculative {spec_tps:.2f} tok/s, target only {base_tps:.2f} tok/s, "
        f"speed-up {spec_tps / base_tps:.2f}x"
    )
    return spec_tps


CONCURRENT_PROMPTS = [
    "Write a Python function that merges two sorted lists.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "Write a Python function that counts the words in a text file.",
    "Write a Python function that flattens a nested list.",
]


def run_concurrent(verifier: str, drafter: str, a) -> None:
    """``a.clients`` clients at once (one batch on the verifier), with drafting and then without."""
    prompts = [CONCURRENT_PROMPTS[i % len(CONCURRENT_PROMPTS)] for i in range(a.clients)]
    print(f"\n== {a.clients} clients at once ({a.max_new_tokens} tokens each)", flush=True)
    rates = {}
    for label, no_draft in (("speculative", False), ("target only", True)):
        tokens = [0] * len(prompts)

        def one(i, no_draft=no_draft, tokens=tokens):
            with SpecDecClient(verifier, drafter) as c:
                r = c.generate(
                    prompts[i],
                    chat=True,
                    max_new_tokens=a.max_new_tokens,
                    no_draft=no_draft,
                    tenant=TENANTS[no_draft],
                )
                tokens[i] = len(r.token_ids)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates[label] = sum(tokens) / (time.perf_counter() - t0)
        print(f"    {label}: {rates[label]:.2f} tok/s aggregate", flush=True)
    print(f"    speed-up {rates['speculative'] / rates['target only']:.2f}x with {a.clients} clients")
