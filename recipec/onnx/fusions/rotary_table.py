"""Rotary cos/sin by absolute position, for GroupQueryAttention's own rotary (`do_rotary`).

GroupQueryAttention rotates q and k itself when given cos_cache / sin_cache [max_positions, Dh/2], rows
indexed by absolute position. In the shared-buffer form it reads each row's positions off its lengths (row b's
S new tokens are at sum(mask[b]) - S ..), which is what the runtime feeds as position_ids there. That
replaces two RotaryEmbedding nodes per layer and the per-step cos/sin computation, which on a small model
cost as much as the attention itself (docs/benchmarks.md).

The table is the graph's own cos/sin subgraph run in onnxruntime on positions 0 .. max_positions - 1, so
every rope variant whose values depend on the position alone (default, linear, llama3, yarn's fixed scaling)
comes out as the unfused graph computes it. A variant whose values also depend on the sequence (dynamic NTK,
longrope's short/long switch) fails the check that a second, scattered set of positions reads the same rows,
and then the caller keeps RotaryEmbedding.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from recipec.onnx import sessions
from recipec.onnx.fusions._utils import add_initializer

# Values of a scattered second evaluation may differ from the table's rows by this much (float rounding of
# the same kernels on another shape); a sequence-dependent rope differs by orders of magnitude more.
AGREEMENT = 1e-6
# Largest cos + sin tables put in a graph (a 128k-context model with 64-wide heads takes 32 MiB); a model with a
# longer stated context keeps RotaryEmbedding rather than carry (and compute at fuse time) a bigger table.
TABLE_BYTES = 64 << 20
_TABLES_KEY = "recipec.rotary_tables"


def position_tables(model: ir.Model, graph: ir.Graph, cos: ir.Value, sin: ir.Value,
                    positions: ir.Value, rows: int) -> tuple[ir.Value, ir.Value] | None:
    """Initializers [rows, Dh/2] holding cos and sin at positions 0 .. rows - 1, made once per graph for a
    given pair; None when they cannot be made exactly (the subgraph reads another input, or its values depend
    on more than the position)."""
    made = graph.meta.setdefault(_TABLES_KEY, {})
    if cos.name not in made:
        made[cos.name] = _make(model, graph, cos, sin, positions, rows, index=len(made))
    return made[cos.name]


def _make(model: ir.Model, graph: ir.Graph, cos: ir.Value, sin: ir.Value, positions: ir.Value, rows: int,
          index: int) -> tuple[ir.Value, ir.Value] | None:
    width = cos.shape[-1] if cos.shape is not None and cos.shape.rank() else None  # two tables of width / 2
    if not isinstance(width, int) or cos.dtype is None or rows * width * cos.dtype.itemsize > TABLE_BYTES:
        return None
    nodes = _producers(graph, [cos, sin], positions)
    if nodes is None:
        return None
    scattered = np.array([[rows - 1, 0, rows // 2], [1, rows - 2, 3]], np.int64) % rows
    try:
        evaluate = _evaluator(model, nodes, positions, [cos, sin])
        table_cos, table_sin = evaluate(np.arange(rows, dtype=np.int64)[None, :])
        second = evaluate(scattered)
    except Exception:  # onnxruntime's errors share no base class (PassError on load); RotaryEmbedding stays
        return None
    for table, value in zip((table_cos, table_sin), second):
        if value.shape != (scattered.size, table.shape[-1]) or not np.allclose(
                value, table[scattered.reshape(-1)], rtol=0, atol=AGREEMENT):
            return None
    suffix = "" if index == 0 else f".{index}"
    half = table_cos.shape[-1] // 2
    return tuple(add_initializer(graph, f"rotary.{kind}_cache{suffix}", table[:, :half])
                 for kind, table in (("cos", table_cos), ("sin", table_sin)))


def _producers(graph: ir.Graph, outputs: Sequence[ir.Value], positions: ir.Value) -> list[ir.Node] | None:
    """The nodes that compute `outputs`, in graph order, when they read nothing but `positions` and constants."""
    found: dict[int, ir.Node] = {}
    stack = list(outputs)
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None:
            if value is positions or value.const_value is not None:
                continue
            return None
        if id(node) in found:
            continue
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return None
        found[id(node)] = node
        stack.extend(v for v in node.inputs if v is not None)
    return [node for node in graph if id(node) in found]


def _evaluator(model: ir.Model, nodes: list[ir.Node], positions: ir.Value, outputs: Sequence[ir.Value]):
    """A function of position ids [B, S] -> the outputs reshaped to [B*S, Dh], run in onnxruntime."""
    constants = {v.name: v.const_value for n in nodes for v in n.inputs
                 if v is not None and v.producer() is None and v is not positions}
    initializers = []
    for name, tensor in constants.items():
        proto = ir.serde.serialize_tensor(tensor)
        proto.name = name
        initializers.append(proto)
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "rotary_table",
        [onnx.helper.make_tensor_value_info(positions.name, onnx.TensorProto.INT64, None)],
        [onnx.helper.make_tensor_value_info(v.name, int(v.dtype), None) for v in outputs], initializers)
    proto = onnx.helper.make_model(graph, ir_version=model.ir_version, opset_imports=[
        onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()])
    runner = sessions.session(proto.SerializeToString())
    names = [v.name for v in outputs]

    def evaluate(ids: np.ndarray):
        results = runner.run(names, {positions.name: ids})
        return [r.reshape(-1, r.shape[-1]) for r in results]
    return evaluate
