"""The verifier as its servicers see it: the target model loaded on its compute thread, and the parts each
rpc uses (the decoder and admission queue for Generate, the session store for Verify, the drafter pool)."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterator

import torch

from specdec import placement, validate
from specdec.config import VerifierConfig
from specdec.metrics import GenerationMetrics, ServiceMetrics
from specdec_core.decoder import SpeculativeDecoder
from specdec_core.draft_length import DraftLengthPolicy, FixedDraftLength, LengthMemory
from specdec_core.drafting import DraftBlock
from specdec_core.models import vocab_fingerprint
from specdec_core.ngram import LOOKUP_K_MAX, NGRAM
from specdec_core.runtime.admission import Admission, Cancellation
from specdec_core.runtime.factory import compute_lease, load_runner, service_scheduler
from specdec_core.sampling import SamplingParams
from specdec_core.stats import GenerationStats
from specdec_core.stopping import StopCriteria
from specdec_core.suffix_index import SuffixIndex
from specdec_core.text import IncrementalText, encode_messages, encode_prompt
from specdec_core.verification import Verdict

from .drafter_pool import DrafterPool, drafter_name
from .generation import (
    DraftPlan,
    GenerateArgs,
    GenerateEvent,
    cut_groups,
    decoupled,
    log_finished,
    log_started,
    stop_criteria,
)
from .sessions import SessionStore

log = logging.getLogger(__name__)


class VerifierEngine:
    """Target model + scheduler + sessions + drafter pool; the servicers call one method each."""

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
        self.runner, self.tokenizer, self.backend = loaded.runner, loaded.tokenizer, loaded.backend
        self.fast_verify = loaded.note
        self.fingerprint = vocab_fingerprint(self.tokenizer)
        # what a request may ask for (checked before anything reaches the model; specdec/validate.py)
        # (sessions of the Verify rpc have their own cap, max_session_tokens: RESOURCE_EXHAUSTED past it)
        self.limits = validate.Limits(
            vocab_size=self.runner.vocab_size, context=self.runner.max_positions or 1 << 20
        )
        self.decoder = SpeculativeDecoder(
            self.runner,
            self.tokenizer,
            executor=self.scheduler,
            overlap_prefill=config.overlap_prefill != "off",
            plain_steps=config.plain_steps,
            load=self.load,
        )
        self.admission = Admission(config.max_running, config.max_waiting)
        self.sessions = SessionStore(config, self.runner, self.scheduler)
        self.suffix_index = SuffixIndex(config.lookup_index_tokens, config.ngram_min, config.ngram_max)
        self.drafters = DrafterPool(
            config, self.tokenizer, self.fingerprint, str(self.runner.device), self.limits, self.suffix_index
        )
        self._salts = TenantSalts(config.prefix_cache_scope)
        self.length_memory = LengthMemory()  # adaptive sessions start from the last one's measurements
        self.metrics.track(
            running=lambda: self.admission.running,
            waiting=lambda: self.admission.waiting,
            sessions=lambda: self.runner.active_sequences,
            kv_tokens=lambda: self.runner.kv_tokens_held,
        )
        self.metrics.track_prefix_cache(self.runner.prefix)

    def close(self) -> None:
        self.scheduler.close()

    # -- Generate ---------------------------------------------------------------------------------------
    def generate(self, args: GenerateArgs, cancel: Cancellation | None = None) -> Iterator[GenerateEvent]:
        """Run one generation (queued first when ``max_running`` are running); ``cancel`` abandons it."""
        cancel = cancel or Cancellation()
        request_id = args.request_id or uuid.uuid4().hex[:12]
        prompt_ids = self.prompt_ids(args)
        max_new = self._token_budget(args, len(prompt_ids))
        stop = stop_criteria(args, max_new, self.tokenizer.eos_token_id)
        plan = self._plan_drafting(args, request_id)
        stats = GenerationStats()
        salt = self._salts.salt(args.tenant)
        if plan.drafter is not None:
            plan.drafter.cache_salt = salt
        emitted: list[int] = []
        observed = self.metrics.generation(len(prompt_ids))
        log_started(request_id, len(prompt_ids), max_new, plan, self.admission)
        try:
            with (
                self.admission.slot(cancel),
                self.sessions.reserve(f"generate:{request_id}", len(prompt_ids) + max_new + 16),
            ):
                for event in self._stream(prompt_ids, args, stop, plan, stats, cancel, observed, salt):
                    emitted.extend(event.token_ids)
                    yield event
            # for later requests' lookups, this tenant's
            self.suffix_index.add(salt, prompt_ids + emitted, len(prompt_ids))
        finally:
            if plan.drafter is not None:
                plan.drafter.close()  # idempotent: the decoder closed it unless the generation never started
        if plan.drafter is not None:
            self.length_memory.remember(plan.memory_key, plan.policy)
        log_finished(request_id, len(prompt_ids), plan, stats)

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

    def _token_budget(self, args: GenerateArgs, prompt_tokens: int) -> int:
        """The most tokens the generation may add: as asked (if the context holds them), else the service's
        default within what the context leaves."""
        if args.max_new_tokens:
            validate.check_context_fits(prompt_tokens, args.max_new_tokens, self.limits)
            return args.max_new_tokens
        max_new = min(self.config.max_new_tokens, self.limits.context - prompt_tokens)
        if max_new < 1:
            raise ValueError(
                f"prompt: {prompt_tokens} tokens fill the model's context of {self.limits.context}"
            )
        return max_new

    def _plan_drafting(self, args: GenerateArgs, request_id: str) -> DraftPlan:
        """The generation's drafter and draft-length policy: adaptive (the default) starts from the last
        finished generation's measurements with the same drafter and sampling."""
        k = args.num_draft_tokens or self.config.num_draft_tokens
        adaptive = args.adaptive or k == 0  # the default: adaptive length
        drafter = None if args.no_draft else self.drafters.for_request(args.drafter, request_id)
        name = drafter_name(drafter)
        lookup_only = drafter is not None and drafter.source == NGRAM  # a hybrid's source is "model"
        memory_key = (name, args.params.temperature, args.params.top_k, args.params.top_p)
        policy: DraftLengthPolicy = (
            self.length_memory.policy(memory_key, k_max=k or (LOOKUP_K_MAX if lookup_only else 8))
            if adaptive
            else FixedDraftLength(k)
        )
        return DraftPlan(
            drafter=drafter,
            name=name,
            policy=policy,
            memory_key=memory_key,
            k=f"adaptive<={k or 8}" if adaptive else k,
            overlap_prefill=self.drafters.overlap_prefill(drafter),
        )

    def _stream(
        self,
        prompt_ids: list[int],
        args: GenerateArgs,
        stop: StopCriteria,
        plan: DraftPlan,
        stats: GenerationStats,
        cancel: Cancellation,
        observed: GenerationMetrics,
        cache_salt: str,
    ) -> Iterator[GenerateEvent]:
        """The decoder's chunks as events: their text decoded incrementally, the prompt's ids on the first,
        the stats on the last; released every ``stream_quantum_ms`` and regrouped into ``stream_chunk_tokens``
        tokens each when set."""
        text = IncrementalText(self.tokenizer, args.stop_strings)
        chunks = self.decoder.generate(
            prompt_ids,
            args.params,
            stop,
            plan.drafter,
            plan.policy,
            stats,
            cancel,
            overlap_prefill=plan.overlap_prefill,
            cache_salt=cache_salt,
        )
        chunks = decoupled(chunks, self.config.stream_quantum_ms / 1000, cancel)
        buffered: list[int] = []
        first = True
        for chunk in chunks:
            done = chunk.finish_reason is not None
            observed.tokens(len(chunk.token_ids))
            if done:
                observed.finished(stats, chunk.finish_reason or "")
            buffered.extend(chunk.token_ids)
            groups = cut_groups(buffered, self.config.stream_chunk_tokens, done)
            for j, ids in enumerate(groups):
                last = done and j == len(groups) - 1
                yield GenerateEvent(
                    ids,
                    text.add(ids, final=last),
                    chunk.finish_reason if last else None,
                    stats if last else None,
                    prompt_ids if first else [],
                )
                first = False

    # -- Verify ---------------------------------------------------------------------------------------
    def verify(
        self,
        session_id: str,
        tokens: list[int],
        reset: bool,
        params: SamplingParams,
        block: DraftBlock,
        want_logprobs: bool,
    ) -> tuple[Verdict, list[float] | None, int]:
        return self.sessions.verify(session_id, tokens, reset, params, block, want_logprobs)

    def close_session(self, session_id: str) -> None:
        self.sessions.remove(session_id)


class TenantSalts:
    """The salt of a tenant's cached prefixes (both roles') and earlier texts: a keyed hash under this
    process's secret, so a client can neither choose another tenant's salt without its name nor read a
    name from a salt; one salt for everyone under the ``shared`` scope."""

    def __init__(self, scope: str) -> None:
        if scope not in ("tenant", "shared"):
            raise ValueError(f"prefix cache scope must be tenant or shared, got {scope!r}")
        self.scope = scope
        self._key = os.urandom(32)

    def salt(self, tenant: str) -> str:
        if self.scope == "shared":
            return ""
        return hashlib.blake2b(tenant.encode(), key=self._key, digest_size=16).hexdigest()
