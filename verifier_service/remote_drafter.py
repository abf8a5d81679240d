"""A core ``Drafter`` backed by a drafter service: one bidirectional Draft stream per generation.

Each round costs one message each way: the step carries the previous verdict and the next draft length,
the reply carries the block. If the stream breaks, the drafter is rebuilt on the next configured address
from the committed tokens it tracks; when no drafter answers, ``DrafterUnavailable`` lets the generation
carry on with the target alone.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import Any

import grpc

from specdec import convert, validate
from specdec.v1 import specdec_pb2 as pb
from specdec_core.drafting import DraftBlock, Drafter, DrafterUnavailable, EarlyStop
from specdec_core.sampling import SamplingParams

log = logging.getLogger(__name__)


class RemoteDrafter(Drafter):
    def __init__(
        self,
        addresses: list[str],
        stub_for: Callable[[str], Any],
        request_id: str = "",
        max_support: int = 0,
        timeout_s: float = 60.0,
        limits: validate.Limits | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("a remote drafter needs at least one address")
        self.addresses = list(addresses)
        self.stub_for = stub_for
        self.request_id = request_id
        self.max_support = max_support
        self.timeout_s = timeout_s
        self.limits = (
            limits  # blocks are checked against them (a drafter sending garbage is a failed drafter)
        )
        self.context: list[int] = []
        self.params = SamplingParams()
        self._verdict: tuple[int, int] | None = None
        self._committed: list[int] = []  # committed without drafting since the last step
        self._cancelled = False
        self._last: list[int] = []
        self._outbox: queue.Queue | None = None
        self._replies: Any = None
        self._call: Any = None

    # -- Drafter interface -----------------------------------------------------------------------------
    def start(self, context: list[int], params: SamplingParams) -> None:
        self.context, self.params = list(context), params
        self._connect(self.addresses[0])  # a dead address surfaces at the first round trip

    def propose(self, k: int, stop: EarlyStop | None = None) -> DraftBlock:
        for _attempt in range(len(self.addresses) + 1):
            if self._cancelled:
                raise DrafterUnavailable("generation cancelled")
            try:
                return self._round_trip(k, stop)
            except (grpc.RpcError, DrafterUnavailable) as exc:
                reason = exc.code() if isinstance(exc, grpc.RpcError) else exc
                log.warning("[%s] drafter %s failed: %s", self.request_id, self.addresses[0], reason)
                self.addresses.append(self.addresses.pop(0))  # try the next address
                self._connect(self.addresses[0])  # rebuilds from self.context (the verdict is folded in)
        raise DrafterUnavailable("drafter kept failing")

    def accept(self, num_accepted: int, next_token: int) -> None:
        self._verdict = (num_accepted, next_token)
        self.context.extend(self._last[:num_accepted])
        self.context.append(next_token)
        self._last = []

    def extend(self, tokens: list[int]) -> None:
        self.context.extend(tokens)
        self._committed.extend(tokens)  # sent with the next step (a restart sends the whole context)

    def cancel(self) -> None:
        self._cancelled = True
        call = self._call
        if call is not None:
            call.cancel()

    def close(self) -> None:
        if self._outbox is not None:
            self._outbox.put(None)
        if self._call is not None:
            self._call.cancel()
        self._outbox = self._replies = self._call = None

    # -- transport ------------------------------------------------------------------------------------
    def _round_trip(self, k: int, stop: EarlyStop | None) -> DraftBlock:
        step = pb.DraftStep(num_draft_tokens=k)
        if stop is not None:
            step.stop_below = stop.below
            step.acceptance_by_confidence.extend(stop.acceptance)
        if self._verdict is not None:
            step.has_verdict = True
            step.num_accepted, step.next_token = self._verdict
        step.committed.extend(self._committed)
        if self._outbox is None or self._replies is None:
            raise DrafterUnavailable("no drafter stream")
        self._outbox.put(pb.DraftRequest(step=step))
        reply = next(self._replies, None)
        if reply is None:
            raise DrafterUnavailable("drafter closed the stream")
        self._verdict, self._committed = None, []
        if not 1 <= len(reply.tokens) <= k:
            raise DrafterUnavailable(f"drafter returned {len(reply.tokens)} tokens, asked for up to {k}")
        if self.limits is not None:
            try:
                validate.check_block("", reply.tokens, reply.dists, self.limits, max_tokens=k)
            except ValueError as exc:
                raise DrafterUnavailable(f"drafter sent a malformed block: {exc}") from None
        block = convert.block_from_pb(reply)
        self._last = block.tokens
        return block

    def _connect(self, address: str) -> None:
        self.close()
        self._verdict, self._committed = None, []  # a (re)start sends the whole committed context instead
        outbox: queue.Queue = queue.Queue()
        start = pb.DraftStart(
            request_id=self.request_id,
            context=self.context,
            sampling=convert.sampling_to_pb(self.params),
            max_support=self.max_support,
        )
        outbox.put(pb.DraftRequest(start=start))
        call = self.stub_for(address).Draft(iter(outbox.get, None), timeout=None, wait_for_ready=False)
        self._outbox, self._call, self._replies = outbox, call, call
