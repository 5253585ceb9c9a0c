"""The stage cache: entries appear whole or not at all, and a damaged entry is detected and discarded."""
from __future__ import annotations

import os

from recipec.build.cache import StageCache


def _commit(cache: StageCache, key: str, payload: bytes = b"weights") -> None:
    work = cache.new_workdir(key)
    (work / "output" / "model.onnx").write_bytes(payload)
    (work / "output" / "sub").mkdir()
    (work / "output" / "sub" / "a.json").write_text("{}")
    cache.commit(key, work, {"m": 1}, 0.5)


def test_commit_then_lookup_returns_the_files_and_metrics(tmp_path):
    cache = StageCache(tmp_path)
    assert cache.lookup("k" * 64) is None
    _commit(cache, "k" * 64)
    entry = cache.lookup("k" * 64)
    assert entry and (entry.output / "model.onnx").read_bytes() == b"weights"
    assert entry.meta["metrics"] == {"m": 1} and set(entry.meta["files"]) == {"model.onnx", "sub/a.json"}
    assert not list((tmp_path / "tmp").iterdir())


def test_altered_truncated_or_extra_files_are_detected_and_discarded(tmp_path):
    warnings: list[str] = []
    cache = StageCache(tmp_path, warn=warnings.append)
    for damage in ("alter", "truncate", "extra", "remove"):
        key = damage.ljust(64, "0")
        _commit(cache, key)
        target = cache.entry_dir(key) / "output" / "model.onnx"
        if damage == "alter":
            target.write_bytes(b"weightz")
        elif damage == "truncate":
            target.write_bytes(b"wei")
        elif damage == "extra":
            (target.parent / "stray.bin").write_bytes(b"x")
        else:
            target.unlink()
        assert cache.lookup(key) is None, damage
        assert not cache.entry_dir(key).exists()
    assert len(warnings) == 4 and all("corrupt" in w for w in warnings)


def test_a_second_commit_of_the_same_key_is_harmless(tmp_path):
    cache = StageCache(tmp_path)
    _commit(cache, "a" * 64, b"first")
    _commit(cache, "a" * 64, b"second")
    assert (cache.lookup("a" * 64).output / "model.onnx").read_bytes() == b"first"
    assert not list((tmp_path / "tmp").iterdir())


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    StageCache(tmp_path)
    stale = tmp_path / "tmp" / "abcd.999999999.deadbeef"
    live = tmp_path / "tmp" / f"abcd.{os.getpid()}.cafe0000"
    stale.mkdir()
    live.mkdir()
    StageCache(tmp_path)
    assert not stale.exists() and live.exists()
