"""What the last finished adaptive session of each kind measured, for the next one to start from."""

from __future__ import annotations

import threading
from collections.abc import Hashable

from .adaptive import AdaptiveDraftLength
from .base import DraftLengthPolicy


class LengthMemory:
    """The last finished adaptive session per ``key``, handed to new sessions as their prior.

    ``key`` names what acceptance and costs depend on: the drafter and the sampling setting. A new policy
    starts from the prior's measurements weighted down to ``PRIOR_POSITIONS`` judged positions and
    ``PRIOR_ROUNDS`` rounds (``measurements.py``), so its own rounds take over within a few rounds. A
    session that ends is folded in: it already carries the prior it started from, weighted down, so the
    memory fades old sessions out. Shared by the sessions of a process; thread-safe.
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
