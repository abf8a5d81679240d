"""Who may call a service: TLS / mutual TLS on its port and an optional bearer token in the metadata.

* **Server side** (`server_credentials`, `TokenCheck`): with ``--tls-cert``/``--tls-key`` the port speaks TLS;
  with ``--tls-client-ca`` too, a client must present a certificate signed by that CA (mutual TLS). With a
  token configured (``--auth-token-file`` or ``$SPECDEC_<ROLE>_AUTH_TOKEN``), every call but the health
  service's must carry ``authorization: Bearer <token>``, compared in constant time; a wrong or missing
  token is ``UNAUTHENTICATED`` and is never logged.
* **Client side** (`ClientSecurity`): the CA to trust, an optional client certificate for mutual TLS and the
  token to send; the same object configures the client library, the CLI and the verifier's channels to its
  drafters (which have credentials of their own).

Plaintext without a token stays the default; a service listening that way on a non-loopback address says so
in its log at start-up.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

# Calls that need no token: probes (Kubernetes, docker-compose) must reach health without credentials.
OPEN_METHODS = ("/grpc.health.v1.Health/",)

MESSAGE_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror}") from None


def read_token(token_file: str = "", env: str = "") -> str:
    """A token from ``token_file`` (surrounding whitespace stripped) or else the environment variable ``env``."""
    if token_file:
        token = _read(token_file, "token file").decode("utf-8", "replace").strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(env, "").strip() if env else ""


# -- server --------------------------------------------------------------------------------------------


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """TLS credentials for a server port (None: plaintext); ``client_ca`` turns on mutual TLS."""
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(key, "--tls-key"), _read(cert, "--tls-cert"))
    if client_ca:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=_read(client_ca, "--tls-client-ca"), require_client_auth=True
        )
    return grpc.ssl_server_credentials([pair])


@dataclass(frozen=True)
class ServerSecurity:
    """A service port's credentials: TLS pair, client CA (mutual TLS), expected bearer token."""

    cert: str = ""
    key: str = ""
    client_ca: str = ""
    token: str = field(default="", repr=False)

    @classmethod
    def from_config(cls, config, role: str) -> ServerSecurity:
        """From a service config's ``tls_*`` and ``auth_token_file`` fields, else ``$SPECDEC_<ROLE>_AUTH_TOKEN``."""
        return cls(
            cert=config.tls_cert,
            key=config.tls_key,
            client_ca=config.tls_client_ca,
            token=read_token(config.auth_token_file, f"SPECDEC_{role.upper()}_AUTH_TOKEN"),
        )

    def credentials(self) -> grpc.ServerCredentials | None:
        return server_credentials(self.cert, self.key, self.client_ca)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenCheck(self.token)] if self.token else []


class TokenCheck(grpc.ServerInterceptor):
    """Refuse calls without ``authorization: Bearer <token>`` (constant-time compare); health stays open."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(_request_or_iterator, context):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization')"
            )

        self._deny = {
            (False, False): grpc.unary_unary_rpc_method_handler(deny),
            (False, True): grpc.unary_stream_rpc_method_handler(deny),
            (True, False): grpc.stream_unary_rpc_method_handler(deny),
            (True, True): grpc.stream_stream_rpc_method_handler(deny),
        }

    def allowed(self, metadata) -> bool:
        sent = b""
        for key, value in metadata or ():
            if key == "authorization":
                sent = value.encode() if isinstance(value, str) else value
        return hmac.compare_digest(sent, self._expected)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHODS) or self.allowed(
            handler_call_details.invocation_metadata
        ):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED as usual
        return self._deny[(handler.request_streaming, handler.response_streaming)]


def is_loopback(host: str) -> bool:
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def warn_if_open(role: str, host: str, tls: bool, token: bool) -> None:
    if not is_loopback(host) and not (tls and token):
        missing = " and ".join(m for m, on in (("TLS", tls), ("a bearer token", token)) if not on)
        log.warning(
            "%s listens on %s without %s: anyone who can reach the port can use it "
            "(--tls-cert/--tls-key[/--tls-client-ca], --auth-token-file; --host 127.0.0.1 for loopback only)",
            role,
            host,
            missing,
        )


# -- client --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a service: trust ``ca`` (TLS), present ``cert``/``key`` (mutual TLS), send
    ``token``. All empty: plaintext, no token."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    token: str = field(default="", repr=False)
    server_name: str = ""  # TLS name to check instead of the address's host (ssl_target_name_override)

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    @classmethod
    def from_env(cls, prefix: str = "SPECDEC") -> ClientSecurity:
        """``$<prefix>_TLS_CA``, ``_TLS_CERT``, ``_TLS_KEY``, ``_TLS_SERVER_NAME``, and the token from
        ``$<prefix>_TOKEN_FILE`` or ``$<prefix>_TOKEN``."""
        env = os.environ.get
        return cls(
            ca=env(f"{prefix}_TLS_CA", ""),
            cert=env(f"{prefix}_TLS_CERT", ""),
            key=env(f"{prefix}_TLS_KEY", ""),
            token=read_token(env(f"{prefix}_TOKEN_FILE", ""), f"{prefix}_TOKEN"),
            server_name=env(f"{prefix}_TLS_SERVER_NAME", ""),
        )

    def channel(self, address: str, extra_options: tuple[tuple[str, object], ...] = ()) -> grpc.Channel:
        """A channel to ``address`` with these credentials and the services' message limits."""
        # a channel of its own subchannels: a new client does not inherit the reconnect backoff of another
        # channel's connection to the same address (a server restarted on a reused port looked down)
        options: list[tuple[str, object]] = [
            *MESSAGE_OPTIONS,
            ("grpc.use_local_subchannel_pool", 1),
            *extra_options,
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        if self.tls:
            if bool(self.cert) != bool(self.key):
                raise ValueError("a client certificate needs both its certificate and its key")
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(self.ca, "TLS CA") if self.ca else None,
                private_key=_read(self.key, "TLS key") if self.key else None,
                certificate_chain=_read(self.cert, "TLS certificate") if self.cert else None,
            )
            ch = grpc.secure_channel(address, creds, options=options)
        else:
            ch = grpc.insecure_channel(address, options=options)
        if self.token:
            ch = grpc.intercept_channel(ch, _BearerToken(self.token))
        return ch


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (works on plaintext loopback channels too,
    unlike gRPC's call credentials)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: list
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None
