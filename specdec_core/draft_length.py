"""How many tokens to draft next round: a fixed k, or a length chosen from a measured cost model.

A round that drafts k tokens costs ``T(k) = k * t_draft + t_verify(k + 1) + t_network``, with ``t_draft``
the mean drafting cost per token, ``t_verify(m)`` a least-squares line through the measured verify times
by block size and ``t_network`` the mean round overhead outside both models.

The adaptive policy works in one of two ways:

* **Confidence stop** (drafters that report their probability of each drafted token, as specdec's do):
  draft up to ``k_max`` tokens but stop after the token at which ``P``, the estimated chance that the
  whole block is accepted, falls below ``theta``. ``P`` is the product over the block of the measured
  acceptance of each token's confidence bin (``EarlyStop``), so it stays calibrated whatever the
  temperature or the drafter. Drafting one more token gains about ``P * a`` expected tokens (``a``: the
  measured acceptance of a position whose predecessors were accepted) and costs
  ``t_draft + t_verify'`` seconds; it pays while that gain per second beats the rate the generation
  already achieves, ``R`` (emitted tokens per second of rounds). Hence
  ``theta = R * (t_draft + t_verify') / a``, re-estimated every round. Blocks follow the text: long
  where the drafter is sure, short where it is not. (Replayed offline on the Qwen pair's greedy traces of
  the 8 benchmark prompts with measured CPU costs: 4.63-4.71 tok/s against 4.49 for the best fixed k.)
* **Expected-rate length** (drafters without confidences): k maximises
  ``E[tokens | k] / T(k)`` with ``E[tokens | k] = 1 + sum_{j=1..k} prod_{i<=j} a_i`` and ``a_i`` counted
  per position (falling back to the pooled rate while a position has few samples).

**Under load** (a batched verifier), a drafted token is one more token in a forward that every session in
the batch waits for. The policy then takes a ``Load``: the forward cost curve ``F(N)`` learned from all
forwards by the total tokens ``N`` they feed, the tokens ``N0`` the other rows feed and ``G0`` they emit
per forward. A round of k costs ``k * t_draft + F(N0 + k + 1) + t_network`` and yields ``E[tokens | k] +
G0`` tokens to the whole batch; k = 0 (a plain decoding round, no drafter call) costs ``F(N0 + 1)`` and
yields ``1 + G0``. The length (or, with confidences, the stop threshold, whose rate ``R`` becomes the
batch's rate and whose ``t_verify'`` the slope of ``F`` at ``N0``) maximises the batch's tokens per second:
blocks shorten as the batch grows and drafting stops (k = 0) where it no longer pays, as it does for a
drafter nearly as costly as its target or for text the drafter does not predict. A session that stopped
drafting probes with one drafted round after ``PROBE_START`` plain rounds, then after twice as many each
time drafting still loses, so it notices when the text turns predictable again.

A new session need not start blind: ``LengthMemory`` keeps, per drafter and sampling setting, what the
last finished session measured, and a new policy starts from it scaled down to ``PRIOR_POSITIONS`` judged
positions and ``PRIOR_ROUNDS`` rounds of costs, so its own measurements take over within a few rounds.
(Replayed on the traces, 64 tokens per prompt: 4.20 tok/s cold, 4.33 warm, best fixed k 4.12.)
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from .drafting import CONFIDENCE_BINS, EarlyStop, confidence_bin


@dataclass(frozen=True)
class Load:
    """The batch a session's rounds share (see the module docstring); the zero load is a lone session."""

    others_tokens: float = 0.0  # N0: tokens the other rows feed per forward
    others_emitted: float = 0.0  # G0: tokens the other rows emit per forward
    forward_s: Callable[[float], float] | None = None  # F(N): seconds of a forward feeding N tokens


PROBE_START = 8  # plain rounds before a session that stopped drafting tries one drafted round
PROBE_MAX = 64


class DraftLengthPolicy(ABC):
    @abstractmethod
    def next_length(self, load: Load | None = None) -> int:
        """Tokens to draft in the coming round (0: a plain decoding round without the drafter)."""

    def early_stop(self, load: Load | None = None) -> EarlyStop | None:
        """When the drafter may end the coming block early (None: never)."""
        return None

    def update(  # noqa: B027 - optional hook
        self,
        k: int,
        num_accepted: int,
        verify_s: float,
        draft_s: float = 0.0,
        network_s: float = 0.0,
        confidences: Sequence[float] = (),
    ) -> None:
        """Feedback after a round that drafted ``k`` tokens (a fixed policy ignores it)."""


class FixedDraftLength(DraftLengthPolicy):
    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError("draft length must be >= 0")
        self.k = k

    def next_length(self, load: Load | None = None) -> int:
        return self.k


class AdaptiveDraftLength(DraftLengthPolicy):
    """Chooses the block length per round from the measured costs (see the module docstring)."""

    def __init__(
        self,
        k_max: int = 8,
        k_start: int = 4,
        min_samples: int = 4,
        prior: AdaptiveDraftLength | None = None,
    ) -> None:
        self.k_max = k_max
        self.k = min(k_start, k_max)
        self.min_samples = min_samples
        # counts are floats: a warm start brings in a prior's counts weighted down
        self.tried = [0.0] * (k_max + 1)  # rounds that reached position i (index 1..k_max)
        self.passed = [0.0] * (k_max + 1)  # of those, rounds that accepted position i
        self.draft_tokens = 0.0
        self.draft_s = 0.0
        self.network_s = 0.0
        self.rounds = 0.0  # drafted rounds
        self.verify_obs: dict[int, list[float]] = {}  # block size m = k + 1 -> times
        self.emitted = 0.0  # tokens emitted by drafted rounds
        self.round_s = 0.0  # seconds of drafted rounds
        self.uses_confidence = False  # the drafter reports confidences: stop by them
        self.bin_tried = [0.0] * CONFIDENCE_BINS  # judged positions by confidence bin
        self.bin_passed = [0.0] * CONFIDENCE_BINS  # of those, accepted
        self.plain_rounds = 0  # rounds decoded without drafting
        self.since_draft = 0  # plain rounds since the last drafted one
        self.probe_every = PROBE_START
        if prior is not None:
            self._start_from(prior)

    def _start_from(self, prior: AdaptiveDraftLength) -> None:
        """Take a finished session's measurements as this one's, weighted down (see ``LengthMemory``)."""
        w = min(1.0, PRIOR_POSITIONS / max(sum(prior.bin_tried), sum(prior.tried), 1))
        self.bin_tried = [t * w for t in prior.bin_tried]
        self.bin_passed = [p * w for p in prior.bin_passed]
        n = min(len(prior.tried), self.k_max + 1)
        self.tried[:n] = [t * w for t in prior.tried[:n]]
        self.passed[:n] = [p * w for p in prior.passed[:n]]
        r = min(1.0, PRIOR_ROUNDS / max(prior.rounds, 1))
        self.draft_tokens, self.draft_s = prior.draft_tokens * r, prior.draft_s * r
        self.network_s, self.rounds = prior.network_s * r, prior.rounds * r
        self.emitted, self.round_s = prior.emitted * r, prior.round_s * r
        self.verify_obs = {m: v[-4:] for m, v in prior.verify_obs.items() if m <= self.k_max + 1}
        self.uses_confidence = prior.uses_confidence
        self.probe_every = prior.probe_every
        if not self.uses_confidence and self.verify_obs:
            self.k = self.best_length()

    # -- the choice --------------------------------------------------------------------------------------
    def next_length(self, load: Load | None = None) -> int:
        if self._skip_drafting(load):
            return 0
        return self.k_max if self.uses_confidence else self.best_length(load)

    def early_stop(self, load: Load | None = None) -> EarlyStop | None:
        if not self.uses_confidence or not self.draft_tokens or self.round_s <= 0:
            return None
        t_draft = self.draft_s / self.draft_tokens
        others = load.others_emitted if load else 0.0
        rate = (self.emitted + others * self.rounds) / self.round_s  # the batch's rate while drafting
        theta = rate * (t_draft + self.verify_slope(load)) / self.acceptance(0)
        return EarlyStop(below=min(max(theta, 0.0), 0.95), acceptance=self.acceptance_by_confidence())

    def _skip_drafting(self, load: Load | None) -> bool:
        """Decode this round without the drafter: drafting loses at this load (with periodic probes)."""
        if self.rounds < 2 or not self.draft_tokens:
            return False  # nothing measured yet: draft to learn
        if self.drafting_rate(load) >= self.plain_rate(load):
            self.probe_every = PROBE_START
            return False
        if self.since_draft >= self.probe_every:  # probe: has the text turned predictable?
            self.probe_every = min(2 * self.probe_every, PROBE_MAX)
            return False
        return True

    def plain_rate(self, load: Load | None = None) -> float:
        """The batch's tokens per second if this session decodes one token per round."""
        others = load.others_emitted if load else 0.0
        return (1.0 + others) / self.verify_cost(1, load)

    def drafting_rate(self, load: Load | None = None) -> float:
        """The batch's tokens per second if this session drafts (its best k, or its mean block)."""
        if not self.uses_confidence:
            return max(self.expected_rate(k, load) for k in range(1, self.k_max + 1))
        t_draft = self.draft_s / self.draft_tokens
        t_net = self.network_s / self.rounds
        block = self.draft_tokens / self.rounds
        others = load.others_emitted if load else 0.0
        cost = block * t_draft + self.verify_cost(block + 1, load) + t_net
        return (self.emitted / self.rounds + others) / cost

    def acceptance_by_confidence(self) -> tuple[float, ...]:
        """Measured acceptance per confidence bin, pulled toward the pooled rate where a bin is thin."""
        pooled, prior = self.acceptance(0), 2.0
        return tuple(
            (p + prior * pooled) / (t + prior) for p, t in zip(self.bin_passed, self.bin_tried, strict=True)
        )

    # -- feedback ----------------------------------------------------------------------------------------
    def update(
        self,
        k: int,
        num_accepted: int,
        verify_s: float,
        draft_s: float = 0.0,
        network_s: float = 0.0,
        confidences: Sequence[float] = (),
    ) -> None:
        obs = self.verify_obs.setdefault(k + 1, [])
        obs.append(verify_s)
        del obs[:-16]  # recent samples only
        if k == 0:  # a plain round: only its verify cost is news
            self.plain_rounds += 1
            self.since_draft += 1
            return
        self.since_draft = 0
        self.uses_confidence = len(confidences) == k
        for i, c in enumerate(confidences[: min(k, num_accepted + 1)]):  # positions the verifier judged
            b = confidence_bin(c)
            self.bin_tried[b] += 1
            self.bin_passed[b] += int(i < num_accepted)
        self.emitted += num_accepted + 1
        self.round_s += verify_s + draft_s + network_s
        for i in range(1, min(k, num_accepted + 1) + 1):  # positions the verifier actually judged
            self.tried[i] += 1
            self.passed[i] += int(i <= num_accepted)
        self.draft_tokens += k
        self.draft_s += draft_s
        self.network_s += network_s
        self.rounds += 1
        self.k = self.best_length()

    # -- the cost model ----------------------------------------------------------------------------------
    def acceptance(self, i: int) -> float:
        """Acceptance of position ``i`` given its predecessors were accepted (0: pooled over positions)."""
        pooled = (sum(self.passed) + 1) / (sum(self.tried) + 2)
        if i == 0 or self.tried[i] < self.min_samples:
            return pooled
        return self.passed[i] / self.tried[i]

    def _verify_line(self) -> tuple[float, float, float]:
        """(mean block size, mean verify time, slope >= 0) of the least-squares line."""
        points = [(size, sum(v) / len(v)) for size, v in self.verify_obs.items()]
        n = len(points)
        mx = sum(p[0] for p in points) / n
        my = sum(p[1] for p in points) / n
        var = sum((p[0] - mx) ** 2 for p in points)
        slope = max(sum((p[0] - mx) * (p[1] - my) for p in points) / var, 0.0) if var > 0 else 0.0
        return mx, my, slope

    def verify_slope(self, load: Load | None = None) -> float:
        """Seconds one more token adds to this session's verify forward."""
        if load is not None and load.forward_s is not None:
            base = load.others_tokens + (self.draft_tokens / self.rounds if self.rounds else 1.0) + 1.0
            return max(load.forward_s(base + 1.0) - load.forward_s(base), 0.0)
        return self._verify_line()[2] if self.verify_obs else 0.0

    def verify_cost(self, m: float, load: Load | None = None) -> float:
        """Seconds of a verify forward of ``m`` positions of this session (with the others' rows)."""
        if load is not None and load.forward_s is not None:
            return max(load.forward_s(load.others_tokens + m), 1e-6)
        if not self.verify_obs:
            return 1.0
        mx, my, slope = self._verify_line()
        return max(my + slope * (m - mx), 1e-6)

    def expected_rate(self, k: int, load: Load | None = None) -> float:
        """The batch's tokens per second if this session drafts ``k`` tokens (k = 0: plain decoding)."""
        if k == 0:
            return self.plain_rate(load)
        t_draft = self.draft_s / self.draft_tokens if self.draft_tokens else 0.0
        t_net = self.network_s / self.rounds if self.rounds else 0.0
        expected, survive = 1.0, 1.0
        for i in range(1, k + 1):
            survive *= self.acceptance(i)
            expected += survive
        others = load.others_emitted if load else 0.0
        return (expected + others) / (k * t_draft + self.verify_cost(k + 1, load) + t_net)

    def best_length(self, load: Load | None = None) -> int:
        """The k >= 1 of the best expected rate (exploring one step further while the cost line is thin)."""
        if not self.verify_obs:
            return self.k
        drafted_sizes = [m for m in self.verify_obs if m > 1]
        if len(drafted_sizes) < 2 and (load is None or load.forward_s is None):
            # explore one step beyond the current k so the verify-cost line has a slope to fit
            return min(self.k + 1, self.k_max) if self.k < self.k_max else self.k - 1
        return max(range(1, self.k_max + 1), key=lambda k: self.expected_rate(k, load))


PRIOR_POSITIONS = 100  # a warm start counts as at most this many judged positions...
PRIOR_ROUNDS = 8  # ...and this many rounds of measured costs


class LengthMemory:
    """What the last finished adaptive session of each kind measured, for the next one to start from.

    ``key`` names what acceptance and costs depend on: the drafter and the sampling setting. Shared by
    the sessions of a process; thread-safe. A session that ends folds its policy in (it already carries
    the prior it started from, weighted down, so the memory fades old sessions out).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[Hashable, AdaptiveDraftLength] = {}

    def policy(self, key: Hashable, k_max: int = 8) -> AdaptiveDraftLength:
        with self._lock:
            return AdaptiveDraftLength(k_max=k_max, prior=self._last.get(key))

    def remember(self, key: Hashable, policy: DraftLengthPolicy) -> None:
        if isinstance(policy, AdaptiveDraftLength) and policy.rounds >= 1:
            with self._lock:
                self._last[key] = policy
