"""Scheduling order of each batching policy, on a fake clock with a fake model whose steps cost
known times; and the load generator's arrivals."""
from __future__ import annotations


import numpy as np
import pytest

from recipec.runtime.engine import Engine, FakeClock, Policy, RealClock
from recipec.profile.loadgen import Item, Workload, drive, gamma_offsets, make_items, run_closed_loop, run_open_loop

VOCAB = 50


class FakeCache:
    def __init__(self, rows: list[int], seq_len: int):
        self.rows, self.seq_len = rows, seq_len  # rows: request tags, to check what the engine merged

    def select(self, keep):
        return FakeCache([self.rows[i] for i in keep], self.seq_len)

    def merge(self, other):
        return FakeCache(self.rows + other.rows, max(self.seq_len, other.seq_len))


class FakeModel:
    """Next token = last token + 1 (mod VOCAB). Prefill costs 1 ms per prompt token of the padded
    batch + 5 ms; decode costs 10 ms + 1 ms per row. Records every call."""

    def __init__(self, clock, tick=None):
        self.clock, self.calls = clock, []
        self.tick = tick or clock.advance

    def _logits(self, last):
        out = np.zeros((len(last), VOCAB), dtype=np.float32)
        out[np.arange(len(last)), (np.asarray(last) + 1) % VOCAB] = 1.0
        return out

    def prefill(self, prompts):
        width = max(map(len, prompts))
        self.calls.append(("prefill", len(prompts), self.clock.now()))
        self.tick(0.005 + 0.001 * width * len(prompts))
        return self._logits([p[-1] for p in prompts]), FakeCache([p[0] for p in prompts], width)

    def decode(self, tokens, cache):
        assert len(tokens) == len(cache.rows), "cache rows and tokens out of step"
        self.calls.append(("decode", len(tokens), self.clock.now()))
        self.tick(0.010 + 0.001 * len(tokens))
        return self._logits(tokens), FakeCache(cache.rows, cache.seq_len + 1)


def setup(batching, **kw):
    clock = FakeClock()
    model = FakeModel(clock)
    return Engine(model, Policy(batching, **kw), clock), model, clock


def kinds(model):
    return [(k, b) for k, b, _ in model.calls]


def items(n, prompt_len=4, out=3):
    return [Item([i] * prompt_len, out) for i in range(n)]


def test_static_runs_fixed_batches_to_completion():
    eng, model, clock = setup("static", max_batch_size=2)
    res = drive(eng, items(3), [0.0] * 3, cap=3, clock=clock)
    assert kinds(model) == [("prefill", 2), ("decode", 2), ("decode", 2), ("prefill", 1), ("decode", 1), ("decode", 1)]
    third = res.records[2]
    assert third.token_times[0] > res.records[0].token_times[-1]  # waited for the whole first batch
    assert all(r.n_out == 3 for r in res.records)


def test_static_waits_for_a_full_batch_in_open_loop():
    eng, model, clock = setup("static", max_batch_size=2)
    drive(eng, items(3), [0.0, 1.0, 1.5], cap=float("inf"), clock=clock)
    assert model.calls[0][:2] == ("prefill", 2) and model.calls[0][2] == pytest.approx(1.0)
    # the third request is the last of the trace: it runs alone rather than never
    assert model.calls[3][:2] == ("prefill", 1)


def test_static_keeps_computing_finished_rows():
    eng, model, clock = setup("static", max_batch_size=2)
    a = eng.submit([1, 2], 1, arrival=0.0)
    b = eng.submit([3, 4], 3, arrival=0.0)
    while eng.step(flush=True):
        pass
    assert kinds(model) == [("prefill", 2), ("decode", 2), ("decode", 2)]
    assert (a.tokens, b.tokens) == ([3], [5, 6, 7])
    assert [s.ctx for s in eng.steps] == [[2, 2], [3], [4]]  # only useful rows count as FLOPs


def test_dynamic_waits_at_most_max_wait():
    eng, model, clock = setup("dynamic", max_batch_size=4, max_wait_ms=50)
    drive(eng, items(3), [0.0, 0.01, 0.2], cap=float("inf"), clock=clock)
    prefills = [(b, t) for k, b, t in model.calls if k == "prefill"]
    assert prefills[0][0] == 2 and prefills[0][1] == pytest.approx(0.05)
    assert prefills[1][0] == 1 and prefills[1][1] == pytest.approx(0.25)


def test_dynamic_launches_a_full_batch_at_once():
    eng, model, clock = setup("dynamic", max_batch_size=2, max_wait_ms=1000)
    drive(eng, items(2), [0.0, 0.0], cap=float("inf"), clock=clock)
    assert model.calls[0] == ("prefill", 2, 0.0)


def test_continuous_admits_a_request_mid_decode():
    eng, model, clock = setup("continuous", max_batch_size=4)
    its = [Item([1] * 4, 6), Item([2] * 4, 2)]
    res = drive(eng, its, [0.0, 0.035], cap=float("inf"), clock=clock)
    # A: prefill 0-9 ms, decodes of 11 ms at 9, 20, 31, 42 ms; B arrives at 35 ms and is
    # prefilled at the next step boundary (42 ms), then decodes alongside A, and leaves after one.
    assert kinds(model) == [("prefill", 1), ("decode", 1), ("decode", 1), ("decode", 1), ("prefill", 1),
                            ("decode", 2), ("decode", 1)]
    b = res.records[1]
    assert b.token_times[0] - b.arrival == pytest.approx(0.042 + 0.009 - 0.035)
    assert [r.n_out for r in res.records] == [6, 2]
    assert model.calls[-1][2] == pytest.approx(b.token_times[-1])  # B left the moment it ended


def test_continuous_respects_token_budget_and_batch_size():
    eng, model, clock = setup("continuous", max_batch_size=3, max_tokens_per_step=8)
    drive(eng, items(5, prompt_len=4, out=2), [0.0] * 5, cap=float("inf"), clock=clock)
    assert kinds(model)[:3] == [("prefill", 2), ("prefill", 1), ("decode", 3)]
    assert max(b for _, b in kinds(model)) <= 3


def test_continuous_long_prompt_runs_alone_rather_than_never():
    eng, model, clock = setup("continuous", max_batch_size=2, max_tokens_per_step=4)
    drive(eng, [Item([1] * 10, 2)], [0.0], cap=1, clock=clock)
    assert kinds(model) == [("prefill", 1), ("decode", 1)]


def test_eos_stops_unless_ignored():
    eng, model, clock = setup("continuous")
    eng.eos_token_id = 3
    stop = eng.submit([1, 2], 5, ignore_eos=False)
    keep = eng.submit([1, 2], 5, ignore_eos=True)
    while eng.step():
        pass
    assert stop.tokens == [3] and keep.tokens == [3, 4, 5, 6, 7]


def test_cancel_drops_the_row():
    eng, model, clock = setup("continuous")
    a = eng.submit([1], 10)
    b = eng.submit([2], 10)
    eng.step()
    eng.step()
    eng.cancel(a)
    eng.step()
    assert a.finished and a.cancelled and len(a.tokens) == 2 and len(b.tokens) == 3
    assert eng._cache.rows == [2]  # the cancelled request's cache row is gone
    assert kinds(model)[-1] == ("decode", 1)


def test_thread_mode_streams_tokens_from_another_thread():
    clock = RealClock()
    model = FakeModel(clock, tick=lambda dt: None)
    eng = Engine(model, Policy("continuous", max_batch_size=4), clock)
    streamed: dict[int, list[int]] = {}
    eng.start()
    try:
        reqs = [eng.submit([i], 5, on_token=lambda r, tok, t: streamed.setdefault(r.id, []).append(tok))
                for i in range(3)]
        assert all(r.done.wait(5) for r in reqs)
        got = [streamed[r.id] for r in reqs]
    finally:
        eng.stop()
    assert got == [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6], [3, 4, 5, 6, 7]]


def test_thread_mode_fails_requests_when_the_model_raises():
    clock = RealClock()
    model = FakeModel(clock, tick=lambda dt: None)
    model.decode = lambda tokens, cache: (_ for _ in ()).throw(RuntimeError("boom"))
    eng = Engine(model, Policy("continuous"), clock)
    eng.start()
    try:
        r = eng.submit([1], 3)
        assert r.done.wait(5)
        with pytest.raises(RuntimeError, match="boom"):
            raise r.error
    finally:
        eng.stop()


def test_gamma_arrivals_are_seeded_with_the_right_mean():
    a = gamma_offsets(20000, rate_rps=4.0, burstiness=1.0, seed=1)
    assert np.array_equal(a, gamma_offsets(20000, 4.0, 1.0, seed=1))
    assert not np.array_equal(a, gamma_offsets(20000, 4.0, 1.0, seed=2))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # Poisson: CV 1
    bursty = np.diff(gamma_offsets(20000, 4.0, burstiness=0.25, seed=1))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.08)  # CV = 1/sqrt(shape)


def test_closed_loop_caps_in_flight_and_skips_warmup():
    eng, model, clock = setup("continuous", max_batch_size=8)
    w = Workload(num_requests=6, prompt_len=(3, 6), output_len=4, warmup_requests=2, seed=3)
    res = run_closed_loop(eng, w, VOCAB, concurrency=2, clock=clock)
    assert len(res.records) == 6 and all(r.n_out == 4 for r in res.records)
    assert all(3 <= r.n_in <= 6 for r in res.records)
    assert max(b for k, b, _ in model.calls if k == "decode") == 2
    assert res.steps[0].start >= res.records[0].arrival  # warm-up steps are not in the run
    # a closed-loop client sends its next request when its previous one ends
    ends = sorted(r.token_times[-1] for r in res.records)
    assert sorted(r.arrival for r in res.records)[2:] == pytest.approx(ends[:4])


def test_open_loop_stamps_scheduled_arrival_even_when_busy():
    eng, model, clock = setup("continuous", max_batch_size=8)
    w = Workload(num_requests=20, prompt_len=8, output_len=4, seed=5)
    res = run_open_loop(eng, w, VOCAB, rate_rps=200.0, clock=clock)
    expected = gamma_offsets(20, 200.0, 1.0, seed=5)
    assert [r.arrival for r in res.records] == pytest.approx(list(expected))


def test_same_seed_same_prompts():
    w = Workload(num_requests=3, prompt_len=(2, 9), output_len=(1, 5), seed=7)
    a, b = make_items(w, 1000, 3), make_items(w, 1000, 3)
    assert [(i.prompt, i.output_len) for i in a] == [(i.prompt, i.output_len) for i in b]


def test_a_failed_prefill_fails_the_requests_it_took_and_the_engine_lives_on():
    """Requests in a prefill that raises are neither queued nor rows yet: the engine thread must fail them, or
    their callers wait forever (a server's request deadline was the only way out)."""
    class FailingOnce(FakeModel):
        def prefill(self, prompts):
            if not self.calls:
                self.calls.append(("prefill", len(prompts), 0.0))
                raise RuntimeError("onnxruntime failed")
            return super().prefill(prompts)

    engine = Engine(FailingOnce(RealClock(), tick=lambda dt: None), Policy("continuous", max_batch_size=4))
    engine.start()
    try:
        first = [engine.submit([1, 2], 3) for _ in range(2)]
        assert all(r.done.wait(5) for r in first)
        assert all(isinstance(r.error, RuntimeError) for r in first)
        later = engine.submit([3], 2)
        assert later.done.wait(5) and later.error is None and later.tokens == [4, 5]
        assert engine.alive
    finally:
        engine.stop()
    assert not engine.alive
