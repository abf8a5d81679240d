"""One Generate request: its decoded arguments, the events it streams, how it drafts, and its log lines.
``VerifierEngine.generate`` (``verifier.py``) wires these steps to the admission queue and the decoder."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

from specdec_core.draft_length import DraftLengthPolicy
from specdec_core.drafting import Drafter
from specdec_core.runtime.admission import Admission
from specdec_core.sampling import SamplingParams
from specdec_core.stats import GenerationStats
from specdec_core.stopping import StopCriteria

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
