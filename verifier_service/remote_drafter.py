"""A core ``Drafter`` backed by a drafter service: one bidirectional Draft stream per generation.

Each round costs one message each way: the step carries the previous verdict and the next draft length,
the reply carries the block. If the stream breaks, the reply is late or malformed, the drafter is rebuilt on
the next configured address from the committed tokens it tracks; when no drafter answers, ``DrafterDown``
lets the generation carry on with the target alone for those rounds, and the drafter is used again once it
passes a health check (with backoff).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from specdec import convert, validate
from specdec.v1 import specdec_pb2 as pb
from specdec_core.drafting import DraftBlock, Drafter, DrafterDown, DrafterUnavailable, EarlyStop
from specdec_core.ngram import NGRAM
from specdec_core.sampling import SamplingParams

log = logging.getLogger(__name__)


class RemoteDrafter(Drafter):
    """Drafts through a drafter service. Each round trip has a deadline (``step_timeout_s``; a round that
    (re)starts the stream carries the drafter's prefill and gets ``start_timeout_s``): a drafter later than
    that, or whose stream breaks, or that sends a malformed block, is replaced by the next configured address
    or, when none answers, is down: rounds go without drafts (``DrafterDown``) while a backoff runs (0.5 s
    doubling to 30 s), then a health check (``healthy``) decides whether to rebuild the stream from the
    committed tokens this object tracks."""

    def __init__(
        self,
        addresses: list[str],
        stub_for: Callable[[str], Any],
        request_id: str = "",
        max_support: int = 0,
        step_timeout_s: float = 15.0,
        start_timeout_s: float = 60.0,
        limits: validate.Limits | None = None,
        healthy: Callable[[str], bool] | None = None,
        source: str = "model",
        caches_prefixes: bool = False,
    ) -> None:
        if not addresses:
            raise ValueError("a remote drafter needs at least one address")
        self.addresses = list(addresses)
        self.stub_for = stub_for
        self.request_id = request_id
        self.max_support = max_support
        self.caches_prefixes = caches_prefixes  # the drafter's Info: it keeps a prefix cache
        self.step_timeout_s = step_timeout_s
        self.start_timeout_s = start_timeout_s
        # blocks are checked against them: a drafter sending garbage is a failed drafter
        self.limits = limits
        self.healthy = healthy or (lambda address: True)
        self.source = source  # what the service drafts with (its Info): "model" or "ngram"
        self.context: list[int] = []
        self.params = SamplingParams()
        self._verdict: tuple[int, int] | None = None
        self._committed: list[int] = []  # committed without drafting since the last step
        self._cancelled = False
        self._last: list[int] = []
        self._outbox: queue.Queue | None = None
        self._replies: queue.SimpleQueue | None = None
        self._call: Any = None
        self._restarted = False  # the next round carries a (re)start of the stream
        self._down_until = 0.0  # while down: no calls until then
        self._backoff = 0.0

    # -- Drafter interface -----------------------------------------------------------------------------
    def start(self, context: list[int], params: SamplingParams) -> None:
        self.context, self.params = list(context), params
        self._connect(self.addresses[0])  # a dead address surfaces at the first round trip

    def propose(self, k: int, stop: EarlyStop | None = None) -> DraftBlock:
        if self._cancelled:
            raise DrafterUnavailable("generation cancelled")
        if self._outbox is None:  # down since an earlier round
            wait = self._down_until - time.monotonic()
            if wait > 0:
                raise DrafterDown(f"drafters down, next health check in {wait:.1f}s", fresh=False)
            address = next((a for a in self.addresses if self.healthy(a)), None)
            if address is None:
                self._mark_down()
                raise DrafterDown("no drafter passes its health check", fresh=False)
            while self.addresses[0] != address:
                self.addresses.append(self.addresses.pop(0))
            log.info("[%s] drafter %s is back", self.request_id, address)
            self._connect(address)
        for attempt in range(len(self.addresses)):
            if self._cancelled:
                raise DrafterUnavailable("generation cancelled")
            try:
                block = self._round_trip(k, stop)
                self._backoff = 0.0
                return block
            except (grpc.RpcError, DrafterUnavailable) as exc:
                reason = exc.code().name if isinstance(exc, grpc.RpcError) else exc
                log.warning("[%s] drafter %s failed: %s", self.request_id, self.addresses[0], reason)
                self.close()
                self.addresses.append(self.addresses.pop(0))  # try the next address
                if attempt + 1 < len(self.addresses):
                    self._connect(self.addresses[0])  # rebuilds from self.context (the verdict is folded in)
        self._mark_down()
        raise DrafterDown(f"no drafter answered (next try in {self._backoff:.1f}s)")

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
    def _mark_down(self) -> None:
        self.close()
        self._backoff = min(max(0.5, 2 * self._backoff), 30.0)
        self._down_until = time.monotonic() + self._backoff

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
        timeout = self.start_timeout_s if self._restarted else self.step_timeout_s
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise DrafterDown(f"no block within {timeout:g}s") from None
        if isinstance(reply, grpc.RpcError):
            raise reply
        if reply is None:
            raise DrafterUnavailable("drafter closed the stream")
        self._verdict, self._committed, self._restarted = None, [], False
        if not (0 if self.source == NGRAM else 1) <= len(reply.tokens) <= k:  # a lookup may find no match
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
            cache_salt=self.cache_salt,
        )
        outbox.put(pb.DraftRequest(start=start))
        call = self.stub_for(address).Draft(iter(outbox.get, None), timeout=None, wait_for_ready=False)
        replies: queue.SimpleQueue = queue.SimpleQueue()

        def read() -> None:  # the stream's replies, so that a round can wait for one with a deadline
            try:
                for reply in call:
                    replies.put(reply)
                replies.put(None)
            except grpc.RpcError as exc:
                replies.put(exc)

        threading.Thread(target=read, name=f"drafter-reader-{self.request_id}", daemon=True).start()
        self._outbox, self._call, self._replies, self._restarted = outbox, call, replies, True
