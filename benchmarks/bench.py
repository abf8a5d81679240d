"""``specdec bench``: specdec against target-only HF generate and HF assisted generation, in one run.

Systems, all on the same machine in the same run:
  hf          target-only ``model.generate`` (the baseline)
  assisted    HF assisted generation, ``target.generate(assistant_model=drafter)``, fixed k
  core        specdec's core loop in this process
  grpc        specdec over gRPC, drafter and verifier as separate processes, each pinned to its own core
              with one thread (a drafter on its own small device); the baselines get both cores
  grpc-shared the same processes unpinned (both roles share both cores)

Every generation ignores EOS and produces exactly ``--max-new-tokens`` tokens so the work is equal;
greedy runs assert that every system's ids equal the baseline's (a mismatch is reported, not hidden).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from specdec_core import models
from specdec_core.decoder import SpeculativeDecoder
from specdec_core.draft_length import FixedDraftLength, LengthMemory
from specdec_core.drafting import ModelDrafter
from specdec_core.optimize import enable_fast_linear, prepare_drafter
from specdec_core.runtime.backends.torch_eager import ModelRunner
from specdec_core.sampling import SamplingParams
from specdec_core.stats import GenerationStats
from specdec_core.stopping import StopCriteria

from . import concurrency, lookup
from .common import describe_hardware, hf_kwargs, load_prompts, measure_bandwidth, peak_rss_mb, weight_bytes
from .report import write_reports

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    system: str
    temperature: float
    k: int | str
    tokens: int = 0
    seconds: float = 0.0
    stats: list[dict] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    peak_rss_mb: dict = field(default_factory=dict)
    per_prompt_s: dict[str, float] = field(default_factory=dict)  # median seconds by prompt id
    ids_compared_with: str = ""  # the row whose greedy ids these were checked against


# -- generation helpers ---------------------------------------------------------------------------------


def run_hf(target, ids, max_new, temperature, seed, assistant=None, k=None) -> list[int]:
    kwargs = hf_kwargs(target, max_new, temperature)
    if assistant is not None:
        assistant.generation_config.num_assistant_tokens = k
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = assistant
    torch.manual_seed(seed)
    x = torch.tensor([ids], device=target.device)
    out = target.generate(x, attention_mask=torch.ones_like(x), **kwargs)
    return out[0, len(ids) :].tolist()


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


# -- the benchmark ---------------------------------------------------------------------------------------


class Bench:
    def __init__(self, a) -> None:
        self.a = a
        self.runs: list[Run] = []
        self.baseline_ids: dict[tuple, list[int]] = {}  # greedy ids by prompt, from HF generate if it ran
        self.baseline_name = "hf"

    def record(
        self, system, temperature, k, samples, stats=None, ids_by_prompt=None, rss=None, per_prompt=None
    ) -> Run:
        run = Run(system, temperature, k, per_prompt_s=per_prompt or {})
        for seconds, tokens in samples:
            run.seconds += seconds
            run.tokens += tokens
        run.stats = stats or []
        run.peak_rss_mb = rss or {"bench": peak_rss_mb()}
        if temperature == 0 and ids_by_prompt:
            if not self.baseline_ids:  # no HF row: compare every greedy row with the first one
                self.baseline_ids.update(ids_by_prompt)
                self.baseline_name = f"{system} k={k}"
            run.ids_compared_with = self.baseline_name
            for pid, ids in ids_by_prompt.items():
                ref = self.baseline_ids.get(pid)
                if ref is not None and ids != ref:
                    first = next(
                        (i for i, (x, y) in enumerate(zip(ids, ref)) if x != y), min(len(ids), len(ref))
                    )
                    run.mismatches.append(f"{pid}: differs from the baseline at generated token {first}")
        self.runs.append(run)
        tps = run.tokens / run.seconds if run.seconds else 0
        print(
            f"  {system:12s} T={temperature:<4} k={k!s:<8} {tps:7.3f} tok/s"
            + (f"  MISMATCH {run.mismatches}" if run.mismatches else ""),
            flush=True,
        )
        return run

    def measure(self, prompts, generators: dict) -> dict:
        """Run every generator of ``{config: generate(ids)}`` on every prompt, ``repeats`` times.

        Interleaved: for each repeat and prompt the configurations run back to back, in an order rotated
        per prompt and repeat, so a slow stretch of this shared machine hits all of them alike and the
        per-prompt comparison between configurations is paired. Returns ``{config: (ids by prompt id,
        [(median seconds, tokens)] in prompt order, {prompt id: median seconds})}``.
        """
        configs = list(generators)
        times: dict = {(c, pid): [] for c in configs for pid, _ in prompts}
        ids_by: dict = {c: {} for c in configs}
        for rep in range(self.a.repeats):
            for i, (pid, ids) in enumerate(prompts):
                shift = (i + rep) % len(configs)
                for c in configs[shift:] + configs[:shift]:
                    out, t = timed(lambda c=c, ids=ids: generators[c](ids))
                    times[c, pid].append(t)
                    ids_by[c][pid] = out
                done = ", ".join(
                    f"k={c}: {len(ids_by[c][pid]) / times[c, pid][-1]:.2f} tok/s" for c in configs
                )
                print(f"    repeat {rep + 1}/{self.a.repeats} {pid}: {done}", flush=True)
        result = {}
        for c in configs:
            per_prompt = {pid: statistics.median(times[c, pid]) for pid, _ in prompts}
            samples = [(per_prompt[pid], len(ids_by[c][pid])) for pid, _ in prompts]
            result[c] = (ids_by[c], samples, per_prompt)
        return result

    def measure_and_record(self, system, temperature, prompts, generators, stats_by=None, rss=None) -> None:
        """``measure`` the configurations, then record a row for each (``stats_by``: {config: stats per
        generation, in order}; ``rss``: a callable giving the peak RSS to report, read after the runs)."""
        measured = self.measure(prompts, generators)
        rss_mb = rss() if rss is not None else None
        for k, (ids_by, samples, per_prompt) in measured.items():
            stats = stats_by[k][-len(prompts) :] if stats_by else None
            self.record(system, temperature, k, samples, stats, ids_by, rss_mb, per_prompt)

    def spec_configs(self) -> list:
        """The draft lengths specdec's systems run: each fixed k, then adaptive if asked for."""
        return self.a.ks + (["adaptive"] if self.a.adaptive else [])


def parse_args(argv):
    p = argparse.ArgumentParser(
        "specdec bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="2 prompts, greedy, k=4, 64 tokens: under 10 min on 2 cores"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--drafter-model", default=models.DEFAULT_DRAFTER)
    p.add_argument("--target-model", default=models.DEFAULT_TARGET)
    p.add_argument("--ks", default="2,4,6,8")
    p.add_argument("--temperatures", default="0,0.8")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--systems", default="hf,assisted,core,grpc,grpc-shared")
    p.add_argument(
        "--drafter-quantization",
        default="auto",
        help="auto | none | int8 | bf16 | fp16 (the drafter every system uses)",
    )
    p.add_argument("--fast-verify", default="auto", help="auto | on | off (specdec verifiers)")
    p.add_argument("--adaptive", action="store_true", help="add adaptive-k rows for core and grpc")
    p.add_argument(
        "--lookahead",
        action="store_true",
        help="gRPC drafters keep drafting while the verifier works (pinned layout: the drafter's own core)",
    )
    p.add_argument("--out", default=str(ROOT / "bench-results"))
    p.add_argument("--docs", action="store_true", help="also write docs/benchmarks.md and the plot")
    p.add_argument(
        "--lookup",
        action="store_true",
        help="prompt-lookup mode (lookup.py): hf, hf-lookup, model, ngram, hybrid on grounded and existing prompts",
    )
    p.add_argument("--lookup-systems", default="hf,hf-lookup,model,ngram,hybrid")
    _add_concurrency_args(p)
    a = p.parse_args(argv)
    a.concurrency = [int(n) for n in a.concurrency.split(",") if n]
    a.layouts = a.layouts.split(",")
    if a.concurrency and a.systems == p.get_default("systems"):
        a.systems = "specdec,no-draft,hf-batch"
    if a.quick:
        a.prompts, a.ks, a.temperatures, a.max_new_tokens = (
            min(a.prompts, 2),
            "4",
            "0",
            min(a.max_new_tokens, 64),
        )
    a.ks = [int(k) for k in a.ks.split(",")]
    a.temperatures = [float(t) for t in a.temperatures.split(",")]
    a.systems = a.systems.split(",")
    a.lookup_systems = a.lookup_systems.split(",")
    return a


def _add_concurrency_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``--concurrency`` (concurrency.py)."""
    load = p.add_argument_group(
        "load mode (--concurrency): many concurrent clients over gRPC, see concurrency.py"
    )
    load.add_argument("--concurrency", default="", help="e.g. 1,2,4,8,16: run the concurrency benchmark")
    load.add_argument("--layouts", default="shared", help="shared (both roles on all cores) and/or pinned")
    load.add_argument(
        "--service-args",
        default="",
        help="extra flags for both services, e.g. '--omp-wait-policy passive --no-compute-lease'",
    )
    load.add_argument(
        "--baseline-root",
        default="",
        help="a checkout of an earlier specdec: its services, with their default flags, run as system "
        "'baseline' in the same run (levels up to --baseline-max)",
    )
    load.add_argument("--baseline-max", type=int, default=8)
    load.add_argument(
        "--ttft-probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="short prompt while 8 decode",
    )
    load.add_argument(
        "--solo-reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate each prompt alone (no-draft) and compare every request's greedy ids with it",
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.lookup:
        return lookup.run(a)
    if a.concurrency:
        return concurrency.main(a)
    bench = Bench(a)
    hardware = describe_hardware()
    bandwidth = measure_bandwidth(a.device)
    print(f"== hardware: {hardware}; copy bandwidth {bandwidth:.1f} GB/s", flush=True)
    meta = {"hardware": hardware, "bandwidth_gbs": bandwidth, "args": dict(vars(a))}
    prompts = run_in_process(bench, meta)
    gc.collect()  # the in-process models are freed before the services load their own
    for layout in ("grpc", "grpc-shared"):
        if layout in a.systems:
            run_grpc(bench, layout, prompts)
    write_reports(bench.runs, meta, a)
    return 0


def run_in_process(bench: Bench, meta: dict) -> list[tuple[str, list[int]]]:
    """Baselines (stock target), then specdec's core loop; returns the tokenized prompts."""
    a = bench.a
    (target, tok), load_target = timed(lambda: models.load_model(a.target_model, a.device, a.dtype))
    (drafter_fp, _), load_drafter = timed(lambda: models.load_model(a.drafter_model, a.device, a.dtype))
    drafter = prepare_drafter(drafter_fp, a.drafter_quantization)
    prompts = load_prompts(tok, a.prompts)
    meta.update(
        {
            "load_s": {"target": load_target, "drafter": load_drafter},
            "target_bytes": weight_bytes(target),
            "drafter_bytes": weight_bytes(drafter_fp)
            if a.drafter_quantization == "none"
            else _quantized_bytes(drafter),
        }
    )
    print(
        f"== loaded target in {load_target:.1f}s, drafter in {load_drafter:.1f}s; {len(prompts)} prompts",
        flush=True,
    )

    # warm-up (excluded): one short generation through each in-process path
    run_hf(target, prompts[0][1], 4, 0.0, 0)
    run_hf(target, prompts[0][1], 4, 0.0, 0, assistant=drafter, k=2)
    for temperature in a.temperatures:
        if "hf" in a.systems:
            ((ids_by, samples, per_prompt),) = bench.measure(
                prompts, {1: lambda ids: run_hf(target, ids, a.max_new_tokens, temperature, 0)}
            ).values()
            if temperature == 0:
                bench.baseline_ids.update(ids_by)
                bench.baseline_name = "hf"
            bench.record("hf", temperature, 1, samples, ids_by_prompt=ids_by, per_prompt=per_prompt)
        if "assisted" in a.systems:
            bench.measure_and_record(
                "assisted",
                temperature,
                prompts,
                {
                    k: lambda ids, k=k: run_hf(
                        target, ids, a.max_new_tokens, temperature, 0, assistant=drafter, k=k
                    )
                    for k in a.ks
                },
            )

    if "core" in a.systems:
        meta["fast_verify"] = enable_fast_linear(target, a.fast_verify)
        for temperature in a.temperatures:
            run_core(bench, target, tok, drafter, prompts, temperature)
    return prompts


def _quantized_bytes(model) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            total += m.weight().numel()  # one byte per int8 weight
    return total + sum(p.numel() * p.element_size() for p in model.parameters())


def run_core(bench: Bench, target, tok, drafter, prompts, temperature) -> None:
    a = bench.a
    decoder = SpeculativeDecoder(ModelRunner(target), tok)
    draft_runner = ModelRunner(drafter)
    # as in a verifier: adaptive generations start from the previous one's measurements
    memory = LengthMemory()
    stats_by: dict = {}

    def gen(ids, k):
        stats = GenerationStats()
        policy = memory.policy("core", k_max=8) if k == "adaptive" else FixedDraftLength(k)
        params = SamplingParams(temperature=temperature, seed=0 if temperature else None)
        out = []
        for chunk in decoder.generate(
            ids,
            params,
            StopCriteria(max_new_tokens=a.max_new_tokens),
            ModelDrafter(draft_runner),
            policy,
            stats,
        ):
            out.extend(chunk.token_ids)
        memory.remember("core", policy)
        stats_by.setdefault(k, []).append(stats.to_dict())
        return out

    generators = {k: lambda ids, k=k: gen(ids, k) for k in bench.spec_configs()}
    bench.measure_and_record("core", temperature, prompts, generators, stats_by)


def run_grpc(bench: Bench, layout: str, prompts) -> None:
    from client import SpecDecClient
    from client.local import launch

    a = bench.a
    pinned = layout == "grpc" and a.device == "cpu" and (os.cpu_count() or 1) >= 2
    d_args = ["--device", a.device, "--dtype", a.dtype, "--quantization", a.drafter_quantization]
    d_args += ["--lookahead"] if a.lookahead and pinned else []  # shared cores: lookahead only steals them
    v_args = ["--device", a.device, "--dtype", a.dtype, "--fast-verify", a.fast_verify]
    if pinned:
        d_args += ["--threads", "1"]
        v_args += ["--threads", "1"]
    logs = Path(a.out)
    logs.mkdir(parents=True, exist_ok=True)
    with (
        open(logs / f"{layout}-drafter.log", "w") as dlog,
        open(logs / f"{layout}-verifier.log", "w") as vlog,
    ):
        drafter = launch("drafter", a.drafter_model, args=d_args, cpus=[1] if pinned else None, log_file=dlog)
        verifier = launch(
            "verifier",
            a.target_model,
            args=v_args + ["--drafter", drafter.address],
            cpus=[0] if pinned else None,
            log_file=vlog,
        )
        try:
            with SpecDecClient(verifier.address, drafter.address) as client:
                client.generate(prompts[0][1], max_new_tokens=4, ignore_eos=True)  # warm-up
                for temperature in a.temperatures:
                    stats_by: dict = {}

                    def gen(ids, k, temperature=temperature, stats_by=stats_by):
                        r = client.generate(
                            ids,
                            max_new_tokens=a.max_new_tokens,
                            temperature=temperature,
                            seed=0 if temperature else None,
                            ignore_eos=True,
                            num_draft_tokens=8 if k == "adaptive" else k,
                            adaptive=k == "adaptive",
                        )
                        stats_by.setdefault(k, []).append(r.stats)
                        return r.token_ids

                    bench.measure_and_record(
                        layout,
                        temperature,
                        prompts,
                        {k: lambda ids, k=k: gen(ids, k) for k in bench.spec_configs()},
                        stats_by,
                        rss=lambda: {
                            "verifier": peak_rss_mb(verifier.proc.pid),
                            "drafter": peak_rss_mb(drafter.proc.pid),
                        },
                    )
        finally:
            verifier.stop()
            drafter.stop()


if __name__ == "__main__":
    raise SystemExit(main())
