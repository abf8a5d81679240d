"""The generation loop: rounds of draft k / verify / accept until a stop condition.

``SpeculativeDecoder.generate`` drives a ``TargetSession`` (``target.py``) and any ``Drafter`` to produce
tokens. The verifier service uses the same pieces for its public Generate and Verify rpcs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace

from .draft_length import AdaptiveDraftLength, DraftLengthPolicy, FixedDraftLength, Load
from .drafting import DraftBlock, Drafter, DrafterDown, DrafterUnavailable, EarlyStop
from .hybrid import HybridDrafter
from .ngram import LOOKUP_K_MAX, MODEL, NGRAM, NgramDrafter
from .runtime.admission import Cancellation
from .runtime.batch_costs import BatchLoad
from .runtime.interface import Runner
from .runtime.scheduler import Executor, Inline
from .sampling import SamplingParams
from .stats import GenerationStats
from .stopping import Chunk, StopCriteria, Stopper
from .target import TargetSession
from .verification import Verdict

log = logging.getLogger(__name__)


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
        oversubscribe the cores, and spinning OpenMP threads then stalled a prefill for seconds (measured:
        16-token generations through both services 4.0-4.8 s sequential, 4.4-8.4 s overlapped).

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
    ) -> Iterator[Chunk]:
        """Yield emitted tokens round by round until a stop condition; fills ``stats`` as it goes.

        The first chunk is the first token, sampled from the target's prefill (no drafting round first).
        Without a drafter (once it fails, or in rounds where the policy drafts nothing) a round is a plain
        target decoding step. ``cancel`` abandons the generation from another thread (a client gone);
        ``overlap_prefill`` overrides the decoder's setting for this generation. With a ``HybridDrafter``
        each round drafts from the source it picks, and ``ngram_length`` (default: adaptive) sizes the
        n-gram source's blocks while ``draft_length`` sizes the model's.

        Prompt lookup (an ``NgramDrafter``, or a hybrid's) is weighed in two states, each with its own
        adaptive length: *copying*, while the text repeats an earlier stretch (the last ``COPY_STREAK`` or
        more committed tokens were all what the lookup proposed, or would have: every round computes the
        lookup's proposal, which costs nothing), and otherwise. A lookup is usually right, and worth long
        blocks, in the first state and mostly wrong in the second.
        """
        stats = stats if stats is not None else GenerationStats()
        policy = draft_length or FixedDraftLength(4)
        hybrid = drafter if isinstance(drafter, HybridDrafter) else None
        lookup = (
            hybrid.ngram if hybrid is not None else drafter if isinstance(drafter, NgramDrafter) else None
        )
        # each source has its own measured acceptance and cost, hence its own length policy; the lookup has
        # one more, for the rounds where the text is copying (see above), adaptive whenever its others are
        own = _source_of(drafter)  # a hybrid's own policy is its model drafter's
        policies = {own: policy}
        if hybrid is not None:
            policies[NGRAM] = ngram_length or AdaptiveDraftLength(k_max=LOOKUP_K_MAX)
        if lookup is not None:
            adaptive = isinstance(policies[NGRAM], AdaptiveDraftLength)
            policies[COPYING] = AdaptiveDraftLength(k_max=LOOKUP_K_MAX) if adaptive else policies[NGRAM]
        streak = 0  # committed tokens in a row that the lookup proposed (or would have)
        cancel = cancel or Cancellation()
        overlap = self.overlap_prefill if overlap_prefill is None else overlap_prefill
        t_start = time.perf_counter()
        session = TargetSession(self.target, prompt_ids, params, self.executor)
        stopper = Stopper(stop, self.tokenizer)
        cancel.on_cancel(session.cancel)
        if drafter is not None:
            cancel.on_cancel(drafter.cancel)
        member = policy if drafter is not None else FixedDraftLength(0)  # what the batch's planners see
        member.begin(0 if overlap else len(prompt_ids))  # a lazily started drafter catches up later
        self.load.join(member)
        try:
            if overlap:  # a remote drafter prefills on its own device while the target prefills here
                drafter = self._start_drafter(drafter, prompt_ids, params, stats)
            t0 = time.perf_counter()
            first = session.prefill(emit_first=True)
            assert first is not None
            stats.prefill_s = stats.first_token_s = time.perf_counter() - t0
            stats.target_passes, stats.target_tokens = session.passes, session.tokens_processed
            chunk = self._emit(stopper, [first], stats, t_start)
            yield chunk
            if chunk.finish_reason:
                return
            if overlap:
                drafter = self._feedback(drafter, Verdict(0, first), stats)
            started = overlap  # otherwise the drafter starts at the first round that drafts
            # the next drafted round carries the drafter's prefill of the context (or of tokens it missed):
            # its acceptance counts, its costs do not say what a round costs
            fresh = overlap
            unsent: list[int] = []  # committed since the drafter last heard, in rounds without drafting
            while True:
                cancel.check()
                room = stop.max_new_tokens - stopper.produced - 1
                if lookup is not None and started and unsent:  # the lookup must see every committed token
                    (hybrid or lookup).extend(unsent)  # before it proposes or picks the source
                    unsent = []
                behind = len(unsent) if started else len(session.context)  # the drafter's catching up
                if hybrid is not None and started:  # its model drafter's, after lookup rounds or lazily
                    behind = hybrid.model_pending
                load = replace(self.load.snapshot(policy), start_tokens=behind, remaining=room)
                source = own
                copying = streak >= COPY_STREAK
                if hybrid is not None:
                    # the lookup's acceptance in this state is measured every round, drafted or not (below)
                    lookup_policy = policies[COPYING if copying else NGRAM]
                    hybrid.prefer_ngram = _ngram_pays(lookup_policy, policies[MODEL], load)
                    source = hybrid.next_source()
                # what the lookup proposes now, drafted or not: whether the committed tokens continue it
                shadow = lookup.index.lookup(LOOKUP_K_MAX) if lookup is not None and started else []
                chosen = policies[COPYING if source == NGRAM and copying else source]
                k = min(chosen.next_length(load), room) if drafter else 0
                if drafter is not None and log.isEnabledFor(logging.DEBUG) and hasattr(chosen, "describe"):
                    log.debug("round %d: %s k %d; %s", stats.rounds, source, k, chosen.describe(load))
                start_s, catching_up = stats.draft_s, 0
                if k > 0 and not started:
                    drafter, unsent = self._start_drafter(drafter, session.context, params, stats), []
                    started = fresh = True
                    catching_up = behind
                elif k > 0 and unsent:
                    drafter = self._drafter_call(drafter, stats, "catching up", lambda d: d.extend(unsent))[1]
                    unsent, fresh, catching_up = [], True, behind
                elif k > 0 and hybrid is not None and source == MODEL and behind > 1:
                    fresh, catching_up = True, behind  # the model drafter's block starts with a catch-up
                start_s = stats.draft_s - start_s  # the start call's own time (a lazy drafter's is ~0)
                k = k if drafter else 0
                net_before = stats.network_s
                early_stop = chosen.early_stop(load) if k > 0 else None
                block, drafter = self._draft(drafter, max(k, 0), early_stop, stats)
                t0 = time.perf_counter()
                # the rounds this call stands for: a round without drafts, alone on the target, decodes a
                # block of plain_steps tokens in one runner call, as that many plain rounds
                rounds = self._plain_rounds(block, room + 1)
                if rounds > 1:
                    committed = session.decode(rounds)
                    verdict = Verdict(0, committed[-1])
                else:
                    verdict, _ = session.verify(block.tokens, block)
                    committed = block.tokens[: verdict.num_accepted] + [verdict.next_token]
                verify_s = (time.perf_counter() - t0) / rounds  # each round's share
                stats.verify_s += verify_s * rounds
                for _ in range(rounds):
                    stats.record_round(len(block.tokens), verdict.num_accepted)
                if block.tokens:
                    stats.record_source(
                        source, len(block.tokens), verdict.num_accepted, source == NGRAM and copying
                    )
                stats.target_passes, stats.target_tokens = session.passes, session.tokens_processed
                agree = _common_prefix(shadow, committed)
                observing = policies.get(COPYING if copying else NGRAM)
                if (
                    shadow
                    and not (source == NGRAM and block.tokens)
                    and isinstance(observing, AdaptiveDraftLength)
                ):
                    # not drafted: what the lookup would have had accepted (past the committed tokens: unknown)
                    judged = agree if agree == len(committed) else min(len(shadow), agree + 1)
                    observing.observe(judged, agree, len(block.tokens) + 1, verify_s)
                # a proposal that ran out before the committed tokens did (none: no match) says nothing past it
                streak = streak + agree if agree in (len(committed), len(shadow) or -1) else 0
                if block.tokens:
                    drafter = self._feedback(drafter, verdict, stats)
                elif drafter is not None and started:
                    unsent.extend(committed)
                for _ in range(rounds):
                    chosen.update(
                        len(block.tokens),
                        verdict.num_accepted,
                        verify_s,
                        block.draft_s + start_s,
                        stats.network_s - net_before,
                        block.confidences,
                        costs_valid=not (fresh and block.tokens),
                        start_tokens=catching_up if block.tokens else 0,
                    )
                fresh = fresh and not block.tokens
                chunk = self._emit(stopper, committed, stats, t_start)
                yield chunk
                if chunk.finish_reason:
                    break
        finally:
            stats.wall_s = time.perf_counter() - t_start
            self.load.leave(member)
            session.close()
            if drafter is not None:
                drafter.close()

    def _plain_rounds(self, block: DraftBlock, budget: int) -> int:
        """Tokens a round decodes: ``plain_steps`` (at most ``budget``) in one runner call when it drafted
        nothing and the session is alone on the target, else 1 (a verify of the block)."""
        if block.tokens or self.target.active_sequences > 1:
            return 1
        return max(min(self.plain_steps, budget), 1)

    @staticmethod
    def _emit(stopper: Stopper, tokens: list[int], stats: GenerationStats, t_start: float) -> Chunk:
        chunk = stopper.cut(tokens)
        stats.new_tokens = stopper.produced
        stats.wall_s = time.perf_counter() - t_start
        return chunk

    @staticmethod
    def _drafter_call(drafter: Drafter | None, stats: GenerationStats, what: str, call):
        """Run ``call(drafter)``; a ``DrafterUnavailable`` is logged and counted, and drops the drafter (a
        ``DrafterDown`` keeps it: the round goes without drafts).

        Returns (result, drafter) with drafter None once it is gone; the time spent counts as drafting.
        """
        if drafter is None:
            return None, None
        t0 = time.perf_counter()
        try:
            return call(drafter), drafter
        except DrafterDown as exc:  # gone for this round only: kept, asked again in later rounds
            if exc.fresh:
                log.warning("drafter not answering %s, decoding without it until it does: %s", what, exc)
                stats.drafter_failures += 1
            return None, drafter
        except DrafterUnavailable as exc:
            log.warning("drafter lost %s, continuing with the target alone: %s", what, exc)
            stats.drafter_failures += 1
            return None, None
        finally:
            stats.draft_s += time.perf_counter() - t0

    def _start_drafter(self, drafter, prompt_ids, params, stats) -> Drafter | None:
        return self._drafter_call(drafter, stats, "at start", lambda d: d.start(prompt_ids, params))[1]

    def _draft(
        self, drafter: Drafter | None, k: int, stop: EarlyStop | None, stats: GenerationStats
    ) -> tuple[DraftBlock, Drafter | None]:
        if drafter is None or k == 0:
            return DraftBlock(tokens=[], dists=[]), drafter
        t0 = time.perf_counter()
        draft_before = stats.draft_s
        block, drafter = self._drafter_call(drafter, stats, "mid-generation", lambda d: d.propose(k, stop))
        if block is None:
            return DraftBlock(tokens=[], dists=[]), drafter
        # the drafter reports its own compute time; the rest of the round trip is network (+ serialisation)
        round_trip = time.perf_counter() - t0
        stats.draft_s = draft_before + block.draft_s
        stats.network_s += max(round_trip - block.draft_s, 0.0)
        if block.tokens:
            stats.round_trips.append(round_trip)
        return block, drafter

    def _feedback(self, drafter: Drafter | None, verdict: Verdict, stats: GenerationStats) -> Drafter | None:
        call = lambda d: d.accept(verdict.num_accepted, verdict.next_token)  # noqa: E731
        return self._drafter_call(drafter, stats, "while accepting", call)[1]


COPY_STREAK = 3  # committed tokens in a row continuing the lookup's proposal: the text is copying
COPYING = "ngram-copying"  # the key of the lookup's length policy while the text is copying


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ngram_pays(ngram: DraftLengthPolicy, model: DraftLengthPolicy, load: Load) -> bool:
    """Whether a hybrid's n-gram source should draft when it has a match: where its planned rate is at
    least the model's. The lookup's acceptance and costs are measured every round, drafted or not (the
    policy's ``observe``), so it is never drafted just to learn: until both sources are measured (the model
    drafter by its own first rounds, the lookup by observing a few rounds with a match), the model drafts."""
    if not isinstance(ngram, AdaptiveDraftLength) or not isinstance(model, AdaptiveDraftLength):
        return True
    if ngram.learning or model.learning:
        return False
    return ngram.plan(load).rate >= model.plan(load).rate


def _source_of(drafter: Drafter | None) -> str:
    return MODEL if drafter is None else drafter.source
