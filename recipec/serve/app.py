"""The HTTP app: OpenAI's /v1/completions (whole or streamed as server-sent events), /v1/models, /health
(liveness), /ready (readiness) and /metrics over a Service. Every error is in OpenAI's shape, routes
unknown to it included. The guard (recipec.serve.guard) runs in front of it; recipec.serve.server runs both."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

# At module level: FastAPI resolves handler annotations (strings under `from __future__ import annotations`)
# in this module's globals.
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse

from recipec.serve.limits import Limits
from recipec.serve.protocol import ApiError, Completion, parse_completion, set_prompt
from recipec.serve.service import Handle, Service
from recipec.serve.tokenizer import Detokenizer


def create_app(service: Service, limits: Limits, openapi: bool = False):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    # No /docs or /redoc ever: their pages load scripts from a public CDN. The schema only when asked for.
    app = FastAPI(title="recipec", lifespan=service.lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if openapi else None)

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, exc: HTTPException):
        where = f"{request.method} {request.url.path}"
        message = {404: f"there is no route {where}", 405: f"{where} is not allowed"}.get(exc.status_code,
                                                                                        str(exc.detail))
        return error_response(ApiError(exc.status_code, message, headers=exc.headers))

    @app.get("/health")
    async def health():
        alive = service.engine_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/ready")
    async def ready():
        reason = await service.not_ready()
        if reason is None:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        p = service.policy
        return {"object": "list", "data": [{
            "id": service.spec.name, "object": "model", "owned_by": "recipec", "created": 0,
            "max_model_len": service.spec.context_length, "vocab_size": service.spec.vocab_size,
            "batching": {"policy": p.batching, "max_batch_size": p.max_batch_size, "max_wait_ms": p.max_wait_ms,
                         "max_tokens_per_step": p.max_tokens_per_step}}]}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        completion = await _validated(request, service, limits)
        handle = service.submit(completion, request.scope.get("state", {}).get("client", ""))
        if completion.stream:
            return _Stream(service, handle)
        return await _complete(service, handle, request.receive)

    return app


def error_response(exc: ApiError):
    """An ApiError as a Starlette response (the guard sends the same bytes at the ASGI level)."""
    return Response(exc.content(), status_code=exc.status, headers=exc.headers, media_type="application/json")


async def _json_body(request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the request body is JSON nested too deeply") from None


async def _validated(request, service: Service, limits: Limits) -> Completion:
    try:
        completion = parse_completion(await _json_body(request), service.spec,
                                      limits.prompt_chars(service.spec.context_length))
        if completion.text is not None:
            # On a worker thread: a long prompt takes the tokenizer a while (which releases the GIL), and the
            # event loop keeps answering /health and streaming other requests' tokens meanwhile.
            ids = await asyncio.to_thread(service.spec.tokenizer.encode, completion.text)
            set_prompt(completion, ids, service.spec)
        return completion
    except ApiError:
        service.metrics.reject("invalid")
        raise


def _chunk(service: Service, handle: Handle, text: str, tokens: list[int], reason: str | None) -> dict[str, Any]:
    return {"id": f"cmpl-{handle.request.id}", "object": "text_completion", "created": int(time.time()),
            "model": service.spec.name,
            "choices": [{"index": 0, "text": text, "token_ids": tokens, "logprobs": None, "finish_reason": reason}]}


def _usage(handle: Handle) -> dict[str, int]:
    n_in, n_out = len(handle.completion.prompt), len(handle.request.tokens)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _ended(service: Service, handle: Handle, reason: str) -> ApiError:
    """The error a request that did not finish answers with, by why it ended."""
    if reason == "error":
        return ApiError(500, f"generation failed: {handle.request.error}")
    if reason == "shutdown":
        return ApiError(503, "the server shut down before the request finished" if handle.started
                        else "the server is shutting down; the request was not started, retry on another instance")
    if reason == "deadline":
        return ApiError(504, f"the request ran past its deadline of {service.request_timeout:g} s (--request-timeout)")
    if reason == "disconnected":
        return ApiError(499, "client disconnected")  # nobody reads it; it shows in the access log
    return ApiError(503, "the request was cancelled")


async def _sse(service: Service, handle: Handle):
    """One event per token, then the finish reason, usage when asked, and [DONE]; a request that cannot
    finish (shutdown, deadline, failure) ends with an error event in OpenAI's shape, then [DONE]. A disconnect
    cancels the generator at its await; `finally` then frees its batch slot."""
    text = Detokenizer(service.spec.tokenizer)
    try:
        while True:
            kind, value = await handle.events.get()
            if kind == "token":
                yield _event(_chunk(service, handle, text.add(value), [value], None))
                continue
            if value in ("stop", "length"):
                yield _event(_chunk(service, handle, "", [], value))
                if handle.completion.include_usage:
                    yield _event({**_chunk(service, handle, "", [], None), "choices": [], "usage": _usage(handle)})
            else:
                yield _event(_ended(service, handle, value).body())
            yield "data: [DONE]\n\n"
            return
    finally:
        service.release(handle)


class _Stream(StreamingResponse):
    """The SSE response, freeing the request's slot however it ends: a client that hangs up before the first
    event cancels the response before `_sse` ever runs, so the generator's own `finally` cannot be relied on."""

    def __init__(self, service: Service, handle: Handle):
        super().__init__(_sse(service, handle), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.service, self.handle = service, handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.service.release(self.handle)


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _complete(service: Service, handle: Handle, receive) -> dict[str, Any]:
    """Wait for the whole completion while a watcher ends it the moment its client hangs up."""
    watcher = asyncio.ensure_future(_hang_up(service, handle, receive))
    tokens: list[int] = []
    try:
        while True:
            kind, value = await handle.events.get()
            if kind == "token":
                tokens.append(value)
                continue
            if value not in ("stop", "length"):
                raise _ended(service, handle, value)
            whole = service.spec.tokenizer.decode(tokens) if service.spec.tokenizer is not None else ""
            return {**_chunk(service, handle, whole, tokens, value), "usage": _usage(handle)}
    finally:
        watcher.cancel()
        service.release(handle)


async def _hang_up(service: Service, handle: Handle, receive) -> None:
    # The body is read, so the server's next message is http.disconnect, sent when the client closes.
    while (await receive())["type"] != "http.disconnect":
        pass
    service.end(handle, "disconnected")
