"""Drafting strategies behind one small interface, so a local model, a remote drafter service or no
drafter at all are interchangeable in the generation loop.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

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
    meta: dict = field(default_factory=dict)

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
    """Drafts with a local small model, keeping its KV cache across rounds and rolling it back."""

    def __init__(self, runner: ModelRunner, max_support: int = DEFAULT_MAX_SUPPORT) -> None:
        self.runner = runner
        self.max_support = max_support
        self.context: list[int] = []
        self._seq = runner.new_sequence()
        self._params = SamplingParams()
        self._gen = make_generator(0)
        self._drafted: list[int] = []

    def start(self, context: list[int], params: SamplingParams) -> None:
        if not context:
            raise ValueError("a generation needs at least one context token")
        self.context = list(context)
        self._params = params
        self._gen = make_generator(params.seed, stream=1)
        self._seq = self.runner.new_sequence()
        self.runner.prefill(self._seq, self.context[:-1])
        self._drafted = []

    def propose(self, k: int) -> DraftBlock:
        t0 = time.perf_counter()
        tokens: list[int] = []
        dists: list[SparseDist] = []
        feed = self.context[len(self._seq) :]  # the pending token(s) not yet in the cache
        for i in range(k):
            logits = self.runner.extend(self._seq, feed, keep=1)[0]  # [vocab]
            dist = truncate_support(logits_to_probs(logits, self._params), self.max_support)
            token = sample_sparse(dist, self._gen)
            tokens.append(token)
            dists.append(dist)
            feed = [token]
            if i == k - 1:
                break
        self._drafted = tokens
        return DraftBlock(tokens=tokens, dists=dists, draft_s=time.perf_counter() - t0)

    def accept(self, num_accepted: int, next_token: int) -> None:
        base = len(self.context)
        self.context.extend(self._drafted[:num_accepted])
        self.context.append(next_token)
        # the cache holds context + drafted[:k-1]; keep what the verifier accepted
        self.runner.rollback(self._seq, min(len(self._seq), base + num_accepted))
        self._drafted = []

    def close(self) -> None:
        self._seq = self.runner.new_sequence()
        self.context = []
