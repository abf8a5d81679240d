"""A drafting file: a drafter's GGUF re-made for drafting fast on CPUs (docs/serving.md, "The drafting
file").

A drafter's numbers decide only how many of its tokens the target accepts, never what is generated (the
verifier checks every token), so its file may trade a little accuracy for speed where the target's may not.
From the drafter's GGUF this makes, once, a copy with

* its weights requantized to ``Q4_0`` (``QUANTS``): llama.cpp repacks Q4_0 for its fastest CPU kernel,
  where the 0.5B Q4_K_M file's Q5_0 and Q6_K tensors (its 896-wide rows do not fit K-quant blocks) go one
  row at a time; the LM head stays Q8_0;
* its LM head's rows ordered by how often their tokens occur, and ``specdec.head_rows`` (u32) saying how
  many of them llama.cpp computes (``scripts/patch_llama_head_rows.py``); ``specdec.head_token_ids`` (i32
  array) names the token of each computed row. The head is 151,936 rows for the Qwen pair, a third of a
  drafting step; the first 32,768 by frequency cover the text the target writes almost always (measured
  in docs/serving.md). A token outside them is never drafted: its round ends there, as at any miss.

The frequencies are counted over the Python standard library's source (code, comments and docstrings in
English), tokenized by the model's own tokenizer: a corpus every machine that runs specdec has. Control
tokens (end of turn, end of text) are always kept.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import sysconfig
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

HEAD_ROWS = 32768  # rows of the LM head a drafting file computes (the default; 0: the whole head)
QUANTS = ("q4_0",)  # the weight formats a drafting file may take
KEY_ROWS = "specdec.head_rows"
KEY_IDS = "specdec.head_token_ids"
KEY_SOURCE = "specdec.draft_source"
CORPUS_BYTES = 16 << 20  # enough of the standard library to rank the tokens that occur at all


def _lib():
    import llama_cpp.llama_cpp as lib

    return lib


def head_ids(path: Path) -> np.ndarray | None:
    """The token each logits column of a drafting file stands for (None: a file with its head as it was):
    the first ``specdec.head_rows`` of its head's order where this llama.cpp computes only those rows, the
    whole order where it computes every row (in the file's row order all the same). Read with ggml's own
    GGUF reader, metadata only: the ``gguf`` package's parses every field in Python (5.8 s for the 1.5B
    target's vocabulary), and every runner asks."""
    lib = _gguf_lib()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
    if not ctx:
        return None
    try:
        rows, ids = lib.gguf_find_key(ctx, KEY_ROWS.encode()), lib.gguf_find_key(ctx, KEY_IDS.encode())
        if rows < 0 or ids < 0:
            return None
        data = ctypes.cast(lib.gguf_get_arr_data(ctx, ids), ctypes.POINTER(ctypes.c_int32))
        order = np.ctypeslib.as_array(data, shape=(lib.gguf_get_arr_n(ctx, ids),)).astype(np.int64)
        return order[: lib.gguf_get_val_u32(ctx, rows)] if head_rows_supported() else order
    finally:
        lib.gguf_free(ctx)


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@functools.cache
def _gguf_lib() -> ctypes.CDLL:
    """ggml's GGUF reader (``gguf.h``) in the library llama-cpp-python ships."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_get_val_u32.restype = ctypes.c_uint32
    lib.gguf_get_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_arr_n.restype = ctypes.c_size_t
    lib.gguf_get_arr_n.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_arr_data.restype = ctypes.c_void_p
    lib.gguf_get_arr_data.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    return lib


@functools.cache
def head_rows_supported() -> bool:
    """Whether the installed llama.cpp carries scripts/patch_llama_head_rows.py (``make setup`` builds it)."""
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib" / "libllama.so"
    try:
        return b"specdec.head_rows" in lib.read_bytes()
    except OSError:
        return False


def derived_path(src: Path, quant: str, head_rows: int, cache: Path) -> Path:
    """Where the drafting file of ``src`` lives: keyed by the source's path, size and time, and the options."""
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache / f"{src.stem}.draft-{quant}-h{head_rows}-{key}.gguf"


def derive(src: Path, cache: Path, quant: str = "q4_0", head_rows: int = HEAD_ROWS) -> Path:
    """The drafting file of ``src`` under ``cache``, made now if it is not there (seconds: about 15 for the
    0.5B drafter on 2 cores)."""
    if quant not in QUANTS:
        raise ValueError(f"drafting files are {', '.join(QUANTS)}, not {quant!r}")
    out = derived_path(src, quant, head_rows, cache)
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("making the drafting file of %s (%s weights, %d head rows), once", src.name, quant, head_rows)
    tmp = out.with_name(out.name + f".{os.getpid()}.partial")
    quantized = out.with_name(out.name + f".{os.getpid()}.q.partial")
    try:
        _quantize(src, quantized, quant)
        order = token_order(src, head_rows) if head_rows else None
        _write(quantized, tmp, order, head_rows, src)
        tmp.replace(out)
    finally:
        for p in (tmp, quantized):
            p.unlink(missing_ok=True)
    log.info("drafting file %s made in %.1f s", out.name, time.perf_counter() - t0)
    return out


def _quantize(src: Path, dst: Path, quant: str) -> None:
    lib = _lib()
    params = lib.llama_model_quantize_default_params()
    params.ftype = {"q4_0": lib.LLAMA_FTYPE_MOSTLY_Q4_0}[quant]
    params.output_tensor_type = lib.GGML_TYPE_Q8_0  # the head: Q8_0 (not repacked, so it can be cut)
    params.allow_requantize = True
    params.nthread = len(os.sched_getaffinity(0))
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not requantize {src} to {quant}")


def corpus_files() -> list[Path]:
    """The standard library's Python sources, tests left out, in a fixed order, up to ``CORPUS_BYTES``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "test" in rel or "tests" in rel or "idlelib" in rel:
            continue
        files.append(path)
        total += path.stat().st_size
        if total >= CORPUS_BYTES:
            break
    return files


def token_order(model: Path, head_rows: int) -> np.ndarray | None:
    """The model's token ids, most frequent first over ``corpus_files`` (control tokens first of all;
    ties, and tokens never seen, by id); None where a head of ``head_rows`` holds the whole vocabulary."""
    lib = _lib()
    mparams = lib.llama_model_default_params()
    mparams.vocab_only = True
    handle = lib.llama_model_load_from_file(str(model).encode(), mparams)
    if not handle:
        raise RuntimeError(f"llama.cpp could not read the vocabulary of {model}")
    try:
        vocab = lib.llama_model_get_vocab(handle)
        n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        if n_vocab <= head_rows:
            return None
        counts = np.zeros(n_vocab, dtype=np.int64)
        buf = (lib.llama_token * (1 << 20))()
        for path in corpus_files():
            text = path.read_bytes()
            for start in range(0, len(text), 1 << 18):  # pieces well under the buffer's tokens
                piece = text[start : start + (1 << 18)]
                n = lib.llama_tokenize(vocab, piece, len(piece), buf, len(buf), False, False)
                if n > 0:
                    counts += np.bincount(np.ctypeslib.as_array(buf)[:n], minlength=n_vocab)
        control = np.array(
            [bool(lib.llama_vocab_get_attr(vocab, t) & lib.LLAMA_TOKEN_ATTR_CONTROL) for t in range(n_vocab)]
        )
    finally:
        lib.llama_model_free(handle)
    counts[control] = np.iinfo(np.int64).max
    return np.argsort(-counts, kind="stable")


def _write(quantized: Path, dst: Path, order: np.ndarray | None, head_rows: int, src: Path) -> None:
    """Copy ``quantized`` to ``dst`` with its head's rows in ``order`` and the head keys (module docstring)."""
    import gguf

    reader = gguf.GGUFReader(quantized)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise RuntimeError(f"{quantized} names no architecture")
    arch = arch_field.contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_key_value(KEY_SOURCE, src.name, gguf.GGUFValueType.STRING)
    tensors = {t.name: t for t in reader.tensors}
    head = tensors.get("output.weight", tensors.get("token_embd.weight"))
    if order is not None and head is not None and "output.bias" not in tensors:
        rows = min(head_rows, len(order))
        writer.add_key_value(KEY_ROWS, rows, gguf.GGUFValueType.UINT32)
        writer.add_key_value(KEY_IDS, order.astype(np.int32).tolist(), gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.INT32)  # fmt: skip
    else:
        order = None  # the head stays whole
    out = [
        (t.name, t.data, t.tensor_type) for t in reader.tensors if order is None or t.name != "output.weight"
    ]
    if order is not None and head is not None:
        out.append(("output.weight", head.data[order], head.tensor_type))  # the rows in frequency order
    for name, data, qtype in out:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in out:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
