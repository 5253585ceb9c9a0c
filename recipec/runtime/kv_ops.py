"""Moving KV-cache rows and columns where the cache lives, with onnxruntime itself.

Continuous batching selects rows of the running cache when requests leave and merges a prefilled cache in
when they join. Doing that in numpy would copy the whole cache to the host and back on every change of
the batch (on CUDA, inside the decode loop), so each move is a small ONNX graph run on the model's
provider through IOBinding, with its outputs bound to the same device:

- select: Gather takes the rows (axis 0); where the kept rows leave leading columns that are padding in
  all of them, Slice drops those columns (axis 2) first;
- merge: Concat stacks the rows of both caches (axis 0); the shorter one goes through Pad first, which
  left-pads it with zeros to the longer length (axis 2);
- truncate: Slice keeps the first columns (axis 2), dropping the trailing ones: speculative decoding rolls
  the cache back past the proposed tokens the target rejected.

Each op is its own graph variant so that a tensor is copied only as often as the move needs (a Slice
from column 0 or a Pad by 0 columns would still copy it). One graph covers every layer's keys and values,
so a move is one session run, not one per tensor. Graphs are built per element type and tensor count
and kept; a model builds its own when it loads, so the first join does not pay for building sessions.
The attention mask stays on the host: it is tiny, and positions are computed from it there.

A cache of numpy arrays (an empty cache, one built by hand) gives numpy arrays back: results live where
their inputs lived.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from recipec.onnx.sessions import session

# Opset 13 has CPU and CUDA kernels for Gather, Slice, Pad and Concat in float32 and float16, the cache types.
_OPSET = 13
_AXIS_SEQ = 2
_TO_END = np.iinfo(np.int64).max


class KVOps:
    """select, merge and truncate of cache tensors [B, H, T, D] for one device ("cpu" or "cuda")."""

    # One thread: the moves are memory-bound copies. On a 2-core CPU a thread pool made them no faster
    # (96 MB cache; up to 3x slower in some runs), and a pool of their own would spin against the model's.
    def __init__(self, device: str = "cpu", threads: int | None = 1):
        self.device, self.threads = device, threads
        self._sessions: dict[tuple[Any, ...], Any] = {}

    def prepare(self, dtype: Any, count: int) -> None:
        """Build every graph for `count` tensors of `dtype` now rather than at the first join or leave."""
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        for variant in _VARIANTS:
            self._session(variant, elem, count)

    def select(self, tensors: Sequence[Any], rows: np.ndarray, start: int) -> list[Any]:
        """Each tensor's `rows` (in that order), from column `start` on."""
        small = {"rows": np.asarray(rows, np.int64)}
        if start:
            small["start"] = np.array([start], np.int64)
        return self._run(("select", bool(start)), tensors, len(tensors), small)

    def merge(self, first: Sequence[Any], second: Sequence[Any], pad_first: int, pad_second: int) -> list[Any]:
        """Per tensor pair, first's rows then second's, each left-padded with zeros by its pad columns."""
        if len(first) != len(second):
            raise ValueError(f"merge needs caches of as many tensors, got {len(first)} and {len(second)}")
        if pad_first and pad_second:
            raise ValueError("merge pads one side at most: the longer cache sets the length")
        small = {"pads": _left_pads(pad_first or pad_second)} if pad_first or pad_second else {}
        return self._run(("merge", bool(pad_first), bool(pad_second)), [*first, *second], len(first), small)

    def truncate(self, tensors: Sequence[Any], length: int) -> list[Any]:
        """Each tensor's first `length` columns."""
        return self._run(("truncate",), tensors, len(tensors), {"end": np.array([length], np.int64)})

    def widen(self, tensors: Sequence[Any], columns: int) -> list[Any]:
        """Each tensor with `columns` zero columns appended: a shared buffer outgrowing its capacity."""
        pads = np.zeros(8, np.int64)
        pads[4 + _AXIS_SEQ] = columns
        return self._run(("widen",), tensors, len(tensors), {"pads": pads})

    def _run(self, variant: tuple[Any, ...], tensors: Sequence[Any], count: int,
             small: dict[str, np.ndarray]) -> list[Any]:
        if not tensors:
            return []
        sess = self._session(variant, _elem_type(tensors[0]), count)
        binding = sess.io_binding()
        for i, tensor in enumerate(tensors):
            binding.bind_ortvalue_input(f"kv{i}", self._device_value(tensor))
        # Indices and pads are a few int64s; onnxruntime places them where each kernel wants them.
        for name, value in small.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
        for i in range(count):
            binding.bind_output(f"out{i}", self.device)
        sess.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        if all(isinstance(t, np.ndarray) for t in tensors):
            return [o.numpy() for o in outputs]
        return list(outputs)

    def _device_value(self, tensor: Any) -> Any:
        if isinstance(tensor, np.ndarray):
            return ort.OrtValue.ortvalue_from_numpy(np.require(tensor, requirements="C"), self.device)
        return tensor

    def _session(self, variant: tuple[Any, ...], elem: int, count: int) -> Any:
        key = (variant, elem, count)
        if key not in self._sessions:
            kind, *flags = variant
            graph = _GRAPHS[kind](elem, count, *flags)
            self._sessions[key] = _load(graph, self.device, self.threads)
        return self._sessions[key]


def _left_pads(columns: int) -> np.ndarray:
    """ONNX Pad's [begin per axis..., end per axis...] for `columns` zeros before axis 2."""
    pads = np.zeros(8, np.int64)
    pads[_AXIS_SEQ] = columns
    return pads


def _elem_type(tensor: Any) -> int:
    if isinstance(tensor, np.ndarray):
        return helper.np_dtype_to_tensor_dtype(tensor.dtype)
    # data_type() reads "tensor(float16)" in every onnxruntime; element_type() changed its return type.
    return TensorProto.DataType.Value(tensor.data_type()[len("tensor("):-1].upper())


def _select_graph(elem: int, count: int, columns: bool) -> onnx.ModelProto:
    """Gather rows; with columns, Slice from column `start` first (a second copy, so only when needed)."""
    ends = helper.make_tensor("ends", TensorProto.INT64, [1], [_TO_END])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [_AXIS_SEQ])
    nodes = []
    for i in range(count):
        source = f"cols{i}" if columns else f"kv{i}"
        if columns:
            nodes.append(helper.make_node("Slice", [f"kv{i}", "start", "ends", "axes"], [source]))
        nodes.append(helper.make_node("Gather", [source, "rows"], [f"out{i}"], axis=0))
    inputs = [*_tensors("kv", elem, count), helper.make_tensor_value_info("rows", TensorProto.INT64, [None])]
    if columns:
        inputs.append(helper.make_tensor_value_info("start", TensorProto.INT64, [1]))
    return _model("kv_select", nodes, inputs, _tensors("out", elem, count), [ends, axes] if columns else [])


def _merge_graph(elem: int, count: int, pad_first: bool, pad_second: bool) -> onnx.ModelProto:
    """Concat the rows; the shorter side goes through Pad first (a second copy of that side only)."""
    nodes = []
    for i in range(count):
        parts = [f"kv{i}", f"kv{count + i}"]
        for side, padded in enumerate((pad_first, pad_second)):
            if padded:
                nodes.append(helper.make_node("Pad", [parts[side], "pads"], [f"padded{parts[side]}"]))
                parts[side] = f"padded{parts[side]}"
        nodes.append(helper.make_node("Concat", parts, [f"out{i}"], axis=0))
    inputs = _tensors("kv", elem, 2 * count)
    if pad_first or pad_second:
        inputs.append(helper.make_tensor_value_info("pads", TensorProto.INT64, [8]))
    return _model("kv_merge", nodes, inputs, _tensors("out", elem, count), [])


def _truncate_graph(elem: int, count: int) -> onnx.ModelProto:
    """Slice columns [0, end) of each tensor."""
    starts = helper.make_tensor("starts", TensorProto.INT64, [1], [0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [_AXIS_SEQ])
    nodes = [helper.make_node("Slice", [f"kv{i}", "starts", "end", "axes"], [f"out{i}"]) for i in range(count)]
    inputs = [*_tensors("kv", elem, count), helper.make_tensor_value_info("end", TensorProto.INT64, [1])]
    return _model("kv_truncate", nodes, inputs, _tensors("out", elem, count), [starts, axes])


def _widen_graph(elem: int, count: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Pad", [f"kv{i}", "pads"], [f"out{i}"]) for i in range(count)]
    inputs = [*_tensors("kv", elem, count), helper.make_tensor_value_info("pads", TensorProto.INT64, [8])]
    return _model("kv_widen", nodes, inputs, _tensors("out", elem, count), [])


_GRAPHS = {"select": _select_graph, "merge": _merge_graph, "truncate": _truncate_graph, "widen": _widen_graph}
# Every graph a cache can need: the longer cache of a merge sets the length, so at most one side is padded.
_VARIANTS = (("select", False), ("select", True), ("merge", False, False), ("merge", True, False),
             ("merge", False, True), ("truncate",))


def _tensors(prefix: str, elem: int, count: int) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(f"{prefix}{i}", elem, [None] * 4) for i in range(count)]


def _model(name: str, nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    # onnx writes its newest IR version unless told, which an older onnxruntime refuses; opset 13 needs 7.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=7)


def _load(model: onnx.ModelProto, device: str, threads: int | None) -> Any:
    return session(model.SerializeToString(), device, threads=threads)
