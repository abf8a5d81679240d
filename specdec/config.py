"""Frozen service configs filled from flags, with environment-variable defaults (docker-compose, k8s)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from specdec_core.models import DEFAULT_DRAFTER, DEFAULT_TARGET


def _env(name: str, default, cast=str):
    raw = os.environ.get(name)
    return default if raw in (None, "") else cast(raw)


def _parse_bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


@dataclass(frozen=True)
class CommonConfig:
    model: str
    port: int
    host: str = "[::]"
    device: str = "cpu"
    dtype: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    # OpenMP idle threads: auto (brief unless pinned to cores of its own) | brief | passive | active; read
    # by the CLI before torch starts (specdec/placement.py); an OMP_WAIT_POLICY in the environment wins
    omp_wait_policy: str = "auto"
    max_sessions: int = 64
    max_batch_rows: int = 32  # rows (sequences) per forward
    max_batch_tokens: int = 512  # tokens per forward (prompt chunks fill what decoding rows leave)
    prefill_chunk: int = 128  # while other sequences are active, feed prompts this many tokens at a time
    # on CPU, forwards take turns with the other specdec processes on the same cores (runtime/lease.py)
    compute_lease: bool = True
    # a turn not given within this (the other process stopped or hung mid-forward) is not waited for
    compute_lease_timeout_s: float = 10.0
    grace_s: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object per line, with request id and timings)
    # Prometheus /metrics on its own HTTP port (vLLM's metric names where they exist); 0: off
    metrics_port: int = 0
    metrics_host: str = "0.0.0.0"
    model_name: str = ""  # the `model_name` label of the metrics (and /v1/models); default: the model
    # access (specdec/security.py): TLS on the port, mutual TLS with a client CA, a bearer token read from
    # this file or else from $SPECDEC_<ROLE>_AUTH_TOKEN (never a flag's value: it would show in `ps`)
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_token_file: str = ""
    # prompt lookup (a verifier's drafter "ngram" and the lookup side of "hybrid", a drafter's `--source
    # ngram`): n-gram sizes matched, longest first
    ngram_min: int = 2
    ngram_max: int = 4
    # static-shape forwards (specdec_core/runtime/backends/torch_static.py): auto (on CUDA devices) | on | off; with them on
    # CUDA, a CUDA graph per (rows, tokens) bucket captured at start-up unless --no-cuda-graphs; each
    # sequence gets kv_capacity positions, preallocated (the service's context limit then)
    # execution backend (specdec_core/runtime/factory.py): auto (llama.cpp for GGUF models on CPUs when
    # llama-cpp-python is installed, else torch) | torch | llamacpp
    backend: str = "auto"
    # llama.cpp backend: KV cells shared by all sequences (0: 16384), the sum of their contexts
    kv_cells: int = 0
    # finished sequences keep their KV for later prompts that start the same way, up to this many tokens
    # (specdec_core/runtime/prefix_cache.py): -1 picks from memory (half the llama.cpp cells; 16384 on
    # torch, whose retained entries only ever hold slots no live sequence needs); 0 turns it off
    prefix_cache_tokens: int = -1
    static_shapes: str = "auto"
    cuda_graphs: bool = True
    kv_capacity: int = 2048


@dataclass(frozen=True)
class DrafterConfig(CommonConfig):
    model: str = DEFAULT_DRAFTER
    port: int = 50052
    max_support: int = 64
    lookahead: bool = False  # keep drafting while the verifier works (needs spare compute on the drafter)
    # draft a whole block in one call of the model runner, each token picked on the device and fed back
    # without the host waiting for it: auto (on CUDA devices) | on | off (one forward at a time, so an
    # early stop saves the rest of the block: the better choice where waiting for the device is free)
    draft_in_one_call: str = "auto"
    # the drafter's weights. torch: none | int8 (CPU dynamic int8) | bf16 | fp16 | auto (probe: int8 if
    # >= 1.5x on CPU). llama.cpp: auto = q4_0 (a drafting file made once from the GGUF: Q4_0 weights and
    # a head cut to --head-rows tokens, runtime/backends/draft_file.py) | none (the GGUF as it is)
    quantization: str = "auto"
    head_rows: int = 32768  # llama.cpp drafting file: LM head rows (most frequent tokens) computed; 0: all
    # recycle each verifier connection after this long (0: never): the verifier then re-resolves a
    # dns:/// drafter name and reaches drafters started since; streams in flight finish on the old one
    max_connection_age_s: float = 300.0
    # what it drafts with: model (the language model `--model`) | ngram (prompt lookup over token ids: no
    # model is loaded, and any verifier's vocabulary will do)
    source: str = "model"


@dataclass(frozen=True)
class VerifierConfig(CommonConfig):
    model: str = DEFAULT_TARGET
    port: int = 50051
    drafters: tuple[str, ...] = field(default_factory=tuple)  # default drafter addresses
    num_draft_tokens: int = 0  # 0: adaptive length by default (k <= 8); k > 0: fixed k by default
    max_running: int = 16  # generations decoding at once; more wait in the queue
    max_waiting: int = 64  # generations waiting for a running spot; past it: RESOURCE_EXHAUSTED
    max_new_tokens: int = 256
    session_idle_s: float = 300.0
    max_session_tokens: int = 32768
    max_total_tokens: int = 262144
    # llama.cpp backend: keep each position's arithmetic independent of its forward's width (greedy output
    # then equals --no-draft bit for bit; batched forwards of 2+ positions cost more); off: llama.cpp's stock
    # kernels, faster under load, with llama-server's own batch-dependent rounding
    batch_invariant: bool = True
    fast_verify: str = "auto"  # auto | transpose (= on) | onednn | off: small-block linear path, probed
    # start remote drafters' prefill while the target prefills: auto (unless the drafter shares this
    # host's CPU cores, from its Info) | on | off
    overlap_prefill: str = "auto"
    # whose cached prompt prefixes a request may reuse: tenant (requests of the same GenerateRequest.tenant,
    # salted by this process; a hit shows in the time to first token) | shared (every request's)
    prefix_cache_scope: str = "tenant"
    # finished generations' prompts and outputs kept for the "ngram" and "hybrid" drafters' lookup to draft
    # from (specdec_core/suffix_index.py), scoped as the prefix cache is; 0: the current request's text only
    lookup_index_tokens: int = 200000
    # stream tokens in messages of exactly this many (the last one excepted) instead of one message per
    # round, whose size tells a network observer how many drafts it accepted ("Whisper Leak"); 0: per round
    stream_chunk_tokens: int = 0
    # stream on a clock instead: every this many milliseconds, one message of what was decoded since the
    # last (with --stream-chunk-tokens, whole chunks of it), so message times do not mark rounds; 0: off
    stream_quantum_ms: int = 0
    # a drafter round trip later than this is a failed round (the generation goes on without drafts and
    # health-checks the drafter with backoff); a round that (re)starts the drafter's stream, with its prefill,
    # gets the second
    drafter_timeout_s: float = 15.0
    # tokens per runner call of a round that drafts nothing (no drafter, or the length policy chose not to)
    # while the generation is alone on the target, streamed together: 0 = auto (8 on CUDA, where each wait
    # for the device costs a step's launches; 1 elsewhere)
    plain_steps: int = 0
    drafter_start_timeout_s: float = 60.0
    # a Generate request may name its own drafter only if it is one of `drafters`, unless this is set
    allow_any_drafter: bool = False
    # the verifier's channels to its drafters: CA to trust, client certificate (mutual TLS), TLS name to
    # check, token file (else $SPECDEC_VERIFIER_DRAFTER_TOKEN)
    drafter_tls_ca: str = ""
    drafter_tls_cert: str = ""
    drafter_tls_key: str = ""
    drafter_tls_server_name: str = ""
    drafter_token_file: str = ""


def add_config_args(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    """One flag per config field, defaulting to $SPECDEC_<PREFIX>_<FIELD> or the field default."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
        env = f"SPECDEC_{prefix}_{f.name.upper()}"
        flag = "--" + f.name.replace("_", "-")
        if f.name == "drafters":
            value = tuple(a for a in _env(env, "").split(",") if a) or default
            parser.add_argument(
                "--drafter",
                dest="drafters",
                action="append",
                default=None,
                help=f"drafter address host:port, repeatable (env {env}, comma-separated); the names ngram "
                "and hybrid draft inside the verifier (first one given: the default of requests naming none)",
            )
            parser.set_defaults(_drafters_env=value)
            continue
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=_env(env, default, _parse_bool),
                help=f"(env {env})",
            )
            continue
        cast = type(default) if default is not None else str
        parser.add_argument(
            flag, dest=f.name, type=cast, default=_env(env, default, cast), help=f"(env {env})"
        )


def config_from_args(cls: type, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name != "drafters"}
    if any(f.name == "drafters" for f in dataclasses.fields(cls)):
        values["drafters"] = tuple(args.drafters) if args.drafters else args._drafters_env
    return cls(**values)
