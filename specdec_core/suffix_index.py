"""Drafts from earlier generations: a bounded index of finished texts that prompt lookup turns to when the
current text has no match of its own (suffix decoding: Arctic Inference, vLLM).

Agents and structured-output clients repeat themselves across requests: the same JSON shape, the same
tool call, the same boilerplate around different values. ``SuffixIndex`` keeps the prompts and outputs of
finished generations, each under a *scope* (the tenant's salt: one tenant's text never shapes another's
drafts, as acceptance timing would tell what the other sent), and maps every n-gram of them
(``min_ngram <= n <= max_ngram``) to where it occurred. A proposal matches the longest n-gram ending the
current text, then walks forward through all its occurrences at once: each step takes the next token most
of them agree on (frequency-weighted, as a suffix tree's counts weigh its branches) and keeps only the
occurrences that continue with it, stopping where no continuation holds ``MIN_SHARE`` of them.

A text remembers which tokens its own prompt held. Structured output copies its values from its input
(the name, the city): given the current request's prompt, a proposal stops before a token that every
earlier text continuing with it had in its prompt and the current prompt lacks. The earlier request's
value is not drafted into this one (it would be rejected, and on CPUs a rejected position still costs its
share of the verify), while the keys and punctuation around it, which the prompts share or do not hold,
are.

The index holds at most ``budget`` tokens; the least recently used texts (added or proposed from) go
first. Thread-safe: generations finish and propose from many threads.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass

MIN_SHARE = 0.34  # a drafted token must continue at least this share of the occurrences still matching
MAX_OCCURRENCES = 64  # occurrences kept per n-gram (the most recent)


@dataclass(eq=False)
class _Text:
    scope: str
    tokens: list[int]
    prompt: frozenset[int] = frozenset()  # the tokens its prompt held


class SuffixIndex:
    """Finished texts by scope, and the n-grams that lead into them (module docstring)."""

    def __init__(self, budget: int, min_ngram: int = 2, max_ngram: int = 4) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.budget = budget
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self._texts: OrderedDict[int, _Text] = OrderedDict()  # id -> text, least recently used first
        self._table: dict[tuple[str, tuple[int, ...]], list[tuple[int, int]]] = {}  # -> [(text id, end)]
        self._next_id = 0
        self._lock = threading.Lock()
        self.tokens = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, scope: str, tokens: list[int], prompt_len: int = 0) -> None:
        """Index a finished text (prompt and output; its first ``prompt_len`` tokens the prompt) under
        ``scope``; older texts go past the budget."""
        if not self.enabled or len(tokens) <= self.min_ngram or len(tokens) > self.budget:
            return
        text = _Text(scope, list(tokens), frozenset(tokens[:prompt_len]))
        with self._lock:
            tid, self._next_id = self._next_id, self._next_id + 1
            self._texts[tid] = text
            self.tokens += len(text.tokens)
            for key, end in self._ngrams(text):
                occurrences = self._table.setdefault(key, [])
                occurrences.append((tid, end))
                del occurrences[:-MAX_OCCURRENCES]
            while self.tokens > self.budget:
                self._drop(next(iter(self._texts)))

    def propose(
        self, scope: str, context: list[int], k: int, prompt: frozenset[int] | None = None
    ) -> list[int]:
        """Up to ``k`` tokens continuing ``context`` the way earlier texts of ``scope`` continued its last
        n-gram (none without a match); given the current request's ``prompt`` tokens, never one its earlier
        texts took from their own prompts and this one does not hold (the module docstring)."""
        with self._lock:
            active = self._longest(scope, context)[1]
            out: list[int] = []
            while active and len(out) < k:
                step = len(out) + 1
                nexts = [(t, e) for t, e in active if e + step < len(self._texts[t].tokens)]
                if not nexts:
                    break
                counts = Counter(self._texts[t].tokens[e + step] for t, e in reversed(nexts))  # newest first
                token, count = counts.most_common(1)[0]
                if count < MIN_SHARE * len(active):
                    break
                following = [(t, e) for t, e in nexts if self._texts[t].tokens[e + step] == token]
                if (
                    prompt is not None
                    and token not in prompt
                    and all(token in self._texts[t].prompt for t, _ in following)
                ):
                    break  # an earlier request's own value
                out.append(token)
                active = following
            for tid in {t for t, _ in active}:
                self._texts.move_to_end(tid)  # proposed from: recently used
            return out

    def has_match(self, scope: str, context: list[int]) -> bool:
        return self.match_length(scope, context) > 0

    def match_length(self, scope: str, context: list[int]) -> int:
        """The length of the longest n-gram ending ``context`` that ``scope``'s texts hold (0: none)."""
        with self._lock:
            return self._longest(scope, context)[0]

    def _longest(self, scope: str, context: list[int]) -> tuple[int, list[tuple[int, int]]]:
        """The length of the longest n-gram ending ``context`` in ``scope``'s texts, and its occurrences
        (under the lock)."""
        if not self._texts:
            return 0, []
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            occurrences = self._table.get((scope, tuple(context[-n:])))
            if occurrences:
                return n, list(occurrences)
        return 0, []

    def _ngrams(self, text: _Text):
        """((scope, n-gram), end) of every n-gram of ``text`` that a token follows."""
        tokens = text.tokens
        for end in range(len(tokens) - 1):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end - n + 1 >= 0:
                    yield (text.scope, tuple(tokens[end - n + 1 : end + 1])), end

    def _drop(self, tid: int) -> None:
        """Forget text ``tid`` and its occurrences (under the lock)."""
        text = self._texts.pop(tid)
        self.tokens -= len(text.tokens)
        for key, _ in self._ngrams(text):
            occurrences = self._table.get(key)
            if occurrences is None:
                continue
            occurrences[:] = [(t, e) for t, e in occurrences if t != tid]
            if not occurrences:
                del self._table[key]
