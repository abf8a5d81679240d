"""Drafting strategies behind one small interface, so a local model, a remote drafter service or no
drafter at all are interchangeable in the generation loop.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .compute import ComputeThread, run_on
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


@dataclass(frozen=True)
class EarlyStop:
    """When a drafter may end a block before ``k`` tokens.

    Each drafted token's chance of acceptance is ``acceptance[bin]`` for the bin of its confidence (the
    drafter model's probability of the token, ``CONFIDENCE_BINS`` equal bins on [0, 1]), or the
    confidence itself without a table. The block ends after the token at which the product of these
    chances (the estimated chance that the whole block is accepted) falls below ``below``.
    """

    below: float = 0.0
    acceptance: tuple[float, ...] = ()

    def chance(self, confidence: float) -> float:
        if len(self.acceptance) != CONFIDENCE_BINS:
            return confidence
        return self.acceptance[confidence_bin(confidence)]


CONFIDENCE_BINS = 10


def confidence_bin(confidence: float) -> int:
    return min(max(int(confidence * CONFIDENCE_BINS), 0), CONFIDENCE_BINS - 1)


_Drafted = tuple[int, SparseDist, float]  # (token, the distribution it was drawn from, confidence)


class DrafterUnavailable(RuntimeError):
    """The drafter cannot serve this generation any more (process died, connection lost)."""


@dataclass
class DraftBlock:
    """k drafted tokens and the sparse distribution each was sampled from."""

    tokens: list[int]
    dists: list[SparseDist]
    draft_s: float = 0.0  # compute time spent on the drafter's side
    # the drafter model's own probability of each drafted token (softmax at temperature 1); may be empty
    confidences: list[float] = field(default_factory=list)

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
    def propose(self, k: int, stop: EarlyStop | None = None) -> DraftBlock:
        """Draft up to ``k`` tokens continuing the committed context.

        A drafter that knows its confidence may end the block early by ``stop``; it always drafts at
        least one token.
        """

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
        self._ready: list[_Drafted] = []  # drafts already made for the current context
        self._ahead: tuple[int, list[_Drafted]] | None = None  # (guessed bonus, drafts after it)
        self.lookahead_hits = 0

    def start(self, context: list[int], params: SamplingParams) -> None:
        if not context:
            raise ValueError("a generation needs at least one context token")
        if self.lookahead and self.compute is None:
            self.compute, self._owns_compute = ComputeThread("specdec-drafter"), True
        run_on(self.compute, self._start, context, params)

    def _start(self, context: list[int], params: SamplingParams) -> None:
        self._stop_lookahead()
        self.context = list(context)
        self._params = params
        self._seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self._seq = self.runner.new_sequence()
        self.runner.prefill(self._seq, self.context[:-1])
        self._drafted, self._ready, self._ahead = [], [], None

    def _sample(self, feed: list[int], position: int) -> _Drafted:
        """Feed ``feed`` and sample the token at ``position`` (not fed)."""
        logits = self.runner.extend(self._seq, feed, keep=1)[0]  # [vocab]
        dist = truncate_support(logits_to_probs(logits, self._params), self.max_support)
        token = sample_sparse(dist, make_generator(self._seed, stream=position))
        confidence = float(torch.softmax(logits.float(), dim=-1)[token])
        return token, dist, confidence

    def propose(self, k: int, stop: EarlyStop | None = None) -> DraftBlock:
        return run_on(self.compute, self._propose, k, stop or EarlyStop())

    def _propose(self, k: int, stop: EarlyStop) -> DraftBlock:
        t0 = time.perf_counter()
        self._stop_lookahead()
        made, self._ready = self._ready, []  # the cache covers context + made[:-1]
        block: list[_Drafted] = []
        chance = 1.0  # estimated chance that the whole block so far is accepted

        def more() -> bool:
            return len(block) < k and not (block and chance < stop.below)

        for item in made:
            if not more():
                break
            block.append(item)
            chance *= stop.chance(item[2])
        keep = len(self.context) + len(block) - 1  # the cache must cover context + block[:-1]
        if len(self._seq) > keep:
            self.runner.rollback(self._seq, keep)
        while more():
            feed = [block[-1][0]] if block else self.context[len(self._seq) :]
            block.append(self._sample(feed, len(self.context) + len(block)))
            chance *= stop.chance(block[-1][2])
        self._drafted = [t for t, _, _ in block]
        if self.lookahead and self.compute is not None and block:
            self.compute.set_background(self, self._look_ahead(k))
        return DraftBlock(
            tokens=self._drafted,
            dists=[d for _, d, _ in block],
            draft_s=time.perf_counter() - t0,
            confidences=[c for _, _, c in block],
        )

    def _look_ahead(self, k: int) -> Iterator[None]:
        """Background steps: assume the block is accepted, guess the bonus token, draft k tokens after it."""
        position = len(self.context) + len(self._drafted)
        guess = self._sample([self._drafted[-1]], position)[0]
        self._ahead = (guess, [])
        yield
        feed = [guess]
        for i in range(k):
            self._ahead[1].append(self._sample(feed, position + 1 + i))
            feed = [self._ahead[1][-1][0]]
            yield

    def _stop_lookahead(self) -> None:
        if self.compute is not None and self.compute.on_thread:
            self.compute.clear_background(self)

    def accept(self, num_accepted: int, next_token: int) -> None:
        run_on(self.compute, self._accept, num_accepted, next_token)

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
