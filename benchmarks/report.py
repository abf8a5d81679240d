"""Turn benchmark runs into a JSON file, a markdown table and a speed-up plot."""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sum(stats: list[dict], key: str) -> float:
    return sum(float(s.get(key, 0) or 0) for s in stats)


def summarise(runs, meta) -> list[dict]:
    """One row per run with the derived columns (speed-ups, acceptance, time split, bounds)."""
    hf = {r.temperature: r for r in runs if r.system == "hf"}
    assisted = {(r.temperature, r.k): r for r in runs if r.system == "assisted"}
    bw = meta["bandwidth_gbs"] * 1e9
    rows = []
    for r in runs:
        tps = r.tokens / r.seconds if r.seconds else 0.0
        row = {
            "system": r.system,
            "temperature": r.temperature,
            "k": r.k,
            "tokens": r.tokens,
            "seconds": round(r.seconds, 3),
            "tokens_per_s": tps,
            "peak_rss_mb": r.peak_rss_mb,
            "mismatches": r.mismatches,
            "ids_compared_with": r.ids_compared_with,
        }
        base = hf.get(r.temperature)
        if base and base.seconds:
            row["speedup_vs_hf"] = tps / (base.tokens / base.seconds)
        peer = assisted.get((r.temperature, r.k)) or max(
            (a for (t, _), a in assisted.items() if t == r.temperature),
            key=lambda a: a.tokens / a.seconds,
            default=None,
        )
        if peer and peer.seconds and r.system != "assisted":
            row["speedup_vs_assisted"] = tps / (peer.tokens / peer.seconds)
        if r.stats:
            row.update(_spec_columns(r, meta, base, bw))
        elif r.system == "hf":
            row["roofline_tokens_per_s"] = bw / meta["target_bytes"]
        rows.append(row)
    return rows


def _spec_columns(r, meta, base, bw) -> dict:
    s = r.stats
    drafted, accepted, rounds = _sum(s, "drafted"), _sum(s, "accepted"), _sum(s, "rounds")
    alpha = accepted / drafted if drafted else 0.0
    k_mean = drafted / rounds if rounds else 0.0
    wall = _sum(s, "wall_s")
    draft_s, verify_s, network_s = _sum(s, "draft_s"), _sum(s, "verify_s"), _sum(s, "network_s")
    prefill_s = _sum(s, "prefill_s")
    positions = max(len(x.get("accepted_per_position", [])) for x in s)
    per_pos = [
        sum(x["accepted_per_position"][i] for x in s if i < len(x["accepted_per_position"])) / len(s)
        for i in range(positions)
    ]
    out: dict = {
        "acceptance_rate": alpha,
        "mean_accepted_per_round": accepted / rounds if rounds else 0.0,
        "mean_draft_length": k_mean,
        "accepted_per_position": per_pos,
        "time_split": {
            "draft": draft_s / r.seconds,
            "verify": verify_s / r.seconds,
            "prefill": prefill_s / r.seconds,
            "network": network_s / r.seconds,
            "other": max(r.seconds - draft_s - verify_s - prefill_s - network_s, 0.0) / r.seconds,
        },
        # per round, outside both models' forwards and the prompt prefill: gRPC, sampling, Python
        "overhead_ms_per_round": 1000 * max(r.seconds - draft_s - verify_s - prefill_s, 0.0) / rounds
        if rounds
        else 0.0,
        "verifier_wall_s": wall,
    }
    if base and base.seconds and drafted:
        t_target = base.seconds / base.tokens
        c = (draft_s / drafted) / t_target
        k = k_mean
        bound = (1 - alpha ** (k + 1)) / ((1 - alpha) * (c * k + 1)) if alpha < 1 else (k + 1) / (c * k + 1)
        out.update({"cost_ratio_c": c, "theoretical_speedup": bound})
    round_bytes = k_mean * meta["drafter_bytes"] + meta["target_bytes"]
    out["roofline_tokens_per_s"] = (out["mean_accepted_per_round"] + 1) * bw / round_bytes
    return out


def _fmt(v, spec=".2f", unit=""):
    return "–" if v is None else format(v, spec) + unit


def markdown(rows, meta, command: str, runs=()) -> str:
    hw = meta["hardware"]
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{command}`",
        "",
        f"Hardware: {hw.get('cpu')} — {hw.get('cores')} cores, {hw.get('ram_gb')} GiB RAM"
        + (f", GPU {hw['gpu']}" if hw.get("gpu") else "")
        + f"; torch {hw.get('torch')}; measured copy bandwidth {meta['bandwidth_gbs']:.1f} GB/s.",
        f"Model load (reported apart, not in any timing): target {meta['load_s']['target']:.1f}s, "
        f"drafter {meta['load_s']['drafter']:.1f}s. Weights read per step: target "
        f"{meta['target_bytes'] / 1e9:.2f} GB, drafter {meta['drafter_bytes'] / 1e9:.2f} GB.",
        f"Options: drafter quantization `{meta['args']['drafter_quantization']}`, fast verify "
        f"`{meta['args']['fast_verify']}` (installed: {meta.get('fast_verify')}), "
        f"gRPC drafter lookahead {'on' if meta['args'].get('lookahead') else 'off'}, "
        f"{meta['args']['max_new_tokens']} new tokens per prompt, {meta['args']['prompts']} prompts, "
        f"median of {meta['args']['repeats']} repeat(s), warm-up excluded.",
        "",
        "| system | T | k | tok/s | vs HF | vs assisted | accept α | acc/round | per position | "
        "draft/verify/prefill/net/other | overhead ms/round | bound (theory) | roofline tok/s (% reached) | peak RSS MB | greedy ids |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        split = r.get("time_split")
        split_s = (
            "/".join(f"{split[x]:.0%}" for x in ("draft", "verify", "prefill", "network", "other"))
            if split
            else "–"
        )
        roof = r.get("roofline_tokens_per_s")
        roof_s = f"{roof:.2f} ({r['tokens_per_s'] / roof:.0%})" if roof else "–"
        per_pos = " ".join(f"{p:.2f}" for p in r.get("accepted_per_position", [])) or "–"
        ids = (
            ("MISMATCH: " + "; ".join(r["mismatches"]))
            if r["mismatches"]
            else (f"same as {r['ids_compared_with']}" if r.get("ids_compared_with") else "n/a")
        )
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mb"].items())
        lines.append(
            f"| {r['system']} | {r['temperature']} | {r['k']} | {r['tokens_per_s']:.3f} | {_fmt(r.get('speedup_vs_hf'), unit='x')} | "
            f"{_fmt(r.get('speedup_vs_assisted'), unit='x')} | {_fmt(r.get('acceptance_rate'))} | "
            f"{_fmt(r.get('mean_accepted_per_round'))} | {per_pos} | {split_s} | {_fmt(r.get('overhead_ms_per_round'), '.1f')} | "
            f"{_fmt(r.get('theoretical_speedup'), unit='x')} | {roof_s} | {rss} | {ids} |"
        )
    lines += [
        "",
        "Columns: *vs assisted* compares with HF assisted generation at the same k (its best k for adaptive "
        "rows). *bound (theory)* is (1 − α^(k+1)) / ((1 − α)(c·k + 1)) with the measured α and cost ratio c "
        "(draft time per token / target-only time per token). *roofline* is the memory-bandwidth bound: a round "
        "reads the drafter's weights k times and the target's once, and cannot beat those bytes / measured "
        "bandwidth. *overhead ms/round* is wall time per round outside the two models' forwards (gRPC, "
        "sampling, Python).",
        "",
    ]
    lines += adaptive_vs_fixed(runs)
    slower = [
        r
        for r in rows
        if r["system"] in ("core", "grpc", "grpc-shared") and r.get("speedup_vs_assisted", 2) < 1
    ]
    if slower:
        lines += [
            "Rows where specdec is slower than HF assisted generation: "
            + ", ".join(f"{r['system']} T={r['temperature']} k={r['k']}" for r in slower)
            + ".",
            "",
        ]
    return "\n".join(lines)


def adaptive_vs_fixed(runs) -> list[str]:
    """Adaptive k against each fixed k of the same system and temperature, paired per prompt."""
    lines = []
    for a in runs:
        if a.k != "adaptive" or not a.per_prompt_s:
            continue
        fixed = [
            r
            for r in runs
            if r.system == a.system and r.temperature == a.temperature and isinstance(r.k, int) and r.seconds
        ]
        if not fixed:
            continue
        best = max(fixed, key=lambda r: r.tokens / r.seconds)
        parts = []
        for r in sorted(fixed, key=lambda r: r.k):
            common = [p for p in a.per_prompt_s if p in r.per_prompt_s]
            ratios = [r.per_prompt_s[p] / a.per_prompt_s[p] for p in common]
            geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else float("nan")
            wins = sum(x >= 1 for x in ratios)
            parts.append(f"k={r.k} {geo:.3f}x ({wins}/{len(ratios)} prompts)")
        total = (a.tokens / a.seconds) / (best.tokens / best.seconds)
        lines.append(
            f"- {a.system} T={a.temperature}: adaptive {a.tokens / a.seconds:.3f} tok/s = {total:.3f}x the best "
            f"fixed k (k={best.k}, {best.tokens / best.seconds:.3f} tok/s); per prompt, geometric mean of "
            "fixed time / adaptive time (prompts where adaptive was at least as fast): " + ", ".join(parts)
        )
    if lines:
        lines = (
            ["Adaptive k against fixed k (same run, configurations interleaved per prompt):", ""]
            + lines
            + [""]
        )
    return lines


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = sorted({r["temperature"] for r in rows})
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4), squeeze=False)
    for ax, t in zip(axes[0], temps):
        for system in ("assisted", "core", "grpc", "grpc-shared"):
            pts = sorted(
                (r["k"], r["speedup_vs_hf"])
                for r in rows
                if r["system"] == system
                and r["temperature"] == t
                and isinstance(r["k"], int)
                and "speedup_vs_hf" in r
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="target-only HF")
        ax.set_title(f"temperature {t}")
        ax.set_xlabel("draft length k")
        ax.set_ylabel("speed-up over target-only")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(runs, meta, a) -> None:
    rows = summarise(runs, meta)
    command = (
        "specdec bench " + " ".join(shlex.quote(x) for x in sys.argv[2:] if x)
        if len(sys.argv) > 1
        else "specdec bench"
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "runs": [asdict(r) for r in runs]}, indent=1, default=str)
    )
    md = markdown(rows, meta, command, runs)
    (out / "results.md").write_text(md)
    plot(rows, out / "speedup.png")
    print(md)
    if a.docs:
        docs = ROOT / "docs"
        docs.mkdir(exist_ok=True)
        (docs / "benchmarks.md").write_text(md + "\n![speed-up vs k](benchmark_speedup.png)\n")
        plot(rows, docs / "benchmark_speedup.png")
        (docs / "benchmarks.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
