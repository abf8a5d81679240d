"""Checks of every protocol message a service receives, before any of it reaches a model.

Each check raises ``ValueError`` naming the field and the reason (``INVALID_ARGUMENT`` on the wire, see
``specdec/rpc.py``); nothing here touches a model or a session. The limits come from the model (vocabulary,
context) and the service's config; `Limits` documents the defaults.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from specdec.v1 import specdec_pb2 as pb

# a sparse distribution's probabilities must sum to 1 within this (they are renormalised float32 values)
PROB_SUM_TOLERANCE = 1e-3


CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    context: int  # positions a sequence may reach: prompt + generated (the model's and the service's cap)
    max_prompt_chars: int = 1 << 20
    max_messages: int = 1024
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_draft_tokens: int = 64  # tokens of one drafted block
    max_support: int = 1024  # entries of one sparse distribution
    max_id_chars: int = 128  # session and request ids


def _bad(field: str, reason: str) -> ValueError:
    return ValueError(f"{field}: {reason}")


def check_ids(field: str, ids: Sequence[int], vocab_size: int) -> None:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise _bad(f"{field}[{i}]", f"token id {t} is outside the vocabulary [0, {vocab_size})")


def check_sampling(field: str, msg: pb.SamplingParams) -> None:
    t, p = msg.temperature, msg.top_p
    if not math.isfinite(t) or t < 0:
        raise _bad(f"{field}.temperature", f"must be a finite number >= 0, got {t}")
    if msg.top_k < 0:
        raise _bad(f"{field}.top_k", f"must be >= 0 (0: off), got {msg.top_k}")
    if not (p == 0 or 0 < p <= 1):  # 0 is the unset default: no top-p
        raise _bad(f"{field}.top_p", f"must be in (0, 1] (0: off), got {p}")


def _check_id_string(field: str, value: str, limits: Limits) -> None:
    if len(value) > limits.max_id_chars:
        raise _bad(field, f"longer than {limits.max_id_chars} characters")


def check_generate(req: pb.GenerateRequest, limits: Limits) -> None:
    """Everything of a GenerateRequest that does not need the tokenizer (prompt length vs context does)."""
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise _bad("prompt", "set text or token_ids")
    if kind == "text":
        if not req.text:
            raise _bad("text", "the prompt must not be empty")
        if len(req.text) > limits.max_prompt_chars:
            raise _bad("text", f"longer than {limits.max_prompt_chars} characters")
    elif kind == "messages":
        turns = req.messages.messages
        if not turns:
            raise _bad("messages", "a conversation needs at least one message")
        if len(turns) > limits.max_messages:
            raise _bad("messages", f"at most {limits.max_messages} messages, got {len(turns)}")
        for i, m in enumerate(turns):
            if m.role not in CHAT_ROLES:
                raise _bad(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
        if sum(len(m.content) for m in turns) > limits.max_prompt_chars:
            raise _bad("messages", f"longer than {limits.max_prompt_chars} characters in all")
    else:
        ids = req.token_ids.ids
        if not ids:
            raise _bad("token_ids", "the prompt must have at least one token")
        if len(ids) >= limits.context:
            raise _bad(
                "token_ids", f"{len(ids)} tokens leave no room in the model's context of {limits.context}"
            )
        check_ids("token_ids.ids", ids, limits.vocab_size)
    check_sampling("sampling", req.sampling)
    stop = req.stop
    if stop.max_new_tokens >= limits.context:
        raise _bad(
            "stop.max_new_tokens", f"{stop.max_new_tokens} exceeds the model's context of {limits.context}"
        )
    if len(stop.stop) > limits.max_stop_strings:
        raise _bad("stop.stop", f"at most {limits.max_stop_strings} stop strings, got {len(stop.stop)}")
    for i, s in enumerate(stop.stop):
        if len(s) > limits.max_stop_chars:
            raise _bad(f"stop.stop[{i}]", f"longer than {limits.max_stop_chars} characters")
    if req.num_draft_tokens > limits.max_draft_tokens:
        raise _bad("num_draft_tokens", f"at most {limits.max_draft_tokens}, got {req.num_draft_tokens}")
    if req.num_draft_tokens < 0:
        raise _bad(
            "num_draft_tokens", f"must be >= 0 (0: the verifier's default), got {req.num_draft_tokens}"
        )
    _check_id_string("request_id", req.request_id, limits)
    _check_id_string("tenant", req.tenant, limits)


def check_context_fits(prompt_tokens: int, max_new_tokens: int, limits: Limits) -> None:
    if prompt_tokens + max_new_tokens > limits.context:
        raise _bad(
            "stop.max_new_tokens",
            f"a prompt of {prompt_tokens} tokens + {max_new_tokens} new tokens exceeds the model's context of "
            f"{limits.context}",
        )


def check_block(
    field: str,
    tokens: Sequence[int],
    dists: Iterable[pb.SparseDistribution],
    limits: Limits,
    max_tokens: int | None = None,
) -> None:
    """A drafted block: tokens in the vocabulary, at most one distribution per token, each a distribution
    (finite, non-negative, summing to 1, distinct ids in the vocabulary, within the support cap) that gives
    its drafted token a positive probability."""
    cap = limits.max_draft_tokens if max_tokens is None else max_tokens
    if len(tokens) > cap:
        raise _bad(f"{field}tokens", f"at most {cap} drafted tokens, got {len(tokens)}")
    check_ids(f"{field}tokens", tokens, limits.vocab_size)
    dists = list(dists)
    if len(dists) > len(tokens):
        raise _bad(f"{field}dists", f"{len(dists)} distributions for {len(tokens)} drafted tokens")
    for i, d in enumerate(dists):
        where = f"{field}dists[{i}]"
        ids, probs = list(d.token_ids), list(d.probs)
        if not ids or len(ids) != len(probs):
            raise _bad(
                where, f"needs as many probs as token ids, and at least one (got {len(ids)} and {len(probs)})"
            )
        if len(ids) > limits.max_support:
            raise _bad(where, f"support of {len(ids)} tokens exceeds the cap of {limits.max_support}")
        check_ids(f"{where}.token_ids", ids, limits.vocab_size)
        if len(set(ids)) != len(ids):
            raise _bad(f"{where}.token_ids", "duplicate token ids")
        if not all(math.isfinite(p) and p >= 0 for p in probs):
            raise _bad(f"{where}.probs", "must be finite and >= 0")
        total = math.fsum(probs)
        if abs(total - 1.0) > PROB_SUM_TOLERANCE:
            raise _bad(f"{where}.probs", f"must sum to 1, sum to {total:.6g}")
        prob_of = dict(zip(ids, probs))
        if prob_of.get(tokens[i], 0.0) <= 0.0:
            raise _bad(where, f"gives its drafted token {tokens[i]} no probability")


def check_verify(req: pb.VerifyRequest, limits: Limits) -> None:
    if not req.session_id:
        raise _bad("session_id", "is required")
    _check_id_string("session_id", req.session_id, limits)
    if len(req.tokens) >= limits.context:
        raise _bad("tokens", f"{len(req.tokens)} tokens exceed the model's context of {limits.context}")
    check_ids("tokens", req.tokens, limits.vocab_size)
    check_sampling("sampling", req.sampling)
    check_block("draft_", req.draft_tokens, req.draft_dists, limits)


def check_draft_request(req: pb.DraftRequest, limits: Limits) -> None:
    kind = req.WhichOneof("kind")
    if kind == "start":
        start = req.start
        if not start.context:
            raise _bad("start.context", "needs at least one token")
        if len(start.context) >= limits.context:
            raise _bad(
                "start.context", f"{len(start.context)} tokens exceed the model's context of {limits.context}"
            )
        check_ids("start.context", start.context, limits.vocab_size)
        check_sampling("start.sampling", start.sampling)
        _check_id_string("start.request_id", start.request_id, limits)
        _check_id_string("start.cache_salt", start.cache_salt, limits)
    elif kind == "step":
        step = req.step
        if not 0 <= step.num_draft_tokens <= limits.max_draft_tokens:
            raise _bad(
                "step.num_draft_tokens",
                f"must be in [0, {limits.max_draft_tokens}], got {step.num_draft_tokens}",
            )
        if step.has_verdict:
            check_ids("step.next_token", [step.next_token], limits.vocab_size)
        check_ids("step.committed", step.committed, limits.vocab_size)
        if not (math.isfinite(step.stop_below) and 0 <= step.stop_below <= 1):
            raise _bad("step.stop_below", f"must be in [0, 1], got {step.stop_below}")
        if not all(math.isfinite(a) and 0 <= a <= 1 for a in step.acceptance_by_confidence):
            raise _bad("step.acceptance_by_confidence", "entries must be in [0, 1]")
    else:
        raise _bad("kind", "set start or step")
