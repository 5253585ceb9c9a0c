"""Merge MatMuls that read the same activation with constant weights into one MatMul + Split.

Hand-written (neither onnxruntime.transformers nor onnxscript merges sibling projections of TorchScript
exports). q/k/v (and llama's gate/up) then run as one GEMM: at decode time each projection is a small,
memory-bound GEMV, and one call over the concatenated weight costs less than three. Where rotary runs
inside GroupQueryAttention (the shared form, attention.py), `pack_into_attention` then hands it the merged
q/k/v as its packed input and drops the Split; elsewhere RotaryEmbedding sits between them and the Split stays.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from recipec.onnx.fusions import _utils


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


def pack_into_attention(model: ir.Model) -> int:
    """GroupQueryAttention takes q, k and v packed in one [B, S, (H + 2 Hkv) Dh] query input, key and value
    empty: a Split whose three outputs are exactly one GroupQueryAttention's query, key and value, and read by
    nothing else, goes away. Returns the number of attention nodes packed."""
    packed = 0
    for node in list(model.graph):
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.inputs) < 3:
            continue
        query, key, value = node.inputs[:3]
        split = query.producer() if query is not None else None
        if split is None or split.op_type != "Split" or list(split.outputs) != [query, key, value]:
            continue
        if any(len(out.uses()) != 1 for out in split.outputs) or not _packed_widths(split, node):
            continue
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        model.graph.remove(split, safe=True)
        packed += 1
    return packed


def _packed_widths(split: ir.Node, attention: ir.Node) -> bool:
    """The Split cuts the last axis into H*Dh, Hkv*Dh, Hkv*Dh: the layout GroupQueryAttention unpacks."""
    sizes = _utils.const(split.inputs[1]) if len(split.inputs) > 1 else None
    heads = attention.attributes.get_int("num_heads", 0)
    kv_heads = attention.attributes.get_int("kv_num_heads", 0)
    if sizes is None or sizes.shape != (3,) or not heads or not kv_heads or split.attributes.get_int("axis", 0) not in (-1, 2):
        return False
    head_size = int(sizes[0]) // heads
    return [int(x) for x in sizes] == [heads * head_size, kv_heads * head_size, kv_heads * head_size]
