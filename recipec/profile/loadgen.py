"""Load generation: which requests, when they arrive, and a driver that feeds them to an Engine.

The driver runs in the engine's own thread: between model steps it submits every request whose
arrival time has passed, stamped with that scheduled time, so time a request spends waiting behind
a running step counts as queueing, as it would for a client of a busy server. Closed loop: each of
`concurrency` clients sends its next request the moment its previous one ends. Open loop: arrival
gaps are Gamma(shape=burstiness, scale=1/(rate·burstiness)), vLLM bench serve's model (burstiness 1
is a Poisson process; lower is burstier), optionally capped at max_concurrency in flight.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from recipec.runtime.engine import Clock, Engine, Request
from recipec.runtime.records import RequestRecord, StepRecord

Length = int | Sequence[int]  # a fixed length, or [low, high] drawn uniformly (inclusive)


@dataclass
class Workload:
    num_requests: int
    prompt_len: Length = 128
    output_len: Length = 32
    warmup_requests: int = 0
    seed: int = 0
    ignore_eos: bool = True  # so every request produces exactly the output length asked for
    prompts: list[list[int]] | None = None  # real token ids; else random ids from the vocab
    output_lens: list[int] | None = None  # per prompt, beside `prompts`; else output_len


@dataclass
class Item:
    prompt: list[int]
    output_len: int


@dataclass
class RunResult:
    records: list[RequestRecord]
    steps: list[StepRecord]
    outputs: list[list[int]] = field(default_factory=list)  # each request's generated token ids


def _draw(length: Length, rng: np.random.Generator) -> int:
    if isinstance(length, int):
        return length
    lo, hi = length
    return int(rng.integers(lo, hi + 1))


def make_items(w: Workload, vocab_size: int, n: int, seed_offset: int = 0) -> list[Item]:
    """`n` requests; the same seed gives the same prompts, so every variant sees the same workload."""
    rng = np.random.default_rng(w.seed + seed_offset)
    items = []
    for i in range(n):
        out = _draw(w.output_len, rng)
        if w.prompts:
            prompt = list(w.prompts[i % len(w.prompts)])
            out = w.output_lens[i % len(w.output_lens)] if w.output_lens else out
        else:
            prompt = rng.integers(0, vocab_size, size=_draw(w.prompt_len, rng)).tolist()
        items.append(Item(prompt, out))
    return items


def gamma_offsets(n: int, rate_rps: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Arrival times (s from start) of n requests; the first at 0, as vLLM sends its first at once."""
    if rate_rps <= 0 or burstiness <= 0:
        raise ValueError("rate_rps and burstiness must be > 0")
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate_rps * burstiness), size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else np.zeros(0)


class _Slots:
    """When each of `cap` client slots became free; an uncapped open loop has no slots."""

    def __init__(self, cap: float, start: float):
        self.capped = math.isfinite(cap)
        self.free = [start] * int(cap) if self.capped else []

    def available(self) -> bool:
        return not self.capped or bool(self.free)

    def take(self, scheduled: float) -> float:
        # A capped client sends when both its request is due and a slot has freed, whichever is later.
        return max(scheduled, self.free.pop(0)) if self.capped else scheduled

    def release(self, t: float) -> None:
        if self.capped:
            bisect.insort(self.free, t)


def drive(engine: Engine, items: Sequence[Item], offsets: Sequence[float], cap: float, clock: Clock,
          ignore_eos: bool = True) -> RunResult:
    start, first_step = clock.now(), len(engine.steps)
    todo = list(zip(offsets, items))
    todo.sort(key=lambda x: x[0])
    slots, inflight, sent = _Slots(cap, start), [], []
    while todo or inflight:
        for r in [r for r in inflight if r.finished]:
            inflight.remove(r)
            slots.release(r.token_times[-1] if r.token_times else clock.now())
        while todo and slots.available() and start + todo[0][0] <= clock.now():
            off, item = todo.pop(0)
            r = engine.submit(item.prompt, item.output_len, ignore_eos=ignore_eos, arrival=slots.take(start + off))
            inflight.append(r)
            sent.append(r)
        # No request can reach the engine before it acts: a static batch may run partially full.
        blocked = not todo or not slots.available()
        if engine.step(flush=blocked) or not (todo or inflight):
            continue
        _wait(engine, clock, start + todo[0][0] if todo and slots.available() else None, inflight)
    return RunResult([r.record() for r in sent], engine.steps[first_step:], [list(r.tokens) for r in sent])


def _wait(engine: Engine, clock: Clock, next_arrival: float | None, inflight: list[Request]) -> None:
    times = [t for t in (engine.next_wakeup(), next_arrival) if t is not None]
    if not times:
        stuck = [r.id for r in inflight if not r.finished]
        raise RuntimeError(f"load generator stalled: engine idle with requests {stuck} in flight")
    clock.sleep_until(min(times))


def run_closed_loop(engine: Engine, w: Workload, vocab_size: int, concurrency: int, clock: Clock) -> RunResult:
    _warmup(engine, w, vocab_size, concurrency, clock)
    items = make_items(w, vocab_size, w.num_requests)
    return drive(engine, items, [0.0] * len(items), concurrency, clock, w.ignore_eos)


def run_open_loop(engine: Engine, w: Workload, vocab_size: int, rate_rps: float, clock: Clock,
                  burstiness: float = 1.0, max_concurrency: int | None = None) -> RunResult:
    _warmup(engine, w, vocab_size, max_concurrency or engine.policy.max_batch_size, clock)
    items = make_items(w, vocab_size, w.num_requests)
    offsets = gamma_offsets(len(items), rate_rps, burstiness, w.seed)
    return drive(engine, items, offsets, max_concurrency or math.inf, clock, w.ignore_eos)


def _warmup(engine: Engine, w: Workload, vocab_size: int, concurrency: int, clock: Clock) -> None:
    """Warm-up requests (other prompts, same shapes) pay for first-call costs; they are not counted."""
    if w.warmup_requests > 0:
        items = make_items(w, vocab_size, w.warmup_requests, seed_offset=10_000)
        drive(engine, items, [0.0] * len(items), concurrency, clock, w.ignore_eos)
