"""What the batch costs and yields: the inputs of the load-aware draft length.

``ForwardCosts`` learns the seconds of a forward as a function of the total tokens it feeds, from every
forward the runner makes (all sessions' rows together). At a few tokens a forward is bound by reading the
weights and costs nearly the same for 1 or 9 tokens; as the batch grows it becomes compute bound and each
extra token costs its share. Drafted tokens are extra tokens in that shared forward, so their price rises
with the load.

``BatchLoad`` adds who shares the batch: the policies of the generations running (``join`` / ``leave``),
whose acceptance and drafting costs a session weighs its own block against. ``snapshot()`` hands the
policy a ``Load`` (``specdec_core.draft_length``), which knows nothing of scheduling.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

from ..draft_length import DraftLengthPolicy, Load, Peer


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
        curve = self._curve
        if curve is not None:
            return curve
        with self._lock:
            xs = sorted(self._mean)
            curve = self._curve = (xs, isotonic([self._mean[x] for x in xs], [self._weight[x] for x in xs]))
            return curve

    @property
    def known(self) -> bool:
        return bool(self._mean)

    @classmethod
    def next_bucket(cls, b: int) -> int:
        """The bucket after ``b``."""
        t = b + 1
        while cls.bucket(t) <= b:
            t += 1
        return cls.bucket(t)

    def cost(self, tokens: float, optimistic: bool = False) -> float:
        """Seconds of a forward of ``tokens`` tokens (interpolated; extrapolated by the last slope).
        ``optimistic``: where no forward of ``tokens``' bucket was measured, the cost of the widest measured
        below it, the least it can be (costs never fall with more tokens). The draft-length policies plan
        with it, so a width never tried gets tried and measured instead of being priced out for good on a
        line through others: llama.cpp's costs step (4 positions cost about what 2 do, and 5 nearly what 8
        do; docs/serving.md), and a line from 1 and 9 positions overprices 4 by a third."""
        xs, ys = self._fit()
        if not xs:
            raise ValueError("no forward measured yet")
        if tokens <= xs[0] or len(xs) == 1:
            return ys[0]  # one point: no slope known yet (memory bound is the optimistic guess)
        i = bisect.bisect_left(xs, tokens)
        if i < len(xs):
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            if optimistic and tokens < x1 and self.next_bucket(x0) < x1:
                return y0  # buckets between x0 and x1 not measured
            return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
        slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        return ys[-1] + slope * (tokens - xs[-1])


class BatchLoad:
    """The batch as the draft-length policies see it: who is in it, and what a forward costs."""

    def __init__(self) -> None:
        self.costs = ForwardCosts()
        self._lock = threading.Lock()
        self._members: list[DraftLengthPolicy] = []
        self._peers: list[tuple[DraftLengthPolicy, Peer]] | None = None  # cached until the next forward

    def join(self, policy: DraftLengthPolicy) -> None:
        """A generation starts: its policy is one of the batch's sessions until ``leave``."""
        with self._lock:
            self._members.append(policy)
            self._peers = None

    def leave(self, policy: DraftLengthPolicy) -> None:
        with self._lock:
            if policy in self._members:
                self._members.remove(policy)
            self._peers = None

    def on_forward(self, row_tokens: Sequence[int], seconds: float) -> None:
        """Record one forward: tokens fed by each row, seconds it took. The cost counts the positions
        computed: every row padded to the widest."""
        self.costs.record(len(row_tokens) * max(row_tokens), seconds)
        self._peers = None  # the members' measurements moved on

    def forward_cost(self, tokens: int) -> float:
        """Seconds of a forward computing ``tokens`` positions (proportional until one is measured)."""
        return self.costs.cost(tokens) if self.costs.known else float(tokens)

    def snapshot(self, own: DraftLengthPolicy | None = None) -> Load:
        """The load ``own`` sees: its peers in the batch and the forward cost curve."""
        with self._lock:
            if self._peers is None:
                self._peers = [(m, m.peer()) for m in self._members]
            peers = tuple(p for m, p in self._peers if m is not own)
        if not self.costs.known:
            return Load(peers=peers, forward_s=None)
        # a session alone explores the widths of its own blocks (``ForwardCosts.cost``); a batch plans on
        # the interpolated costs: its forwards' sizes vary with who runs, and pricing each one never
        # measured at its floor had batches of 4 and 8 draft at a loss (6-7% under --no-draft, measured)
        return Load(peers=peers, forward_s=self._explored_cost if not peers else self.costs.cost)

    def _explored_cost(self, tokens: float) -> float:
        return self.costs.cost(tokens, optimistic=True)
