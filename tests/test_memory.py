"""Memory: each stage's peak resident set, measured and recorded; a stage that cannot fit stops before it starts.

RECIPEC_MEMORY_LIMIT_MB stands in for a small machine: the memory guard compares a stage's estimated need
with it instead of with the memory this machine has free.
"""
from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import pytest
from test_build import recipec

from recipec.core.memory import LIMIT_ENV, max_rss_mb, peak_rss, rss_mb

RECIPE = """\
recipe: 1
name: mem
model:
  source: synthetic
  family: llama
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 128}
passes:
  - {id: ex17, op: export, with: {opset: 17}}
data:
  eval: {samples: 4, seq_len: 16}
  calibration: {samples: 4, seq_len: 16}
"""
NEED = re.compile(r"stage '(\S+)': (.+) needs about ([\d,.]+) (MiB|GiB) of memory \((.+)\) but only ([\d,.]+) MiB is "
                  rf"available \({LIMIT_ENV}=([\d.]+)\)")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A build of the recipe without a limit: its source and export stages are in the cache."""
    tmp = tmp_path_factory.mktemp("mem")
    (tmp / "mem.yaml").write_text(RECIPE)
    env = {k: v for k, v in os.environ.items() if k != LIMIT_ENV}
    env.update(RECIPEC_CACHE=str(tmp / "cache"), COLUMNS="200")
    result = recipec("build", str(tmp / "mem.yaml"), "--out", str(tmp / "out"), "--no-profile", env=env)
    assert result.returncode == 0, result.stderr
    return tmp, env


def test_every_stage_that_ran_records_its_peak_rss(built):
    tmp, _ = built
    stages = json.loads((tmp / "out" / "mem" / "manifest.json").read_text())["stages"]
    assert [s["id"] for s in stages] == ["source", "ex17", "baseline"]
    for stage in stages:
        # at least the interpreter with torch imported; far below this machine's memory
        assert 100 < stage["peak_rss_mb"] < 8192, stage
        assert stage["peak_rss_method"], stage
    assert stages[0]["memory_estimate_mb"] is None  # the source stage sizes itself from the model's config
    assert all(s["memory_estimate_mb"] > 0 for s in stages[1:])


def test_a_stage_that_needs_more_than_the_limit_stops_before_it_runs(built):
    tmp, env = built
    recipe = tmp / "mem18.yaml"
    recipe.write_text(RECIPE.replace("opset: 17", "opset: 18"))  # a new export stage; the source stays cached
    limited = {**env, LIMIT_ENV: "0.1"}
    result = recipec("build", str(recipe), "--out", str(tmp / "out18"), "--no-profile", env=limited)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    match = NEED.search(" ".join(result.stderr.split()))
    assert match, result.stderr
    stage, what, need, unit, basis, have, limit = match.groups()
    assert (stage, what, limit) == ("ex17", "export", "0.1") and float(have) == 0.1
    assert float(need) > 0.1 and "float32 weights of its input" in basis
    assert re.search(r"cached\s+source", result.stderr) and not re.search(r"running\s+ex17", result.stderr)
    # nothing half-written: no out/<name>/, no staging directory, no cache temporary, no entry for the stage
    assert not (tmp / "out18").exists() or not list((tmp / "out18").iterdir())
    assert not list((tmp / "cache" / "tmp").iterdir())
    plan = json.loads(recipec("plan", str(recipe), "--format", "json", env=env).stdout)
    assert {s["id"]: s["cached"] for s in plan["stages"]} == {"source": True, "ex17": False, "baseline": True}
    # the same build without the limit goes through
    again = recipec("build", str(recipe), "--out", str(tmp / "out18"), "--no-profile", env=env)
    assert again.returncode == 0, again.stderr


def test_the_source_stage_is_sized_by_the_same_guard(tmp_path):
    recipe = tmp_path / "src.yaml"
    recipe.write_text(RECIPE.replace("hidden_size: 32, intermediate_size: 64", "hidden_size: 256, intermediate_size: 688")
                      .replace("vocab_size: 128", "vocab_size: 4096"))  # 3.5M parameters
    env = {**os.environ, "RECIPEC_CACHE": str(tmp_path / "cache"), LIMIT_ENV: "8", "COLUMNS": "200"}
    result = recipec("build", str(recipe), "--out", str(tmp_path / "out"), "--no-profile", env=env)
    assert result.returncode == 1, result.stderr
    match = NEED.search(" ".join(result.stderr.split()))
    assert match and match.group(1) == "source", result.stderr
    assert re.match(r"the model has [\d.]+M parameters: at float32, load$", match.group(2)), match.group(2)
    assert not (tmp_path / "out" / "mem").exists()


def test_a_malformed_limit_is_a_usage_error(built, tmp_path):
    tmp, env = built
    result = recipec("build", str(tmp / "mem.yaml"), "--out", str(tmp_path / "out"), "--no-profile", "--force",
                     env={**env, LIMIT_ENV: "lots"})
    assert result.returncode == 2, result.stderr
    assert f"{LIMIT_ENV}='lots': expected a positive number of MiB" in result.stderr


def test_peak_rss_catches_a_freed_allocation_below_the_process_peak():
    """The kernel's peak mark is left alone (/usr/bin/time -v reads it); a stage whose peak stays below it is
    sampled by a separate process."""
    block = np.ones(400 * 2**20 // 8)  # raise the process's peak mark well above what follows
    del block
    mark, before = max_rss_mb(), rss_mb()
    with peak_rss() as peak:
        block = np.ones(150 * 2**20 // 8)
        del block
    assert max_rss_mb() == mark
    assert "sampled" in peak.method
    assert before + 120 < peak.mb < mark


def test_peak_rss_is_the_kernel_mark_when_the_block_raises_it():
    started = time.perf_counter()
    with peak_rss() as peak:
        entered = time.perf_counter()
        block = np.ones((int(max_rss_mb()) + 200) * 2**20 // 8)
        del block
        leaving = time.perf_counter()
    assert "ru_maxrss" in peak.method and peak.mb == max_rss_mb()
    # starting and stopping the sampler; the block's own time is the worker's peak so far (GBs in a long
    # xdist worker: 6.7 s once on a busy host) and says nothing of peak_rss
    assert (entered - started) + (time.perf_counter() - leaving) < 5
