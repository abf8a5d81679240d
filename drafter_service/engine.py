"""The drafter's engine: one loaded model shared by per-stream drafting sessions."""

from __future__ import annotations

import logging
import threading

import torch

from specdec.config import DrafterConfig
from specdec.rpc import LimitExceeded
from specdec_core.drafting import ModelDrafter
from specdec_core.models import load_model, vocab_fingerprint
from specdec_core.optimize import prepare_drafter
from specdec_core.runner import ModelRunner

log = logging.getLogger(__name__)


class DrafterEngine:
    """Loads the drafter model once; hands out a ``ModelDrafter`` (own KV cache) per generation stream."""

    def __init__(self, config: DrafterConfig, model=None, tokenizer=None) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        if model is None:
            model, tokenizer = load_model(config.model, config.device, config.dtype)
        model = prepare_drafter(model, config.quantization)
        self.runner = ModelRunner(model, name=config.model)
        self.tokenizer = tokenizer
        self.fingerprint = vocab_fingerprint(tokenizer)
        self._active = 0
        self._lock = threading.Lock()

    def open_session(self) -> ModelDrafter:
        with self._lock:
            if self._active >= self.config.max_sessions:
                raise LimitExceeded(f"drafter at its limit of {self.config.max_sessions} concurrent sessions")
            self._active += 1
        return ModelDrafter(self.runner, max_support=self.config.max_support, lookahead=self.config.lookahead)

    def close_session(self, drafter: ModelDrafter) -> None:
        drafter.close()
        with self._lock:
            self._active -= 1

    @property
    def active_sessions(self) -> int:
        return self._active
