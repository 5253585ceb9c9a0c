"""Reshape([-1, K]) -> Gemm -> Reshape([..., N]) back to a 3-D MatMul (+ Add of the bias).

GPT-2's Conv1D traces to a Gemm on a flattened input. onnxruntime.transformers' GPT-2 post-processing
undoes that only for Gemms with a bias (it indexes the third input and crashes without one, which happens
once a zero bias is folded away), and MatMul + Add is the form its BiasGelu / SkipLayerNorm-with-bias
fusions and the quantizers expect. Hand-written for that reason.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from recipec.onnx.fusions._utils import const


def _plain_gemm(node: ir.Node) -> bool:
    attrs = node.attributes
    bias = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return (node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and attrs.get_int("transA", 0) == 0
            and attrs.get_float("alpha", 1.0) == 1.0 and attrs.get_float("beta", 1.0) == 1.0
            and const(node.inputs[1]) is not None
            and (len(node.inputs) < 3 or node.inputs[2] is None or (bias is not None and bias.ndim <= 1)))


def _flatten_source(node: ir.Node) -> ir.Value | None:
    """X when the Gemm's input is Reshape(X, [-1, K]) with K the last dim of X."""
    reshape = node.inputs[0].producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    source, target = reshape.inputs[0], const(reshape.inputs[1])
    if source.shape is None or target is None or list(target) != [-1, source.shape[-1]]:
        return None
    return source


def _unflatten(node: ir.Node, source: ir.Value) -> ir.Node | None:
    """The sole consumer Reshape that restores X's leading dims."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Reshape":
        return None
    reshape = uses[0].node
    out = reshape.outputs[0].shape
    if out is None or source.shape is None or out.rank() != source.shape.rank():
        return None
    return reshape if list(out)[:-1] == list(source.shape)[:-1] else None


def _rewrite(graph: ir.Graph, gemm: ir.Node, source: ir.Value, after: ir.Node) -> None:
    weight = const(gemm.inputs[1])
    if gemm.attributes.get_int("transB", 0):
        weight = np.ascontiguousarray(weight.T)
    weight_value = ir.Value(name=f"{gemm.name}.weight", const_value=ir.tensor(weight))
    graph.register_initializer(weight_value)
    matmul = ir.node("MatMul", [source, weight_value], name=f"{gemm.name}/MatMul")
    nodes, result = [matmul], matmul.outputs[0]
    if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
        add = ir.node("Add", [result, gemm.inputs[2]], name=f"{gemm.name}/Add")
        nodes, result = nodes + [add], add.outputs[0]
    graph.insert_before(gemm, nodes)
    result.shape, result.type = after.outputs[0].shape, after.outputs[0].type
    after.outputs[0].replace_all_uses_with(result, replace_graph_outputs=True)


def unflatten_gemms(model: ir.Model) -> int:
    """Returns the number of Gemms rewritten; the bypassed Reshapes die in the next dead-code pass."""
    count = 0
    for node in list(model.graph):
        if not _plain_gemm(node):
            continue
        source = _flatten_source(node)
        after = _unflatten(node, source) if source is not None else None
        if after is not None:
            _rewrite(model.graph, node, source, after)
            count += 1
    return count
