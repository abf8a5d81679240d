"""Where each round's block comes from, and how long it may be: one length policy per draft source.

A model drafter is one source. Prompt lookup (an ``NgramDrafter``, or a ``HybridDrafter``'s) is weighed
in two states, each with its own adaptive length: *copying*, while the text repeats an earlier stretch
(the last ``COPY_STREAK`` or more committed tokens were all what the lookup proposed, or would have:
every round computes the lookup's proposal, which costs nothing), and otherwise. A lookup is usually
right, and worth long blocks, in the first state and mostly wrong in the second. A hybrid drafts from the
lookup where it has a match and its planned rate is at least the model drafter's (``choose``), the one
place that decision is made.
"""

from __future__ import annotations

from dataclasses import dataclass

from .draft_length import AdaptiveDraftLength, DraftLengthPolicy, Load
from .drafting import Drafter
from .hybrid import HybridDrafter
from .ngram import LOOKUP_K_MAX, MODEL, NGRAM, NgramDrafter

COPY_STREAK = 3  # committed tokens in a row continuing the lookup's proposal: the text is copying
COPYING = "ngram-copying"  # the key of the lookup's length policy while the text is copying


@dataclass(frozen=True)
class Choice:
    """A round's source, the state of the text when it was chosen, and the policy that sizes its block."""

    source: str  # MODEL or NGRAM
    copying: bool
    policy: DraftLengthPolicy

    @property
    def lookup_drafts(self) -> bool:
        return self.source == NGRAM


class DraftSources:
    """The length policies of a generation's draft sources, and the lookup's copying state.

    ``policy`` sizes the drafter's own source (a hybrid's is its model drafter's); ``ngram_length`` a
    hybrid's lookup (default: adaptive). The lookup's copying state has a policy of its own, adaptive
    whenever the lookup's is.
    """

    def __init__(
        self, drafter: Drafter | None, policy: DraftLengthPolicy, ngram_length: DraftLengthPolicy | None
    ) -> None:
        self.hybrid = drafter if isinstance(drafter, HybridDrafter) else None
        self.lookup = self.hybrid.ngram if self.hybrid is not None else _as_lookup(drafter)
        self.own = MODEL if drafter is None else drafter.source
        self.policies = {self.own: policy}
        if self.hybrid is not None:
            self.policies[NGRAM] = ngram_length or AdaptiveDraftLength(k_max=LOOKUP_K_MAX)
        if self.lookup is not None:
            lookup_policy = self.policies[NGRAM]
            adaptive = isinstance(lookup_policy, AdaptiveDraftLength)
            self.policies[COPYING] = AdaptiveDraftLength(k_max=LOOKUP_K_MAX) if adaptive else lookup_policy
        self.streak = 0  # committed tokens in a row that the lookup proposed (or would have)

    def choose(self, load: Load) -> Choice:
        """The coming round's source and length policy (a hybrid is told which source to draft from)."""
        copying = self.streak >= COPY_STREAK
        source = self.own
        if self.hybrid is not None:
            lookup_policy = self.policies[COPYING if copying else NGRAM]
            pays = _ngram_pays(lookup_policy, self.policies[MODEL], load)
            source = NGRAM if pays and self.hybrid.ngram.has_match else MODEL
            self.hybrid.use(source)
        return Choice(source, copying, self.policies[COPYING if source == NGRAM and copying else source])

    def proposal(self) -> list[int]:
        """What the lookup proposes now, drafted or not (none without a lookup)."""
        return self.lookup.proposal(LOOKUP_K_MAX) if self.lookup is not None else []

    def observe(
        self, choice: Choice, proposal: list[int], drafted: int, committed: list[int], verify_s: float
    ) -> None:
        """After a round that committed ``committed``: a lookup that did not draft it learns what its
        ``proposal`` would have had accepted, and the copying streak moves on."""
        agree = _common_prefix(proposal, committed)
        observing = self.policies.get(COPYING if choice.copying else NGRAM)
        if proposal and not (choice.lookup_drafts and drafted) and isinstance(observing, AdaptiveDraftLength):
            # not drafted: what the lookup would have had accepted (past the committed tokens: unknown)
            judged = agree if agree == len(committed) else min(len(proposal), agree + 1)
            observing.observe(judged, agree, drafted + 1, verify_s)
        # a proposal that ran out before the committed tokens did (none: no match) says nothing past it
        self.streak = self.streak + agree if agree in (len(committed), len(proposal) or -1) else 0


def _as_lookup(drafter: Drafter | None) -> NgramDrafter | None:
    return drafter if isinstance(drafter, NgramDrafter) else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ngram_pays(ngram: DraftLengthPolicy, model: DraftLengthPolicy, load: Load) -> bool:
    """Whether a hybrid's n-gram source should draft when it has a match: where its planned rate is at
    least the model's. The lookup's acceptance and costs are measured every round, drafted or not (the
    policy's ``observe``), so it is never drafted just to learn: until both sources are measured (the model
    drafter by its own first rounds, the lookup by observing a few rounds with a match), the model drafts."""
    if not isinstance(ngram, AdaptiveDraftLength) or not isinstance(model, AdaptiveDraftLength):
        return True
    if ngram.learning or model.learning:
        return False
    return ngram.plan(load).rate >= model.plan(load).rate
