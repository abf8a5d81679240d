"""gRPC servicer of the drafter and its entry point (``specdec serve-drafter``)."""

from __future__ import annotations

import logging

from specdec import convert, validate
from specdec.config import DrafterConfig
from specdec.rpc import make_server, map_errors, run_service
from specdec.security import ServerSecurity
from specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec_core.drafting import ModelDrafter

from .sessions import DrafterEngine

log = logging.getLogger(__name__)


class DrafterServicer(pb_grpc.DrafterServicer):
    """Thin: decode the stream's messages, call the session's drafter, encode blocks."""

    def __init__(self, engine: DrafterEngine) -> None:
        self.engine = engine

    @map_errors
    def Draft(self, request_iterator, context):
        drafter = self.engine.open_session()
        context.add_callback(drafter.cancel)  # the verifier went away: drop its rows at the next iteration
        request_id = ""
        try:
            for req in request_iterator:
                validate.check_draft_request(req, self.engine.limits)
                if req.HasField("start"):
                    request_id = req.start.request_id
                    if req.start.max_support:
                        drafter.max_support = min(req.start.max_support, self.engine.config.max_support)
                    if isinstance(drafter, ModelDrafter):  # prefixes shared within the verifier's salt only
                        drafter.cache_salt = req.start.cache_salt
                    drafter.start(list(req.start.context), convert.sampling_from_pb(req.start.sampling))
                    log.info(
                        "[%s] draft session started, context %d tokens", request_id, len(req.start.context)
                    )
                    continue
                if not drafter.context:
                    raise ValueError("a Draft stream must begin with a start message")
                step = req.step
                if step.has_verdict:
                    if step.num_accepted > drafter.pending:
                        raise ValueError(
                            f"step.num_accepted: {step.num_accepted} of a block of {drafter.pending} tokens"
                        )
                    drafter.accept(step.num_accepted, step.next_token)
                drafter.extend(list(step.committed))
                block = drafter.propose(step.num_draft_tokens, convert.early_stop_from_pb(step))
                log.debug("[%s] drafted %d tokens in %.4fs", request_id, len(block.tokens), block.draft_s)
                self.engine.metrics.drafted(len(block.tokens))
                yield convert.block_to_pb(block)
        finally:
            self.engine.close_session(drafter)
            log.info("[%s] draft session closed", request_id)

    @map_errors
    def Info(self, request, context):
        if self.engine.runner is None:  # prompt lookup: no model
            return convert.lookup_info_to_pb(
                self.engine.config.model_name or "ngram", self.engine.active_sessions
            )
        return convert.info_to_pb(
            self.engine.config.model,
            self.engine.runner,
            self.engine.tokenizer,
            self.engine.fingerprint,
            request.include_vocab,
        )


def start(config: DrafterConfig, engine: DrafterEngine | None = None):
    """Start a drafter server (port 0 picks a free port); returns (server, port, health servicer)."""
    engine = engine or DrafterEngine(config)
    if config.metrics_port:
        engine.metrics.serve(config.metrics_port, config.metrics_host)
    return make_server(
        config.port,
        [lambda s: pb_grpc.add_DrafterServicer_to_server(DrafterServicer(engine), s)],
        ["specdec.v1.Drafter"],
        max_workers=config.max_sessions + 4,
        host=config.host,
        security=ServerSecurity.from_config(config, "drafter"),
        role="drafter",
        options=connection_age(config.max_connection_age_s),
    )


def connection_age(seconds: float) -> tuple[tuple[str, object], ...]:
    """Server options that close each connection after ``seconds`` (GOAWAY: no new streams on it), leaving
    the streams in flight an hour to finish (a Draft stream lives as long as its generation)."""
    if seconds <= 0:
        return ()
    return (
        ("grpc.max_connection_age_ms", int(seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", 3_600_000),
    )


def main(argv: list[str] | None = None) -> None:
    run_service(argv, "drafter", "Serve a drafter model over gRPC.", DrafterConfig, start)


if __name__ == "__main__":
    main()
