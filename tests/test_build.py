"""End-to-end builds through the CLI: caching, byte-identical rebuilds, reruns after an edit, and kills."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_at

from recipec.profile.report import validate_report

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


@pytest.fixture(scope="module")
def first_build(tmp_path_factory):
    """One complete build that the tests below start from (each on its own copy)."""
    tmp = tmp_path_factory.mktemp("first")
    env = {**os.environ, "RECIPEC_CACHE": str(tmp / "cache"), "COLUMNS": "200"}
    recipe = tmp / "tiny.yaml"
    recipe.write_text(TINY)
    result = recipec("build", str(recipe), "--out", str(tmp / "out"), env=env)
    assert result.returncode == 0, result.stderr
    return tmp, result


@pytest.fixture
def workspace(first_build, tmp_path):
    """A copy of the first build's recipe, cache and out/ in a fresh directory."""
    source, _ = first_build
    for name in ("tiny.yaml", "cache", "out"):
        copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
        copy(source / name, tmp_path / name)
    env = {**os.environ, "RECIPEC_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    return tmp_path, tmp_path / "tiny.yaml", env


def model_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.onnx*"))}


def test_first_build_writes_variants_manifest_plan_and_a_valid_report(first_build):
    tmp, result = first_build
    out = tmp / "out" / "tiny"
    assert {p.name for p in (out / "variants").iterdir()} == {"baseline", "ex17"}
    for variant in ("baseline", "ex17"):
        assert (out / "variants" / variant / "model.onnx").is_file()
        assert json.loads((out / "variants" / variant / "artifact.json").read_text())["graph"]["inputs"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["id"] for s in manifest["stages"]] == ["source", "ex17", "baseline"]
    assert not any(s["cached"] for s in manifest["stages"])
    assert json.loads((out / "plan.json").read_text())["variants"] == {"baseline": "baseline", "ex17": "ex17"}
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert set(report["variants"]) == {"baseline", "ex17"}
    assert (out / "report.md").read_text().startswith("# recipec report: tiny")
    # each stage's peak memory, in the manifest and in the report's build stages
    peaks = {s["id"]: s["peak_rss_mb"] for s in manifest["stages"]}
    assert all(p > 100 for p in peaks.values()), peaks
    assert {s["id"]: s["peak_rss_mb"] for s in report["build"]["stages"]} == peaks
    assert "| peak RSS |" in (out / "report.md").read_text()
    assert len(re.findall(r"^\s+running\s", result.stderr, re.M)) == 3


def test_cached_rebuild_runs_no_pass_and_is_byte_identical(workspace):
    tmp, recipe, env = workspace
    out = tmp / "out" / "tiny"
    before = model_bytes(out)
    first = json.loads((out / "manifest.json").read_text())["stages"]
    second = recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env)
    assert second.returncode == 0, second.stderr
    assert "running" not in second.stderr
    assert len(re.findall(r"^\s+cached\s", second.stderr, re.M)) == 3, second.stderr
    assert model_bytes(out) == before
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert all(s["cached"] for s in stages)
    # a cached stage reports the peak of the run that built it
    assert [s["peak_rss_mb"] for s in stages] == [s["peak_rss_mb"] for s in first]


def test_forced_rebuild_reruns_every_stage_and_is_byte_identical(workspace):
    tmp, recipe, env = workspace
    before = model_bytes(tmp / "out" / "tiny")
    forced = recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert len(re.findall(r"^\s+running\s", forced.stderr, re.M)) == 3, forced.stderr
    assert model_bytes(tmp / "out" / "tiny") == before


def test_editing_the_last_pass_reruns_only_that_stage(workspace):
    tmp, recipe, env = workspace
    recipe.write_text(TINY.replace("opset: 17", "opset: 18"))
    again = recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env)
    assert again.returncode == 0, again.stderr
    stages = {s["id"]: s["cached"] for s in json.loads((tmp / "out" / "tiny" / "manifest.json").read_text())["stages"]}
    assert stages == {"source": True, "ex17": False, "baseline": True}


def test_plan_reports_what_is_cached(workspace):
    tmp, recipe, env = workspace
    after = json.loads(recipec("plan", str(recipe), "--format", "json", env=env).stdout)
    assert all(s["cached"] for s in after["stages"])
    empty = {**env, "RECIPEC_CACHE": str(tmp / "empty-cache")}
    before = json.loads(recipec("plan", str(recipe), "--format", "json", env=empty).stdout)
    assert not any(s["cached"] for s in before["stages"])
    assert [s["key"] for s in before["stages"]] == [s["key"] for s in after["stages"]]


@pytest.mark.parametrize("marker", ["running source", "running ex17"])
def test_sigkill_leaves_the_previous_build_and_the_next_build_reuses_finished_stages(workspace, marker):
    tmp, recipe, env = workspace
    out = tmp / "out" / "tiny"
    previous = (out / "manifest.json").read_text()
    proc = subprocess.Popen([sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(tmp / "out"),
                             "--no-profile", "--force"], stderr=subprocess.PIPE, text=True, env=env)
    kill_at(proc, marker, 0, time.time() + 300)
    assert (out / "manifest.json").read_text() == previous, "out/tiny changed after a killed build"
    leftovers = [p.name for p in (tmp / "out").iterdir() if p.name != "tiny"]
    resumed = recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert [p.name for p in (tmp / "out").iterdir()] == ["tiny"], f"stale staging dirs not cleaned: {leftovers}"
    assert not list((tmp / "cache" / "tmp").iterdir())


def test_sigkill_of_a_first_build_leaves_no_output(workspace):
    tmp, recipe, env = workspace
    shutil.rmtree(tmp / "out")
    env = {**env, "RECIPEC_CACHE": str(tmp / "fresh-cache")}
    proc = subprocess.Popen([sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(tmp / "out"),
                             "--no-profile"], stderr=subprocess.PIPE, text=True, env=env)
    kill_at(proc, "running ex17", 0, time.time() + 300)
    assert not (tmp / "out" / "tiny").exists()
    resumed = recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"cached\s+source", resumed.stderr), resumed.stderr
    assert re.search(r"running\s+ex17", resumed.stderr), resumed.stderr
