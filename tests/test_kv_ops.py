"""KV-cache moves on the device (runtime/kv_ops.py): select and merge give exactly what the host numpy
code gave, keep OrtValues as OrtValues without a copy to the host, and continuous batching through the
engine computes the same logits as with host moves."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from recipec.runtime import lm as runtime
from recipec.runtime.engine import CacheOps, Engine, FakeClock, Policy
from recipec.runtime.kv_ops import KVOps

LAYERS, HEADS, DIM = 3, 2, 4


# The numpy moves the runtime made before kv_ops, kept as the reference.
def host_select(cache: runtime.KVCache, rows) -> runtime.KVCache:
    cache, rows = cache.host(), np.asarray(rows, np.int64)
    mask = cache.mask[rows]
    used = mask.any(axis=0)
    start = int(used.argmax()) if used.any() else mask.shape[1]
    return runtime.KVCache([k[rows, :, start:] for k in cache.keys], [v[rows, :, start:] for v in cache.values],
                           mask[:, start:])


def host_merge(a: runtime.KVCache, b: runtime.KVCache) -> runtime.KVCache:
    length = max(a.seq_len, b.seq_len)

    def padded(cache):
        cache, widths = cache.host(), ((0, 0), (0, 0), (length - cache.seq_len, 0), (0, 0))
        return ([np.pad(k, widths) for k in cache.keys], [np.pad(v, widths) for v in cache.values],
                np.pad(cache.mask, ((0, 0), (length - cache.seq_len, 0))))

    (ak, av, am), (bk, bv, bm) = padded(a), padded(b)
    return runtime.KVCache([np.concatenate(p) for p in zip(ak, bk)], [np.concatenate(p) for p in zip(av, bv)],
                           np.concatenate([am, bm]))


def random_cache(rng, lengths: list[int], dtype, ops: KVOps | None, device: bool) -> runtime.KVCache:
    """A left-padded cache whose rows hold `lengths` real tokens (padding columns hold noise, as they may)."""
    width = max(lengths, default=0)
    mask = np.array([[0] * (width - n) + [1] * n for n in lengths], np.int64).reshape(len(lengths), width)

    def tensors():
        arrays = [rng.standard_normal((len(lengths), HEADS, width, DIM)).astype(dtype) for _ in range(LAYERS)]
        return [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays] if device else arrays

    return runtime.KVCache(tensors(), tensors(), mask, ops)


def assert_same(got: runtime.KVCache, want: runtime.KVCache) -> None:
    got = got.host()
    np.testing.assert_array_equal(got.mask, want.mask)
    for g, w in zip(got.keys + got.values, want.keys + want.values, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


CASES = [  # (lengths of the running cache, rows kept, lengths of the joining cache)
    ([5, 2, 7], [0, 1], [3]),  # select drops the columns only row 2 used; the joining cache is padded
    ([5, 2, 7], [2, 0], [9, 1]),  # reordered rows; the kept cache is padded
    ([4, 4], [1], [4]),  # nothing to drop, nothing to pad
    ([6, 1, 3], [1], [2]),  # one short row left
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("device", [True, False], ids=["ortvalue", "numpy"])
@pytest.mark.parametrize("lengths, keep, joining", CASES)
def test_select_and_merge_equal_the_numpy_moves(dtype, device, lengths, keep, joining):
    rng = np.random.default_rng(len(lengths) + len(keep))
    ops = KVOps("cpu")
    running, joiner = (random_cache(rng, n, dtype, ops, device) for n in (lengths, joining))
    kept = running.select(keep)
    assert_same(kept, host_select(running, keep))
    assert_same(kept.merge(joiner), host_merge(host_select(running, keep), joiner))
    assert_same(joiner.merge(kept), host_merge(joiner, host_select(running, keep)))
    kind = ort.OrtValue if device else np.ndarray
    assert all(isinstance(t, kind) for t in kept.merge(joiner).keys + kept.merge(joiner).values)


def test_empty_and_hand_made_caches_still_work():
    """An empty numpy cache (prefill's past) merges with a device cache; a cache without ops uses CPU ones."""
    rng = np.random.default_rng(0)
    device = random_cache(rng, [2, 3], np.float32, KVOps("cpu"), True)
    empty = runtime.KVCache([np.zeros((1, HEADS, 0, DIM), np.float32)] * LAYERS,
                            [np.zeros((1, HEADS, 0, DIM), np.float32)] * LAYERS, np.zeros((1, 0), np.int64))
    merged = device.merge(empty)
    assert_same(merged, host_merge(device, empty))
    assert merged.mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert_same(empty.select([0]), host_select(empty, [0]))
    hand_made = random_cache(rng, [1, 4], np.float16, None, False)
    assert_same(hand_made.select([1]), host_select(hand_made, [1]))


def test_moves_of_a_model_cache_never_reach_the_host(exported, monkeypatch):
    lm = runtime.load(exported("qwen2")[0], device="cpu")
    _, running = lm.prefill([[5, 17, 99, 3], [7, 1]])
    _, joining = lm.prefill([[9, 9, 30, 31, 32, 33]])
    want = host_merge(host_select(running, [1]), joining)

    def no_host_copy(self):
        raise AssertionError("a KV tensor was copied to the host")

    def no_kv_upload(array, *args, **kwargs):
        assert np.ndim(array) != 4, "a KV tensor was copied from the host"
        return from_numpy(array, *args, **kwargs)

    from_numpy = ort.OrtValue.ortvalue_from_numpy
    with monkeypatch.context() as patch:
        patch.setattr(ort.OrtValue, "numpy", no_host_copy)
        patch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(no_kv_upload))
        merged = running.select([1]).merge(joining)
    assert all(isinstance(t, ort.OrtValue) for t in merged.keys + merged.values)
    assert all(t.device_name().lower() == "cpu" for t in merged.keys + merged.values)
    assert_same(merged, want)


class CountedCacheOps(CacheOps):
    """The engine's default moves (the cache's select and merge), counted."""

    def __init__(self):
        self.calls = []

    def select(self, cache, rows):
        self.calls.append("select")
        return super().select(cache, rows)

    def merge(self, a, b):
        self.calls.append("merge")
        return super().merge(a, b)


class HostCacheOps(CacheOps):
    """The engine's cache moves as they were: through host numpy arrays."""

    def select(self, cache, rows):
        return host_select(cache, rows)

    def merge(self, a, b):
        return host_merge(a, b)


class Recording:
    """The model, keeping every step's logits."""

    def __init__(self, lm):
        self.lm, self.logits = lm, []

    def prefill(self, prompts):
        logits, cache = self.lm.prefill(prompts)
        self.logits.append(logits)
        return logits, cache

    def decode(self, tokens, cache):
        logits, cache = self.lm.decode(tokens, cache)
        self.logits.append(logits)
        return logits, cache


def test_continuous_batching_logits_equal_host_moves(exported):
    """Requests join and leave a running batch (max 3 rows, different lengths): every step's logits are
    bit for bit those of the host-numpy moves."""
    lm = runtime.load(exported("llama")[0], device="cpu")
    prompts = [[5, 17, 99, 3, 42], [7, 1], [9, 9, 30], [11, 12, 13, 14, 15, 16, 17], [4], [60, 61, 62]]
    budgets = [6, 2, 4, 3, 5, 2]
    runs, counted = [], CountedCacheOps()
    for ops in (counted, HostCacheOps()):
        model = Recording(lm)
        engine = Engine(model, Policy("continuous", max_batch_size=3), FakeClock(), ops)
        requests = [engine.submit(p, n, arrival=0.0) for p, n in zip(prompts, budgets)]
        while not engine.idle:
            engine.step(flush=True)
        steps = [(s.kind, s.rows, s.padded_len) for s in engine.steps]
        runs.append((model.logits, [r.tokens for r in requests], steps))
    (device_logits, device_tokens, device_steps), (host_logits, host_tokens, host_steps) = runs
    assert {"select", "merge"} <= set(counted.calls), "no request joined or left a running batch"
    assert device_tokens == host_tokens and device_steps == host_steps
    assert [len(t) for t in device_tokens] == budgets
    for got, want in zip(device_logits, host_logits, strict=True):
        np.testing.assert_array_equal(got, want)
