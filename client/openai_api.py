"""An OpenAI-compatible HTTP API in front of a verifier: ``specdec serve-openai --verifier HOST:PORT``.

``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``, streamed as server-sent
events with ``stream: true`` (``data: {...}`` chunks, then ``data: [DONE]``), with ``usage``, ``stop``,
``max_tokens`` (``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, and errors in OpenAI's
JSON shape (``{"error": {"message", "type", "param", "code"}}``). Each request is one Generate rpc of
the verifier (which drives its drafters): this process holds no model and imports no torch. Extra body
fields as vLLM takes them: ``top_k``, ``ignore_eos``, and specdec's ``num_draft_tokens``, ``no_draft``.

Chat messages go to the verifier as a conversation, rendered there by the model's chat template. Not
supported (answered 400, not ignored): ``n`` > 1, ``logprobs``, ``echo``, ``best_of``, tools, images.
Defaults follow OpenAI's: temperature 1, top_p 1, max_tokens 16 for completions and the verifier's
budget for chat.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
from fastapi import FastAPI, Request  # the `openai` extra (FastAPI resolves the route annotations here)
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from .client import SpecDecClient, SpecDecError

log = logging.getLogger(__name__)

# gRPC status -> (HTTP status, OpenAI error type)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
_FINISH = {"length": "length", "eos": "stop", "stop": "stop"}


class APIError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        }

    @classmethod
    def from_rpc(cls, exc: SpecDecError) -> APIError:
        status, kind = _HTTP.get(exc.code(), (500, "internal_error"))
        details = exc.details()
        param = details.split(":", 1)[0] if status == 400 and ":" in details else None
        return cls(status, details, kind, param)


def _number(body: dict, name: str, default, cast, low=None, high=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(400, f"{name} must be a number", param=name)
    value = cast(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise APIError(400, f"{name} must be in [{low}, {high}], got {value}", param=name)
    return value


def generation_kwargs(body: dict, chat: bool, default_max_tokens: int | None) -> dict[str, Any]:
    """The Generate parameters of an OpenAI request body (400 for what is malformed or unsupported)."""
    for name in ("logprobs", "top_logprobs", "echo", "best_of", "tools", "functions", "suffix"):
        if body.get(name) not in (None, False, 0, [], "") and not (name == "best_of" and body[name] == 1):
            raise APIError(400, f"{name} is not supported by specdec", param=name)
    if _number(body, "n", 1, int, 1) != 1:
        raise APIError(400, "n > 1 is not supported by specdec", param="n")
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens", default_max_tokens)
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, int, 1)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or a list of strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise APIError(400, "seed must be an integer >= 0", param="seed")
    user = body.get("user") or ""  # OpenAI's end-user id: the tenant whose cached prefixes it may reuse
    if not isinstance(user, str) or len(user) > 128:
        raise APIError(400, "user must be a string of at most 128 characters", param="user")
    return {
        "max_new_tokens": max_tokens or 0,  # 0: the verifier's default budget
        "temperature": _number(body, "temperature", 1.0, float, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, float, 0.0, 1.0) or 1.0,
        "top_k": max(_number(body, "top_k", 0, int), 0),  # vLLM's -1 means off, as 0 here
        "seed": seed,
        "stop": tuple(s for s in stop if s),
        "ignore_eos": bool(body.get("ignore_eos", False)),
        "num_draft_tokens": _number(body, "num_draft_tokens", 0, int, 0),
        "no_draft": bool(body.get("no_draft", False)),
        "tenant": user,
    }


def chat_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role", param=f"messages[{i}]")
        content = m.get("content") or ""
        if isinstance(content, list):  # content parts: text only
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise APIError(400, "only text content parts are supported", param=f"messages[{i}].content")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def completion_prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    raise APIError(400, "prompt must be a non-empty string or list of token ids (one prompt)", param="prompt")


class OpenAIFrontend:
    """The routes' logic, independent of the ASGI app (one gRPC channel, shared by all requests)."""

    def __init__(self, verifier: str, drafter: str = "", model_name: str = "", security=None) -> None:
        self.client = SpecDecClient(verifier, drafter, security=security)
        self._model_name = model_name
        self._lock = threading.Lock()
        self.created = int(time.time())

    def model_name(self) -> str:
        with self._lock:
            if not self._model_name:
                from specdec.v1 import specdec_pb2 as pb
                from specdec.v1 import specdec_pb2_grpc as pb_grpc

                try:
                    info = pb_grpc.VerifierStub(self.client._channel).Info(pb.InfoRequest(), timeout=10)
                except grpc.RpcError as exc:
                    raise APIError.from_rpc(SpecDecError.from_rpc(exc)) from None
                self._model_name = info.model
            return self._model_name

    def verifier_status(self) -> str:
        """The verifier's grpc.health.v1 status on the frontend's channel (an rpc status name if it fails)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self.client._channel).Check(
                health_pb2.HealthCheckRequest(), timeout=3
            )
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def check_model(self, body: dict) -> str:
        name = self.model_name()
        asked = body.get("model")
        if asked not in (None, "", name):
            raise APIError(404, f"The model `{asked}` does not exist.", "not_found_error", "model")
        return name

    def models(self) -> dict:
        name = self.model_name()
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": self.created, "owned_by": "specdec"}],
        }

    def run(self, prompt, kwargs: dict) -> dict:
        try:
            r = self.client.generate(prompt, **kwargs)
        except SpecDecError as exc:
            raise APIError.from_rpc(exc) from None
        return {"text": r.text, "finish": _FINISH.get(r.finish_reason, r.finish_reason), "stats": r.stats,
                "prompt_tokens": len(r.prompt_token_ids), "completion_tokens": len(r.token_ids)}  # fmt: skip

    def completion(self, body: dict) -> dict:
        model = self.check_model(body)
        kwargs = generation_kwargs(body, chat=False, default_max_tokens=16)
        out = self.run(completion_prompt(body), kwargs)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": out["text"], "logprobs": None, "finish_reason": out["finish"]}],
            "usage": _usage(out["prompt_tokens"], out["completion_tokens"], out["stats"]),
        }

    def chat(self, body: dict) -> dict:
        model = self.check_model(body)
        kwargs = generation_kwargs(body, chat=True, default_max_tokens=None)
        out = self.run(chat_messages(body), kwargs)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": out["text"]},
                    "logprobs": None,
                    "finish_reason": out["finish"],
                }
            ],
            "usage": _usage(out["prompt_tokens"], out["completion_tokens"], out["stats"]),
        }

    def stream(self, body: dict, chat: bool) -> Iterator[str]:
        """Server-sent events of a streamed request (validated before the first byte is sent)."""
        model = self.check_model(body)
        kwargs = generation_kwargs(body, chat=chat, default_max_tokens=None if chat else 16)
        prompt = chat_messages(body) if chat else completion_prompt(body)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        pieces = self.client.stream(prompt, **kwargs)
        try:
            first = next(pieces)  # errors before any output become an HTTP error, not an event
        except SpecDecError as exc:
            raise APIError.from_rpc(exc) from None
        except StopIteration:
            first = None
        return self._events(model, chat, first, pieces, include_usage)

    def _events(self, model, chat, first, pieces, include_usage) -> Iterator[str]:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
        prompt_tokens = len(first.prompt_token_ids) if first else 0
        completion_tokens, stats = 0, None

        def event(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta: dict = {"role": "assistant", "content": ""} if role else {}
                if text:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            chunk = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
            if include_usage:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk)}\n\n"

        try:
            if chat:
                yield event(None, None, role=True)
            piece = first
            rest = iter(pieces)
            while piece is not None:
                completion_tokens += len(piece.token_ids)
                stats = piece.stats or stats
                finish = _FINISH.get(piece.finish_reason or "", piece.finish_reason)
                if piece.text or finish:
                    yield event(piece.text, finish)
                piece = next(rest, None)
        except SpecDecError as exc:  # mid-stream: an error event, as OpenAI-compatible servers send
            yield f"data: {json.dumps(APIError.from_rpc(exc).body())}\n\n"
        finally:
            pieces.close()  # a client gone mid-stream: cancel the generation on the verifier
        if include_usage:
            usage = {"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                     "usage": _usage(prompt_tokens, completion_tokens, stats)}  # fmt: skip
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, stats: dict | None = None) -> dict:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens``: prompt tokens the prefix cache held."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": int((stats or {}).get("cached_tokens", 0))},
    }


def create_app(frontend: OpenAIFrontend, api_key: str = ""):
    """The ASGI app (FastAPI/Starlette). ``api_key``: require ``Authorization: Bearer <key>``."""
    app = FastAPI(title="specdec OpenAI-compatible API", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                error = APIError(401, "invalid or missing API key", "authentication_error")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        return body

    async def respond(request: Request, chat: bool):
        body = await body_of(request)
        if body.get("stream"):
            events = await run_in_threadpool(frontend.stream, body, chat)

            async def send():
                try:
                    async for event in iterate_in_threadpool(events):
                        yield event
                finally:  # the client went away (or the stream ended): end the generation
                    await run_in_threadpool(events.close)

            return StreamingResponse(
                send(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        handler = frontend.chat if chat else frontend.completion
        return JSONResponse(await run_in_threadpool(handler, body))

    @app.get("/v1/models")
    async def models():
        return JSONResponse(await run_in_threadpool(frontend.models))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    @app.get("/health")
    async def health():
        # as vLLM's: 200 while the engine (here, the verifier) serves, 503 otherwise
        status = await asyncio.to_thread(frontend.verifier_status)
        return JSONResponse({"status": "ok" if status == "SERVING" else status, "verifier": status},
                            status_code=200 if status == "SERVING" else 503)  # fmt: skip

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        "specdec serve-openai", description="OpenAI-compatible HTTP API over a verifier."
    )
    p.add_argument("--verifier", default=os.environ.get("SPECDEC_VERIFIER_ADDR", "localhost:50051"))
    p.add_argument("--drafter", default=os.environ.get("SPECDEC_DRAFTER_ADDR", ""))
    p.add_argument("--host", default=os.environ.get("SPECDEC_OPENAI_HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(os.environ.get("SPECDEC_OPENAI_PORT", "8000")))
    p.add_argument("--model-name", default=os.environ.get("SPECDEC_OPENAI_MODEL_NAME", ""),
                   help="the name /v1/models reports and requests may use (default: the verifier's model)")  # fmt: skip
    p.add_argument("--api-key-file", default=os.environ.get("SPECDEC_OPENAI_API_KEY_FILE", ""),
                   help="require this bearer key (else $SPECDEC_OPENAI_API_KEY; none: open)")  # fmt: skip
    p.add_argument("--log-level", default=os.environ.get("SPECDEC_OPENAI_LOG_LEVEL", "info"))
    a = p.parse_args(argv)
    import uvicorn

    from specdec.security import read_token

    try:
        key = read_token(a.api_key_file, "SPECDEC_OPENAI_API_KEY")
    except ValueError as exc:
        print(f"specdec serve-openai: {exc}", file=sys.stderr)
        return 2
    frontend = OpenAIFrontend(a.verifier, a.drafter, a.model_name)
    uvicorn.run(create_app(frontend, key), host=a.host, port=a.port, log_level=a.log_level)
    return 0
