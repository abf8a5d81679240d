"""Drafting strategies behind one small interface, so a local model, a remote drafter service or no
drafter at all are interchangeable in the generation loop.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .runtime.interface import Row, Runner, Sequence
from .runtime.jobs import Executor, Inline, Job, Task
from .runtime.scheduler import Scheduler
from .sampling import DEFAULT_MAX_SUPPORT, SamplingParams, SparseDist, draft_pick, picked


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


class DrafterDown(DrafterUnavailable):
    """The drafter does not answer now (late past its deadline, restarting, unreachable): this round goes
    without it, and the generation asks it again later. ``fresh``: a new failure, not a round skipped while
    it is known to be down (stats count only fresh ones)."""

    def __init__(self, message: str, fresh: bool = True) -> None:
        super().__init__(message)
        self.fresh = fresh


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

    # what its blocks come from, for the stats' per-source breakdown and the length policy's bounds:
    # "model" (a language model) or "ngram" (prompt lookup, free to draft)
    source: str = "model"
    # a start takes the context's cached prefix from a prefix cache (the planner prices only the rest)
    caches_prefixes: bool = False
    # the tenant's salt (set before ``start``): whose cached prefixes and earlier texts it may draft from
    cache_salt: str = ""

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

    @abstractmethod
    def extend(self, tokens: list[int]) -> None:
        """``tokens`` were committed without drafting (plain decoding rounds): append them to the context."""

    def cancel(self) -> None:  # noqa: B027 - optional hook
        """Abandon the call in flight, from any thread (the generation is being cancelled)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release per-generation state."""


LOOKAHEAD_CHUNK = 2  # steps per runner call of a one-call drafter's lookahead (it cannot stop mid-call)


class ModelDrafter(Drafter):
    """Drafts with a local small model, keeping its KV cache across rounds and rolling it back; a start
    takes what it can of the context from the runner's prefix cache, under ``cache_salt``.

    Every forward is a job of ``executor`` (a service's scheduler batches the draft steps of all its
    streams; in-process use drives them right here). With ``lookahead`` the drafter keeps drafting while
    the verifier works: it assumes the whole block will be accepted, guesses the bonus token and drafts the
    next block as a background job (a drafter with lookahead and no scheduler starts its own); a verdict
    that refutes the guess rolls those tokens back. Each drafted position draws from randomness keyed by
    (seed, position), so the drafts do not depend on how far the lookahead got; a seeded generation races
    the same noise as its target (``sampling.race``: the coupled rule).

    ``one_call`` drafts a whole block in one call of the runner (a stepped row: each pick fed back on the
    device, one wait at the end), the GPU default; an early stop (``EarlyStop``) then cuts the block after
    it is drafted. On a CPU the drafter steps one forward at a time and stops as soon as it should. Both
    make the same drafts (``sampling.draft_pick``).
    """

    def __init__(
        self,
        runner: Runner,
        max_support: int = DEFAULT_MAX_SUPPORT,
        lookahead: bool = False,
        executor: Executor | None = None,
        one_call: bool | None = None,
        cache_salt: str = "",
    ) -> None:
        self.runner, self.cache_salt = runner, cache_salt
        self.caches_prefixes = runner.prefix.enabled
        self.one_call = runner.device.type == "cuda" if one_call is None else one_call
        self.max_support = max_support
        self.lookahead = lookahead
        self.executor: Executor = executor or Inline()
        self._owns_scheduler = False
        self.context: list[int] = []
        self._seq: Sequence | None = None
        self._params = SamplingParams()
        self._seed = 0
        self._drafted: list[int] = []
        self._ready: list[_Drafted] = []  # drafts already made for the current context
        self._ahead: list[_Drafted] = []  # lookahead: the guessed bonus, then the drafts after it
        self._lookahead_task: Task | None = None
        self._task: Task | None = None  # the foreground job in flight (cancelled by ``cancel``)
        self.lookahead_hits = 0

    def _watch(self, task: Task) -> None:
        self._task = task

    def cancel(self) -> None:
        """Abandon the job in flight (any thread): its caller gets ``CancelledError``."""
        if self._task is not None:
            self._task.cancel()

    def start(self, context: list[int], params: SamplingParams) -> None:
        if not context:
            raise ValueError("a generation needs at least one context token")
        if self.lookahead and not isinstance(self.executor, Scheduler):
            self.executor, self._owns_scheduler = Scheduler("specdec-drafter"), True
        self.executor.run(self.runner, self._start_job(list(context), params), self._watch)

    def _start_job(self, context: list[int], params: SamplingParams) -> Job:
        self._stop_lookahead()
        if self._seq is not None:
            self.runner.release(self._seq)
        self.context, self._params = context, params
        self._seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self._seq = self.runner.new_sequence(self.cache_salt)
        self._drafted, self._ready, self._ahead = [], [], []
        cached = self.runner.reuse_prefix(self._seq, context[:-1], keep=0) if len(context) > 1 else 0
        if len(context) - 1 > cached:
            yield Row(self._seq, context[cached:-1], keep=0)

    def _pick(self, logits: torch.Tensor, position: int) -> tuple[torch.Tensor, ...]:
        """The token at ``position`` from its logits [vocab], on the device (``sampling.draft_pick``)."""
        return draft_pick(logits, self._params, position, self._seed, self.max_support)

    def _steps(self, feed: list[int], position: int, steps: int, into: list[_Drafted], chunk: int = 0) -> Job:
        """Draft ``steps`` tokens after ``feed``, the first at ``position``, appending them to ``into`` as
        they come: stepped rows of ``chunk`` steps (0: all; ``one_call``), else one forward per token."""
        assert self._seq is not None
        per_call = (chunk or steps) if self.one_call else 1
        start, end = position, position + steps
        while start < end:
            n = min(per_call, end - start)
            if n > 1:  # (the pick runs within this iteration's call: ``start`` is this call's)
                picks = yield Row(
                    self._seq, feed, keep=1, steps=n, pick=lambda lg, i: self._pick(lg, start + i)
                )
                into.extend(picked(p) for p in picks)  # type: ignore[arg-type]
            else:
                logits = yield Row(self._seq, feed, keep=1)
                into.append(picked(self._pick(logits[0], start)))  # type: ignore[arg-type]
            feed, start = [into[-1][0]], start + n

    def propose(self, k: int, stop: EarlyStop | None = None) -> DraftBlock:
        return self.executor.run(self.runner, self._propose_job(k, stop or EarlyStop()), self._watch)

    def _propose_job(self, k: int, stop: EarlyStop) -> Job:
        t0 = time.perf_counter()
        self._stop_lookahead()
        assert self._seq is not None, "propose before start"
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
        self.runner.rollback(self._seq, keep)
        while more():
            feed = [block[-1][0]] if block else self.context[len(self._seq) :]
            # the rest of the block in one call, or one forward at a time (see the class doc)
            drafted: list[_Drafted] = []
            yield from self._steps(
                feed, len(self.context) + len(block), k - len(block) if self.one_call else 1, drafted
            )
            for item in drafted:
                if not more():
                    break
                block.append(item)
                chance *= stop.chance(item[2])
        self.runner.rollback(self._seq, len(self.context) + len(block) - 1)  # drafts past an early stop
        self._drafted = [t for t, _, _ in block]
        if self.lookahead and isinstance(self.executor, Scheduler) and block:
            self._lookahead_task = self.executor.submit(self.runner, self._look_ahead(k), background=True)
        return DraftBlock(
            tokens=self._drafted,
            dists=[d for _, d, _ in block],
            draft_s=time.perf_counter() - t0,
            confidences=[c for _, _, c in block],
        )

    def _look_ahead(self, k: int) -> Job:
        """Background rows: assume the block is accepted, guess the bonus token, draft k tokens after it."""
        self._ahead = []
        # in calls of LOOKAHEAD_CHUNK steps: a verdict that arrives meanwhile waits for one call at most
        position = len(self.context) + len(self._drafted)
        yield from self._steps([self._drafted[-1]], position, k + 1, self._ahead, LOOKAHEAD_CHUNK)

    def _stop_lookahead(self) -> None:
        """Cancel the lookahead job (on the compute thread: it is dropped before the next forward)."""
        if self._lookahead_task is not None:
            self._lookahead_task.cancel()
            self._lookahead_task = None

    @property
    def pending(self) -> int:
        """Tokens of the last block proposed and not yet judged (a verdict can accept at most these)."""
        return len(self._drafted)

    def accept(self, num_accepted: int, next_token: int) -> None:
        self.executor.call(self._accept, num_accepted, next_token)

    def _accept(self, num_accepted: int, next_token: int) -> None:
        self._stop_lookahead()
        base = len(self.context)
        drafted, ahead = self._drafted, self._ahead
        self._drafted, self._ahead = [], []
        self.context.extend(drafted[:num_accepted])
        self.context.append(next_token)
        if len(ahead) > 1 and drafted and num_accepted == len(drafted) and next_token == ahead[0][0]:
            self.lookahead_hits += 1
            self._ready = ahead[1:]  # the cache covers context + ready[:-1]
            return
        # the cache holds old context + drafted (+ speculative tokens); keep what the verifier accepted
        if self._seq is not None:
            self.runner.rollback(self._seq, base + num_accepted)

    def extend(self, tokens: list[int]) -> None:
        if tokens:
            self.executor.call(self._extend, list(tokens))

    def _extend(self, tokens: list[int]) -> None:
        self._stop_lookahead()
        self._drafted, self._ahead, self._ready = [], [], []
        if self._seq is not None:
            self.runner.rollback(self._seq, len(self.context))  # keep committed positions only
        self.context.extend(tokens)

    def close(self) -> None:
        self.cancel()
        if isinstance(self.executor, Scheduler):
            try:
                self.executor.call(self._stop_lookahead)
            except RuntimeError:  # the scheduler is already closed
                pass
        if self._owns_scheduler:
            assert isinstance(self.executor, Scheduler)
            self.executor.close()
            self.executor, self._owns_scheduler = Inline(), False
        if self._seq is not None:
            self.runner.release(self._seq)
            self._seq = None
        self.context = []
