"""Merge MatMuls that read the same activation with constant weights into one MatMul + Split.

Hand-written (neither onnxruntime.transformers nor onnxscript merges sibling projections of TorchScript
exports). q/k/v (and llama's gate/up) then run as one GEMM: at decode time each projection is a small,
memory-bound GEMV, and one call over the concatenated weight costs less than three. GroupQueryAttention's
own packed-QKV input is not used because rotary runs outside it (see attention.py), so a Split follows.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _weight(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or not weight.is_initializer():
        return None
    array = weight.const_value.numpy()
    return array if array.ndim == 2 else None


def _groups(graph: ir.Graph) -> list[list[ir.Node]]:
    """MatMul siblings per activation, keeping only weights of one dtype and one K."""
    by_input: dict[int, list[ir.Node]] = {}
    for node in graph:
        weight = _weight(node)
        if weight is not None and node.inputs[0] is not None:
            by_input.setdefault(id(node.inputs[0]), []).append(node)
    groups = []
    for nodes in by_input.values():
        weights = [_weight(n) for n in nodes]
        if len(nodes) > 1 and len({(w.shape[0], w.dtype) for w in weights}) == 1:
            groups.append(nodes)
    return groups


def _merge(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    weights = [_weight(n) for n in nodes]
    name = "+".join(n.name for n in nodes)
    merged_w = ir.Value(name=f"{name}.weight", const_value=ir.tensor(np.concatenate(weights, axis=1)))
    graph.register_initializer(merged_w)
    splits = ir.Value(name=f"{name}.splits", const_value=ir.tensor(np.array([w.shape[1] for w in weights], np.int64)))
    graph.register_initializer(splits)
    matmul = ir.node("MatMul", [nodes[0].inputs[0], merged_w], name=name)
    split = ir.node("Split", [matmul.outputs[0], splits], attributes={"axis": -1}, num_outputs=len(nodes),
                    name=f"{name}/Split")
    graph.insert_before(nodes[0], [matmul, split])
    for old, new in zip(nodes, split.outputs):
        new.name, new.shape, new.type = old.outputs[0].name + "_split", old.outputs[0].shape, old.outputs[0].type
        old.outputs[0].replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(nodes, safe=True)


def merge_sibling_matmuls(model: ir.Model) -> int:
    """Returns the number of merged groups."""
    groups = _groups(model.graph)
    for nodes in groups:
        _merge(model.graph, nodes)
    return len(groups)
