"""The serving engine that recipec measures: a scheduler over a step-level model.

The model only needs `prefill(prompts) -> (last_logits [B,V], cache)` and
`decode(tokens [B], cache) -> (logits [B,V], cache)`; row selection and merging of caches go through
`CacheOps` so the engine does not depend on one runtime's cache class.

Three batching policies:
- static: batches of exactly max_batch_size, run to completion together. A partial batch runs only
  when the caller says no more requests can come before it (`step(flush=True)`), e.g. a closed loop
  whose clients are all waiting, or the end of an open-loop trace.
- dynamic (Triton): a batch launches when max_batch_size requests wait or the oldest has waited
  max_wait_ms; it then runs to completion while new arrivals queue.
- continuous (Orca/vLLM iteration-level): each step either prefills newly admitted requests, which
  then join the running decode batch, or decodes every running request; finished requests leave
  at once. Prefill is prioritized (vLLM v0), bounded by max_batch_size rows and max_tokens_per_step
  prompt tokens per prefill step.

In static and dynamic batching a finished row keeps being computed until its batch ends: that is
how request-level batching behaves and the waste that iteration-level scheduling removes.

Threading: `submit` and `Request.cancel` may be called from any thread. `step` must be called from
one thread at a time: either a driver (the load generator, on a real or fake clock) or the engine's
own thread started with `start()` (what an HTTP server uses; it streams through `on_token`/`on_finish`).
"""
from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from recipec.runtime.proposers import NgramIndex, Proposal, Sampler
from recipec.runtime.records import RequestRecord, StepRecord
from recipec.runtime.speculative import SpecConfig, SpecStats, verify

POLICIES = ("static", "dynamic", "continuous")
_ARGMAX = Sampler()  # verification by argmax: the engine's own tokens are greedy (SamplingEngine._greedy)


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.perf_counter()

    def sleep_until(self, t: float) -> None:
        dt = t - time.perf_counter()
        if dt > 0:
            time.sleep(dt)


class FakeClock:
    """Time that moves only when told: a fake model advances it by the cost of each step."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)


class StepModel(Protocol):
    def prefill(self, prompts: list[list[int]]) -> tuple[Any, Any]: ...

    def decode(self, tokens: Sequence[int], cache: Any) -> tuple[Any, Any]: ...


class CacheOps:
    """Default cache operations: methods on the cache object (`select`, `merge`, `seq_len`)."""

    def select(self, cache: Any, rows: list[int]) -> Any:
        return cache.select(rows)

    def merge(self, a: Any, b: Any) -> Any:
        return a.merge(b)

    def length(self, cache: Any) -> int:
        return int(cache.seq_len)


@dataclass
class Policy:
    batching: str = "continuous"
    max_batch_size: int = 8
    max_wait_ms: float = 10.0  # dynamic only
    max_tokens_per_step: int | None = None  # continuous only: prompt tokens per prefill step

    def __post_init__(self):
        if self.batching not in POLICIES:
            raise ValueError(f"batching must be one of {POLICIES}, got {self.batching!r}")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")


def policy_from_serving(serving: dict[str, Any]) -> Policy:
    """The recipe's serving.batching as an engine Policy; a list of policies (profiled side by side)
    deploys its first."""
    b = serving.get("batching", {})
    name = b.get("policy", "continuous")
    name = name[0] if isinstance(name, list) else name
    return Policy(name, int(b.get("max_batch_size", 8)), float(b.get("max_wait_ms", 5.0)), b.get("max_tokens_per_step"))


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_new_tokens: int
    arrival: float
    ignore_eos: bool = True
    on_token: Callable[["Request", int, float], None] | None = None
    on_finish: Callable[["Request"], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    cancelled: bool = False
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    # set with `done` by the engine: the scheduler reads it for every row at every step, where a plain
    # attribute is cheaper than the Event's method (other threads wait on `done`)
    finished: bool = False

    def cancel(self) -> None:
        # Read by the scheduler thread at its next step; a bool store is atomic under the GIL.
        self.cancelled = True

    def record(self) -> RequestRecord:
        return RequestRecord(self.arrival, list(self.token_times), len(self.prompt), self.cancelled)


class Engine:
    def __init__(self, model: StepModel, policy: Policy, clock: Clock | None = None,
                 cache_ops: CacheOps | None = None, eos_token_id: int | Sequence[int] | None = None,
                 record_steps: bool = True, speculation: SpecConfig | None = None):
        self.model, self.policy = model, policy
        if speculation is not None and speculation.method != "ngram":
            raise ValueError("the engine speculates with ngram (prompt lookup) only; a draft model runs in "
                             "recipec run (generate_speculative)")
        # a model without `verify` (the growing-cache OnnxLM, a test's fake) decodes one token per step
        self.speculation = speculation if hasattr(model, "verify") else None
        self.spec_stats = SpecStats()
        self.clock = clock or RealClock()
        self.ops = cache_ops or CacheOps()
        self.eos_token_id = eos_token_id  # one id or several (generation_config may list many)
        self.steps: list[StepRecord] = []
        self.record_steps = record_steps  # a server runs forever: it cannot keep a record per model call
        self._inbox: deque[Request] = deque()
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._rows: list[Request] = []  # one per cache row
        self._cache: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._prefilling: list[Request] = []
        # a request's n-gram index lives as long as the request does
        self._indexes: weakref.WeakKeyDictionary[Request, NgramIndex] = weakref.WeakKeyDictionary()

    # ---- submission (any thread) ----
    def submit(self, prompt: Sequence[int], max_new_tokens: int, *, ignore_eos: bool = True,
               arrival: float | None = None, on_token=None, on_finish=None) -> Request:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        req = Request(list(prompt), max_new_tokens, self.clock.now() if arrival is None else arrival,
                      ignore_eos, on_token, on_finish)
        with self._cond:
            self._inbox.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Cancel from any thread; wakes the engine thread so a queued request leaves at once."""
        req.cancel()
        with self._cond:
            self._cond.notify()

    # ---- scheduling (one thread) ----
    @property
    def idle(self) -> bool:
        return not (self._inbox or self._waiting or self._rows)

    def step(self, flush: bool = False) -> bool:
        """Run at most one model call; False when the policy chose to wait (see next_wakeup)."""
        self._take_inbox()
        self._drop_cancelled()
        if self._rows:
            new = self._admissible() if self.policy.batching == "continuous" else []
            if new:
                self._prefill(new)
            else:
                self._decode()
            return True
        batch = self._launchable(flush)
        if batch:
            self._prefill(batch)
            return True
        return False

    def next_wakeup(self) -> float | None:
        """When a waiting engine would act without a new arrival (dynamic's max_wait), else None."""
        if self.policy.batching == "dynamic" and self._waiting and not self._rows:
            return self._waiting[0].arrival + self.policy.max_wait_ms / 1000.0
        return None

    def _take_inbox(self) -> None:
        if not self._inbox:  # a submit racing this read is taken at the next step (it notifies the loop too)
            return
        with self._cond:
            while self._inbox:
                self._waiting.append(self._inbox.popleft())

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            self._finish(r)
        if any(r.cancelled and not r.finished for r in self._rows):
            for r in self._rows:
                if r.cancelled:
                    self._finish(r)
            self._retire_rows()

    def _take(self, n: int) -> list[Request]:
        return [self._waiting.popleft() for _ in range(min(n, len(self._waiting)))]

    def _launchable(self, flush: bool) -> list[Request]:
        p, n = self.policy, len(self._waiting)
        if p.batching == "continuous":
            return self._admissible()
        if n >= p.max_batch_size or (n and p.batching == "static" and flush):
            return self._take(p.max_batch_size)
        wake = self.next_wakeup()
        if wake is not None and self.clock.now() >= wake:
            return self._take(p.max_batch_size)
        return []

    def _admissible(self) -> list[Request]:
        """FIFO, stopping at the first request that does not fit, so no request is overtaken.
        A prompt longer than the token budget still runs alone rather than never."""
        room = self.policy.max_batch_size - len(self._rows)
        if not (room > 0 and self._waiting):
            return []
        budget = self.policy.max_tokens_per_step or float("inf")
        n, tokens = 0, 0
        for r in self._waiting:
            if n >= room or (n and tokens + len(r.prompt) > budget):
                break
            n, tokens = n + 1, tokens + len(r.prompt)
        return self._take(n)

    def _run(self, kind: str, call: Callable[[], tuple[Any, Any]], shape: Callable[[], tuple[list[int], int]],
             rows: Sequence[Request]) -> tuple[np.ndarray, Any]:
        """One model call and its tokens; `shape` (the rows' context lengths, the padded length) is asked before
        the call, and only when steps are recorded: a server's step does no bookkeeping it will not keep."""
        ctx, padded, t0 = (*shape(), self.clock.now()) if self.record_steps else ((), 0, 0.0)
        logits, cache = call()
        tokens = self._pick(logits, rows)
        if self.record_steps:
            self.steps.append(StepRecord(kind, t0, self.clock.now(), list(ctx), len(tokens), padded,
                                         getattr(self.model, "session_seconds", None)))
        return tokens, cache

    def _pick(self, logits: Any, rows: Sequence[Request]) -> np.ndarray:
        """One token per row of the step's logits: greedy, so the measured workload is deterministic."""
        return np.asarray(logits).argmax(axis=-1)

    def _prefill(self, reqs: list[Request]) -> None:
        # Taken off the queue and not yet rows: a failed prefill must fail them here, or no one would.
        self._prefilling = reqs
        tokens, cache = self._run("prefill", lambda: self.model.prefill([r.prompt for r in reqs]),
                                  lambda: ([len(r.prompt) for r in reqs], max(len(r.prompt) for r in reqs)), reqs)
        self._prefilling = []
        self._emit(reqs, tokens, self.clock.now())
        if self.policy.batching != "continuous":
            self._rows, self._cache = list(reqs), cache
        else:
            keep = [i for i, r in enumerate(reqs) if not r.finished]
            if keep:
                cache = cache if len(keep) == len(reqs) else self.ops.select(cache, keep)
                self._cache = cache if not self._rows else self.ops.merge(self._cache, cache)
                self._rows += [reqs[i] for i in keep]
        self._retire_rows()

    def _decode(self) -> None:
        if self.speculation is not None and self._speculate():
            return
        rows = self._rows
        live = 0 if self.speculation is None else sum(not r.finished for r in rows)
        tokens, self._cache = self._run(
            "decode", lambda: self.model.decode([r.tokens[-1] for r in rows], self._cache),
            lambda: ([len(r.prompt) + len(r.tokens) for r in rows if not r.finished],
                     self.ops.length(self._cache) + 1), rows)
        ended = self._emit(rows, tokens, self.clock.now())
        if live:  # a plain step is a target step that emitted one token per row
            self.spec_stats.target_steps += live
            self.spec_stats.step_tokens += live
        if ended:  # else the rows are the ones the last retirement kept
            self._retire_rows()

    def _speculate(self) -> bool:
        """One verification step for every row (docs/speculative.md, "In the engine"): each row's n-gram lookup,
        padded to the longest so that every row feeds the same tokens; a padding token the target happens to
        pick is kept like a proposal, since only the target's argmax is ever emitted. False (decode plainly)
        when nothing was proposed, a row samples or wants logprobs, or the graph cannot verify this batch."""
        spec, rows = self.speculation, self._rows
        if not (self._greedy(rows) and self.model.verifies(self._cache)):
            return False
        # a step emits its accepted proposals and one token more: propose no more than a row has room for
        room = [0 if r.finished else min(spec.tokens, r.max_new_tokens - len(r.tokens) - 1) for r in rows]
        proposals = [self._lookup(r).propose(k) if k > 0 else [] for r, k in zip(rows, room)]
        width = max(map(len, proposals))
        past = self.ops.length(self._cache)
        if width == 0 or past + width + 1 > getattr(self.model, "context_length", float("inf")):
            return False
        fed = [[r.tokens[-1], *p, *[r.tokens[-1]] * (width - len(p))] for r, p in zip(rows, proposals)]
        t0 = self.clock.now()
        logits = self.model.verify(np.asarray(fed, np.int64), self._cache)
        kept = [verify(logits[i], Proposal(fed[i][1:]), _ARGMAX) for i in range(len(rows))]
        self.model.keep(self._cache, [width - accepted for accepted, _ in kept])
        live = [r for r in rows if not r.finished]
        if self.record_steps:
            self.steps.append(StepRecord("decode", t0, self.clock.now(), [len(r.prompt) + len(r.tokens) for r in live],
                                         len(rows), past + width + 1, getattr(self.model, "session_seconds", None)))
        t = self.clock.now()
        stats = self.spec_stats
        for r, proposal, (accepted, new) in zip(rows, proposals, kept):
            if r.finished:
                continue
            before = len(r.tokens)
            for token in new:
                self._emit([r], [token], t)
            stats.target_steps += 1
            stats.proposed += len(proposal)
            stats.accepted += min(accepted, len(proposal))
            stats.step_tokens += len(r.tokens) - before
        self._retire_rows()
        return True

    def _lookup(self, request: Request) -> NgramIndex:
        """The request's n-gram index, brought up to its last token (built from its prompt on first use)."""
        index = self._indexes.get(request)
        if index is None:
            index = self._indexes[request] = NgramIndex(self.speculation.max_ngram)
            index.extend(request.prompt)
        index.extend(request.tokens[len(index.tokens) - len(request.prompt):])
        return index

    def _greedy(self, rows: Sequence[Request]) -> bool:
        """Whether every row picks tokens by argmax alone (what verification by argmax reproduces)."""
        return True

    def _emit(self, reqs: Sequence[Request], tokens: np.ndarray | list[int], t: float) -> bool:
        """Appends each row's token; whether a request finished."""
        ended = False
        for r, tok in zip(reqs, tokens if isinstance(tokens, list) else tokens.tolist()):
            if r.finished:
                continue
            r.tokens.append(tok)
            r.token_times.append(t)
            if r.on_token:
                r.on_token(r, tok, t)
            eos = not r.ignore_eos and self._is_eos(tok)
            if eos or len(r.tokens) >= r.max_new_tokens:
                self._finish(r)
                ended = True
        return ended

    def _is_eos(self, tok: int) -> bool:
        e = self.eos_token_id
        return e is not None and (tok in e if isinstance(e, (list, tuple, set, frozenset)) else tok == e)

    def _finish(self, r: Request, error: BaseException | None = None) -> None:
        if r.finished:
            return
        r.error = error
        r.finished = True
        r.done.set()
        if r.on_finish:
            r.on_finish(r)

    def _retire_rows(self) -> None:
        if all(r.finished for r in self._rows):
            self._rows, self._cache = [], None
        elif self.policy.batching == "continuous" and any(r.finished for r in self._rows):
            keep = [i for i, r in enumerate(self._rows) if not r.finished]
            self._cache = self.ops.select(self._cache, keep)
            self._rows = [self._rows[i] for i in keep]

    # ---- background thread (for a server) ----
    def start(self, flush_static: bool = True) -> None:
        """Run the scheduler on its own thread. With `flush_static`, a static batch that cannot
        fill runs when the engine is otherwise idle; without it a lone request would wait forever."""
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, args=(flush_static,), name="recipec-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The scheduler thread runs (what a server's liveness probe asks)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self, flush_static: bool) -> None:
        while not self._stopping:
            try:
                if self.step(flush=flush_static):
                    continue
            except Exception as exc:  # a failed model call fails its requests, not the server
                self._fail_all(exc)
                continue
            wake = self.next_wakeup()
            with self._cond:
                if not self._inbox and not self._stopping:
                    self._cond.wait(None if wake is None else max(0.0, wake - self.clock.now()))

    def _fail_all(self, exc: BaseException) -> None:
        for r in list(self._prefilling) + list(self._rows) + list(self._waiting):
            self._finish(r, exc)
        self._rows, self._cache, self._waiting, self._prefilling = [], None, deque(), []
