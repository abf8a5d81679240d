"""Speed options for the two roles that cannot change what is generated.

* **Small-block linear fast path (verifier).** On CPU, ``nn.Linear`` over a handful of rows goes through a
  GEMM path that repacks the whole weight on every call; computing ``(W @ x.T).T`` keeps the weight as the
  streaming operand and stays near the memory-bound cost. Whether it is faster is measured by a probe on
  the actual device and largest layer at start-up (``mode="auto"``), never assumed.
* **Drafter precision.** The drafter only proposes; the verifier's exact check makes any drafter lossless,
  so it may run quantised: dynamic int8 linear layers on CPU, bf16/fp16 on GPUs.
"""

from __future__ import annotations

import logging
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FAST_MAX_ROWS = 16  # blocks up to this many positions take the fast path (a verify block is k + 1)


def _fast_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows > FAST_MAX_ROWS or x.dtype != self.weight.dtype:
        return F.linear(x, self.weight, self.bias)
    flat = x.reshape(rows, x.shape[-1])  # [rows, in]
    out = (self.weight @ flat.T).T  # [rows, out]: the weight [out, in] streams as the left operand
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.weight.shape[0])


def _fast_conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    """The same for transformers' GPT-2 ``Conv1D`` (weight stored [in, out], y = x @ W + b)."""
    rows = x.numel() // x.shape[-1]
    if rows > FAST_MAX_ROWS or x.dtype != self.weight.dtype:
        return torch.addmm(self.bias, x.reshape(rows, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], self.nf
        )
    out = (self.weight.T @ x.reshape(rows, x.shape[-1]).T).T + self.bias  # [rows, out]
    return out.reshape(*x.shape[:-1], self.nf)


def _fast_forwards(model: nn.Module):
    """(module, fast forward) for every layer the fast path covers."""
    from transformers.pytorch_utils import Conv1D

    for module in model.modules():
        if type(module) is nn.Linear:
            yield module, _fast_linear_forward
        elif isinstance(module, Conv1D):
            yield module, _fast_conv1d_forward


def _time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def probe_fast_linear(model: nn.Module, rows: tuple[int, ...] = (2, 5, 9)) -> float:
    """Speed ratio stock / fast on the model's largest linear layer at small row counts (>1: fast wins)."""
    layer = max(
        (m for m in model.modules() if type(m) is nn.Linear), key=lambda m: m.weight.numel(), default=None
    )
    if layer is None:
        return 0.0
    ratios = []
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(1, n, layer.in_features, dtype=layer.weight.dtype, device=layer.weight.device)
            sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
            stock = _time(lambda: (F.linear(x, layer.weight, layer.bias), sync()))  # noqa: B023
            fast = _time(lambda: (_fast_linear_forward(layer, x), sync()))  # noqa: B023
            ratios.append(stock / max(fast, 1e-9))
    return min(ratios)


def enable_fast_linear(model: nn.Module, mode: str = "auto", min_gain: float = 1.1) -> bool:
    """Install the small-block fast path on every ``nn.Linear`` when ``mode`` is "on", or "auto" and the
    probe measures at least ``min_gain`` speed-up. Returns whether it was installed."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"fast verify mode must be auto, on or off, got {mode!r}")
    if mode == "off":
        return False
    if mode == "auto":
        gain = probe_fast_linear(model)
        log.info("small-block linear probe: fast path %.2fx the stock path", gain)
        if gain < min_gain:
            return False
    for module, forward in _fast_forwards(model):
        module.forward = types.MethodType(forward, module)
    return True


def prepare_drafter(model: nn.Module, quantization: str = "none") -> nn.Module:
    """Apply a drafter precision option: "none", "int8" (CPU dynamic int8), "bf16", "fp16", or "auto".

    "auto" keeps the model as loaded on GPUs (already bf16 by default there) and, on CPU, takes int8 when a
    probe of one decoding step measures it at least 1.5x faster than float32.
    """
    if quantization == "auto":
        return _auto_drafter(model)
    if quantization in ("", "none"):
        return model
    if quantization == "int8":
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise ValueError("int8 dynamic quantization runs on CPU; use bf16 or fp16 on GPUs")
        import warnings

        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # eager-mode quantization prints a migration notice
            warnings.simplefilter("ignore")
            return quantize_dynamic(model.float(), {nn.Linear}, dtype=torch.qint8)
    if quantization in ("bf16", "fp16"):
        return model.to(torch.bfloat16 if quantization == "bf16" else torch.float16)
    raise ValueError(f"unknown drafter quantization {quantization!r}: none, int8, bf16 or fp16")


def _step_time(model: nn.Module, repeats: int = 3) -> float:
    """Best time of one single-token decoding step after a 32-token context."""
    from .runner import ModelRunner

    runner = ModelRunner(model)  # type: ignore[arg-type]
    seq = runner.new_sequence()
    runner.prefill(seq, list(range(32)))
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        runner.extend(seq, [40 + i], keep=1)
        best = min(best, time.perf_counter() - t0) if i else best  # first step is a warm-up
    return best


def _auto_drafter(model: nn.Module) -> nn.Module:
    if next(model.parameters()).device.type != "cpu":
        return model
    quantized = prepare_drafter(model, "int8")
    gain = _step_time(model) / _step_time(quantized)
    log.info(
        "drafter precision probe: int8 step %.2fx float32 -> %s", gain, "int8" if gain >= 1.5 else "float32"
    )
    return quantized if gain >= 1.5 else model
