"""Metric arithmetic on recorded timestamps, checked against values computed by hand."""
from __future__ import annotations

import dataclasses

import pytest

from recipec.runtime.records import RequestRecord, StepRecord
from recipec.profile.metrics import ModelCost, Peaks, decode_flops, efficiency, latency_summary, prefill_flops, stats, summarize_run, throughput_summary

# A: 4 tokens; B: a one-token output; C: 2 tokens. Times in seconds.
A = RequestRecord(arrival=0.0, token_times=[0.1, 0.15, 0.25, 0.30], n_in=10)
B = RequestRecord(arrival=0.05, token_times=[0.2], n_in=20)
C = RequestRecord(arrival=0.1, token_times=[0.3, 0.5], n_in=30)
RECORDS = [A, B, C]


def approx(d):
    return {k: pytest.approx(v) for k, v in d.items()}


def test_ttft_includes_queueing():
    assert latency_summary(RECORDS)["ttft_ms"] == approx({"mean": 150, "p50": 150, "p90": 190, "p99": 199})


def test_tpot_excludes_one_token_outputs():
    # A: (300 - 100) / 3; C: (400 - 200) / 1; B has no TPOT (not 0)
    t = latency_summary(RECORDS)["tpot_ms"]
    assert t == approx({"mean": (200 / 3 + 200) / 2, "p50": (200 / 3 + 200) / 2,
                        "p90": 200 / 3 + 0.9 * (200 - 200 / 3), "p99": 200 / 3 + 0.99 * (200 - 200 / 3)})


def test_itl_is_pooled_over_requests():
    # gaps: A 50, 100, 50; C 200  -> sorted 50 50 100 200
    assert latency_summary(RECORDS)["itl_ms"] == approx({"mean": 100, "p50": 75, "p90": 170, "p99": 197})


def test_e2e():
    assert latency_summary(RECORDS)["e2e_latency_ms"]["mean"] == pytest.approx((300 + 150 + 400) / 3)


def test_throughput_and_goodput():
    t = throughput_summary(RECORDS, slo={"ttft_ms": 160})
    assert t["duration_s"] == pytest.approx(0.5)  # first arrival 0 -> last token 0.5
    assert t["request_throughput_rps"] == pytest.approx(6.0)
    assert t["output_throughput_tok_s"] == pytest.approx(7 / 0.5)
    assert t["total_throughput_tok_s"] == pytest.approx(67 / 0.5)
    assert t["goodput_rps"] == pytest.approx(2 / 0.5)  # C misses the TTFT SLO
    # B's undefined TPOT meets a TPOT SLO, as in vLLM; C's 200 ms does not
    assert throughput_summary(RECORDS, slo={"tpot_ms": 100})["goodput_rps"] == pytest.approx(4.0)
    assert throughput_summary(RECORDS)["goodput_rps"] is None


def test_cancelled_and_empty_requests_are_not_counted():
    dropped = RequestRecord(0.0, [0.05, 0.06], 5, cancelled=True)
    s = latency_summary(RECORDS + [dropped])
    assert s["ttft_ms"]["mean"] == pytest.approx(150)
    assert stats([]) is None
    assert latency_summary([B])["tpot_ms"] is None


COST = ModelCost(weight_bytes_per_step=1000, active_params=100, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, kv_bytes_per_elem=2)


def test_prefill_flops_equal_the_sum_of_per_token_flops():
    assert COST.kv_bytes_per_token == 2 * 2 * 2 * 8 * 2
    assert prefill_flops(COST, 3) == pytest.approx(2136)  # 2·100·3 + 128·3·4
    assert prefill_flops(COST, 7) == pytest.approx(sum(decode_flops(COST, t) for t in range(1, 8)))


def test_prefill_flops_count_the_lm_head_only_where_logits_are_computed():
    """The runtime asks for the last prompt position's logits: the head runs once per prompt, not n times."""
    last_only = dataclasses.replace(COST, head_params=40, head_last_position_only=True)
    every = dataclasses.replace(COST, head_params=40)
    assert prefill_flops(every, 7) == pytest.approx(prefill_flops(COST, 7))
    assert prefill_flops(last_only, 7) == pytest.approx(prefill_flops(COST, 7) - 2 * 40 * 6)
    assert prefill_flops(last_only, 3) == pytest.approx(2 * 60 * 3 + 2 * 40 * 1 + 2 * 2 * 4 * 8 * 3 * 4)  # 1976


def test_mbu_and_mfu():
    steps = [StepRecord("prefill", 0.0, 0.002, ctx=[3], rows=1, padded_len=3),
             StepRecord("decode", 0.002, 0.012, ctx=[5, 10], rows=2, padded_len=10)]
    e = efficiency(steps, COST, Peaks(bandwidth_gb_s=1.0, tflops=1e-3), tpot_mean_ms=20.0)
    step_bytes = 1000 + 2 * 10 * 128
    assert e["mbu_step"] == pytest.approx(step_bytes / 0.010 / 1e9)
    assert e["mbu"] == pytest.approx(step_bytes / 0.020 / 1e9)
    dec = (200 + 256 * 5) + (200 + 256 * 10)
    assert e["mfu_decode"] == pytest.approx(dec / 0.010 / 1e9)
    assert e["mfu_prefill"] == pytest.approx(2136 / 0.002 / 1e9)
    assert e["mfu"] == pytest.approx((2136 + dec) / 0.012 / 1e9)
    assert e["decode_step_ms"] == pytest.approx(10.0) and e["mean_decode_batch"] == 2


def test_summarize_run_without_cost_has_no_efficiency():
    s = summarize_run(RECORDS, [], None, None)
    assert "mbu" not in s and s["completed"] == 3


def test_a_decode_step_that_fits_in_the_last_level_cache_is_flagged():
    steps = [StepRecord("decode", 0.0, 0.010, ctx=[5, 10], rows=2, padded_len=10)]
    step_bytes = 1000 + 2 * 10 * 128  # weights + two rows' padded cache: 3560 bytes
    fits = efficiency(steps, COST, Peaks(1.0, 1e-3, last_level_cache_bytes=step_bytes), tpot_mean_ms=10.0)
    spills = efficiency(steps, COST, Peaks(1.0, 1e-3, last_level_cache_bytes=step_bytes - 1), tpot_mean_ms=10.0)
    unknown = efficiency(steps, COST, Peaks(1.0, 1e-3), tpot_mean_ms=10.0)
    assert (fits["cache_resident"], spills["cache_resident"], unknown["cache_resident"]) == (True, False, None)
    assert fits["mbu"] == pytest.approx(step_bytes / 0.010 / 1e9)  # shown all the same


def test_the_bandwidth_buffer_is_far_past_the_last_level_cache():
    from recipec.profile.hardware import bandwidth_buffer_bytes, last_level_cache_bytes

    assert bandwidth_buffer_bytes(None) == 1 << 30
    assert bandwidth_buffer_bytes(32 << 20) == 1 << 30
    assert bandwidth_buffer_bytes(256 << 20) == 2 << 30
    llc = last_level_cache_bytes()
    assert llc is None or llc >= 1 << 16


def test_known_gpus_tell_nvl_from_sxm():
    from recipec.profile.hardware import known_gpu

    assert known_gpu("NVIDIA H200 NVL")["tflops"]["float16"] == 835 and known_gpu("NVIDIA H200")["tflops"]["float16"] == 989
    assert known_gpu("NVIDIA H100 NVL")["bw"] == 3900 and known_gpu("NVIDIA H100 80GB HBM3")["bw"] == 3350


def test_mfu_divides_by_the_peak_of_the_dtype_the_variant_computes_in():
    from recipec.profile.hardware import known_gpu, peak_tflops_for

    h100 = {"device": "cuda", "peak_tflops_by_dtype": {"tflops": known_gpu("NVIDIA H100 80GB HBM3")["tflops"]}}
    assert peak_tflops_for(h100, "float16") == (989, "float16")
    assert peak_tflops_for(h100, "int8") == (1979, "int8")
    assert peak_tflops_for(h100, "float32") == (494, "tf32")  # fp32 matmuls run on TF32 tensor cores
    cpu = {"device": "cpu", "peak_tflops_by_dtype": {"tflops": {"float32": 0.2, "int8": 0.5}}}
    assert peak_tflops_for(cpu, "float32") == (0.2, "float32") and peak_tflops_for(cpu, "int8") == (0.5, "int8")
    assert peak_tflops_for(cpu, "float16") == (None, "float16")


def test_engine_overhead_is_the_step_minus_the_session_run():
    from recipec.profile.metrics import engine_overhead_ms

    steps = [StepRecord("decode", 0.0, 0.010, ctx=[5], rows=1, padded_len=5, session_seconds=0.008),
             StepRecord("decode", 0.010, 0.014, ctx=[6], rows=1, padded_len=6, session_seconds=0.003)]
    assert engine_overhead_ms(steps) == pytest.approx((2.0 + 1.0) / 2)
    assert engine_overhead_ms(steps[:1] + [StepRecord("decode", 0, 1, [1], 1, 1)]) is None
    assert summarize_run(RECORDS, steps, None, None)["engine_overhead_ms"] == pytest.approx(1.5)
