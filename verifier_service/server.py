"""gRPC servicers of the verifier (Generation + Verifier) and its entry point (``specdec serve-verifier``)."""

from __future__ import annotations

import logging

from specdec import convert, validate
from specdec.config import VerifierConfig
from specdec.rpc import make_server, map_errors, run_service
from specdec.security import ServerSecurity
from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc
from specdec_core.runtime.admission import Cancellation

from .generation import GenerateArgs
from .verifier import VerifierEngine

log = logging.getLogger(__name__)


def generate_args_from_pb(req: pb.GenerateRequest) -> GenerateArgs:
    return GenerateArgs(
        prompt_text=req.text if req.WhichOneof("prompt") == "text" else None,
        prompt_ids=list(req.token_ids.ids) if req.WhichOneof("prompt") == "token_ids" else None,
        messages=tuple((m.role, m.content) for m in req.messages.messages)
        if req.WhichOneof("prompt") == "messages"
        else (),
        chat=req.chat,
        params=convert.sampling_from_pb(req.sampling),
        max_new_tokens=req.stop.max_new_tokens,
        stop_strings=tuple(req.stop.stop),
        ignore_eos=req.stop.ignore_eos,
        num_draft_tokens=req.num_draft_tokens,
        adaptive=req.adaptive_draft,
        no_draft=req.no_draft,
        drafter=req.drafter,
        request_id=req.request_id,
        tenant=req.tenant,
    )


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine: VerifierEngine) -> None:
        self.engine = engine

    @map_errors
    def Generate(self, request, context):
        cancel = Cancellation()
        validate.check_generate(request, self.engine.limits)
        context.add_callback(cancel.cancel)  # the client went away: free its rows at the next iteration
        for event in self.engine.generate(generate_args_from_pb(request), cancel):
            if not context.is_active():
                return  # the client went away: stop generating
            yield pb.GenerateResponse(
                token_ids=event.token_ids,
                text=event.text,
                finish_reason=event.finish_reason or "",
                stats=convert.stats_to_pb(event.stats) if event.stats else None,
                prompt_token_ids=event.prompt_ids,
            )


class VerifierServicer(pb_grpc.VerifierServicer):
    def __init__(self, engine: VerifierEngine) -> None:
        self.engine = engine

    @map_errors
    def Verify(self, request, context):
        validate.check_verify(request, self.engine.limits)
        verdict, logprobs, length = self.engine.verify(
            request.session_id,
            list(request.tokens),
            request.reset,
            convert.sampling_from_pb(request.sampling),
            convert.block_from_pb(request),
            request.return_logprobs,
        )
        return pb.VerifyResponse(
            num_accepted=verdict.num_accepted,
            next_token=verdict.next_token,
            logprobs=logprobs or [],
            context_length=length,
        )

    @map_errors
    def CloseSession(self, request, context):
        self.engine.close_session(request.session_id)
        return pb.CloseSessionResponse()

    @map_errors
    def Info(self, request, context):
        e = self.engine
        info = convert.info_to_pb(e.config.model, e.runner, e.tokenizer, e.fingerprint, request.include_vocab)
        info.sessions, info.running, info.waiting = len(e.sessions), e.admission.running, e.admission.waiting
        return info


def start(config: VerifierConfig, engine: VerifierEngine | None = None):
    """Start a verifier server (port 0 picks a free port); returns (server, port, health servicer)."""
    engine = engine or VerifierEngine(config)
    if config.metrics_port:
        engine.metrics.serve(config.metrics_port, config.metrics_host)
    return make_server(
        config.port,
        [
            lambda s: pb_grpc.add_GenerationServicer_to_server(GenerationServicer(engine), s),
            lambda s: pb_grpc.add_VerifierServicer_to_server(VerifierServicer(engine), s),
        ],
        ["specdec.v1.Generation", "specdec.v1.Verifier"],
        # a handler thread per running, queued or session-based call, and a few for health and Info
        max_workers=config.max_running + config.max_waiting + config.max_sessions + 8,
        host=config.host,
        security=ServerSecurity.from_config(config, "verifier"),
        role="verifier",
    )


def main(argv: list[str] | None = None) -> None:
    run_service(argv, "verifier", "Serve a target model over gRPC.", VerifierConfig, start)


if __name__ == "__main__":
    main()
