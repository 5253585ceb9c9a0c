"""The logits_to_keep selection as one Slice.

transformers selects the positions whose logits it computes as `hidden[:, slice(-logits_to_keep, None)]`. The
exporter traces that to a Gather of a Range whose start rebuilds Slice's own clamping (after recipec's shape
folding): Gather(hidden, Range(Clip(Where(keep > 0, n - keep, 0), 0), n, 1), axis=1). Slice(hidden, start =
-keep, end = INT64_MAX, axis 1) selects the same positions for every keep >= 0 (0 gives a start of 0: every
position), in three nodes instead of seven. A decode step at 5M parameters runs ~65 nodes, and each small node
costs it a microsecond or two. Hand-written: onnxscript's folder cannot fold it (keep is a graph input) and no
library rule matches it.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from recipec.onnx import artifact as art
from recipec.onnx.fusions._utils import add_initializer, const

_INT64_MAX = np.iinfo(np.int64).max


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _exported_selection(node: ir.Node, keep: ir.Value) -> bool:
    """Whether `node` is Gather(_, Range(Clip(Where(Greater(keep, _), Sub(_, keep), _)), _, 1), axis=1)."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.attributes.get_int("axis", 0) != 1:
        return False
    indices = _producer(node.inputs[1], "Range")
    if indices is None or (delta := const(indices.inputs[2])) is None or delta.reshape(-1).tolist() != [1]:
        return False
    clip = _producer(indices.inputs[0], "Clip")
    where = _producer(clip.inputs[0], "Where") if clip is not None else None
    if where is None:
        return False
    greater, sub = _producer(where.inputs[0], "Greater"), _producer(where.inputs[1], "Sub")
    return greater is not None and sub is not None and greater.inputs[0] is keep and sub.inputs[1] is keep


def slice_kept_logits(model: ir.Model) -> int:
    """Rewrites each traced logits_to_keep selection; returns how many. Leaves a graph without one as it is."""
    graph = model.graph
    keep = next((v for v in graph.inputs if v.name == art.LOGITS_TO_KEEP), None)
    if keep is None:
        return 0
    rewritten = 0
    for node in list(graph):
        if not _exported_selection(node, keep):
            continue
        name = f"recipec_kept_logits{'' if rewritten == 0 else f'_{rewritten}'}"
        negated = ir.node("Neg", [keep], name=f"{name}_neg")
        start = ir.node("Unsqueeze", [negated.outputs[0], add_initializer(graph, f"{name}_axes", np.array([0]))],
                        name=f"{name}_start")
        kept = ir.node("Slice", [node.inputs[0], start.outputs[0],
                                 add_initializer(graph, f"{name}_end", np.array([_INT64_MAX])),
                                 add_initializer(graph, f"{name}_axis", np.array([1]))], name=name)
        for added in (negated, start, kept):
            added.outputs[0].name = f"{added.name}_output"
        graph.insert_before(node, [negated, start, kept])
        node.outputs[0].replace_all_uses_with(kept.outputs[0])
        rewritten += 1
    if rewritten:
        common_passes.RemoveUnusedNodesPass()(model)
    return rewritten
