"""Prompt-lookup drafting against its peers, on two prompt sets: ``specdec bench --lookup``.

Sets: **grounded** (``grounded_prompts.json``: code edits of a given function or class, and a summary of a
given paragraph, where the answer repeats the input) and **existing** (the first prompts of the usual set,
``prompts.json``: code completion and chat, where it mostly does not). Greedy, EOS ignored, the same number
of new tokens for every system; each prompt runs every system back to back (order rotated per prompt), so
a slow stretch of this shared machine hits them alike.

Systems, all in this process on the same models:
  hf          target-only ``model.generate``
  hf-lookup   ``model.generate(prompt_lookup_num_tokens=10)``, Hugging Face's prompt lookup
  model       specdec's loop with the model drafter (the adaptive length, as the verifier's default)
  ngram       specdec's loop with prompt lookup as the only drafter (what ``--drafter ngram`` runs inside
              the verifier: no model, no network)
  hybrid      prompt lookup where it matches and pays, else the model drafter (``--drafter hybrid``)
Every system's ids must equal ``hf``'s (reported per row). One copy of each model: HF's ``generate`` runs
on the same modules as specdec's loop (the verifier's small-block linear path included).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from specdec_core import models
from specdec_core.decoder import SpeculativeDecoder
from specdec_core.draft_length import LengthMemory
from specdec_core.drafting import ModelDrafter
from specdec_core.hybrid import HybridDrafter
from specdec_core.ngram import LOOKUP_K_MAX, NgramDrafter
from specdec_core.optimize import enable_fast_linear, prepare_drafter
from specdec_core.runtime.backends.torch_eager import ModelRunner
from specdec_core.sampling import SamplingParams
from specdec_core.stats import GenerationStats
from specdec_core.stopping import StopCriteria
from specdec_core.text import encode_prompt

from .common import describe_hardware, hf_kwargs

HERE = Path(__file__).resolve().parent
SYSTEMS = ("hf", "hf-lookup", "model", "ngram", "hybrid")


def prompt_set(tokenizer, name: str, count: int) -> list[tuple[str, list[int]]]:
    file = {"grounded": "grounded_prompts.json", "existing": "prompts.json"}[name]
    prompts = json.loads((HERE / file).read_text())["prompts"][:count]
    return [(p["id"], encode_prompt(tokenizer, p["text"], p["chat"])) for p in prompts]


def run(a) -> int:
    target, tok = models.load_model(a.target_model, a.device, a.dtype)
    drafter_fp, _ = models.load_model(a.drafter_model, a.device, a.dtype)
    drafter = prepare_drafter(drafter_fp, a.drafter_quantization)
    max_new = a.max_new_tokens
    sets = {name: prompt_set(tok, name, a.prompts) for name in ("grounded", "existing")}
    stats: dict = {}  # {system: [GenerationStats.to_dict() per generation]}
    systems = [s for s in SYSTEMS if s in a.lookup_systems]
    fast = enable_fast_linear(target, a.fast_verify)  # the verifier's small-block path, for every system
    generators = _generators(target, tok, drafter, max_new, stats)
    print(f"== lookup benchmark: fast verify {fast}; systems {systems}; {max_new} tokens", flush=True)
    # warm-up (excluded)
    for system in systems:
        generators[system](sets["existing"][0][1][:32])

    results: dict = {"hardware": describe_hardware(), "max_new_tokens": max_new, "sets": {}}
    for set_name, prompts in sets.items():
        results["sets"][set_name] = summary = _measure_set(set_name, prompts, systems, generators, stats)
        print(f"== {set_name}: " + ", ".join(f"{s} {summary[s]['tok_s']:.2f}" for s in systems), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lookup.json").write_text(json.dumps(results, indent=2))
    (out / "lookup.md").write_text(report(results, systems, a))
    print((out / "lookup.md").read_text())
    return 0


def _generators(target, tok, drafter, max_new: int, stats: dict) -> dict:
    """``{system: generate(ids) -> new token ids}``; specdec's systems append their stats to ``stats``."""
    hf_target = target  # one copy in RAM: HF's generate runs on the same modules (the fast path too)
    decoder = SpeculativeDecoder(ModelRunner(target), tok)
    draft_runner = ModelRunner(drafter)  # type: ignore[arg-type]  # a quantized copy
    memory = LengthMemory()

    def hf(ids, lookup=False):
        kwargs = hf_kwargs(hf_target, max_new, 0.0) | ({"prompt_lookup_num_tokens": 10} if lookup else {})
        x = torch.tensor([ids], device=hf_target.device)
        with torch.no_grad():
            out = hf_target.generate(x, attention_mask=torch.ones_like(x), **kwargs)
        return out[0, len(ids) :].tolist()

    def specdec(ids, system):
        s = GenerationStats()
        # as the verifier: the lookup alone may draft up to LOOKUP_K_MAX; the hybrid's lookup side starts
        # fresh each generation (how often lookups are accepted depends on the text)
        policy = memory.policy(system, k_max=LOOKUP_K_MAX if system == "ngram" else 8)
        if system == "model":
            d = ModelDrafter(draft_runner)
        elif system == "ngram":
            d = NgramDrafter()
        else:
            d = HybridDrafter(ModelDrafter(draft_runner), NgramDrafter())
        out: list[int] = []
        for chunk in decoder.generate(
            ids, SamplingParams(), StopCriteria(max_new_tokens=max_new), d, policy, s
        ):
            out.extend(chunk.token_ids)
        memory.remember(system, policy)
        stats.setdefault(system, []).append(s.to_dict())
        return out

    return {
        "hf": lambda ids: hf(ids),
        "hf-lookup": lambda ids: hf(ids, lookup=True),
        "model": lambda ids: specdec(ids, "model"),
        "ngram": lambda ids: specdec(ids, "ngram"),
        "hybrid": lambda ids: specdec(ids, "hybrid"),
    }


def _measure_set(set_name: str, prompts, systems: list[str], generators: dict, stats: dict) -> dict:
    """Every system on every prompt of one set, back to back per prompt (order rotated), ids checked
    against ``hf``'s; returns ``{system: summary}``."""
    rows: dict = {s: {"seconds": [], "tokens": 0, "mismatches": []} for s in systems}
    for i, (pid, ids) in enumerate(prompts):
        order = systems[i % len(systems) :] + systems[: i % len(systems)]
        outs = {}
        for system in order:
            t0 = time.perf_counter()
            outs[system] = generators[system](ids)
            rows[system]["seconds"].append(time.perf_counter() - t0)
            rows[system]["tokens"] += len(outs[system])
        ref = outs.get("hf")
        for system in systems:
            if ref is not None and outs[system] != ref:
                rows[system]["mismatches"].append(pid)
        line = ", ".join(f"{s} {len(outs[s]) / rows[s]['seconds'][-1]:.2f}" for s in systems)
        print(f"  {set_name} {pid}: {line} tok/s", flush=True)
    summary = {}
    for system in systems:
        r = rows[system]
        tps = r["tokens"] / sum(r["seconds"])
        summary[system] = {"tok_s": tps, "per_prompt_s": r["seconds"], "mismatches": r["mismatches"]}
        if system in stats:
            mine = stats[system][-len(prompts) :]
            summary[system]["acceptance"] = statistics.mean(x["acceptance_rate"] for x in mine)
            summary[system]["drafter_source"] = _merge_sources(mine)
    base = summary.get("hf", {}).get("tok_s")
    for system in systems:
        if base:
            summary[system]["vs_hf"] = summary[system]["tok_s"] / base
    return summary


def _merge_sources(stats: list[dict]) -> dict:
    merged: dict = {}
    for s in stats:
        for source, c in s.get("drafter_source", {}).items():
            m = merged.setdefault(source, {"rounds": 0, "drafted": 0, "accepted": 0})
            for key in m:
                m[key] += c[key]
    return merged


def report(results: dict, systems: list[str], a) -> str:
    hw = results["hardware"]
    lines = [
        f"Command: `specdec bench --lookup --prompts {a.prompts} --max-new-tokens {a.max_new_tokens}`",
        "",
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}. Target {a.target_model}, drafter "
        f"{a.drafter_model}; greedy, {a.max_new_tokens} tokens, EOS ignored, in process.",
        "",
        "| set | "
        + " | ".join(f"{s} tok/s" for s in systems)
        + " | ngram / hf | ngram / hf-lookup | hybrid / "
        "max(model, ngram) | hybrid / model | ids = hf |",
        "|---" * (len(systems) + 6) + "|",
    ]
    for set_name, summary in results["sets"].items():
        tps = {s: summary[s]["tok_s"] for s in systems}

        def ratio(x, y):
            return f"{x / y:.2f}×" if x and y else "–"

        lines.append(
            f"| {set_name} | "
            + " | ".join(f"{tps[s]:.2f}" for s in systems)
            + f" | {ratio(tps.get('ngram'), tps.get('hf'))} | {ratio(tps.get('ngram'), tps.get('hf-lookup'))}"
            + f" | {ratio(tps.get('hybrid'), max(tps.get('model', 0), tps.get('ngram', 0)))}"
            + f" | {ratio(tps.get('hybrid'), tps.get('model'))}"
            + f" | {'yes' if not any(summary[s]['mismatches'] for s in systems) else 'NO'} |"
        )
    lines += ["", "Acceptance and drafter sources (specdec systems):", ""]
    for set_name, summary in results["sets"].items():
        for s in systems:
            if "acceptance" in summary[s]:
                lines.append(
                    f"- {set_name} {s}: acceptance {summary[s]['acceptance']:.2f}, sources {summary[s]['drafter_source']}"
                )
    return "\n".join(lines) + "\n"
