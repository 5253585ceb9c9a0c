"""Rotary tables by position (recipec.onnx.fusions.rotary_table): made from the graph's own cos/sin subgraph
when its values depend on the position alone, refused otherwise."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from recipec.onnx.fusions.rotary_table import position_tables

HEAD, ROWS = 8, 16
INV_FREQ = (1.0 / 10000 ** (np.arange(0, HEAD, 2, dtype=np.float32) / HEAD)).astype(np.float32)


def _rope_graph(first_nodes=(), scale_input="one", extra_inputs=()):
    """transformers' rope as exported: freqs = positions x inv_freq, emb = cat(freqs, freqs), cos/sin [B,1,S,Dh].
    `scale_input` multiplies the positions first (a constant 1, or something the sequence decides)."""
    nodes = [
        *first_nodes,
        helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pos_f", scale_input], ["pos_scaled"]),
        helper.make_node("Unsqueeze", ["pos_scaled", "axis_last"], ["pos_col"]),
        helper.make_node("Mul", ["pos_col", "inv_freq"], ["freqs"]),
        helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),
        helper.make_node("Cos", ["emb"], ["cos3"]),
        helper.make_node("Sin", ["emb"], ["sin3"]),
        helper.make_node("Unsqueeze", ["cos3", "axis_one"], ["cos"]),
        helper.make_node("Unsqueeze", ["sin3", "axis_one"], ["sin"]),
    ]
    initializers = [helper.make_tensor("inv_freq", TensorProto.FLOAT, [HEAD // 2], INV_FREQ),
                    helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
                    helper.make_tensor("axis_last", TensorProto.INT64, [1], [-1]),
                    helper.make_tensor("axis_one", TensorProto.INT64, [1], [1])]
    inputs = [helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["B", "S"]), *extra_inputs]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["B", 1, "S", HEAD]) for n in ("cos", "sin")]
    graph = helper.make_graph(nodes, "rope", inputs, outputs, initializers)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    values = {v.name: v for node in model.graph for v in node.outputs}
    return model, values["cos"], values["sin"], model.graph.inputs[0]


def _tables(model, cos, sin, positions):
    return position_tables(model, model.graph, cos, sin, positions, ROWS)


def test_a_position_only_rope_becomes_exact_half_width_tables_by_position():
    model, cos, sin, positions = _rope_graph()
    cos_cache, sin_cache = _tables(model, cos, sin, positions)
    freqs = np.arange(ROWS, dtype=np.float32)[:, None] * INV_FREQ[None, :]
    assert cos_cache.const_value.shape == (ROWS, HEAD // 2)
    np.testing.assert_allclose(cos_cache.const_value.numpy(), np.cos(freqs), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin_cache.const_value.numpy(), np.sin(freqs), rtol=0, atol=1e-6)
    assert {"rotary.cos_cache", "rotary.sin_cache"} <= set(model.graph.initializers)
    assert _tables(model, cos, sin, positions) == (cos_cache, sin_cache)  # made once per graph


def test_a_rope_that_depends_on_the_sequence_length_gets_no_table():
    """Like dynamic NTK scaling: the angle of a position changes with the step's length."""
    length = [helper.make_node("Shape", ["position_ids"], ["shape"], start=1, end=2),
              helper.make_node("Cast", ["shape"], ["length_f"], to=TensorProto.FLOAT)]
    model, cos, sin, positions = _rope_graph(length, scale_input="length_f")
    assert _tables(model, cos, sin, positions) is None
    assert "rotary.cos_cache" not in model.graph.initializers


def test_cos_sin_that_read_another_input_get_no_table():
    extra = [helper.make_tensor_value_info("offset", TensorProto.FLOAT, [])]
    model, cos, sin, positions = _rope_graph(scale_input="offset", extra_inputs=extra)
    assert _tables(model, cos, sin, positions) is None



def test_a_table_past_the_size_limit_is_not_made(monkeypatch):
    from recipec.onnx.fusions import rotary_table

    model, cos, sin, positions = _rope_graph()
    monkeypatch.setattr(rotary_table, "TABLE_BYTES", ROWS * HEAD * 4 - 1)
    assert _tables(model, cos, sin, positions) is None
