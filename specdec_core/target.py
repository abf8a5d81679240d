"""The verifier's side of one generation: ``TargetSession`` holds the target's KV cache over the committed
tokens, its RNG and counters, and turns each drafted block into a ``Verdict`` in one forward."""

from __future__ import annotations

from concurrent.futures import CancelledError

import torch

from .drafting import DraftBlock
from .errors import GenerationCancelled
from .runtime.interface import Row, Runner, Sequence
from .runtime.jobs import Executor, Inline, Job, Task
from .sampling import SamplingParams, logits_to_probs, make_generator, position_noise, race
from .verification import verify_coupled, verify_greedy, verify_sampled


class TargetSession:
    """The target model's state for one generation: KV cache over committed tokens, RNG, counters.

    Invariant between rounds: the cache covers ``context[:-1]``; the last committed token is pending
    and is fed together with the next drafted block, so a round is exactly one forward pass (a session
    that was not prefilled feeds its whole context with its first block). Every forward is a job of
    ``executor`` (the verifier's scheduler batches the rows of all sessions). The first forward takes what
    it can of the context from the runner's prefix cache, under ``cache_salt`` (``cached_tokens``).
    """

    def __init__(
        self,
        runner: Runner,
        context: list[int],
        params: SamplingParams,
        executor: Executor | None = None,
        cache_salt: str = "",
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
        self.cache_salt = cache_salt
        self.cached_tokens = 0  # context positions taken from the prefix cache instead of computed
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
        keep = int(emit_first)
        seq, feed = self._first_feed(self.context if emit_first else self.context[:-1], keep)
        if not feed:
            return None
        logits = yield Row(seq, feed, keep=keep)  # [keep, vocab]
        self.passes += 1
        self.tokens_processed += len(feed)
        if not emit_first:
            return None
        token = int(self._pick(logits[0], len(self.context), check=True))
        self.context.append(token)
        return token

    def _first_feed(self, tokens: list[int], keep: int) -> tuple[Sequence, list[int]]:
        """Open the session's sequence for a first forward of ``tokens`` (logits of the last ``keep``): the
        sequence, and the part of ``tokens`` the forward must compute, past the prefix the runner's cache
        already holds."""
        seq = self.seq = self.runner.new_sequence(self.cache_salt)
        cached = self.runner.reuse_prefix(seq, tokens, keep)
        self.cached_tokens += cached
        return seq, tokens[cached:]

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
            seq, feed = self._first_feed(self.context, keep=1)
        else:
            seq, feed = self.seq, self.context[len(self.seq) :]
        position = len(self.context)  # the first new token's
        picks = yield Row(seq, feed, keep=1, steps=steps, pick=lambda lg, i: (self._pick(lg, position + i),))
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
        k = len(draft_tokens)
        if self.seq is None:  # not prefilled: the context goes into this forward
            seq, feed = self._first_feed(self.context + draft_tokens, keep=k + 1)
        else:
            seq, feed = self.seq, self.context[len(self.seq) :] + draft_tokens
        logits = yield Row(seq, feed, keep=k + 1)  # [k + 1, vocab]
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
        self.runner.rollback(seq, len(self.context) + n)
        emitted = draft_tokens[:n] + [verdict.next_token]
        self.context.extend(emitted)
        logprobs = None
        if want_logprobs:
            lp = torch.log_softmax(logits[: n + 1], dim=-1)  # [n + 1, vocab]
            logprobs = lp[torch.arange(n + 1), torch.tensor(emitted, device=lp.device)].tolist()
        return verdict, logprobs
