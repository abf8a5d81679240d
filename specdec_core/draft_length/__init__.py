"""How many tokens to draft next round: a fixed k, or a length chosen from a measured cost model.

``FixedDraftLength`` drafts the same k every round. ``AdaptiveDraftLength`` prices a round from the
session's measurements (``measurements.py``) and, under load, from the batch it shares (``batch.py``),
probes after it stops drafting (``probing.py``), and starts from the last session of its kind
(``memory.py``). docs/draft_length.md derives the cost model and says where each part lives.
"""

from .adaptive import AdaptiveDraftLength
from .base import DraftLengthPolicy, FixedDraftLength, Load, Peer, Plan, expected_tokens
from .measurements import PRIOR_POSITIONS, PRIOR_ROUNDS, PRIOR_STARTS
from .memory import LengthMemory

__all__ = [
    "PRIOR_POSITIONS",
    "PRIOR_ROUNDS",
    "PRIOR_STARTS",
    "AdaptiveDraftLength",
    "DraftLengthPolicy",
    "FixedDraftLength",
    "LengthMemory",
    "Load",
    "Peer",
    "Plan",
    "expected_tokens",
]
