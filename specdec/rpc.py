"""gRPC plumbing shared by the two services: error mapping, server start with health, graceful stop."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specdec import logs
from specdec.config import add_config_args, config_from_args
from specdec.security import MESSAGE_OPTIONS, ClientSecurity, ServerSecurity, warn_if_open
from specdec_core.errors import GenerationCancelled, QueueFull
from specdec_core.models import ModelError, TokenizerMismatch

log = logging.getLogger(__name__)


class SessionNotFound(KeyError):
    """A session id the server does not hold (expired, evicted, or the server restarted)."""


class LimitExceeded(RuntimeError):
    """A configured capacity (sessions, tokens) is full."""


class PermissionDenied(RuntimeError):
    """The caller may not do this with the service's configuration (the message names the flag)."""


class DependencyUnavailable(RuntimeError):
    """A service this one needs (e.g. the drafter) cannot be reached."""


# One table from exception type to status code, used by every servicer method.
STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (GenerationCancelled, grpc.StatusCode.CANCELLED),
    (DependencyUnavailable, grpc.StatusCode.UNAVAILABLE),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (TokenizerMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelError, grpc.StatusCode.FAILED_PRECONDITION),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    for exc_type, code in STATUS_OF:
        if isinstance(exc, exc_type):
            context.abort(code, str(exc))
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def map_errors(method: Callable) -> Callable:
    """Decorate a unary or server-streaming servicer method so exceptions become status codes."""
    if _is_generator(method):

        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status code
                if context.is_active() or not isinstance(exc, grpc.RpcError):
                    _abort(context, exc)

        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            _abort(context, exc)

    return unary


def _is_generator(fn: Callable) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)


class _Malformed:
    """A request whose bytes did not parse (invalid UTF-8 in a string field, truncated message)."""

    def __init__(self, error: BaseException) -> None:
        self.reason = str(error) or type(error).__name__


class MalformedRequests(grpc.ServerInterceptor):
    """Messages that do not parse answer ``INVALID_ARGUMENT`` naming the method, instead of gRPC's
    ``INTERNAL`` "Exception deserializing request!"; inside a stream they end it the same way."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        parse = handler.request_deserializer

        def safe_parse(data):
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001 - reported to the caller below
                return _Malformed(exc)

        def refuse(context, bad: _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request to {method}: {bad.reason}")

        def checked(requests):
            for request in requests:
                if isinstance(request, _Malformed):
                    raise ValueError(f"malformed message in the stream to {method}: {request.reason}")
                yield request

        if handler.unary_unary or handler.unary_stream:
            kind = "unary_unary" if handler.unary_unary else "unary_stream"
            behaviour = getattr(handler, kind)

            def unary(request, context):
                if isinstance(request, _Malformed):
                    refuse(context, request)
                return behaviour(request, context)

            return handler._replace(request_deserializer=safe_parse, **{kind: unary})
        kind = "stream_unary" if handler.stream_unary else "stream_stream"
        behaviour = getattr(handler, kind)
        return handler._replace(
            request_deserializer=safe_parse,
            **{kind: lambda requests, context: behaviour(checked(requests), context)},
        )


def make_server(
    port: int,
    register: Iterable[Callable[[grpc.Server], None]],
    service_names: Iterable[str],
    max_workers: int = 16,
    host: str = "[::]",
    security: ServerSecurity | None = None,
    role: str = "service",
    options: tuple[tuple[str, object], ...] = (),
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build a started server with the standard health service reporting SERVING; return (server, port, health).
    ``security``: TLS / mutual TLS on the port and a bearer-token check on every call but health's."""
    security = security or ServerSecurity()
    credentials = security.credentials()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[*security.interceptors(), MalformedRequests()],
        options=[*MESSAGE_OPTIONS, *options],
    )
    for add in register:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # the standard reflection service: grpcurl and other tools list and call the rpcs without the protos
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"cannot bind port {port}")
    warn_if_open(role, host, credentials is not None, bool(security.token))
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def serve_until_signal(server: grpc.Server, health_servicer: health.HealthServicer, grace_s: float) -> None:
    """Block until SIGTERM/SIGINT, then stop gracefully: NOT_SERVING, refuse new rpcs, drain within grace_s."""
    done = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: shutting down (grace %.1fs)", signum, grace_s)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace_s).wait()
    log.info("stopped")


def channel(address: str, security: ClientSecurity | None = None) -> grpc.Channel:
    """A channel with the message limits the services use (plaintext unless ``security`` says otherwise)."""
    return (security or ClientSecurity()).channel(address)


def run_service(
    argv: list[str] | None, role: str, description: str, config_cls: type, start: Callable
) -> None:
    """Entry point shared by both services: config from flags/env, logging, start, serve until a signal."""
    parser = argparse.ArgumentParser(f"specdec serve-{role}", description=description)
    add_config_args(parser, config_cls, role.upper())
    config = config_from_args(config_cls, parser.parse_args(argv))
    logs.configure(role, config.log_level, config.log_format)
    server, port, health_servicer = start(config)
    extra = (
        f", drafters {', '.join(config.drafters) or 'none configured'}" if hasattr(config, "drafters") else ""
    )
    import os

    import torch

    log.info(
        "%s %s serving on port %d (%s, %d threads, OpenMP wait policy %s, spin count %s)%s",
        role,
        config.model,
        port,
        config.device,
        torch.get_num_threads(),
        os.environ.get("OMP_WAIT_POLICY", "default"),
        os.environ.get("GOMP_SPINCOUNT", "default"),
        extra,
    )
    serve_until_signal(server, health_servicer, config.grace_s)
