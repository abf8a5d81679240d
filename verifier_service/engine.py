"""The verifier's engine: the target model, its session store, and generation with remote drafters."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub

from specdec import placement, validate
from specdec.config import VerifierConfig
from specdec.metrics import ServiceMetrics
from specdec.rpc import DependencyUnavailable, LimitExceeded, PermissionDenied, SessionNotFound
from specdec.security import ClientSecurity, read_token
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec_core.decoder import SpeculativeDecoder
from specdec_core.draft_length import DraftLengthPolicy, FixedDraftLength, LengthMemory
from specdec_core.drafting import DraftBlock, Drafter
from specdec_core.hybrid import HybridDrafter
from specdec_core.models import (
    TokenizerMismatch,
    first_vocab_difference,
    vocab_by_id,
    vocab_fingerprint,
)
from specdec_core.ngram import LOOKUP_K_MAX, NGRAM, NgramDrafter
from specdec_core.runtime.admission import Admission, Cancellation
from specdec_core.runtime.factory import compute_lease, load_runner, service_scheduler
from specdec_core.sampling import SamplingParams
from specdec_core.stats import GenerationStats
from specdec_core.stopping import StopCriteria
from specdec_core.target import TargetSession
from specdec_core.text import IncrementalText, encode_messages, encode_prompt
from specdec_core.verification import Verdict

from .remote_drafter import RemoteDrafter

log = logging.getLogger(__name__)

HYBRID = "hybrid"
IN_PROCESS = (NGRAM, HYBRID)  # drafter names served inside the verifier (specdec_core/ngram.py, hybrid.py)


def _drafter_name(drafter) -> str:
    if isinstance(drafter, RemoteDrafter):
        return drafter.addresses[0]
    if isinstance(drafter, HybridDrafter):
        return f"{HYBRID}+{_drafter_name(drafter.model)}"
    return NGRAM if isinstance(drafter, NgramDrafter) else ""


ROUND_ROBIN = (("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),)


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


@dataclass
class GenerateEvent:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    prompt_ids: list[int] = field(default_factory=list)


@dataclass
class _Entry:
    session: TargetSession | None
    tokens: int
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _close(entry: _Entry) -> None:
    if entry.session is not None:
        entry.session.close()  # frees its KV slot from the next iteration on


class SessionStore:
    """Sessions by id, with an idle timeout and caps on their number and total tokens."""

    def __init__(self, config: VerifierConfig) -> None:
        self.config = config
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def _expire(self) -> None:
        deadline = time.monotonic() - self.config.session_idle_s
        for sid in [s for s, e in self._entries.items() if e.last_used < deadline and not e.lock.locked()]:
            log.info("session %s expired", sid)
            _close(self._entries.pop(sid))

    def add(self, session_id: str, entry: _Entry) -> _Entry:
        if entry.tokens > self.config.max_session_tokens:
            raise LimitExceeded(
                f"session of {entry.tokens} tokens exceeds max_session_tokens "
                f"{self.config.max_session_tokens}"
            )
        with self._lock:
            self._expire()
            replaced = self._entries.pop(session_id, None)
            if replaced is not None:
                _close(replaced)
            if len(self._entries) >= self.config.max_sessions:
                raise LimitExceeded(f"verifier at its limit of {self.config.max_sessions} sessions")
            total = sum(e.tokens for e in self._entries.values()) + entry.tokens
            if total > self.config.max_total_tokens:
                raise LimitExceeded(f"verifier at its limit of {self.config.max_total_tokens} cached tokens")
            self._entries[session_id] = entry
        return entry

    def get(self, session_id: str) -> _Entry:
        with self._lock:
            self._expire()
            entry = self._entries.get(session_id)
        if entry is None or entry.session is None:
            raise SessionNotFound(f"unknown session {session_id!r}; resend the full history with reset")
        entry.last_used = time.monotonic()
        return entry

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.session is not None)

    def remove(self, session_id: str) -> None:
        with self._lock:
            entry = self._entries.pop(session_id, None)
        if entry is not None:
            _close(entry)

    @contextmanager
    def reserve(self, session_id: str, tokens: int):
        """Hold a slot (and token budget) for a streaming generation while it runs."""
        entry = self.add(session_id, _Entry(session=None, tokens=tokens))
        with entry.lock:
            try:
                yield
            finally:
                self.remove(session_id)


class VerifierEngine:
    """Target model + scheduler + sessions + drafter connections; the servicers call one method each."""

    def __init__(self, config: VerifierConfig, model=None, tokenizer=None) -> None:
        self.config = config
        self.metrics = ServiceMetrics("verifier", config.model_name or config.model)
        # every forward of this process runs on the scheduler's thread, batched across generations; the load
        # (forward costs, the sessions in the batch) is what the draft-length policies plan with
        lease = compute_lease(config, placement.host_id(), placement.cpus())
        self.scheduler, self.load = service_scheduler(
            "verifier-compute", config, lease, self.metrics.on_forward
        )
        threads = config.threads or placement.default_threads(torch.get_num_threads())
        loaded = self.scheduler.call(
            load_runner,
            config,
            "verifier",
            config.max_sessions + config.max_running,
            threads,
            model,
            tokenizer,
            self.scheduler.lease,
        )
        self.runner, tokenizer, self.backend = loaded.runner, loaded.tokenizer, loaded.backend
        self.fast_verify = loaded.note
        self.tokenizer = tokenizer
        self.fingerprint = vocab_fingerprint(tokenizer)
        # what a request may ask for (checked before anything reaches the model; specdec/validate.py)
        # (sessions of the Verify rpc have their own cap, max_session_tokens: RESOURCE_EXHAUSTED past it)
        self.limits = validate.Limits(
            vocab_size=self.runner.vocab_size, context=self.runner.max_positions or 1 << 20
        )
        self.decoder = SpeculativeDecoder(
            self.runner,
            tokenizer,
            executor=self.scheduler,
            overlap_prefill=config.overlap_prefill != "off",
            plain_steps=config.plain_steps,
            load=self.load,
        )
        self.admission = Admission(config.max_running, config.max_waiting)
        self.sessions = SessionStore(config)
        self._channels: dict[str, grpc.Channel] = {}
        self._drafter_security = ClientSecurity(
            ca=config.drafter_tls_ca,
            cert=config.drafter_tls_cert,
            key=config.drafter_tls_key,
            token=read_token(config.drafter_token_file, "SPECDEC_VERIFIER_DRAFTER_TOKEN"),
            server_name=config.drafter_tls_server_name,
        )
        self._paired: dict[str, bool] = {}  # drafter address -> shares this process's compute
        self._sources: dict[str, str] = {}  # drafter address -> what it drafts with (its Info)
        self.length_memory = LengthMemory()  # adaptive sessions start from the last one's measurements
        self._lock = threading.Lock()
        self._next_drafter = 0
        self.metrics.track(
            running=lambda: self.admission.running,
            waiting=lambda: self.admission.waiting,
            sessions=lambda: self.runner.active_sequences,
            kv_tokens=lambda: self.runner.kv_tokens_held,
        )

    def close(self) -> None:
        self.scheduler.close()

    # -- public generation -------------------------------------------------------------------------
    def generate(self, args: GenerateArgs, cancel: Cancellation | None = None) -> Iterator[GenerateEvent]:
        """Run one generation (queued first when ``max_running`` are running); ``cancel`` abandons it."""
        cancel = cancel or Cancellation()
        request_id = args.request_id or uuid.uuid4().hex[:12]
        prompt_ids = self.prompt_ids(args)
        if args.max_new_tokens:
            validate.check_context_fits(len(prompt_ids), args.max_new_tokens, self.limits)
            max_new = args.max_new_tokens
        else:  # the service's default budget, within what the context leaves
            max_new = min(self.config.max_new_tokens, self.limits.context - len(prompt_ids))
            if max_new < 1:
                raise ValueError(
                    f"prompt: {len(prompt_ids)} tokens fill the model's context of {self.limits.context}"
                )
        eos = self.tokenizer.eos_token_id
        stop = StopCriteria(
            max_new_tokens=max_new,
            stop_strings=args.stop_strings,
            eos_token_ids=frozenset() if args.ignore_eos or eos is None else frozenset({eos}),
        )
        k = args.num_draft_tokens or self.config.num_draft_tokens
        adaptive = args.adaptive or k == 0  # the default: adaptive length
        drafter = None if args.no_draft else self._drafter(args.drafter, request_id)
        name = _drafter_name(drafter)
        lookup_only = drafter is not None and drafter.source == NGRAM  # a hybrid's source is "model"
        memory_key = (
            name,
            args.params.temperature,
            args.params.top_k,
            args.params.top_p,
        )
        policy: DraftLengthPolicy = (
            self.length_memory.policy(memory_key, k_max=k or (LOOKUP_K_MAX if lookup_only else 8))
            if adaptive
            else FixedDraftLength(k)
        )
        # in-process drafters start for free; a remote one overlaps its prefill unless it shares our cores
        overlap = self._overlap_prefill(drafter.addresses[0]) if isinstance(drafter, RemoteDrafter) else True
        stats = GenerationStats()
        observed = self.metrics.generation(len(prompt_ids))
        text = IncrementalText(self.tokenizer, args.stop_strings)
        log.info(
            "[%s] generate: prompt %d tokens, max_new %d, k %s, drafter %s%s",
            request_id,
            len(prompt_ids),
            max_new,
            f"adaptive<={k or 8}" if adaptive else k,
            name or "none",
            f", queued behind {self.admission.waiting}"
            if self.admission.running >= self.admission.max_running
            else "",
        )
        try:
            with (
                self.admission.slot(cancel),
                self.sessions.reserve(f"generate:{request_id}", len(prompt_ids) + max_new + 16),
            ):
                first = True
                chunks = self.decoder.generate(
                    prompt_ids, args.params, stop, drafter, policy, stats, cancel, overlap_prefill=overlap
                )
                for chunk in chunks:
                    done = chunk.finish_reason is not None
                    observed.tokens(len(chunk.token_ids))
                    if done:
                        observed.finished(stats, chunk.finish_reason or "")
                    yield GenerateEvent(
                        chunk.token_ids,
                        text.add(chunk.token_ids, final=done),
                        chunk.finish_reason,
                        stats if done else None,
                        prompt_ids if first else [],
                    )
                    first = False
        finally:
            if drafter is not None:
                drafter.close()  # idempotent: the decoder closed it unless the generation never started
        if drafter is not None:
            self.length_memory.remember(memory_key, policy)
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
                "drafter": name,
                "prompt_tokens": len(prompt_ids),
                "new_tokens": stats.new_tokens,
                "k": f"adaptive<={k or 8}" if adaptive else k,
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
            },
        )

    def prompt_ids(self, args: GenerateArgs) -> list[int]:
        if args.prompt_ids:
            ids = list(args.prompt_ids)
            if max(ids) >= self.runner.vocab_size or min(ids) < 0:
                raise ValueError(f"prompt token ids must be in [0, {self.runner.vocab_size})")
            return ids
        if args.messages:
            turns = [{"role": role, "content": content} for role, content in args.messages]
            return encode_messages(self.tokenizer, turns)
        if not args.prompt_text:
            raise ValueError("empty prompt")
        return encode_prompt(self.tokenizer, args.prompt_text, args.chat)

    # -- drafters -------------------------------------------------------------------------------------
    def _drafter(self, name: str, request_id: str) -> Drafter | None:
        """The drafter a request asks for: an address, "ngram" or "hybrid" (in this process), or, when it
        names none, the service's default (the first of ``--drafter``, which may be one of those names)."""
        if not name and self.config.drafters and self.config.drafters[0] in IN_PROCESS:
            name = self.config.drafters[0]
        lookup = lambda: NgramDrafter(self.config.ngram_min, self.config.ngram_max)  # noqa: E731
        if name == NGRAM:
            return lookup()
        if name == HYBRID:
            model = self._remote_drafter("", request_id)  # None without a configured model drafter
            if model is None:
                log.warning("[%s] hybrid drafting without a model drafter: prompt lookup only", request_id)
                return lookup()
            return HybridDrafter(model, lookup())
        return self._remote_drafter(name, request_id)

    def _remote_drafter(self, address: str, request_id: str) -> RemoteDrafter | None:
        if address and address not in self.config.drafters and not self.config.allow_any_drafter:
            # a request must not make this service dial an address of its choosing
            raise PermissionDenied(
                f"drafter {address!r} is not one of this verifier's drafters "
                f"({', '.join(self.config.drafters) or 'none configured'}); "
                "start it with --allow-any-drafter to let requests choose any address"
            )
        addresses = [address] if address else self._rotated_defaults()
        if not addresses:
            return None
        usable = []
        for addr in addresses:
            try:
                self._check_pair(addr)
                usable.append(addr)
            except DependencyUnavailable as exc:
                log.warning("[%s] %s", request_id, exc)
        if not usable:
            log.warning("[%s] no drafter reachable, decoding with the target alone", request_id)
            return None
        return RemoteDrafter(
            usable,
            self._stub,
            request_id=request_id,
            step_timeout_s=self.config.drafter_timeout_s,
            start_timeout_s=self.config.drafter_start_timeout_s,
            limits=self.limits,
            healthy=self._drafter_healthy,
            source=self._sources.get(usable[0], "model"),
        )

    def _rotated_defaults(self) -> list[str]:
        drafters = [d for d in self.config.drafters if d not in IN_PROCESS]
        if not drafters:
            return []
        with self._lock:  # spread generations over the configured drafters
            i = self._next_drafter % len(drafters)
            self._next_drafter += 1
        return drafters[i:] + drafters[:i]

    def _channel(self, address: str) -> grpc.Channel:
        """One channel per drafter address. A ``dns:///name:port`` address (a Kubernetes headless Service)
        resolves to every drafter behind the name: its streams go round robin across them, and gRPC
        re-resolves the name when a connection drops (drafters recycle theirs every few minutes, see
        ``DrafterConfig.max_connection_age_s``, so new pods are picked up too)."""
        with self._lock:
            if address not in self._channels:
                options = ROUND_ROBIN if address.split(":", 1)[0] in ("dns", "ipv4", "ipv6") else ()
                self._channels[address] = self._drafter_security.channel(address, options)
            return self._channels[address]

    def _stub(self, address: str) -> pb_grpc.DrafterStub:
        return pb_grpc.DrafterStub(self._channel(address))

    def _drafter_healthy(self, address: str) -> bool:
        try:
            status = HealthStub(self._channel(address)).Check(HealthCheckRequest(), timeout=1.0).status
        except grpc.RpcError:
            return False
        return status == HealthCheckResponse.SERVING

    def _check_pair(self, address: str) -> None:
        """Refuse a drafter whose tokenizer differs from ours (checked once per address); note whether it
        shares this process's compute (same host, device type and CPU cores)."""
        if address in self._paired:
            return
        stub = self._stub(address)
        try:
            info = stub.Info(pb.InfoRequest(), timeout=10)
            # prompt lookup copies token ids of the text it is sent: there is no vocabulary to compare
            if info.drafter_source != NGRAM and info.vocab_fingerprint != self.fingerprint:
                full = stub.Info(pb.InfoRequest(include_vocab=True), timeout=30)
                diff = first_vocab_difference(list(full.vocab), vocab_by_id(self.tokenizer))
                raise TokenizerMismatch(
                    diff or f"drafter at {address} has a different vocabulary fingerprint"
                )
        except grpc.RpcError as exc:
            raise DependencyUnavailable(
                f"drafter {address} unreachable or refused: {exc.code().name}"
            ) from exc
        mine = (placement.host_id(), str(self.runner.device), placement.cpus())
        shared = placement.shares_compute(mine, (info.host_id, info.device, info.cpus))
        source = info.drafter_source or "model"
        log.info(
            "drafter %s paired (%s, %s)",
            address,
            source,
            "shares this host's compute" if shared else "own compute",
        )
        self._sources[address] = source
        self._paired[address] = shared

    def _overlap_prefill(self, address: str) -> bool:
        """Start the drafter's prefill with the target's unless it would take the target's cores."""
        if self.config.overlap_prefill in ("on", "true", "1", "yes"):
            return True
        if self.config.overlap_prefill in ("off", "false", "0", "no"):
            return False
        return not self._paired.get(address, False)

    # -- session-based verification -------------------------------------------------------------------
    def verify(
        self,
        session_id: str,
        tokens: list[int],
        reset: bool,
        params: SamplingParams,
        block: DraftBlock,
        want_logprobs: bool,
    ) -> tuple[Verdict, list[float] | None, int]:
        if not session_id:
            raise ValueError("session_id is required")
        if reset:
            if not tokens:
                raise ValueError("a reset needs the full token history")
            entry = self.sessions.add(session_id, _Entry(session=None, tokens=len(tokens)))
            with entry.lock:
                # the history is fed with the first verified block, in one forward
                entry.session = TargetSession(self.runner, tokens, params, self.scheduler)
        else:
            entry = self.sessions.get(session_id)
        with entry.lock:
            session = entry.session
            assert session is not None  # created above, or get() which refuses empty entries
            session.append(tokens if not reset else [])
            if len(session.context) + len(block.tokens) + 1 > self.config.max_session_tokens:
                self.sessions.remove(session_id)
                raise LimitExceeded(
                    f"session {session_id} reached max_session_tokens {self.config.max_session_tokens}"
                )
            verdict, logprobs = session.verify(block.tokens, block, want_logprobs)
            entry.tokens = len(session.context)
            entry.last_used = time.monotonic()
            return verdict, logprobs, len(session.context)

    def close_session(self, session_id: str) -> None:
        self.sessions.remove(session_id)
