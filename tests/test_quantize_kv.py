"""quantize_kv: an int8 KV cache in GroupQueryAttention, calibrated, scored on decode steps, and served by the
slot loop; the cache's bytes per token drop to a quarter of float32's."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import RECIPE_HEAD, cli_build, RandomWindows, make_tiny_model, run_pass
from recipec.errors import PassError
from recipec.runtime import lm as runtime
from recipec.runtime.engine import Engine, Policy
from recipec.runtime.slots import SlotLM
from test_runtime import PROMPTS


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    """transformers' default initializer range: the shared fixtures' 0.5 makes keys of magnitude ~15 and logits
    so sharp that any rounding of the cache moves them, which says nothing about a trained model."""
    source = make_tiny_model("llama", tmp_path_factory.mktemp("kv-source"), initializer_range=0.02)
    exported = tmp_path_factory.mktemp("kv-export")
    run_pass("export", source, exported)
    out = tmp_path_factory.mktemp("kv-shared")
    run_pass("fuse", exported, out, kv_buffer="shared")
    return out


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_int8_cache_is_int8_calibrated_and_within_its_quality_bound(shared_dir, tmp_path, granularity):
    metrics = run_pass("quantize_kv", shared_dir, tmp_path, data=RandomWindows(), granularity=granularity,
                       max_kl=0.05)
    graph = onnx.load(str(tmp_path / "model.onnx"))
    attention = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2
    for node in attention:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k_quant_type"] == granularity.upper().encode() and attrs["kv_cache_bit_width"] == 8
        assert node.input[12] and node.input[13]
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer if t.name.startswith("kv_scale.")}
    assert len(scales) == 4 and all(s.min() > 0 for s in scales.values())
    assert next(iter(scales.values())).shape == ((1, 2, 1, 16) if granularity == "per_channel" else (1,))
    artifact = json.loads((tmp_path / "artifact.json").read_text())
    assert artifact["kv_cache"]["dtype"] == "int8" and artifact["kv_cache"]["buffer"] == "shared"
    assert metrics["kv_dtype"] == {"before": "float32", "after": "int8"}
    # near-tied random logits: judged by KL (measured 2e-6 per channel, 3e-7 per tensor), not top-1
    assert 0 < metrics["kl_mean"] <= 1e-4


def test_int8_cache_serves_through_slots_close_to_the_float_cache(shared_dir, tmp_path):
    run_pass("quantize_kv", shared_dir, tmp_path, data=RandomWindows())
    lm = runtime.load(tmp_path, device="cpu")
    reference = runtime.load(shared_dir, device="cpu")
    logits_int8, batch = SlotLM(lm, 2).prefill(PROMPTS[:1])
    logits_fp32, _ = SlotLM(reference, 2).prefill(PROMPTS[:1])
    assert np.abs(logits_int8 - logits_fp32).max() < 0.02 * np.abs(logits_fp32).max()
    engine = Engine(SlotLM(lm, 3), Policy("continuous", max_batch_size=3))
    requests = [engine.submit(p, 6) for p in PROMPTS]
    while engine.step(flush=True):
        pass
    assert all(len(r.tokens) == 6 for r in requests)


def test_a_growing_graph_is_refused(exported, tmp_path):
    with pytest.raises(PassError, match="kv_buffer: shared"):
        run_pass("quantize_kv", exported("llama")[0], tmp_path, data=RandomWindows())


def test_drift_past_max_kl_fails_the_stage(shared_dir, tmp_path):
    with pytest.raises(PassError, match="max_kl 0"):
        run_pass("quantize_kv", shared_dir, tmp_path, data=RandomWindows(), max_kl=0)


def test_validate_wants_quantize_kv_last(tmp_path, capsys):
    from recipec import cli

    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE_HEAD + "passes:\n  - {id: f, op: fuse, with: {kv_buffer: shared}}\n"
                                  "  - {id: kv8, op: quantize_kv}\n"
                                  "  - {id: q4, op: quantize, after: kv8, with: {scheme: int4}}\n")
    assert cli.main(["validate", str(path)]) == 2
    assert "run quantize_kv last" in capsys.readouterr().err
    path.write_text(RECIPE_HEAD + "passes:\n  - {id: f, op: fuse, with: {kv_buffer: shared, attention: mha}}\n")
    assert cli.main(["validate", str(path)]) == 2
    assert "kv_buffer: shared needs GroupQueryAttention" in capsys.readouterr().err


BUILD = RECIPE_HEAD + """\
passes:
  - {id: ex, op: export}
  - {id: shared, op: fuse, with: {kv_buffer: shared}}
  - {id: q4, op: quantize, with: {scheme: int4, max_kl: 100.0, min_top1: 0.0}}
  - {id: kv8, op: quantize_kv, with: {max_kl: 100.0}}
serving:
  batching: {policy: continuous, max_batch_size: 2}
  workload: {prompt_tokens: 8, output_tokens: 4, requests: 3, warmup_requests: 1, concurrency: [2]}
data:
  eval: {samples: 2, seq_len: 16}
  calibration: {samples: 2, seq_len: 16}
"""


def test_a_recipe_builds_and_profiles_an_int8_cache_variant_through_slots(tmp_path):
    result, _ = cli_build(BUILD, tmp_path)
    assert result.returncode == 0, result.stderr
    build = tmp_path / "out" / "tiny"
    artifact = json.loads((build / "variants" / "kv8" / "artifact.json").read_text())
    assert artifact["kv_cache"]["dtype"] == "int8"
    genai = json.loads((build / "variants" / "kv8" / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    report = json.loads((build / "report.json").read_text())
    run = report["variants"]["kv8"]["serving"][0]
    assert run["completed"] == 3 and run["total_output_tokens"] == 3 * 4 and run["mean_decode_batch"] > 1
