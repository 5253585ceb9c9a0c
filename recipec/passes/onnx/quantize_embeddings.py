"""Quantized token embeddings, in onnxruntime-genai's layout (its builder's tied int4 embeddings).

The table a Gather reads with `input_ids` is block-quantized along the hidden axis by onnxruntime's own
kernels (`quantize_matmul_4bits` / `_8bits`, what MatMulNBitsQuantizer calls) into MatMulNBits' layout:
B [vocab, k_blocks, blob] uint8, scales [vocab, k_blocks], and zero points [vocab, ceil(k_blocks * bits / 8)]
when asymmetric (else both ops use the midpoint 2^(bits-1)).
- The Gather becomes com.microsoft GatherBlockQuantized (gather_axis 0, quantize_axis 1) over the rows
  [vocab, k_blocks * blob], then a Slice when hidden is not a whole number of blocks.
- A tied LM head, the same table read as MatMul(x, Transpose(table)), Gemm(x, table, transB=1) or
  FusedMatMul(x, table, transB=1), becomes MatMulNBits (K = hidden, N = vocab) over the same B and scales,
  and the Gather reads Reshape(B, [vocab, k_blocks * blob]): the file holds one table for both.
  onnxruntime folds that Reshape when it loads the graph, so a session holds the Gather's rows beside the
  head's prepacked copy (the file and the build do not).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

INPUT_IDS = "input_ids"
MS_DOMAIN = "com.microsoft"
KERNELS = {4: quantize_matmul_4bits, 8: quantize_matmul_8bits}
# Vocabulary rows quantized per kernel call: the kernel takes the transposed rows as one contiguous float32
# array, so a chunk bounds that copy (8192 x 4096 floats = 128 MiB at the widest hidden sizes).
CHUNK_ROWS = 8192


@dataclass(frozen=True)
class Spec:
    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int | None = None


@dataclass
class Table:
    """One token-embedding initializer, the Gathers that read it and the LM heads tied to it."""
    value: ir.Value
    gathers: list[ir.Node] = field(default_factory=list)
    heads: list[ir.Node] = field(default_factory=list)
    transposes: list[ir.Node] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)  # other readers: the table cannot be replaced

    @property
    def name(self) -> str:
        return self.value.name

    def node_names(self) -> list[str]:
        return [n.name for n in self.gathers + self.heads]


def find_tables(graph: ir.Graph) -> list[Table]:
    """Float 2-D initializers that a Gather reads along axis 0 with the graph's input_ids."""
    ids = next((v for v in graph.inputs if v.name == INPUT_IDS), None)
    tables: dict[str, Table] = {}
    for node, slot in ids.uses() if ids is not None else ():
        table = node.inputs[0] if slot == 1 else None
        if (node.op_type == "Gather" and node.domain == "" and node.attributes.get_int("axis", 0) == 0
                and table is not None and table.is_initializer() and not table.is_graph_input()
                and _float_matrix(table)):
            tables.setdefault(table.name, Table(table))
    for table in tables.values():
        _classify_readers(table, ids)
    return list(tables.values())


def _float_matrix(value: ir.Value) -> bool:
    tensor = value.const_value
    return tensor is not None and tensor.dtype == ir.DataType.FLOAT and len(tensor.shape) == 2


def _classify_readers(table: Table, ids: ir.Value) -> None:
    for node, slot in table.value.uses():
        if node.op_type == "Gather" and node.domain == "" and slot == 0 and node.inputs[1] is ids:
            table.gathers.append(node)
        elif slot == 1 and _is_transposed_head(node):
            table.heads.append(node)
        elif node.op_type == "Transpose" and _ints(node, "perm", [1, 0]) == [1, 0] and _feeds_heads(node, table):
            table.transposes.append(node)
        else:
            table.unsupported.append(f"{node.op_type} {node.name!r}")


def _feeds_heads(transpose: ir.Node, table: Table) -> bool:
    """Transpose(table) read only as the B of plain MatMuls: tied heads."""
    uses = list(transpose.outputs[0].uses())
    if not uses or transpose.outputs[0].is_graph_output():
        return False
    if not all(n.op_type == "MatMul" and n.domain == "" and slot == 1 for n, slot in uses):
        return False
    table.heads.extend(n for n, _ in uses)
    return True


def _is_transposed_head(node: ir.Node) -> bool:
    """Gemm / FusedMatMul computing x @ table^T with nothing else folded in."""
    attrs = node.attributes
    if node.op_type == "Gemm" and node.domain == "":
        plain_bias = len(node.inputs) < 3 or node.inputs[2] is None or attrs.get_float("beta", 1.0) == 1.0
        return (attrs.get_int("transB", 0) == 1 and attrs.get_int("transA", 0) == 0
                and attrs.get_float("alpha", 1.0) == 1.0 and plain_bias)
    if node.op_type == "FusedMatMul" and node.domain == MS_DOMAIN:
        return (attrs.get_int("transB", 0) == 1 and attrs.get_int("transA", 0) == 0
                and attrs.get_float("alpha", 1.0) == 1.0 and attrs.get_int("transBatchA", 0) == 0
                and attrs.get_int("transBatchB", 0) == 0)
    return False


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return list(attr.as_ints()) if attr is not None else default


def pack(table: np.ndarray, spec: Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B, scales, zero points or None) of a [vocab, hidden] table in MatMulNBits' layout (N = vocab)."""
    vocab, hidden = table.shape
    k_blocks = -(-hidden // spec.block_size)
    packed = np.zeros((vocab, k_blocks, spec.block_size * spec.bits // 8), np.uint8)
    scales = np.zeros((vocab, k_blocks), np.float32)
    zero_points = np.zeros((vocab, -(-k_blocks * spec.bits // 8)), np.uint8)
    kernel = KERNELS[spec.bits]
    for start in range(0, vocab, CHUNK_ROWS):
        rows = slice(start, min(start + CHUNK_ROWS, vocab))
        kernel(packed[rows], np.ascontiguousarray(table[rows].T, dtype=np.float32), scales[rows],
               zero_points[rows], spec.block_size, rows.stop - rows.start, hidden, spec.symmetric)
    return packed, scales, None if spec.symmetric else zero_points


def quantize_table(graph: ir.Graph, table: Table, spec: Spec) -> dict[str, Any]:
    """Replace the table, its Gathers and its tied heads; returns what the stage reports about it."""
    tensor = table.value.const_value
    vocab, hidden = (int(d) for d in tensor.shape)
    packed, scales, zero_points = pack(tensor.numpy(), spec)
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()  # unmap the float table before the graph is saved
    suffix = f"_Q{spec.bits}"
    # Untied, the Gather reads the rows as stored; tied, MatMulNBits needs B in its 3-D layout and the Gather
    # reads a Reshape of it (onnxruntime-genai's layout).
    data = _initializer(graph, table.name + suffix, packed if table.heads else packed.reshape(vocab, -1))
    quant = [_initializer(graph, table.name + "_scales", scales),
             _initializer(graph, table.name + "_zero_points", zero_points) if zero_points is not None else None]
    for gather in table.gathers:
        _replace(graph, gather, _gather_nodes(graph, gather, data, quant, spec, hidden, suffix))
    for head in table.heads:
        _replace(graph, head, [_head_node(head, data, quant, spec, vocab, hidden, suffix)])
    graph.remove(table.transposes, safe=True)
    graph.initializers.pop(table.name)
    return {"table": table.name, "shape": [vocab, hidden], "op": "GatherBlockQuantized", "bits": spec.bits,
            "block_size": spec.block_size, "symmetric": spec.symmetric,
            "gathers": [n.name for n in table.gathers], "tied_heads": [n.name for n in table.heads],
            "bytes": {"before": vocab * hidden * 4,
                      "after": sum(int(a.nbytes) for a in (packed, scales, zero_points) if a is not None)}}


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value


def _gather_nodes(graph: ir.Graph, gather: ir.Node, data: ir.Value, quant: list[ir.Value | None], spec: Spec,
                  hidden: int, suffix: str) -> list[ir.Node]:
    """[Reshape(B) ->] GatherBlockQuantized [-> Slice off the padding of the last block]."""
    nodes, rows = [], data
    shape = [int(d) for d in data.const_value.shape]
    if len(shape) == 3:
        flat = _initializer(graph, f"{gather.name}{suffix}/shape", np.array([shape[0], shape[1] * shape[2]], np.int64))
        nodes.append(ir.node("Reshape", [data, flat], name=f"{gather.name}{suffix}/Reshape"))
        rows = nodes[-1].outputs[0]
    inputs = [rows, gather.inputs[1], quant[0]] + ([quant[1]] if quant[1] is not None else [])
    nodes.append(ir.node("GatherBlockQuantized", inputs, domain=MS_DOMAIN, name=gather.name + suffix,
                         attributes={"bits": spec.bits, "block_size": spec.block_size, "gather_axis": 0,
                                     "quantize_axis": 1}))
    if quant[0].const_value.shape[1] * spec.block_size == hidden:
        return nodes
    bounds = [_initializer(graph, f"{gather.name}{suffix}/slice_{key}", np.array([v], np.int64))
              for key, v in (("starts", 0), ("ends", hidden), ("axes", -1))]
    return nodes + [ir.node("Slice", [nodes[-1].outputs[0], *bounds], name=f"{gather.name}{suffix}/Slice")]


def _head_node(head: ir.Node, data: ir.Value, quant: list[ir.Value | None], spec: Spec, vocab: int, hidden: int,
               suffix: str) -> ir.Node:
    bias = head.inputs[2] if head.op_type == "Gemm" and len(head.inputs) > 2 else None
    inputs = [head.inputs[0], data, quant[0], quant[1]] + ([None, bias] if bias is not None else [])
    attributes = {"K": hidden, "N": vocab, "bits": spec.bits, "block_size": spec.block_size}
    if spec.accuracy_level:
        attributes["accuracy_level"] = spec.accuracy_level
    return ir.node("MatMulNBits", inputs, domain=MS_DOMAIN, name=head.name + suffix, attributes=attributes)


def _replace(graph: ir.Graph, old: ir.Node, new: list[ir.Node]) -> None:
    """Swap `old` for `new`, whose last output takes old's name, shape and type (`logits` stays `logits`)."""
    graph.insert_before(old, new)
    before, after = old.outputs[0], new[-1].outputs[0]
    after.shape, after.type = before.shape, before.type
    before.replace_all_uses_with(after, replace_graph_outputs=True)
    graph.remove(old, safe=True)
    name, before.name = before.name, None
    after.name = name


def quantize_tables(model: ir.Model, tables: list[Table], spec: Spec) -> list[dict[str, Any]]:
    records = [quantize_table(model.graph, table, spec) for table in tables]
    if records:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return records


def fused_gemm_heads(graph: ir.Graph, table: Table) -> int:
    """A kept table's Gemm heads as FusedMatMul(x, table, transB=1) [+ bias], which no scheme's quantizer
    touches: onnxruntime's dynamic quantizer turns every Gemm into a MatMul over a transposed copy of its
    weight, which would store the table twice. Returns how many heads it rewrote."""
    gemms = [h for h in table.heads if h.op_type == "Gemm"]
    for gemm in gemms:
        nodes = [ir.node("FusedMatMul", [gemm.inputs[0], table.value], attributes={"transB": 1, "alpha": 1.0},
                         domain=MS_DOMAIN, name=f"{gemm.name}/FusedMatMul")]
        if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
            nodes.append(ir.node("Add", [nodes[0].outputs[0], gemm.inputs[2]], name=f"{gemm.name}/Add"))
        _replace(graph, gemm, nodes)
    return len(gemms)


def prepare(model: ir.Model, spec: Spec | None, excluded: set[str]) -> tuple[dict[str, Any], list[str], bool]:
    """Quantize the model's token-embedding tables per `spec` (None: keep them), in place. A table stays float
    where the stage excludes its Gather or a head tied to it, or where something else reads it. Returns what
    to report, what to tell the user, and whether the graph changed."""
    quantized, kept, messages, changed = [], [], [], False
    for table in find_tables(model.graph):
        hit = [n for n in table.node_names() if n in excluded]
        reason = ("embeddings: keep" if spec is None else f"exclude matches {', '.join(hit)}" if hit
                  else f"it is also read by {', '.join(table.unsupported)}" if table.unsupported else None)
        if reason is None:
            quantized += quantize_tables(model, [table], spec)
            changed = True
            continue
        kept.append({"table": table.name, "reason": reason})
        if fused_gemm_heads(model.graph, table):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            changed = True
        if spec is not None:
            tied = f" (so does the LM head tied to it: {', '.join(table_heads(table))})" if table.heads else ""
            messages.append(f"the embedding table {table.name} stays float32{tied}: {reason}")
    return {"quantized": quantized, "kept": kept}, messages, changed


def table_heads(table: Table) -> list[str]:
    return [h.name for h in table.heads]
