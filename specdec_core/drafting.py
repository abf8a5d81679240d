"""Drafting strategies behind one small interface, so a local model, a remote drafter service or no
drafter at all are interchangeable in the generation loop.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .compute import ComputeThread
from .runner import ModelRunner
from .sampling import (
    DEFAULT_MAX_SUPPORT,
    SamplingParams,
    SparseDist,
    logits_to_probs,
    make_generator,
    sample_sparse,
    truncate_support,
)


class DrafterUnavailable(RuntimeError):
    """The drafter cannot serve this generation any more (process died, connection lost)."""


@dataclass
class DraftBlock:
    """k drafted tokens and the sparse distribution each was sampled from."""

    tokens: list[int]
    dists: list[SparseDist]
    draft_s: float = 0.0  # compute time spent on the drafter's side

    def dense_probs(self, vocab_size: int, device: torch.device | str) -> torch.Tensor:
        """[k, vocab] dense draft probabilities (zeros outside each support)."""
        if not self.dists:
            return torch.zeros(0, vocab_size, device=device)
        return torch.stack([d.to_dense(vocab_size, device) for d in self.dists])


class Drafter(ABC):
    """Proposes blocks of tokens for one generation at a time."""

    @abstractmethod
    def start(self, context: list[int], params: SamplingParams) -> None:
        """Begin (or rebuild) a generation whose committed tokens are ``context``."""

    @abstractmethod
    def propose(self, k: int) -> DraftBlock:
        """Draft ``k`` tokens continuing the committed context."""

    @abstractmethod
    def accept(self, num_accepted: int, next_token: int) -> None:
        """The verifier kept the first ``num_accepted`` drafted tokens, then emitted ``next_token``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release per-generation state."""


class ModelDrafter(Drafter):
    """Drafts with a local small model, keeping its KV cache across rounds and rolling it back.

    With ``compute`` every call runs on that thread (a service's one model thread, see ``compute.py``).
    With ``lookahead`` the drafter keeps drafting while the verifier works: after returning a block it
    assumes the whole block will be accepted, guesses the verifier's bonus token and drafts the next block
    as background work of the compute thread, one token per step (a drafter with lookahead and no
    ``compute`` starts its own). If the verdict confirms the guess, the next block is already there;
    otherwise the speculative tokens are rolled back. Each drafted position draws from a generator keyed by
    (seed, position), so the drafts, and hence a seeded generation, do not depend on how far the lookahead
    got.
    """

    def __init__(
        self,
        runner: ModelRunner,
        max_support: int = DEFAULT_MAX_SUPPORT,
        lookahead: bool = False,
        compute: ComputeThread | None = None,
    ) -> None:
        self.runner = runner
        self.max_support = max_support
        self.lookahead = lookahead
        self.compute = compute
        self._owns_compute = False
        self.context: list[int] = []
        self._seq = runner.new_sequence()
        self._params = SamplingParams()
        self._seed = 0
        self._drafted: list[int] = []
        self._ready: list[tuple[int, SparseDist]] = []  # drafts already made for the current context
        self._ahead: tuple[int, list[tuple[int, SparseDist]]] | None = (
            None  # (guessed bonus, drafts after it)
        )
        self.lookahead_hits = 0

    def _run(self, fn, *args):
        return self.compute.call(fn, *args) if self.compute is not None else fn(*args)

    def start(self, context: list[int], params: SamplingParams) -> None:
        if not context:
            raise ValueError("a generation needs at least one context token")
        if self.lookahead and self.compute is None:
            self.compute, self._owns_compute = ComputeThread("specdec-drafter"), True
        self._run(self._start, context, params)

    def _start(self, context: list[int], params: SamplingParams) -> None:
        self._stop_lookahead()
        self.context = list(context)
        self._params = params
        self._seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self._seq = self.runner.new_sequence()
        self.runner.prefill(self._seq, self.context[:-1])
        self._drafted, self._ready, self._ahead = [], [], None

    def _sample(self, feed: list[int], position: int) -> tuple[int, SparseDist]:
        """Feed ``feed`` and sample the token at ``position`` (not fed)."""
        logits = self.runner.extend(self._seq, feed, keep=1)[0]  # [vocab]
        dist = truncate_support(logits_to_probs(logits, self._params), self.max_support)
        return sample_sparse(dist, make_generator(self._seed, stream=position)), dist

    def _draft(self, feed: list[int], position: int, n: int) -> list[tuple[int, SparseDist]]:
        """Feed ``feed`` then sample ``n`` tokens from ``position`` on; the last one is not fed."""
        out: list[tuple[int, SparseDist]] = []
        for i in range(n):
            out.append(self._sample(feed, position + i))
            feed = [out[-1][0]]
        return out

    def propose(self, k: int) -> DraftBlock:
        return self._run(self._propose, k)

    def _propose(self, k: int) -> DraftBlock:
        t0 = time.perf_counter()
        self._stop_lookahead()
        ready, self._ready = self._ready[:k], []
        if len(ready) < k:  # the cache covers context + ready[:-1]: continue after the last ready token
            feed = [ready[-1][0]] if ready else self.context[len(self._seq) :]
            ready += self._draft(feed, len(self.context) + len(ready), k - len(ready))
        else:
            self.runner.rollback(self._seq, len(self.context) + max(k - 1, 0))
        self._drafted = [t for t, _ in ready]
        if self.lookahead and self.compute is not None and k > 0:
            self.compute.set_background(self, self._look_ahead(k))
        return DraftBlock(tokens=self._drafted, dists=[d for _, d in ready], draft_s=time.perf_counter() - t0)

    def _look_ahead(self, k: int) -> Iterator[None]:
        """Background steps: assume the block is accepted, guess the bonus token, draft k tokens after it."""
        position = len(self.context) + len(self._drafted)
        guess, _ = self._sample([self._drafted[-1]], position)
        self._ahead = (guess, [])
        yield
        feed = [guess]
        for i in range(k):
            token, dist = self._sample(feed, position + 1 + i)
            self._ahead[1].append((token, dist))
            feed = [token]
            yield

    def _stop_lookahead(self) -> None:
        if self.compute is not None and self.compute.on_thread:
            self.compute.clear_background(self)

    def accept(self, num_accepted: int, next_token: int) -> None:
        self._run(self._accept, num_accepted, next_token)

    def _accept(self, num_accepted: int, next_token: int) -> None:
        self._stop_lookahead()
        base = len(self.context)
        drafted, ahead = self._drafted, self._ahead
        self._drafted, self._ahead = [], None
        self.context.extend(drafted[:num_accepted])
        self.context.append(next_token)
        if ahead and ahead[1] and num_accepted == len(drafted) and next_token == ahead[0]:
            self.lookahead_hits += 1
            self._ready = ahead[1]  # the cache covers context + ready[:-1]
            return
        # the cache holds old context + drafted (+ speculative tokens); keep what the verifier accepted
        self.runner.rollback(self._seq, min(len(self._seq), base + num_accepted))

    def close(self) -> None:
        if self.compute is not None:
            self.compute.call(self._stop_lookahead)
            if self._owns_compute:
                self.compute.close()
                self.compute, self._owns_compute = None, False
        self._seq = self.runner.new_sequence()
        self.context = []
