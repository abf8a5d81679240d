"""The KV layout of the batched runner: one padded slot per sequence, rolled back by its length alone.

Per layer, keys and values live in two buffers ``[slots, kv_heads, capacity, head_dim]``. A sequence owns
one slot and a length; the positions past its length are dead (a rejected draft, a padding token) and are
masked out of attention, so a rollback only moves the length — nothing is copied, and the other slots are
never touched. A forward writes each row's new keys at ``length + t`` and attends over the first ``L``
positions of the rows it runs (``L`` = the longest row after the forward), with a ``[rows, 1, T, L]``
mask that is causal per row.

The buffers grow (doubling, between forwards) in slots and in capacity, or can be preallocated once
(``reserve``) for static shapes. This is the layout a CUDA-graph capture replays
(``backends/torch_static.py``): fixed buffers, positions and masks as inputs.

``BatchCache`` is what one forward hands the model as its ``cache``: transformers' attention layers call
``cache.update(keys, values, layer_idx)`` and attend over what it returns.
"""

from __future__ import annotations

import torch
from transformers import Cache


class SlotKV:
    """Padded per-slot key/value buffers for every layer of one model."""

    def __init__(self, device: torch.device | str, slots: int = 4, capacity: int = 256) -> None:
        self.device = torch.device(device)
        self.slots = slots
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []  # per layer [slots, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []

    def layer(self, idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers of layer ``idx``, allocated on first use from the shape of ``like`` [B, H, T, D]."""
        while len(self.keys) <= idx:
            shape = (self.slots, like.shape[1], self.capacity, like.shape[3])
            self.keys.append(torch.zeros(shape, dtype=like.dtype, device=self.device))
            self.values.append(torch.zeros(shape, dtype=like.dtype, device=self.device))
        return self.keys[idx], self.values[idx]

    def reserve(self, slots: int, capacity: int) -> None:
        """Grow to at least ``slots`` x ``capacity`` (doubling, to amortise the copies)."""
        new_slots = self.slots
        while new_slots < slots:
            new_slots *= 2
        new_capacity = self.capacity
        while new_capacity < capacity:
            new_capacity *= 2
        if (new_slots, new_capacity) == (self.slots, self.capacity):
            return
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                grown = old.new_zeros((new_slots, old.shape[1], new_capacity, old.shape[3]))
                grown[: old.shape[0], :, : old.shape[2]] = old
                buffers[i] = grown
        self.slots, self.capacity = new_slots, new_capacity

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (every layer)."""
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf[dst, :, :length] = buf[src, :, :length]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.keys + self.values)


class BatchCache(Cache):
    """The cache of one batched forward: writes new keys at per-row positions, returns the rows' prefixes.

    rows: [B] slot of each row; write_pos: [B, T] cache position of each new token (padding tokens write
    past their row's new length, where nothing reads them); kv_len: positions attended (L). ``write_rows``
    [B, T], the slot each token writes (static shapes, ``backends/torch_static.py``: padding writes to a
    scratch slot): given, the cache reads no tensor on the host, so a CUDA graph can capture the forward.
    """

    def __init__(
        self,
        kv: SlotKV,
        rows: torch.Tensor,
        write_pos: torch.Tensor,
        kv_len: int,
        write_rows: torch.Tensor | None = None,
    ) -> None:
        super().__init__(layers=[])
        self.kv = kv
        self.rows = rows  # [B]
        self.write_rows = rows[:, None].expand_as(write_pos) if write_rows is None else write_rows  # [B, T]
        self.write_pos = write_pos  # [B, T]
        self.kv_len = kv_len
        self._span = None
        if write_rows is None:
            first = int(rows[0])
            # rows first..first+B-1 in order: the attended keys are a view of the buffers, no gather
            if torch.equal(rows, torch.arange(first, first + len(rows), device=rows.device)):
                self._span = slice(first, first + len(rows))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [B, kv_heads, T, head_dim] -> attended keys, values [B, kv_heads, L, D]."""
        keys, values = self.kv.layer(layer_idx, key_states)
        keys[self.write_rows, :, self.write_pos] = key_states.transpose(1, 2)  # [B, T, H, D]
        values[self.write_rows, :, self.write_pos] = value_states.transpose(1, 2)
        if self._span is not None:
            return keys[self._span, :, : self.kv_len], values[self._span, :, : self.kv_len]
        return (
            keys[:, :, : self.kv_len].index_select(0, self.rows),
            values[:, :, : self.kv_len].index_select(0, self.rows),
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len
