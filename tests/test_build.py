"""End-to-end builds through the CLI: caching, byte-identical rebuilds, reruns after an edit, and kills."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = """\
recipe: 1
name: tiny
model:
  source: synthetic
  family: llama
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 128}
passes:
  - {id: ex17, op: export, with: {opset: 17}}
serving:
  batching: {policy: static, max_batch_size: 2}
  workload: {prompt_tokens: 8, output_tokens: 4, requests: 4, warmup_requests: 1, concurrency: [1, 2]}
data:
  eval: {samples: 4, seq_len: 16}
  calibration: {samples: 4, seq_len: 16}
"""


def recipec(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recipec.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def workspace(tmp_path):
    env = {**os.environ, "RECIPEC_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    return tmp_path, recipe, env


def model_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.onnx*"))}


def test_build_then_cached_rebuild_is_byte_identical(workspace):
    tmp, recipe, env = workspace
    first = recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env)
    assert first.returncode == 0, first.stderr
    out = tmp / "out" / "tiny"
    assert {p.name for p in (out / "variants").iterdir()} == {"baseline", "ex17"}
    for variant in ("baseline", "ex17"):
        assert (out / "variants" / variant / "model.onnx").is_file()
        assert json.loads((out / "variants" / variant / "artifact.json").read_text())["graph"]["inputs"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["id"] for s in manifest["stages"]] == ["source", "ex17", "baseline"]
    assert json.loads((out / "plan.json").read_text())["variants"] == {"baseline": "baseline", "ex17": "ex17"}
    before = model_bytes(out)

    second = recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env)
    assert second.returncode == 0, second.stderr
    assert "running" not in second.stderr
    assert len(re.findall(r"^\s+cached\s", second.stderr, re.M)) == 3, second.stderr
    assert model_bytes(out) == before
    assert all(s["cached"] for s in json.loads((out / "manifest.json").read_text())["stages"])


def test_editing_the_last_pass_reruns_only_that_stage(workspace):
    tmp, recipe, env = workspace
    assert recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env).returncode == 0
    recipe.write_text(TINY.replace("opset: 17", "opset: 18"))
    again = recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env)
    assert again.returncode == 0, again.stderr
    stages = {s["id"]: s["cached"] for s in json.loads((tmp / "out" / "tiny" / "manifest.json").read_text())["stages"]}
    assert stages == {"source": True, "ex17": False, "baseline": True}


def test_plan_reports_what_is_cached(workspace):
    tmp, recipe, env = workspace
    before = json.loads(recipec("plan", str(recipe), "--format", "json", env=env).stdout)
    assert not any(s["cached"] for s in before["stages"])
    assert recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env).returncode == 0
    after = json.loads(recipec("plan", str(recipe), "--format", "json", env=env).stdout)
    assert all(s["cached"] for s in after["stages"])
    assert [s["key"] for s in before["stages"]] == [s["key"] for s in after["stages"]]


def _kill_when(proc: subprocess.Popen, marker: str, deadline: float) -> str:
    """Read the build's stderr until `marker` shows, then SIGKILL it; returns what it printed."""
    seen = ""
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        if marker in line:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return seen
    proc.kill()
    raise AssertionError(f"never saw {marker!r}: {seen}")


@pytest.mark.parametrize("marker", ["running source", "running ex17"])
def test_sigkill_leaves_the_previous_build_and_the_next_build_reuses_finished_stages(workspace, marker):
    tmp, recipe, env = workspace
    out = tmp / "out" / "tiny"
    assert recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env).returncode == 0
    previous = (out / "manifest.json").read_text()
    proc = subprocess.Popen([sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(tmp / "out"),
                             "--no-profile", "--force"], stderr=subprocess.PIPE, text=True, env=env)
    _kill_when(proc, marker, time.time() + 300)
    assert (out / "manifest.json").read_text() == previous, "out/tiny changed after a killed build"
    leftovers = [p.name for p in (tmp / "out").iterdir() if p.name != "tiny"]
    resumed = recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert [p.name for p in (tmp / "out").iterdir()] == ["tiny"], f"stale staging dirs not cleaned: {leftovers}"
    assert not list((tmp / "cache" / "tmp").iterdir())


def test_sigkill_of_a_first_build_leaves_no_output(workspace):
    tmp, recipe, env = workspace
    proc = subprocess.Popen([sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(tmp / "out"),
                             "--no-profile"], stderr=subprocess.PIPE, text=True, env=env)
    _kill_when(proc, "running ex17", time.time() + 300)
    assert not (tmp / "out" / "tiny").exists()
    resumed = recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"cached\s+source", resumed.stderr), resumed.stderr
