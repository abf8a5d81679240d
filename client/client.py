"""The client orchestrator: calls the public Generate rpc, streams tokens, and resumes from its own history.

The client keeps the prompt ids (sent back by the verifier) and every token it has received. If the
verifier becomes unavailable mid-generation (restart, lost session), it waits for it to come back and
re-issues Generate with prompt + received tokens and the remaining budget, so nothing is lost; greedy
output is identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from specdec.security import ClientSecurity
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec.wire import sampling_to_pb, stats_from_pb
from specdec_core.params import SamplingParams

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED}


class SpecDecError(grpc.RpcError):
    """The one exception the client raises for a failed generation: ``code()`` is the gRPC status
    (``INVALID_ARGUMENT`` for a request refused before it was sent), ``details()`` one line naming the field
    or the cause. It is a ``grpc.RpcError``, so code written against the raw stubs keeps working."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> SpecDecError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(code or grpc.StatusCode.UNKNOWN, (details or "").splitlines()[0] if details else code.name)


def check_request(prompt, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Refuse what the verifier would refuse, before sending it (raises SpecDecError(INVALID_ARGUMENT))."""

    def bad(field_name: str, reason: str) -> SpecDecError:
        return SpecDecError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {reason}")

    if isinstance(prompt, str) and not prompt:
        raise bad("prompt", "must not be empty")
    if not isinstance(prompt, str) and not list(prompt):
        raise bad("prompt", "must have at least one token id or message")
    if not isinstance(prompt, str) and any(isinstance(m, dict) for m in prompt):
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise bad(f"messages[{i}]", "a message is a dict with a 'role' and a 'content'")
            if not isinstance(m.get("content", ""), str):
                raise bad(f"messages[{i}].content", "must be a string")
    if max_new_tokens < 1:
        raise bad("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise bad("temperature", f"must be a finite number >= 0, got {temperature}")
    if top_k < 0:
        raise bad("top_k", f"must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise bad("top_p", f"must be in (0, 1], got {top_p}")


@dataclass
class StreamPiece:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stats: dict | None = None
    prompt_token_ids: list[int] = field(default_factory=list)  # on the first piece: the prompt as tokenized


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)
    resumes: int = 0
    prompt_token_ids: list[int] = field(default_factory=list)


class SpecDecClient:
    """Client of a verifier's Generate API (the verifier drives the drafter)."""

    def __init__(
        self,
        verifier: str | None = None,
        drafter: str | None = None,
        retries: int = 5,
        retry_wait_s: float = 30.0,
        security: ClientSecurity | None = None,
    ) -> None:
        """``security``: TLS CA / client certificate / bearer token for the verifier; default from
        ``$SPECDEC_TLS_CA``, ``$SPECDEC_TLS_CERT``, ``$SPECDEC_TLS_KEY``, ``$SPECDEC_TOKEN_FILE`` or
        ``$SPECDEC_TOKEN`` (plaintext, no token when none is set)."""
        self.verifier = verifier or os.environ.get("SPECDEC_VERIFIER_ADDR", "localhost:50051")
        self.drafter = drafter if drafter is not None else os.environ.get("SPECDEC_DRAFTER_ADDR", "")
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self._channel = (security or ClientSecurity.from_env()).channel(self.verifier)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self.resumes = 0

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SpecDecClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(
        self,
        prompt: str | list[int] | list[dict[str, str]],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        num_draft_tokens: int = 0,
        adaptive: bool = False,
        no_draft: bool = False,
        chat: bool = False,
        stop: tuple[str, ...] = (),
        ignore_eos: bool = False,
        request_id: str = "",
        tenant: str = "",
        timeout: float | None = None,
    ) -> Iterator[StreamPiece]:
        """Stream pieces of the generation as the verifier accepts them; the last one has the stats.
        ``prompt``: text, token ids, or a conversation (``[{"role": "user", "content": ...}, ...]``, rendered
        by the verifier's chat template). Closing the iterator early cancels the generation on the server.
        ``timeout``: seconds for the whole generation, resumes included (the verifier ends it and frees its
        rows when it passes). Raises SpecDecError (a grpc.RpcError carrying the status code) when the
        generation fails: DEADLINE_EXCEEDED past ``timeout``, UNAVAILABLE when the verifier is gone and does
        not come back within it."""
        check_request(prompt, max_new_tokens, temperature, top_k, top_p)
        request = pb.GenerateRequest(
            chat=chat,
            sampling=sampling_to_pb(SamplingParams(temperature, top_k, top_p, seed)),
            stop=pb.StopConditions(max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos),
            num_draft_tokens=num_draft_tokens,
            adaptive_draft=adaptive,
            no_draft=no_draft,
            drafter=self.drafter if not no_draft else "",
            request_id=request_id or uuid.uuid4().hex[:12],
            tenant=tenant,
        )
        if isinstance(prompt, str):
            request.text = prompt
        elif prompt and isinstance(prompt[0], dict):  # a conversation: the verifier's chat template
            request.messages.messages.extend(
                pb.ChatMessage(role=m["role"], content=m.get("content") or "") for m in prompt
            )
        else:
            request.token_ids.ids.extend(prompt)
        deadline = None if timeout is None else time.monotonic() + timeout
        yield from self._stream_with_resume(request, max_new_tokens, deadline)

    def _stream_with_resume(
        self, request: pb.GenerateRequest, max_new_tokens: int, deadline: float | None
    ) -> Iterator[StreamPiece]:
        prompt_ids: list[int] = []
        received: list[int] = []
        self.resumes = 0
        lost: grpc.RpcError | None = None  # why the verifier was lost, while resuming

        def remaining() -> float | None:
            return None if deadline is None else max(deadline - time.monotonic(), 0.0)

        while True:
            try:
                call = self._stub.Generate(request, wait_for_ready=self.resumes > 0, timeout=remaining())
                for resp in _cancel_on_close(call):
                    lost = None  # (back) in touch with a verifier
                    if resp.prompt_token_ids and not prompt_ids:
                        prompt_ids = list(resp.prompt_token_ids)
                    received.extend(resp.token_ids)
                    yield StreamPiece(
                        list(resp.token_ids),
                        resp.text,
                        resp.finish_reason or None,
                        stats_from_pb(resp.stats) if resp.HasField("stats") else None,
                        list(resp.prompt_token_ids),
                    )
                return
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and lost is not None:
                    raise SpecDecError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"verifier {self.verifier} lost ({lost.code().name}) and not back within the deadline; "
                        f"{len(received)} tokens received",
                    ) from None
                if exc.code() not in RETRYABLE or not prompt_ids or self.resumes >= self.retries:
                    raise SpecDecError.from_rpc(exc) from None
                lost = exc
                self.resumes += 1
                log.warning(
                    "verifier %s: %s; resuming from %d received tokens (attempt %d)",
                    self.verifier,
                    exc.code(),
                    len(received),
                    self.resumes,
                )
                # resume: the history we hold becomes the prompt; the budget shrinks accordingly
                request.ClearField("text")
                request.ClearField("messages")
                request.chat = False
                request.token_ids.ids[:] = prompt_ids + received
                request.stop.max_new_tokens = max_new_tokens - len(received)
                left = remaining()
                self._wait_ready(self.retry_wait_s if left is None else min(self.retry_wait_s, left))

    def _wait_ready(self, timeout: float) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            pass

    def generate(self, prompt: str | list[int], **kwargs) -> GenerationResult:
        """Run a generation to the end and return its text, generated ids and stats."""
        text: list[str] = []
        ids: list[int] = []
        finish = ""
        stats: dict = {}
        prompt_ids: list[int] = []
        for piece in self.stream(prompt, **kwargs):
            text.append(piece.text)
            ids.extend(piece.token_ids)
            finish = piece.finish_reason or finish
            stats = piece.stats or stats
            prompt_ids = prompt_ids or piece.prompt_token_ids
        return GenerationResult("".join(text), ids, finish, stats, self.resumes, prompt_ids)


def _cancel_on_close(call) -> Iterator:
    """The call's responses; a consumer that stops early (closes the generator) cancels the rpc, so the
    verifier frees the generation's rows at once instead of generating for nobody."""
    try:
        yield from call
    finally:
        call.cancel()  # a no-op once the call has ended
