"""What one generation did: rounds, drafted and accepted tokens per position and per source, and times."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    """Counters of one generation; times in seconds."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: rounds accepting draft i+1
    drafted_per_position: list[int] = field(default_factory=list)  # [i]: rounds drafting position i+1
    target_passes: int = 0
    target_tokens: int = 0  # positions the target processed (prefill included)
    cached_tokens: int = 0  # prompt positions the target took from its prefix cache instead
    draft_s: float = 0.0
    verify_s: float = 0.0
    prefill_s: float = 0.0  # the target's prompt prefill (the drafter's counts as drafting)
    network_s: float = 0.0
    wall_s: float = 0.0
    first_token_s: float = 0.0  # from the start of the generation to its first token
    new_tokens: int = 0
    drafter_failures: int = 0
    plain_rounds: int = 0  # rounds decoded without drafting (no drafter, or the policy chose k = 0)
    draft_lengths: list[int] = field(default_factory=list)
    round_trips: list[float] = field(default_factory=list)  # seconds of each drafter call that drafted
    sources: dict[str, list[int]] = field(default_factory=dict)  # source -> [rounds, drafted, accepted]
    copying: list[int] = field(default_factory=lambda: [0, 0, 0])  # the lookup rounds drafted while copying

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def record_round(self, k: int, n: int) -> None:
        for table in (self.accepted_per_position, self.drafted_per_position):
            table.extend([0] * (k - len(table)))
        for i in range(k):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += int(i < n)
        self.rounds += 1
        self.plain_rounds += int(k == 0)
        self.drafted += k
        self.accepted += n
        self.draft_lengths.append(k)

    def record_source(self, source: str, k: int, n: int, copying: bool = False) -> None:
        """A drafted round's block came from ``source`` ("model", "ngram"), ``copying``: a lookup round
        drafted while the text was copying an earlier stretch."""
        for counts in [self.sources.setdefault(source, [0, 0, 0])] + ([self.copying] if copying else []):
            counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + k, counts[2] + n

    def to_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "accepted_per_position": [
                a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)
            ],
            "mean_accepted_per_round": self.accepted / self.rounds if self.rounds else 0.0,
            "target_passes": self.target_passes,
            "target_tokens": self.target_tokens,
            "cached_tokens": self.cached_tokens,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "prefill_s": self.prefill_s,
            "network_s": self.network_s,
            "wall_s": self.wall_s,
            "first_token_s": self.first_token_s,
            "plain_rounds": self.plain_rounds,
            "new_tokens": self.new_tokens,
            "tokens_per_s": self.tokens_per_s,
            "drafter_failures": self.drafter_failures,
            "mean_draft_length": sum(self.draft_lengths) / len(self.draft_lengths)
            if self.draft_lengths
            else 0.0,
            "drafter_source": {
                source: {"rounds": r, "drafted": d, "accepted": a}
                for source, (r, d, a) in self.sources.items()
            },
            "lookup_copying": dict(zip(("rounds", "drafted", "accepted"), self.copying, strict=True)),
        }
