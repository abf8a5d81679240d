"""A runner on llama.cpp: a GGUF file served as it is, quantized weights and llama.cpp's own CPU kernels.

One ``forward(rows)`` is one ``llama_decode`` of a ragged batch: every row's tokens carry their
sequence's id (the row's slot) and positions, and the tokens whose logits a row keeps are flagged as
outputs. The KV cache is llama.cpp's unified one (every sequence's cells in one pool of ``n_ctx`` cells).
Rolling a sequence back only moves ``Sequence.tokens``; the cells past it are removed
(``llama_memory_seq_rm``) before the sequence's next forward, and a released slot's cells before the slot
is reused.

Numerics: the served model is the GGUF's own (Q4_K weights, activations quantized per row for the dot
products, f16 KV cache), not the fp32 model transformers would dequantise it to. Losslessness is relative
to it: a position's logits must not depend on how many positions, or which other sequences, share its
forward, or greedy drafting would drift from one-token decoding. Stock llama.cpp picks CPU kernels by
batch width and they round differently (docs/serving.md, "Batch invariance"), so the verifier's runner
(``invariant=True``) keeps to paths that compute each position alone:

* **patched build** (``scripts/build_llamacpp.sh`` applies ``scripts/patch_ggml_invariant.py``; the
  library then exports ``ggml_cpu_specdec_batch_invariant``): with ``GGML_CPU_BATCH_INVARIANT=1`` the
  kernel a lone repacked position runs computes exactly what llama.cpp's 4-position GEMM computes for each
  of its positions (``scripts/patch_ggml_invariant_gemm.py``; repacked types it does not cover run every
  position through that one-position kernel), and flash attention gives every query the tiled kernel's
  arithmetic with the tiles cut in the query's own visible cells (``scripts/patch_ggml_invariant_attn.py``),
  so neither the width nor where a sequence's cells lie in the unified cache moves it.
* **stock build** (a llama-cpp-python from elsewhere): no repacked weights (plain per-position dot
  products), flash attention in micro-batches of ``SMALL_UBATCH`` < 64 positions (its tiled kernel starts
  at 64 queries) and never a lone query (its KV is split across threads from 512 cells): a lone token is
  decoded beside a scratch token that is dropped afterwards. Every decoding step costs more than stock
  (docs/serving.md, the verify slope).
* both: the tiled K-quant matmul (8+ positions) off (``GGML_CPU_TILED_MM=0``), flash attention on (the
  plain softmax sums over where other sequences' cells lie).

ggml reads these switches once per process, so the first runner made sets them. A drafter's numerics do
not touch losslessness (the verifier judges drafts by the probabilities sent with them): its runner
(``invariant=False``) keeps stock kernels. Weights llama.cpp multiplies with tinyBLAS at 2+ positions (F32,
F16, Q8_0, Q4_0 without repacking) are not batch-invariant; the built-in models (Q4_K_M) and the tests'
GGUFs (Q4_0 repacked on the patched build, Q4_1 anywhere) are.

Both builds: a forward of 2 or 3 positions (3 mod 4 in general) is padded with scratch tokens to the
next group of 4 (``padded_width``): the repacked kernels take positions in fours, and a position left
over costs nearly what the group does.

``LlamaContext`` holds llama.cpp's objects and makes the ctypes calls; ``LlamaCppRunner`` keeps the runner
contract on top (sequences, rollback, stepped rows, the scratch token).

Needs ``llama-cpp-python`` (``make setup`` builds it for this CPU: ``scripts/build_llamacpp.sh``).
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..interface import Row, Sequence, SlotRunner
from . import draft_file

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 16384  # KV cells shared by all sequences (llama-server's -c in the benchmarks)
UBATCH = 512  # positions per llama_decode
SMALL_UBATCH = 32  # on a stock build: below flash attention's tiled kernel (64 queries)


def padded_width(n: int) -> int:
    """The positions a forward of ``n`` is fed as. Repacked Q4_K weights (and, on the patched build, Q6_K)
    take positions in groups of 4 and each one left over alone, which re-reads the weights; measured on
    the 1.5B target (docs/serving.md, "Padding"), 2 and 3 positions cost more than 4, and 7 more than 8,
    so such a forward gets scratch tokens up to the group (their logits are not computed, their cells go
    at once). 1, 5 and 6 positions cost less than the group above them."""
    return 4 if n == 2 else n + 1 if n % 4 == 3 else n


def available() -> bool:
    """Whether llama-cpp-python can be imported here."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _lib():
    import llama_cpp.llama_cpp as lib

    return lib


# -- process-wide set-up ---------------------------------------------------------------------------------
def _patched() -> bool:
    """Whether the installed llama.cpp carries the batch-invariance patch (module docstring)."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"
    try:
        return hasattr(ctypes.CDLL(str(lib)), "ggml_cpu_specdec_batch_invariant")
    except OSError:
        return False


def _set_invariant_kernels(patched: bool) -> None:
    """ggml's switches for batch-invariant kernels (module docstring). Set before ggml's first matmul in
    this process, which reads them once; a switch the environment already sets is left as it is."""
    os.environ.setdefault("GGML_CPU_TILED_MM", "0")
    if patched:
        os.environ.setdefault("GGML_CPU_BATCH_INVARIANT", "1")


_backend_ready = False


def init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        lib = _lib()
        lib.llama_backend_init()
        if not os.environ.get("SPECDEC_LLAMA_VERBOSE"):  # llama.cpp logs every tensor at load otherwise
            lib.llama_log_set(_quiet_log, ctypes.c_void_p(0))
        _backend_ready = True


def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == 4:  # GGML_LOG_LEVEL_ERROR; the rest (and its continuation lines, 5) is start-up chatter
        log.warning("llama.cpp: %s", text.decode(errors="replace").rstrip())


_quiet_log = None
try:
    _quiet_log = _lib().llama_log_callback(_log_callback)
except (ImportError, OSError, AttributeError):  # no llama-cpp-python: the runner is not available
    pass


# -- llama.cpp's objects ---------------------------------------------------------------------------------
Entry = tuple[int, int, int, bool]  # one token of a batch: (slot, position, token id, wants logits)


class LlamaContext:
    """llama.cpp's objects behind one runner, in llama.cpp's terms (slots, positions, cells): the model, a
    context whose unified KV cache holds ``slots + 1`` sequences (the last one: the runner's scratch
    sequence) in ``context`` cells, and one batch buffer of ``ubatch + 1`` tokens, reused by every decode.

    ``repack``: let llama.cpp repack the weights for its CPU kernels (the module docstring says when not).
    """

    def __init__(self, path: Path, slots: int, context: int, ubatch: int, threads: int, repack: bool) -> None:
        lib = _lib()
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = repack
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {path}")
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model)))
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = context
        cparams.n_batch = cparams.n_ubatch = ubatch
        cparams.n_seq_max = slots + 1  # and the scratch sequence
        cparams.n_outputs_max = max(ubatch + 1, slots + 1)  # llama.cpp reserves an output per sequence
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = True
        cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise ValueError(f"llama.cpp could not create a context for {path} ({context} cells)")
        self.mem = lib.llama_get_memory(self.ctx)
        self.context = int(lib.llama_n_ctx(self.ctx))  # cells, as llama.cpp rounded them
        # the longest sequence: the cells, or fewer where the model was trained on fewer positions
        self.max_positions = min(int(lib.llama_model_n_ctx_train(self.model)) or self.context, self.context)
        self.batch = lib.llama_batch_init(ubatch + 1, 0, 1)
        # a drafting file's cut head (draft_file.py): logit j of a row is token head[j]'s, the rest -inf
        self.head = draft_file.head_ids(path)

    def describe(self) -> tuple[str, int]:
        """The model's description (e.g. "qwen2 1.5B Q4_K - Medium") and its weights' bytes."""
        lib = _lib()
        desc = ctypes.create_string_buffer(256)
        lib.llama_model_desc(self.model, desc, len(desc))
        return desc.value.decode(errors="replace"), int(lib.llama_model_size(self.model))

    def decode(self, entries: list[Entry]) -> int:
        """One ``llama_decode`` of ``entries`` (at most ``ubatch + 1``); its status (0: done, 1: no room in
        the KV cache, else an error). The cells of a failed call may stay written."""
        b = self.batch
        for j, (slot, position, token, wants) in enumerate(entries):
            b.token[j] = token
            b.pos[j] = position
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = slot
            b.logits[j] = wants
        b.n_tokens = len(entries)
        return _lib().llama_decode(self.ctx, b)

    def logits(self, n_out: int) -> list[torch.Tensor]:
        """The last decode's logits of its ``n_out`` flagged entries, in the batch's order: [vocab] each."""
        ptr = _lib().llama_get_logits(self.ctx)  # [n_out, vocab]
        logits = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
        if self.head is None:
            return list(torch.from_numpy(logits.copy()).unbind(0))
        full = np.full((n_out, self.n_vocab), -np.inf, dtype=np.float32)
        full[:, self.head] = logits[:, : len(self.head)]
        return list(torch.from_numpy(full).unbind(0))

    def share(self, src: int, dst: int, length: int) -> None:
        """Let slot ``dst`` hold slot ``src``'s first ``length`` positions: the same cells, tagged with both
        (no copy; a later removal from either slot leaves the other's tag)."""
        _lib().llama_memory_seq_cp(self.mem, src, dst, 0, length)

    def remove(self, slot: int, start: int = -1) -> bool:
        """Drop ``slot``'s cells from position ``start`` on (-1: all); False if llama.cpp could not."""
        return bool(_lib().llama_memory_seq_rm(self.mem, slot, start, -1))

    def close(self) -> None:
        """Free the batch buffer, the context and the model (unusable afterwards)."""
        lib = _lib()
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)


# -- the runner ------------------------------------------------------------------------------------------
class LlamaCppRunner(SlotRunner):
    """Runs a GGUF model through llama.cpp over many sequences (see the module docstring).

    ``invariant``: a position's logits do not depend on its forward's width (the module docstring);
    ``patched``: use the patched build's switch (None: when the library has it; False: the stock settings).
    ``slots``: sequences at once (llama.cpp's ``n_seq_max`` less the scratch one, fixed for the context's
    life); ``context``: KV cells shared by all of them. A forward of more than ``UBATCH`` positions is fed
    in several ``llama_decode`` calls.
    """

    def __init__(
        self,
        path: str | Path,
        name: str = "model",
        slots: int = 16,
        context: int = DEFAULT_CONTEXT,
        threads: int = 0,
        invariant: bool = True,
        patched: bool | None = None,
        prefix_cache_tokens: int = 0,
    ) -> None:
        self.invariant = invariant
        self.patched = _patched() if patched is None else patched and _patched()
        if invariant:
            _set_invariant_kernels(self.patched)
        # a stock build stays invariant only with small micro-batches, no lone query, no repacked weights
        self._careful = invariant and not self.patched
        self.kernels = "off" if not invariant else "patched" if self.patched else "careful"
        self.ubatch = SMALL_UBATCH if self._careful else UBATCH
        init_backend()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        slots = max(1, min(slots, int(getattr(_lib(), "LLAMA_MAX_SEQ", 256))))
        self.threads = threads or len(os.sched_getaffinity(0))
        self._llama: LlamaContext | None = LlamaContext(
            self.path, slots, context, self.ubatch, self.threads, repack=not self._careful
        )
        self._n_vocab = self._llama.n_vocab
        self.context = self._llama.context
        super().__init__(name, slots, torch.device("cpu"), self._llama.max_positions, prefix_cache_tokens)
        # positions llama.cpp holds per slot (>= len(seq.tokens) after a rollback, until the next feed)
        self._cached = [0] * (slots + 1)
        self._scratch = Sequence(slot=slots)  # pads a forward (module docstring); never holds a cell
        self.pad = os.environ.get("SPECDEC_LLAMACPP_PAD", "1") != "0"  # padded_width; 0 for measuring

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def llama(self) -> LlamaContext:
        if self._llama is None:
            raise RuntimeError(f"{self.name}: the runner is closed")
        return self._llama

    def describe(self) -> dict[str, Any]:
        desc, weight_bytes = self.llama.describe()
        return {
            "backend": "llama.cpp",
            "dtype": desc,  # e.g. "qwen2 1.5B Q4_K - Medium"
            "device": "cpu",
            "weight_bytes": weight_bytes,
            "threads": self.threads,
            "batch_invariant": self.kernels,
            "context": self.context,
        }

    def close(self) -> None:
        """Free llama.cpp's context and model (the runner is unusable afterwards)."""
        if getattr(self, "_llama", None) is not None:
            self.llama.close()
            self._llama = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    def _on_reclaim(self, slot: int) -> None:
        if self._cached[slot]:
            self.llama.remove(slot)
            self._cached[slot] = 0

    def _copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.llama.share(src, dst, length)
        self._cached[dst] = length

    def _make_room(self, tokens: int) -> None:
        """Give up cached prefixes, oldest first, while the live sequences' next ``tokens`` might not fit in
        the cells beside them (the cells a cached prefix shares with a live sequence count twice here)."""
        while len(self.prefix) and self.kv_tokens_held + self.prefix.tokens + tokens > self.context:
            with self._lock:
                self._take_back(self.prefix.evict())

    # -- the forward -----------------------------------------------------------------------------------
    def forward(self, rows: list[Row]) -> list:
        """One forward over ``rows`` (distinct sequences); float32 logits [keep, vocab] per row, and for a
        stepped row its picks (each fed back as the next step's token, read on the host at once)."""
        if not rows:
            return []
        self._check_rows(rows)
        with self._lock:
            self._reclaim()
        outputs = self._decode([(r.seq, r.tokens, r.keep) for r in rows])
        self._count(rows)
        if any(r.pick is not None for r in rows):
            self._steps(rows, outputs)
        return outputs

    def _steps(self, rows: list[Row], outputs: list) -> None:
        """Go on with the stepped rows after their first forward (``outputs``: its logits), in place."""
        stepped = [i for i, r in enumerate(rows) if r.pick is not None]
        start = {i: len(rows[i].seq.tokens) for i in stepped}
        picks: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        try:
            for i in stepped:
                picks[i] = [rows[i].pick(outputs[i][-1], 0)]  # type: ignore[misc]
            for step in range(1, max(rows[i].steps for i in stepped)):
                going = [i for i in stepped if rows[i].steps > step]
                fed = [(rows[i].seq, [int(picks[i][-1][0])], 1) for i in going]
                for i, logits in zip(going, self._decode(fed)):
                    picks[i].append(rows[i].pick(logits[-1], step))  # type: ignore[misc]
                self._count([Row(rows[i].seq, [0]) for i in going])
        except BaseException:
            for i in stepped:  # the rows end at their first forward's feed
                self.rollback(rows[i].seq, start[i])
            raise
        for i in stepped:
            outputs[i] = [tuple(t.cpu() for t in p) for p in picks[i]]

    def _decode(self, rows: list[tuple[Sequence, list[int], int]]) -> list[torch.Tensor]:
        """Feed (sequence, tokens, keep) rows in ``llama_decode`` calls of at most ``ubatch`` tokens; logits
        of the kept positions per row; the rows' tokens appended to their sequences. A failed call leaves
        every row's sequence as it was (the cells already written go at the next feed, ``_trim``)."""
        for seq, _, _ in rows:
            self._trim(seq)
        self._make_room(sum(len(tokens) for _, tokens, _ in rows) + 3)  # and scratch padding
        before = [len(seq.tokens) for seq, _, _ in rows]
        flat = [
            (seq, t, pos >= len(tokens) - keep) for seq, tokens, keep in rows for pos, t in enumerate(tokens)
        ]
        kept: list[torch.Tensor] = []
        try:
            for begin in range(0, len(flat), self.ubatch):
                kept.extend(self._decode_batch(flat[begin : begin + self.ubatch]))
        except BaseException:
            for (seq, _, _), n in zip(rows, before):
                self.rollback(seq, n)
            raise
        outputs, j = [], 0
        for _, _, keep in rows:
            outputs.append(torch.stack(kept[j : j + keep]) if keep else torch.zeros(0, self._n_vocab))
            j += keep
        return outputs

    def _decode_batch(self, tokens: list[tuple[Sequence, int, bool]]) -> list[torch.Tensor]:
        """One ``llama_decode`` of (sequence, token, wants logits) entries, in order; each sequence's tokens
        go at its next positions. Returns the flagged entries' logits [vocab] each."""
        tokens = tokens + [(self._scratch, 0, False)] * self._scratch_tokens(len(tokens))
        entries: list[Entry] = []
        for seq, token, wants in tokens:
            entries.append((seq.slot, len(seq.tokens), token, wants))
            seq.tokens.append(token)
            self._cached[seq.slot] = len(seq.tokens)
        status = self.llama.decode(entries)
        if tokens[-1][0] is self._scratch:
            while tokens[-1][0] is self._scratch:
                tokens.pop()
            self.rollback(self._scratch, 0)
            self._trim(self._scratch)
        if status != 0:  # the caller takes the forward's tokens back
            if status == 1:
                raise MemoryError(
                    f"{self.name}: llama.cpp's KV cache ({self.context} cells) has no room for "
                    f"{len(tokens)} more tokens ({self.kv_tokens_held} held)"
                )
            raise RuntimeError(f"{self.name}: llama_decode failed with status {status}")
        n_out = sum(1 for _, _, wants in tokens if wants)
        return self.llama.logits(n_out) if n_out else []

    def _scratch_tokens(self, n: int) -> int:
        """Scratch tokens fed beside a forward of ``n`` (module docstring): a lone token's companion on a
        stock build, else those up to ``padded_width``."""
        if self._careful:
            return 1 if n == 1 else 0
        return padded_width(n) - n if self.pad else 0

    def _trim(self, seq: Sequence) -> None:
        """Remove the cells past ``seq``'s length (left by a rollback) before it is fed again."""
        if self._cached[seq.slot] > len(seq.tokens):
            if not self.llama.remove(seq.slot, len(seq.tokens)):
                raise RuntimeError(f"{self.name}: llama.cpp could not remove positions of slot {seq.slot}")
            self._cached[seq.slot] = len(seq.tokens)
