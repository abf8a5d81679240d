"""Static-shape forwards: the batched runner's forward with every tensor shape drawn from a few buckets.

On a GPU, eager decoding of a small model is launch-bound: a 0.5B drafter's step costs nearly what a 1.5B
target's does (``docs/gpu_check_h100.json``). A CUDA graph replays a whole forward's kernels with one launch,
but only for the shapes it was captured with. ``StaticRunner`` makes every forward one of a few shapes:

- rows padded to a rows bucket (``Buckets.rows``), tokens per row to a width bucket (``Buckets.widths``:
  1 for a drafter's step, k + 1 for a verify, prompt chunks);
- the KV buffers preallocated once (``SlotKV.reserve``: every slot, ``Buckets.capacity`` positions), and
  attention always over the whole capacity, masked per row, so the attended length is no shape either;
- padding rows, and the padding tokens of short rows, write their keys into a scratch slot that no
  sequence owns (a real row's positions past its length are never written by padding);
- rollback still moves a sequence's length only; nothing is reallocated.

The base model runs on those static shapes (captured per bucket on CUDA, eager elsewhere); the LM head then
runs on the picked positions only, outside the graph (a verify needs k + 1 of them, a step 1).

On CPU the static path is slower than the dynamic one (it attends over the capacity) and exists to be tested:
it must give the dynamic path's logits (fp32, atol 1e-4) and greedy ids (``tests/test_static.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..interface import Row, Sequence
from ..kv import BatchCache
from .torch_eager import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Buckets:
    """The shapes a static runner runs: rows per forward, tokens per row, positions per sequence."""

    rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    widths: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 32, 64, 128)
    capacity: int = 2048

    @staticmethod
    def fit(n: int, options: tuple[int, ...]) -> int | None:
        """The smallest bucket that holds ``n`` (None: none does)."""
        return next((b for b in sorted(options) if b >= n), None)


class StaticRunner(ModelRunner):
    """A ``ModelRunner`` whose forwards have static shapes (module docstring); ``graphs``: capture a CUDA graph
    per (rows, width) bucket at start-up and replay it (CUDA only; elsewhere the same shapes run eagerly).

    ``max_sequences`` slots are preallocated (plus the scratch slot) and never grow: a sequence past them,
    or past ``Buckets.capacity`` positions, is refused. A forward wider or taller than the largest bucket
    runs on the dynamic path (the same buffers; logged once).
    """

    def __init__(
        self,
        model,
        name: str = "model",
        buckets: Buckets | None = None,
        max_sequences: int = 32,
        graphs: bool = False,
        prefix_cache_tokens: int = 0,
    ) -> None:
        self.buckets = buckets or Buckets()
        super().__init__(
            model,
            name,
            slots=max_sequences + 1,
            capacity=self.buckets.capacity,
            prefix_cache_tokens=prefix_cache_tokens,
        )
        self.scratch = max_sequences  # the last slot: padding writes here
        self._free.remove(self.scratch)
        self.max_positions = min(self.max_positions or self.buckets.capacity, self.buckets.capacity)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._warned = False
        self._allocate()
        self.capture_s = 0.0
        if graphs and self.device.type == "cuda":
            self.capture()

    # -- sequences: fixed slots ------------------------------------------------------------------------
    def _grow(self) -> list[int]:
        raise RuntimeError(
            f"static runner {self.name}: all {self.kv.slots - 1} preallocated sequence slots are in use"
        )

    def _allocate(self) -> None:
        """Allocate every layer's buffers now (one eager forward on the scratch slot), at full size."""
        self.kv.reserve(self.kv.slots, self.buckets.capacity)
        inputs = self._inputs([self._pad()], 1, 1)
        self._run_base(inputs)

    # -- the forward -----------------------------------------------------------------------------------
    def _check_rows(self, rows: list[Row]) -> None:
        super()._check_rows(rows)
        for r in rows:  # a stepped row's steps included: refused before its first forward
            n = len(r.seq) + len(r.tokens) + (r.steps - 1 if r.pick is not None else 0)
            if n > self.buckets.capacity:
                raise ValueError(
                    f"a sequence of {n} positions exceeds the static runner's capacity of {self.buckets.capacity}"
                )

    def _forward(self, rows: list[Row], fed: torch.Tensor | None = None) -> list[torch.Tensor]:
        width = max(len(r.tokens) for r in rows)
        b_rows, b_width = Buckets.fit(len(rows), self.buckets.rows), Buckets.fit(width, self.buckets.widths)
        if b_rows is None or b_width is None:
            if not self._warned:
                log.warning(
                    "%s: a forward of %d rows x %d tokens is past the largest bucket: dynamic path",
                    self.name,
                    len(rows),
                    width,
                )
                self._warned = True
            return super()._forward(rows, fed)
        inputs = self._inputs(rows, b_rows, b_width)
        if fed is not None:  # a stepped row's picks, already on the device: padded to the bucket there
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["input_ids"][: len(rows)] = fed
        graph = self._graphs.get((b_rows, b_width))
        hidden = graph.run(inputs) if graph is not None else self._run_base(inputs)  # [Bb, Tb, hidden]
        return self._finish(rows, hidden)

    def _inputs(self, rows, b_rows: int, b_width: int) -> dict[str, torch.Tensor]:
        """Host-built inputs of one bucket: ids, positions, and the slot and position each token writes (the
        mask is built from the positions on the device, inside the graph)."""
        rows = list(rows) + [self._pad()] * (b_rows - len(rows))
        lengths = torch.tensor([len(r.seq) for r in rows])  # [Bb]
        counts = torch.tensor([len(r.tokens) for r in rows])  # [Bb]
        offsets = torch.arange(b_width)  # [Tb]
        real = offsets[None, :] < counts[:, None]  # [Bb, Tb]
        slots = torch.tensor([r.seq.slot for r in rows])  # [Bb]
        own = lengths[:, None] + offsets[None, :]  # [Bb, Tb]
        # padding tokens: their row's last real position for the embeddings, the scratch slot for their keys
        position_ids = torch.where(real, own, (lengths + counts - 1).clamp(min=0)[:, None])
        write_rows = torch.where(real, slots[:, None], torch.full_like(own, self.scratch))
        write_pos = torch.where(real, own, offsets[None, :].expand_as(own))
        input_ids = torch.zeros(b_rows, b_width, dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long).clamp_min(0)  # PENDING
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "slots": slots,
            "write_rows": write_rows,
            "write_pos": write_pos,
        }

    def _pad(self) -> Row:
        """A padding row: one token on the scratch slot, no logits."""
        return Row(Sequence(slot=self.scratch), [0], keep=0)

    def _run_base(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = self.device
        on = {k: v.to(dev) for k, v in inputs.items()}
        return self._base(on)

    def _base(self, on: dict[str, torch.Tensor]) -> torch.Tensor:
        """The base model on device inputs of one bucket: [Bb, Tb, hidden] (what a graph captures). A token
        attends to its row's positions up to its own: the [Bb, 1, Tb, capacity] mask, built here."""
        cache = BatchCache(
            self.kv, on["slots"], on["write_pos"], self.buckets.capacity, write_rows=on["write_rows"]
        )
        positions = torch.arange(self.buckets.capacity, device=on["position_ids"].device)
        mask = positions[None, None, :] <= on["position_ids"][:, :, None]  # [Bb, Tb, C]
        out = self.base(
            input_ids=on["input_ids"],
            attention_mask=mask[:, None],
            position_ids=on["position_ids"],
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return out.last_hidden_state

    # -- CUDA graphs -----------------------------------------------------------------------------------
    def capture(self, max_tokens: int = 1024) -> None:
        """Capture one graph per (rows, width) bucket of at most ``max_tokens`` padded tokens (larger ones
        run the same static shapes eagerly); logs what was captured and how long it took."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        # largest first: the shared memory pool is sized by the first capture
        for b_rows in sorted(self.buckets.rows, reverse=True):
            for b_width in sorted(self.buckets.widths, reverse=True):
                if b_rows * b_width <= max_tokens:
                    self._graphs[(b_rows, b_width)] = _Graph(self, b_rows, b_width, pool)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        log.info(
            "%s: captured %d CUDA graphs (rows %s x tokens %s, capacity %d) in %.1fs",
            self.name,
            len(self._graphs),
            "/".join(map(str, self.buckets.rows)),
            "/".join(map(str, self.buckets.widths)),
            self.buckets.capacity,
            self.capture_s,
        )


def make_runner(
    model,
    name: str = "model",
    static: str = "auto",
    graphs: bool = True,
    max_sequences: int = 64,
    max_rows: int = 32,
    max_width: int = 128,
    capacity: int = 2048,
    prefix_cache_tokens: int = 0,
) -> ModelRunner:
    """The runner a service uses. ``static``: "on", "off" or "auto" (static shapes on CUDA devices only:
    on CPU they attend over the whole capacity and run slower). With static shapes on CUDA, ``graphs``
    captures a CUDA graph per bucket at start-up; a capture that fails is logged and the service runs the
    dynamic runner instead."""
    if static not in ("auto", "on", "off"):
        raise ValueError(f"static shapes must be auto, on or off, got {static!r}")
    device = next(model.parameters()).device
    if static == "off" or (static == "auto" and device.type != "cuda"):
        return ModelRunner(model, name=name, prefix_cache_tokens=prefix_cache_tokens)
    limit = int(getattr(model.config, "max_position_embeddings", 0) or capacity)
    buckets = Buckets(
        rows=_powers(max_rows),
        widths=tuple(sorted({w for w in Buckets().widths if w < max_width} | {max_width})),
        capacity=min(capacity, limit),
    )
    try:
        return StaticRunner(model, name, buckets, max_sequences, graphs, prefix_cache_tokens)
    except Exception:  # a model or device the capture does not support: still serve, eagerly
        log.exception("%s: static shapes / CUDA graphs failed at start-up; running the dynamic runner", name)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return ModelRunner(model, name=name, prefix_cache_tokens=prefix_cache_tokens)


def _powers(n: int) -> tuple[int, ...]:
    out, p = [], 1
    while p < n:
        out.append(p)
        p *= 2
    return tuple(out + [n])


class _Graph:
    """One captured forward: static device inputs are filled, the graph replayed, the static output read."""

    def __init__(self, runner: StaticRunner, b_rows: int, b_width: int, pool) -> None:
        self.static = {k: v.to(runner.device) for k, v in runner._inputs([], b_rows, b_width).items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (allocator, lazy init)
                runner._base(self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = runner._base(self.static)

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        for k, v in inputs.items():
            self.static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.out
