"""The HTTP app: OpenAI's /v1/completions and /v1/chat/completions (whole or streamed as server-sent events),
/v1/models and /v1/models/{id}, /health (liveness), /ready (readiness) and /metrics over a Service. Every
error is in OpenAI's shape, routes unknown to it included. The guard (recipec.serve.guard) runs in front of
it; recipec.serve.server runs both."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

# At module level: FastAPI resolves handler annotations (strings under `from __future__ import annotations`)
# in this module's globals.
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

from recipec.serve.chat import parse_chat
from recipec.serve.limits import Limits
from recipec.serve.protocol import ApiError, Completion, ModelSpec, parse_completion, set_prompts
from recipec.serve.responses import ChatFormat, CompletionsFormat, respond
from recipec.serve.service import Service


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
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        service.spec.check_model({"model": model_id})
        return _model_card(service)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        completion = await _validated(request, service, limits, parse_completion)
        return await respond(service, completion, CompletionsFormat, _client(request), request.receive)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        completion = await _validated(request, service, limits, parse_chat)
        return await respond(service, completion, ChatFormat, _client(request), request.receive)

    return app


def error_response(exc: ApiError):
    """An ApiError as a Starlette response (the guard sends the same bytes at the ASGI level)."""
    return Response(exc.content(), status_code=exc.status, headers=exc.headers, media_type="application/json")


def _model_card(service: Service) -> dict[str, Any]:
    p, spec = service.policy, service.spec
    return {"id": spec.name, "object": "model", "owned_by": "recipec", "created": 0, "aliases": list(spec.aliases),
            "max_model_len": spec.context_length, "vocab_size": spec.vocab_size,
            "chat_template": spec.chat_template is not None,
            "batching": {"policy": p.batching, "max_batch_size": p.max_batch_size, "max_wait_ms": p.max_wait_ms,
                         "max_tokens_per_step": p.max_tokens_per_step}}


def _client(request: HttpRequest) -> str:
    """The guard's key for the request's client: its share of the queue."""
    return request.scope.get("state", {}).get("client", "")


async def _json_body(request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the request body is JSON nested too deeply") from None


async def _validated(request, service: Service, limits: Limits,
                     parse: Callable[[Any, ModelSpec, int | None], Completion]) -> Completion:
    try:
        completion = parse(await _json_body(request), service.spec, limits.prompt_chars(service.spec.context_length))
        if not completion.prompts:
            # On a worker thread: a long prompt takes the tokenizer a while (which releases the GIL), and the
            # event loop keeps answering /health and streaming other requests' tokens meanwhile.
            ids = await asyncio.to_thread(_encode, service.spec.tokenizer, completion)
            set_prompts(completion, ids, service.spec)
        return completion
    except ApiError:
        service.metrics.reject("invalid")
        raise


def _encode(tokenizer: Any, completion: Completion) -> list[list[int]]:
    return [tokenizer.encode(text, special_tokens=completion.special_tokens) for text in completion.texts]
