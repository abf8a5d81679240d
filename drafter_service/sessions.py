"""The drafter's sessions: one per Draft stream, over one loaded model that all of them share, or
(``--source ngram``) prompt lookup per stream, with no model at all."""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from specdec import placement, validate
from specdec.config import DrafterConfig
from specdec.metrics import ServiceMetrics
from specdec.rpc import LimitExceeded
from specdec_core.drafting import ModelDrafter
from specdec_core.models import vocab_fingerprint
from specdec_core.ngram import NGRAM, NgramDrafter
from specdec_core.runtime.factory import compute_lease, load_runner, service_scheduler
from specdec_core.runtime.interface import Runner

log = logging.getLogger(__name__)


SOURCES = ("model", NGRAM)


class DrafterEngine:
    """Loads the drafter model once; hands out a ``ModelDrafter`` (own KV cache) per generation stream.

    Every forward runs on the scheduler's thread: the draft steps of all streams that are drafting go
    through one forward per drafted position (on a GPU the streams' blocks go as one call each batch, see
    ``ModelDrafter.one_call``). With ``source="ngram"`` nothing is loaded: each stream gets
    an ``NgramDrafter`` (prompt lookup over token ids, any vocabulary), run on the stream's own thread.
    """

    def __init__(self, config: DrafterConfig, model=None, tokenizer=None) -> None:
        if config.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {config.source!r}")
        if config.draft_in_one_call not in ("auto", "on", "off"):
            raise ValueError(f"draft_in_one_call must be auto, on or off, got {config.draft_in_one_call!r}")
        self.config = config
        self._active = 0
        self._lock = threading.Lock()
        # the Scheduler, None with prompt lookup (no model, no compute thread); typed loosely so that code
        # holding a model drafter's engine (benchmarks/gpu_check.py) calls it without a None check
        self.scheduler: Any = None
        self.runner: Runner | None = None
        self.tokenizer = None
        if config.source == NGRAM:
            self._init_lookup()
        else:
            self._init_model(model, tokenizer)

    def _init_model(self, model, tokenizer) -> None:
        config = self.config
        self.metrics = ServiceMetrics("drafter", config.model_name or config.model)
        # forward costs decide whether prompt chunks and draft steps share a forward
        lease = compute_lease(config, placement.host_id(), placement.cpus())
        scheduler, self.load = service_scheduler("drafter-compute", config, lease, self.metrics.on_forward)
        threads = config.threads or placement.default_threads(torch.get_num_threads())
        loaded = scheduler.call(
            load_runner,
            config,
            "drafter",
            config.max_sessions,
            threads,
            model,
            tokenizer,
            scheduler.lease,
        )
        runner = loaded.runner
        self.scheduler, self.runner, self.tokenizer, self.backend = (
            scheduler,
            runner,
            loaded.tokenizer,
            loaded.backend,
        )
        self.fingerprint = vocab_fingerprint(self.tokenizer)
        self.limits = validate.Limits(vocab_size=runner.vocab_size, context=runner.max_positions or 1 << 20)
        self.metrics.track(
            running=lambda: self._active,
            sessions=lambda: runner.active_sequences,
            kv_tokens=lambda: runner.kv_tokens_held,
        )
        self.metrics.track_prefix_cache(runner.prefix)

    def _init_lookup(self) -> None:
        self.metrics = ServiceMetrics("drafter", self.config.model_name or NGRAM)
        NgramDrafter(self.config.ngram_min, self.config.ngram_max)  # the sizes are checked at start-up
        self.fingerprint = ""
        # token ids are only copied: any vocabulary, the verifier bounds them by its own
        self.limits = validate.Limits(vocab_size=2**31 - 1, context=1 << 20)
        self.metrics.track(running=lambda: self._active, sessions=lambda: self._active, kv_tokens=lambda: 0)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    def open_session(self) -> ModelDrafter | NgramDrafter:
        with self._lock:
            if self._active >= self.config.max_sessions:
                raise LimitExceeded(f"drafter at its limit of {self.config.max_sessions} concurrent sessions")
            self._active += 1
        if self.config.source == NGRAM:
            return NgramDrafter(self.config.ngram_min, self.config.ngram_max)
        assert self.runner is not None  # a model source loaded one
        return ModelDrafter(
            self.runner,
            max_support=self.config.max_support,
            lookahead=self.config.lookahead,
            executor=self.scheduler,
            one_call={"on": True, "off": False}.get(self.config.draft_in_one_call),
        )

    def close_session(self, drafter: ModelDrafter | NgramDrafter) -> None:
        drafter.close()
        with self._lock:
            self._active -= 1

    @property
    def active_sessions(self) -> int:
        return self._active
