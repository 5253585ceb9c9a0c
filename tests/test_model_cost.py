"""The numerators of MBU and MFU, exact, on graphs small enough to count by hand.

Each graph is a few initializers and the nodes that read them; what matters is which op reads which tensor
at which input slot, since that decides what a decode step reads and multiplies.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from recipec.onnx.artifact import compute_dtypes, tied_embedding, weight_stats
from recipec.profile.metrics import Peaks, efficiency
from recipec.profile.profiler import model_cost
from recipec.runtime.records import StepRecord

F32, F16 = np.float32, np.float16


def init(name: str, shape: tuple[int, ...], dtype=F32) -> TensorProto:
    return numpy_helper.from_array(np.zeros(shape, dtype), name)


def graph(nodes: list[onnx.NodeProto], inits: list[TensorProto]) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 10])], inits)
    return helper.make_model(g)


def artifact(proto: onnx.ModelProto, vocab: int, hidden: int, **moe) -> dict:
    """The artifact sections model_cost reads: one layer, 2 query heads, 1 kv head of dim 2, fp32 cache."""
    model = {"vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": 2, **moe}
    return {"model": model, "weights": weight_stats(proto, model), "logits": {"mode": "selectable"},
            "kv_cache": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 2, "dtype": "float32"}}


def dense_untied() -> onnx.ModelProto:
    return graph([helper.make_node("Gather", ["embed", "ids"], ["h0"]),
                  helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
                  helper.make_node("MatMul", ["h1", "head"], ["logits"])],
                 [init("embed", (10, 4)), init("w1", (4, 4)), init("head", (4, 10))])


def test_dense_decode_step_reads_every_weight_but_the_embedding_table():
    w = weight_stats(dense_untied())
    assert (w["parameters"], w["embedding_parameters"], w["embedding_bytes"]) == (96, 40, 160)
    assert (w["bytes"], w["bytes_per_decode_step"]) == (384, (16 + 40) * 4)
    cost = model_cost(artifact(dense_untied(), vocab=10, hidden=4))
    assert (cost.weight_bytes_per_step, cost.active_params, cost.head_params) == (224, 56, 40)
    assert cost.kv_bytes_per_token == 2 * 1 * 1 * 2 * 4


def test_mbu_and_mfu_of_a_dense_decode_step_by_hand():
    cost = model_cost(artifact(dense_untied(), vocab=10, hidden=4))
    step = StepRecord("decode", 0.0, 1e-6, ctx=[5], rows=1, padded_len=5)
    e = efficiency([step], cost, Peaks(bandwidth_gb_s=1.0, tflops=1e-3), tpot_mean_ms=1e-3)
    # bytes: 224 of weights + 5 cached positions x 16 bytes; FLOPs: 2 x 56 + 4 x 1 layer x 2 heads x 2 x 5
    assert e["mbu"] == pytest.approx((224 + 5 * 16) / 1e-6 / 1e9)
    assert e["mfu_decode"] == pytest.approx((2 * 56 + 4 * 2 * 2 * 5) / 1e-6 / 1e12 / 1e-3)


def nbits(name: str, k: int, n: int, block: int, out: str, inp: str, accuracy_level: int | None = None):
    attrs = {"K": k, "N": n, "bits": 4, "block_size": block}
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    node = helper.make_node("MatMulNBits", [inp, name, f"{name}_scales"], [out], domain="com.microsoft", **attrs)
    blocks = (k + block - 1) // block
    return node, [init(name, (n, blocks, block // 2), np.uint8), init(f"{name}_scales", (n * blocks,))]


def int4(accuracy_level: int | None = None) -> onnx.ModelProto:
    head, head_inits = nbits("head", 32, 8, 32, "logits", "h0", accuracy_level)
    gather = helper.make_node("GatherBlockQuantized", ["embed", "ids", "embed_scales"], ["h0"],
                              domain="com.microsoft", bits=4, block_size=32, gather_axis=0, quantize_axis=1)
    return graph([gather, head], [init("embed", (10, 16), np.uint8), init("embed_scales", (10, 1)), *head_inits])


def test_int4_step_bytes_are_the_packed_weights_and_their_scales():
    w = weight_stats(int4())
    # head: 8 x 32 int4 values in 128 bytes + 8 fp32 scales; embedding: 10 x 32 values in 160 bytes + 10 scales
    assert w["parameters"] == 8 * 32 + 10 * 32
    assert (w["embedding_parameters"], w["embedding_bytes"]) == (320, 160 + 40)
    assert w["bytes_per_decode_step"] == 128 + 32


def test_compute_dtype_follows_the_kernel_each_device_runs():
    assert compute_dtypes(int4()) == {"cpu": "float32", "cuda": "float32"}
    assert compute_dtypes(int4(accuracy_level=4)) == {"cpu": "int8", "cuda": "float32"}
    assert compute_dtypes(dense_untied()) == {"cpu": "float32", "cuda": "float32"}
    fp16 = graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], [init("w", (4, 4), F16)])
    assert compute_dtypes(fp16) == {"cpu": "float16", "cuda": "float16"}
    dynamic = graph([helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s", "z"], ["logits"],
                                      domain="com.microsoft")],
                    [init("w", (64, 64), np.int8), init("s", (1,)), init("z", (1,), np.int8)])
    assert compute_dtypes(dynamic)["cpu"] == "int8"


def moe() -> onnx.ModelProto:
    """Attention-like fp32 weight, an fp32 router, and 4 fp16 experts of which a token uses 2."""
    return graph([helper.make_node("MatMul", ["x", "attn"], ["a"]),
                  helper.make_node("MatMul", ["a", "router"], ["r"]),
                  helper.make_node("Gather", ["experts", "r"], ["e"]),
                  helper.make_node("MatMul", ["a", "e"], ["logits"])],
                 [init("attn", (8, 8)), init("router", (8, 4)), init("experts", (4, 8, 8), F16)])


def test_moe_step_bytes_take_the_routed_share_of_each_expert_tensor_at_its_own_precision():
    model = {"num_experts": 4, "num_experts_per_tok": 2}
    w = weight_stats(moe(), model)
    assert (w["parameters"], w["active_parameters"]) == (64 + 32 + 256, 64 + 32 + 128)
    # fp32 attention 256 bytes + fp32 router 128 + half of the 512 fp16 expert bytes. Scaling all bytes by
    # the active/total parameter ratio would give (896 x 224 / 352) = 570: wrong when precisions differ.
    assert w["bytes_per_decode_step"] == 256 + 128 + 256
    assert model_cost(artifact(moe(), vocab=10, hidden=8, **model)).weight_bytes_per_step == 640


def test_a_tied_table_is_read_whole_by_the_head_and_counted_once():
    proto = graph([helper.make_node("Gather", ["table", "ids"], ["h0"]),
                   helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
                   helper.make_node("Gemm", ["h1", "table"], ["logits"], transB=1)],
                  [init("table", (10, 4)), init("w1", (4, 4))])
    w = weight_stats(proto)
    assert (w["parameters"], w["embedding_parameters"]) == (40 + 16, 0)
    assert w["bytes_per_decode_step"] == (40 + 16) * 4
    assert tied_embedding(proto)["initializer"] == "table"
    cost = model_cost(artifact(proto, vocab=10, hidden=4))
    assert (cost.weight_bytes_per_step, cost.active_params, cost.head_params) == (224, 56, 40)
