"""The draft-length contract, the records a policy plans with, and the fixed policy."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..drafting import EarlyStop


@dataclass(frozen=True)
class Peer:
    """Another session of the batch, as the planner sees it."""

    acceptance: float = 0.0  # pooled acceptance of a drafted token
    t_draft: float = 0.0  # seconds per drafted token
    fixed: int | None = None  # a fixed draft length (0: decodes without drafting); None: adaptive
    start_tokens: int | None = None  # context its drafter must catch up on before drafting (None: unknown)


@dataclass(frozen=True)
class Load:
    """The batch a session's rounds share (the zero load is a lone session), and where the session stands."""

    peers: tuple[Peer, ...] = ()  # the other active sessions
    forward_s: Callable[[float], float] | None = None  # F(N): seconds of a forward feeding N tokens
    start_tokens: int = 0  # context the drafter must prefill before this session's next drafted round
    remaining: int | None = None  # tokens this session may still generate (None: unbounded)


@dataclass(frozen=True)
class Plan:
    """The batch's round as planned: this session's length, the drafting depth, the expected rate."""

    k: int
    depth: int
    rate: float  # tokens per second of the whole batch
    tokens: float  # tokens fed per forward
    drafting: int  # sessions that draft


def gains(acceptance: Sequence[float] | float, k: int) -> list[float]:
    """The chance that the first j drafts are accepted, j = 1..k: what the j-th draft adds to the expected
    tokens of a round. ``acceptance`` is one rate for every position, or one per position (index 1..k)."""
    out, survive = [], 1.0
    for i in range(1, k + 1):
        survive *= acceptance if isinstance(acceptance, float) else acceptance[i]
        out.append(survive)
    return out


def expected_tokens(acceptance: Sequence[float] | float, k: int) -> float:
    """``E[tokens | k]``: 1 + sum over j <= k of the chance that the first j drafts are accepted."""
    return 1.0 + sum(gains(acceptance, k))


class DraftLengthPolicy(ABC):
    """Chooses each round's draft length from the feedback of earlier rounds."""

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
        costs_valid: bool = True,
        start_tokens: int = 0,
    ) -> None:
        """Feedback after a round that drafted ``k`` tokens (``costs_valid`` False: the round's times also
        paid a one-off, such as the drafter's prefill of ``start_tokens`` context tokens, and count for
        acceptance and the start's price only)."""

    def peer(self) -> Peer:
        """How the other sessions of a batch should count this one."""
        return Peer(fixed=0)

    def begin(self, start_tokens: int) -> None:  # noqa: B027 - optional hook
        """The generation starts; its drafter will have ``start_tokens`` of context to catch up on before
        its first drafted round (0: it is started with the generation)."""


class FixedDraftLength(DraftLengthPolicy):
    """The same ``k`` every round; it still counts acceptance and drafting cost for its batch's planners."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError("draft length must be >= 0")
        self.k = k
        self._drafted = self._accepted = 0
        self._draft_s = 0.0

    def next_length(self, load: Load | None = None) -> int:
        return self.k

    def update(
        self,
        k: int,
        num_accepted: int,
        verify_s: float,
        draft_s: float = 0.0,
        network_s: float = 0.0,
        confidences: Sequence[float] = (),
        costs_valid: bool = True,
        start_tokens: int = 0,
    ) -> None:
        self._drafted += k
        self._accepted += num_accepted
        self._draft_s += draft_s

    def peer(self) -> Peer:
        d = self._drafted
        return Peer((self._accepted + 1) / (d + 2), self._draft_s / d if d else 0.0, fixed=self.k)
