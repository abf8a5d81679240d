"""Drafting without a draft model: prompt lookup (n-gram), and a hybrid that picks a source per round.

``NgramIndex`` maps every n-gram of the committed text (prompt + generated), ``min_ngram <= n <=
max_ngram``, to the end of its most recent occurrence; appending a token updates ``max_ngram`` entries,
so a lookup costs O(max_ngram) whatever the length of the text (no scan). The proposal continues the
most recent earlier occurrence of the longest n-gram that ends the text.

``NgramDrafter`` drafts from it behind the core ``Drafter`` interface. Its draft distribution is one-hot,
which keeps every verification rule exact: greedy and the coupled rule of seeded generations accept a
token while it equals the target's; the rejection rule accepts it with probability ``p(x)`` (the target's
probability of the proposed token, since ``q(x) = 1``) and resamples from ``p`` without ``x``. So with
sampling, lookup drafts are accepted less often than a model drafter's (which wins ``1 - TV(p, q)``):
only as often as the target itself would pick the repeated token.

``HybridDrafter`` holds a model drafter and an n-gram drafter in step. Each round, ``next_source()``
picks where the next block comes from: the n-gram proposal where a match exists and its measured rate
is at least the model drafter's, otherwise the model drafter. The rates come from the generation loop
(``engine.py``): each source has its own draft-length policy, the lookup one per state (copying an
earlier stretch or not), and the lookup's are measured every round from its proposal, drafted or not.
"""

from __future__ import annotations

import time

import torch

from .drafting import DraftBlock, Drafter, EarlyStop
from .sampling import SamplingParams, SparseDist

NGRAM = "ngram"
MODEL = "model"


class NgramIndex:
    """n-gram -> end position of its most recent occurrence, over text that only grows."""

    def __init__(self, min_ngram: int = 2, max_ngram: int = 4) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.tokens: list[int] = []
        # tables[n]: n-grams that end before the last token (the suffix itself must not match itself)
        self.tables: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens) - 2  # the n-grams ending one before the new last token
            if end < 0:
                continue
            for n, table in self.tables.items():
                if end - n + 1 >= 0:
                    table[tuple(self.tokens[end - n + 1 : end + 1])] = end

    def match(self) -> tuple[int, int] | None:
        """(n, end) of the longest n-gram ending the text that occurred before, at its latest occurrence."""
        size = len(self.tokens)
        for n in range(min(self.max_ngram, size), self.min_ngram - 1, -1):
            end = self.tables[n].get(tuple(self.tokens[size - n :]))
            if end is not None:
                return n, end
        return None

    def lookup(self, k: int) -> list[int]:
        """``k`` tokens that followed the latest earlier occurrence of the longest matching suffix (none
        without a match). Where that continuation reaches the end of the text, the copy goes on over its own
        output, as an LZ77 copy does: text that repeats a stretch of p tokens (the latest occurrence is p
        tokens back) is continued with that stretch, again and again, not cut at p tokens."""
        found = self.match()
        if found is None or k <= 0:
            return []
        _, end = found
        out = self.tokens[end + 1 : end + 1 + k]
        period = len(self.tokens) - 1 - end
        while len(out) < k:
            out.append(out[len(out) - period])
        return out


class NgramDrafter(Drafter):
    """Prompt-lookup drafting: no model, no network; one-hot draft distributions (module docstring)."""

    source: str = NGRAM

    def __init__(self, min_ngram: int = 2, max_ngram: int = 4) -> None:
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.index = NgramIndex(min_ngram, max_ngram)
        self._drafted: list[int] = []

    def start(self, context: list[int], params: SamplingParams) -> None:
        if not context:
            raise ValueError("a generation needs at least one context token")
        self.index = NgramIndex(self.min_ngram, self.max_ngram)
        self.index.extend(list(context))
        self._drafted = []

    @property
    def context(self) -> list[int]:
        """The committed text (prompt + generated) the lookup searches."""
        return self.index.tokens

    @property
    def has_match(self) -> bool:
        return self.index.match() is not None

    def propose(self, k: int, stop: EarlyStop | None = None) -> DraftBlock:
        t0 = time.perf_counter()
        self._drafted = self.index.lookup(k)
        dists = [SparseDist(torch.tensor([t]), torch.tensor([1.0])) for t in self._drafted]
        return DraftBlock(tokens=list(self._drafted), dists=dists, draft_s=time.perf_counter() - t0)

    @property
    def pending(self) -> int:
        return len(self._drafted)

    def accept(self, num_accepted: int, next_token: int) -> None:
        self.index.extend(self._drafted[:num_accepted] + [next_token])
        self._drafted = []

    def extend(self, tokens: list[int]) -> None:
        self.index.extend(list(tokens))
        self._drafted = []

    def close(self) -> None:
        self.index = NgramIndex(self.min_ngram, self.max_ngram)
        self._drafted = []


class HybridDrafter(Drafter):
    """A model drafter and an n-gram drafter in step; each round drafts from the source ``next_source()``
    picks.

    ``prefer_ngram`` (set by the generation loop from the two sources' draft-length policies) says whether
    the n-gram source's measured rate is at least the model's; the n-gram source is used only where it has
    a match. The model drafter starts at the first round that uses it, from the committed text the n-gram
    index holds, and hears every committed token after that: its own verdicts, and the n-gram rounds'
    tokens as committed ones (a remote drafter gets them with its next step).
    """

    source: str = MODEL  # its own length policy is the model drafter's; each round's: ``next_source()``

    def __init__(self, model: Drafter, ngram: NgramDrafter | None = None) -> None:
        self.model = model
        self.ngram = ngram or NgramDrafter()
        self.prefer_ngram = True
        self._params = SamplingParams()
        self._last: str | None = None  # the source of the block in flight
        self._model_started = False
        self._model_drafted: list[int] = []
        self._model_behind = 0  # committed tokens the started model drafter was only told of (extend)

    def start(self, context: list[int], params: SamplingParams) -> None:
        self.ngram.start(context, params)
        self._params = params
        self._last, self._model_started, self._model_behind = None, False, 0

    @property
    def model_pending(self) -> int:
        """Tokens the model drafter must take in before its next block (one prefill, paid in that round's
        drafting time): the whole text until it first drafts, then what lookup and plain rounds committed."""
        return self._model_behind if self._model_started else len(self.ngram.index.tokens)

    def next_source(self) -> str:
        """Where the coming round's block comes from."""
        return NGRAM if self.prefer_ngram and self.ngram.has_match else MODEL

    def propose(self, k: int, stop: EarlyStop | None = None) -> DraftBlock:
        self._last = self.next_source()
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
