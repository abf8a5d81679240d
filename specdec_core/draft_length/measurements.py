"""What one session measured, and the lone session's cost model built on it.

Acceptance per position and per confidence bin, drafting and network costs per round, recent verify times
by block size (a least-squares line through them prices a lone session's forwards), and the drafter's
start price per prefilled context token. A warm start takes a finished session's counters, weighted down
so the new session's own rounds take over within a few rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..drafting import CONFIDENCE_BINS, confidence_bin
from .base import expected_tokens, gains
from .batch import Member

VERIFY_SAMPLES = 16  # verify times kept per block size: the cost line follows recent load
OWN_MEAN_SAMPLES = 3  # a block size measured this often is priced by its own times, not the line
PRIOR_POSITIONS = 100  # a warm start counts as at most this many judged positions...
PRIOR_ROUNDS = 8  # ...and this many rounds of measured costs
PRIOR_STARTS = 2048  # ...and this many context tokens of measured drafter starts
PRIOR_VERIFIES = 4  # ...and this many verify times per block size


def _zeros(n: int) -> list[float]:
    return [0.0] * n


@dataclass
class Measurements:
    """A session's counters. Counts are floats: a warm start brings in a prior's counts weighted down."""

    k_max: int
    min_samples: int = 4  # judged rounds before a position's own acceptance replaces the pooled one
    tried: list[float] = field(init=False)  # rounds that reached position i (index 1..k_max)
    passed: list[float] = field(init=False)  # of those, rounds that accepted position i
    bin_tried: list[float] = field(default_factory=lambda: _zeros(CONFIDENCE_BINS))  # judged, by confidence
    bin_passed: list[float] = field(default_factory=lambda: _zeros(CONFIDENCE_BINS))  # of those, accepted
    uses_confidence: bool = False  # the drafter reports confidences: blocks end by them
    draft_tokens: float = 0.0  # tokens drafted in the rounds whose costs count
    draft_s: float = 0.0  # their drafting seconds
    network_s: float = 0.0  # their seconds outside both models
    rounds: float = 0.0  # drafted rounds whose costs count
    emitted: float = 0.0  # tokens those rounds emitted
    round_s: float = 0.0  # seconds those rounds took
    verify_obs: dict[int, list[float]] = field(default_factory=dict)  # block size m = k + 1 -> recent times
    start_s: float = 0.0  # drafter start time beyond a normal round's, summed over measured starts
    start_tokens: float = 0.0  # context tokens those starts prefilled
    plain_rounds: int = 0  # rounds decoded without drafting
    # the costs counted are a fresh round's only: the first valid round replaces them
    provisional: bool = False
    observed: int = 0  # rounds observed without drafting (a free source's ``observe``)

    def __post_init__(self) -> None:
        self.tried = _zeros(self.k_max + 1)
        self.passed = _zeros(self.k_max + 1)

    # -- acceptance --------------------------------------------------------------------------------------
    def acceptance(self, i: int) -> float:
        """Acceptance of position ``i`` given its predecessors were accepted (0: pooled over positions)."""
        pooled = (sum(self.passed) + 1) / (sum(self.tried) + 2)
        if i == 0 or self.tried[i] < self.min_samples:
            return pooled
        return self.passed[i] / self.tried[i]

    def optimistic_acceptance(self, i: int) -> float:
        """``acceptance(i)`` raised by one standard error: what a session alone plans with, so that two
        learning rounds (whose long blocks reach the drafter's unsure tokens) do not price drafting out
        for good where the gain at stake is smaller than their error; the bonus shrinks as positions are
        judged. On the 1-client benchmark the unbiased 0.84 (0.9 measured over the generation) made
        drafting a coin flip at the plan's margin."""
        rate = self.acceptance(i)
        n = sum(self.tried) if i == 0 or self.tried[i] < self.min_samples else self.tried[i]
        return min(rate + (rate * (1.0 - rate) / (n + 2.0)) ** 0.5, 0.999)

    def acceptance_by_confidence(self) -> tuple[float, ...]:
        """Measured acceptance per confidence bin, pulled toward the pooled rate where a bin is thin."""
        pooled, prior = self.acceptance(0), 2.0
        return tuple(
            (p + prior * pooled) / (t + prior) for p, t in zip(self.bin_passed, self.bin_tried, strict=True)
        )

    # -- costs -------------------------------------------------------------------------------------------
    def t_draft(self) -> float:
        """Mean seconds per drafted token (0 until measured)."""
        return self.draft_s / self.draft_tokens if self.draft_tokens else 0.0

    def t_network(self) -> float:
        """Mean seconds per drafted round outside both models (0 until measured)."""
        return self.network_s / self.rounds if self.rounds else 0.0

    def _verify_line(self) -> tuple[float, float, float]:
        """(mean block size, mean verify time, slope >= 0) of the least-squares line."""
        points = [(size, sum(v) / len(v)) for size, v in self.verify_obs.items()]
        n = len(points)
        mx = sum(p[0] for p in points) / n
        my = sum(p[1] for p in points) / n
        var = sum((p[0] - mx) ** 2 for p in points)
        slope = max(sum((p[0] - mx) * (p[1] - my) for p in points) / var, 0.0) if var > 0 else 0.0
        return mx, my, slope

    def verify_slope(self) -> float:
        """Seconds one more token adds to a lone session's verify (0 until two block sizes are measured)."""
        return self._verify_line()[2] if self.verify_obs else 0.0

    def verify_cost(self, m: float) -> float:
        """Seconds of a lone session's verify of ``m`` positions (1 s until measured): a block size measured
        ``OWN_MEAN_SAMPLES`` times by its own mean, others on the line. Costs need not lie on a line:
        llama.cpp's kernels take positions in groups of 4, so a verify of 4 costs about what one of 2 does
        and one of 5 nearly what one of 8 does (docs/serving.md, the verify slope)."""
        if not self.verify_obs:
            return 1.0
        own = self.verify_obs.get(int(m)) if float(m).is_integer() else None
        if own is not None and len(own) >= OWN_MEAN_SAMPLES:
            return sum(own) / len(own)
        mx, my, slope = self._verify_line()
        return max(my + slope * (m - mx), 1e-6)

    def start_cost(self, tokens: int) -> float:
        """Seconds the drafter needs to prefill ``tokens`` context tokens (0 until a start is measured)."""
        if not tokens or self.start_tokens <= 0:
            return 0.0
        return tokens * self.start_s / self.start_tokens

    def member(self, optimistic: bool = False) -> Member:
        """This session as its batch's plan sees it. Its gains are per position, unless blocks end by
        confidence: then later positions are reached only when the drafter is sure, and their measured
        acceptance overstates what a longer cap would get."""
        rate = self.optimistic_acceptance if optimistic else self.acceptance
        if self.uses_confidence:
            own = gains(rate(0), self.k_max)
        else:
            own = gains([rate(i) for i in range(self.k_max + 1)], self.k_max)
        return Member(own, self.t_draft(), None)

    # -- the lone session's length -----------------------------------------------------------------------
    def expected_rate(self, k: int) -> float:
        """Tokens per second of a lone session drafting ``k >= 1`` tokens a round, on the verify line."""
        acceptance = [self.acceptance(i) for i in range(k + 1)]
        return expected_tokens(acceptance, k) / (
            self.verify_cost(k + 1) + (k * self.t_draft() + self.t_network())
        )

    def best_length(self, k: int) -> int:
        """The lone session's length >= 1 of the best expected rate; while the verify line has fewer than
        two drafted block sizes to fit, one step beyond the current ``k`` instead, so it gets a slope."""
        if not self.verify_obs:
            return k
        drafted_sizes = [m for m in self.verify_obs if m > 1]
        if len(drafted_sizes) < 2:
            return min(k + 1, self.k_max) if k < self.k_max else k - 1
        return max(range(1, self.k_max + 1), key=self.expected_rate)

    # -- recording ---------------------------------------------------------------------------------------
    def record_verify(self, block: int, verify_s: float) -> None:
        obs = self.verify_obs.setdefault(block, [])
        obs.append(verify_s)
        del obs[:-VERIFY_SAMPLES]

    def record_positions(self, judged: int, num_accepted: int) -> None:
        """Positions 1..``judged`` were checked by the verifier, the first ``num_accepted`` accepted."""
        for i in range(1, judged + 1):
            self.tried[i] += 1
            self.passed[i] += int(i <= num_accepted)

    def record_drafted(
        self,
        k: int,
        num_accepted: int,
        verify_s: float,
        draft_s: float,
        network_s: float,
        confidences: Sequence[float],
        costs_valid: bool,
        start_tokens: int,
    ) -> None:
        """A round that drafted ``k >= 1`` tokens (see ``DraftLengthPolicy.update``)."""
        self.uses_confidence = len(confidences) == k
        judged = min(k, num_accepted + 1)  # the verifier stops at the first rejected position
        for i, c in enumerate(confidences[:judged]):
            b = confidence_bin(c)
            self.bin_tried[b] += 1
            self.bin_passed[b] += int(i < num_accepted)
        self.record_positions(judged, num_accepted)
        if not costs_valid and start_tokens > 0 and self.draft_tokens and self.rounds:
            # what the round took beyond a normal drafted round of its length: the drafter's catching up
            normal = k * self.t_draft() + self.network_s / self.rounds
            self.start_s += max(draft_s + network_s - normal, 0.0)
            self.start_tokens += start_tokens
        if costs_valid and self.provisional:
            # a fresh round's costs stood in until now (they carry the drafter's start and the stream's
            # set-up: 70 ms more network time measured on the Qwen pair, which priced drafting out for good)
            self.emitted = self.round_s = self.draft_tokens = 0.0
            self.draft_s = self.network_s = self.rounds = 0.0
            self.provisional = False
        if costs_valid or not self.rounds:
            self.provisional = not costs_valid
            self.emitted += num_accepted + 1
            self.round_s += verify_s + draft_s + network_s
            self.draft_tokens += k
            self.draft_s += draft_s
            self.network_s += network_s
            self.rounds += 1

    # -- warm start --------------------------------------------------------------------------------------
    def start_from(self, prior: Measurements) -> None:
        """Take a finished session's measurements as this (fresh) one's, weighted down to ``PRIOR_*``."""
        w = min(1.0, PRIOR_POSITIONS / max(sum(prior.bin_tried), sum(prior.tried), 1))
        self.bin_tried = [t * w for t in prior.bin_tried]
        self.bin_passed = [p * w for p in prior.bin_passed]
        n = min(len(prior.tried), self.k_max + 1)
        self.tried[:n] = [t * w for t in prior.tried[:n]]
        self.passed[:n] = [p * w for p in prior.passed[:n]]
        r = min(1.0, PRIOR_ROUNDS / max(prior.rounds, 1))
        self.draft_tokens, self.draft_s = prior.draft_tokens * r, prior.draft_s * r
        self.network_s, self.rounds = prior.network_s * r, prior.rounds * r
        self.provisional = prior.provisional
        self.emitted, self.round_s = prior.emitted * r, prior.round_s * r
        self.verify_obs = {m: v[-PRIOR_VERIFIES:] for m, v in prior.verify_obs.items() if m <= self.k_max + 1}
        self.uses_confidence = prior.uses_confidence
        w_start = min(1.0, PRIOR_STARTS / max(prior.start_tokens, 1.0))
        self.start_s, self.start_tokens = prior.start_s * w_start, prior.start_tokens * w_start
