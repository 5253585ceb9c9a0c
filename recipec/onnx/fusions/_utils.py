"""Small value inspections shared by the rewrite rules."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A constant the rewrite adds, named and typed."""
    array = np.asarray(array, order="C")  # (ascontiguousarray would make a scalar 1-D)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value


def const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def scalar(value: ir.Value | None) -> float | None:
    array = const(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def _ints(value: ir.Value | None) -> list[int] | None:
    array = const(value)
    return None if array is None else [int(x) for x in array.reshape(-1)]


def _slice_args(sliced: ir.Value | None):
    node = sliced.producer() if sliced is not None else None
    if node is None or node.op_type != "Slice":
        return None
    args = [_ints(v) for v in list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))]
    starts, ends, axes, steps = args
    if starts is None or ends is None:
        return None
    return starts, ends, axes or [0], steps or [1], node.inputs[0]


def is_half_split(lo: ir.Value | None, hi: ir.Value | None, half: int) -> bool:
    """lo = x[..., :half] and hi = x[..., half:] on the last axis of a 4-D x."""
    a, b = _slice_args(lo), _slice_args(hi)
    if a is None or b is None or a[4] is not b[4]:
        return False
    last_axis = lambda axes: axes in ([3], [-1])  # noqa: E731
    return (a[0] == [0] and a[1] == [half] and b[0] == [half] and b[1][0] >= 2 * half
            and last_axis(a[2]) and last_axis(b[2]) and a[3] == [1] and b[3] == [1])


def _skip_casts_and_scaling(value: ir.Value) -> ir.Value:
    """Walk up through Cast and Mul-by-constant-scalar (rope's attention_scaling)."""
    while (node := value.producer()) is not None:
        if node.op_type == "Cast":
            value = node.inputs[0]
        elif node.op_type == "Mul" and scalar(node.inputs[1]) is not None:
            value = node.inputs[0]
        elif node.op_type == "Mul" and scalar(node.inputs[0]) is not None:
            value = node.inputs[1]
        else:
            break
    return value


def is_duplicated_cos_sin(cos: ir.Value | None) -> bool:
    """cos = Unsqueeze(Cos(Concat(f, f, axis=-1)), 1): both halves equal, as RotaryEmbedding assumes."""
    node = cos.producer() if cos is not None else None
    if node is None or node.op_type != "Unsqueeze" or _ints(node.inputs[1]) != [1]:
        return False
    trig = _skip_casts_and_scaling(node.inputs[0]).producer()
    if trig is None or trig.op_type not in ("Cos", "Sin"):
        return False
    cat = trig.inputs[0].producer()
    return (cat is not None and cat.op_type == "Concat" and len(cat.inputs) == 2
            and cat.inputs[0] is cat.inputs[1] and cat.attributes.get_int("axis", 0) in (-1, 2))


def op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def contrib_ops(model: ir.Model) -> set[str]:
    """Op types from onnxruntime's com.microsoft domain: what fusion produces."""
    return {n.op_type for n in model.graph.all_nodes() if n.domain == "com.microsoft"}
