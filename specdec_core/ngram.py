"""Drafting without a draft model: prompt lookup (n-gram).

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

The hybrid of a model drafter and this lookup is ``hybrid.py``.
"""

from __future__ import annotations

import time

import torch

from .drafting import DraftBlock, Drafter, EarlyStop
from .sampling import SamplingParams, SparseDist
from .suffix_index import SuffixIndex

NGRAM = "ngram"
MODEL = "model"
LOOKUP_K_MAX = 16  # lookup drafts cost nothing: only the verify forward bounds their length


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
    """Prompt-lookup drafting: no model, no network; one-hot draft distributions (module docstring).

    ``shared``: earlier generations' texts (``suffix_index.py``), searched under ``cache_salt``; they draft
    where they match a longer n-gram of the text's end than the text itself does.
    """

    source: str = NGRAM

    def __init__(
        self, min_ngram: int = 2, max_ngram: int = 4, shared: SuffixIndex | None = None, cache_salt: str = ""
    ) -> None:
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.index = NgramIndex(min_ngram, max_ngram)
        self.shared, self.cache_salt = shared, cache_salt
        self._prompt: frozenset[int] = frozenset()  # the tokens the prompt held (``SuffixIndex.propose``)
        self._drafted: list[int] = []

    def start(self, context: list[int], params: SamplingParams) -> None:
        if not context:
            raise ValueError("a generation needs at least one context token")
        self.index = NgramIndex(self.min_ngram, self.max_ngram)
        self.index.extend(list(context))
        self._prompt = frozenset(context)
        self._drafted = []

    @property
    def context(self) -> list[int]:
        """The committed text (prompt + generated) the lookup searches."""
        return self.index.tokens

    @property
    def has_match(self) -> bool:
        if self.index.match() is not None:
            return True
        return self.shared is not None and self.shared.has_match(self.cache_salt, self.index.tokens)

    def proposal(self, k: int) -> list[int]:
        """What the lookup proposes now: an earlier generation's continuation where it matches a longer
        n-gram of the text's end than the text itself does (the same JSON keys, not a value that also
        occurs in the prompt), else the text's own."""
        if self.shared is not None:
            found = self.index.match()
            if self.shared.match_length(self.cache_salt, self.index.tokens) > (found[0] if found else 0):
                return self.shared.propose(self.cache_salt, self.index.tokens, k, self._prompt)
        return self.index.lookup(k)

    def propose(self, k: int, stop: EarlyStop | None = None) -> DraftBlock:
        t0 = time.perf_counter()
        self._drafted = self.proposal(k)
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
