"""The verifier's drafters: which one a generation gets (an address of the allow-list, the configured ones
in turn, or prompt lookup / hybrid drafting in this process), one channel per address, health checks, and
the pairing each remote drafter passes once (the same tokenizer; whether it shares this process's compute).
"""

from __future__ import annotations

import json
import logging
import threading

import grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub

from specdec import placement, validate
from specdec.config import VerifierConfig
from specdec.rpc import DependencyUnavailable, PermissionDenied
from specdec.security import ClientSecurity, read_token
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec_core.drafting import Drafter
from specdec_core.hybrid import HybridDrafter
from specdec_core.models import TokenizerMismatch, first_vocab_difference, vocab_by_id
from specdec_core.ngram import NGRAM, NgramDrafter
from specdec_core.suffix_index import SuffixIndex

from .remote_drafter import RemoteDrafter

log = logging.getLogger(__name__)

HYBRID = "hybrid"
IN_PROCESS = (NGRAM, HYBRID)  # drafter names served inside the verifier (specdec_core/ngram.py, hybrid.py)
ROUND_ROBIN = (("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),)


def drafter_name(drafter: Drafter | None) -> str:
    """A drafter as logs and the length memory name it: an address, "ngram", "hybrid+<address>", or ""."""
    if isinstance(drafter, RemoteDrafter):
        return drafter.addresses[0]
    if isinstance(drafter, HybridDrafter):
        return f"{HYBRID}+{drafter_name(drafter.model)}"
    return NGRAM if isinstance(drafter, NgramDrafter) else ""


class DrafterPool:
    """The drafters of one verifier, each generation's drafter built from them.

    ``tokenizer`` / ``fingerprint``: the target's, which a remote drafter's must equal; ``device``: the
    target's, to tell whether a drafter competes for the same compute; ``limits``: what a drafted block
    may hold.
    """

    def __init__(
        self,
        config: VerifierConfig,
        tokenizer,
        fingerprint: str,
        device: str,
        limits: validate.Limits,
        shared: SuffixIndex | None = None,
    ) -> None:
        self.shared = shared  # earlier generations' texts, for the in-process lookups
        self.config = config
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.device = device
        self.limits = limits
        self._security = ClientSecurity(
            ca=config.drafter_tls_ca,
            cert=config.drafter_tls_cert,
            key=config.drafter_tls_key,
            token=read_token(config.drafter_token_file, "SPECDEC_VERIFIER_DRAFTER_TOKEN"),
            server_name=config.drafter_tls_server_name,
        )
        self._channels: dict[str, grpc.Channel] = {}
        self._paired: dict[str, bool] = {}  # drafter address -> shares this process's compute
        self._sources: dict[str, str] = {}  # drafter address -> what it drafts with (its Info)
        self._caching: dict[str, bool] = {}  # drafter address -> it keeps a prefix cache (its Info)
        self._lock = threading.Lock()
        self._next_drafter = 0

    def for_request(self, name: str, request_id: str) -> Drafter | None:
        """The drafter a request asks for: an address, "ngram" or "hybrid" (in this process), or, when it
        names none, the service's default (the first of ``--drafter``, which may be one of those names)."""
        if not name and self.config.drafters and self.config.drafters[0] in IN_PROCESS:
            name = self.config.drafters[0]
        lookup = lambda: NgramDrafter(self.config.ngram_min, self.config.ngram_max, self.shared)  # noqa: E731
        if name == NGRAM:
            return lookup()
        if name == HYBRID:
            model = self._remote("", request_id)  # None without a configured model drafter
            if model is None:
                log.warning("[%s] hybrid drafting without a model drafter: prompt lookup only", request_id)
                return lookup()
            return HybridDrafter(model, lookup())
        return self._remote(name, request_id)

    def overlap_prefill(self, drafter: Drafter | None) -> bool:
        """Start the drafter's prefill with the target's unless it would take the target's cores (in-process
        drafters start for free)."""
        if not isinstance(drafter, RemoteDrafter):
            return True
        if self.config.overlap_prefill in ("on", "true", "1", "yes"):
            return True
        if self.config.overlap_prefill in ("off", "false", "0", "no"):
            return False
        return not self._paired.get(drafter.addresses[0], False)

    def _remote(self, address: str, request_id: str) -> RemoteDrafter | None:
        """A stream to ``address`` (or, given "", to the configured drafters in turn) that passed pairing."""
        if address and address not in self.config.drafters and not self.config.allow_any_drafter:
            # a request must not make this service dial an address of its choosing
            raise PermissionDenied(
                f"drafter {address!r} is not one of this verifier's drafters "
                f"({', '.join(self.config.drafters) or 'none configured'}); "
                "start it with --allow-any-drafter to let requests choose any address"
            )
        addresses = [address] if address else self._rotated_defaults()
        if not addresses:
            return None
        usable = []
        for addr in addresses:
            try:
                self._check_pair(addr)
                usable.append(addr)
            except DependencyUnavailable as exc:
                log.warning("[%s] %s", request_id, exc)
        if not usable:
            log.warning("[%s] no drafter reachable, decoding with the target alone", request_id)
            return None
        return RemoteDrafter(
            usable,
            self._stub,
            request_id=request_id,
            step_timeout_s=self.config.drafter_timeout_s,
            start_timeout_s=self.config.drafter_start_timeout_s,
            limits=self.limits,
            healthy=self._healthy,
            source=self._sources.get(usable[0], "model"),
            caches_prefixes=self._caching.get(usable[0], False),
        )

    def _rotated_defaults(self) -> list[str]:
        drafters = [d for d in self.config.drafters if d not in IN_PROCESS]
        if not drafters:
            return []
        with self._lock:  # spread generations over the configured drafters
            i = self._next_drafter % len(drafters)
            self._next_drafter += 1
        return drafters[i:] + drafters[:i]

    def _channel(self, address: str) -> grpc.Channel:
        """One channel per drafter address. A ``dns:///name:port`` address (a Kubernetes headless Service)
        resolves to every drafter behind the name: its streams go round robin across them, and gRPC
        re-resolves the name when a connection drops (drafters recycle theirs every few minutes, see
        ``DrafterConfig.max_connection_age_s``, so new pods are picked up too)."""
        with self._lock:
            if address not in self._channels:
                options = ROUND_ROBIN if address.split(":", 1)[0] in ("dns", "ipv4", "ipv6") else ()
                self._channels[address] = self._security.channel(address, options)
            return self._channels[address]

    def _stub(self, address: str) -> pb_grpc.DrafterStub:
        return pb_grpc.DrafterStub(self._channel(address))

    def _healthy(self, address: str) -> bool:
        try:
            status = HealthStub(self._channel(address)).Check(HealthCheckRequest(), timeout=1.0).status
        except grpc.RpcError:
            return False
        return status == HealthCheckResponse.SERVING

    def _check_pair(self, address: str) -> None:
        """Refuse a drafter whose tokenizer differs from ours (checked once per address); note whether it
        shares this process's compute (same host, device type and CPU cores)."""
        if address in self._paired:
            return
        stub = self._stub(address)
        try:
            info = stub.Info(pb.InfoRequest(), timeout=10)
            # prompt lookup copies token ids of the text it is sent: there is no vocabulary to compare
            if info.drafter_source != NGRAM and info.vocab_fingerprint != self.fingerprint:
                full = stub.Info(pb.InfoRequest(include_vocab=True), timeout=30)
                diff = first_vocab_difference(list(full.vocab), vocab_by_id(self.tokenizer))
                raise TokenizerMismatch(
                    diff or f"drafter at {address} has a different vocabulary fingerprint"
                )
        except grpc.RpcError as exc:
            raise DependencyUnavailable(
                f"drafter {address} unreachable or refused: {exc.code().name}"
            ) from exc
        mine = (placement.host_id(), self.device, placement.cpus())
        shared = placement.shares_compute(mine, (info.host_id, info.device, info.cpus))
        source = info.drafter_source or "model"
        log.info(
            "drafter %s paired (%s, %s)",
            address,
            source,
            "shares this host's compute" if shared else "own compute",
        )
        self._sources[address] = source
        self._caching[address] = info.prefix_cache_tokens > 0
        self._paired[address] = shared
