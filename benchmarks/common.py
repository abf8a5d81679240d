"""What several benchmarks share: the machine they run on (its description, copy bandwidth, GEMM rate and
the roofline those two set), a process's peak RSS, a model's weight bytes, the target-only reference's
``generate`` arguments and the usual prompt set.

Every benchmark module may import this one and it imports none of them, which keeps the imports among
``benchmarks/*.py`` acyclic.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import psutil
import torch

from specdec_core.text import encode_prompt

HERE = Path(__file__).resolve().parent


# -- the machine ----------------------------------------------------------------------------------------


def describe_hardware() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def measure_bandwidth(device: str = "cpu", mb: int = 512) -> float:
    """Memory bandwidth in GB/s from a large tensor copy (bytes read + written), best of 5."""
    src = torch.empty(mb * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def measure_gflops(device: str = "cpu", n: int = 1024) -> float:
    """fp32 GEMM throughput (GFLOP/s), the best of 6 timings."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(6):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def roofline(
    n: int,
    weight_bytes: int,
    params: int,
    bandwidth_gbs: float,
    gflops: float,
    positions: float = 1.0,
    tokens: float = 1.0,
) -> dict:
    """The fastest the target's forwards allow for n rows: each forward reads the weights once and does
    2 * params * n * positions FLOPs, and gives each row ``tokens`` tokens. Target-only decoding is
    positions = tokens = 1; speculative rounds verify 1 + k positions and emit 1 + accepted tokens (drafting
    counted as free, so this bounds specdec from above)."""
    memory_s = weight_bytes / (bandwidth_gbs * 1e9)
    compute_s = 2 * params * n * positions / (gflops * 1e9)
    return {
        "memory_s": memory_s,
        "compute_s": compute_s,
        "bound": "compute" if compute_s > memory_s else "memory",
        "tps": n * tokens / max(memory_s, compute_s),
    }


def peak_rss_mb(pid: int | None = None) -> float:
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- models and prompts ---------------------------------------------------------------------------------


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def hf_kwargs(model, max_new: int, temperature: float) -> dict:
    """``generate()`` arguments for the target-only reference: ``max_new`` tokens, EOS ignored, plain
    sampling at ``temperature`` (0: greedy). Every value is passed explicitly as a keyword: transformers 5
    fills the unset (None) fields of a passed ``generation_config`` from the model's own, so a config with
    ``eos_token_id = None`` still stopped at the model's EOS (the earlier ``hf_config`` did)."""
    pad = model.generation_config.pad_token_id
    return {
        "max_new_tokens": max_new,
        "min_new_tokens": None,
        "do_sample": temperature > 0,
        "temperature": temperature if temperature > 0 else None,
        "top_p": None,
        "top_k": None,
        "repetition_penalty": None,
        "eos_token_id": None,
        "pad_token_id": pad if pad is not None else 0,
    }


def load_prompts(tokenizer, count: int) -> list[tuple[str, list[int]]]:
    """(id, token ids) of the first ``count`` prompts of ``prompts.json``, the set ``specdec bench`` runs."""
    prompts = json.loads((HERE / "prompts.json").read_text())["prompts"][:count]
    return [(p["id"], encode_prompt(tokenizer, p["text"], p["chat"])) for p in prompts]
