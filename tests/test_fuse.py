"""fuse: onnxruntime's fused operators in the graph, the same I/O contract, the same logits."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import run_pass

from recipec.onnx import artifact
from recipec.passes.base import PassError
from recipec.passes.onnx.verify import verify_variant
from recipec.runtime.lm import load

LEVELS = ("basic", "extended", "all")
# What "reaching the builder's level" means per family: attention with its KV cache in one op, rotary
# fused, residual + norm fused (onnxruntime-genai's builder emits the same for llama).
EXPECTED_OPS = {
    "llama": {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"},
    "qwen2": {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"},
    "mistral": {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"},
    "gpt2": {"MultiHeadAttention", "FastGelu", "SkipLayerNormalization"},
}


def run_fuse(source: Path, out: Path, log=None, **params) -> dict[str, Any]:
    return run_pass("fuse", source, out, log=log, **params)


@pytest.fixture(scope="module")
def fused(exported, tmp_path_factory):
    """(family, level) -> (fused variant directory, metrics)."""
    done: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}

    def get(family: str, level: str = "extended") -> tuple[Path, dict[str, Any]]:
        if (family, level) not in done:
            out = tmp_path_factory.mktemp(f"fused-{family}-{level}")
            done[(family, level)] = (out, run_fuse(exported(family)[0], out, level=level))
        return done[(family, level)]

    return get


def _ops(variant: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(variant / "model.onnx"), load_external_data=False).graph.node)


def _io(variant: Path) -> list[tuple]:
    graph = onnx.load(str(variant / "model.onnx"), load_external_data=False).graph
    return [(v.name, str(v.type)) for v in list(graph.input) + list(graph.output)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("level", LEVELS)
def test_each_level_shrinks_the_graph_and_keeps_its_contract(family, level, fused, exported, tiny_model_dir):
    variant, metrics = fused(family, level)
    assert metrics["nodes_after"] < metrics["nodes_before"]
    assert sum(_ops(variant).values()) == metrics["nodes_after"]
    assert _io(variant) == _io(exported(family)[0])  # names, dtypes and dim names of every input and output
    assert max(metrics["max_abs_diff"].values()) <= metrics["tolerance"]
    # Independent of the pass's own check: the fused graph against PyTorch, left-padded prefill + decode.
    assert verify_variant(variant, tiny_model_dir(family), atol=1e-3, rtol=1e-3)["max_abs_diff"] < 1e-3
    json.dumps(metrics)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_attention_rotary_and_norms_fuse(family, fused):
    variant, metrics = fused(family)
    ops = _ops(variant)
    assert EXPECTED_OPS[family] <= set(ops), ops
    layers = 2
    attention = "MultiHeadAttention" if family == "gpt2" else "GroupQueryAttention"
    assert ops[attention] == layers and metrics["fused_ops"][attention] == layers
    assert "Softmax" not in ops  # no attention left unfused
    if family != "gpt2":
        assert ops["RotaryEmbedding"] == 2 * layers
        assert metrics["rewrites"]["merged_matmul_groups"] == 2 * layers  # q/k/v and gate/up per layer


def test_basic_level_fuses_nothing(fused):
    variant, metrics = fused("llama", "basic")
    assert metrics["fused_ops"] == {} and "GroupQueryAttention" not in _ops(variant)


def test_artifact_describes_the_fused_graph(fused, exported):
    variant, _ = fused("llama")
    written, source = artifact.read_artifact(variant), artifact.read_artifact(exported("llama")[0])
    assert written["model"] == source["model"] and written["kv_cache"] == source["kv_cache"]
    assert written["graph"]["optional_inputs"] == source["graph"]["optional_inputs"]  # logits_to_keep kept
    assert {f["name"] for f in written["files"]} >= {"model.onnx", "config.json", "tokenizer.json"}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_kept_logits_are_one_slice_selecting_what_the_exported_graph_selects(family, fused, exported):
    variant, metrics = fused(family)
    assert metrics["rewrites"]["kept_logits_slices"] == 1
    graph = onnx.load(str(variant / "model.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graph.node if "logits_to_keep" in n.input] == ["Neg"]  # the traced clamping is gone
    source, candidate = load(exported(family)[0], device="cpu"), load(variant, device="cpu")
    ids = np.random.default_rng(0).integers(0, source.vocab_size, (2, 5))
    for keep in (0, 1, 3, 5, 9):  # 0 is every position, as is anything past the sequence
        want, _ = source.forward(ids, np.ones_like(ids), source.empty_cache(2), logits_to_keep=keep)
        got, _ = candidate.forward(ids, np.ones_like(ids), candidate.empty_cache(2), logits_to_keep=keep)
        assert got.shape == want.shape == (2, keep if 0 < keep < 5 else 5, source.vocab_size)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_attention_none_keeps_attention_unfused(exported, tmp_path):
    metrics = run_fuse(exported("llama")[0], tmp_path, attention="none")
    ops = _ops(tmp_path)
    assert "GroupQueryAttention" not in ops and ops["Softmax"] == 2
    assert "SkipSimplifiedLayerNormalization" in ops and metrics["nodes_after"] < metrics["nodes_before"]


def test_mha_needs_as_many_kv_heads_as_heads(exported, tmp_path):
    messages: list[str] = []
    run_fuse(exported("llama")[0], tmp_path, attention="mha", log=messages.append)
    assert "MultiHeadAttention" not in _ops(tmp_path)
    assert any("no attention block matched" in m for m in messages)


def test_a_drift_past_the_tolerance_fails_the_stage(exported, tmp_path):
    with pytest.raises(PassError, match="differs from its input"):
        run_fuse(exported("llama")[0], tmp_path, tolerance=1e-12)


def test_missing_input_graph_is_a_clear_error(tmp_path):
    with pytest.raises(PassError, match="artifact.json|model.onnx"):
        run_fuse(tmp_path, tmp_path / "out")


def test_the_optimizer_prints_nothing_and_is_told_the_real_widths(exported, tmp_path, capfd, monkeypatch):
    """It once printed "Please specify parameters of num_heads and hidden_size for model_type gpt2" for qwen2."""
    from recipec.onnx.fusions import pipeline

    asked: list[tuple[int, int]] = []
    real = pipeline.optimize_model

    def spy(model, **kwargs):
        asked.append((kwargs["num_heads"], kwargs["hidden_size"]))
        return real(model, **kwargs)

    monkeypatch.setattr(pipeline, "optimize_model", spy)
    messages: list[str] = []
    source = exported("qwen2")[0]
    capfd.readouterr()  # the export's own output
    run_fuse(source, tmp_path, log=messages.append)
    out, err = capfd.readouterr()
    config = artifact.read_artifact(source)["model"]
    assert asked == [(config["num_attention_heads"], config["hidden_size"])]
    assert out == "" and err == "", (out, err)
    assert not any("onnxruntime.transformers" in m for m in messages), messages


def test_what_the_optimizer_says_goes_to_the_stage_log_named_and_its_chatter_nowhere(exported, tmp_path, capfd,
                                                                                      monkeypatch):
    import logging
    import os

    from recipec.onnx.fusions import pipeline

    real = pipeline.optimize_model

    def talkative(model, **kwargs):
        logging.getLogger("fusion_skiplayernorm").warning("skip layer norm fusion found a mismatched shape")
        logging.getLogger("onnxruntime.transformers.optimizer").info("fused SkipLayerNormalization: 4")
        print("failed in shape inference <class 'AssertionError'>")
        os.write(1, b"a native line\n")
        print("Removed 3 initializers with duplicated value")
        return real(model, **kwargs)

    monkeypatch.setattr(pipeline, "optimize_model", talkative)
    messages: list[str] = []
    source = exported("llama")[0]
    capfd.readouterr()
    run_fuse(source, tmp_path, log=messages.append)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    said = [m for m in messages if m.startswith("fuse: onnxruntime.transformers: ")]
    assert [m.split(": ", 2)[2] for m in said] == ["skip layer norm fusion found a mismatched shape",
                                                   "failed in shape inference <class 'AssertionError'>",
                                                   "a native line"], messages
