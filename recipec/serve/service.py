"""The server behind the HTTP layer: admission bounded by --max-queue, the engine thread, and each
request's events handed from that thread to the event loop."""
from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipec.core.builddir import VARIANTS, command_manifest
from recipec.runtime import lm as runtime
from recipec.runtime.engine import Policy, Request, policy_from_serving
from recipec.serve.metrics import Metrics
from recipec.serve.protocol import ApiError, Completion, ModelSpec
from recipec.serve.sampling import SamplingEngine
from recipec.serve.tokenizer import load_tokenizer

DEFAULT_MAX_QUEUE = 64


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


def build_service(build_dir: Path, variant: str, policy: Policy | None = None, device: str | None = None,
                  threads: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE) -> Service:
    """Load a built variant under the recipe's serving policy (or the one given)."""
    manifest = command_manifest(build_dir, [variant])
    serving = manifest["recipe"]["resolved"].get("serving", {})
    variant_dir = Path(build_dir) / VARIANTS / variant
    model = runtime.load(variant_dir, device or serving.get("device", "auto"),
                         threads=threads if threads is not None else (serving.get("threads") or None))
    identity = model.artifact["model"]
    spec = ModelSpec(f"{manifest['recipe']['name']}/{variant}", int(identity["vocab_size"]),
                     identity.get("max_position_embeddings"), load_tokenizer(variant_dir))
    return Service(model, spec, policy or policy_from_serving(serving), max_queue)
