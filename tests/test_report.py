"""report.json validates against the schema; report.md shows deltas against baseline; compare; and an
end-to-end profile of a tiny exported model when the runtime and export pass exist."""
from __future__ import annotations

import copy
import json

import jsonschema
import numpy as np
import pytest

from recipec.runtime.engine import CacheOps, FakeClock
from recipec.profile.compare import compare
from recipec.profile.formatting import delta
from recipec.profile.hardware import hardware_info
from recipec.profile.metrics import ModelCost, Peaks
from recipec.profile.profiler import measure_runs, serving_plan, summarize_raw
from recipec.profile.quality import greedy_agreement, logit_quality
from recipec.profile.report import build_report, validate_report, write_report

from test_engine import FakeModel  # noqa: E402  (tests/ is on sys.path under pytest's default import mode)

SPEC = {"batching": {"policy": ["static", "continuous"], "max_batch_size": 4},
        "workload": {"prompt_tokens": 8, "output_tokens": {"min": 2, "max": 6}, "requests": 8,
                     "warmup_requests": 1, "concurrency": [1, 4]},
        "slo": {"ttft_ms": 50}}
COST = ModelCost(weight_bytes_per_step=10_000, active_params=5_000, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, kv_bytes_per_elem=4)
HW = {"device": "cpu", "name": "test cpu", "peak_bandwidth_gb_s": 0.001, "peak_bandwidth_source": "test value",
      "peak_tflops": 1e-6, "peak_tflops_source": "test value",
      "peak_tflops_by_dtype": {"tflops": {"float32": 1e-6}, "source": "test value"}}


def fake_variant(speed: float, name: str) -> dict:
    """A variant served by the fake model on a fake clock; `speed` divides every step's cost."""
    clock = FakeClock()
    model = FakeModel(clock, tick=lambda dt: clock.advance(dt / speed))
    raw = measure_runs(model, serving_plan(SPEC), vocab_size=50, clock=clock, cache_ops=CacheOps())
    serving = [summarize_raw(r, COST, Peaks(HW["peak_bandwidth_gb_s"], HW["peak_tflops"]), SPEC["slo"]) for r in raw]
    return {"artifact": {"path": f"out/x/variants/{name}", "bytes": int(1e6 / speed), "parameters": 5_000},
            "quality": {"kl_divergence": 0.0 if speed == 1 else 0.01, "top1_agreement": 1.0 if speed == 1 else 0.97,
                        "perplexity": 10.0 * (1 + (speed - 1) / 100)},
            "serving": serving}


@pytest.fixture(scope="module")
def report():
    variants = {"baseline": fake_variant(1.0, "baseline"), "int4": fake_variant(4.0, "int4")}
    gates = [{"metric": "tpot_ms.p50", "max": 5, "variant": "int4"}, {"metric": "top1_agreement", "min": 0.99}]
    stages = [{"id": "source", "op": "source", "seconds": 1.5, "cached": True, "peak_rss_mb": 2048.0},
              {"id": "int4", "op": "quantize", "seconds": 3.2, "peak_rss_mb": None}]
    return build_report({"name": "tiny", "sha256": "ab" * 32}, HW, variants, gates, stages, {"numpy": np.__version__})


def test_report_validates_and_gates_are_evaluated(report):
    validate_report(report)
    assert [len(v["serving"]) for v in report["variants"].values()] == [4, 4]
    assert [(g["metric"], g["passed"]) for g in report["gates"]] == [("tpot_ms.p50", True), ("top1_agreement", False)]
    assert report["gates_passed"] is False
    run = report["variants"]["int4"]["serving"][0]
    assert run["batching"] == "static" and run["concurrency"] == 1
    assert 0 < run["mbu"] and 0 < run["mfu"]


def test_schema_rejects_a_broken_report(report):
    bad = copy.deepcopy(report)
    del bad["variants"]["int4"]["serving"][0]["tpot_ms"]
    with pytest.raises(jsonschema.ValidationError):
        validate_report(bad)
    bad = copy.deepcopy(report)
    bad["variants"]["int4"]["serving"][0]["ttft_ms"] = {"mean": 1.0}
    with pytest.raises(jsonschema.ValidationError):
        validate_report(bad)


def test_write_report_files_and_markdown(report, tmp_path):
    written = write_report(tmp_path, copy.deepcopy(report))
    on_disk = json.loads(written["json"].read_text())
    validate_report(on_disk)
    assert set(on_disk["plots"]) == {"latency_vs_throughput", "ttft_tpot_distribution", "build_stages"}
    for rel in on_disk["plots"].values():
        assert (tmp_path / rel).read_bytes()[:4] == b"\x89PNG"
    md = written["md"].read_text()
    assert "−75%" in md  # int4's TPOT at a quarter of baseline's, on every run
    assert "❌" in md and "top1_agreement" in md and "static batching, concurrency 4" in md
    assert "![latency_vs_throughput](plots/latency_vs_throughput.png)" in md
    # the build stages with their peak memory (none recorded for the second: a cache entry from before it was)
    assert "| stage | op | seconds | peak RSS |  |" in md
    assert "| source | source | 1.5 | 2.0 GiB | cached |" in md and "| int4 | quantize | 3.2 | – |  |" in md


def test_delta_format():
    assert delta(22.0, 100.0) == "−78%" and delta(150.0, 100.0) == "+50%" and delta(1.0, None) == ""


def test_compare_shows_both_sides_and_deltas(report):
    other = copy.deepcopy(report)
    for run in other["variants"]["int4"]["serving"]:
        run["tpot_ms"]["p50"] *= 2
    text = compare(report, other)
    assert "int4" in text and "TPOT p50 ms" in text and "+100%" in text


def test_logit_quality_by_hand():
    tokens = np.array([[0, 1, 1]])
    src = np.log(np.array([[[0.5, 0.5], [0.25, 0.75], [0.5, 0.5]]]))
    same = logit_quality(tokens, src, src)
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    assert same["perplexity"] == pytest.approx(np.exp(-(np.log(0.5) + np.log(0.75)) / 2))
    var = np.log(np.array([[[0.5, 0.5], [0.75, 0.25], [0.5, 0.5]]]))
    q = logit_quality(tokens, var, src)
    kl_mid = 0.25 * np.log(0.25 / 0.75) + 0.75 * np.log(0.75 / 0.25)
    assert q["kl_divergence"] == pytest.approx(kl_mid / 3)
    assert q["top1_agreement"] == pytest.approx(2 / 3)
    assert greedy_agreement([[1, 2, 9, 4]], [[1, 2, 3, 4]]) == 0.5


def test_cpu_hardware_is_measured_and_says_so():
    h = hardware_info("cpu", measure=True)
    assert h["peak_bandwidth_gb_s"] > 0 and h["peak_tflops"] > 0
    assert h["peak_bandwidth_source"].startswith("measured") and h["peak_tflops_source"].startswith("measured")


def _tiny_llama_variant(root):
    """A tiny random llama, exported by the export pass's own code, as a variant directory."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from recipec.onnx.artifact import write_artifact_json
    from recipec.passes.onnx.export import export_model, load_torch_model

    model_dir, variant_dir = root / "model", root / "baseline"
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    export_model(load_torch_model(model_dir), variant_dir, external_data_threshold_mb=1024)
    write_artifact_json(variant_dir, model_dir)
    return model_dir, variant_dir


def test_end_to_end_profile_of_a_tiny_exported_model(tmp_path):
    pytest.importorskip("recipec.runtime.lm", reason="recipec/runtime.py (the ONNX step runtime) is not in this checkout yet")
    from recipec.profile.profiler import profile_variant
    from recipec.profile.quality import source_reference

    model_dir, variant_dir = _tiny_llama_variant(tmp_path)
    eval_tokens = np.random.default_rng(0).integers(0, 256, size=(2, 16))
    prompts = [list(range(1, 9)), list(range(20, 26))]
    ref = source_reference(model_dir, eval_tokens, prompts, n_new=6)
    spec = {"batching": {"policy": ["continuous", "dynamic"], "max_batch_size": 2, "max_wait_ms": 2},
            "workload": {"prompt_tokens": {"min": 4, "max": 12}, "output_tokens": 5, "requests": 4,
                         "warmup_requests": 1, "concurrency": [1, 2]}}
    v = profile_variant(variant_dir, spec, "cpu", eval_tokens, ref["logits"], ref["greedy"], hardware=HW)
    q = v["quality"]
    assert q["kl_divergence"] < 1e-6 and q["top1_agreement"] == 1.0 and q["greedy_agreement"] == 1.0
    assert q["perplexity"] == pytest.approx(q["source_perplexity"], rel=1e-4)
    assert [(r["batching"], r["concurrency"]) for r in v["serving"]] == [("continuous", 1), ("continuous", 2),
                                                                         ("dynamic", 1), ("dynamic", 2)]
    for run in v["serving"]:
        assert run["completed"] == 4 and run["total_output_tokens"] == 20
        assert run["tpot_ms"]["p50"] > 0 and run["mbu"] > 0 and run["mfu"] > 0
        assert 0 <= run["engine_overhead_ms"] < run["decode_step_ms"]  # onnxruntime's run is inside the step
        assert run["peak_memory_mb"] > 20 and "serving process" in run["peak_memory_source"]
    assert v["artifact"]["parameters"] > 0 and v["artifact"]["bytes"] > 4 * v["artifact"]["parameters"] * 0.9
    assert v["artifact"]["compute_dtype"] == {"dtype": "float32", "peak_dtype": "float32", "peak_tflops": 1e-6}
    report = build_report({"name": "tiny-e2e", "sha256": "cd" * 32}, HW, {"baseline": v},
                          [{"metric": "kl_divergence", "max": 1e-4}])
    validate_report(report)
    assert report["gates_passed"]


def test_source_reference_spools_the_same_logits_and_frees_the_model(tmp_path):
    import gc
    import warnings

    from transformers import PreTrainedModel

    from recipec.profile.quality import SpooledLogits, source_reference

    model_dir, _ = _tiny_llama_variant(tmp_path)
    eval_tokens = np.random.default_rng(1).integers(0, 256, size=(3, 12))
    held = source_reference(model_dir, eval_tokens)["logits"]
    spooled = source_reference(model_dir, eval_tokens, spool=tmp_path / "logits.f32")["logits"]
    assert isinstance(spooled, SpooledLogits) and spooled.shape == held.shape and len(spooled) == 3
    assert all(np.array_equal(a, b) for a, b in zip(spooled, held))
    # the profiling process holds no source model once the reference is computed (gc: only cycles could)
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some of torch's objects warns of their deprecation
        warnings.simplefilter("ignore")
        assert not [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
    tokens = eval_tokens
    assert logit_quality(tokens, iter(held), spooled) == logit_quality(tokens, held, held)


def test_peak_memory_catches_a_freed_allocation():
    from recipec.core.memory import rss_mb
    from recipec.profile.memory import PeakMemory

    before = rss_mb()
    with PeakMemory("cpu") as mem:
        block = np.ones(100 * 2**20 // 8)  # 100 MiB, touched, then freed before the block ends
        del block
    assert mem.peak_mb > before + 90
    assert "peak resident set" in mem.source


def test_cache_resident_runs_are_flagged_in_report_md(report):
    """A run whose decode step fits in the last-level cache keeps its MBU, marked, with the reason under the table."""
    from recipec.profile.markdown import CACHE_MARK, render_markdown

    flagged = copy.deepcopy(report)
    flagged["hardware"]["last_level_cache_bytes"] = 32 << 20
    for variant in flagged["variants"].values():
        for run in variant["serving"]:
            run["cache_resident"] = True
    plain, marked = render_markdown(report), render_markdown(flagged)
    assert CACHE_MARK not in plain
    assert f"%{CACHE_MARK} |" in marked and "the decode step reads no more bytes than the 32 MiB last-level cache" in marked
