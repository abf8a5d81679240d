"""Prefixes already computed: finished sequences keep their slot's KV, and a new sequence whose tokens
start the same way takes that prefix's KV instead of computing it.

A released sequence is *retained* rather than freed (``retain``): its slot still holds the KV of its
tokens, and an index maps the hash chain of its token blocks (``BLOCK`` tokens each, every hash covering
the salt and all the blocks before, as vLLM's automatic prefix caching does) to it. ``match`` walks a new
sequence's chain to the deepest block some entry shares, then on token by token inside the next block, so
a prefix need not end on a block boundary. The runner copies (or, on llama.cpp, shares) those positions
into the new sequence's slot; later rollbacks and writes of the new sequence touch its own slot only, so
an entry never changes while it is cached.

Entries are salted: a sequence matches only entries of its own salt (the service sets it per tenant), as a
hit shows in the time to first token and would tell one tenant what another sent (vLLM's
CVE-2025-46570). The cache holds at most ``budget`` tokens; the least recently used entries go first, and
an entry's slot goes back to the runner whenever a new sequence needs one (``evict``). A running sequence
never depends on an entry (it holds its own copy), so evicting one is always safe.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

BLOCK = 16  # tokens per hashed block


@dataclass(eq=False)
class Entry:
    """A retained slot: the tokens its KV holds, under one salt."""

    slot: int
    tokens: list[int]
    salt: str
    hashes: list[bytes] = field(default_factory=list)  # chain hash of each whole block
    used: int = 0  # recency (a counter, larger is newer)


@dataclass(frozen=True)
class Match:
    """The entry to take a prefix from and how many of its positions (0: none)."""

    entry: Entry | None = None
    length: int = 0


def chain(tokens: list[int], salt: str, blocks: int | None = None) -> list[bytes]:
    """The chain hash of each whole block of ``tokens`` (the first ``blocks`` of them): block i's hash
    covers the salt and blocks 0..i."""
    out: list[bytes] = []
    h = hashlib.blake2b(salt.encode(), digest_size=16).digest()
    n = len(tokens) // BLOCK if blocks is None else min(blocks, len(tokens) // BLOCK)
    for i in range(n):
        block = tokens[i * BLOCK : (i + 1) * BLOCK]
        h = hashlib.blake2b(
            h + b"".join(t.to_bytes(4, "little", signed=True) for t in block), digest_size=16
        ).digest()
        out.append(h)
    return out


class PrefixCache:
    """The retained entries of one runner, their block index and the token budget (module docstring).

    Thread-safe: sequences are released from any thread, matched and evicted on the compute thread.
    ``queries`` and ``hits`` count tokens asked for and found (vLLM's ``prefix_cache_queries`` and
    ``prefix_cache_hits``).
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._entries: dict[int, Entry] = {}  # slot -> entry
        self._index: dict[bytes, dict[int, Entry]] = {}  # chain hash -> entries sharing that prefix
        self._clock = 0
        self._lock = threading.Lock()
        self.tokens = 0
        self.queries = 0
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return len(self._entries)

    def retain(self, slot: int, tokens: list[int], salt: str) -> list[int]:
        """Keep ``slot`` as an entry for ``tokens``; returns the slots that now fall out of the budget
        (this one, if it cannot be kept), which the runner frees."""
        if not self.enabled or len(tokens) < BLOCK or len(tokens) > self.budget:
            return [slot]
        entry = Entry(slot, list(tokens), salt, chain(tokens, salt))
        with self._lock:
            self._clock += 1
            entry.used = self._clock
            self._entries[slot] = entry
            for h in entry.hashes:
                self._index.setdefault(h, {})[slot] = entry
            self.tokens += len(entry.tokens)
            dropped: list[int] = []
            while self.tokens > self.budget:
                dropped.append(self._drop(min(self._entries.values(), key=lambda e: e.used)))
            return dropped

    def evict(self) -> int | None:
        """Drop the least recently used entry; its slot (None: the cache is empty)."""
        with self._lock:
            if not self._entries:
                return None
            return self._drop(min(self._entries.values(), key=lambda e: e.used))

    def clear(self) -> list[int]:
        """Drop every entry; their slots."""
        with self._lock:
            return [self._drop(e) for e in list(self._entries.values())]

    def match(self, tokens: list[int], salt: str, limit: int) -> Match:
        """The longest cached prefix of ``tokens[:limit]`` under ``salt`` (counted as a query of ``limit``
        tokens)."""
        limit = min(limit, len(tokens))
        with self._lock:
            self.queries += max(limit, 0)
            if not self._entries or limit <= 0:
                return Match()
            best: Entry | None = None
            depth = 0
            for h in chain(tokens, salt, limit // BLOCK + 1):
                sharing = self._index.get(h)
                if not sharing:
                    break
                best = max(sharing.values(), key=lambda e: e.used)
                depth += 1
            if best is None:  # no whole block: an entry may still share a partial first block
                candidates = [e for e in self._entries.values() if e.salt == salt]
                if not candidates:
                    return Match()
                best = max(candidates, key=lambda e: _common(e.tokens, tokens, limit))
                depth = 0
            length = min(depth * BLOCK, limit)
            end = min(limit, len(best.tokens))
            while length < end and best.tokens[length] == tokens[length]:
                length += 1
            if length == 0:
                return Match()
            self._clock += 1
            best.used = self._clock
            self.hits += length
            return Match(best, length)

    def _drop(self, entry: Entry) -> int:
        """Remove ``entry`` (under the lock); its slot."""
        del self._entries[entry.slot]
        for h in entry.hashes:
            sharing = self._index.get(h)
            if sharing is not None:
                sharing.pop(entry.slot, None)
                if not sharing:
                    del self._index[h]
        self.tokens -= len(entry.tokens)
        return entry.slot


def _common(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n
