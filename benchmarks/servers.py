"""The OpenAI-compatible servers the peer benchmarks start: specdec's stack (drafter and verifier services
and ``specdec serve-openai``) and llama.cpp's llama-server on the same GGUF files; one stop for both."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_specdec(
    target: str, drafter: str, port: int, log, verifier_args=(), drafter_args=(), draft_with: str = ""
) -> list:
    """Drafter and verifier services and serve-openai over them on ``port``: [drafter, verifier, api];
    ``draft_with``: what requests draft with ("ngram", "hybrid"; default: the drafter service)."""
    from client.local import launch

    d = launch("drafter", drafter, args=list(drafter_args), log_file=log)
    v = launch("verifier", target, args=["--drafter", d.address, *verifier_args], log_file=log)
    cmd = [
        sys.executable,
        "-m",
        "client.cli",
        "serve-openai",
        "--verifier",
        v.address,
        "--drafter",
        draft_with or d.address,
    ]
    cmd += ["--port", str(port), "--host", "127.0.0.1"]
    api = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return [d, v, api]


def llama_server(explicit: str = "") -> str:
    """A llama-server binary: ``explicit``, one at hand (client.demo), else one built from the source
    llama-cpp-python vendors (scripts/build_llama_server.sh, about 8 minutes)."""
    from client.demo import llama_server_binary

    if explicit or llama_server_binary():
        return explicit or llama_server_binary() or ""
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_llama_server.sh")], check=True, capture_output=True, text=True
    )
    return built.stdout.strip().splitlines()[-1]


def start_llama(target: str, port: int, log, threads: int, args=(), binary: str = "") -> subprocess.Popen:
    """llama-server on ``target``'s GGUF file with ``args`` (slots, context, speculation) on ``port``."""
    from specdec_core import models

    cmd = [llama_server(binary), "-m", str(models.gguf_path(target)), "-t", str(threads), *args]
    cmd += ["--port", str(port), "--host", "127.0.0.1", "--no-webui"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(base: str, procs: list) -> None:
    """Until the server the last of ``procs`` is answers."""
    from client.local import wait_http

    path = "/health" if isinstance(procs[-1], subprocess.Popen) and len(procs) == 1 else "/v1/models"
    wait_http(base + path, procs[-1])


def stop(procs: list) -> None:
    for p in procs:
        if isinstance(p, subprocess.Popen):
            p.terminate()
            p.wait(30)
        else:
            p.stop()


def stream_chat(base: str, body: dict) -> dict:
    """One streamed ``/v1/chat/completions`` request (``body`` without ``stream``): seconds to the first
    content, wall seconds, the usage's prompt, cached and completion tokens, the reply's text."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(
        base + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    first, text = None, []
    usage: dict = {}
    with urllib.request.urlopen(req, timeout=1800) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text.append(piece)
    wall = time.perf_counter() - t0
    return {
        "ttft_s": first if first is not None else wall,
        "wall_s": wall,
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        "completion_tokens": usage.get("completion_tokens", 0),
        "text": "".join(text),
    }


def served_model(base: str) -> str:
    """The model name an OpenAI-compatible server serves (the first of /v1/models)."""
    with urllib.request.urlopen(base + "/v1/models", timeout=60) as resp:
        return json.loads(resp.read())["data"][0]["id"]
