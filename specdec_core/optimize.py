"""Speed options for the two roles that cannot change what is generated.

* **Small-block linear fast path (verifier).** On CPU, ``nn.Linear`` over a handful of rows goes through a
  GEMM path that repacks the whole weight on every call. Two alternatives keep such products closer to the
  memory-bound cost: ``transpose`` computes ``(W @ x.T).T`` (the weight streams as the left operand) and
  ``onednn`` keeps the weight of every large layer in oneDNN's layout (``torch._C._nn.mkldnn_linear``,
  replacing the dense copy). ``mode="auto"`` times a whole forward pass of the model at one position and
  at a verify-sized block under each available path at start-up and keeps the fastest, never assumed.
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


ONEDNN_MIN_PARAMS = 1 << 20  # smaller layers stay dense (oneDNN's per-call overhead outweighs the gain)


def _onednn_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).to_mkldnn()  # [rows, in]
    weight, bias = self.__dict__["_onednn_weight"], self.__dict__["_onednn_bias"]
    out = torch._C._nn.mkldnn_linear(flat, weight, bias).to_dense()  # [rows, out]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _install_onednn(model: nn.Module) -> list[nn.Linear]:
    """Give every large fp32 ``nn.Linear`` a oneDNN copy of its weight and route its forward through it."""
    layers = [
        m
        for m in model.modules()
        if type(m) is nn.Linear and m.weight.numel() >= ONEDNN_MIN_PARAMS and m.weight.dtype == torch.float32
    ]
    for m in layers:
        # plain attributes (not buffers): state_dict and .to() keep seeing the module as before
        m.__dict__["_onednn_weight"] = m.weight.detach().to_mkldnn()
        bias = m.bias.detach() if m.bias is not None else torch.zeros(m.out_features)
        m.__dict__["_onednn_bias"] = bias.to_mkldnn()
        m.__dict__["forward"] = types.MethodType(_onednn_linear_forward, m)
    return layers


def _drop_dense_weights(model: nn.Module, layers: list[nn.Linear]) -> None:
    """Free the dense copies of weights now served by oneDNN (never a weight tied to the embeddings)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    tied = get_embeddings().weight if callable(get_embeddings) else None
    for m in layers:
        if m.weight is not tied:
            m.weight.data = torch.empty(0, dtype=m.weight.dtype)


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
    """Speed ratio stock / transpose on the model's largest linear layer at small row counts (>1: it wins)."""
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


FAST_MODES = ("auto", "on", "off", "transpose", "onednn")


def _restore(model: nn.Module) -> None:
    """Undo a probed path: the class's own forward, no oneDNN copies."""
    for module in model.modules():
        for attr in ("forward", "_onednn_weight", "_onednn_bias"):
            module.__dict__.pop(attr, None)


def _forward_time(model: nn.Module, block: int, rows: int = 1) -> float:
    """Best of 2 timed forwards (after a warm-up) of ``rows`` sequences, ``block`` new positions each, after
    a 64-token context."""
    from .runtime.backends.torch_eager import ModelRunner, Row

    runner = ModelRunner(model)  # type: ignore[arg-type]
    seqs = [runner.new_sequence() for _ in range(rows)]
    runner.forward([Row(seq, list(range(64)), 0) for seq in seqs])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        runner.forward([Row(seq, list(range(100, 100 + block)), block) for seq in seqs])
        times.append(time.perf_counter() - t0)
        for seq in seqs:
            runner.rollback(seq, 64)
    return min(times[1:])


# the shapes a verifier serves: one sequence decoding, one verifying a block, a batch of eight decoding
PROBE_SHAPES = ((1, 1), (1, 6), (8, 1))


def _probe_time(model: nn.Module) -> float:
    return sum(_forward_time(model, block, rows) for rows, block in PROBE_SHAPES)


def enable_fast_linear(model: nn.Module, mode: str = "auto", min_gain: float = 1.05) -> str:
    """Install a small-block linear path; returns the one installed ("off", "transpose" or "onednn").

    "on" means "transpose". "auto" is CPU-only (GPUs keep the stock path, which was faster there): it times
    forwards of the shapes a verifier serves (``PROBE_SHAPES``: one sequence decoding, one verifying a
    6-position block, eight sequences decoding) under each path and keeps the fastest when it beats the
    stock path by ``min_gain`` (the README's "Verify fast path" gives the measured timings).
    """
    if mode not in FAST_MODES:
        raise ValueError(f"fast verify mode must be one of {', '.join(FAST_MODES)}, got {mode!r}")
    installed = getattr(model, "_specdec_linear_path", None)
    if installed is not None:  # prepared already (one model object served by several engines, as in tests)
        return installed
    mode = "transpose" if mode == "on" else mode
    if mode == "auto":
        if next(model.parameters()).device.type != "cpu":
            return "off"
        candidates = ["off", "transpose"] + (["onednn"] if torch.backends.mkldnn.is_available() else [])
        timings = {c: float("inf") for c in candidates}
        for _ in range(2):  # two interleaved passes, best of each: one slow moment cannot pick the path
            for candidate in candidates:
                _install(model, candidate, drop_dense=False)
                timings[candidate] = min(timings[candidate], _probe_time(model))
                _restore(model)
        best = min(timings, key=timings.__getitem__)
        log.info(
            "linear path probe (rows x positions %s): %s -> %s",
            " + ".join(f"{r}x{b}" for r, b in PROBE_SHAPES),
            ", ".join(f"{k} {v:.3f}s" for k, v in timings.items()),
            best,
        )
        mode = best if timings["off"] / timings[best] >= min_gain else "off"
    _install(model, mode, drop_dense=True)
    if mode != "off":  # installed, its dense weights possibly dropped: never probe or install over it
        model._specdec_linear_path = mode  # type: ignore[assignment]
    return mode


def _install(model: nn.Module, mode: str, drop_dense: bool) -> None:
    if mode == "transpose":
        for module, forward in _fast_forwards(model):
            module.forward = types.MethodType(forward, module)
    elif mode == "onednn":
        layers = _install_onednn(model)  # small layers keep the stock path (faster for them at few rows)
        if drop_dense:
            _drop_dense_weights(model, layers)


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
    raise ValueError(f"unknown drafter quantization {quantization!r}: auto, none, int8, bf16 or fp16")


def _auto_drafter(model: nn.Module) -> nn.Module:
    if next(model.parameters()).device.type != "cpu":
        return model
    quantized = prepare_drafter(model, "int8")
    gain = _forward_time(model, 1) / _forward_time(quantized, 1)
    log.info(
        "drafter precision probe: int8 step %.2fx float32 -> %s", gain, "int8" if gain >= 1.5 else "float32"
    )
    return quantized if gain >= 1.5 else model
