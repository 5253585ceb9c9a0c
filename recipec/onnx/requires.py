"""What onnxruntime a graph needs: artifact.json's `requires`, read off the graph's operators against what each
onnxruntime release accepts.

A session checks every node against the schema its onnxruntime registered for that operator (input count,
attribute names, input types: "input size 17 not in range [min=7, max=12]", "Unrecognized attribute: bits"),
and a model's IR version and opset against what it knows. So the oldest onnxruntime that runs a graph is the
newest of, per node, the oldest release whose schema accepts that node, and of the IR version's and opsets'.

Where the facts come from (all measured, not recalled): every onnxruntime release on PyPI from 1.19.2 to
1.32.0, one per minor version, was installed and asked for its operator schemas
(`onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()`: min/max input count, attribute names
and type constraints per operator); IR versions were measured by loading a one-node graph of each IR version.
No schema changed within a minor version, so a requirement is a minor version ("1.22"). Where a release loads
a node but computes something else, the table says so (`Op.notes`) and starts at the release that computes it
right; what an older form of an operator cannot do is listed as a limit (`Op.limits`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import onnx

from recipec.errors import PassError

MS = "com.microsoft"
# The releases recipec has facts for, oldest first: what `target_onnxruntime` accepts. A graph that needs
# nothing newer than the oldest says it needs the oldest (older releases were not measured).
KNOWN = ("1.20", "1.21", "1.22", "1.23", "1.24", "1.25", "1.26", "1.27", "1.28", "1.29", "1.30", "1.31", "1.32")
OLDEST = KNOWN[0]
BATCH_1_CHUNKS = "multi_token_steps_batch_1"  # the id of requires.limits' entry a check needs to act on


@dataclass(frozen=True)
class Op:
    """When onnxruntime accepts an operator node (every field's versions are the first release with it)."""
    # (release, most inputs its schema accepts), oldest first; the first entry is when recipec may use the op
    inputs: tuple[tuple[str, int], ...]
    # attributes added after OLDEST: name -> release; and the value of each that means the older behaviour
    attributes: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    # (input slot, dtype) -> release whose type constraint first admits that dtype there
    dtypes: dict[tuple[int, str], str] = field(default_factory=dict)
    # (most inputs, limit id, what a node with at most that many inputs cannot do)
    limits: tuple[tuple[int, str, str], ...] = ()
    # release in `inputs` -> why that signature starts there rather than where the schema admits it
    notes: dict[str, str] = field(default_factory=dict)


# Every operator outside the ONNX standard that recipec's passes write or onnxruntime's optimizer leaves in a
# graph it saves. Schema facts from the releases' registered schemas (see the module docstring); pull requests
# named for context.
OPS: dict[tuple[str, str], Op] = {
    # 9 inputs (query .. sin_cache) through 1.21; position_ids and attention_bias (10, 11) in 1.22 (PR #23944
    # brought them to the CPU kernel); head_sink 1.23; k_scale, v_scale 1.25; q_norm_weight, k_norm_weight 1.28;
    # query_seqlens (17) 1.32. onnxruntime 1.32 writes every attribute that has a schema default into a graph
    # it saves, among them these newer ones; their defaults keep the older behaviour.
    (MS, "GroupQueryAttention"): Op(
        inputs=(("1.20", 9), ("1.22", 11), ("1.23", 12), ("1.25", 14), ("1.28", 16), ("1.32", 17)),
        attributes={"qk_output": "1.23", "k_quant_type": "1.25", "v_quant_type": "1.25", "kv_cache_bit_width": "1.25",
                    "qk_norm_epsilon": "1.28", "sliding_window_cache": "1.29", "causal": "1.30",
                    "q_norm_epsilon": "1.32", "k_norm_epsilon": "1.32"},
        defaults={"qk_output": 0, "k_quant_type": "NONE", "v_quant_type": "NONE", "qk_norm_epsilon": 1e-6,
                  "sliding_window_cache": 0, "causal": 1},
        # An int8 cache (quantize_kv): the schema admits it from 1.25, but on the CPU 1.25 and 1.26 fail at the
        # first run ("Tensor type mismatch"); 1.27 gives 1.32's logits within 2e-5 (measured, tiny llama).
        dtypes={(3, "int8"): "1.27", (4, "int8"): "1.27"},
        # Measured on 1.22 to 1.32 with 11 inputs: a step of several tokens with a past fails at batch 2 with
        # "batch_size must be 1 when sequence_length > 1 and past context is given"; at batch 1, and for
        # prefill and decode steps at any batch, left padding included, the logits match the unfused graph.
        limits=((16, BATCH_1_CHUNKS,
                 "a step of several tokens with a past (speculative verification, chunked prefill) runs at batch "
                 "1 only: GroupQueryAttention before query_seqlens refuses it at batch > 1"),)),
    # attention_bias is input 5 from 1.20 (relative_position_bias before, [B or 1, N, S, T]); past_sequence_length
    # and cache_indirection (9, 10) 1.22.
    (MS, "MultiHeadAttention"): Op(
        inputs=(("1.21", 8), ("1.22", 10)),
        notes={"1.21": "1.20.1 loads recipec's MultiHeadAttention but computes wrong values at batch > 1 (measured: "
                       "|Δlogits| 19 against the unfused graph on a batch of 2, with or without padding; 0 at batch 1)"}),
    (MS, "RotaryEmbedding"): Op(inputs=(("1.20", 4),)),
    # 4-bit data as int4/uint4 since 1.20 (PR #21630); uint8 data 1.22 (PR #24239, shared with MatMulNBits);
    # the bits attribute and 8-bit blocks 1.23 (PR #25214). Zero points (input 3): see the note.
    (MS, "GatherBlockQuantized"): Op(
        inputs=(("1.20", 3), ("1.27", 4)), attributes={"bits": "1.23"}, defaults={"bits": 4},
        dtypes={(0, "uint8"): "1.22"},
        notes={"1.27": "1.23 to 1.26 read 4-bit zero points wrongly when a row has an odd number of blocks "
                       "(measured: |Δlogits| 19 against 1.32 at hidden 96, block 32; 1.27 within 1.3e-4; "
                       "PR #26506 describes the padding block they missed)"}),
    (MS, "MatMulNBits"): Op(inputs=(("1.20", 6),), attributes={"weight_prepacked": "1.28"},
                            defaults={"weight_prepacked": 0}, dtypes={(0, "bfloat16"): "1.23"}),
    (MS, "SkipSimplifiedLayerNormalization"): Op(inputs=(("1.20", 4),)),
    (MS, "SkipLayerNormalization"): Op(inputs=(("1.20", 5),)),
    (MS, "FastGelu"): Op(inputs=(("1.20", 2),)),
    (MS, "BiasGelu"): Op(inputs=(("1.20", 2),)),
    (MS, "Gelu"): Op(inputs=(("1.20", 1),)),
    (MS, "QuickGelu"): Op(inputs=(("1.20", 1),)),
    (MS, "BiasAdd"): Op(inputs=(("1.20", 3),)),
    (MS, "FusedMatMul"): Op(inputs=(("1.20", 2),)),
    (MS, "FusedGemm"): Op(inputs=(("1.20", 3),)),
    (MS, "DynamicQuantizeMatMul"): Op(inputs=(("1.20", 5),)),
    (MS, "MatMulIntegerToFloat"): Op(inputs=(("1.20", 7),)),
    (MS, "QuantizeLinear"): Op(inputs=(("1.20", 3),)),
    (MS, "DequantizeLinear"): Op(inputs=(("1.20", 3),)),
    # onnxruntime's own operator in the default domain, which its optimizer writes for RMSNorm
    ("", "SimplifiedLayerNormalization"): Op(inputs=(("1.20", 2),)),
}
# The newest ai.onnx opset each release registers a schema for, and the IR versions it loads (measured).
OPSETS = {22: "1.21", 23: "1.23", 24: "1.24", 25: "1.24", 26: "1.25", 27: "1.28", 28: "1.32"}  # <= 21: 1.20
IR_VERSIONS = {11: "1.23", 12: "1.24", 13: "1.24"}  # <= 10: 1.20


def key(version: str) -> tuple[int, ...]:
    """'1.22' or '1.22.1' -> (1, 22): releases compare by minor version."""
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        raise ValueError(f"{version!r} is not an onnxruntime version like '1.22'") from None


def installed() -> str:
    """The onnxruntime of this environment as a minor version: the CPU or the GPU package."""
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            return ".".join(metadata.version(name).split(".")[:2])
        except metadata.PackageNotFoundError:
            continue
    raise PassError("neither onnxruntime nor onnxruntime-gpu is installed")


def is_standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and onnx.defs.has(node.op_type)


def release_for(domain: str, op_type: str, inputs: int, attributes: Iterable[str] = (),
                dtypes: dict[int, str] | None = None) -> tuple[str | None, str]:
    """(oldest release that accepts such a node, what decides it); None when recipec has no fact for it.
    `dtypes`: input slot -> dtype, where known."""
    op = OPS.get((domain, op_type))
    if op is None:
        return None, "(not in recipec's facts: the onnxruntime that built it is the one known to run it)"
    fits = [release for release, most in op.inputs if inputs <= most]
    if not fits:
        return None, f"with {inputs} inputs, more than recipec's facts know (the onnxruntime that built it runs it)"
    needs = [(fits[0], f"with {inputs} inputs" + (f": {op.notes[fits[0]]}" if fits[0] in op.notes else ""))]
    needs += [(release, f"attribute {name}") for name, release in op.attributes.items() if name in set(attributes)]
    needs += [(release, f"{dtype} input {slot}") for (slot, dtype), release in op.dtypes.items()
              if (dtypes or {}).get(slot) == dtype]
    return max(needs, key=lambda need: key(need[0]))


def accepts(target: str, domain: str, op_type: str, inputs: int, attributes: Iterable[str] = ()) -> bool:
    release, _ = release_for(domain, op_type, inputs, attributes)
    return release is not None and key(release) <= key(target)


def node_needs(node: onnx.NodeProto, dtypes: dict[str, str]) -> tuple[str | None, str]:
    """release_for a node; `dtypes` maps value names to their dtype where known (initializers, graph inputs)."""
    slots = {slot: dtypes[name] for slot, name in enumerate(node.input) if name in dtypes}
    return release_for(node.domain or "", node.op_type, len(node.input), [a.name for a in node.attribute], slots)


def node_limits(node: onnx.NodeProto) -> list[tuple[str, str]]:
    op = OPS.get((node.domain or "", node.op_type))
    return [(ident, text) for most, ident, text in (op.limits if op else ()) if len(node.input) <= most]


def derive(protos: Iterable[onnx.ModelProto]) -> dict[str, Any]:
    """artifact.json's `requires` for the graphs of one variant (a phase-split variant has two)."""
    ops: dict[tuple, dict[str, Any]] = {}
    limits: dict[str, str] = {}
    needs = [(OLDEST, "")]
    ir_version, opsets = 0, {}
    for proto in protos:
        ir_version = max(ir_version, proto.ir_version)
        used = {"ai.onnx"} | {node.domain or "ai.onnx" for node in proto.graph.node}
        for entry in proto.opset_import:  # onnxruntime's saved graphs import every domain it has; keep the used
            domain = entry.domain or "ai.onnx"
            if domain in used:
                opsets[domain] = max(opsets.get(domain, 0), entry.version)
        dtypes = _known_dtypes(proto.graph)
        for node in proto.graph.node:
            if is_standard(node):
                continue
            release, why = node_needs(node, dtypes)
            entry = ops.setdefault((node.domain or "ai.onnx", node.op_type, len(node.input)), {
                "domain": node.domain or "ai.onnx", "op_type": node.op_type, "inputs": len(node.input), "nodes": 0,
                "attributes": set(), "onnxruntime": release, "known": release is not None, "why": why})
            entry["nodes"] += 1
            entry["attributes"] |= {a.name for a in node.attribute}
            if release is not None and key(release) > key(entry["onnxruntime"]):
                entry["onnxruntime"], entry["why"] = release, why
            limits.update(node_limits(node))
    needs += _format_needs(ir_version, opsets.get("ai.onnx", 0))
    return _requires(sorted(ops.values(), key=lambda e: (e["domain"], e["op_type"], e["inputs"])), needs,
                     ir_version, opsets, limits)


def _known_dtypes(graph: onnx.GraphProto) -> dict[str, str]:
    found = {t.name: _dtype(t.data_type) for t in graph.initializer}
    found.update({v.name: _dtype(v.type.tensor_type.elem_type) for v in graph.input if v.type.HasField("tensor_type")})
    return found


def _dtype(elem_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError, TypeError):  # undefined or a type numpy has no dtype for
        return "undefined"


def _format_needs(ir_version: int, opset: int) -> list[tuple[str, str]]:
    needs = [(release, f"IR version {ir_version}") for version, release in IR_VERSIONS.items() if ir_version >= version]
    needs += [(release, f"ai.onnx opset {opset}") for version, release in OPSETS.items() if opset >= version]
    if ir_version > max(IR_VERSIONS) or opset > max(OPSETS):
        needs.append((installed(), f"IR version {ir_version} / opset {opset}, newer than recipec's facts"))
    return needs


def _requires(ops: list[dict[str, Any]], needs: list[tuple[str, str]], ir_version: int, opsets: dict[str, int],
              limits: dict[str, str]) -> dict[str, Any]:
    for entry in ops:
        entry["attributes"] = sorted(entry["attributes"])
        if not entry["known"]:  # no fact: only the release that built it is known to run it
            entry["onnxruntime"] = installed()
        needs.append((entry["onnxruntime"], f"{entry['op_type']} {entry['why']}"))
    newest = max(key(release) for release, _ in needs)
    release = next(r for r, _ in needs if key(r) == newest)
    because = sorted({why for r, why in needs if key(r) == newest and why}) if release != OLDEST else []
    return {"onnxruntime": release, "because": because,
            "ir_version": ir_version, "opsets": dict(sorted(opsets.items())), "contrib_ops": ops,
            "limits": [{"id": ident, "text": text} for ident, text in sorted(limits.items())],
            "built_with": installed()}


def exceeding(requires: dict[str, Any], target: str) -> list[str]:
    """What in the graph needs a release newer than `target` (empty when `target` runs it)."""
    if key(requires["onnxruntime"]) <= key(target):
        return []
    return [f"{e['op_type']} {e['why']} (onnxruntime {e['onnxruntime']})"
            for e in requires["contrib_ops"] if key(e["onnxruntime"]) > key(target)] or requires["because"]


def check_target(requires: dict[str, Any], target: str | None, op: str) -> None:
    """A pass given target_onnxruntime fails when its graph still needs a newer release."""
    if target is None:
        return
    too_new = exceeding(requires, target)
    if too_new:
        raise PassError(f"{op}: target_onnxruntime {target}, but the graph needs onnxruntime "
                        f"{requires['onnxruntime']}: {'; '.join(too_new)}. Build its input with the same "
                        "target_onnxruntime, or use level: basic")


def check_installed(requires: dict[str, Any]) -> None:
    """The build's own onnxruntime wrote the graph and its passes run it: a graph it cannot run is no variant,
    and if it does run it, the facts that said otherwise are wrong (and so would every `requires` be)."""
    here = installed()
    if key(here) < key(requires["onnxruntime"]):
        raise PassError(f"the graph needs onnxruntime {requires['onnxruntime']} ({'; '.join(requires['because'])}) "
                        f"by recipec's facts (recipec/onnx/requires.py), but this environment has onnxruntime {here}: "
                        "upgrade onnxruntime, or, if this onnxruntime did run the graph, report the wrong fact")
