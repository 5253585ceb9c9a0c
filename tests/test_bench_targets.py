"""bench/targets.py: issue #18's targets judged on synthetic bench rows, values checked exactly."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import targets  # noqa: E402


def row(variant, system="recipec", precision="fp32", kl=0.0, ttft=10.0, tpot=1.0, e2e=100.0, **extra):
    run = {"ttft_ms": {"p50": ttft}, "tpot_ms": {"p50": tpot}, "e2e_latency_ms": {"p50": e2e}}
    return {"variant": variant, "system": system, "precision": precision, "status": "ok",
            "quality": {"kl_divergence": kl}, "runs": {"1": run}, **extra}


def by_start(rows, start):
    found = [t for t in targets.evaluate_targets({"rows": rows}) if t["target"].startswith(start)]
    assert len(found) == 1, found
    return found[0]


def test_e2e_takes_the_fastest_variant_within_the_kl_gate():
    rows = [row("source model", system="pytorch-eager", e2e=1000.0),
            row("lossy", kl=0.2, e2e=50.0),  # fastest, but over the gate
            row("int8", kl=0.01, e2e=140.0), row("fp32", e2e=400.0)]
    t = by_start(rows, "e2e")
    assert t["met"] is True and t["value"] == pytest.approx(0.14)
    assert t["detail"].startswith("int8: 140.0 ms vs 1000.0 ms, 0.140x (goal 0.10x not yet")
    rows[2]["runs"]["1"]["e2e_latency_ms"]["p50"] = 151.0
    assert by_start(rows, "e2e")["met"] is False


def test_e2e_without_an_eager_row_is_not_evaluated():
    assert by_start([row("int8")], "e2e")["met"] is None


def test_phase_split_is_judged_against_its_own_prefill_and_decode_variants():
    rows = [row("int8", precision="int8", ttft=50.0, tpot=5.0), row("int4-acc4", precision="int4", ttft=120.0, tpot=3.0),
            row("split", precision="int4", ttft=59.0, tpot=3.3, phase_split={"prefill": "int8", "decode": "int4-acc4"})]
    t = by_start(rows, "phase-split")
    assert t["met"] is True and t["value"] == pytest.approx([1.18, 1.1])
    rows[2]["runs"]["1"]["tpot_ms"]["p50"] = 3.31  # just over 1.1x int4-acc4's
    assert by_start(rows, "phase-split")["met"] is False
    rows[2]["phase_split"]["decode"] = None  # its decode stage is no variant of the build
    assert by_start(rows, "phase-split")["met"] is None


def test_a_phase_split_variant_does_not_stand_in_for_plain_int4_against_genai():
    rows = [row("int4-acc4", precision="int4", tpot=3.0),
            row("split", precision="int4", tpot=2.0, phase_split={"prefill": "int8", "decode": "int4-acc4"}),
            row("genai-int4", system="onnxruntime-genai", precision="int4", tpot=2.5)]
    t = by_start(rows, "recipec's best int4")
    assert t["met"] is False and t["value"] == pytest.approx(1.2) and t["detail"].startswith("int4-acc4")


def test_an_interleaved_head_to_head_of_the_same_variant_decides_the_genai_target():
    rows = [row("int4-acc4", precision="int4", tpot=3.0), row("genai-int4", system="onnxruntime-genai",
                                                               precision="int4", tpot=2.5)]
    rounds = [{"recipec": 2.0, "genai": 2.5, "ratio": 0.8}, {"recipec": 3.0, "genai": 2.5, "ratio": 1.2},
              {"recipec": 2.2, "genai": 2.5, "ratio": 0.88}]
    paired = {"genai-int4": {"variant": "int4-acc4", "rounds": rounds, "recipec_ms": 2.2, "other_ms": 2.5,
                             "ratio": 0.88}}
    found = [t for t in targets.evaluate_targets({"rows": rows, "head_to_head": paired})
             if t["target"].startswith("recipec's best int4")]
    assert found[0]["met"] is True and found[0]["value"] == 0.88  # the one-pass rows alone say 1.2x
    assert "per round 0.80, 1.20, 0.88" in found[0]["detail"] and "one-pass table int4-acc4 3.00 ms" in found[0]["detail"]
    paired["genai-int4"]["variant"] = "int4"  # a pairing of another variant does not judge this one
    found = [t for t in targets.evaluate_targets({"rows": rows, "head_to_head": paired})
             if t["target"].startswith("recipec's best int4")]
    assert found[0]["met"] is False and found[0]["value"] == pytest.approx(1.2)


def paired(ratios):
    return {"rounds": [{"recipec": r, "other": 1.0, "ratio": r} for r in ratios], "recipec_ms": sorted(ratios)[1],
            "other_ms": 1.0, "ratio": sorted(ratios)[1]}


def test_a_paired_e2e_of_the_same_variant_decides_the_e2e_target():
    rows = [row("source model", system="pytorch-eager", e2e=1000.0), row("int8", kl=0.01, e2e=160.0)]
    model = {"rows": rows, "head_to_head": {"eager": {"variant": "int8", **paired([0.14, 0.13, 0.17])}}}
    t = [t for t in targets.evaluate_targets(model) if t["target"].startswith("e2e")][0]
    assert t["met"] is True and t["value"] == 0.14  # one pass alone: 0.16x
    assert "in the one-pass table int8: 160.0 ms vs 1000.0 ms, 0.160x" in t["detail"]


def test_a_paired_phase_split_is_judged_on_its_median_ratios():
    rows = [row("int8", precision="int8", ttft=50.0, tpot=5.0), row("int4-acc4", precision="int4", ttft=120.0, tpot=3.0),
            row("split", precision="int4", ttft=59.0, tpot=3.6, phase_split={"prefill": "int8", "decode": "int4-acc4"})]
    pair = {"prefill": "int8", "decode": "int4-acc4", "ttft": paired([1.1, 1.3, 1.0]), "tpot": paired([1.0, 1.05, 1.2])}
    model = {"rows": rows, "head_to_head": {"split:split": pair}}
    t = [t for t in targets.evaluate_targets(model) if t["target"].startswith("phase-split")][0]
    assert t["met"] is True and t["value"] == [1.1, 1.05]  # one pass alone: TPOT 1.2x
    pair["tpot"] = paired([1.2, 1.15, 1.3])
    assert [t for t in targets.evaluate_targets(model) if t["target"].startswith("phase-split")][0]["met"] is False


def spec(ratio, identical=True):
    return {"tpot_ratio": ratio, "identical_greedy": identical, "tpot_ms": {"plain": 1.0, "speculative": ratio},
            "acceptance_rate": 0.5, "tokens_per_target_step": 1.8}


def test_speculative_counts_only_variants_whose_output_stayed_identical():
    rows = [row("int8", speculative=spec(0.5, identical=False)), row("fp32", speculative=spec(0.8)),
            row("int4", speculative=spec(0.6))]
    t = by_start(rows, "speculative")
    assert t["met"] is True and t["value"] == pytest.approx(1 / 0.6) and t["detail"].startswith("int4:")
    rows[2]["speculative"] = spec(0.7)
    assert by_start(rows, "speculative")["met"] is False
    assert not [t for t in targets.evaluate_targets({"rows": [row("fp32")]}) if t["target"].startswith("speculative")]


def test_a_phase_split_variant_passes_the_kl_gate_only_if_its_decode_graph_does():
    rows = [row("source model", system="pytorch-eager", e2e=1000.0),
            row("int8", kl=0.001, e2e=300.0), row("int4", kl=0.06, e2e=200.0),
            row("split", kl=0.001, e2e=100.0, phase_split={"prefill": "int8", "decode": "int4"})]
    assert by_start(rows, "e2e")["detail"].startswith("int8: 300.0 ms")
    rows[2]["quality"]["kl_divergence"] = 0.04
    t = by_start(rows, "e2e")
    assert t["detail"].startswith("split: 100.0 ms") and "KL 0.0400" in t["detail"] and t["value"] == pytest.approx(0.1)

