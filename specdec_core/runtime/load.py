"""What the batch costs and yields: the inputs of the load-aware draft length.

``ForwardCosts`` learns the seconds of a forward as a function of the total tokens it feeds, from every
forward the runner makes (all sessions' rows together). At a few tokens a forward is bound by reading the
weights and costs nearly the same for 1 or 9 tokens; as the batch grows it becomes compute bound and each
extra token costs its share. Drafted tokens are extra tokens in that shared forward, so their price rises
with the load.

``BatchLoad`` adds what a session needs to weigh its own block against the others': how many rows share
its forwards and how many tokens each of them feeds and emits (running means). ``snapshot()`` hands the
policy a ``Load`` (``specdec_core.draft_length``), which knows nothing of scheduling.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ..draft_length import Load

PREFILL_ROW = 16  # rows feeding more tokens than this are prompt chunks: costs yes, per-row means no


def isotonic(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in weighted least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out: list[float] = []
    for mean, _, count in blocks:
        out.extend([mean] * int(count))
    return out


class ForwardCosts:
    """Forward seconds by total tokens fed: recent measurements per token count, made non-decreasing."""

    def __init__(self, alpha: float = 0.25, max_weight: float = 16.0) -> None:
        self.alpha = alpha
        self.max_weight = max_weight
        self._mean: dict[int, float] = {}
        self._weight: dict[int, float] = {}
        self._lock = threading.Lock()
        self._curve: tuple[list[int], list[float]] | None = None

    @staticmethod
    def bucket(tokens: int) -> int:
        """Exact counts up to 16, then 8 buckets per doubling."""
        if tokens <= 16:
            return max(tokens, 1)
        step = 1 << (tokens.bit_length() - 4)
        return int(round(tokens / step)) * step

    def record(self, tokens: int, seconds: float) -> None:
        b = self.bucket(tokens)
        with self._lock:
            old = self._mean.get(b)
            self._mean[b] = seconds if old is None else old + self.alpha * (seconds - old)
            self._weight[b] = min(self._weight.get(b, 0.0) + 1.0, self.max_weight)
            self._curve = None

    def _fit(self) -> tuple[list[int], list[float]]:
        with self._lock:
            if self._curve is None:
                xs = sorted(self._mean)
                self._curve = (xs, isotonic([self._mean[x] for x in xs], [self._weight[x] for x in xs]))
            return self._curve

    @property
    def known(self) -> bool:
        return bool(self._mean)

    def cost(self, tokens: float) -> float:
        """Seconds of a forward of ``tokens`` tokens (interpolated; extrapolated by the last slope)."""
        xs, ys = self._fit()
        if not xs:
            raise ValueError("no forward measured yet")
        if tokens <= xs[0] or len(xs) == 1:
            return ys[0]  # one point: no slope known yet (memory bound is the optimistic guess)
        for i in range(1, len(xs)):
            if tokens <= xs[i]:
                x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
                return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
        slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        return ys[-1] + slope * (tokens - xs[-1])


class BatchLoad:
    """Running means of the batch a session's rows share, for the draft-length policy."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.costs = ForwardCosts()
        self._lock = threading.Lock()
        self._rows = 0.0  # rows per forward
        self._row_tokens = 0.0  # tokens a (non-prefill) row feeds
        self._row_emitted = 0.0  # tokens a row emits
        self._emitted = 0  # emitted since the last forward was recorded
        self._seen = False

    def note_emitted(self, tokens: int) -> None:
        """A row of the forward being recorded emitted ``tokens`` tokens (called on the compute thread)."""
        with self._lock:
            self._emitted += tokens

    def on_forward(self, row_tokens: Sequence[int], seconds: float) -> None:
        """Record one forward: tokens fed by each row, seconds it took (after its rows' results are in)."""
        self.costs.record(sum(row_tokens), seconds)
        decode = [n for n in row_tokens if n <= PREFILL_ROW]
        with self._lock:
            emitted, self._emitted = self._emitted, 0
            rows = float(len(row_tokens))
            if not decode:
                return
            per_row = sum(decode) / len(decode)
            emitted_per_row = emitted / len(decode)
            if not self._seen:
                self._rows, self._row_tokens, self._row_emitted, self._seen = (
                    rows,
                    per_row,
                    emitted_per_row,
                    True,
                )
                return
            a = self.alpha
            self._rows += a * (rows - self._rows)
            self._row_tokens += a * (per_row - self._row_tokens)
            self._row_emitted += a * (emitted_per_row - self._row_emitted)

    def snapshot(self) -> Load:
        """The load one session sees: the other rows of its forwards and the forward cost curve."""
        with self._lock:
            others = max(self._rows - 1.0, 0.0)
            tokens, emitted = others * self._row_tokens, others * self._row_emitted
        return Load(
            others_tokens=tokens,
            others_emitted=emitted,
            forward_s=self.costs.cost if self.costs.known else None,
        )
