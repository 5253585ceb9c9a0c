"""Gates against a report: pass, fail on the worst run, selectors, missing metrics, metric validation."""
from __future__ import annotations

import pytest

from recipec.profile.gates import evaluate_gates, validate_gate_metric


def run(concurrency, tpot_p50, out_tok_s, batching="continuous"):
    return {"batching": batching, "concurrency": concurrency,
            "tpot_ms": {"mean": tpot_p50, "p50": tpot_p50, "p90": tpot_p50, "p99": tpot_p50},
            "output_throughput_tok_s": out_tok_s, "mbu": None}


REPORT = {"variants": {
    "baseline": {"artifact": {"bytes": 1000, "parameters": 10}, "quality": {"kl_divergence": 0.0, "top1_agreement": 1.0},
                 "serving": [run(1, 30.0, 30.0), run(8, 50.0, 150.0)]},
    "int4": {"artifact": {"bytes": 300, "parameters": 10}, "quality": {"kl_divergence": 0.02, "top1_agreement": None},
             "serving": [run(1, 8.0, 120.0), run(8, 20.0, 380.0)]},
    "int8": {"artifact": {"bytes": 500, "parameters": 10}, "quality": {"kl_divergence": 0.2, "top1_agreement": 0.95},
             "serving": [run(1, 10.0, 100.0), run(8, 45.0, 170.0)]},
}}


def one(gate):
    return {r["variant"]: r for r in evaluate_gates([gate], REPORT)}


def test_max_gate_passes_and_fails_on_the_worst_run():
    res = one({"metric": "tpot_ms.p50", "max": 40})
    assert set(res) == {"int4", "int8"}  # variant omitted: every variant but baseline
    assert res["int4"]["passed"] and res["int4"]["value"] == 20.0
    assert not res["int8"]["passed"] and res["int8"]["value"] == 45.0
    assert "concurrency=8" in res["int8"]["run"] and "45" in res["int8"]["reason"]


def test_min_gate_takes_the_smallest_value_and_selectors_narrow_runs():
    assert not one({"metric": "output_throughput_tok_s", "min": 130, "variant": "int4"})["int4"]["passed"]
    at8 = one({"metric": "output_throughput_tok_s@concurrency=8", "min": 130, "variant": "int4"})["int4"]
    assert at8["passed"] and at8["value"] == 380.0


def test_quality_gate_with_explicit_variant():
    res = one({"metric": "kl_divergence", "max": 0.1, "variant": "int8"})
    assert list(res) == ["int8"] and not res["int8"]["passed"]
    assert one({"metric": "quality.kl_divergence", "max": 0.1, "variant": "int4"})["int4"]["passed"]


def test_missing_metric_variant_or_run_fails_with_a_reason():
    res = one({"metric": "top1_agreement", "min": 0.9})
    assert res["int8"]["passed"] and not res["int4"]["passed"]
    assert "not measured" in res["int4"]["reason"]
    assert "not measured" in one({"metric": "mbu", "max": 1, "variant": "int4"})["int4"]["reason"]
    assert "not in the report" in one({"metric": "mbu", "max": 1, "variant": "fp8"})["fp8"]["reason"]
    none = one({"metric": "tpot_ms.p50@batching=static", "max": 100, "variant": "int4"})["int4"]
    assert not none["passed"] and "no serving run" in none["reason"]


def test_both_bounds_give_two_results():
    res = evaluate_gates([{"metric": "artifact.bytes", "min": 400, "max": 600, "variant": "int8"}], REPORT)
    assert [(r["op"], r["passed"]) for r in res] == [("min", True), ("max", True)]


def test_only_baseline_is_gated_when_it_is_alone():
    report = {"variants": {"baseline": REPORT["variants"]["baseline"]}}
    res = evaluate_gates([{"metric": "tpot_ms.p99", "max": 100}], report)
    assert [r["variant"] for r in res] == ["baseline"] and res[0]["passed"]


@pytest.mark.parametrize("path", ["tpot_ms.p50", "ttft_ms.p99", "itl_ms.mean", "e2e_latency_ms.p90", "mbu", "mfu",
                                  "top1_agreement", "quality.perplexity", "artifact.bytes", "serving.peak_memory_mb",
                                  "tpot_ms.p50@concurrency=8,batching=continuous", "goodput_rps@rate_rps=2.5"])
def test_known_metric_paths_validate(path):
    assert validate_gate_metric(path) is None


@pytest.mark.parametrize("path,fragment", [("tpot_ms", "unknown metric"), ("tpot_ms.p75", "unknown metric"),
                                           ("latency", "unknown metric"), ("artifact.size", "unknown metric"),
                                           ("tpot_ms.p50@qps=3", "bad selector"),
                                           ("tpot_ms.p50@concurrency=x", "bad selector value"),
                                           ("kl_divergence@concurrency=1", "serving metrics only")])
def test_unknown_metric_paths_are_rejected(path, fragment):
    msg = validate_gate_metric(path)
    assert msg is not None and fragment in msg
