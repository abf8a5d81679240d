"""The runner contract: what the scheduler, the drafters and the verifier ask of an execution backend.

A **runner** holds one model and the KV caches of many sequences. Each ``forward(rows)`` feeds every row's
new tokens to its sequence at the sequence's current length (ragged: a row may prefill a prompt chunk,
verify k + 1 drafted positions or decode one token) and returns float32 logits for the last ``keep``
positions of each row. ``rollback`` moves a sequence's length back; the positions past it are recomputed
on the next forward. Backends live side by side in ``runtime/backends/`` (torch eager, torch static
shapes, llama.cpp) and are chosen by ``runtime/factory.py``; ``tests/test_backends.py`` runs the same
cases against each of them.

``SlotRunner`` is the bookkeeping every backend shares: a slot per live sequence, reclaimed when the
sequence is released or garbage collected, the work counters, and the single-sequence helpers.
"""

from __future__ import annotations

import heapq
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .prefix_cache import PrefixCache


@dataclass(eq=False)
class Sequence:
    """One sequence's slot in the runner's KV cache and the token ids it caches (``len(tokens)``).

    ``salt``: whose prefixes it may reuse, and who may reuse its own (``prefix_cache.py``).
    """

    slot: int
    tokens: list[int] = field(default_factory=list)
    release: weakref.finalize | None = field(default=None, repr=False)  # gives the slot back once
    salt: str = ""

    def __len__(self) -> int:
        return len(self.tokens)


Picker = Callable[[torch.Tensor, int], tuple[torch.Tensor, ...]]  # (logits [vocab], step) -> (token [1], ...)


@dataclass
class Row:
    """One row of a forward: feed ``tokens`` to ``seq``; return logits of the last ``keep`` of them.

    A *stepped* row (``pick``) decodes ``steps`` tokens in one call: ``pick`` turns the last logits of each
    step into the next token (the first tensor it returns, [1] long, on the device) and whatever else its
    caller wants kept, and the next step feeds that token. The row then returns, in place of logits, the
    ``steps`` picks on the host. A backend on a device feeds each pick without the host reading it (one
    wait at the end of the block); a CPU backend may read it at once.
    """

    seq: Sequence
    tokens: list[int]
    keep: int = 1
    steps: int = 1
    pick: Picker | None = None


PENDING = -1  # a fed token the host does not know yet (a stepped row's pick, fixed after the block)


@runtime_checkable
class Runner(Protocol):
    """What the scheduler, ``TargetSession`` and ``ModelDrafter`` use of a backend (all of it runs on the
    service's one compute thread, but ``release``)."""

    name: str
    device: torch.device  # where logits and picks live (their tensors are made there)
    max_positions: int  # the longest sequence it can hold (0: unknown)
    tokens_processed: int
    forward_passes: int
    rows_processed: int
    prefix: PrefixCache  # finished sequences' KV kept for later ones (budget 0: none)

    @property
    def vocab_size(self) -> int: ...  # logits' last dimension

    @property
    def active_sequences(self) -> int: ...

    @property
    def kv_tokens_held(self) -> int: ...

    def new_sequence(self, salt: str = "") -> Sequence: ...

    def release(self, seq: Sequence) -> None: ...

    def reuse_prefix(self, seq: Sequence, tokens: list[int], keep: int = 1) -> int: ...

    def forward(self, rows: list[Row]) -> list: ...

    def extend(self, seq: Sequence, token_ids: list[int], keep: int | None = None) -> torch.Tensor: ...

    def rollback(self, seq: Sequence, length: int) -> None: ...

    def prefill(self, seq: Sequence, token_ids: list[int]) -> None: ...

    def describe(self) -> dict[str, Any]: ...  # backend, weights' type and bytes (the service's Info)


class SlotRunner:
    """Slots, counters and single-sequence helpers shared by the backends (subclasses: ``forward``)."""

    def __init__(
        self, name: str, slots: int, device: torch.device, max_positions: int, prefix_cache_tokens: int = 0
    ) -> None:
        self.name = name
        self.device = device
        self.max_positions = max_positions
        self.slots = slots
        self._free = list(range(slots))  # a min-heap: low slots first, so busy rows stay contiguous
        self._released: list[int] = []
        self._live: weakref.WeakValueDictionary[int, Sequence] = weakref.WeakValueDictionary()  # slot -> seq
        self._lock = threading.Lock()
        self.tokens_processed = 0
        self.forward_passes = 0
        self.rows_processed = 0
        self.prefix = PrefixCache(prefix_cache_tokens)

    # -- sequences -------------------------------------------------------------------------------------
    def new_sequence(self, salt: str = "") -> Sequence:
        """A fresh sequence with its own slot (freed when the sequence is garbage collected or released);
        a cached prefix's slot is given up first if every slot is taken (compute thread)."""
        with self._lock:
            self._reclaim()
            if not self._free:
                self._take_back(self.prefix.evict())
            if not self._free:
                self._free = self._grow()
            seq = Sequence(slot=heapq.heappop(self._free), salt=salt)
            self._live[seq.slot] = seq
        seq.release = weakref.finalize(seq, self._release_slot, seq.slot)
        return seq

    def reuse_prefix(self, seq: Sequence, tokens: list[int], keep: int = 1) -> int:
        """Before a new sequence's first forward: take the longest cached prefix of ``tokens`` (never the
        last ``keep`` of them, whose logits the forward computes) from the prefix cache into ``seq``'s slot
        without a forward. Returns how many of ``tokens`` are now cached; the caller feeds the rest (maybe
        nothing, for ``keep`` 0)."""
        if not self.prefix.enabled or len(seq.tokens):
            return 0
        found = self.prefix.match(tokens, seq.salt, len(tokens) - keep)
        if found.entry is None:
            return 0
        self._copy_prefix(found.entry.slot, seq.slot, found.length)
        seq.tokens = list(tokens[: found.length])
        return found.length

    def _copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Put the KV of slot ``src``'s first ``length`` positions in the (empty) slot ``dst``."""
        raise NotImplementedError(f"{self.name}: this backend keeps no prefix cache")

    def _take_back(self, slot: int | None) -> None:
        """``slot`` (a released one, an evicted entry's) becomes free (under the lock, compute thread)."""
        if slot is not None:
            self._on_reclaim(slot)
            heapq.heappush(self._free, slot)

    def _grow(self) -> list[int]:
        """Every slot is taken (under the lock): make room, return the new free slots (or raise)."""
        raise RuntimeError(f"{self.name}: all {self.slots} sequence slots are in use")

    def release(self, seq: Sequence) -> None:
        """Give ``seq``'s slot back (idempotent); ``seq`` must not be used afterwards. With a prefix cache
        the slot stays cached for later sequences that start with the same tokens (``prefix_cache.py``)."""
        if seq.release is not None and seq.release.detach() is not None:  # a finalizer runs once
            self._retain_slot(seq.slot, seq.tokens, seq.salt)
        seq.slot, seq.tokens = -1, []

    def _retain_slot(self, slot: int, tokens: list[int], salt: str) -> None:
        """``slot`` goes to the prefix cache, and what falls out of its budget (maybe ``slot``) is freed."""
        with self._lock:
            self._live.pop(slot, None)
            for dropped in self.prefix.retain(slot, tokens, salt):
                self._free_later(dropped)

    def _release_slot(self, slot: int) -> None:
        with self._lock:
            self._live.pop(slot, None)
            self._free_later(slot)

    def _free_later(self, slot: int) -> None:
        """``slot`` is freed at the next reclaim (under the lock; a slot freed already stays as it is)."""
        if slot not in self._released and slot not in self._free:
            self._released.append(slot)

    def _reclaim(self) -> None:
        """Released slots become free again (under the lock; a backend may clear their cache here)."""
        for slot in self._released:
            self._take_back(slot)
        self._released.clear()

    def _on_reclaim(self, slot: int) -> None:
        """A released slot is about to be reused (called on the compute thread, under the lock)."""

    @property
    def active_sequences(self) -> int:
        with self._lock:
            return self.slots - len(self._free) - len(self._released) - len(self.prefix)

    @property
    def kv_tokens_held(self) -> int:
        """Positions cached for the live sequences (what the KV buffers hold for someone)."""
        with self._lock:
            return sum(len(s.tokens) for s in list(self._live.values()))

    # -- rows ----------------------------------------------------------------------------------------
    def forward(self, rows: list[Row]) -> list:
        raise NotImplementedError

    def _check_rows(self, rows: list[Row]) -> None:
        if any(not r.tokens for r in rows):
            raise ValueError("every row of a forward feeds at least one token")
        if any(r.pick is not None and (r.steps < 1 or r.keep < 1) for r in rows):
            raise ValueError("a stepped row decodes at least one step from logits it keeps")
        if len({id(r.seq) for r in rows}) != len(rows):
            raise ValueError("a sequence appears twice in one forward")

    def _count(self, rows: list[Row]) -> None:
        self.tokens_processed += sum(len(r.tokens) for r in rows)
        self.forward_passes += 1
        self.rows_processed += len(rows)

    # -- single-sequence helpers ---------------------------------------------------------------------
    def extend(self, seq: Sequence, token_ids: list[int], keep: int | None = None) -> torch.Tensor:
        """Append ``token_ids`` to ``seq`` in one forward; float32 logits of the last ``keep`` positions.

        ``keep`` defaults to all new positions; 0 returns an empty tensor and skips the LM head.
        """
        if not token_ids:
            raise ValueError("extend needs at least one token")
        return self.forward([Row(seq, list(token_ids), len(token_ids) if keep is None else keep)])[0]

    def rollback(self, seq: Sequence, length: int) -> None:
        """Drop cached positions past ``length`` (a no-op when the sequence is not longer)."""
        if len(seq.tokens) > length:
            del seq.tokens[length:]

    def prefill(self, seq: Sequence, token_ids: list[int]) -> None:
        """Cache ``token_ids`` without computing logits (the context before the pending token)."""
        if token_ids:
            self.extend(seq, token_ids, keep=0)
