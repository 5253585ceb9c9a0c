"""Projections onto other hardware, checked against values computed by hand (docs/metrics.md, Projections)."""
from __future__ import annotations

import jsonschema
import pytest

from recipec.profile.hardware import known_gpu
from recipec.profile.metrics import ModelCost
from recipec.profile.projections import (COST_SCHEMA, CPU_ROW, PRICES, Efficiency, Hardware, Link, VariantModel,
                                         Workload, cost_at_slo, gpu_entry, hardware_table, measured_efficiency,
                                         override_problems, project, project_report, variant_model)

# 1000 GB/s, 100 TFLOP/s fp16, 6 GiB, $2 per hour; all-reduce 10 us + 2(t-1)/t x bytes / 100 GB/s
GPU = Hardware("test-gpu", "cuda", 1000.0, 6.0, {"float16": 100.0}, 2.0, Link(10e-6, 100.0), max_tensor_parallel=2)
# 2 GB of weights, 1e9 parameters, 10 layers x 8 heads (8 KV heads) x 64 dims, fp16 cache:
# KV bytes per token = 2 x 10 x 8 x 64 x 2 = 20,480
COST = ModelCost(weight_bytes_per_step=2_000_000_000, active_params=1_000_000_000, num_layers=10, num_heads=8,
                 num_kv_heads=8, head_dim=64, kv_bytes_per_elem=2)
MODEL = VariantModel(COST, "float16", hidden_size=512, resident_weight_bytes=2_000_000_000)
WORK = Workload(prompt_tokens=1000, output_tokens=1000)  # mean decode context 1000 + 1000/2 = 1500
HALF = Efficiency(mbu=0.5, mfu=0.5)  # effective 500 GB/s and 50 TFLOP/s


def rows_by(rows, t):
    return {r["batch_size"]: r for r in rows if r["tensor_parallel"] == t}


def test_tp1_by_hand():
    r = rows_by(project("v", MODEL, WORK, HALF, [GPU]), 1)
    # memory per step: 2e9 / 5e11 = 4 ms + b x 20,480 x 1500 / 5e11 = b x 61.44 us
    # compute per row: decode FLOPs (2e9 + 4 x 10 x 8 x 64 x 1500 = 2.03072e9) / 5e13 = 40.6144 us
    assert r[1]["tpot_ms"] == pytest.approx(4.06144)
    assert r[1]["bound"] == "memory"
    assert r[1]["output_tok_s"] == pytest.approx(1 / 4.06144e-3)
    assert r[1]["usd_per_mtok"] == pytest.approx(2 / 3600 * 4.06144e-3 * 1e6)  # 2.2563556
    # usable 0.9 x 6 GiB = 5,798,205,849.6 B; minus weights 3,798,205,849.6; / (20,480 x 2000 per sequence) = 92.7
    assert r[1]["max_batch_size"] == 92 and set(r) == {1, 92}
    # at 92: memory 4 ms + 92 x 61.44 us = 9.65248 ms > compute 92 x 40.6144 us = 3.7365 ms
    assert r[92]["tpot_ms"] == pytest.approx(9.65248)
    assert r[92]["output_tok_s"] == pytest.approx(92 / 9.65248e-3)  # 9531.2
    assert r[92]["usd_per_mtok"] == pytest.approx(2 / 3600 * 9.65248e-3 / 92 * 1e6)  # 0.058288
    # prefill: 2 x 1e9 x 1000 + 2 x 10 x 8 x 64 x 1000 x 1001 = 2.01025024e12 FLOPs / 5e13 = 40.2050048 ms,
    # longer than its bytes (2e9 + 20,480 x 1000) / 5e11 = 4.04 ms
    assert r[1]["ttft_ms"] == pytest.approx(40.2050048) and r[92]["ttft_ms"] == r[1]["ttft_ms"]
    assert r[1]["per_gpu"]["bytes_per_decode_step"] == pytest.approx(2e9 + 20480 * 1500)
    assert r[1]["achieved"]["mbu"] == pytest.approx((2e9 + 20480 * 1500) / 4.06144e-3 / 1e12)  # = 0.5: memory-bound
    assert r[1]["projected"] and not r[1]["assumed"]["mbu_measured"]


def test_tp2_by_hand():
    r = rows_by(project("v", MODEL, WORK, HALF, [GPU]), 2)
    # per device: weights 1e9 / 5e11 = 2 ms; 4 KV heads: 10,240 B/token x 1500 / 5e11 = 30.72 us per row;
    # compute 2.03072e9 / 2 / 5e13 = 20.3072 us per row; all-reduces 2 x 10 layers x (10 us + 1 x 512 x 2 B / 1e11)
    # = 200 us + 0.2048 us per row
    assert r[1]["tpot_ms"] == pytest.approx(2.0 + 0.03072 + 0.2 + 0.0002048)  # 2.2309248
    assert r[1]["usd_per_mtok"] == pytest.approx(2 * 2 / 3600 * 2.2309248e-3 * 1e6)  # two GPUs: 2.4788
    # (5,798,205,849.6 - 1e9) / (10,240 x 2000) = 234.3
    assert r[1]["max_batch_size"] == 234
    assert r[234]["tpot_ms"] == pytest.approx(2.0 + 234 * 0.03072 + 0.2 + 234 * 0.0002048)  # 9.4364032
    assert r[234]["output_tok_s"] == pytest.approx(234 / 9.4364032e-3)
    assert r[234]["usd_per_mtok"] == pytest.approx(4 / 3600 * 9.4364032e-3 / 234 * 1e6)
    # prefill 2.01025024e12 / 2 / 5e13 = 20.1025024 ms + 20 x (10 us + 1000 x 512 x 2 B / 1e11 = 10.24 us)
    assert r[1]["ttft_ms"] == pytest.approx(20.1025024 + 20 * 0.02024)


def test_compute_bound_at_large_batch():
    slow = Hardware("slow", "cuda", 1000.0, 6.0, {"float16": 1.0}, 2.0)  # 0.5 TFLOP/s effective
    r = rows_by(project("v", MODEL, WORK, HALF, [slow]), 1)
    # compute per row 2.03072e9 / 5e11 = 4.06144 ms: at 92 rows 373.65 ms > memory 9.65 ms
    assert r[92]["bound"] == "compute" and r[92]["tpot_ms"] == pytest.approx(92 * 4.06144)


def test_weights_that_do_not_fit():
    small = Hardware("small", "cuda", 1000.0, 1.0, {"float16": 100.0}, 2.0, Link(10e-6, 100.0))
    rows = project("v", MODEL, WORK, HALF, [small])
    by_tp = {r["tensor_parallel"]: r for r in rows if r["batch_size"] in (0, 1)}
    # usable 0.9 GiB = 966,367,641.6 B: 2e9 and 1e9 of weights do not fit; 5e8 (TP 4) leaves room for
    # 466,367,641.6 / (2 KV heads: 5,120 B/token x 2000) = 45 sequences
    for t in (1, 2):
        assert by_tp[t]["fits"] is False and by_tp[t]["batch_size"] == 0
        assert by_tp[t]["tpot_ms"] is None and by_tp[t]["usd_per_mtok"] is None and by_tp[t]["ttft_ms"] is None
    assert by_tp[4]["fits"] and by_tp[4]["max_batch_size"] == 45
    assert by_tp[8]["max_batch_size"] > 0


def test_tp_degrees_that_split_no_heads_are_skipped():
    odd = VariantModel(ModelCost(2_000_000_000, 1_000_000_000, 10, 6, 2, 64, 2), "float16", 384)
    assert {r["tensor_parallel"] for r in project("v", odd, WORK, HALF, [gpu_row("H100 SXM 80GB")])} == {1, 2}


def gpu_row(name):
    return next(h for h in hardware_table() if h.name == name)


def test_default_rows_come_from_the_datasheet_table():
    h100 = gpu_row("H100 SXM 80GB")
    assert h100.bandwidth_gb_s == known_gpu("NVIDIA H100 80GB HBM3")["bw"] == gpu_entry("H100 SXM 80GB")["bw"]
    assert h100.usd_per_hour == PRICES["H100 SXM 80GB"] and h100.degrees() == [1, 2, 4, 8]
    assert {h.name for h in hardware_table()} == {"H100 SXM 80GB", "H200 SXM 141GB", "A100 SXM 80GB", "L4"}


CPU_HARDWARE = {"device": "cpu", "name": "Some CPU", "memory_gb": 8.0, "peak_bandwidth_gb_s": 10.0,
                "peak_bandwidth_source": "measured", "peak_tflops_by_dtype": {"tflops": {"float32": 0.1, "int8": 0.4}}}


def test_the_cpu_row_projects_tp1_only_and_has_no_default_price():
    cpu = gpu_row_in(hardware_table(CPU_HARDWARE), CPU_ROW)
    assert cpu.degrees() == [1] and cpu.usd_per_hour is None and cpu.bandwidth_gb_s == 10.0
    small = VariantModel(ModelCost(2_000_000, 1_000_000, 2, 2, 2, 8, 4), {"cpu": "int8", "cuda": "float16"}, 16)
    rows = [r for r in project("v", small, Workload(8, 8), HALF, [cpu]) if r["hardware"] == CPU_ROW]
    assert rows and {r["tensor_parallel"] for r in rows} == {1}
    assert rows[0]["peaks"]["dtype"] == "int8" and rows[0]["usd_per_mtok"] is None


def test_a_profiled_gpu_is_not_doubled_and_an_unknown_one_is_added():
    cuda = {"device": "cuda", "memory_gb": 79.1, "peak_bandwidth_gb_s": 3350.0,
            "peak_tflops_by_dtype": {"tflops": {"float16": 989.0}}}
    names = [h.name for h in hardware_table({**cuda, "name": "NVIDIA H100 80GB HBM3"})]
    assert names.count("H100 SXM 80GB") == 1 and len(names) == 4
    other = gpu_row_in(hardware_table({**cuda, "name": "Some New GPU"}), "Some New GPU")
    assert other.degrees() == [1] and other.usd_per_hour is None


def gpu_row_in(rows, name):
    return next(h for h in rows if h.name == name)


OVERRIDES = {"prices": {"H100 SXM 80GB": 3.5, CPU_ROW: 0.1},
             "hardware": [{"name": "my-gpu", "bandwidth_gb_s": 500, "memory_gb": 16, "tflops": {"float16": 50},
                           "usd_per_hour": 0.5, "interconnect": {"latency_us": 20, "bandwidth_gb_s": 50},
                           "max_tensor_parallel": 4}]}


def test_overrides_merge_with_the_defaults():
    jsonschema.Draft202012Validator(COST_SCHEMA).validate(OVERRIDES)
    rows = hardware_table(CPU_HARDWARE, OVERRIDES)
    assert gpu_row_in(rows, "H100 SXM 80GB").usd_per_hour == 3.5
    assert gpu_row_in(rows, "H100 SXM 80GB").bandwidth_gb_s == gpu_entry("H100 SXM 80GB")["bw"]
    assert gpu_row_in(rows, CPU_ROW).usd_per_hour == 0.1
    mine = gpu_row_in(rows, "my-gpu")
    assert (mine.usd_per_hour, mine.link, mine.degrees()) == (0.5, Link(20e-6, 50.0), [1, 2, 4])
    assert gpu_row_in(rows, "L4").usd_per_hour == PRICES["L4"]
    replaced = hardware_table(None, {"hardware": [{"name": "L4", "bandwidth_gb_s": 1, "memory_gb": 1,
                                                   "tflops": {"float16": 1}}]})
    assert gpu_row_in(replaced, "L4").bandwidth_gb_s == 1 and gpu_row_in(replaced, "L4").degrees() == [1]
    assert override_problems(OVERRIDES) == []
    assert "no hardware row named 'H100'" in override_problems({"prices": {"H100": 1}})[0]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(COST_SCHEMA).validate({"hardware": [{"name": "x", "bandwidth_gb_s": 1,
                                                                             "memory_gb": 1, "tflops": {"fp8": 1}}]})


def test_cost_at_slo_picks_the_cheapest_point_meeting_it():
    rows = project("v", MODEL, WORK, HALF, [GPU])
    # TPOT <= 5 ms. TP 1: 4 ms + b x 61.44 us -> b = 16 (4.98304 ms), $0.17302/Mtok.
    # TP 2: 2.2 ms + b x (30.72 + 0.2048) us -> b = 90 (4.983232 ms), $0.061521/Mtok: cheaper.
    best = cost_at_slo(rows, "test-gpu", {"tpot_ms": 5.0})
    assert (best["tensor_parallel"], best["batch_size"]) == (2, 90)
    assert best["tpot_ms"] == pytest.approx(4.983232)
    assert best["usd_per_mtok"] == pytest.approx(4 / 3600 * 4.983232e-3 / 90 * 1e6)
    # a TTFT SLO of 30 ms rules TP 1 out (40.2 ms) either way; 2 ms TPOT is met by no point
    assert cost_at_slo(rows, "test-gpu", {"tpot_ms": 5.0, "ttft_ms": 30.0})["tensor_parallel"] == 2
    assert cost_at_slo(rows, "test-gpu", {"tpot_ms": 2.0}) is None
    assert cost_at_slo(rows, "other", {"tpot_ms": 5.0}) is None


def test_measured_efficiency_is_clamped_and_labelled():
    runs = [{"concurrency": 4, "mbu": 0.9, "mfu_prefill": 0.9},
            {"concurrency": 1, "mbu": 1.2, "mfu_prefill": 0.3, "cache_resident": False}]
    e = measured_efficiency(runs)
    assert (e.mbu, e.mfu, e.mbu_measured, e.mfu_measured) == (1.0, 0.3, True, True)
    assert "clamped" in e.mbu_source
    cached = measured_efficiency([{"concurrency": 1, "mbu": 0.8, "mfu_prefill": None, "cache_resident": True}])
    assert (cached.mbu, cached.mbu_measured, cached.mfu, cached.mfu_measured) == (0.6, False, 0.4, False)
    assert "cache-resident" in cached.mbu_source
    assert measured_efficiency([{"rate_rps": 2.0, "mbu": 0.5}]).mbu_measured is False


def test_project_report_uses_the_serving_workload_and_efficiencies():
    run = {"concurrency": 1, "prompt_tokens": {"min": 900, "max": 1100}, "output_tokens": 1000,
           "mbu": 0.5, "mfu_prefill": 0.5}
    moved = {"serving": [run], "artifact": {"path": "/nonexistent"}}  # no model given, no artifact.json: skipped
    report = {"hardware": CPU_HARDWARE, "variants": {"v": {"serving": [run], "artifact": {}}, "moved": moved}}
    rows = project_report(report, {"v": MODEL})
    assert {r["variant"] for r in rows} == {"v"}
    h100 = [r for r in rows if r["hardware"] == "H100 SXM 80GB" and r["tensor_parallel"] == 1]
    assert h100[0]["workload"] == {"prompt_tokens": 1000.0, "output_tokens": 1000.0}
    assert h100[0]["assumed"]["mbu_measured"] and h100[0]["assumed"]["mbu"] == 0.5
    keys = {"variant", "hardware", "tensor_parallel", "batch_size", "tpot_ms", "ttft_ms", "output_tok_s",
            "usd_per_mtok"}
    assert all(keys <= set(r) for r in rows)


def test_variant_model_from_artifact_json():
    art = {"model": {"vocab_size": 10, "hidden_size": 4, "num_attention_heads": 2},
           "weights": {"parameters": 96, "active_parameters": 96, "embedding_parameters": 40, "embedding_bytes": 160,
                       "bytes": 384, "bytes_per_decode_step": 224},
           "kv_cache": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 2, "dtype": "float32"},
           "logits": {"mode": "selectable"}, "compute_dtype": {"cpu": "int8", "cuda": "float16"}}
    m = variant_model(art)
    assert (m.hidden_size, m.resident_weight_bytes, m.cost.weight_bytes_per_step) == (4, 384, 224)
    assert (m.dtype_on("cpu"), m.dtype_on("cuda")) == ("int8", "float16")


def test_roofline_plot(tmp_path):
    from recipec.profile.plots import _plot_roofline, _pyplot

    rows = project("v", MODEL, WORK, HALF, [GPU, gpu_row("L4")])
    assert _plot_roofline(rows, tmp_path / "roofline.png", _pyplot()) and (tmp_path / "roofline.png").stat().st_size > 0
    assert _plot_roofline([], tmp_path / "none.png", _pyplot()) is False
