"""The generation loop: rounds of draft k / verify / accept until a stop condition.

``SpeculativeDecoder.generate`` drives a ``TargetSession`` (``target.py``) and any ``Drafter`` to produce
tokens. The verifier service uses the same pieces for its public Generate and Verify rpcs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TypeVar

from .draft_length import DraftLengthPolicy, FixedDraftLength, Load
from .drafting import DraftBlock, Drafter, DrafterDown, DrafterUnavailable, EarlyStop
from .ngram import MODEL
from .runtime.admission import Cancellation
from .runtime.batch_costs import BatchLoad
from .runtime.interface import Runner
from .runtime.jobs import Executor, Inline
from .sampling import SamplingParams
from .sources import Choice, DraftSources
from .stats import GenerationStats
from .stopping import Chunk, StopCriteria, Stopper
from .target import TargetSession
from .verification import Verdict

log = logging.getLogger(__name__)
T = TypeVar("T")


class SpeculativeDecoder:
    """Speculative generation against one target model; any ``Drafter`` (or none) proposes tokens."""

    def __init__(
        self,
        target: Runner,
        tokenizer=None,
        executor: Executor | None = None,
        overlap_prefill: bool = True,
        plain_steps: int = 0,
        load: BatchLoad | None = None,
    ) -> None:
        """``executor``: the scheduler that runs the target's forwards (default: right here, one by one).

        ``load``: what the batch costs and yields (``runtime.batch_costs``), fed by the scheduler's forwards; the
        draft-length policy weighs each block against it. Without one, the decoder measures its own.

        ``overlap_prefill``: start the drafter before the target's prefill, so a remote drafter prefills on
        its own device meanwhile. Turn it off when both roles share the same CPU cores: two prefills at once
        oversubscribe them (docs/serving.md).

        ``plain_steps``: tokens per runner call of a round that drafts nothing (no drafter, or the length
        policy chose not to draft) while its session is alone on the target (0: 8 on CUDA, where each wait
        for the device costs a step's launches, else 1). Such a block counts as that many plain rounds.
        """
        self.target = target
        self.tokenizer = tokenizer
        self.load = load or BatchLoad()
        self.executor: Executor = executor or Inline(on_forward=self.load.on_forward)
        self.overlap_prefill = overlap_prefill
        # a round without drafts, alone on the target, decodes this many tokens per runner call (streamed
        # together): on a GPU the host then waits for the device once per block, not per token
        self.plain_steps = plain_steps or (8 if target.device.type == "cuda" else 1)

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stop: StopCriteria,
        drafter: Drafter | None = None,
        draft_length: DraftLengthPolicy | None = None,
        stats: GenerationStats | None = None,
        cancel: Cancellation | None = None,
        overlap_prefill: bool | None = None,
        ngram_length: DraftLengthPolicy | None = None,
        cache_salt: str = "",
    ) -> Iterator[Chunk]:
        """Yield emitted tokens round by round until a stop condition; fills ``stats`` as it goes.

        The first chunk is the first token, sampled from the target's prefill; then each round chooses a
        source and a length, drafts, verifies, commits and streams (``_round``). Without a drafter (once it
        fails, or where the policy drafts nothing) a round is a plain decoding step. ``cancel`` abandons the
        generation from another thread; ``overlap_prefill`` overrides the decoder's setting. With a
        ``HybridDrafter`` each round drafts from the source ``DraftSources`` picks, ``ngram_length``
        (default: adaptive) sizing the lookup's blocks and ``draft_length`` the model's; ``cache_salt``: whose
        cached prefixes the target may reuse."""
        stats = stats if stats is not None else GenerationStats()
        policy = draft_length or FixedDraftLength(4)
        sources = DraftSources(drafter, policy, ngram_length)
        cancel = cancel or Cancellation()
        overlap = self.overlap_prefill if overlap_prefill is None else overlap_prefill
        gen = _Generation(
            t_start=time.perf_counter(),
            session=TargetSession(self.target, prompt_ids, params, self.executor, cache_salt),
            stopper=Stopper(stop, self.tokenizer),
            stats=stats,
            link=DrafterLink(drafter, stats),
            sources=sources,
            policy=policy,
        )
        cancel.on_cancel(gen.session.cancel)
        if drafter is not None:
            cancel.on_cancel(drafter.cancel)
        member = policy if drafter is not None else FixedDraftLength(0)  # what the batch's planners see
        member.begin(0 if overlap else len(prompt_ids))  # a lazily started drafter catches up later
        self.load.join(member)
        try:
            chunk = self._first_token(gen, prompt_ids, params, overlap)
            yield chunk
            if chunk.finish_reason:
                return
            if overlap:  # the drafter was started with the prompt: it hears the first token
                gen.link.feedback(Verdict(0, chunk.token_ids[0]))
            # otherwise the drafter starts at the first round that drafts
            gen.started = gen.fresh = overlap
            while not chunk.finish_reason:
                cancel.check()
                chunk = self._round(gen, params)
                yield chunk
        finally:
            stats.wall_s = time.perf_counter() - gen.t_start
            self.load.leave(member)
            gen.session.close()
            gen.link.close()

    def _first_token(
        self, gen: _Generation, prompt_ids: list[int], params: SamplingParams, overlap: bool
    ) -> Chunk:
        """The target's prefill, which samples the first token; with ``overlap`` a remote drafter starts
        first, so it prefills on its own device meanwhile."""
        if overlap:
            gen.link.start(prompt_ids, params)
        t0 = time.perf_counter()
        first = gen.session.prefill(emit_first=True)
        assert first is not None
        gen.stats.prefill_s = gen.stats.first_token_s = time.perf_counter() - t0
        gen.stats.cached_tokens = gen.session.cached_tokens
        gen.stats.target_passes, gen.stats.target_tokens = gen.session.passes, gen.session.tokens_processed
        return gen.emit([first])

    def _round(self, gen: _Generation, params: SamplingParams) -> Chunk:
        """One round: choose the source and length, draft, verify, commit, stream."""
        step = self._choose(gen)
        self._draft(gen, step, params)
        self._verify(gen, step)
        gen.commit(step)
        return gen.emit(step.committed)

    def _choose(self, gen: _Generation) -> _Round:
        """The round's source, its length policy and the block length it asks for."""
        room = gen.stopper.stop.max_new_tokens - gen.stopper.produced - 1
        sources = gen.sources
        if sources.lookup is not None and gen.started and gen.unsent:
            # the lookup must see every committed token before it proposes or the source is picked
            (sources.hybrid or sources.lookup).extend(gen.unsent)
            gen.unsent = []
        behind = gen.drafter_behind
        load = replace(self.load.snapshot(gen.policy), start_tokens=behind, remaining=room)
        choice = sources.choose(load)
        proposal = sources.proposal() if gen.started else []
        chosen = choice.policy
        k = min(chosen.next_length(load), room) if gen.link.alive else 0
        if gen.link.alive and log.isEnabledFor(logging.DEBUG) and hasattr(chosen, "describe"):
            log.debug("round %d: %s k %d; %s", gen.stats.rounds, choice.source, k, chosen.describe(load))
        return _Round(load=load, choice=choice, proposal=proposal, k=k, behind=behind, room=room)

    def _draft(self, gen: _Generation, step: _Round, params: SamplingParams) -> None:
        """Bring the drafter up to date (start it, or tell it what rounds without drafting committed),
        then draft the block."""
        stats, k = gen.stats, step.k
        start_before = stats.draft_s
        if k > 0 and not gen.started:
            gen.link.start(gen.session.context, params)
            gen.unsent = []
            gen.started = gen.fresh = True
            step.catching_up = step.behind
        elif k > 0 and gen.unsent:
            gen.link.catch_up(gen.unsent)
            gen.unsent, gen.fresh, step.catching_up = [], True, step.behind
        elif k > 0 and gen.sources.hybrid is not None and step.choice.source == MODEL and step.behind > 1:
            # the model drafter's block starts with a catch-up on what lookup and plain rounds committed
            gen.fresh, step.catching_up = True, step.behind
        step.start_s = stats.draft_s - start_before  # the start call's own time (a lazy drafter's is ~0)
        k = k if gen.link.alive else 0
        step.network_before = stats.network_s
        early_stop = step.choice.policy.early_stop(step.load) if k > 0 else None
        step.block = gen.link.propose(max(k, 0), early_stop)

    def _verify(self, gen: _Generation, step: _Round) -> None:
        """One target call for the block: a verify, or, for a round that drafted nothing alone on the
        target, a decode of ``plain_steps`` tokens that stands for that many plain rounds."""
        t0 = time.perf_counter()
        block = step.block
        step.rounds = self._plain_rounds(block, step.room + 1)
        if step.rounds > 1:
            step.committed = gen.session.decode(step.rounds)
            step.verdict = Verdict(0, step.committed[-1])
        else:
            step.verdict, _ = gen.session.verify(block.tokens, block)
            step.committed = block.tokens[: step.verdict.num_accepted] + [step.verdict.next_token]
        step.verify_s = (time.perf_counter() - t0) / step.rounds  # each round's share

    def _plain_rounds(self, block: DraftBlock, budget: int) -> int:
        """Tokens a round decodes: ``plain_steps`` (at most ``budget``) in one runner call when it drafted
        nothing and the session is alone on the target, else 1 (a verify of the block)."""
        if block.tokens or self.target.active_sequences > 1:
            return 1
        return max(min(self.plain_steps, budget), 1)


@dataclass
class _Generation:
    """What one generation carries from round to round, and how a round's outcome updates it."""

    t_start: float
    session: TargetSession
    stopper: Stopper
    stats: GenerationStats
    link: DrafterLink
    sources: DraftSources
    policy: DraftLengthPolicy  # the drafter's own source's: what the batch's planners weigh
    # the drafter holds the context: started with the generation (overlapped prefill), or at the first
    # round that drafts
    started: bool = False
    # the next drafted round carries the drafter's prefill of the context (or of tokens it missed): its
    # acceptance counts, its costs do not say what a round costs
    fresh: bool = False
    unsent: list[int] = field(default_factory=list)  # committed since the drafter last heard (plain rounds)

    def emit(self, tokens: list[int]) -> Chunk:
        """The chunk of ``tokens`` the stop conditions let through."""
        chunk = self.stopper.cut(tokens)
        self.stats.new_tokens = self.stopper.produced
        self.stats.wall_s = time.perf_counter() - self.t_start
        return chunk

    def commit(self, step: _Round) -> None:
        """Count the round, tell the drafter (or remember what it missed) and feed the length policies."""
        stats, block, verdict, choice = self.stats, step.block, step.verdict, step.choice
        drafted, accepted = len(block.tokens), verdict.num_accepted
        stats.verify_s += step.verify_s * step.rounds
        for _ in range(step.rounds):
            stats.record_round(drafted, accepted)
        if drafted:
            stats.record_source(choice.source, drafted, accepted, choice.lookup_drafts and choice.copying)
        stats.target_passes, stats.target_tokens = self.session.passes, self.session.tokens_processed
        self.sources.observe(choice, step.proposal, drafted, step.committed, step.verify_s)
        if drafted:
            self.link.feedback(verdict)
        elif self.link.alive and self.started:
            self.unsent.extend(step.committed)
        for _ in range(step.rounds):
            choice.policy.update(
                drafted,
                accepted,
                step.verify_s,
                block.draft_s + step.start_s,
                stats.network_s - step.network_before,
                block.confidences,
                costs_valid=not (self.fresh and drafted),
                start_tokens=step.catching_up if drafted else 0,
            )
        self.fresh = self.fresh and not drafted

    @property
    def drafter_behind(self) -> int:
        """Context the drafter must take in before its next block (a hybrid's: its model drafter's); a
        drafter with a prefix cache is taken to hold what the target's cache held (the same tenant's
        earlier contexts reach both)."""
        if not self.started:
            drafter = self.link.drafter
            cached = self.session.cached_tokens if drafter is not None and drafter.caches_prefixes else 0
            return len(self.session.context) - cached
        if self.sources.hybrid is not None:
            return self.sources.hybrid.model_pending
        return len(self.unsent)


@dataclass
class _Round:
    """One round: what was chosen, then what the drafter and the target did."""

    load: Load
    choice: Choice
    proposal: list[int]  # what the lookup proposed at the round's start, drafted or not
    k: int  # the length the policy asked for
    behind: int  # context the drafter had to take in first
    room: int  # tokens the generation may still emit after this round's next token
    catching_up: int = 0  # context tokens the drafter took in during this round
    start_s: float = 0.0  # the drafter's start or catch-up call
    network_before: float = 0.0
    block: DraftBlock = field(default_factory=lambda: DraftBlock(tokens=[], dists=[]))
    verdict: Verdict = field(default_factory=lambda: Verdict(0, -1))
    committed: list[int] = field(default_factory=list)
    verify_s: float = 0.0  # per round it stands for
    rounds: int = 1  # plain rounds this call stands for


class DrafterLink:
    """The generation's drafter behind calls that outlive its failures: a ``DrafterDown`` skips the call
    (the round goes without drafts; the drafter is asked again later), a ``DrafterUnavailable`` drops it
    for the rest of the generation. Both are logged and counted; every call's time counts as drafting."""

    def __init__(self, drafter: Drafter | None, stats: GenerationStats) -> None:
        self.drafter = drafter
        self.stats = stats

    @property
    def alive(self) -> bool:
        return self.drafter is not None

    def start(self, context: list[int], params: SamplingParams) -> None:
        self._call("at start", lambda d: d.start(context, params))

    def catch_up(self, tokens: list[int]) -> None:
        self._call("catching up", lambda d: d.extend(tokens))

    def feedback(self, verdict: Verdict) -> None:
        self._call("while accepting", lambda d: d.accept(verdict.num_accepted, verdict.next_token))

    def propose(self, k: int, stop: EarlyStop | None) -> DraftBlock:
        """A block of up to ``k`` tokens (empty without a drafter, for k = 0, or when the call fails)."""
        if self.drafter is None or k == 0:
            return DraftBlock(tokens=[], dists=[])
        t0 = time.perf_counter()
        draft_before = self.stats.draft_s
        block = self._call("mid-generation", lambda d: d.propose(k, stop))
        if block is None:
            return DraftBlock(tokens=[], dists=[])
        # the drafter reports its own compute time; the rest of the round trip is network (+ serialisation)
        round_trip = time.perf_counter() - t0
        self.stats.draft_s = draft_before + block.draft_s
        self.stats.network_s += max(round_trip - block.draft_s, 0.0)
        if block.tokens:
            self.stats.round_trips.append(round_trip)
        return block

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.close()

    def _call(self, what: str, call: Callable[[Drafter], T]) -> T | None:
        if self.drafter is None:
            return None
        t0 = time.perf_counter()
        try:
            return call(self.drafter)
        except DrafterDown as exc:  # gone for this round only: kept, asked again in later rounds
            if exc.fresh:
                log.warning("drafter not answering %s, decoding without it until it does: %s", what, exc)
                self.stats.drafter_failures += 1
            return None
        except DrafterUnavailable as exc:
            log.warning("drafter lost %s, continuing with the target alone: %s", what, exc)
            self.stats.drafter_failures += 1
            self.drafter = None
            return None
        finally:
            self.stats.draft_s += time.perf_counter() - t0
