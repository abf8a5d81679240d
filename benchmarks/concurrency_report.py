"""The concurrency benchmark's results as JSON, a markdown report and a plot of aggregate tokens/s."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from .common import roofline


def _f(x: float, digits: int = 2) -> str:
    return "–" if x != x else f"{x:.{digits}f}"  # NaN -> dash


def layout_table(results: dict, layout: str) -> list[str]:
    meta = results["meta"]
    levels = results.get(layout, {})
    with_baseline = any("baseline" in systems for systems in levels.values())
    lines = [
        "| N | specdec tok/s | no-draft tok/s | HF batch tok/s | specdec / no-draft | specdec / HF batch "
        "| per request tok/s (specdec, no-draft) | TTFT p50 / p95 s (specdec) | TTFT p50 / p95 s (no-draft) "
        "| ITL p50 / p95 ms (specdec; no-draft; HF batch) | acceptance | drafted/round | plain rounds "
        "| target-only roofline tok/s (bound) | no-draft % of roofline | specdec roofline tok/s (bound) "
        "| specdec % of its roofline |"
        + (" previous version tok/s (specdec / it) |" if with_baseline else ""),
        "|---" * (18 if with_baseline else 17) + "|",
    ]
    for n, systems in sorted(results.get(layout, {}).items(), key=lambda kv: int(kv[0])):
        sd, nd = systems.get("specdec", {}), systems.get("no-draft", {})
        hf = results.get("hf-batch", {}).get(n, {})
        roof = roofline(
            int(n), meta["target_bytes"], meta["target_params"], meta["bandwidth_gbs"], meta["gflops"]
        )
        drafted = sd.get("drafted_per_round", 0.0)
        sd_roof = roofline(
            int(n),
            meta["target_bytes"],
            meta["target_params"],
            meta["bandwidth_gbs"],
            meta["gflops"],
            positions=1 + drafted,
            tokens=1 + sd.get("acceptance", 0.0) * drafted,
        )
        sd_t, nd_t, hf_t = (
            sd.get("aggregate_tps", 0.0),
            nd.get("aggregate_tps", 0.0),
            hf.get("aggregate_tps", 0.0),
        )
        lines.append(
            f"| {n} | {_f(sd_t)} | {_f(nd_t)} | {_f(hf_t) if hf else '–'} | {_f(sd_t / nd_t) if nd_t else '–'}x "
            f"| {_f(sd_t / hf_t) if hf_t else '–'}x | {_f(sd.get('per_request_tps', 0))}, {_f(nd.get('per_request_tps', 0))} "
            f"| {_f(sd.get('ttft_p50', float('nan')))} / {_f(sd.get('ttft_p95', float('nan')))} "
            f"| {_f(nd.get('ttft_p50', float('nan')))} / {_f(nd.get('ttft_p95', float('nan')))} "
            f"| {_itl(sd)}; {_itl(nd)}; {_itl(hf)} "
            f"| {_f(sd.get('acceptance', 0))} | {_f(sd.get('drafted_per_round', 0))} | {sd.get('plain_round_share', 0):.0%} "
            f"| {_f(roof['tps'])} ({roof['bound']}) | {nd_t / roof['tps']:.0%} "
            f"| {_f(sd_roof['tps'])} ({sd_roof['bound']}) | {sd_t / sd_roof['tps']:.0%} |"
            + (_baseline_cell(systems, sd_t) if with_baseline else "")
        )
    return lines


def _itl(system: dict) -> str:
    if not system:
        return "–"
    return f"{_f(1000 * system.get('itl_p50', float('nan')), 0)} / {_f(1000 * system.get('itl_p95', float('nan')), 0)}"


def _baseline_cell(systems: dict, specdec_tps: float) -> str:
    base = systems.get("baseline", {}).get("aggregate_tps", 0.0)
    return f" {_f(base)} ({_f(specdec_tps / base)}x) |" if base else " – |"


def class_table(results: dict, layout: str) -> list[str]:
    lines = ["| N | class | specdec tok/s per request | no-draft | ratio |", "|---|---|---|---|---|"]
    for n, systems in sorted(results.get(layout, {}).items(), key=lambda kv: int(kv[0])):
        sd = systems.get("specdec", {}).get("per_class_tps", {})
        nd = systems.get("no-draft", {}).get("per_class_tps", {})
        for cls in sorted(sd):
            if cls in nd and nd[cls]:
                lines.append(f"| {n} | {cls} | {_f(sd[cls])} | {_f(nd[cls])} | {sd[cls] / nd[cls]:.2f}x |")
    return lines


def command_line() -> str:
    return f"specdec bench {shlex.join(sys.argv[2:])}"


def write_load_reports(results: dict, a) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = results["meta"]
    meta.setdefault("command", command_line())
    (out / "load.json").write_text(json.dumps(results, indent=1))
    hw = meta["hardware"]
    md = [
        f"Command: `{meta.setdefault('command', command_line())}`",
        "",
        f"Hardware: {hw.get('cpu', '?')} — {hw.get('cores')} cores, {hw.get('ram_gb')} GiB RAM; torch {hw.get('torch')}; "
        f"copy bandwidth {meta['bandwidth_gbs']:.1f} GB/s, fp32 GEMM {meta['gflops']:.0f} GFLOP/s. "
        f"Target {Path(meta['target']).name}, drafter {Path(meta['drafter']).name}; "
        f"{a.max_new_tokens} tokens per request, greedy, EOS ignored.",
    ]
    for layout in a.layouts:
        md += ["", f"### Layout: {layout}", ""] + layout_table(results, layout)
        md += ["", "Per prompt class (mean per-request tokens/s):", ""] + class_table(results, layout)
    probe = results.get("ttft_probe", {})
    if probe:
        md += [
            "",
            "Time to first token of a short prompt, idle verifier vs 8 generations decoding (median of 3):",
            "",
        ]
        md += ["| layout | system | idle s | busy s | busy / idle |", "|---|---|---|---|---|"]
        for layout, systems in probe.items():
            for system, p in systems.items():
                md.append(
                    f"| {layout} | {system} | {p['idle_s']:.2f} | {p['busy_s']:.2f} | {p['busy_s'] / p['idle_s']:.2f}x |"
                )
    lossless = results.get("lossless")
    if lossless:
        diffs = lossless["differences"]
        md += ["", f"Greedy ids of every request vs the same prompt alone: {len(diffs)} differences."]
        for d in diffs:
            md.append(
                f"* {d['layout']} N={d['n']} {d['system']} {d['prompt']}: position {d['position']}, top-2 logit gap {d['top2_gap']:.2e}"
            )
    (out / "load.md").write_text("\n".join(md) + "\n")
    plot(results, a, out / "load_throughput.png")
    print("\n".join(md))


def plot(results: dict, a, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    meta = results["meta"]
    fig, axes = plt.subplots(1, len(a.layouts), figsize=(6 * len(a.layouts), 4.2), squeeze=False)
    for ax, layout in zip(axes[0], a.layouts):
        levels = sorted(results.get(layout, {}), key=int)
        xs = [int(n) for n in levels]
        for system, style in (("specdec", "o-"), ("no-draft", "s-")):
            ax.plot(
                xs,
                [results[layout][n].get(system, {}).get("aggregate_tps", 0) for n in levels],
                style,
                label=system,
            )
        if "hf-batch" in results:
            ax.plot(
                xs,
                [results["hf-batch"].get(n, {}).get("aggregate_tps", 0) for n in levels],
                "^-",
                label="HF generate, padded batch",
            )
        roof = [
            roofline(n, meta["target_bytes"], meta["target_params"], meta["bandwidth_gbs"], meta["gflops"])[
                "tps"
            ]
            for n in xs
        ]
        ax.plot(xs, roof, "k--", linewidth=0.8, label="target-only roofline")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("concurrent generations")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_title(f"{Path(meta['target']).name}: {layout} cores")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":  # python -m benchmarks.concurrency_report DIR: the report again from DIR/load.json
    import argparse

    directory = Path(sys.argv[1])
    saved = json.loads((directory / "load.json").read_text())
    args = saved["meta"]["args"]
    write_load_reports(
        saved,
        argparse.Namespace(
            out=str(directory), layouts=args["layouts"], max_new_tokens=args["max_new_tokens"]
        ),
    )
