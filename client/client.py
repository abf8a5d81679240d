"""The client orchestrator: calls the public Generate rpc, streams tokens, and resumes from its own history.

The client keeps the prompt ids (sent back by the verifier) and every token it has received. If the
verifier becomes unavailable mid-generation (restart, lost session), it waits for it to come back and
re-issues Generate with prompt + received tokens and the remaining budget, so nothing is lost; greedy
output is identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from specdec.convert import sampling_to_pb, stats_from_pb
from specdec.rpc import channel
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec_core.sampling import SamplingParams

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.CANCELLED}


@dataclass
class StreamPiece:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stats: dict | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)
    resumes: int = 0


class SpecDecClient:
    """Client of a verifier's Generate API (the verifier drives the drafter)."""

    def __init__(
        self,
        verifier: str | None = None,
        drafter: str | None = None,
        retries: int = 5,
        retry_wait_s: float = 30.0,
    ) -> None:
        self.verifier = verifier or os.environ.get("SPECDEC_VERIFIER_ADDR", "localhost:50051")
        self.drafter = drafter if drafter is not None else os.environ.get("SPECDEC_DRAFTER_ADDR", "")
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self._channel = channel(self.verifier)
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
        prompt: str | list[int],
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
    ) -> Iterator[StreamPiece]:
        """Stream pieces of the generation as the verifier accepts them; the last one has the stats."""
        request = pb.GenerateRequest(
            chat=chat,
            sampling=sampling_to_pb(SamplingParams(temperature, top_k, top_p, seed)),
            stop=pb.StopConditions(max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos),
            num_draft_tokens=num_draft_tokens,
            adaptive_draft=adaptive,
            no_draft=no_draft,
            drafter=self.drafter if not no_draft else "",
            request_id=request_id or uuid.uuid4().hex[:12],
        )
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        yield from self._stream_with_resume(request, max_new_tokens)

    def _stream_with_resume(self, request: pb.GenerateRequest, max_new_tokens: int) -> Iterator[StreamPiece]:
        prompt_ids: list[int] = []
        received: list[int] = []
        self.resumes = 0
        while True:
            try:
                for resp in self._stub.Generate(request, wait_for_ready=self.resumes > 0):
                    if resp.prompt_token_ids and not prompt_ids:
                        prompt_ids = list(resp.prompt_token_ids)
                    received.extend(resp.token_ids)
                    yield StreamPiece(
                        list(resp.token_ids),
                        resp.text,
                        resp.finish_reason or None,
                        stats_from_pb(resp.stats) if resp.HasField("stats") else None,
                    )
                return
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or not prompt_ids or self.resumes >= self.retries:
                    raise
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
                request.chat = False
                request.token_ids.ids[:] = prompt_ids + received
                request.stop.max_new_tokens = max_new_tokens - len(received)
                self._wait_ready()

    def _wait_ready(self) -> None:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.retry_wait_s)
        except grpc.FutureTimeoutError:
            pass

    def generate(self, prompt: str | list[int], **kwargs) -> GenerationResult:
        """Run a generation to the end and return its text, generated ids and stats."""
        text: list[str] = []
        ids: list[int] = []
        finish = ""
        stats: dict = {}
        for piece in self.stream(prompt, **kwargs):
            text.append(piece.text)
            ids.extend(piece.token_ids)
            finish = piece.finish_reason or finish
            stats = piece.stats or stats
        return GenerationResult("".join(text), ids, finish, stats, self.resumes)
