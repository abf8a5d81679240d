"""How many tokens to draft next round: a fixed k, or k chosen from a measured cost model.

The adaptive policy maximises expected emitted tokens per second of a round:

    E[tokens | k] = 1 + sum_{j=1..k} prod_{i<=j} a_i        (a_i: acceptance of position i given i-1 accepted)
    T(k)          = k * t_draft + t_verify(k + 1) + t_network

with ``a_i`` counted per position (falling back to the pooled rate while a position has few samples),
``t_draft`` the mean drafting cost per token, ``t_verify(m)`` a least-squares line through the measured
verify times by block size, and ``t_network`` the mean round overhead outside both models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class DraftLengthPolicy(ABC):
    @abstractmethod
    def next_length(self) -> int:
        """Tokens to draft in the coming round."""

    def update(  # noqa: B027 - optional hook
        self, k: int, num_accepted: int, verify_s: float, draft_s: float = 0.0, network_s: float = 0.0
    ) -> None:
        """Feedback after a round that drafted ``k`` tokens (a fixed policy ignores it)."""


class FixedDraftLength(DraftLengthPolicy):
    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError("draft length must be >= 0")
        self.k = k

    def next_length(self) -> int:
        return self.k


class AdaptiveDraftLength(DraftLengthPolicy):
    """Chooses k in [1, k_max] to maximise expected tokens per second under the measured costs."""

    def __init__(self, k_max: int = 8, k_start: int = 4, min_samples: int = 4) -> None:
        self.k_max = k_max
        self.k = min(k_start, k_max)
        self.min_samples = min_samples
        self.tried = [0] * (k_max + 1)  # rounds that reached position i (index 1..k_max)
        self.passed = [0] * (k_max + 1)  # of those, rounds that accepted position i
        self.draft_tokens = 0
        self.draft_s = 0.0
        self.network_s = 0.0
        self.rounds = 0
        self.verify_obs: dict[int, list[float]] = {}  # block size m = k + 1 -> times

    def next_length(self) -> int:
        return self.k

    def update(
        self, k: int, num_accepted: int, verify_s: float, draft_s: float = 0.0, network_s: float = 0.0
    ) -> None:
        for i in range(1, min(k, num_accepted + 1) + 1):  # positions the verifier actually judged
            self.tried[i] += 1
            self.passed[i] += int(i <= num_accepted)
        self.draft_tokens += k
        self.draft_s += draft_s
        self.network_s += network_s
        self.rounds += 1
        obs = self.verify_obs.setdefault(k + 1, [])
        obs.append(verify_s)
        del obs[:-16]  # recent samples only
        self.k = self.best_length()

    def acceptance(self, i: int) -> float:
        pooled = (sum(self.passed) + 1) / (sum(self.tried) + 2)
        if self.tried[i] < self.min_samples:
            return pooled
        return self.passed[i] / self.tried[i]

    def verify_cost(self, m: int) -> float:
        points = [(size, sum(v) / len(v)) for size, v in self.verify_obs.items()]
        if len(points) == 1:
            return points[0][1]
        n = len(points)
        mx = sum(p[0] for p in points) / n
        my = sum(p[1] for p in points) / n
        var = sum((p[0] - mx) ** 2 for p in points)
        slope = max(sum((p[0] - mx) * (p[1] - my) for p in points) / var, 0.0)
        return max(my + slope * (m - mx), 1e-6)

    def expected_rate(self, k: int) -> float:
        t_draft = self.draft_s / self.draft_tokens if self.draft_tokens else 0.0
        t_net = self.network_s / self.rounds if self.rounds else 0.0
        expected, survive = 1.0, 1.0
        for i in range(1, k + 1):
            survive *= self.acceptance(i)
            expected += survive
        return expected / (k * t_draft + self.verify_cost(k + 1) + t_net)

    def best_length(self) -> int:
        if not self.verify_obs:
            return self.k
        # explore one step beyond the current k so the verify-cost line has a slope to fit
        if len(self.verify_obs) < 2:
            return min(self.k + 1, self.k_max) if self.k < self.k_max else self.k - 1
        return max(range(1, self.k_max + 1), key=self.expected_rate)
