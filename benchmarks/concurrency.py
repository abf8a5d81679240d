"""``specdec bench --concurrency 1,2,4,8,16``: many clients at once, the way a shared verifier is used.

For each concurrency N, N client threads (one channel each) call Generate at the same moment with N
distinct prompts (``load_prompts.json``: code, chat and prose alternate), greedy, EOS ignored, so every
request produces exactly ``--max-new-tokens`` tokens. Systems, all in one run on the same machine:

  specdec     the verifier's defaults (adaptive, load-aware draft length) with the drafter service
  no-draft    the same verifier, ``no_draft`` (batched target-only decoding)
  hf-batch    Hugging Face ``generate`` on a left-padded batch of the same N prompts (the peer's batched
              decoding), in this process while the services are stopped

Reported per N: aggregate tokens/s, per-request tokens/s, time to first token and inter-token latency
(p50, p95; a chunk of n tokens that arrives g seconds after the previous one counts n tokens of g / n
each), acceptance, the share of rounds decoded without drafting, per prompt class; and the roofline of
the machine (measured copy bandwidth and GEMM throughput) for target-only decoding at that N. Greedy ids
of every request are compared with the same prompt generated alone (``no-draft``, one at a time); a
difference is reported with the target's top-2 logit gap at the first differing position.

A time-to-first-token probe measures a short prompt sent while 8 long generations decode, against the
same prompt on an idle verifier, with and without drafting.
"""

from __future__ import annotations

import json
import shlex
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec_core import models
from specdec_core.text import encode_prompt

from .common import (
    describe_hardware,
    hf_kwargs,
    measure_bandwidth,
    measure_gflops,
    peak_rss_mb,
    weight_bytes,
)
from .concurrency_report import write_load_reports

HERE = Path(__file__).resolve().parent


@dataclass
class Request:
    """One client stream: when it was sent, when each chunk arrived, what it produced."""

    prompt_id: str
    cls: str
    sent: float = 0.0
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens in the chunk)
    token_ids: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    error: str = ""

    @property
    def end(self) -> float:
        return self.arrivals[-1][0] if self.arrivals else self.sent

    @property
    def ttft(self) -> float:
        first = next((t for t, n in self.arrivals if n), None)
        return (first - self.sent) if first is not None else float("nan")

    def itl(self) -> list[float]:
        out: list[float] = []
        chunks = [(t, n) for t, n in self.arrivals if n]
        for (t0, _), (t1, n) in zip(chunks, chunks[1:]):
            out.extend([(t1 - t0) / n] * n)
        return out


def load_prompts(tokenizer, count: int) -> list[tuple[str, str, list[int]]]:
    """(id, class, token ids) of the first ``count`` prompts (cycling if more are asked for)."""
    spec = json.loads((HERE / "load_prompts.json").read_text())["prompts"]
    out = []
    for i in range(count):
        p = spec[i % len(spec)]
        suffix = f"#{i // len(spec)}" if i >= len(spec) else ""
        out.append((p["id"] + suffix, p["class"], encode_prompt(tokenizer, p["text"], p["chat"])))
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(int(q * len(s)), len(s) - 1)]


# -- clients ------------------------------------------------------------------------------------------


def run_clients(address: str, prompts, max_new: int, **kwargs) -> tuple[list[Request], float]:
    """All prompts at once, a thread and a channel each; returns the requests and the wall time."""
    from client import SpecDecClient

    requests = [Request(pid, cls) for pid, cls, _ in prompts]
    barrier = threading.Barrier(len(prompts))

    def one(i: int) -> None:
        req, ids = requests[i], prompts[i][2]
        with SpecDecClient(address) as client:
            barrier.wait()
            req.sent = time.perf_counter()
            try:
                for piece in client.stream(ids, max_new_tokens=max_new, ignore_eos=True, **kwargs):
                    req.arrivals.append((time.perf_counter(), len(piece.token_ids)))
                    req.token_ids.extend(piece.token_ids)
                    req.stats = piece.stats or req.stats
            except Exception as exc:  # noqa: BLE001 - reported in the results, the run goes on
                req.error = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r.end for r in requests) - min(r.sent for r in requests)
    return requests, wall


def summarise(requests: list[Request], wall: float) -> dict:
    tokens = sum(len(r.token_ids) for r in requests)
    per_request = [len(r.token_ids) / (r.end - r.sent) for r in requests if r.end > r.sent]
    itl = [x for r in requests for x in r.itl()]
    stats = [r.stats for r in requests if r.stats]
    drafted = sum(s.get("drafted", 0) for s in stats)
    accepted = sum(s.get("accepted", 0) for s in stats)
    rounds = sum(s.get("rounds", 0) for s in stats)
    by_class: dict[str, list[float]] = {}
    for r in requests:
        if r.end > r.sent:
            by_class.setdefault(r.cls, []).append(len(r.token_ids) / (r.end - r.sent))
    return {
        "requests": len(requests),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tps": tokens / wall if wall > 0 else 0.0,
        "per_request_tps": statistics.mean(per_request) if per_request else 0.0,
        "ttft_p50": pct([r.ttft for r in requests], 0.5),
        "ttft_p95": pct([r.ttft for r in requests], 0.95),
        "itl_p50": pct(itl, 0.5),
        "itl_p95": pct(itl, 0.95),
        "acceptance": accepted / drafted if drafted else 0.0,
        "drafted_per_round": drafted / rounds if rounds else 0.0,
        "plain_round_share": sum(s.get("plain_rounds", 0) for s in stats) / rounds if rounds else 0.0,
        "per_class_tps": {c: statistics.mean(v) for c, v in by_class.items()},
        "errors": [f"{r.prompt_id}: {r.error}" for r in requests if r.error],
    }


def ttft_probe(address: str, prompts, max_new: int, short, **kwargs) -> dict:
    """Time to first token of ``short`` on an idle verifier, then while 8 long generations decode."""
    from client import SpecDecClient

    def first_token(client) -> float:
        t0 = time.perf_counter()
        # one token: the generation ends with it (a longer one, abandoned, would hold a row a while)
        for piece in client.stream(short[2], max_new_tokens=1, ignore_eos=True, **kwargs):
            if piece.token_ids:
                return time.perf_counter() - t0
        return float("nan")

    with SpecDecClient(address) as client:
        idle = [first_token(client) for _ in range(3)]
    started = threading.Event()
    decoding: list[int] = []
    lock = threading.Lock()

    def background(ids) -> None:
        with SpecDecClient(address) as c:
            for piece in c.stream(ids, max_new_tokens=max_new, ignore_eos=True, **kwargs):
                if piece.token_ids:
                    with lock:
                        decoding.append(1)
                        if len(decoding) >= 8 * 3:  # every stream past its first few chunks
                            started.set()

    threads = [threading.Thread(target=background, args=(p[2],)) for p in prompts[:8]]
    for t in threads:
        t.start()
    started.wait(timeout=600)
    busy = []
    with SpecDecClient(address) as client:
        for _ in range(3):
            busy.append(first_token(client))
            time.sleep(0.2)
    for t in threads:
        t.join()
    return {"idle_s": statistics.median(idle), "busy_s": statistics.median(busy), "idle": idle, "busy": busy}


# -- the peer: HF generate on a padded batch -----------------------------------------------------------


class _StepClock:
    """A logits processor that timestamps every decoding step of ``generate``."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_batch(model, tokenizer, prompts, max_new: int) -> tuple[list[Request], float]:
    """``generate`` on the prompts left-padded into one batch; every row gets the batch's step times."""
    from transformers import LogitsProcessorList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(p[2]) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (_, _, p) in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    clock = _StepClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            **hf_kwargs(model, max_new, 0.0),
            logits_processor=LogitsProcessorList([clock]),
        )
    wall = time.perf_counter() - t0
    requests = []
    for i, (pid, cls, _) in enumerate(prompts):
        r = Request(pid, cls, sent=t0, arrivals=[(t, 1) for t in clock.times])
        r.token_ids = out[i, width:].tolist()
        requests.append(r)
    return requests, wall


def near_tie(model, prompt_ids: list[int], reference: list[int], position: int) -> float:
    """The target's fp32 top-2 logit gap at generated position ``position`` of ``reference``."""
    with torch.inference_mode():
        x = torch.tensor([prompt_ids + reference[:position]], device=model.device)
        logits = model(x).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


# -- the run -----------------------------------------------------------------------------------------


def perturbed_copy(model_dir: str, scale: float, out: Path) -> Path:
    """Save a copy of the model with Gaussian noise on every weight (a drafter as large as its target)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def resolve_pair(a) -> tuple[str, str]:
    target = str(models.fetch(a.target_model)) if a.target_model in models.BUILTIN_MODELS else a.target_model
    if a.drafter_model.startswith("perturbed:"):
        scale = float(a.drafter_model.split(":", 1)[1])
        out = Path(tempfile.mkdtemp(prefix="specdec-perturbed-"))
        return target, str(perturbed_copy(target, scale, out))
    if a.drafter_model in models.BUILTIN_MODELS:
        return target, str(models.fetch(a.drafter_model))
    return target, a.drafter_model


def launch_pair(a, target: str, drafter: str, layout: str, name: str, root: Path | None = None):
    """The drafter and the verifier of ``layout`` as local processes (logs under ``--out``)."""
    from client.local import ROOT, launch

    pinned = layout == "pinned"
    d_args = ["--device", a.device, "--quantization", a.drafter_quantization]
    v_args = ["--device", a.device, "--fast-verify", a.fast_verify]
    if pinned:
        d_args += ["--threads", "1"]
        v_args += ["--threads", "1"]
    if a.service_args and root is None:
        d_args += shlex.split(a.service_args)
        v_args += shlex.split(a.service_args)
    logs = Path(a.out)
    logs.mkdir(parents=True, exist_ok=True)
    root = root or ROOT
    with open(logs / f"{name}-drafter.log", "w") as dlog, open(logs / f"{name}-verifier.log", "w") as vlog:
        d = launch("drafter", drafter, args=d_args, cpus=[1] if pinned else None, log_file=dlog, root=root)
        try:
            v = launch(
                "verifier",
                target,
                args=v_args + ["--drafter", d.address],
                cpus=[0] if pinned else None,
                log_file=vlog,
                root=root,
            )
        except Exception:
            d.stop()
            raise
    return d, v


def measure_level(address: str, prompts, n: int, max_new: int, layout: str, system: str, **kw) -> dict:
    reqs, wall = run_clients(address, prompts[:n], max_new, **kw)
    s = summarise(reqs, wall)
    s["ids"] = {r.prompt_id: r.token_ids for r in reqs}
    print(
        f"  {layout:7s} N={n:<3d} {system:9s} {s['aggregate_tps']:7.2f} tok/s aggregate, "
        f"{s['per_request_tps']:6.2f} per request, TTFT p50 {s['ttft_p50']:.2f}s, "
        f"acceptance {s['acceptance']:.2f}, plain rounds {s['plain_round_share']:.0%}"
        + (f"  ERRORS {s['errors']}" if s["errors"] else ""),
        flush=True,
    )
    return s


def run_services(a, target: str, drafter: str, prompts, layout: str, results: dict) -> None:
    d, v = launch_pair(a, target, drafter, layout, layout)
    try:
        run_clients(v.address, prompts[:2], 8)  # warm-up (excluded)
        run_clients(v.address, prompts[:2], 8, no_draft=True)
        levels = results.setdefault(layout, {})
        for i, n in enumerate(a.concurrency):
            for system in ["specdec", "no-draft"] if i % 2 == 0 else ["no-draft", "specdec"]:
                levels.setdefault(str(n), {})[system] = measure_level(
                    v.address, prompts, n, a.max_new_tokens, layout, system, no_draft=system == "no-draft"
                )
        if a.ttft_probe and max(a.concurrency) >= 8:
            probe = {}
            for system in ("specdec", "no-draft"):
                probe[system] = ttft_probe(
                    v.address, prompts[1:], a.max_new_tokens * 2, prompts[0], no_draft=system == "no-draft"
                )
                print(f"  {layout:7s} TTFT probe {system}: {probe[system]}", flush=True)
            results.setdefault("ttft_probe", {})[layout] = probe
        if a.solo_reference and layout == a.layouts[0]:
            solo = {}
            for pid, cls, ids in prompts[: max(a.concurrency)]:
                reqs, _ = run_clients(v.address, [(pid, cls, ids)], a.max_new_tokens, no_draft=True)
                solo[pid] = reqs[0].token_ids
            results["solo"] = solo
        results.setdefault("rss_mb", {})[layout] = {
            "verifier": peak_rss_mb(v.proc.pid),
            "drafter": peak_rss_mb(d.proc.pid),
        }
    finally:
        v.stop()
        d.stop()


def run_baseline(a, target: str, drafter: str, prompts, layout: str, results: dict) -> None:
    """An earlier checkout's services with their defaults, at the levels up to ``--baseline-max``."""
    d, v = launch_pair(a, target, drafter, layout, f"{layout}-baseline", Path(a.baseline_root))
    try:
        run_clients(v.address, prompts[:2], 8)  # warm-up (excluded)
        for n in [n for n in a.concurrency if n <= a.baseline_max]:
            results[layout][str(n)]["baseline"] = measure_level(
                v.address, prompts, n, a.max_new_tokens, layout, "baseline"
            )
    finally:
        v.stop()
        d.stop()


def main(a) -> int:
    target, drafter = resolve_pair(a)
    hardware = describe_hardware()
    bandwidth, gflops = measure_bandwidth(a.device), measure_gflops(a.device)
    print(
        f"== hardware: {hardware}; copy bandwidth {bandwidth:.1f} GB/s, fp32 GEMM {gflops:.0f} GFLOP/s",
        flush=True,
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = load_prompts(tokenizer, max(a.concurrency))
    results: dict = {
        "meta": {
            "hardware": hardware,
            "bandwidth_gbs": bandwidth,
            "gflops": gflops,
            "args": {k: v for k, v in vars(a).items() if k != "func"},
            "target": target,
            "drafter": drafter,
            "prompts": [(pid, cls, len(ids)) for pid, cls, ids in prompts],
        }
    }
    for layout in a.layouts:
        run_services(a, target, drafter, prompts, layout, results)
        if a.baseline_root:
            run_baseline(a, target, drafter, prompts, layout, results)
    model, _ = models.load_model(target, a.device, "auto")
    results["meta"]["target_bytes"] = weight_bytes(model)
    results["meta"]["target_params"] = sum(p.numel() for p in model.parameters())
    if "hf-batch" in a.systems:
        hf_batch(model, tokenizer, prompts[:2], 4)  # warm-up
        for n in a.concurrency:
            reqs, wall = hf_batch(model, tokenizer, prompts[:n], a.max_new_tokens)
            s = summarise(reqs, wall)
            s["ids"] = {r.prompt_id: r.token_ids for r in reqs}
            results.setdefault("hf-batch", {})[str(n)] = s
            print(f"  hf-batch N={n:<3d} {s['aggregate_tps']:7.2f} tok/s aggregate", flush=True)
    check_lossless(results, model, prompts)
    write_load_reports(results, a)
    return 0


def check_lossless(results: dict, model, prompts) -> None:
    """Every greedy request against the same prompt alone; differences with the top-2 logit gap there."""
    solo = results.get("solo")
    if not solo:
        return
    ids_of = {pid: ids for pid, _, ids in prompts}
    report = []
    for layout in results["meta"]["args"]["layouts"]:
        for n, systems in results.get(layout, {}).items():
            for system, s in systems.items():
                for pid, out in s["ids"].items():
                    ref = solo.get(pid)
                    if ref is None or out == ref:
                        continue
                    pos = next(
                        (i for i, (x, y) in enumerate(zip(out, ref)) if x != y), min(len(out), len(ref))
                    )
                    gap = near_tie(model, ids_of[pid], ref, pos)
                    report.append(
                        {
                            "layout": layout,
                            "n": int(n),
                            "system": system,
                            "prompt": pid,
                            "position": pos,
                            "top2_gap": gap,
                        }
                    )
    results["lossless"] = {"compared": True, "differences": report}
    print(f"== greedy ids vs each prompt alone: {len(report)} differences {report}", flush=True)
