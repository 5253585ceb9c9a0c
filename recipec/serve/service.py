"""The server behind the HTTP layer: admission (a bounded queue, a share of it per client, refusal while
shutting down), the engine thread, each request's events handed from that thread to the event loop, the
ends decided on the event loop (a deadline, a shutdown, a client gone, a stop string), prompt scoring
(echo's log-probabilities, off the event loop) and the readiness probe.

A request with several prompts, or n > 1, is one engine request per choice (prompt x copy): each takes its
own batch slot, so the engine batches them as it batches separate requests, and each counts in the queue."""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipec.core.builddir import VARIANTS, command_manifest
from recipec.runtime import lm as runtime
from recipec.runtime.engine import Policy, Request, policy_from_serving
from recipec.runtime.slots import step_model
from recipec.runtime.speculative import SpecConfig
from recipec.serve.chat import load_chat_template
from recipec.serve.limits import DEFAULT_MAX_QUEUE
from recipec.serve.logprobs import TokenLogprob, prompt_logprobs
from recipec.serve.metrics import Metrics
from recipec.serve.protocol import ApiError, Completion, ModelSpec
from recipec.serve.sampling import SamplingEngine
from recipec.serve.tokenizer import load_tokenizer

# A token this recent proves the engine runs steps; otherwise /ready submits a one-token probe.
RECENT_STEP_S = 1.0


@dataclass(eq=False)
class Handle:
    """One admitted request as its HTTP handler sees it. Events arrive on `events`: ("token", choice, id,
    logprob or None) and ("end", choice, reason) from the engine thread, ("end", None, reason) when the event
    loop ends the whole request (reasons "deadline", "shutdown", "disconnected")."""
    completion: Completion
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    client: str = ""
    requests: list[Request] = field(default_factory=list)  # the engine's, one per choice, in choice order
    open: int = 0  # choices the engine has not finished
    started: bool = False  # a choice has its first token
    stopped: set[int] = field(default_factory=set)  # choices ended by a stop string or stop token
    ended: str | None = None  # the reason the event loop ended it with, if it did
    timer: asyncio.TimerHandle | None = None


class Service:
    def __init__(self, model: Any, spec: ModelSpec, policy: Policy, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_queue_per_client: int | None = None, request_timeout: float | None = None,
                 metric_names: str = "recipec", speculation: SpecConfig | None = None):
        self.model, self.spec, self.policy, self.max_queue = model, spec, policy, max_queue
        # Half the queue by default: one client alone cannot fill it and lock the others out.
        self.per_client = max_queue_per_client if max_queue_per_client is not None else max(1, (max_queue + 1) // 2)
        self.request_timeout = request_timeout
        self.eos = tuple(getattr(model, "eos_token_ids", None) or ())
        self.engine = SamplingEngine(model, policy, eos_token_id=self.eos or None, record_steps=False,
                                     speculation=speculation)
        self.metrics = Metrics(metric_names, spec.context_length)
        self.lock = threading.Lock()
        self.waiting = self.running = 0
        self.clients: dict[str, int] = {}  # requests waiting for a slot, per client; no entry at zero
        self.live: set[Handle] = set()
        self.draining = False
        self.last_token = 0.0  # time.monotonic() of the latest token, written by the engine thread
        self._probe: asyncio.Future | None = None
        self._scoring: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def lifespan(self, app):
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    def submit(self, completion: Completion, client: str = "") -> Handle:
        """Admit the request, one engine request per choice, or raise ApiError: 503 while shutting down, 429
        when its client already has its share of the queue waiting or when max_queue requests already wait
        for a slot, 400 when its choices alone exceed either."""
        handle = Handle(completion, asyncio.Queue(), asyncio.get_running_loop(), client)
        count = completion.choices
        with self.lock:
            self._reserve(client, count)
            self.live.add(handle)
            handle.open = count
        try:
            for index, (prompt, copy) in enumerate((p, c) for p in completion.prompts for c in range(completion.n)):
                handle.requests.append(self.engine.submit_sampled(
                    prompt, completion.max_tokens, completion.sampling.for_choice(copy),
                    ignore_eos=completion.ignore_eos,
                    on_token=lambda r, tok, t, i=index: self._on_token(handle, i, r, tok),
                    on_finish=lambda r, i=index: self._on_finish(handle, i, r)))
        except BaseException:
            self._unsubmitted(handle, count - len(handle.requests))
            raise
        if self.request_timeout:
            handle.timer = handle.loop.call_later(self.request_timeout, self.end, handle, "deadline")
        return handle

    def _unsubmitted(self, handle: Handle, count: int) -> None:
        self._release_slots(handle.client, count)
        with self.lock:
            handle.open -= count
            if handle.open == 0:
                self.live.discard(handle)
        for request in handle.requests:  # each leaves through _on_finish, which counts it out
            self.engine.cancel(request)

    def _reserve(self, client: str, count: int) -> None:
        """Admit `count` requests of `client` into the queue, or raise why not (called under self.lock)."""
        self._admit(client, count)
        self.waiting += count
        self.clients[client] = self.clients.get(client, 0) + count

    def _release_slots(self, client: str, count: int) -> None:
        with self.lock:
            self.waiting -= count
            for _ in range(count):
                self._unqueue(client)

    def _admit(self, client: str, count: int = 1) -> None:
        """Raise the ApiError that refuses `count` new requests now, if any (called under self.lock)."""
        if self.draining:
            self.metrics.reject("shutting_down")
            raise ApiError(503, "the server is shutting down; retry on another instance")
        if count > 1 and count > min(self.max_queue, self.per_client):
            self.metrics.reject("invalid")  # a retry could never be admitted: not a 429
            raise ApiError(400, f"this request needs {count} batch slots (prompts x n); this server queues at most "
                                f"{min(self.max_queue, self.per_client)} per client (--max-queue {self.max_queue}, "
                                f"--max-queue-per-client {self.per_client})", "n")
        if self.waiting + count > self.max_queue:
            self.metrics.reject("queue_full")
            raise ApiError(429, f"server busy: {self.waiting} requests already wait for a batch slot (--max-queue "
                                f"{self.max_queue}); retry later")
        if self.clients.get(client, 0) + count > self.per_client:
            self.metrics.reject("client_queue_full")
            raise ApiError(429, f"this client already has {self.clients.get(client, 0)} requests waiting for a batch "
                                f"slot (--max-queue-per-client {self.per_client}); retry later")

    def _unqueue(self, client: str) -> None:
        left = self.clients.get(client, 0) - 1
        if left > 0:
            self.clients[client] = left
        else:
            self.clients.pop(client, None)

    async def score(self, completion: Completion, client: str = "") -> list[list[TokenLogprob | None]]:
        """echo's log-probabilities of each prompt's tokens, one forward per prompt on a worker thread, one
        request at a time (a forward keeps every position's logits: prompt x vocabulary floats). Admitted as
        generation is: each prompt counts in the queue while it waits and runs."""
        if not callable(getattr(self.model, "forward", None)):
            raise ApiError(400, "this model cannot score prompts (echo with logprobs)", "echo")
        top = completion.sampling.logprobs or 0
        with self.lock:
            self._reserve(client, len(completion.prompts))
        try:
            async with self._scorer():
                return [await asyncio.to_thread(prompt_logprobs, self.model, ids, top) for ids in completion.prompts]
        except (RuntimeError, ValueError) as exc:  # onnxruntime's failures
            raise ApiError(500, f"scoring the prompt failed: {exc}") from None
        finally:
            self._release_slots(client, len(completion.prompts))

    def _scorer(self) -> asyncio.Semaphore:
        if self._scoring is None:  # created on the event loop, where it is awaited
            self._scoring = asyncio.Semaphore(1)
        return self._scoring

    def end(self, handle: Handle, reason: str) -> None:
        """End a request from the event loop: its handler gets ("end", None, reason) now, and the engine drops
        its choices at its next step."""
        if handle.ended is not None or handle.open == 0:  # ended already, or finished by the engine
            return
        handle.ended = reason
        handle.events.put_nowait(("end", None, reason))
        self._cancel(handle)

    def stop(self, handle: Handle, index: int, request: Request | None = None) -> None:
        """End one choice as a stop (a stop string in its text, or a stop token): it finishes with "stop".
        From the engine thread `request` is given, since handle.requests may not hold it yet."""
        handle.stopped.add(index)
        request = request or handle.requests[index]
        if not request.finished:
            self.engine.cancel(request)

    def release(self, handle: Handle) -> None:
        """The handler is done with the request (answered, or its client left): stop its timer and free its slots."""
        if handle.timer is not None:
            handle.timer.cancel()
            handle.timer = None
        self._cancel(handle)

    def _cancel(self, handle: Handle) -> None:
        for request in handle.requests:
            if not request.finished:
                self.engine.cancel(request)

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

    def _on_token(self, handle: Handle, index: int, request: Request, token: int) -> None:
        self.last_token = time.monotonic()
        if len(request.tokens) == 1:  # the engine appends a token before announcing it
            self._start(handle)
        if token in handle.completion.stop_ids:
            self.stop(handle, index, request)
        _post(handle, ("token", index, token, self.engine.take_logprob(request)))

    def _start(self, handle: Handle) -> None:
        with self.lock:
            handle.started = True
            self.waiting -= 1
            self.running += 1
            self._unqueue(handle.client)

    def _on_finish(self, handle: Handle, index: int, request: Request) -> None:
        with self.lock:
            if request.tokens:
                self.running -= 1
            else:
                self.waiting -= 1
                self._unqueue(handle.client)
            handle.open -= 1
            if handle.open == 0:
                self.live.discard(handle)
        reason = _finish_reason(request, self.eos, index in handle.stopped)
        self.engine.forget(request)
        self.metrics.request_done(request, reason)
        _post(handle, ("end", index, reason))

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
        speculation = self.engine.spec_stats if self.engine.speculation is not None else None
        return self.metrics.render(waiting, running, info, speculation)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(None if error is None else str(error))


def _finish_reason(request: Request, eos: tuple[int, ...], stopped: bool) -> str:
    if request.error is not None:
        return "error"
    if stopped:
        return "stop"
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
                  max_queue_per_client: int | None = None, request_timeout: float | None = None,
                  chat_template: tuple[str, str] | None = None, metric_names: str = "recipec",
                  speculation: SpecConfig | None = None) -> Service:
    """Load a built variant under the recipe's serving policy (or the one given). chat_template: a template's
    text and where it came from (the command line), which replaces the recipe's and the tokenizer's."""
    manifest = command_manifest(build_dir, [variant])
    serving = manifest["recipe"]["resolved"].get("serving", {})
    variant_dir = Path(build_dir) / VARIANTS / variant
    if chat_template is None and serving.get("chat_template"):
        chat_template = (serving["chat_template"], "the recipe's serving.chat_template")
    template = load_chat_template(variant_dir, *(chat_template or (None, "")))
    model = runtime.load(variant_dir, device or serving.get("device", "auto"),
                         threads=threads if threads is not None else (serving.get("threads") or None))
    identity = model.artifact["model"]
    spec = ModelSpec(f"{manifest['recipe']['name']}/{variant}", int(identity["vocab_size"]),
                     identity.get("max_position_embeddings"), load_tokenizer(variant_dir), (variant,), template)
    policy = policy or policy_from_serving(serving)
    # a shared-buffer variant decodes in slots, one per batch row, the buffer growing with the longest request
    return Service(step_model(model, policy.max_batch_size), spec, policy, max_queue, max_queue_per_client,
                   request_timeout, metric_names, speculation)
