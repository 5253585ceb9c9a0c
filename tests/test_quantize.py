"""quantize: each scheme's operators, sizes and fidelity against the float graph, on a trained tiny llama."""
from __future__ import annotations

import json
import shutil
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
from recipec.passes.onnx import quantize, quantize_embeddings
from recipec.passes.base import PassError

VOCAB = 256
# Fidelity the trained tiny models must keep per scheme, embeddings quantized (measured: untied KL 2.2e-3, 1.7e-3,
# 6.1e-3, 1e-7, top-1 >= 0.988; tied KL 4.9e-4, 6.0e-4, 4.1e-3, 5e-7, top-1 >= 0.965).
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


def _train_and_export(tmp_path_factory, export_op, name: str, **overrides) -> Path:
    """A tiny llama trained to continue arithmetic sequences (decisive logits, trained weight statistics),
    exported: quantization error on random weights says little about a real model."""
    from conftest import TINY_CONFIGS
    from transformers import AutoConfig, AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine shared with other work: more threads only contend
    try:
        torch.manual_seed(0)
        config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "initializer_range": 0.02, **overrides})
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
    model_dir = tmp_path_factory.mktemp(name)
    model.eval().save_pretrained(model_dir)
    variant = tmp_path_factory.mktemp(f"{name}-onnx")
    export_op(model_dir, variant)
    return variant


@pytest.fixture(scope="module")
def trained(tmp_path_factory, export_op) -> Path:
    return _train_and_export(tmp_path_factory, export_op, "trained-llama")


@pytest.fixture(scope="module")
def trained_tied(tmp_path_factory, export_op) -> Path:
    """The trained tiny llama with tied embeddings, its graph reading one table in the Gather and the head."""
    variant = _train_and_export(tmp_path_factory, export_op, "trained-tied-llama", tie_word_embeddings=True)
    tie_head(variant)
    return variant


def tie_head(variant: Path, form: str = "as exported") -> None:
    """Make sure the LM head reads the embedding table (an export that unties stores the head as the table's
    transposed copy: it becomes MatMul(x, Transpose(table))); form "fused" rewrites the head as
    FusedMatMul(x, table, transB=1), which onnxruntime's optimizer writes for a MatMul over a Transpose."""
    proto = onnx.load(str(variant / "model.onnx"))
    inits = _inits(proto)
    table = _token_gather(proto).input[0]
    head = _head(proto)
    nodes = list(proto.graph.node)
    if head.input[1] != table and head.input[1] in inits:
        weight = numpy_helper.to_array(inits[head.input[1]])
        assert np.array_equal(weight, numpy_helper.to_array(inits[table]).T)
        proto.graph.initializer.remove(inits[head.input[1]])
        transpose = onnx.helper.make_node("Transpose", [table], ["/lm_head/Transpose_output_0"],
                                          name="/lm_head/Transpose", perm=[1, 0])
        head.input[1] = transpose.output[0]
        nodes.insert(nodes.index(head), transpose)
    if form == "fused":
        nodes = [n for n in nodes if n.op_type != "Transpose" or n.input[0] != table]
        nodes[nodes.index(head)] = onnx.helper.make_node(
            "FusedMatMul", [head.input[0], table], list(head.output), name="/lm_head/FusedMatMul",
            domain="com.microsoft", transB=1, alpha=1.0)
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.save(proto, str(variant / "model.onnx"))
    artifact.write_artifact_json(variant, base=artifact.read_artifact(variant))


def _head(proto: onnx.ModelProto) -> onnx.NodeProto:
    """The LM head: the matrix multiply among the /lm_head/ nodes."""
    ops = ("MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulInteger")
    return next(n for n in proto.graph.node if n.name.startswith("/lm_head/") and n.op_type in ops)


def _inits(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


def _token_gather(proto: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in proto.graph.node
                if n.op_type in ("Gather", "GatherBlockQuantized") and n.input[1] == "input_ids")


def _quantized_once(source: Path, tmp_path_factory, prefix: str):
    """scheme -> (variant dir, metrics) of `source` quantized with that scheme, each scheme run once."""
    done: dict[str, tuple[Path, dict[str, Any]]] = {}

    def get(scheme: str) -> tuple[Path, dict[str, Any]]:
        if scheme not in done:
            out = tmp_path_factory.mktemp(f"{prefix}-{scheme}")
            done[scheme] = (out, run_quantize(source, out, scheme=scheme))
        return done[scheme]

    return get


@pytest.fixture(scope="module")
def quantized(trained, tmp_path_factory):
    return _quantized_once(trained, tmp_path_factory, "q")


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


def test_fp16_with_float16_io_is_scored_on_its_own_input_types(trained, tmp_path):
    """keep_io_types: false makes the KV cache and logits float16: the fidelity check feeds each graph the
    types it declares (it fed the input graph's float32 KV tensors to the fp16 graph and crashed)."""
    metrics = run_quantize(trained, tmp_path, scheme="fp16", keep_io_types=False)
    proto = _graph(tmp_path)
    kv = [v for v in proto.graph.input if v.name.startswith("past_key_values.")]
    assert kv and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in kv)
    assert metrics["kl_mean"] <= quantize.BOUNDS["fp16"][0]


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
    ("{scheme: fp16, embeddings: keep}", "embeddings", "embeddings applies to int8-dynamic, int8-static, int4, not fp16"),
])
def test_validate_rejects_an_option_of_another_scheme(with_, field, message, tmp_path, capsys):
    """The rule the stage enforces is `recipec validate`'s too: the recipe fails before any build."""
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE_HEAD + f"passes:\n  - id: q\n    op: quantize\n    with: {with_}\n")
    assert cli.main(["validate", str(path)]) == 2
    column = 11 + with_.index(f"{field}: ") + len(f"{field}: ")  # the value's column on the `with` line
    assert f"{path}:10:{column}: passes[0].with.{field}: {message}" in capsys.readouterr().err


def test_validate_rejects_an_unknown_embeddings_mode(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE_HEAD + "passes:\n  - id: q\n    op: quantize\n    with: {scheme: int4, embeddings: drop}\n")
    assert cli.main(["validate", str(path)]) == 2
    assert (f"{path}:10:38: passes[0].with.embeddings: unknown value 'drop' (expected one of: quantize, keep)"
            in capsys.readouterr().err)


def test_fidelity_bound_fails_the_stage(trained, tmp_path):
    with pytest.raises(PassError, match="drifts too far"):
        run_quantize(trained, tmp_path, scheme="int4", max_kl=1e-9)


def test_quantize_after_fuse_keeps_fused_attention(trained, tmp_path):
    run_pass("fuse", trained, tmp_path / "fused")
    metrics = run_quantize(tmp_path / "fused", tmp_path / "int4", scheme="int4")
    ops = _ops(_graph(tmp_path / "int4"))
    assert ops["GroupQueryAttention"] == 2 and ops["MatMulNBits"] == 9  # (qkv, o, gate+up, down) x 2 + lm_head
    assert metrics["kl_mean"] <= TEST_BOUNDS["int4"][0]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _weights(variant: Path) -> dict[str, Any]:
    return artifact.read_artifact(variant)["weights"]


@pytest.mark.parametrize("scheme, bits", [("int4", 4), ("int8-dynamic", 8), ("int8-static", 8)])
def test_embedding_table_becomes_gatherblockquantized(scheme, bits, quantized, trained):
    variant, metrics = quantized(scheme)
    proto, table = _graph(variant), _token_gather(_graph(trained)).input[0]
    gather, inits = _token_gather(proto), _inits(proto)
    assert gather.op_type == "GatherBlockQuantized" and gather.domain == "com.microsoft"
    assert _attrs(gather) == {"bits": bits, "block_size": 32, "gather_axis": 0, "quantize_axis": 1}
    data = inits[gather.input[0]]  # untied: the rows as stored, no Reshape
    assert data.data_type == onnx.TensorProto.UINT8 and list(data.dims) == [VOCAB, 64 * bits // 8]
    assert table not in inits and _ops(proto)["GatherBlockQuantized"] == 1
    record = metrics["quantization"]["embeddings"]
    assert record["mode"] == "quantize" and record["kept"] == []
    (quantized_table,) = record["quantized"]
    assert quantized_table["table"] == table and quantized_table["tied_heads"] == []
    assert quantized_table["bytes"] == {"before": VOCAB * 64 * 4, "after": VOCAB * 64 * bits // 8 + VOCAB * 2 * 4}
    before, after = _weights(trained), _weights(variant)  # packed values count as the values they hold
    assert after["parameters"] == before["parameters"]
    assert after["embedding_parameters"] == before["embedding_parameters"] == VOCAB * 64


@pytest.fixture(scope="module")
def quantized_tied(trained_tied, tmp_path_factory):
    return _quantized_once(trained_tied, tmp_path_factory, "q-tied")


@pytest.mark.parametrize("scheme, bits", [("int4", 4), ("int8-dynamic", 8), ("int8-static", 8)])
def test_tied_embeddings_keep_one_quantized_table(scheme, bits, quantized_tied, trained_tied):
    """The Gather and the head read the same packed data and scales: GatherBlockQuantized through a Reshape,
    MatMulNBits directly (onnxruntime-genai's tied layout); no float copy of the table is left."""
    variant, metrics = quantized_tied(scheme)
    proto = _graph(variant)
    inits, producers = _inits(proto), {o: n for n in proto.graph.node for o in n.output}
    gather, head = _token_gather(proto), _head(proto)
    reshape = producers[gather.input[0]]
    assert head.op_type == "MatMulNBits" and reshape.op_type == "Reshape"
    assert reshape.input[0] == head.input[1] and gather.input[2] == head.input[2]
    assert list(inits[head.input[1]].dims) == [VOCAB, 2, 32 * bits // 8]
    assert {k: _attrs(head)[k] for k in ("K", "N", "bits", "block_size")} == {"K": 64, "N": VOCAB, "bits": bits,
                                                                               "block_size": 32}
    floats = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and VOCAB in t.dims
              and 64 in t.dims]
    assert floats == []
    assert _weights(variant)["parameters"] == _weights(trained_tied)["parameters"]  # the table counted once
    assert artifact.read_artifact(variant)["graph"]["tied_embedding"] == {
        "initializer": head.input[1], "gather": gather.name, "head": head.name}
    (record,) = metrics["quantization"]["embeddings"]["quantized"]
    assert record["tied_heads"] == [_head(_graph(trained_tied)).name] and record["shape"] == [VOCAB, 64]
    max_kl, min_top1 = TEST_BOUNDS[scheme]
    assert metrics["kl_mean"] <= max_kl and metrics["top1_agreement"] >= min_top1, metrics
    _check_runs_like_its_source(variant, trained_tied)


def test_tied_fusedmatmul_head_with_a_padded_block(trained_tied, tmp_path):
    """onnxruntime's optimizer writes the tied head as FusedMatMul(x, table, transB=1); with blocks wider
    than the hidden size the Gather's rows carry padding, which a Slice drops."""
    source = tmp_path / "fused-head"
    shutil.copytree(trained_tied, source)
    tie_head(source, form="fused")
    metrics = run_quantize(source, tmp_path / "int4", scheme="int4", block_size=128)
    proto = _graph(tmp_path / "int4")
    consumers = {i: n for n in proto.graph.node for i in n.input}
    gather = _token_gather(proto)
    assert consumers[gather.output[0]].op_type == "Slice" and _attrs(gather)["block_size"] == 128
    head = _head(proto)
    assert head.op_type == "MatMulNBits" and head.name == "/lm_head/FusedMatMul_Q4"
    assert metrics["kl_mean"] <= TEST_BOUNDS["int4"][0] and metrics["top1_agreement"] >= TEST_BOUNDS["int4"][1]


@pytest.mark.parametrize("scheme, op", [("int4", "MatMulNBits"), ("int8-dynamic", "MatMulInteger")])
def test_embeddings_keep_leaves_the_table_and_its_tied_head_in_float32(scheme, op, trained_tied, tmp_path):
    """int8-dynamic's quantizer would turn a Gemm head into a MatMul over a transposed copy of the table: the
    kept head must still read the one table (the Gemm becomes FusedMatMul, which no quantizer touches)."""
    metrics = run_quantize(trained_tied, tmp_path, scheme=scheme, embeddings="keep")
    proto = _graph(tmp_path)
    gather, inits = _token_gather(proto), _inits(proto)
    assert gather.op_type == "Gather" and inits[gather.input[0]].data_type == onnx.TensorProto.FLOAT
    head, producers = _head(proto), {o: n for n in proto.graph.node for o in n.output}
    assert head.op_type in ("MatMul", "Gemm", "FusedMatMul")  # reading the table or its Transpose
    assert gather.input[0] in (head.input[1], producers.get(head.input[1], head).input[0])
    assert _ops(proto)[op] == 14 and "GatherBlockQuantized" not in _ops(proto)  # 7 projections x 2 layers
    assert [t.name for t in proto.graph.initializer if VOCAB in t.dims and 64 in t.dims] == [gather.input[0]]
    assert artifact.read_artifact(tmp_path)["graph"]["tied_embedding"]["initializer"] == gather.input[0]
    assert metrics["quantization"]["embeddings"] == {
        "mode": "keep", "quantized": [], "kept": [{"table": gather.input[0], "reason": "embeddings: keep"}]}


def test_embeddings_keep_on_untied_quantizes_the_head_only(trained, tmp_path):
    run_quantize(trained, tmp_path, scheme="int8-dynamic", embeddings="keep")
    proto = _graph(tmp_path)
    gather = _token_gather(proto)
    assert gather.op_type == "Gather" and _inits(proto)[gather.input[0]].data_type == onnx.TensorProto.FLOAT
    assert _head(proto).op_type == "MatMulInteger"


def test_excluding_the_embedding_gather_keeps_the_shared_table(trained_tied, tmp_path):
    messages: list[str] = []
    metrics = run_pass("quantize", trained_tied, tmp_path, Windows(), log=messages.append, scheme="int4",
                       exclude=["/model/embed_tokens/*"])
    proto = _graph(tmp_path)
    assert _token_gather(proto).op_type == "Gather" and "GatherBlockQuantized" not in _ops(proto)
    assert _head(proto).op_type in ("MatMul", "Gemm", "FusedMatMul")
    (kept,) = metrics["quantization"]["embeddings"]["kept"]
    assert kept["reason"] == "exclude matches /model/embed_tokens/Gather"
    head = _head(_graph(trained_tied)).name
    assert any(f"stays float32 (so does the LM head tied to it: {head})" in m for m in messages), messages


def _dequantized(table: np.ndarray, spec: quantize_embeddings.Spec) -> np.ndarray:
    """The values MatMulNBits' layout holds: low nibble first, zero point 2^(bits-1) unless stored."""
    packed, scales, zero_points = quantize_embeddings.pack(table, spec)
    vocab, blocks, _ = packed.shape
    unpack = (lambda a: np.stack([a & 0xF, a >> 4], -1).reshape(vocab, -1)) if spec.bits == 4 else (lambda a: a)
    values = unpack(packed.reshape(vocab, -1)).reshape(vocab, blocks, -1).astype(np.float32)
    zero = (np.full((vocab, blocks), 2 ** (spec.bits - 1)) if zero_points is None
            else unpack(zero_points)[:, :blocks]).astype(np.float32)
    return ((values - zero[..., None]) * scales[..., None]).reshape(vocab, -1)[:, :table.shape[1]]


def _tied_graph(form: str, table: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """input_ids -> Gather(table) -> Relu -> head over the same table, in each form a tied head takes."""
    make = onnx.helper.make_node
    nodes = [make("Gather", ["table", "input_ids"], ["embeds"], name="/model/embed_tokens/Gather"),
             make("Relu", ["embeds"], ["hidden"], name="/model/act")]
    heads = {"transpose": [make("Transpose", ["table"], ["table_t"], name="/lm_head/Transpose", perm=[1, 0]),
                           make("MatMul", ["hidden", "table_t"], ["logits"], name="/lm_head/MatMul")],
             "fused": [make("FusedMatMul", ["hidden", "table"], ["logits"], name="/lm_head/FusedMatMul",
                            domain="com.microsoft", transB=1)],
             "gemm": [make("Flatten", ["hidden"], ["rows"], name="/lm_head/Flatten", axis=2),
                      make("Gemm", ["rows", "table", "bias"], ["logits"], name="/lm_head/Gemm", transB=1)]}
    graph = onnx.helper.make_graph(
        nodes + heads[form], "tied", [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, 5])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(bias, "bias")])
    return onnx.helper.make_model(graph, ir_version=10, opset_imports=[onnx.helper.make_opsetid("", 20),
                                                                        onnx.helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("form", ["transpose", "fused", "gemm"])
@pytest.mark.parametrize("spec", [quantize_embeddings.Spec(4, 32, True), quantize_embeddings.Spec(4, 64, False),
                                  quantize_embeddings.Spec(8, 32, True, 4)], ids=["int4", "int4-asym", "int8"])
def test_tied_forms_read_one_table_as_its_dequantized_values(form, spec):
    """Gather and head of every tied form compute with exactly the dequantized table (hidden 80 is not a whole
    number of 64-blocks: the Gather's padding is sliced off)."""
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    table, bias = rng.standard_normal((300, 80)).astype(np.float32), rng.standard_normal(300).astype(np.float32)
    model = ir.from_proto(_tied_graph(form, table, bias))
    tables = quantize_embeddings.find_tables(model.graph)
    assert [(t.name, [h.name for h in t.heads], t.unsupported) for t in tables] == [("table", [model.graph.node(-1).name], [])]
    quantize_embeddings.quantize_tables(model, tables, spec)
    proto = ir.to_proto(model)
    assert "table" not in _inits(proto) and _ops(proto)["MatMulNBits"] == 1 and "Transpose" not in _ops(proto)
    ids = np.array([[0, 7, 150, 298, 299]])
    (logits,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    values = _dequantized(table, spec)
    expected = np.maximum(values[ids], 0) @ values.T + (bias if form == "gemm" else 0)
    # accuracy_level 4 quantizes the head's input to int8 blocks: compare at that precision
    tolerance = 0.05 * np.abs(expected).max() if spec.accuracy_level == 4 else 1e-4 * np.abs(expected).max()
    assert np.abs(logits.reshape(expected.shape) - expected).max() <= tolerance


def test_tied_quantization_is_byte_identical_across_runs(quantized_tied, trained_tied, tmp_path):
    first, _ = quantized_tied("int8-dynamic")
    run_quantize(trained_tied, tmp_path, scheme="int8-dynamic")
    for name in ("model.onnx", "artifact.json"):
        assert (tmp_path / name).read_bytes() == (first / name).read_bytes(), name


@pytest.mark.parametrize("scheme", quantize.SCHEMES)
def test_external_data_path(scheme, trained_tied, tmp_path, monkeypatch):
    """The path a model past the external-data threshold takes (the threshold lowered to 0 here): every
    graph written, the embedding step's and the quantizer's, keeps its weights in model.onnx.data, readable
    by whoever may read model.onnx."""
    from recipec.onnx import sessions

    monkeypatch.setattr(sessions, "EXTERNAL_DATA_BYTES", 0)
    metrics = run_quantize(trained_tied, tmp_path, scheme=scheme)
    data = tmp_path / "model.onnx.data"
    assert data.stat().st_mode == (tmp_path / "model.onnx").stat().st_mode
    assert artifact.read_artifact(tmp_path)["graph"]["external_data"] == ["model.onnx.data"]
    assert metrics["kl_mean"] <= TEST_BOUNDS[scheme][0]
