"""The HTTP server: OpenAI's /v1/completions (whole or streamed as server-sent events), /v1/models,
/health and /metrics over a Service, run by uvicorn."""
from __future__ import annotations

import asyncio
import json
import signal
import time
from contextlib import contextmanager
from typing import Any

# At module level: FastAPI resolves handler annotations (strings under `from __future__ import annotations`)
# in this module's globals.
from starlette.requests import Request as HttpRequest

from recipec.serve.protocol import ApiError, Completion, parse_completion
from recipec.serve.service import Handle, Service
from recipec.serve.tokenizer import Detokenizer


def create_app(service: Service):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="recipec", lifespan=service.lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.get("/health")
    async def health():
        alive = service.engine._thread is not None and service.engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

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
        completion = await _validated(request, service)
        handle = service.submit(completion)
        if completion.stream:
            return StreamingResponse(_sse(service, handle), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(service, handle, request)

    return app


async def _json_body(request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the request body is JSON nested too deeply") from None


async def _validated(request, service: Service) -> Completion:
    try:
        return parse_completion(await _json_body(request), service.spec)
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


async def _sse(service: Service, handle: Handle):
    """One event per token, then the finish reason, usage when asked, and [DONE]. A disconnect cancels
    the generator at its await; `finally` then cancels the request so its batch slot frees."""
    text = Detokenizer(service.spec.tokenizer)
    try:
        while True:
            kind, value = await handle.events.get()
            if kind == "token":
                yield _event(_chunk(service, handle, text.add(value), [value], None))
                continue
            if value == "error":
                yield _event({"error": {"message": f"generation failed: {handle.request.error}", "type": "server_error"}})
            else:
                yield _event(_chunk(service, handle, "", [], _openai_reason(value)))
                if handle.completion.include_usage:
                    yield _event({**_chunk(service, handle, "", [], None), "choices": [], "usage": _usage(handle)})
            yield "data: [DONE]\n\n"
            return
    finally:
        service.cancel(handle)


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _openai_reason(reason: str) -> str:
    return "stop" if reason == "stop" else "length"


async def _complete(service: Service, handle: Handle, request) -> dict[str, Any]:
    """Wait for the whole completion, checking twice a second whether the client is still there."""
    tokens: list[int] = []
    while True:
        try:
            kind, value = await asyncio.wait_for(handle.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                service.cancel(handle)
                raise ApiError(499, "client disconnected") from None
            continue
        if kind == "token":
            tokens.append(value)
            continue
        if value == "error":
            raise ApiError(500, f"generation failed: {handle.request.error}")
        whole = service.spec.tokenizer.decode(tokens) if service.spec.tokenizer is not None else ""
        return {**_chunk(service, handle, whole, tokens, _openai_reason(value)), "usage": _usage(handle)}


def run_server(service: Service, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM; in-flight requests get up to 5 s to finish."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its graceful shutdown, which turns the stop a user asked
            # for into a KeyboardInterrupt traceback (SIGINT) or death by signal (SIGTERM).
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=5)
    Server(config).run()
