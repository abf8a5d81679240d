"""What one forward does: many sequences' new positions in one pass of the model, ragged per row.

A row may prefill a prompt chunk, verify a drafted block (k + 1 positions) or decode one token, each at
its own position. Rows are padded to the longest row of the forward (padding writes past its row's new
length and is never read, see ``kv.py``); logits are computed only for the positions each row asks for
(the LM head runs on those hidden states alone). Rolling a sequence back moves its length: the other
rows' caches are untouched and nothing is copied.

Works with transformers causal LMs whose attention layers go through ``cache.update`` and take a 4-D
mask as given (Llama, Qwen2, GPT-2 families on transformers 5.x).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import PreTrainedModel

from ..interface import PENDING, Picker, Row, SlotRunner
from ..kv import BatchCache, SlotKV

__all__ = ["ModelRunner", "PENDING", "Row"]


class ModelRunner(SlotRunner):
    """Runs one model over many sequences' KV caches; counts the work done (tokens and forward passes).

    Not thread-safe for forwards: a service runs every forward on its one compute thread. ``release`` may
    be called from any thread (the slot is reclaimed at the next forward).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        name: str = "model",
        slots: int = 4,
        capacity: int = 256,
        prefix_cache_tokens: int = 0,
    ) -> None:
        device = next(model.parameters()).device
        max_positions = int(
            getattr(model.config, "max_position_embeddings", 0)
            or getattr(model.config, "n_positions", 0)
            or 0
        )
        super().__init__(name, slots, device, max_positions, prefix_cache_tokens)
        self.model = model.eval()
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        params = inspect.signature(self.base.forward).parameters
        # transformers 5.x renames past_key_values -> cache; accept both.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._softcap = getattr(model.config, "final_logit_softcapping", None)
        self.kv = SlotKV(self.device, slots, capacity)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def describe(self) -> dict[str, Any]:
        weights = next(self.model.parameters())
        return {"backend": "torch", "dtype": str(weights.dtype), "device": str(self.device)}

    @torch.inference_mode()
    def _copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.kv.copy_slot(src, dst, length)

    def _grow(self) -> list[int]:
        """Every slot is taken: double them (under the lock)."""
        grown = self.kv.slots * 2
        free = list(range(self.kv.slots, grown))
        self.kv.reserve(grown, self.kv.capacity)
        self.slots = grown
        return free

    # -- the forward -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> list:
        """One forward over ``rows`` (distinct sequences); returns float32 logits [keep, vocab] per row.

        Stepped rows (``Row.pick``) go on for their ``steps``, one forward of the stepped rows still going
        per step, each fed its last pick on the device: a drafter's whole block with one wait for the
        device, at the end. Such a row returns its picks on the host instead of logits.
        """
        if not rows:
            return []
        self._check_rows(rows)
        outputs: list = self._forward(rows)
        if any(r.pick is not None for r in rows):
            self._steps(rows, outputs)
        return outputs

    def _steps(self, rows: list[Row], outputs: list) -> None:
        """Go on with the stepped rows after their first forward (``outputs``: its logits), in place."""
        pickers: dict[int, Picker] = {i: r.pick for i, r in enumerate(rows) if r.pick is not None}
        stepped = list(pickers)
        picks: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        start = {i: len(rows[i].seq.tokens) for i in stepped}  # where the picks fed start in the cache
        try:
            for i in stepped:
                picks[i] = [pickers[i](outputs[i][-1], 0)]
            for step in range(1, max(rows[i].steps for i in stepped)):
                going = [i for i in stepped if rows[i].steps > step]
                fed = torch.cat([picks[i][-1][0].reshape(1) for i in going])  # [B] on the device
                logits = self._forward([Row(rows[i].seq, [PENDING]) for i in going], fed[:, None])
                for i, lg in zip(going, logits):
                    picks[i].append(pickers[i](lg[-1], step))
            host = _to_host([p for i in stepped for p in picks[i]])  # the one wait for the device
        except BaseException:
            for i in stepped:  # no pending token stays cached: the rows end at their first forward's feed
                del rows[i].seq.tokens[start[i] :]
            raise
        for i in stepped:
            outputs[i], host = host[: len(picks[i])], host[len(picks[i]) :]
            tokens = rows[i].seq.tokens
            fed_picks = len(outputs[i]) - 1  # every pick but the last was fed
            tokens[start[i] : start[i] + fed_picks] = [int(p[0]) for p in outputs[i][:fed_picks]]

    def _forward(self, rows: list[Row], fed: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One forward of ``rows``; ``fed`` [B, 1]: the rows' tokens, on the device (their ``tokens`` are
        ``PENDING``)."""
        width = max(len(r.tokens) for r in rows)
        lengths = [len(r.seq) for r in rows]
        kv_len = max(lengths) + width
        self.kv.reserve(self.kv.slots, kv_len)
        # built as lists, a tensor each: on a fast device the host's work per forward is what a step costs
        write, positions, ids = [], [], []
        for r, n in zip(rows, lengths):
            count = len(r.tokens)
            write.append(list(range(n, n + width)))
            # padding tokens repeat their row's last position for the embeddings (within the model's range)
            positions.append(write[-1][:count] + [n + count - 1] * (width - count))
            ids.append(r.tokens + [0] * (width - count))
        write_pos = torch.tensor(write)  # [B, T]
        # row b's token t attends to every cached position up to its own: j <= length_b + t
        mask = torch.arange(kv_len)[None, None, :] <= write_pos[:, :, None]  # [B, T, L]
        slots = torch.tensor([r.seq.slot for r in rows])  # [B]
        dev = self.device
        cache = BatchCache(self.kv, slots.to(dev), write_pos.to(dev), kv_len)
        out = self.base(
            input_ids=torch.tensor(ids, device=dev) if fed is None else fed,
            attention_mask=mask[:, None].to(dev),  # [B, 1, T, L]
            position_ids=torch.tensor(positions, device=dev),
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return self._finish(rows, out.last_hidden_state)

    def _finish(self, rows: list[Row], hidden: torch.Tensor) -> list[torch.Tensor]:
        """After a forward: logits of the positions each row keeps (``hidden`` [B', T, hidden], its first
        rows being ``rows``, padded to T), the rows' tokens cached, the counters moved."""
        width = hidden.shape[1]
        picks = [
            b * width + t for b, r in enumerate(rows) for t in range(len(r.tokens) - r.keep, len(r.tokens))
        ]
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = self._logits(flat[torch.tensor(picks, dtype=torch.long, device=self.device)])  # [N, V]
        for r in rows:
            r.seq.tokens.extend(r.tokens)
        self._count(rows)
        return list(logits.split([r.keep for r in rows]))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab] (empty N skips the head)."""
        if hidden.shape[0] == 0:
            return torch.zeros(0, self.vocab_size, device=hidden.device)
        logits = self.head(hidden).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits


def _to_host(items: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """Device tensors to the host with one copy per dtype (one wait for the device), same structure."""
    flat = [t for item in items for t in item]
    host: list[torch.Tensor] = list(flat)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for j, t in enumerate(flat):
        by_dtype.setdefault(t.dtype, []).append(j)
    for indices in by_dtype.values():
        joined = torch.cat([flat[j].reshape(-1) for j in indices]).cpu()
        for j, part in zip(indices, joined.split([flat[j].numel() for j in indices])):
            host[j] = part.reshape(flat[j].shape)
    out, j = [], 0
    for item in items:
        out.append(tuple(host[j : j + len(item)]))
        j += len(item)
    return out
