"""`recipec serve`: an OpenAI-compatible completions server over the engine the profiler measures, and
`profile_url`, the profiler's load generator aimed at such a server over HTTP.

Endpoints: POST /v1/completions (prompt as text or token ids, max_tokens, temperature, top_p, top_k, seed,
ignore_eos, stream over server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus text).

Requests run on recipec.engine.Engine under the recipe's batching policy, on its own thread; HTTP handlers
run on uvicorn's event loop and receive tokens through the engine's callbacks. Admission is bounded:
requests waiting for a batch slot beyond --max-queue are refused with 429 at once, rather than queueing
without limit while every client times out. A client that disconnects cancels its request, which leaves
its batch slot at the next step (continuous batching; static and dynamic batches carry finished rows to
their end by design).

The serving process imports neither torch nor transformers when the variant has a tokenizer.json.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import ipaddress
import json
import signal
import socket
import sys
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import numpy as np
# At module level: FastAPI resolves handler annotations (strings under `from __future__ import annotations`)
# in this module's globals.
from starlette.requests import Request as HttpRequest

from .deploy import command_manifest, override_policy, policy_from_serving
from .engine import POLICIES, Engine, Policy, Request

DEFAULT_MAX_QUEUE = 64
# Histogram bounds in seconds, as vLLM's /metrics uses for the same quantities.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# OpenAI parameters this server cannot honour: accepted only at their no-op value, refused otherwise.
_NO_OP = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None,), "suffix": (None, ""),
          "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)}


class ApiError(Exception):
    """An HTTP error answered in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}.get(self.status,
                                                                                                   "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


# ---------------------------------------------------------------- requests

@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)


@dataclass
class Completion:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stream: bool = False
    ignore_eos: bool = False
    include_usage: bool = False


@dataclass
class ModelSpec:
    """What request validation needs to know about the served variant."""
    name: str
    vocab_size: int
    context_length: int | None
    tokenizer: Any = None  # has encode(text) -> ids and decode(ids) -> text, or None


def parse_completion(body: Any, spec: ModelSpec) -> Completion:
    """Validate a /v1/completions body; ApiError(400) names the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != spec.name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {spec.name!r}", "model")
    for name, allowed in _NO_OP.items():
        if body.get(name) not in allowed:
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server", name)
    if body.get("stop") not in (None, "", []):
        raise ApiError(400, "stop sequences are not supported by this server", "stop")
    if body.get("logit_bias") not in (None, {}):
        raise ApiError(400, "logit_bias is not supported by this server", "logit_bias")
    prompt = _prompt_ids(body.get("prompt"), spec)
    max_tokens = _integer(body, "max_tokens", 16, minimum=1)
    if spec.context_length and len(prompt) + max_tokens > spec.context_length:
        raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                            f"context length of {spec.context_length} tokens", "max_tokens")
    sampling = Sampling(_number(body, "temperature", 1.0, 0.0, 2.0), _top_p(body), _top_k(body), _seed(body))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    return Completion(prompt, max_tokens, sampling, _boolean(body, "stream"), _boolean(body, "ignore_eos"),
                      bool(options.get("include_usage", False)))


def _prompt_ids(prompt: Any, spec: ModelSpec) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt, as OpenAI clients send it
    if isinstance(prompt, str):
        if spec.tokenizer is None:
            raise ApiError(400, "this variant has no tokenizer: send the prompt as a list of token ids", "prompt")
        ids = spec.tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < spec.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{spec.vocab_size - 1})", "prompt")
    elif prompt is None:
        raise ApiError(400, "prompt is required", "prompt")
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    if not ids:
        raise ApiError(400, "prompt must hold at least one token", "prompt")
    return ids


def _integer(body: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ApiError(400, f"{name} must be an integer >= {minimum}, got {value!r}", name)
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _top_p(body: dict[str, Any]) -> float:
    value = _number(body, "top_p", 1.0, 0.0, 1.0)
    if value == 0:
        raise ApiError(400, "top_p must be in (0, 1]", "top_p")
    return value


def _top_k(body: dict[str, Any]) -> int:
    value = body.get("top_k")
    if value in (None, -1):  # -1 is vLLM's "no limit"
        return 0
    return _integer(body, "top_k", 0, minimum=0)


def _seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ApiError(400, f"seed must be a non-negative integer, got {value!r}", "seed")
    return value


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {value!r}", name)
    return value


# ---------------------------------------------------------------- the engine with per-request sampling

class SamplingEngine(Engine):
    """The profiler's Engine, choosing each row's token by its request's sampling parameters (the rows of a
    step are the requests of the prefill batch or the engine's running rows); scheduling, step records and
    the measured timings stay the engine's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._params: dict[int, Sampling] = {}

    def submit_sampled(self, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling, **kwargs) -> Request:
        # The engine thread takes new requests under self._cond, an RLock: holding it here until the
        # parameters are registered means no step can see the request before them.
        with self._cond:
            request = self.submit(prompt, max_new_tokens, **kwargs)
            self._params[request.id] = sampling
        return request

    def forget(self, request: Request) -> None:
        self._params.pop(request.id, None)

    def _pick(self, logits, rows: Sequence[Request]) -> np.ndarray:
        return np.array([self._choose(np.asarray(logits[i:i + 1]), r) for i, r in enumerate(rows)], dtype=np.int64)

    def _choose(self, logits: np.ndarray, request: Request) -> int:
        from .runtime import sample

        params = self._params.get(request.id)  # None once finished: a static batch still carries the row
        if params is None or params.temperature == 0:
            return int(logits[0].argmax())
        return int(sample(logits, params.temperature, params.top_k, params.top_p, params.rng)[0])


# ---------------------------------------------------------------- metrics

class Histogram:
    def __init__(self, bounds: Sequence[float]):
        self.bounds, self.counts, self.sum, self.count = tuple(bounds), [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Prometheus text exposition of the server's counters, gauges and latency histograms (seconds).
    Updated from the engine thread and read from the event loop, hence the lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.finished = {reason: 0 for reason in ("stop", "length", "cancelled", "error")}
        self.rejected = {reason: 0 for reason in ("queue_full", "invalid")}
        self.prompt_tokens = self.generation_tokens = 0
        self.ttft, self.tpot, self.e2e = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS), Histogram(E2E_BUCKETS)

    def request_done(self, request: Request, reason: str) -> None:
        with self.lock:
            self.finished[reason] += 1
            self.prompt_tokens += len(request.prompt)
            self.generation_tokens += len(request.tokens)
            times = request.token_times
            if times and reason in ("stop", "length"):
                self.ttft.observe(times[0] - request.arrival)
                self.e2e.observe(times[-1] - request.arrival)
                if len(times) > 1:  # vLLM's TPOT: undefined for one-token outputs
                    self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1

    def render(self, waiting: int, running: int, info: dict[str, str]) -> str:
        with self.lock:
            labels = ",".join(f'{k}="{v}"' for k, v in info.items())
            lines = [*_family("recipec_info", "gauge", "what this server serves"), f"recipec_info{{{labels}}} 1"]
            lines += _family("recipec_requests_total", "counter", "finished requests by outcome")
            lines += [f'recipec_requests_total{{outcome="{k}"}} {v}' for k, v in self.finished.items()]
            lines += _family("recipec_requests_rejected_total", "counter", "requests refused before admission")
            lines += [f'recipec_requests_rejected_total{{reason="{k}"}} {v}' for k, v in self.rejected.items()]
            lines += _family("recipec_prompt_tokens_total", "counter", "prompt tokens of finished requests")
            lines += [f"recipec_prompt_tokens_total {self.prompt_tokens}"]
            lines += _family("recipec_generation_tokens_total", "counter", "tokens generated for finished requests")
            lines += [f"recipec_generation_tokens_total {self.generation_tokens}"]
            lines += _family("recipec_queue_depth", "gauge", "admitted requests waiting for a batch slot")
            lines += [f"recipec_queue_depth {waiting}"]
            lines += _family("recipec_requests_running", "gauge", "requests holding a batch slot")
            lines += [f"recipec_requests_running {running}"]
            for name, hist, what in (("recipec_time_to_first_token_seconds", self.ttft, "admission to first token"),
                                     ("recipec_time_per_output_token_seconds", self.tpot,
                                      "mean time per output token after the first, per request"),
                                     ("recipec_e2e_request_latency_seconds", self.e2e, "admission to last token")):
                lines += _family(name, "histogram", what) + hist.lines(name)
            return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


# ---------------------------------------------------------------- the service

class Detokenizer:
    """Text of a growing token list, emitted incrementally. A token may end inside a multi-byte character
    (decoded as U+FFFD until the next token completes it), so text is held back until it decodes cleanly;
    decoding restarts from a recent offset, keeping each step O(1) in the output length."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.tokens, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        if self.tokenizer is None:
            return ""
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before):]


@dataclass
class Handle:
    """One admitted request as its HTTP handler sees it: events arrive on `events` from the engine thread."""
    completion: Completion
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    request: Request | None = None
    started: bool = False
    reason: str | None = None


class Service:
    def __init__(self, model: Any, spec: ModelSpec, policy: Policy, max_queue: int = DEFAULT_MAX_QUEUE):
        self.spec, self.policy, self.max_queue = spec, policy, max_queue
        self.eos = tuple(getattr(model, "eos_token_ids", None) or ())
        self.engine = SamplingEngine(model, policy, eos_token_id=self.eos or None, record_steps=False)
        self.metrics = Metrics()
        self.lock = threading.Lock()
        self.waiting = self.running = 0

    @asynccontextmanager
    async def lifespan(self, app):
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    def submit(self, completion: Completion) -> Handle:
        """Admit the request or raise ApiError(429) when max_queue requests already wait for a slot."""
        with self.lock:
            if self.waiting >= self.max_queue:
                self.metrics.reject("queue_full")
                raise ApiError(429, f"server busy: {self.waiting} requests already wait for a batch slot (--max-queue "
                                    f"{self.max_queue}); retry later")
            self.waiting += 1
        handle = Handle(completion, asyncio.Queue(), asyncio.get_running_loop())
        try:
            handle.request = self.engine.submit_sampled(
                completion.prompt, completion.max_tokens, completion.sampling, ignore_eos=completion.ignore_eos,
                on_token=lambda r, tok, t: self._on_token(handle, tok), on_finish=lambda r: self._on_finish(handle, r))
        except BaseException:
            with self.lock:
                self.waiting -= 1
            raise
        return handle

    def cancel(self, handle: Handle) -> None:
        if handle.request is not None and not handle.request.finished:
            self.engine.cancel(handle.request)

    def _on_token(self, handle: Handle, token: int) -> None:
        if not handle.started:
            self._start(handle)
        _post(handle, ("token", token))

    def _start(self, handle: Handle) -> None:
        with self.lock:
            handle.started = True
            self.waiting -= 1
            self.running += 1

    def _on_finish(self, handle: Handle, request: Request) -> None:
        # `request` comes from the engine: handle.request may not be assigned yet when a request ends
        # in the very step that admitted it.
        with self.lock:
            if handle.started:
                self.running -= 1
            else:
                self.waiting -= 1
        handle.reason = _finish_reason(request, self.eos)
        self.engine.forget(request)
        self.metrics.request_done(request, handle.reason)
        _post(handle, ("end", handle.reason))

    def metrics_text(self) -> str:
        with self.lock:
            waiting, running = self.waiting, self.running
        info = {"model": self.spec.name, "batching": self.policy.batching,
                "max_batch_size": str(self.policy.max_batch_size)}
        return self.metrics.render(waiting, running, info)


def _finish_reason(request: Request, eos: tuple[int, ...]) -> str:
    if request.error is not None:
        return "error"
    if request.cancelled:
        return "cancelled"
    if request.tokens and not request.ignore_eos and request.tokens[-1] in eos:
        return "stop"
    return "length"


def _post(handle: Handle, event: tuple) -> None:
    try:
        handle.loop.call_soon_threadsafe(handle.events.put_nowait, event)
    except RuntimeError:  # the event loop has closed: the server is shutting down and nobody listens
        pass


# ---------------------------------------------------------------- HTTP

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


# ---------------------------------------------------------------- loading and running

class _FastTokenizer:
    """tokenizer.json through the `tokenizers` library: what transformers' fast tokenizers run, without
    importing transformers (and torch) into the serving process."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class _HfTokenizer:
    def __init__(self, tok):
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return self._tok(text)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(variant_dir: Path):
    if (variant_dir / "tokenizer.json").is_file():
        return _FastTokenizer(variant_dir / "tokenizer.json")
    from . import runtime

    tok = runtime.tokenizer(variant_dir)
    return _HfTokenizer(tok) if tok is not None else None


def build_service(build_dir: Path, variant: str, policy: Policy | None = None, device: str | None = None,
                  threads: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE) -> Service:
    """Load a built variant under the recipe's serving policy (or the one given)."""
    from . import runtime
    from .deploy import chosen_variants, read_manifest

    manifest = read_manifest(build_dir)
    chosen_variants(manifest, [variant], build_dir)
    serving = manifest["recipe"]["resolved"].get("serving", {})
    variant_dir = Path(build_dir) / "variants" / variant
    model = runtime.load(variant_dir, device or serving.get("device", "auto"),
                         threads=threads if threads is not None else (serving.get("threads") or None))
    identity = model.artifact["model"]
    spec = ModelSpec(f"{manifest['recipe']['name']}/{variant}", int(identity["vocab_size"]),
                     identity.get("max_position_embeddings"), load_tokenizer(variant_dir))
    return Service(model, spec, policy or policy_from_serving(serving), max_queue)


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


# ---------------------------------------------------------------- profiling a server over HTTP

def profile_url(url: str, serving_spec: dict[str, Any], vocab_size: int | None = None,
                log: Callable[[str], None] = lambda s: None, timeout_s: float = 600.0) -> list[dict[str, Any]]:
    """Run the recipe's serving workload (serving_plan: each policy and load level) against an
    OpenAI-compatible server and return the runs in the report's shape.

    Requests are token-id prompts drawn as the in-process load generator draws them, streamed, with
    ignore_eos (vLLM's extension, which recipec serve honours) so each produces its full output length.
    Times are the client's, from when a request was sent: when it was due or, with every client busy,
    when one took it. The server's steps and memory are not visible from here, so MBU, MFU and peak
    memory are null. When the server is recipec's, the runs carry its batching policy (from /v1/models)
    instead of the recipe's. Raises ValueError when the server cannot be used, RuntimeError when a
    request fails during a run."""
    from .loadgen import gamma_offsets, make_items
    from .profiler import _workload, serving_plan, summarize_raw

    base = url.rstrip("/")
    model = _remote_model(base)
    vocab = vocab_size or model.get("vocab_size")
    if not vocab:
        raise ValueError(f"{base} does not report its vocabulary size; pass vocab_size")
    runs = []
    for run in serving_plan(_with_remote_policy(serving_spec, model)):
        log(f"{base}: " + (f"concurrency {run['concurrency']}" if "concurrency" in run else f"{run['rate_rps']} req/s"))
        w = _workload(run)
        client = _HttpClient(base, model["id"], timeout_s)
        if w.warmup_requests:
            warm = make_items(w, vocab, w.warmup_requests, seed_offset=10_000)
            client.run(warm, [0.0] * len(warm), run.get("concurrency") or len(warm))
        items = make_items(w, vocab, w.num_requests)
        if "concurrency" in run:
            records = client.run(items, [0.0] * len(items), run["concurrency"])
        else:
            offsets = gamma_offsets(len(items), run["rate_rps"], run["burstiness"], w.seed)
            records = client.run(items, offsets, run.get("max_concurrency") or len(items))
        raw = {"run": run, "records": records, "steps": [], "peak_memory_mb": None,
               "peak_memory_source": f"not measured: a remote server ({base})", "host_load_avg_1m": None}
        runs.append(summarize_raw(raw, None, None, serving_spec.get("slo")))
    return runs


def _remote_model(base: str) -> dict[str, Any]:
    try:
        status, body = _get(base + "/v1/models")
    except OSError as exc:
        raise ValueError(f"cannot reach {base}: {exc}") from None
    if status != 200:
        raise ValueError(f"{base}/v1/models answered HTTP {status}: is this an OpenAI-compatible server?")
    data = json.loads(body).get("data") or []
    if not data:
        raise ValueError(f"{base}/v1/models lists no model")
    return data[0]


def _with_remote_policy(spec: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The spec with the server's batching when it reports one: a server runs one policy, however many
    the recipe compares."""
    remote = model.get("batching")
    if not isinstance(remote, dict) or remote.get("policy") not in POLICIES:
        return spec
    batching = {key: remote[key] for key in ("max_batch_size", "max_wait_ms", "max_tokens_per_step")
                if remote.get(key) is not None}
    return {**spec, "batching": {**batching, "policy": remote["policy"]}}


def _get(url: str) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class _HttpClient:
    """Sends items from `cap` client threads, item i no earlier than start + offsets[i]. A request arrives
    when it is sent: when it was due or, when every client was busy, when one took it (loadgen's _Slots)."""

    def __init__(self, base: str, model: str, timeout_s: float):
        self.parts, self.model, self.timeout_s = urlsplit(base), model, timeout_s

    def run(self, items, offsets: Sequence[float], cap: int) -> list[dict[str, Any]]:
        todo = sorted(zip(offsets, range(len(items))))
        lock, records, errors = threading.Lock(), [None] * len(items), []
        start = time.perf_counter()

        def client() -> None:
            while not errors:
                with lock:
                    if not todo:
                        return
                    offset, i = todo.pop(0)
                time.sleep(max(0.0, start + offset - time.perf_counter()))
                try:
                    records[i] = self._one(items[i], time.perf_counter())
                except (OSError, RuntimeError, ValueError) as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(max(1, min(cap, len(items))))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"a request to {self.parts.geturl()} failed: {errors[0]}")
        return records

    def _one(self, item, arrival: float) -> dict[str, Any]:
        body = json.dumps({"model": self.model, "prompt": item.prompt, "max_tokens": item.output_len,
                           "temperature": 0, "stream": True, "ignore_eos": True})
        conn = http.client.HTTPConnection(self.parts.hostname, self.parts.port or 80, timeout=self.timeout_s)
        times: list[float] = []
        try:
            conn.request("POST", (self.parts.path or "") + "/v1/completions", body,
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
            for line in response:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                now = time.perf_counter()
                choices = json.loads(line[6:]).get("choices") or [{}]
                # A server may stream several tokens in one event; each gets the event's time.
                times += [now] * len(choices[0].get("token_ids") or ([0] if choices[0].get("text") else []))
        finally:
            conn.close()
        return {"arrival": arrival, "token_times": times, "n_in": len(item.prompt), "cancelled": False}


# ---------------------------------------------------------------- the command

def add_serve_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a built variant over HTTP (OpenAI-compatible /v1/completions)")
    _arguments(p)
    p.set_defaults(handler=cmd_serve)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build_dir", type=Path, help="out/<name>")
    p.add_argument("--variant", default="baseline")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for a batch slot; past it, 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the recipe's serving.device")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: the recipe's)")
    p.add_argument("--policy", choices=list(POLICIES), help="batching policy (default: the recipe's)")
    p.add_argument("--max-batch-size", type=int, help="default: the recipe's")
    p.add_argument("--max-wait-ms", type=float, help="dynamic batching's wait (default: the recipe's)")


def cmd_serve(args) -> int:
    from . import console
    from .cli import EXIT_OK, UsageError

    if args.max_queue < 0:
        raise UsageError("--max-queue must be >= 0")
    _check_port(args.host, args.port)
    serving = command_manifest(args.build_dir, [args.variant])["recipe"]["resolved"].get("serving", {})
    policy = override_policy(policy_from_serving(serving), args, "serve")
    service = build_service(args.build_dir, args.variant, policy, args.device, args.threads, args.max_queue)
    if not _loopback(args.host):
        console.warn(f"listening on {args.host}: reachable from other machines, with no authentication")
    console.say(f"serving {service.spec.name} on http://{args.host}:{args.port} ({policy.batching} "
                f"batching, max batch {policy.max_batch_size}, max queue {args.max_queue}); Ctrl-C stops")
    run_server(service, args.host, args.port)
    console.say("stopped")
    return EXIT_OK


def _check_port(host: str, port: int) -> None:
    """uvicorn reports a taken port only in its log and exits; say it plainly before loading the model."""
    from .cli import UsageError

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """`python -m recipec.serve OUT/NAME ...`: the serve command with recipec's error handling."""
    from .cli import run_guarded

    parser = argparse.ArgumentParser(prog="recipec serve", description="serve a built variant over HTTP")
    _arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(lambda: cmd_serve(args))


if __name__ == "__main__":
    sys.exit(main())
