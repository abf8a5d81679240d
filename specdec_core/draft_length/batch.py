"""The batch's round as one session plans it: every member's length at a drafting depth, the round's cost
and rate, and the depth of the best rate (docs/draft_length.md, "Under load")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .base import Load, Plan

# a depth must leave every adaptive session this much faster than in a round of plain decoding: the batch
# rate alone hides the sessions that lose (those whose text the drafter does not predict)
FAIR_MARGIN = 1.1


@dataclass(frozen=True)
class Member:
    """One session of the batch, as the plan sees it."""

    gains: Sequence[float]  # gains[j - 1]: what its j-th draft adds to the round's tokens (non-increasing)
    t_draft: float  # seconds per drafted token
    fixed: int | None = None  # a fixed draft length (0: decodes plainly); None: the plan picks its length


@dataclass(frozen=True)
class Forward:
    """What the forward every member's rows share costs, by the tokens it feeds."""

    cost: Callable[[float], float]  # seconds of a forward feeding n tokens
    slope: Callable[[float], float]  # seconds one more token adds to a forward of n tokens

    def extension_slope(self, cap: int) -> float:
        """Seconds one more drafted token adds to a lone session's verify, on average over a block of up to
        ``cap`` tokens beyond its first: once a round drafts, its wider forward is paid. Verify costs step
        (llama.cpp: 2 to 4 positions cost about the same, 5 nearly what 8 do), and a slope taken where the
        mean block ends would price the next step into every token and end blocks after one or two."""
        if cap <= 1:
            return self.slope(1.0)
        return max((self.cost(cap + 1.0) - self.cost(2.0)) / (cap - 1), 0.0)

    @staticmethod
    def shared(forward_s: Callable[[float], float]) -> Forward:
        """The verifier's measured forwards (``Load.forward_s``), floored and made non-decreasing."""
        return Forward(
            cost=lambda n: max(forward_s(n), 1e-6),
            slope=lambda n: max(forward_s(n + 1.0) - forward_s(n), 0.0),
        )


@dataclass(frozen=True)
class Batch:
    """The sessions of one round (the planning session first) and the forward they share.

    A round costs one forward for every row, padded to the widest (rows of a forward are), plus the
    drafting phase of the longest block (the drafter batches the drafts) and the network overhead.
    """

    members: Sequence[Member]
    forward: Forward
    k_max: int

    def plain_lengths(self) -> list[int]:
        """Draft lengths of a round where the adaptive sessions decode plainly (fixed ones keep theirs)."""
        return [min(m.fixed, self.k_max) if m.fixed is not None else 0 for m in self.members]

    def round_cost(self, lengths: list[int], t_net: float) -> float:
        """Seconds of a round in which member i drafts ``lengths[i]`` tokens."""
        tokens = len(lengths) * (max(lengths) + 1)
        drafting = [k * m.t_draft for m, k in zip(self.members, lengths) if k > 0]
        forward = self.forward.cost(tokens)
        return forward + (max(drafting) + t_net if drafting else 0.0)

    def at_depth(self, depth: int, t_net: float, plain_cost: float | None = None) -> Plan:
        """The round when adaptive sessions draft at most ``depth`` tokens, each the tokens whose gain beats
        their price at the batch's rate (rate 0 where an adaptive session would not be ``FAIR_MARGIN``
        faster than in a round of plain decoding costing ``plain_cost``)."""
        fixed = [min(m.fixed, self.k_max) if m.fixed is not None else None for m in self.members]
        lengths = [f if f is not None else depth for f in fixed]
        rate = 0.0
        for _ in range(2):  # each adaptive session's length at the batch's marginal token price
            price = rate * self.forward.slope(len(lengths) * (max(lengths) + 1))
            lengths = [
                f if f is not None else min(depth, sum(1 for g in m.gains if g > price))
                for m, f in zip(self.members, fixed)
            ]
            emitted = sum(1.0 + sum(m.gains[:k]) for m, k in zip(self.members, lengths))
            cost = self.round_cost(lengths, t_net)
            rate = emitted / cost
        drafting = sum(1 for k in lengths if k > 0)
        if plain_cost is not None:
            slowest = min(1.0 + sum(m.gains[:k]) for m, k in zip(self.members, lengths) if m.fixed is None)
            if slowest * plain_cost < FAIR_MARGIN * cost:
                rate = 0.0
        return Plan(lengths[0], depth, rate, float(len(lengths) * (max(lengths) + 1)), drafting)

    def best(self, t_net: float) -> Plan:
        """The drafting depth of the highest fair batch rate (depth 0: plain decoding)."""
        best = self.at_depth(0, t_net)
        plain_cost = self.round_cost(self.plain_lengths(), 0.0)
        for depth in range(1, self.k_max + 1):
            candidate = self.at_depth(depth, t_net, plain_cost)
            if candidate.rate > best.rate:
                best = candidate
        return best


def batch_start_tokens(load: Load) -> int:
    """The context a drafting batch's drafters prefill, per session: the mean over this session and its
    adaptive peers (a peer whose start is not known yet counts as this one's). Pricing its own start alone,
    a batch's short prompts would draft while the others did not, and make them wait for their drafts."""
    own = load.start_tokens
    tokens = [own] + [
        own if p.start_tokens is None else p.start_tokens for p in load.peers if p.fixed is None
    ]
    return round(sum(tokens) / len(tokens))


def rate_after_start(rate: float, start_s: float, remaining: int | None) -> float:
    """A batch rate over the ``remaining`` tokens once a start of ``start_s`` seconds is paid from them."""
    if start_s <= 0 or rate <= 0 or remaining is None:
        return rate
    left = max(remaining, 1)
    return left / (left / rate + start_s)
