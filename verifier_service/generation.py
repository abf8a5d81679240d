"""One Generate request: its decoded arguments, the events it streams, how it drafts, and its log lines.
``VerifierEngine.generate`` (``verifier.py``) wires these steps to the admission queue and the decoder."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from specdec_core.draft_length import DraftLengthPolicy
from specdec_core.drafting import Drafter
from specdec_core.runtime.admission import Admission, Cancellation
from specdec_core.sampling import SamplingParams
from specdec_core.stats import GenerationStats
from specdec_core.stopping import Chunk, StopCriteria

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateArgs:
    """A decoded Generate request."""

    prompt_text: str | None = None
    prompt_ids: list[int] | None = None
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) turns, rendered by the chat template
    chat: bool = False
    params: SamplingParams = SamplingParams()
    max_new_tokens: int = 0
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    num_draft_tokens: int = 0
    adaptive: bool = False
    no_draft: bool = False
    drafter: str = ""
    request_id: str = ""
    tenant: str = ""  # whose cached prefixes the request may reuse (GenerateRequest.tenant)


@dataclass
class GenerateEvent:
    """What one streamed response carries: new tokens and their text; the last adds why it ended and the
    generation's stats, the first the prompt's token ids."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    prompt_ids: list[int] = field(default_factory=list)


@dataclass
class DraftPlan:
    """How one generation drafts, chosen before it starts."""

    drafter: Drafter | None  # None: the target decodes alone
    name: str  # the drafter as logged (``drafter_pool.drafter_name``)
    policy: DraftLengthPolicy
    memory_key: Hashable  # what the length memory files the finished policy under
    k: str | int  # the requested length as logged: k, or "adaptive<=k_max"
    overlap_prefill: bool  # start the drafter's prefill with the target's


def stop_criteria(args: GenerateArgs, max_new: int, eos_token_id: int | None) -> StopCriteria:
    eos = frozenset() if args.ignore_eos or eos_token_id is None else frozenset({eos_token_id})
    return StopCriteria(max_new_tokens=max_new, stop_strings=args.stop_strings, eos_token_ids=eos)


def log_started(
    request_id: str, prompt_tokens: int, max_new: int, plan: DraftPlan, admission: Admission
) -> None:
    log.info(
        "[%s] generate: prompt %d tokens, max_new %d, k %s, drafter %s%s",
        request_id,
        prompt_tokens,
        max_new,
        plan.k,
        plan.name or "none",
        f", queued behind {admission.waiting}" if admission.running >= admission.max_running else "",
    )


def log_finished(request_id: str, prompt_tokens: int, plan: DraftPlan, stats: GenerationStats) -> None:
    log.info(
        "[%s] done: %d tokens, %d rounds (%d without drafting), drafted %d, accepted %d, first token "
        "%.2fs, %.2f tok/s",
        request_id,
        stats.new_tokens,
        stats.rounds,
        stats.plain_rounds,
        stats.drafted,
        stats.accepted,
        stats.first_token_s,
        stats.tokens_per_s,
        extra={  # the fields of a --log-format json line
            "event": "generation",
            "request_id": request_id,
            "session": f"generate:{request_id}",
            "drafter": plan.name,
            "prompt_tokens": prompt_tokens,
            "new_tokens": stats.new_tokens,
            "k": plan.k,
            "mean_k": stats.drafted / max(stats.rounds - stats.plain_rounds, 1),
            "rounds": stats.rounds,
            "plain_rounds": stats.plain_rounds,
            "drafted": stats.drafted,
            "accepted": stats.accepted,
            "acceptance_rate": round(stats.acceptance_rate, 4),
            "first_token_s": round(stats.first_token_s, 4),
            "wall_s": round(stats.wall_s, 4),
            "draft_s": round(stats.draft_s, 4),
            "verify_s": round(stats.verify_s, 4),
            "network_s": round(stats.network_s, 4),
            "tokens_per_s": round(stats.tokens_per_s, 3),
            "drafter_failures": stats.drafter_failures,
            "cached_tokens": stats.cached_tokens,  # prompt positions from the target's prefix cache
            "prefix_cache_hit_rate": round(stats.cached_tokens / max(prompt_tokens, 1), 4),
        },
    )


def cut_groups(buffered: list[int], size: int, done: bool) -> list[list[int]]:
    """The token groups to stream now, taken from ``buffered`` (what stays is sent later). ``size`` 0: all
    of it, one message per round; else messages of exactly ``size`` tokens, and the rest at the end, so
    message sizes do not tell a network observer how many drafts each round accepted."""
    if not size:
        groups = [buffered[:]]
    else:
        whole = len(buffered) // size * size
        groups = [buffered[i : i + size] for i in range(0, whole, size)]
        if done and (len(buffered) > whole or not groups):
            groups.append(buffered[whole:])
    del buffered[: sum(len(g) for g in groups)]
    return groups


_END = object()


def decoupled(chunks: Iterator[Chunk], quantum_s: float, cancel: Cancellation) -> Iterator[Chunk]:
    """``chunks`` decoded in a thread of their own, so the decoder goes on with its next round while the
    stream sends the last one (a round's message, decoded to text and written by gRPC, no longer holds up
    the next forward: about 7% more tokens per second on the Qwen pair, docs/serving.md).

    ``quantum_s`` 0: each chunk as it comes. Else released on a clock instead of as each round ends:
    every ``quantum_s`` seconds from the start, one chunk of all the tokens decoded since the last
    (nothing on a tick with none), the last one on the tick after the generation ends, so message times
    say nothing of round boundaries. Leaving early cancels the generation."""
    pending: queue.Queue = queue.Queue()

    def pump() -> None:
        try:
            for chunk in chunks:
                pending.put(chunk)
        except BaseException as exc:  # noqa: BLE001 - raised again in the consumer's thread
            pending.put(exc)
        pending.put(_END)

    thread = threading.Thread(target=pump, name="decoder", daemon=True)
    thread.start()
    finished = False
    try:
        for chunk in _on_clock(pending, quantum_s) if quantum_s > 0 else _as_they_come(pending):
            finished = chunk.finish_reason is not None
            yield chunk
    finally:
        if not finished and thread.is_alive():
            cancel.cancel()  # the client left: the decoder stops at its next round
        # wait for the decoder's own cleanup (its session, its drafter) before the caller goes on to close
        # what the generation used, as when the loop ran in this thread
        thread.join()


def _as_they_come(pending: queue.Queue) -> Iterator[Chunk]:
    while (item := pending.get()) is not _END:
        if isinstance(item, BaseException):
            raise item
        yield item


def _on_clock(pending: queue.Queue, quantum_s: float) -> Iterator[Chunk]:
    tick = time.monotonic() + quantum_s
    ids: list[int] = []
    finish: str | None = None
    ended = False  # the decoder is done (with its last chunk, or without one)
    while True:
        item = None
        wait = tick - time.monotonic()
        if wait > 0 and ended:
            time.sleep(wait)  # the end, too, waits for its tick
        elif wait > 0:
            try:
                item = pending.get(timeout=wait)
            except queue.Empty:
                pass
        if item is None:  # a tick
            if ids or finish is not None:
                yield Chunk(ids, finish)
                ids = []
            if ended:
                return
            tick += quantum_s * max(1, int((time.monotonic() - tick) // quantum_s) + 1)
        elif isinstance(item, BaseException):
            raise item
        elif item is _END:
            ended = True
        else:
            ids.extend(item.token_ids)
            finish = item.finish_reason
