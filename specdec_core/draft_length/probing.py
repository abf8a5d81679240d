"""When a session that stopped drafting tries one short drafted round, to notice the text turning
predictable again (docs/draft_length.md, "Probing")."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .base import gains
from .batch import Batch, Member

PROBE_START = 8  # plain rounds before a session that stopped drafting tries one drafted round
PROBE_MAX = 64  # the longest interval, per row of the batch
PROBE_LENGTH = 2  # tokens a probe drafts
PROBE_BUDGET = 0.03  # the share of the batch's time probes may cost


@dataclass
class ProbeSchedule:
    """A session's probes: the interval doubles each time a probe finds drafting still losing."""

    every: int = PROBE_START  # the interval per row of the batch
    after: float = 0.0  # plain rounds before the next probe, set when a plan stops drafting
    since_draft: int = 0  # plain rounds since the last drafted one

    def due(self) -> bool:
        return self.since_draft >= self.after

    def probe(self, k_max: int) -> int:
        """The length of a probe now due; the next one comes after twice as many plain rounds."""
        self.every = min(2 * self.every, PROBE_MAX)
        return min(PROBE_LENGTH, k_max)

    def resume(self) -> None:
        """The plan drafts: after plain rounds, the interval starts over."""
        if self.since_draft:
            self.every = PROBE_START

    def interval(self, batch: Batch, t_draft: float, t_net: float, start_s: float) -> float:
        """Plain rounds before a probe: never, if not even a drafter that is always right would pay at these
        costs; else ``every`` times the rows whose round a probe delays, and at least enough rounds that
        probes cost the batch under ``PROBE_BUDGET`` of its time (``start_s``: the drafter's start, paid by
        a probe that starts it)."""
        sure = Member(gains([1.0] * (batch.k_max + 1), batch.k_max), t_draft, None)
        batch = replace(batch, members=[sure, *batch.members[1:]])
        plain = batch.at_depth(0, t_net)
        if max(batch.at_depth(d, t_net).rate for d in range(1, batch.k_max + 1)) <= plain.rate:
            return float("inf")
        lengths = [0] * len(batch.members)
        base = batch.round_cost(lengths, t_net)
        lengths[0] = PROBE_LENGTH
        extra = batch.round_cost(lengths, t_net) - base + start_s
        return max(self.every * len(batch.members), extra / (PROBE_BUDGET * base))
