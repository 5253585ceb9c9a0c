"""Shape clean-up the TorchScript exporter makes necessary before pattern matching.

`x.shape[-1] // 2` traces to Gather(Shape(x), <scalar index>) -> Div. onnxscript's constant folder only folds
Gather on a Shape with a 1-D index, so these chains survive and hide constants (rotate_half's split point,
the head count in Reshape targets) from the attention patterns. Hand-written: no library pass does this.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from recipec.onnx.fusions._utils import add_initializer


# Float initializers above this many elements are weights; shape inference never needs their values.
_WEIGHT_ELEMENTS = 1024


def _weightless(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with large float initializers turned into typed graph inputs: shape inference sees their
    shapes, the copy stays small (a model over 2 GiB cannot be serialized for onnx's inference at all)."""
    light = onnx.ModelProto()
    light.CopyFrom(onnx.ModelProto(ir_version=proto.ir_version, opset_import=proto.opset_import,
                                   graph=onnx.GraphProto(name=proto.graph.name)))
    graph = light.graph
    graph.node.extend(proto.graph.node)
    graph.input.extend(proto.graph.input)
    graph.output.extend(proto.graph.output)
    inputs = {v.name for v in proto.graph.input}
    for tensor in proto.graph.initializer:
        elements = int(np.prod(tensor.dims, dtype=np.int64))
        if tensor.data_type in _FLOATS and elements > _WEIGHT_ELEMENTS:
            if tensor.name not in inputs:
                graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
        else:
            graph.initializer.append(tensor)
    return light


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's symbolic inference (onnx's own leaves head counts unknown after the exporter's
    Reshapes), run on a weightless copy; the inferred value_info is written into `proto` in place."""
    inferred = SymbolicShapeInference.infer_shapes(_weightless(proto), auto_merge=True, guess_output_rank=False)
    known = {v.name for v in list(proto.graph.input) + list(proto.graph.output)}
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
    return proto


def _gathered_dims(node: ir.Node) -> np.ndarray | None:
    """The dims (int or SymbolicDim) that Gather(Shape(x), index) picks, or None if it is not that form."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
        return None
    shape_node = node.inputs[0].producer()
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.domain not in ("", "ai.onnx"):
        return None
    index = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
    source = shape_node.inputs[0]
    if index is None or source is None or source.shape is None:
        return None
    start = shape_node.attributes.get_int("start", 0)
    end = shape_node.attributes.get_int("end", None)
    dims = np.asarray(list(source.shape)[start:end], dtype=object)
    try:
        return np.asarray(dims[index.numpy()], dtype=object)
    except IndexError:
        return None


def _input_dims(graph: ir.Graph) -> dict[str, tuple[ir.Value, int]]:
    """Named symbolic dims of the graph inputs -> (input, axis), first occurrence wins."""
    found: dict[str, tuple[ir.Value, int]] = {}
    for value in graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in found:
                found[dim.value] = (value, axis)
    return found


def _input_dim_value(graph: ir.Graph, cache: dict, source: tuple[ir.Value, int], anchor: ir.Node) -> ir.Value:
    """A scalar Gather(Shape(input), axis), created once per (input, axis) at the top of the graph."""
    if source not in cache:
        value, axis = source
        shape = ir.node("Shape", [value], name=f"recipec_shape_{value.name}")
        index = add_initializer(graph, f"recipec_axis_{value.name}_{axis}", np.array(axis, np.int64))
        dim = ir.node("Gather", [shape.outputs[0], index], attributes={"axis": 0},
                      name=f"recipec_dim_{value.name}_{axis}")
        dim.outputs[0].name = f"recipec_dim_{value.name}_{axis}"
        graph.insert_before(anchor, [shape, dim])
        cache[source] = dim.outputs[0]
    return cache[source]


def fold_shape_gathers(model: ir.Model) -> dict[str, int]:
    """Gather(Shape(x), i) -> a constant when dim i is static, or -> the same dim read off a graph input
    when symbolic inference proved it equal (e.g. `batch_size`). Either way the Shape of an
    intermediate tensor disappears, which the attention rules need: a Shape consumer makes the
    attention's internal values look used outside the pattern."""
    graph, first = model.graph, next(iter(model.graph))
    inputs, cache, counts = _input_dims(graph), {}, {"static": 0, "input": 0}
    for node in list(graph):
        dims = _gathered_dims(node)
        if dims is None:
            continue
        out = node.outputs[0]
        if all(isinstance(d, int) for d in dims.flat):
            out.replace_all_uses_with(add_initializer(graph, f"{out.name}_static", dims.astype(np.int64)))
            counts["static"] += 1
        elif dims.ndim == 0 and isinstance(dims.item(), ir.SymbolicDim) and dims.item().value in inputs:
            source = inputs[dims.item().value]
            if node.inputs[0].producer().inputs[0] is not source[0]:
                out.replace_all_uses_with(_input_dim_value(graph, cache, source, first))
                counts["input"] += 1
    return counts
