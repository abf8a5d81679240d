"""The ``specdec`` command line: serve either role, generate, run the demo, fetch models, benchmark."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys


def cmd_generate(argv: list[str]) -> int:
    from .client import SpecDecError, check_request

    a = _generate_parser().parse_args(argv)
    try:
        check_request(a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p)
    except SpecDecError as exc:
        print(f"specdec generate: error: --{exc.details().replace('_', '-')}", file=sys.stderr)
        return 2  # a usage error: one line naming the flag
    kwargs = dict(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
        num_draft_tokens=a.num_draft_tokens,
        adaptive=a.adaptive,
        no_draft=a.no_draft,
        chat=a.chat,
        stop=tuple(a.stop),
        ignore_eos=a.ignore_eos,
        timeout=a.timeout,
    )
    try:
        return _generate(a, kwargs, _security(a))
    except SpecDecError as exc:
        print(f"specdec generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return exit_status(exc.code())
    except ValueError as exc:  # unreadable certificate or token file
        print(f"specdec generate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("specdec generate", description="Generate through a verifier and a drafter.")
    p.add_argument(
        "--verifier",
        default=os.environ.get("SPECDEC_VERIFIER_ADDR", "localhost:50051"),
        help="verifier host:port (env SPECDEC_VERIFIER_ADDR)",
    )
    p.add_argument(
        "--drafter",
        default=os.environ.get("SPECDEC_DRAFTER_ADDR", ""),
        help="drafter host:port, or ngram (prompt lookup inside the verifier) or hybrid (lookup where it "
        "matches and pays, else the verifier's model drafter) (env SPECDEC_DRAFTER_ADDR); empty: the "
        "verifier's default",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-draft-tokens", type=int, default=0, help="0: the verifier's default")
    p.add_argument(
        "--adaptive", action="store_true", help="choose the draft length per round from a cost model"
    )
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--no-draft", action="store_true", help="target-only decoding (the baseline)")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids and stats")
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds for the whole generation (resumes included)"
    )
    tls = p.add_argument_group("access (each defaults to its SPECDEC_* variable: SPECDEC_TLS_CA, ...)")
    tls.add_argument("--tls-ca", help="CA to trust: speak TLS (env SPECDEC_TLS_CA)")
    tls.add_argument("--tls-cert", help="client certificate for mutual TLS (env SPECDEC_TLS_CERT)")
    tls.add_argument("--tls-key", help="its private key (env SPECDEC_TLS_KEY)")
    tls.add_argument("--tls-server-name", help="TLS name to check (env SPECDEC_TLS_SERVER_NAME)")
    tls.add_argument("--token-file", help="bearer token file (env SPECDEC_TOKEN_FILE, else SPECDEC_TOKEN)")
    return p


def _security(a):
    """The environment's access settings (ClientSecurity.from_env), with the flags given on top."""
    import dataclasses

    from specdec.security import ClientSecurity, read_token

    flags = {"ca": a.tls_ca, "cert": a.tls_cert, "key": a.tls_key, "server_name": a.tls_server_name}
    security = dataclasses.replace(
        ClientSecurity.from_env(), **{k: v for k, v in flags.items() if v is not None}
    )
    return dataclasses.replace(security, token=read_token(a.token_file)) if a.token_file else security


def exit_status(code) -> int:
    """The CLI's exit status for a server error: 10 + the gRPC status number (INVALID_ARGUMENT 13,
    RESOURCE_EXHAUSTED 18, PERMISSION_DENIED 17, UNAVAILABLE 24, UNAUTHENTICATED 26); 2 is a usage error."""
    return 10 + int(code.value[0])


def _generate(a, kwargs: dict, security) -> int:
    from .client import SpecDecClient

    with SpecDecClient(a.verifier, a.drafter, security=security) as client:
        if a.json:
            r = client.generate(a.prompt, **kwargs)
            print(
                json.dumps(
                    {
                        "text": r.text,
                        "token_ids": r.token_ids,
                        "finish_reason": r.finish_reason,
                        "stats": r.stats,
                        "resumes": r.resumes,
                    }
                )
            )
            return 0
        stats: dict = {}
        for piece in client.stream(a.prompt, **kwargs):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            stats = piece.stats or stats
        sys.stdout.write("\n")
        print(
            f"[{stats.get('new_tokens', 0)} tokens, {stats.get('tokens_per_s', 0):.2f} tok/s, "
            f"acceptance {stats.get('acceptance_rate', 0):.2f}]",
            file=sys.stderr,
        )
    return 0


def cmd_health(argv: list[str]) -> int:
    """Exit 0 when the service at --address reports SERVING (docker-compose and Kubernetes probes)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from specdec.security import ClientSecurity

    p = argparse.ArgumentParser("specdec health", description="Check a service's grpc.health.v1 status.")
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    p.add_argument(
        "--http", default="", help="probe this HTTP URL instead (serve-openai's /health): 200 is healthy"
    )
    p.add_argument("--timeout", type=float, default=3.0)
    a = p.parse_args(argv)
    if a.http:
        return _http_health(a.http, a.timeout)
    try:  # TLS settings from SPECDEC_TLS_CA / _CERT / _KEY / _SERVER_NAME, as for any client
        with ClientSecurity.from_env().channel(a.address) as ch:
            request = health_pb2.HealthCheckRequest(service=a.service)
            status = health_pb2_grpc.HealthStub(ch).Check(request, timeout=a.timeout).status
    except grpc.RpcError as exc:
        print(f"specdec health: {a.address}: {exc.code().name}", file=sys.stderr)
        return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def _http_health(url: str, timeout: float) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            print(r.read().decode(errors="replace").strip() or r.status)
            return 0
    except (urllib.error.URLError, OSError) as exc:
        print(f"specdec health: {url}: {exc}", file=sys.stderr)
        return 1


def cmd_models(argv: list[str]) -> int:
    from specdec_core import models

    p = argparse.ArgumentParser("specdec models", description="Built-in offline models.")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list")
    f = sub.add_parser(
        "fetch",
        help="download and verify (idempotent); converted to fp32 only where the torch backend will run it "
        "(no llama-cpp-python here, or --convert)",
    )
    f.add_argument("names", nargs="+")
    f.add_argument("--convert", action=argparse.BooleanOptionalAction, default=None)
    pa = sub.add_parser("path", help="print the local directory of a converted model")
    pa.add_argument("name")
    a = p.parse_args(argv)
    if a.action == "list":
        for name, spec in models.BUILTIN_MODELS.items():
            converted = (models.builtin_dir(name) / "specdec-source.json").exists()
            gguf = (models.cache_root() / "gguf" / f"{name}.gguf").exists()
            state = "converted" if converted else "gguf" if gguf else "not fetched"
            print(f"{name:32s} {state:12s} {spec.description}")
    elif a.action == "fetch":
        from specdec_core.runtime.backends import llamacpp

        convert = not llamacpp.available() if a.convert is None else a.convert
        for name in a.names:
            print(models.fetch(name, convert=convert))
    else:
        print(models.fetch(a.name))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = (
        "serve-verifier",
        "serve-drafter",
        "generate",
        "health",
        "demo",
        "models",
        "bench",
        "loadtest",
        "serve-openai",
    )
    if not argv or argv[0] not in commands:
        print(
            "usage: specdec {" + ",".join(commands) + "} ...\n\n"
            "  serve-verifier  serve the target model (Generate + Verify rpcs)\n"
            "  serve-drafter   serve the drafter model\n"
            "  generate        generate text through a running pair\n"
            "  health          probe a service's grpc.health.v1 status (exit 0 when SERVING)\n"
            "  demo            start both services on the built-in Qwen pair and compare speeds\n"
            "  models          list / fetch / path of the built-in offline models\n"
            "  bench           benchmark against target-only and HF assisted generation\n"
            "  loadtest        many clients against both services on loopback (tiny models), with checks\n"
            "  serve-openai    OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) over a verifier",
            file=sys.stderr,
        )
        return 2
    command, rest = argv[0], argv[1:]
    try:
        return _run(command, rest)
    except ModuleNotFoundError as exc:  # a light install (the client only) asked to serve
        extra = "openai" if command == "serve-openai" else "server"
        if exc.name and exc.name.split(".")[0] in SERVER_MODULES:
            print(
                f"specdec {command} needs the {extra} extra: pip install 'specdec[{extra}]' ({exc})",
                file=sys.stderr,
            )
            return 2
        raise


# what the `server` and `openai` extras bring (pyproject.toml)
SERVER_MODULES = {"torch", "transformers", "tokenizers", "safetensors", "accelerate", "gguf", "tqdm", "psutil",
                  "prometheus_client", "grpc_reflection", "fastapi", "uvicorn", "starlette", "matplotlib"}  # fmt: skip


def _run(command: str, rest: list[str]) -> int:
    if command in ("serve-verifier", "serve-drafter"):
        from specdec.placement import apply_wait_policy

        apply_wait_policy(rest, command.removeprefix("serve-"))  # before torch (and its OpenMP) loads
    if command == "serve-verifier":
        from verifier_service.server import main as serve

        serve(rest)
        return 0
    if command == "serve-drafter":
        from drafter_service.server import main as serve

        serve(rest)
        return 0
    if command == "serve-openai":
        from .openai_api import main as serve_openai

        return serve_openai(rest)
    if command == "demo":
        from .demo import main as demo

        return demo(rest)
    if command in ("bench", "loadtest"):
        return _run_benchmark(command, rest)
    logging.basicConfig(level=logging.WARNING)
    return {"generate": cmd_generate, "health": cmd_health, "models": cmd_models}[command](rest)


# The benchmark commands, each by the module whose main(argv) runs it, imported by name when it runs: the
# benchmarks import the client, so an import of them from client/ would run back up the dependencies.
BENCHMARKS = {
    "bench": "benchmarks.bench",
    "bench --peer": "benchmarks.peer",
    "loadtest": "benchmarks.loadtest",
}


def _run_benchmark(command: str, rest: list[str]) -> int:
    if command == "bench" and any(a == "--peer" or a.startswith("--peer=") for a in rest):
        command = "bench --peer"  # against a peer server (llama.cpp): its own flags
    return importlib.import_module(BENCHMARKS[command]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
