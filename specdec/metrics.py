"""Prometheus metrics of a service, on ``/metrics`` of its own HTTP port (``--metrics-port``).

Names follow vLLM's where one exists, so dashboards built for vLLM work unchanged (same metric, same
``model_name`` label, same histogram buckets): the speculative-decoding counters, requests running and
waiting, time to first token, inter-token latency, end-to-end latency, prompt and generation tokens,
finished requests by reason. specdec's own are ``specdec_*``: generations that went on without their
drafter, drafter round trips, sessions and KV tokens held, rows per forward, the draft length chosen.

Counters of a generation's speculation are added when it finishes (its stats are final then); tokens,
first-token and inter-token times as they stream. An inter-token observation is made per streamed piece
(a verify round can emit several tokens at once), as vLLM does per engine iteration.

Each service has its own registry (several services can live in one process, as in the tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0)
TTFT_BUCKETS += (2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
ITL_BUCKETS += (5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS: tuple[float, ...] = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
E2E_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ROUND_TRIP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
ROWS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
LENGTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)


class ServiceMetrics:
    """The metrics of one service (``role``: verifier or drafter), all labelled ``model_name``."""

    def __init__(self, role: str, model_name: str) -> None:
        self.role, self.model_name = role, model_name
        self.registry = CollectorRegistry()
        r, label = self.registry, ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests decoding now.", label, registry=r)
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be admitted.", label, registry=r
        )
        self.sessions = Gauge(
            "specdec_sessions", "Sequences holding KV cache on this service.", label, registry=r
        )
        self.kv_tokens = Gauge(
            "specdec_kv_tokens", "Tokens held in this service's KV caches.", label, registry=r
        )
        self.rows = Histogram(
            "specdec_batch_rows",
            "Rows (sequences) per model forward.",
            label,
            buckets=ROWS_BUCKETS,
            registry=r,
        )
        self.forward_tokens = Counter(
            "specdec_forward_tokens", "Token positions fed to the model.", label, registry=r
        )
        self.forwards = Counter("specdec_forwards", "Model forwards run.", label, registry=r)
        if role == "verifier":
            self._verifier_metrics(r, label)
        else:
            self.drafted_tokens = Counter(
                "specdec_drafter_tokens", "Tokens drafted by this drafter.", label, registry=r
            )
            self.draft_steps = Counter(
                "specdec_drafter_blocks", "Draft blocks this drafter returned.", label, registry=r
            )

    def _verifier_metrics(self, r: CollectorRegistry, label: list[str]) -> None:
        self.num_drafts = Counter(
            "vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", label, registry=r
        )
        self.num_draft_tokens = Counter(
            "vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", label, registry=r
        )
        self.num_accepted_tokens = Counter(
            "vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", label, registry=r
        )
        self.accepted_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.",
            [*label, "position"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", label, registry=r
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", label, registry=r
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*label, "finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", label,
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", label,
            buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", label,
            buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "specdec_fallbacks",
            "Generations that lost their drafter and went on with the target alone for a while.",
            label,
            registry=r,
        )
        self.plain_rounds = Counter(
            "specdec_plain_rounds", "Rounds decoded without drafting (k = 0).", label, registry=r
        )
        self.round_trip = Histogram(
            "specdec_drafter_round_trip_seconds", "Drafter round trip of a drafted round (drafting + network).",
            label, buckets=ROUND_TRIP_BUCKETS, registry=r,
        )  # fmt: skip
        self.draft_length = Histogram(
            "specdec_draft_length", "Draft length chosen per round (0: plain decoding).", label,
            buckets=LENGTH_BUCKETS, registry=r,
        )  # fmt: skip

    # -- wiring ------------------------------------------------------------------------------------------
    def track(
        self,
        running: Callable[[], float] | None = None,
        waiting: Callable[[], float] | None = None,
        sessions: Callable[[], float] | None = None,
        kv_tokens: Callable[[], float] | None = None,
    ) -> None:
        """Gauges read at scrape time."""
        for gauge, fn in (
            (self.running, running),
            (self.waiting, waiting),
            (self.sessions, sessions),
            (self.kv_tokens, kv_tokens),
        ):
            if fn is not None:
                gauge.labels(self.model_name).set_function(fn)

    def track_prefix_cache(self, cache) -> None:
        """vLLM's prefix-cache counters, in tokens (looked up, found), and the tokens the cache holds, read
        from ``cache`` (``runtime/prefix_cache.PrefixCache``) at scrape time."""
        self.registry.register(_PrefixCacheCollector(self.model_name, cache))

    def drafted(self, tokens: int) -> None:
        """The drafter returned a block of ``tokens`` tokens."""
        self.draft_steps.labels(self.model_name).inc()
        self.drafted_tokens.labels(self.model_name).inc(tokens)

    def on_forward(self, row_tokens: Sequence[int], seconds: float) -> None:
        """A model forward ran (the scheduler's hook, on the compute thread)."""
        self.rows.labels(self.model_name).observe(len(row_tokens))
        self.forwards.labels(self.model_name).inc()
        self.forward_tokens.labels(self.model_name).inc(sum(row_tokens))

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``host:port`` (port 0: a free one); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = server.server_address[1]
        log.info("%s metrics on http://%s:%d/metrics", self.role, host, bound)
        return int(bound)

    # -- a generation (verifier) -------------------------------------------------------------------------
    def generation(self, prompt_tokens: int) -> GenerationMetrics:
        return GenerationMetrics(self, prompt_tokens)


class GenerationMetrics:
    """One generation's observations: tokens as they stream, speculation counters when it ends."""

    def __init__(self, metrics: ServiceMetrics, prompt_tokens: int) -> None:
        self.m, self.name = metrics, metrics.model_name
        self.start = self.last = time.perf_counter()
        self.first = True
        metrics.prompt_tokens.labels(self.name).inc(prompt_tokens)

    def tokens(self, n: int) -> None:
        """``n`` tokens streamed now."""
        now = time.perf_counter()
        if self.first:
            self.m.ttft.labels(self.name).observe(now - self.start)
            self.first = False
        elif n:
            self.m.itl.labels(self.name).observe(now - self.last)
        self.last = now
        self.m.generation_tokens.labels(self.name).inc(n)

    def finished(self, stats, reason: str) -> None:
        """The generation ended (``stats``: its ``GenerationStats``; ``reason``: length, eos or stop)."""
        m, name = self.m, self.name
        m.e2e.labels(name).observe(time.perf_counter() - self.start)
        m.request_success.labels(name, reason).inc()
        m.num_drafts.labels(name).inc(stats.rounds - stats.plain_rounds)
        m.num_draft_tokens.labels(name).inc(stats.drafted)
        m.num_accepted_tokens.labels(name).inc(stats.accepted)
        for position, accepted in enumerate(stats.accepted_per_position):
            if accepted:
                m.accepted_per_pos.labels(name, str(position)).inc(accepted)
        m.plain_rounds.labels(name).inc(stats.plain_rounds)
        m.fallbacks.labels(name).inc(int(stats.drafter_failures > 0))
        for k in stats.draft_lengths:
            m.draft_length.labels(name).observe(k)
        for seconds in stats.round_trips:
            m.round_trip.labels(name).observe(seconds)


class _PrefixCacheCollector:
    """The prefix cache's own counters as Prometheus metrics (it counts; the collector reads)."""

    def __init__(self, model_name: str, cache) -> None:
        self.model_name, self.cache = model_name, cache

    def collect(self):
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", self.cache.queries),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", self.cache.hits),
        ):
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([self.model_name], value)
            yield counter
        held = GaugeMetricFamily(
            "specdec_prefix_cache_tokens", "Tokens the prefix cache holds.", labels=["model_name"]
        )
        held.add_metric([self.model_name], self.cache.tokens)
        yield held
