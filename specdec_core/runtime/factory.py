"""One place where a service's model becomes a runner: which backend, how it is loaded, what it serves.

Backends (``runtime/backends/``):

* ``llamacpp``: a GGUF file run as it is by llama.cpp (quantized weights, its CPU kernels). The default on
  CPUs for the built-in models and any ``.gguf`` path when llama-cpp-python is installed: the fp32 model
  transformers dequantises a GGUF to reads 6+ GB a step where llama.cpp reads 1.1 GB (docs/serving.md).
* ``torch``: a transformers model, eager (``torch_eager.ModelRunner``) or with static shapes and CUDA
  graphs (``torch_static``); the default on GPUs and for checkpoints and hub ids. A verifier probes its
  small-block linear path, a drafter its precision (``optimize.py``).

Both services call ``load_runner``; ``config`` is a service config (``specdec/config.py``: ``model``,
``device``, ``dtype``, ``threads``, ``backend``, ``kv_cells``, static-shape and role options). They build
the compute thread it runs on with ``service_scheduler`` and ``compute_lease``, from plain values: where the
process runs (``specdec/placement.py``) and a hook that sees every forward (the service's metrics).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from .. import models
from .batch_costs import BatchLoad
from .interface import Runner
from .jobs import OnForward
from .lease import ComputeLease, cpu_lease
from .scheduler import Scheduler

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "llamacpp")
ROLES = ("verifier", "drafter")


@dataclass
class Loaded:
    """A service's model as served: its runner, tokenizer and what was chosen (``note``: e.g. the fast
    linear path a verifier installed)."""

    runner: Runner
    tokenizer: Any
    backend: str
    note: str = ""


def compute_lease(config, host_id: str, cpus: list[int]) -> ComputeLease | None:
    """The lease a CPU service's forwards take (None on GPUs or when turned off); ``host_id`` and ``cpus``:
    where this process runs (``specdec/placement.py``), so processes on the same cores take turns."""
    if not config.compute_lease or not str(config.device).startswith("cpu"):
        return None
    return cpu_lease(models.cache_root(), host_id, cpus, config.compute_lease_timeout_s)


def service_scheduler(
    name: str,
    config,
    lease: ComputeLease | None = None,
    on_forward: OnForward | None = None,
) -> tuple[Scheduler, BatchLoad]:
    """The compute thread of a service (``config``: a service config) and the forward costs it learns;
    ``lease``: held around each forward (``compute_lease``); ``on_forward`` sees every forward too."""
    load = BatchLoad()

    def forward_ran(row_tokens: list[int], seconds: float) -> None:
        load.on_forward(row_tokens, seconds)
        if on_forward is not None:
            on_forward(row_tokens, seconds)

    scheduler = Scheduler(
        name,
        max_rows=config.max_batch_rows,
        max_tokens=config.max_batch_tokens,
        prefill_chunk=config.prefill_chunk,
        lease=lease,
        on_forward=forward_ran,
        forward_cost=load.forward_cost,
    )
    return scheduler, load


def choose_backend(requested: str, model: str, device: str) -> str:
    """``torch`` or ``llamacpp`` for a model name on a device (module docstring; ``requested``: a flag)."""
    from .backends import llamacpp

    requested = (requested or "auto").lower()
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    gguf = models.gguf_source(model, download=requested == "llamacpp") if requested != "torch" else None
    if requested == "llamacpp":
        if not device.startswith("cpu"):
            raise ValueError(f"the llamacpp backend runs on the CPU (this build), not on {device!r}")
        if gguf is None:
            raise ValueError(f"the llamacpp backend runs GGUF files: {model!r} is not one")
        if not llamacpp.available():
            raise ValueError("the llamacpp backend needs llama-cpp-python (make setup builds it)")
        return "llamacpp"
    if requested == "auto" and gguf is not None and device.startswith("cpu") and llamacpp.available():
        return "llamacpp"
    return "torch"


def load_runner(
    config, role: str, max_sequences: int, threads: int, model=None, tokenizer=None, lease=None
) -> Loaded:
    """Load ``config.model`` for ``role`` and build its runner; call it on the service's compute thread.

    ``threads``: compute threads (torch's intra-op threads, or llama.cpp's).
    ``model`` / ``tokenizer``: an already loaded transformers model (tests, in-process use): torch backend.
    ``lease``: held while a torch model's start-up probes time forwards (``runtime/lease.py``).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    backend = "torch" if model is not None else choose_backend(config.backend, config.model, config.device)
    if backend == "llamacpp":
        return _load_llamacpp(config, role, max_sequences, threads)
    return _load_torch(config, role, max_sequences, threads, model, tokenizer, lease)


def _load_llamacpp(config, role: str, max_sequences: int, threads: int) -> Loaded:
    from .backends.llamacpp import DEFAULT_CONTEXT, LlamaCppRunner

    path = models.gguf_source(config.model)
    assert path is not None  # choose_backend picked llama.cpp for a GGUF file
    if role == "drafter":
        path = drafting_file(path, getattr(config, "quantization", "none"), getattr(config, "head_rows", 0))
    runner = LlamaCppRunner(
        path,
        name=config.model,
        slots=max_sequences,
        context=config.kv_cells or DEFAULT_CONTEXT,
        threads=threads,
        # losslessness needs the target's numerics fixed, not the drafter's
        invariant=role == "verifier" and getattr(config, "batch_invariant", True),
        prefix_cache_tokens=_prefix_budget(config, (config.kv_cells or DEFAULT_CONTEXT) // 2),
    )
    tokenizer = models.load_tokenizer(config.model)
    log.info("%s: llama.cpp, %s", config.model, runner.describe())
    return Loaded(runner, tokenizer, "llamacpp")


def drafting_file(path, quantization: str, head_rows: int):
    """The file a llama.cpp drafter runs: the GGUF as it is ("none"), else its drafting file
    (``backends/draft_file.py``; "auto" is "q4_0"), made once under the cache."""
    from .backends import draft_file, llamacpp

    quantization = (quantization or "none").lower()
    if quantization == "none":
        return path
    quant = "q4_0" if quantization == "auto" else quantization
    if quant not in draft_file.QUANTS:
        raise ValueError(f"a llama.cpp drafter's quantization is auto, none or q4_0, not {quantization!r}")
    if head_rows and not draft_file.head_rows_supported():
        log.warning("this llama.cpp build computes the whole LM head (make setup builds the patched one)")
        head_rows = 0
    llamacpp.init_backend()  # its logs quiet while it requantizes
    try:
        return draft_file.derive(path, models.cache_root() / "drafting", quant, max(head_rows, 0))
    except (OSError, RuntimeError) as exc:  # e.g. a read-only cache: drafting still works, slower
        log.warning("no drafting file for %s (%s): drafting with the file as it is", path, exc)
        return path


def _load_torch(config, role: str, max_sequences: int, threads: int, model, tokenizer, lease) -> Loaded:
    import torch

    from ..optimize import enable_fast_linear, prepare_drafter
    from .backends.torch_static import make_runner

    torch.set_num_threads(threads)
    if model is None:
        model, tokenizer = models.load_model(config.model, config.device, config.dtype)
    note = ""
    with lease if lease is not None else contextlib.nullcontext():  # timed probes: not beside the other role
        if role == "verifier":
            note = enable_fast_linear(model, config.fast_verify)
        else:
            model = prepare_drafter(model, config.quantization)
    runner = make_runner(
        model,
        config.model,
        config.static_shapes,
        config.cuda_graphs,
        max_sequences,
        config.max_batch_rows,
        config.prefill_chunk,
        config.kv_capacity,
        _prefix_budget(config, TORCH_PREFIX_TOKENS),
    )
    return Loaded(runner, tokenizer, "torch", note)


TORCH_PREFIX_TOKENS = 16384  # the torch runners' default: a cached prefix only holds a slot nobody needs


def _prefix_budget(config, auto: int) -> int:
    """Tokens the prefix cache may hold: the config's, or ``auto`` for -1 (the default)."""
    budget = config.prefix_cache_tokens
    return auto if budget < 0 else budget
