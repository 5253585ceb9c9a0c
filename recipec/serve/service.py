"""The server behind the HTTP layer: admission (a bounded queue, a share of it per client, refusal while
shutting down), the engine thread, each request's events handed from that thread to the event loop, the
ends decided on the event loop (a deadline, a shutdown, a client gone), and the readiness probe."""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipec.core.builddir import VARIANTS, command_manifest
from recipec.runtime import lm as runtime
from recipec.runtime.engine import Policy, Request, policy_from_serving
from recipec.runtime.slots import step_model
from recipec.serve.limits import DEFAULT_MAX_QUEUE
from recipec.serve.metrics import Metrics
from recipec.serve.protocol import ApiError, Completion, ModelSpec
from recipec.serve.sampling import SamplingEngine
from recipec.serve.tokenizer import load_tokenizer

# A token this recent proves the engine runs steps; otherwise /ready submits a one-token probe.
RECENT_STEP_S = 1.0


@dataclass(eq=False)
class Handle:
    """One admitted request as its HTTP handler sees it: ("token", id) and ("end", reason) events arrive on
    `events`, from the engine thread or from the event loop (reasons "deadline", "shutdown", "disconnected")."""
    completion: Completion
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    client: str = ""
    request: Request | None = None
    started: bool = False
    reason: str | None = None
    ended: str | None = None  # the reason the event loop ended it with, if it did
    timer: asyncio.TimerHandle | None = None


class Service:
    def __init__(self, model: Any, spec: ModelSpec, policy: Policy, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_queue_per_client: int | None = None, request_timeout: float | None = None):
        self.spec, self.policy, self.max_queue = spec, policy, max_queue
        # Half the queue by default: one client alone cannot fill it and lock the others out.
        self.per_client = max_queue_per_client if max_queue_per_client is not None else max(1, (max_queue + 1) // 2)
        self.request_timeout = request_timeout
        self.eos = tuple(getattr(model, "eos_token_ids", None) or ())
        self.engine = SamplingEngine(model, policy, eos_token_id=self.eos or None, record_steps=False)
        self.metrics = Metrics()
        self.lock = threading.Lock()
        self.waiting = self.running = 0
        self.clients: dict[str, int] = {}  # requests waiting for a slot, per client; no entry at zero
        self.live: set[Handle] = set()
        self.draining = False
        self.last_token = 0.0  # time.monotonic() of the latest token, written by the engine thread
        self._probe: asyncio.Future | None = None

    @asynccontextmanager
    async def lifespan(self, app):
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    def submit(self, completion: Completion, client: str = "") -> Handle:
        """Admit the request, or raise ApiError: 503 while shutting down, 429 when its client already has its
        share of the queue waiting or when max_queue requests already wait for a slot."""
        loop = asyncio.get_running_loop()
        handle = Handle(completion, asyncio.Queue(), loop, client)
        with self.lock:
            self._admit(client)
            self.waiting += 1
            self.clients[client] = self.clients.get(client, 0) + 1
            self.live.add(handle)
        try:
            handle.request = self.engine.submit_sampled(
                completion.prompt, completion.max_tokens, completion.sampling, ignore_eos=completion.ignore_eos,
                on_token=lambda r, tok, t: self._on_token(handle, tok), on_finish=lambda r: self._on_finish(handle, r))
        except BaseException:
            with self.lock:
                self.waiting -= 1
                self._unqueue(client)
                self.live.discard(handle)
            raise
        if self.request_timeout:
            handle.timer = loop.call_later(self.request_timeout, self.end, handle, "deadline")
        return handle

    def _admit(self, client: str) -> None:
        """Raise the ApiError that refuses a new request now, if any (called under self.lock)."""
        if self.draining:
            self.metrics.reject("shutting_down")
            raise ApiError(503, "the server is shutting down; retry on another instance")
        if self.waiting >= self.max_queue:
            self.metrics.reject("queue_full")
            raise ApiError(429, f"server busy: {self.waiting} requests already wait for a batch slot (--max-queue "
                                f"{self.max_queue}); retry later")
        if self.clients.get(client, 0) >= self.per_client:
            self.metrics.reject("client_queue_full")
            raise ApiError(429, f"this client already has {self.clients[client]} requests waiting for a batch slot "
                                f"(--max-queue-per-client {self.per_client}); retry later")

    def _unqueue(self, client: str) -> None:
        left = self.clients.get(client, 0) - 1
        if left > 0:
            self.clients[client] = left
        else:
            self.clients.pop(client, None)

    def end(self, handle: Handle, reason: str) -> None:
        """End a request from the event loop: its handler gets ("end", reason) now, and the engine drops it at
        its next step."""
        if handle.ended is not None or handle.reason is not None:  # ended already, or finished by the engine
            return
        handle.ended = reason
        handle.events.put_nowait(("end", reason))
        if handle.request is not None and not handle.request.finished:
            self.engine.cancel(handle.request)

    def release(self, handle: Handle) -> None:
        """The handler is done with the request (answered, or its client left): stop its timer and free its slot."""
        if handle.timer is not None:
            handle.timer.cancel()
            handle.timer = None
        if handle.request is not None and not handle.request.finished:
            self.engine.cancel(handle.request)

    def drain(self) -> None:
        """The start of a shutdown: refuse new requests, and answer the ones still waiting for a slot with 503
        instead of starting them during the grace period."""
        with self.lock:
            self.draining = True
            queued = [h for h in self.live if not h.started]
        for handle in queued:
            self.end(handle, "shutdown")

    def expire(self) -> None:
        """The end of the grace period: the requests still running end with an error their clients can read."""
        with self.lock:
            running = list(self.live)
        for handle in running:
            self.end(handle, "shutdown")

    def _on_token(self, handle: Handle, token: int) -> None:
        self.last_token = time.monotonic()
        if not handle.started:
            self._start(handle)
        _post(handle, ("token", token))

    def _start(self, handle: Handle) -> None:
        with self.lock:
            handle.started = True
            self.waiting -= 1
            self.running += 1
            self._unqueue(handle.client)

    def _on_finish(self, handle: Handle, request: Request) -> None:
        # `request` comes from the engine: handle.request may not be assigned yet when a request ends
        # in the very step that admitted it.
        with self.lock:
            if handle.started:
                self.running -= 1
            else:
                self.waiting -= 1
                self._unqueue(handle.client)
            self.live.discard(handle)
        handle.reason = _finish_reason(request, self.eos)
        self.engine.forget(request)
        self.metrics.request_done(request, handle.reason)
        _post(handle, ("end", handle.reason))

    def engine_alive(self) -> bool:
        return self.engine.alive

    async def not_ready(self, timeout: float = 5.0) -> str | None:
        """Why the server cannot serve a request now, or None when the engine has just shown it runs steps:
        a token within the last second, or a one-token probe (shared by concurrent calls) within `timeout`."""
        if self.draining:
            return "shutting down"
        if not self.engine_alive():
            return "engine stopped"
        if time.monotonic() - self.last_token < RECENT_STEP_S:
            return None
        if self._probe is None or self._probe.done():
            self._probe = self._start_probe()
        try:
            error = await asyncio.wait_for(asyncio.shield(self._probe), timeout)
        except asyncio.TimeoutError:
            return f"the engine ran no step within {timeout:g} s"
        return None if error is None else f"the engine failed a step: {error}"

    def _start_probe(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def finished(request: Request) -> None:
            try:
                loop.call_soon_threadsafe(_resolve, future, request.error)
            except RuntimeError:  # the event loop has closed: nobody waits for the probe
                pass

        # Straight to the engine: a probe is no client's request, so it is neither admitted nor counted.
        self.engine.submit([0], 1, ignore_eos=True, on_finish=finished)
        return future

    def metrics_text(self) -> str:
        with self.lock:
            waiting, running = self.waiting, self.running
        info = {"model": self.spec.name, "batching": self.policy.batching,
                "max_batch_size": str(self.policy.max_batch_size)}
        return self.metrics.render(waiting, running, info)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(None if error is None else str(error))


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
                  threads: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                  max_queue_per_client: int | None = None, request_timeout: float | None = None) -> Service:
    """Load a built variant under the recipe's serving policy (or the one given)."""
    manifest = command_manifest(build_dir, [variant])
    serving = manifest["recipe"]["resolved"].get("serving", {})
    variant_dir = Path(build_dir) / VARIANTS / variant
    model = runtime.load(variant_dir, device or serving.get("device", "auto"),
                         threads=threads if threads is not None else (serving.get("threads") or None))
    identity = model.artifact["model"]
    spec = ModelSpec(f"{manifest['recipe']['name']}/{variant}", int(identity["vocab_size"]),
                     identity.get("max_position_embeddings"), load_tokenizer(variant_dir))
    policy = policy or policy_from_serving(serving)
    # a shared-buffer variant decodes in slots, one per batch row, the buffer growing with the longest request
    return Service(step_model(model, policy.max_batch_size), spec, policy, max_queue, max_queue_per_client,
                   request_timeout)
