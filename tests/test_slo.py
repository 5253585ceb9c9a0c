"""serving.slo makes goodput measurable: every serving run reports goodput_rps (at most the request
throughput), a gate on it passes or fails, and `recipec profile --workload slo.X=...` overrides the SLO."""
from __future__ import annotations

import json
import os

import pytest
from test_build import TINY, recipec

SLO_RECIPE = TINY.replace("serving:\n", "serving:\n  slo: {ttft_ms: 60000, tpot_ms: 60000}\n") + \
    "gates:\n  - {metric: goodput_rps, min: 0.001, variant: ex17}\n"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slo")
    env = {**os.environ, "RECIPEC_CACHE": str(tmp / "cache"), "COLUMNS": "200"}
    recipe = tmp / "tiny.yaml"
    recipe.write_text(SLO_RECIPE)
    result = recipec("build", str(recipe), "--out", str(tmp / "out"), env=env)
    return tmp, env, result


def test_every_serving_run_reports_goodput_within_the_request_rate(build):
    tmp, _, result = build
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp / "out" / "tiny" / "report.json").read_text())
    runs = [run for variant in report["variants"].values() for run in variant["serving"]]
    assert runs and all(run["slo"] == {"ttft_ms": 60000, "tpot_ms": 60000} for run in runs)
    # every request of a tiny model meets a one-minute SLO: goodput is the request rate
    assert all(run["goodput_rps"] == pytest.approx(run["request_throughput_rps"]) for run in runs)
    assert [g["passed"] for g in report["gates"]] == [True]


def test_the_workload_override_tightens_the_slo_and_the_gate_fails(build):
    tmp, env, _ = build
    result = recipec("profile", str(tmp / "out" / "tiny"), "--variant", "ex17", "--workload", "slo.ttft_ms=0.000001",
                     "--cache-dir", str(tmp / "cache"), env=env)
    assert result.returncode == 1 and "gate failed: goodput_rps on ex17" in result.stderr, result.stderr
    report = json.loads((tmp / "out" / "tiny" / "report.json").read_text())
    runs = report["variants"]["ex17"]["serving"]
    assert all(run["slo"]["ttft_ms"] == 0.000001 and run["goodput_rps"] == 0 for run in runs)
    assert all(run["goodput_rps"] <= run["request_throughput_rps"] for run in runs)


def test_a_bad_slo_is_rejected_at_validate(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(SLO_RECIPE.replace("ttft_ms: 60000", "ttft_ms: -1").replace("tpot_ms: 60000", "tpot: 5"))
    result = recipec("validate", str(recipe), env=dict(os.environ))
    assert result.returncode == 2
    assert "serving.slo.ttft_ms" in result.stderr and "unknown key 'tpot'" in result.stderr, result.stderr
