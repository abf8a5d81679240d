"""A model drafter and prompt lookup in step: each round drafts from the source the generation loop picks.

``HybridDrafter`` holds a model drafter and an n-gram drafter (``ngram.py``) in step. Which source drafts
the next block is decided in one place, ``sources.DraftSources.choose`` (the lookup where it has a match
and its measured rate is at least the model drafter's), which tells the hybrid through ``use``.
"""

from __future__ import annotations

from .drafting import DraftBlock, Drafter, EarlyStop
from .ngram import MODEL, NGRAM, NgramDrafter
from .sampling import SamplingParams


class HybridDrafter(Drafter):
    """A model drafter and an n-gram drafter in step; each block comes from the source last named by
    ``use`` (the model drafter until then).

    The model drafter starts at the first round that uses it, from the committed text the n-gram
    index holds, and hears every committed token after that: its own verdicts, and the n-gram rounds'
    tokens as committed ones (a remote drafter gets them with its next step).
    """

    source: str = MODEL  # its own length policy is the model drafter's; each block's: ``use``

    def __init__(self, model: Drafter, ngram: NgramDrafter | None = None) -> None:
        self.model = model
        self.ngram = ngram or NgramDrafter()
        self._next = MODEL  # the source of the next block
        self._params = SamplingParams()
        self._last: str | None = None  # the source of the block in flight
        self._model_started = False
        self._model_drafted: list[int] = []
        self._model_behind = 0  # committed tokens the started model drafter was only told of (extend)

    def start(self, context: list[int], params: SamplingParams) -> None:
        self.ngram.cache_salt = self.model.cache_salt = self.cache_salt
        self.ngram.start(context, params)
        self._params = params
        self._last, self._model_started, self._model_behind = None, False, 0

    @property
    def model_pending(self) -> int:
        """Tokens the model drafter must take in before its next block (one prefill, paid in that round's
        drafting time): the whole text until it first drafts, then what lookup and plain rounds committed."""
        return self._model_behind if self._model_started else len(self.ngram.index.tokens)

    @property
    def caches_prefixes(self) -> bool:  # type: ignore[override]
        return self.model.caches_prefixes

    def use(self, source: str) -> None:
        """Draft the next block from ``source`` (NGRAM: only where the lookup has a match)."""
        self._next = source

    def propose(self, k: int, stop: EarlyStop | None = None) -> DraftBlock:
        self._last = self._next
        if self._last == NGRAM:
            return self.ngram.propose(k)
        if not self._model_started:
            self.model.start(list(self.ngram.index.tokens), self._params)
            self._model_started = True
        self._model_behind = 0
        block = self.model.propose(k, stop)
        self._model_drafted = list(block.tokens)
        return block

    def accept(self, num_accepted: int, next_token: int) -> None:
        last, self._last = self._last, None
        if last is None:  # no block in flight (the first token, from the target's prefill)
            self.extend([next_token])
        elif last == NGRAM:
            committed = self.ngram._drafted[:num_accepted] + [next_token]
            self.ngram.accept(num_accepted, next_token)
            if self._model_started:
                self.model.extend(committed)
                self._model_behind += len(committed)
        else:
            self.model.accept(num_accepted, next_token)
            self.ngram.extend(self._model_drafted[:num_accepted] + [next_token])
            self._model_drafted = []

    def extend(self, tokens: list[int]) -> None:
        self.ngram.extend(tokens)
        if self._model_started:
            self.model.extend(tokens)
            self._model_behind += len(tokens)

    def cancel(self) -> None:
        self.model.cancel()

    def close(self) -> None:
        self.model.close()
        self.ngram.close()
