"""The generation loop: rounds of draft k / verify / accept, with stop conditions and statistics.

``TargetSession`` is the verifier's side of one generation (its KV cache, committed tokens and RNG);
``SpeculativeDecoder.generate`` drives a session and any ``Drafter`` to produce tokens. The verifier
service uses the same two pieces for its public Generate and Verify rpcs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, replace

import torch

from .draft_length import AdaptiveDraftLength, DraftLengthPolicy, FixedDraftLength, Load
from .drafting import DraftBlock, Drafter, DrafterDown, DrafterUnavailable, EarlyStop
from .ngram import MODEL, NGRAM, HybridDrafter, NgramDrafter
from .runtime.admission import Cancellation, GenerationCancelled
from .runtime.interface import Row, Runner, Sequence
from .runtime.batch_costs import BatchLoad
from .runtime.scheduler import Executor, Inline, Job, Task
from .sampling import SamplingParams, logits_to_probs, make_generator, position_noise, race
from .verification import Verdict, verify_coupled, verify_greedy, verify_sampled

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopCriteria:
    """When a generation ends: a token budget, end-of-sequence ids, stop strings (need a tokenizer)."""

    max_new_tokens: int = 128
    eos_token_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()


@dataclass
class GenerationStats:
    """Counters of one generation; times in seconds."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: rounds accepting draft i+1
    drafted_per_position: list[int] = field(default_factory=list)  # [i]: rounds drafting position i+1
    target_passes: int = 0
    target_tokens: int = 0  # positions the target processed (prefill included)
    draft_s: float = 0.0
    verify_s: float = 0.0
    prefill_s: float = 0.0  # the target's prompt prefill (the drafter's counts as drafting)
    network_s: float = 0.0
    wall_s: float = 0.0
    first_token_s: float = 0.0  # from the start of the generation to its first token
    new_tokens: int = 0
    drafter_failures: int = 0
    plain_rounds: int = 0  # rounds decoded without drafting (no drafter, or the policy chose k = 0)
    draft_lengths: list[int] = field(default_factory=list)
    round_trips: list[float] = field(default_factory=list)  # seconds of each drafter call that drafted
    sources: dict[str, list[int]] = field(default_factory=dict)  # source -> [rounds, drafted, accepted]
    copying: list[int] = field(default_factory=lambda: [0, 0, 0])  # the lookup rounds drafted while copying

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def record_round(self, k: int, n: int) -> None:
        for table in (self.accepted_per_position, self.drafted_per_position):
            table.extend([0] * (k - len(table)))
        for i in range(k):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += int(i < n)
        self.rounds += 1
        self.plain_rounds += int(k == 0)
        self.drafted += k
        self.accepted += n
        self.draft_lengths.append(k)

    def record_source(self, source: str, k: int, n: int, copying: bool = False) -> None:
        """A drafted round's block came from ``source`` ("model", "ngram"), ``copying``: a lookup round
        drafted while the text was copying an earlier stretch."""
        for counts in [self.sources.setdefault(source, [0, 0, 0])] + ([self.copying] if copying else []):
            counts[0], counts[1], counts[2] = counts[0] + 1, counts[1] + k, counts[2] + n

    def to_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "accepted_per_position": [
                a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)
            ],
            "mean_accepted_per_round": self.accepted / self.rounds if self.rounds else 0.0,
            "target_passes": self.target_passes,
            "target_tokens": self.target_tokens,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "prefill_s": self.prefill_s,
            "network_s": self.network_s,
            "wall_s": self.wall_s,
            "first_token_s": self.first_token_s,
            "plain_rounds": self.plain_rounds,
            "new_tokens": self.new_tokens,
            "tokens_per_s": self.tokens_per_s,
            "drafter_failures": self.drafter_failures,
            "mean_draft_length": sum(self.draft_lengths) / len(self.draft_lengths)
            if self.draft_lengths
            else 0.0,
            "drafter_source": {
                source: {"rounds": r, "drafted": d, "accepted": a}
                for source, (r, d, a) in self.sources.items()
            },
            "lookup_copying": dict(zip(("rounds", "drafted", "accepted"), self.copying, strict=True)),
        }


class TargetSession:
    """The target model's state for one generation: KV cache over committed tokens, RNG, counters.

    Invariant between rounds: the cache covers ``context[:-1]``; the last committed token is pending
    and is fed together with the next drafted block, so a round is exactly one forward pass (a session
    that was not prefilled feeds its whole context with its first block). Every forward is a job of
    ``executor`` (the verifier's scheduler batches the rows of all sessions).
    """

    def __init__(
        self,
        runner: Runner,
        context: list[int],
        params: SamplingParams,
        executor: Executor | None = None,
    ) -> None:
        if not context:
            raise ValueError("a generation needs at least one prompt token")
        self.runner = runner
        self.params = params
        self.context = list(context)
        self.executor: Executor = executor or Inline()
        self.generator = make_generator(params.seed, device=runner.device, stream=0)
        self.seq: Sequence | None = None
        self.passes = 0
        self.tokens_processed = 0
        self.cancelled = False
        self._task: Task | None = None

    def _run(self, job: Job):
        if self.cancelled:
            job.close()
            raise GenerationCancelled("generation cancelled")
        try:
            return self.executor.run(self.runner, job, self._watch)
        except CancelledError:
            raise GenerationCancelled("generation cancelled") from None

    def _watch(self, task: Task) -> None:
        self._task = task
        if self.cancelled:  # cancelled while the job was being submitted
            task.cancel()

    def cancel(self) -> None:
        """Abandon the session (any thread): the forward in flight is dropped at the next iteration."""
        self.cancelled = True
        if self._task is not None:
            self._task.cancel()

    def close(self) -> None:
        """Free the KV cache (its slot is reused from the next iteration on)."""
        if self.seq is not None:
            self.runner.release(self.seq)
            self.seq = None

    def prefill(self, emit_first: bool = False) -> int | None:
        """Cache the context. With ``emit_first`` the prompt's last position is fed too and the first new
        token is sampled from it and committed (returned): the first token needs no drafting round."""
        return self._run(self._prefill_job(emit_first))

    def _prefill_job(self, emit_first: bool) -> Job:
        self.seq = self.runner.new_sequence()
        feed = self.context if emit_first else self.context[:-1]
        if not feed:
            return None
        logits = yield Row(self.seq, feed, keep=1 if emit_first else 0)  # [1 | 0, vocab]
        self.passes += 1
        self.tokens_processed += len(feed)
        if not emit_first:
            return None
        token = int(self._pick(logits[0], len(self.context), check=True))
        self.context.append(token)
        return token

    @property
    def _rejection_rule(self) -> bool:
        """Sampled without a seed: the rejection rule, which needs the drafter's distributions (a seeded
        generation is verified by the coupled rule, see ``verification``; greedy by the argmax)."""
        return not self.params.greedy and self.params.seed is None

    def append(self, tokens: list[int]) -> None:
        """Commit tokens produced elsewhere (a client re-sending history it holds)."""
        self.context.extend(tokens)

    def decode(self, steps: int) -> list[int]:
        """Plain decoding: commit the target's next ``steps`` tokens, sampled as a plain round samples them,
        in one call of the runner (a stepped row: each token picked on the device and fed back, one wait)."""
        return self._run(self._decode_job(steps))

    def _decode_job(self, steps: int) -> Job:
        if self.seq is None:
            self.seq = self.runner.new_sequence()
        feed = self.context[len(self.seq) :]
        position = len(self.context)  # the first new token's
        picks = yield Row(
            self.seq, feed, keep=1, steps=steps, pick=lambda lg, i: (self._pick(lg, position + i),)
        )
        tokens = [int(p[0]) for p in picks]
        self.passes += steps
        self.tokens_processed += len(feed) + steps - 1
        self.context.extend(tokens)
        return tokens

    def _pick(self, logits: torch.Tensor, position: int, check: bool = False) -> torch.Tensor:
        """The target's token at ``position`` from its logits [vocab], as a plain round samples it, on the
        device: [1]. ``check``: refuse logits that are entirely -inf here (``logits_to_probs``), which reads
        them on the host; a plain block's picks are checked by nobody, as the verdict's probabilities are."""
        if self.params.greedy:
            return logits.argmax(dim=-1, keepdim=True)
        probs = logits_to_probs(logits, self.params, check=check)
        if self.params.seed is not None:  # keyed by position: what the target alone draws there
            return race(probs, position_noise(self.params.seed, position, probs.shape[-1])).reshape(1)
        return torch.multinomial(probs, 1, generator=self.generator)

    def verify(self, draft_tokens: list[int], block: DraftBlock | None = None, want_logprobs: bool = False):
        """One forward over the pending token(s) and ``draft_tokens``; returns (Verdict, logprobs | None).

        ``block`` carries the drafter's distributions (required when sampling). ``logprobs`` are the target
        model's log-probabilities of the emitted tokens (accepted drafts, then the next token).
        """
        k = len(draft_tokens)
        if self._rejection_rule and k and (block is None or len(block.dists) != k):
            raise ValueError("sampled verification needs the drafter's distribution for every drafted token")
        return self._run(self._verify_job(draft_tokens, block, want_logprobs))

    def _verify_job(self, draft_tokens: list[int], block: DraftBlock | None, want_logprobs: bool) -> Job:
        if self.seq is None:  # not prefilled: the context goes into this forward
            self.seq = self.runner.new_sequence()
        k = len(draft_tokens)
        feed = self.context[len(self.seq) :] + draft_tokens
        logits = yield Row(self.seq, feed, keep=k + 1)  # [k + 1, vocab]
        self.passes += 1
        self.tokens_processed += len(feed)
        drafted = torch.tensor(draft_tokens, dtype=torch.long)  # [k]
        if self.params.greedy:
            verdict = verify_greedy(drafted, logits)
        elif self.params.seed is not None:
            # (the verdict checks the probabilities, in its one wait: see verification)
            target_probs = logits_to_probs(logits, self.params, check=False)  # [k + 1, vocab]
            base, vocab = len(self.context), logits.shape[-1]
            noise = torch.stack([position_noise(self.params.seed, base + i, vocab) for i in range(k + 1)])
            verdict = verify_coupled(drafted, target_probs, noise)
        else:
            assert block is not None or k == 0
            target_probs = logits_to_probs(logits, self.params, check=False)  # [k + 1, vocab]
            draft_probs = (
                block.dense_probs(logits.shape[-1], logits.device)
                if block is not None
                else torch.zeros(0, logits.shape[-1], device=logits.device)
            )  # [k, vocab]
            verdict = verify_sampled(drafted, draft_probs, target_probs, self.generator)
        n = verdict.num_accepted
        self.runner.rollback(self.seq, len(self.context) + n)
        emitted = draft_tokens[:n] + [verdict.next_token]
        self.context.extend(emitted)
        logprobs = None
        if want_logprobs:
            lp = torch.log_softmax(logits[: n + 1], dim=-1)  # [n + 1, vocab]
            logprobs = lp[torch.arange(n + 1), torch.tensor(emitted, device=lp.device)].tolist()
        return verdict, logprobs


@dataclass
class Chunk:
    """Tokens emitted by one round (already cut at a stop condition)."""

    token_ids: list[int]
    finish_reason: str | None = None  # "length" | "eos" | "stop" once finished


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
        stopper = _Stopper(stop, self.tokenizer)
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
    def _emit(stopper: _Stopper, tokens: list[int], stats: GenerationStats, t_start: float) -> Chunk:
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


LOOKUP_K_MAX = 16  # lookup drafts cost nothing: only the verify forward bounds their length
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


class _Stopper:
    """Applies the token budget, EOS ids and stop strings to the emitted stream."""

    def __init__(self, stop: StopCriteria, tokenizer) -> None:
        if stop.stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.stop = stop
        self.tokenizer = tokenizer
        self.generated: list[int] = []

    @property
    def produced(self) -> int:
        return len(self.generated)

    def cut(self, emitted: list[int]) -> Chunk:
        room = self.stop.max_new_tokens - len(self.generated)
        out: list[int] = []
        for token in emitted[:room]:
            out.append(token)
            self.generated.append(token)
            if token in self.stop.eos_token_ids:
                return Chunk(out, "eos")
            if self.stop.stop_strings and self._hit_stop_string():
                return Chunk(out, "stop")
        return Chunk(out, "length" if len(self.generated) >= self.stop.max_new_tokens else None)

    def _hit_stop_string(self) -> bool:
        # only the tail can newly contain a stop string; decode a window wide enough for the longest one
        window = self.generated[-(max(len(s) for s in self.stop.stop_strings) + 8) :]
        text = self.tokenizer.decode(window, skip_special_tokens=False)
        return any(s in text for s in self.stop.stop_strings)
