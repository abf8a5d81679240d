"""A causal LM with one persistent KV cache per sequence: prefill, extend by n tokens, roll back.

A verify round is one ``extend`` over the k + 1 new positions; a rejected suffix is removed with
``rollback``. Nothing is ever re-prefilled. Works with any transformers causal LM whose cache is a
``DynamicCache`` (Llama, Qwen2, GPT-2 families on transformers 4.56+ and 5.x).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass
class Sequence:
    """The KV cache of one sequence and the token ids it covers (``len(tokens)`` cached positions)."""

    cache: DynamicCache
    tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


class ModelRunner:
    """Runs one model over per-sequence caches and counts the work done (tokens and forward passes)."""

    def __init__(self, model: PreTrainedModel, name: str = "model") -> None:
        self.model = model.eval()
        self.name = name
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renames past_key_values -> cache; accept both.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._lock = threading.Lock()
        self.tokens_processed = 0
        self.forward_passes = 0

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def new_sequence(self) -> Sequence:
        return Sequence(cache=DynamicCache(config=self.model.config))

    @torch.inference_mode()
    def extend(self, seq: Sequence, token_ids: list[int], keep: int | None = None) -> torch.Tensor:
        """Append ``token_ids`` to ``seq`` in one forward pass; return logits of the last ``keep`` positions.

        Returns float32 logits [keep, vocab] (``keep`` defaults to all new positions; 0 returns an empty
        tensor and skips the LM head where the model allows it).
        """
        n = len(token_ids)
        if n == 0:
            raise ValueError("extend needs at least one token")
        keep = n if keep is None else keep
        kwargs = {self._cache_kwarg: seq.cache, "use_cache": True}
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = max(keep, 1)
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]
        out = self.model(input_ids=input_ids, **kwargs)
        seq.tokens.extend(token_ids)
        with self._lock:
            self.tokens_processed += n
            self.forward_passes += 1
        logits = out.logits[0]  # [<=n, vocab]
        return logits[logits.shape[0] - keep :].float() if keep else logits[:0].float()

    def rollback(self, seq: Sequence, length: int) -> None:
        """Drop cached positions past ``length`` (a no-op when the sequence is not longer)."""
        extra = len(seq.tokens) - length
        if extra > 0:
            seq.cache.crop(-extra)  # transformers: a negative count removes that many positions
            del seq.tokens[length:]

    def prefill(self, seq: Sequence, token_ids: list[int]) -> None:
        """Cache ``token_ids`` without computing logits (the context before the pending token)."""
        if token_ids:
            self.extend(seq, token_ids, keep=0)
