"""The generation loop: rounds of draft k / verify / accept, with stop conditions and statistics.

``TargetSession`` is the verifier's side of one generation (its KV cache, committed tokens and RNG);
``SpeculativeDecoder.generate`` drives a session and any ``Drafter`` to produce tokens. The verifier
service uses the same two pieces for its public Generate and Verify rpcs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .compute import ComputeThread, run_on
from .draft_length import DraftLengthPolicy, FixedDraftLength
from .drafting import DraftBlock, Drafter, DrafterUnavailable, EarlyStop
from .runner import ModelRunner
from .sampling import SamplingParams, logits_to_probs, make_generator
from .verification import Verdict, verify_greedy, verify_sampled

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
    new_tokens: int = 0
    drafter_failures: int = 0
    draft_lengths: list[int] = field(default_factory=list)

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
        self.drafted += k
        self.accepted += n
        self.draft_lengths.append(k)

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
            "new_tokens": self.new_tokens,
            "tokens_per_s": self.tokens_per_s,
            "drafter_failures": self.drafter_failures,
            "mean_draft_length": sum(self.draft_lengths) / len(self.draft_lengths)
            if self.draft_lengths
            else 0.0,
        }


class TargetSession:
    """The target model's state for one generation: KV cache over committed tokens, RNG, counters.

    Invariant between rounds: the cache covers ``context[:-1]``; the last committed token is pending
    and is fed together with the next drafted block, so a round is exactly one forward pass.
    """

    def __init__(self, runner: ModelRunner, context: list[int], params: SamplingParams) -> None:
        if not context:
            raise ValueError("a generation needs at least one prompt token")
        self.runner = runner
        self.params = params
        self.context = list(context)
        self.generator = make_generator(params.seed, device=runner.device, stream=0)
        self.seq = runner.new_sequence()
        self.runner.prefill(self.seq, self.context[:-1])
        self.passes = 1 if len(self.context) > 1 else 0
        self.tokens_processed = len(self.context) - 1

    def append(self, tokens: list[int]) -> None:
        """Commit tokens produced elsewhere (a client re-sending history it holds)."""
        self.context.extend(tokens)

    def verify(self, draft_tokens: list[int], block: DraftBlock | None = None, want_logprobs: bool = False):
        """One forward over the pending token(s) and ``draft_tokens``; returns (Verdict, logprobs | None).

        ``block`` carries the drafter's distributions (required when sampling). ``logprobs`` are the target
        model's log-probabilities of the emitted tokens (accepted drafts, then the next token).
        """
        k = len(draft_tokens)
        feed = self.context[len(self.seq) :] + draft_tokens
        logits = self.runner.extend(self.seq, feed, keep=k + 1)  # [k + 1, vocab]
        self.passes += 1
        self.tokens_processed += len(feed)
        drafted = torch.tensor(draft_tokens, dtype=torch.long)  # [k]
        if self.params.greedy:
            verdict = verify_greedy(drafted, logits)
        else:
            if block is None or len(block.dists) != k:
                raise ValueError(
                    "sampled verification needs the drafter's distribution for every drafted token"
                )
            target_probs = logits_to_probs(logits, self.params)  # [k + 1, vocab]
            draft_probs = block.dense_probs(logits.shape[-1], logits.device)  # [k, vocab]
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
        target: ModelRunner,
        tokenizer=None,
        compute: ComputeThread | None = None,
        overlap_prefill: bool = True,
    ) -> None:
        """``compute``: run the target's work (prefill, verification) on that thread (see ``compute.py``).

        ``overlap_prefill``: start the drafter before the target's prefill, so a remote drafter prefills on
        its own device meanwhile. Turn it off when both roles share the same CPU cores: two prefills at once
        oversubscribe the cores, and spinning OpenMP threads then stalled a prefill for seconds (measured:
        16-token generations through both services 4.0-4.8 s sequential, 4.4-8.4 s overlapped).
        """
        self.target = target
        self.tokenizer = tokenizer
        self.compute = compute
        self.overlap_prefill = overlap_prefill

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stop: StopCriteria,
        drafter: Drafter | None = None,
        draft_length: DraftLengthPolicy | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[Chunk]:
        """Yield emitted tokens round by round until a stop condition; fills ``stats`` as it goes.

        Without a drafter (or once the drafter fails) every round is a plain target decoding step.
        """
        stats = stats if stats is not None else GenerationStats()
        policy = draft_length or FixedDraftLength(4)
        t_start = time.perf_counter()
        if self.overlap_prefill:  # a remote drafter prefills on its own device while the target prefills here
            drafter = self._start_drafter(drafter, prompt_ids, params, stats)
        stopper = _Stopper(stop, self.tokenizer)
        try:
            t0 = time.perf_counter()
            session = run_on(self.compute, TargetSession, self.target, prompt_ids, params)
            stats.prefill_s = time.perf_counter() - t0
            if not self.overlap_prefill:
                drafter = self._start_drafter(drafter, prompt_ids, params, stats)
            while True:
                k = min(policy.next_length(), stop.max_new_tokens - stopper.produced - 1) if drafter else 0
                net_before = stats.network_s
                block, drafter = self._draft(drafter, max(k, 0), policy.early_stop(), stats)
                t0 = time.perf_counter()
                verdict, _ = run_on(self.compute, session.verify, block.tokens, block)
                verify_s = time.perf_counter() - t0
                stats.verify_s += verify_s
                stats.record_round(len(block.tokens), verdict.num_accepted)
                stats.target_passes, stats.target_tokens = session.passes, session.tokens_processed
                drafter = self._feedback(drafter, verdict, stats)
                policy.update(
                    len(block.tokens),
                    verdict.num_accepted,
                    verify_s,
                    block.draft_s,
                    stats.network_s - net_before,
                    block.confidences,
                )
                emitted = block.tokens[: verdict.num_accepted] + [verdict.next_token]
                chunk = stopper.cut(emitted)
                stats.new_tokens = stopper.produced
                stats.wall_s = time.perf_counter() - t_start
                yield chunk
                if chunk.finish_reason:
                    break
        finally:
            stats.wall_s = time.perf_counter() - t_start
            if drafter is not None:
                drafter.close()

    @staticmethod
    def _drafter_call(drafter: Drafter | None, stats: GenerationStats, what: str, call):
        """Run ``call(drafter)``; a ``DrafterUnavailable`` is logged and counted, and drops the drafter.

        Returns (result, drafter) with drafter None once it is gone; the time spent counts as drafting.
        """
        if drafter is None:
            return None, None
        t0 = time.perf_counter()
        try:
            return call(drafter), drafter
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
            return DraftBlock(tokens=[], dists=[]), None
        # the drafter reports its own compute time; the rest of the round trip is network (+ serialisation)
        stats.draft_s = draft_before + block.draft_s
        stats.network_s += max(time.perf_counter() - t0 - block.draft_s, 0.0)
        return block, drafter

    def _feedback(self, drafter: Drafter | None, verdict: Verdict, stats: GenerationStats) -> Drafter | None:
        call = lambda d: d.accept(verdict.num_accepted, verdict.next_token)  # noqa: E731
        return self._drafter_call(drafter, stats, "while accepting", call)[1]


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
