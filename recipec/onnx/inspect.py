"""Reading quantization choices and weight sizes back off a graph (what quantize reports).

A `Graph` wraps a ModelProto loaded without its external data: sizes come from dims and dtypes, and the few
tensors whose values are summarized (scales, zero points) are read one at a time from the model's directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from recipec.onnx.artifact import tensor_bytes

MATMULS = {"MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul",
           "MatMulIntegerToFloat"}
# Which inputs of each op hold the weight (and its scale / zero point when the op carries them).
WEIGHT_INPUTS = {"MatMul": (1,), "Gemm": (1,), "FusedMatMul": (1,), "MatMulNBits": (1, 2, 3),
                 "MatMulInteger": (1, 3), "DynamicQuantizeMatMul": (1, 2, 3), "MatMulIntegerToFloat": (1, 3, 5)}
# Ops through which a weight reaches its matrix multiply unchanged in size: a dequantized weight is counted
# at the bytes of what the DequantizeLinear reads, a tied LM head at its Transpose's table.
_WEIGHT_VIEWS = ("DequantizeLinear", "Transpose")


class Graph:
    """Initializers by name and producers by output name, read once."""

    def __init__(self, proto: onnx.ModelProto, base_dir: Path | str = ""):
        self.proto, self.base_dir = proto, str(base_dir)
        self.inits = {t.name: t for t in proto.graph.initializer}
        self.producer = {o: n for n in proto.graph.node for o in n.output}
        for node in proto.graph.node:  # Constant nodes hold weights in some exports
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.inits.setdefault(node.output[0], node.attribute[0].t)

    @classmethod
    def load(cls, model_path: Path) -> "Graph":
        """The graph of model_path without its external data."""
        return cls(onnx.load(str(model_path), load_external_data=False), Path(model_path).parent)

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.inits.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor, base_dir=self.base_dir)

    def nbytes(self, name: str) -> int:
        """Bytes of an initializer, or of the initializers a DequantizeLinear or Transpose reads to produce it."""
        if name in self.inits:
            return tensor_bytes(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type in _WEIGHT_VIEWS:
            return sum(tensor_bytes(self.inits[i]) for i in node.input if i in self.inits)
        return 0


def matmul_weight_bytes(graph: Graph) -> int:
    """Bytes of the weights (with their scales and zero points) that matrix-multiply nodes read."""
    total = 0
    for node in graph.proto.graph.node:
        for index in WEIGHT_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index]:
                total += graph.nbytes(node.input[index])
    return total


def _summary(scales: list[np.ndarray], zero_points: list[np.ndarray | None], dtype: str) -> dict[str, Any]:
    """Affine x_q = round(x / S) + Z: what S and Z look like over a set of tensors."""
    flat = np.concatenate([s.reshape(-1).astype(np.float64) for s in scales]) if scales else np.zeros(0)
    present = [z for z in zero_points if z is not None]
    all_zero = all(not np.any(z) for z in present)
    return {
        "tensors": len(scales), "dtype": dtype,
        "granularity": "per-tensor" if all(s.size == 1 for s in scales) else "per-channel/block",
        "symmetric": all_zero,
        "zero_point": "0" if all_zero else "computed per tensor/channel",
        "scale_min": float(flat.min()) if flat.size else None,
        "scale_max": float(flat.max()) if flat.size else None,
    }


def dequantize_records(graph: Graph) -> dict[str, Any]:
    """QDQ graphs: scales and zero points of the weight and activation DequantizeLinear nodes."""
    groups: dict[str, tuple[list, list, set]] = {"weights": ([], [], set()), "activations": ([], [], set())}
    for node in graph.proto.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        kind = "weights" if node.input[0] in graph.inits else "activations"
        scales, zps, dtypes = groups[kind]
        scales.append(graph.array(node.input[1]))
        zp = graph.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        zps.append(zp)
        dtypes.add(str(zp.dtype) if zp is not None else "int8")
    return {k: _summary(s, z, "/".join(sorted(d))) for k, (s, z, d) in groups.items() if s}


def dynamic_records(graph: Graph) -> dict[str, Any]:
    """quantize_dynamic: weight scale/zero point initializers; activations are quantized per call."""
    scales, zps = [], []
    for node in graph.proto.graph.node:
        if node.op_type == "MatMulInteger" and node.input[1] in graph.inits:
            zps.append(graph.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None)
            scale = graph.array(node.input[1].replace("_quantized", "_scale"))
            if scale is not None:
                scales.append(scale)
    weights = _summary(scales, zps, "int8")
    activations = {"dtype": "uint8", "symmetric": False, "granularity": "per-tensor",
                   "zero_point": "computed per call", "scale": "computed per call by DynamicQuantizeLinear"}
    return {"weights": weights, "activations": activations}


def nbits_records(graph: Graph) -> dict[str, Any]:
    """MatMulNBits: block scales; a stored zero point per block when asymmetric, else the midpoint 2^(bits-1)."""
    scales, stored_zp, attrs = [], 0, set()
    for node in graph.proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        attrs.add((values.get("bits", 4), values.get("block_size"), values.get("accuracy_level", 0)))
        scales.append(graph.array(node.input[2]))
        stored_zp += int(len(node.input) > 3 and bool(node.input[3]))
    summary = _summary(scales, [], "uint4")
    bits = sorted({a[0] for a in attrs})
    summary.update(symmetric=stored_zp == 0, granularity="per-block",
                   zero_point=(f"implicit {2 ** (bits[0] - 1) if bits else 8} (symmetric)" if stored_zp == 0
                               else "stored per block"),
                   block_size=sorted({a[1] for a in attrs}), accuracy_level=sorted({a[2] for a in attrs}))
    return {"weights": summary}


def initializer_dtypes(proto: onnx.ModelProto) -> dict[str, int]:
    """Initializer count per element type (fp16 reports how much was converted)."""
    counts: dict[str, int] = {}
    for tensor in proto.graph.initializer:
        name = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        counts[name] = counts.get(name, 0) + 1
    return counts
