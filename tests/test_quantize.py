"""quantize: each scheme's operators, sizes and fidelity against the float graph, on a trained tiny llama."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import RECIPE_HEAD, run_pass
from onnx import numpy_helper

from recipec import cli
from recipec.onnx import artifact
from recipec.passes.onnx import quantize
from recipec.passes.base import PassError

VOCAB = 256
# Fidelity the trained tiny model must keep per scheme (measured: KL 1.4e-4, 3.3e-4, 3.6e-3, 7e-8; top-1 >= 0.99).
TEST_BOUNDS = {"int8-dynamic": (0.01, 0.95), "int8-static": (0.01, 0.95), "int4": (0.05, 0.9), "fp16": (1e-4, 0.99)}


def _sequences(count: int, length: int, seed: int) -> torch.Tensor:
    """Arithmetic sequences mod VOCAB with stride 1-3: after two tokens the next one is determined."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    stride = torch.randint(1, 4, (count, 1), generator=generator)
    return (start + stride * torch.arange(length)) % VOCAB


class Windows:
    def __init__(self):
        self._calibration, self._eval = _sequences(8, 32, seed=1), _sequences(8, 32, seed=2)

    def calibration(self) -> torch.Tensor:
        return self._calibration

    def eval(self) -> torch.Tensor:
        return self._eval


def run_quantize(source: Path, out: Path, **params) -> dict[str, Any]:
    return run_pass("quantize", source, out, Windows(), **params)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, export_op) -> Path:
    """A tiny llama trained to continue arithmetic sequences (decisive logits, trained weight statistics),
    exported: quantization error on random weights says little about a real model."""
    from conftest import TINY_CONFIGS
    from transformers import AutoConfig, AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine shared with other work: more threads only contend
    try:
        torch.manual_seed(0)
        config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "initializer_range": 0.02})
        model = AutoModelForCausalLM.from_config(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(80):
            ids = _sequences(16, 32, seed=100 + step)
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model_dir = tmp_path_factory.mktemp("trained-llama")
    model.eval().save_pretrained(model_dir)
    variant = tmp_path_factory.mktemp("trained-llama-onnx")
    export_op(model_dir, variant)
    return variant


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
    done: dict[str, tuple[Path, dict[str, Any]]] = {}

    def get(scheme: str) -> tuple[Path, dict[str, Any]]:
        if scheme not in done:
            out = tmp_path_factory.mktemp(f"q-{scheme}")
            done[scheme] = (out, run_quantize(trained, out, scheme=scheme))
        return done[scheme]

    return get


def _graph(variant: Path) -> onnx.ModelProto:
    return onnx.load(str(variant / "model.onnx"))


def _ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def _float_weight_matmuls(proto: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _check_runs_like_its_source(variant: Path, source: Path) -> None:
    session = ort.InferenceSession(str(variant / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(source / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [(i.name, i.type) for i in reference.get_inputs()]
    assert [o.name for o in session.get_outputs()] == [o.name for o in reference.get_outputs()]
    written = artifact.read_artifact(variant)
    assert written["model"] == artifact.read_artifact(source)["model"] and written["kv_cache"]["num_layers"] == 2


@pytest.mark.parametrize("scheme", quantize.SCHEMES)
def test_scheme_fidelity_and_a_runnable_artifact(scheme, quantized, trained):
    variant, metrics = quantized(scheme)
    max_kl, min_top1 = TEST_BOUNDS[scheme]
    assert metrics["kl_mean"] <= max_kl and metrics["top1_agreement"] >= min_top1, metrics
    assert metrics["positions"] == 8 * 32
    assert metrics["file_bytes"]["after"] < metrics["file_bytes"]["before"]
    _check_runs_like_its_source(variant, trained)
    json.dumps(metrics)


def test_int8_dynamic_uses_matmulinteger(quantized, trained):
    variant, metrics = quantized("int8-dynamic")
    proto, source = _graph(variant), _graph(trained)
    ops = _ops(proto)
    assert ops["MatMulInteger"] == len(_float_weight_matmuls(source)) and ops["DynamicQuantizeLinear"] > 0
    assert _float_weight_matmuls(proto) == []
    weights = metrics["quantization"]["weights"]
    assert weights["dtype"] == "int8" and weights["symmetric"] and weights["granularity"] == "per-tensor"
    assert metrics["quantization"]["activations"]["dtype"] == "uint8"
    assert metrics["matmul_weight_bytes"]["after"] < 0.3 * metrics["matmul_weight_bytes"]["before"]


def test_int8_static_inserts_qdq_pairs(quantized):
    variant, metrics = quantized("int8-static")
    proto = _graph(variant)
    consumers = {i: n for n in proto.graph.node for i in n.input}
    quantizers = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers and all(consumers[q.output[0]].op_type == "DequantizeLinear" for q in quantizers)
    inits = {t.name: t for t in proto.graph.initializer}
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dq and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in weight_dq)
    records = metrics["quantization"]
    assert records["activations"]["scale_min"] > 0 and records["calibration"] == {
        "method": "minmax", "windows": 8, "tokens_per_window": 32}
    assert metrics["matmul_weight_bytes"]["after"] < 0.3 * metrics["matmul_weight_bytes"]["before"]


def test_int4_uses_matmulnbits_at_a_third_of_the_bytes(quantized, trained):
    variant, metrics = quantized("int4")
    proto, source = _graph(variant), _graph(trained)
    assert _ops(proto)["MatMulNBits"] == len(_float_weight_matmuls(source)) and _float_weight_matmuls(proto) == []
    assert metrics["matmul_weight_bytes"]["after"] < 0.35 * metrics["matmul_weight_bytes"]["before"]
    weights = metrics["quantization"]["weights"]
    assert weights["block_size"] == [32] and weights["symmetric"] and weights["zero_point"].startswith("implicit")


def test_fp16_converts_weights_and_keeps_float32_io(quantized, trained):
    variant, metrics = quantized("fp16")
    proto = _graph(variant)
    inits = {t.name: t for t in proto.graph.initializer}
    weights = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    assert metrics["matmul_weight_bytes"]["after"] * 2 == metrics["matmul_weight_bytes"]["before"]
    assert all(v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for v in proto.graph.output)


def test_int4_asymmetric_stores_zero_points(trained, tmp_path):
    metrics = run_quantize(trained, tmp_path, scheme="int4", symmetric=False, block_size=64)
    weights = metrics["quantization"]["weights"]
    assert not weights["symmetric"] and weights["zero_point"] == "stored per block" and weights["block_size"] == [64]


def test_per_channel_int8_records_per_channel_scales(trained, tmp_path):
    metrics = run_quantize(trained, tmp_path, scheme="int8-dynamic", per_channel=True)
    assert metrics["quantization"]["weights"]["granularity"] == "per-channel/block"


def test_exclude_keeps_matching_nodes_in_float(trained, tmp_path):
    metrics = run_quantize(trained, tmp_path, scheme="int4", exclude=["*lm_head*"])
    proto = _graph(tmp_path)
    assert _float_weight_matmuls(proto) == metrics["excluded_nodes"] == ["/lm_head/MatMul"]
    lm_head = next(n for n in proto.graph.node if n.name == "/lm_head/MatMul")
    weight = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == lm_head.input[1]))
    assert weight.dtype == np.float32


def test_exclude_pattern_matching_nothing_fails(trained, tmp_path):
    with pytest.raises(PassError, match="'\\*lm_haed\\*' matches no node"):
        run_quantize(trained, tmp_path, scheme="int8-dynamic", exclude=["*lm_haed*"])


def test_option_of_another_scheme_fails(trained, tmp_path):
    with pytest.raises(PassError, match="block_size applies to int4, not int8-dynamic"):
        run_quantize(trained, tmp_path, scheme="int8-dynamic", block_size=64)


@pytest.mark.parametrize("with_, field, message", [
    ("{scheme: int4, per_channel: true}", "per_channel", "per_channel applies to int8-dynamic, int8-static, not int4"),
    ("{scheme: int8-dynamic, block_size: 64}", "block_size", "block_size applies to int4, not int8-dynamic"),
    ("{scheme: int8-dynamic, method: entropy}", "method", "method applies to int8-static, not int8-dynamic"),
    ("{scheme: fp16, symmetric: false}", "symmetric", "symmetric applies to int4, not fp16"),
    ("{scheme: int8-static, keep_fp32_ops: [Softmax]}", "keep_fp32_ops", "keep_fp32_ops applies to fp16, not int8-static"),
])
def test_validate_rejects_an_option_of_another_scheme(with_, field, message, tmp_path, capsys):
    """The rule the stage enforces is `recipec validate`'s too: the recipe fails before any build."""
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE_HEAD + f"passes:\n  - id: q\n    op: quantize\n    with: {with_}\n")
    assert cli.main(["validate", str(path)]) == 2
    column = 11 + with_.index(f"{field}: ") + len(f"{field}: ")  # the value's column on the `with` line
    assert f"{path}:10:{column}: passes[0].with.{field}: {message}" in capsys.readouterr().err


def test_fidelity_bound_fails_the_stage(trained, tmp_path):
    with pytest.raises(PassError, match="drifts too far"):
        run_quantize(trained, tmp_path, scheme="int4", max_kl=1e-9)


def test_quantize_after_fuse_keeps_fused_attention(trained, tmp_path):
    run_pass("fuse", trained, tmp_path / "fused")
    metrics = run_quantize(tmp_path / "fused", tmp_path / "int4", scheme="int4")
    ops = _ops(_graph(tmp_path / "int4"))
    assert ops["GroupQueryAttention"] == 2 and ops["MatMulNBits"] == 9  # (qkv, o, gate+up, down) x 2 + lm_head
    assert metrics["kl_mean"] <= TEST_BOUNDS["int4"][0]
