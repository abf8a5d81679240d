"""``specdec loadtest``: a bounded load test of both services on loopback (tiny models, real processes).

``--clients`` threads call Generate back to back for ``--duration`` seconds; each request either runs to
its end, is cancelled by its client after a few tokens, or carries a short deadline. The verifier's waiting
queue is kept small (``--max-waiting``) so that refusals happen too; a refused client waits 0.1-0.5 s
before its next request. It checks what a service under
sustained load must keep true:

* every request ends as completed (with the ids the target gives that prompt alone), cancelled by its
  client, past its deadline, or refused with ``RESOURCE_EXHAUSTED`` -- nothing else;
* afterwards both services hold nothing: no sequence, no KV position, no running or waiting generation;
* the verifier's and the drafter's RSS end within 10% of their value after the warm-up.

Writes ``loadtest.json`` and ``loadtest.md`` (outcomes by status, latency percentiles, RSS over time) under
``--out``; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "def add(a, b):\n",
    "for i in range(10):\n",
    "The quick brown fox",
    "import numpy as np\n",
    "class Stack:\n",
    "Speculative decoding drafts tokens",
]
EXPECTED = {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def build_models(home: Path) -> tuple[Path, Path]:
    from .tiny import perturbed, save_tiny, tiny_model, tiny_tokenizer

    target = save_tiny("llama", home / "target", seed=0)
    drafter = home / "drafter"
    perturbed(tiny_model("llama", seed=0), 0.1).save_pretrained(drafter)
    tiny_tokenizer().save_pretrained(drafter)
    return target, drafter


class Sampler:
    """Every ``every_s``: both processes' RSS and what the services report holding (Info)."""

    def __init__(self, verifier, drafter, every_s: float = 2.0) -> None:
        import psutil

        from specdec.rpc import channel
        from specdec.v1 import specdec_pb2 as pb
        from specdec.v1 import specdec_pb2_grpc as pb_grpc

        self.procs = {
            "verifier": psutil.Process(verifier.proc.pid),
            "drafter": psutil.Process(drafter.proc.pid),
        }
        self.info: dict[str, Any] = {
            "verifier": pb_grpc.VerifierStub(channel(verifier.address)),
            "drafter": pb_grpc.DrafterStub(channel(drafter.address)),
        }
        self.request = pb.InfoRequest()
        self.every_s = every_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> dict:
        row: dict = {"t": round(time.monotonic() - self.t0, 1)}
        for role in ("verifier", "drafter"):
            row[f"{role}_rss_mb"] = self.procs[role].memory_info().rss / 2**20
            info = self.info[role].Info(self.request, timeout=10)
            row[f"{role}_sequences"], row[f"{role}_kv_tokens"] = info.active_sequences, info.kv_tokens
            if role == "verifier":
                row.update(running=info.running, waiting=info.waiting, sessions=info.sessions)
        return row

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(self.sample())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def client_loop(address, drafter, args, stop_at: float, reference: dict, records: list, seed: int) -> None:
    import grpc

    from specdec.rpc import channel
    from specdec.v1 import specdec_pb2 as pb
    from specdec.v1 import specdec_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    stub = pb_grpc.GenerationStub(channel(address))
    while time.monotonic() < stop_at:
        prompt = rng.choice(PROMPTS)
        n = rng.randint(8, args.max_new_tokens)
        roll = rng.random()
        mode = (
            "cancel"
            if roll < args.cancel
            else "deadline"
            if roll < args.cancel + args.deadline
            else "complete"
        )
        request = pb.GenerateRequest(
            text=prompt,
            stop=pb.StopConditions(max_new_tokens=n, ignore_eos=True),
            num_draft_tokens=rng.choice([0, 3]),
            no_draft=rng.random() < 0.2,
            drafter=drafter,
        )
        timeout = rng.uniform(0.05, 1.0) if mode == "deadline" else 120.0
        cancel_after = rng.randint(1, max(1, n // 2))
        ids: list[int] = []
        t0 = time.monotonic()
        ttft = float("nan")
        code = "OK"
        try:
            call = stub.Generate(request, timeout=timeout)
            for resp in call:
                if not ids:
                    ttft = time.monotonic() - t0
                ids += resp.token_ids
                if mode == "cancel" and len(ids) >= cancel_after:
                    call.cancel()
        except grpc.RpcError as exc:
            code = exc.code().name
        record = {
            "mode": mode,
            "code": code,
            "latency_s": time.monotonic() - t0,
            "ttft_s": ttft,
            "tokens": len(ids),
        }
        if code == "OK":
            record["correct"] = ids == reference[prompt][:n]
        records.append(record)
        if code == "RESOURCE_EXHAUSTED":  # refused: back off before asking again, as a retry policy would
            time.sleep(rng.uniform(0.1, 0.5))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("specdec loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (after the warm-up)")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of load before the RSS reference")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--cancel", type=float, default=0.1, help="share of requests their client cancels")
    p.add_argument("--deadline", type=float, default=0.1, help="share of requests with a 0.05-1 s deadline")
    p.add_argument("--max-running", type=int, default=16)
    p.add_argument("--max-waiting", type=int, default=8)
    p.add_argument("--out", default="bench-results/loadtest")
    a = p.parse_args(argv)
    from client.local import launch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        target, drafter_dir = build_models(home)
        env = {"SPECDEC_HOME": str(home)}
        logs = [open(out / f"{role}.log", "w") for role in ("drafter", "verifier")]  # noqa: SIM115
        drafter = launch("drafter", str(drafter_dir), env=env, log_file=logs[0], timeout_s=180)
        verifier = launch(
            "verifier",
            str(target),
            env=env,
            log_file=logs[1],
            timeout_s=180,
            args=[
                "--drafter",
                drafter.address,
                "--max-running",
                str(a.max_running),
                "--max-waiting",
                str(a.max_waiting),
            ],
        )
        try:
            return run(a, verifier, drafter, out)
        finally:
            verifier.stop()
            drafter.stop()
            for f in logs:
                f.close()


def run(a, verifier, drafter, out: Path) -> int:
    from client import SpecDecClient

    with SpecDecClient(verifier.address, drafter.address) as c:  # each prompt alone: the reference ids
        reference = {
            prompt: c.generate(
                prompt, max_new_tokens=a.max_new_tokens, ignore_eos=True, no_draft=True
            ).token_ids
            for prompt in PROMPTS
        }
    sampler = Sampler(verifier, drafter)
    records: list[dict] = []
    t_start = time.monotonic()
    stop_at = t_start + a.warmup + a.duration
    threads = [
        threading.Thread(
            target=client_loop, args=(verifier.address, drafter.address, a, stop_at, reference, records, i)
        )
        for i in range(a.clients)
    ]
    for t in threads:
        t.start()
    print(f"{a.clients} clients for {a.warmup:.0f} s warm-up + {a.duration:.0f} s ...", flush=True)
    for t in threads:
        t.join()
    wall = time.monotonic() - t_start
    quiet_deadline = time.monotonic() + 30
    final = sampler.sample()
    while time.monotonic() < quiet_deadline and _holds(final):
        time.sleep(0.5)
        final = sampler.sample()
    sampler.stop()
    after_warmup = next((s for s in sampler.samples if s["t"] >= a.warmup), sampler.samples[0])
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r["code"]] = outcomes.get(r["code"], 0) + 1
    done = [r for r in records if r["code"] == "OK"]
    checks = {
        "only expected outcomes": set(outcomes) <= EXPECTED,
        "completed requests have the reference ids": all(r["correct"] for r in done),
        "nothing held afterwards": not _holds(final),
        "verifier RSS within 10% of after warm-up": final["verifier_rss_mb"]
        <= 1.1 * after_warmup["verifier_rss_mb"],
        "drafter RSS within 10% of after warm-up": final["drafter_rss_mb"]
        <= 1.1 * after_warmup["drafter_rss_mb"],
    }
    result = {
        "args": vars(a),
        "wall_s": wall,
        "requests": len(records),
        "outcomes": outcomes,
        "by_mode": {m: sum(1 for r in records if r["mode"] == m) for m in ("complete", "cancel", "deadline")},
        "latency_completed_s": {
            "p50": pct([r["latency_s"] for r in done], 0.5),
            "p95": pct([r["latency_s"] for r in done], 0.95),
        },
        "ttft_s": {
            "p50": pct([r["ttft_s"] for r in records if r["ttft_s"] == r["ttft_s"]], 0.5),
            "p95": pct([r["ttft_s"] for r in records if r["ttft_s"] == r["ttft_s"]], 0.95),
        },
        "tokens_per_s": sum(r["tokens"] for r in records) / wall,
        "after_warmup": after_warmup,
        "final": final,
        "samples": sampler.samples,
        "checks": checks,
        "host": {"cpus": os.cpu_count()},
    }
    (out / "loadtest.json").write_text(json.dumps(result, indent=1))
    (out / "loadtest.md").write_text(report(result))
    print(report(result))
    return 0 if all(checks.values()) else 1


def _holds(sample: dict) -> bool:
    return any(
        sample[k]
        for k in (
            "verifier_sequences",
            "verifier_kv_tokens",
            "drafter_sequences",
            "drafter_kv_tokens",
            "running",
            "waiting",
        )
    )


def report(r: dict) -> str:
    a = r["args"]
    lines = [
        f"Command: `specdec loadtest --clients {a['clients']} --duration {a['duration']:g} --warmup {a['warmup']:g} "
        f"--max-running {a['max_running']} --max-waiting {a['max_waiting']}`",
        "",
        f"{r['requests']} requests in {r['wall_s']:.0f} s ({r['tokens_per_s']:.0f} tokens/s streamed); asked to complete / "
        f"be cancelled by their client / carry a 0.05-1 s deadline: {r['by_mode']['complete']} / "
        f"{r['by_mode']['cancel']} / {r['by_mode']['deadline']}.",
        "",
        "| outcome | requests |",
        "|---|---|",
        *[f"| {code} | {n} |" for code, n in sorted(r["outcomes"].items())],
        "",
        f"Completed requests: latency p50 {r['latency_completed_s']['p50']:.2f} s, p95 "
        f"{r['latency_completed_s']['p95']:.2f} s; first token p50 {r['ttft_s']['p50']:.3f} s, p95 {r['ttft_s']['p95']:.3f} s.",
        "",
        "| t s | verifier RSS MB | drafter RSS MB | verifier sequences | KV tokens | running | waiting |",
        "|---|---|---|---|---|---|---|",
    ]
    samples = r["samples"]
    step = max(1, len(samples) // 12)
    for s in [*samples[::step], r["final"]]:
        lines.append(
            f"| {s['t']:.0f} | {s['verifier_rss_mb']:.0f} | {s['drafter_rss_mb']:.0f} | {s['verifier_sequences']} | "
            f"{s['verifier_kv_tokens']} | {s['running']} | {s['waiting']} |"
        )
    lines += ["", "Checks:", *[f"* {name}: {'yes' if ok else 'NO'}" for name, ok in r["checks"].items()]]
    return "\n".join(lines) + "\n"
