"""Graphs for an older onnxruntime: what fuse and quantize write when given `target_onnxruntime`.

The facts (which release accepts which operator, input count and attribute) are recipec.onnx.requires'; this
module decides what a pass does with them:
- attention: GroupQueryAttention needs attention_bias (input 10, onnxruntime 1.22) to keep the exporter's
  mask, so left padding behaves as in the unfused graph; without it the op would treat every row as
  right-padded. Below 1.22 attention fuses to MultiHeadAttention where kv heads equal heads (1.21 on) or
  stays unfused.
- a saved graph: onnxruntime writes every attribute that has a schema default into a graph it saves,
  including attributes older releases reject; each is dropped where it holds the default that means the
  older behaviour. GroupQueryAttention's inputs past the target's count are dropped where they are empty or
  the one recipec fills that an older form does without (`DROPPABLE`).
- quantized embeddings: recipec's GatherBlockQuantized has uint8 data and the `bits` attribute (1.23).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import onnx

from recipec.core.params import prop
from recipec.errors import PassError
from recipec.onnx import requires
from recipec.onnx.requires import MS

TARGET_PROPERTY = prop(
    ["string", "null"], None,
    "Oldest onnxruntime the output must run on, as a quoted minor version: \"1.20\" (unquoted, YAML reads the "
    "number 1.2); null = the onnxruntime of the build (the newest signatures recipec knows, if it is newer). "
    "The pass then writes only operators, inputs and attributes that release accepts (docs/onnx-passes.md), and "
    "fails if its graph still needs a newer one. artifact.json's requires says what the graph needs either way.",
    enum=[*requires.KNOWN, None])

GQA_INPUTS = 11  # recipec's attention needs inputs up to attention_bias (10)
SHARED_GQA_INPUTS = 7  # ... with kv_buffer: shared, lengths from the mask and no bias (up to total length, 6)
MHA_INPUTS = 8  # ... up to past_value (7); attention_bias is 5
# Inputs recipec fills that an older signature can go without, by slot: query_seqlens is S for every row, which
# is what GroupQueryAttention assumes without it; the difference (batch > 1 multi-token steps with a past) is
# an error there, not a wrong value, and artifact.json lists it under requires.limits.
DROPPABLE = {(MS, "GroupQueryAttention"): {16: "query_seqlens"}}


def effective_target(target: str | None) -> str | None:
    """The release a pass writes for: the one asked for; else this environment's onnxruntime when it is older
    than the newest recipec knows (its own session would refuse the newer signatures); else no constraint."""
    if target is not None:
        return target
    here = requires.installed()
    return here if here in requires.KNOWN[:-1] else None


def attention_choice(choice: str, target: str | None, log: Callable[[str], None] = lambda message: None,
                     shared_buffer: bool = False) -> str:
    """The fuse pass's `attention` for the target: what it asked for, narrowed to what the target runs. The
    shared-buffer form of GroupQueryAttention runs from the oldest release recipec knows (measured on 1.20.1:
    the fuse check and recipec's slot runtime give the unfused graph's tokens)."""
    if target is None:
        return choice
    gqa = requires.accepts(target, MS, "GroupQueryAttention", SHARED_GQA_INPUTS if shared_buffer else GQA_INPUTS)
    mha = requires.accepts(target, MS, "MultiHeadAttention", MHA_INPUTS)
    if (choice == "gqa" and not gqa) or (choice == "mha" and not mha):
        raise PassError(attention_problem(choice, target))
    if choice != "auto" or (gqa and mha) or shared_buffer:
        return choice
    narrowed = "mha" if mha else "none"
    gqa_release, _ = requires.release_for(MS, "GroupQueryAttention", GQA_INPUTS)
    why = (f"GroupQueryAttention as recipec writes it needs onnxruntime {gqa_release}; attention with fewer kv "
           "heads than heads stays unfused" if mha else "neither attention operator as recipec writes it runs "
           "correctly there (recipec/onnx/requires.py)")
    log(f"fuse: target_onnxruntime {target}: attention {narrowed} ({why})")
    return narrowed


# GroupQueryAttention doing more of the layer in the shared-buffer form: its own rotary (do_rotary, cos/sin
# tables by position) and q/k/v packed in its query input. Checked against the unfused graph on this release
# (tests/test_slots.py, tests/test_fuse.py); older targets keep RotaryEmbedding and three inputs.
WHOLE_ATTENTION = "1.32"


def whole_attention_in_gqa(target: str | None) -> bool:
    return target is None or requires.key(target) >= requires.key(WHOLE_ATTENTION)


def rotary_positions(config: dict[str, Any]) -> int | None:
    """Rows of the rotary table for GroupQueryAttention's own rotary: the model's max_position_embeddings
    (the runtime's context limit); None (RotaryEmbedding stays) for a model that states no such limit."""
    rows = config.get("max_position_embeddings")
    return int(rows) if isinstance(rows, int) and rows > 0 else None


def attention_problem(choice: str, target: str) -> str:
    op, count = ("GroupQueryAttention", GQA_INPUTS) if choice == "gqa" else ("MultiHeadAttention", MHA_INPUTS)
    release, _ = requires.release_for(MS, op, count)
    return (f"attention: {choice} needs onnxruntime {release} ({op} as recipec writes it), but target_onnxruntime "
            f"is {target}; use attention: auto (it picks what {target} runs) or none")


def fuse_problems(params: dict[str, Any]) -> list[tuple[tuple, str]]:
    target, choice = params.get("target_onnxruntime"), params.get("attention", "auto")
    if target is None or choice not in ("gqa", "mha"):
        return []
    try:
        attention_choice(choice, target, shared_buffer=params.get("kv_buffer") == "shared")
    except PassError as exc:
        return [(("attention",), str(exc))]
    return []


def _table_inputs(params: dict[str, Any]) -> int:
    """GatherBlockQuantized's inputs for the scheme: zero points (input 3) only for asymmetric int4 blocks."""
    return 4 if params.get("scheme") == "int4" and params.get("symmetric") is False else 3


def embeddings_quantizable(target: str | None, params: dict[str, Any]) -> bool:
    return target is None or requires.accepts(target, MS, "GatherBlockQuantized", _table_inputs(params), ["bits"])


def quantize_problems(params: dict[str, Any]) -> list[tuple[tuple, str]]:
    target = params.get("target_onnxruntime")
    if params.get("embeddings") == "quantize" and not embeddings_quantizable(target, params):
        release, why = requires.release_for(MS, "GatherBlockQuantized", _table_inputs(params), ["bits"])
        return [(("embeddings",), f"embeddings: quantize needs onnxruntime {release} (GatherBlockQuantized as "
                                  f"recipec writes it for this scheme: {why}), but target_onnxruntime is {target}; "
                                  "use embeddings: keep, or leave it out")]
    return []


def quantize_options(params: dict[str, Any], opts: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The scheme's options for the target: embeddings left at their default stay float where it cannot
    read quantized ones (one given explicitly was refused at validation)."""
    target = params.get("target_onnxruntime")
    if opts.get("embeddings") == "quantize" and not embeddings_quantizable(target, {**params, **opts}):
        log(f"quantize: target_onnxruntime {target} has no GatherBlockQuantized as recipec writes it; the "
            "token-embedding table stays float (embeddings: keep)")
        return {**opts, "embeddings": "keep"}
    return opts


def rewrite_saved(path: Path, target: str | None, log: Callable[[str], None]) -> None:
    """Rewrite the graph file `path` (its external data untouched) into the form `target` accepts."""
    if target is None:
        return
    proto = onnx.load(str(path), load_external_data=False)
    changed = [name for node in proto.graph.node if (name := _downgrade(node, target))]
    if changed:
        onnx.save(proto, str(path))
        log(f"fuse: {len(changed)} nodes rewritten in the form onnxruntime {target} accepts "
            f"({', '.join(sorted(set(changed)))})")


def _downgrade(node: onnx.NodeProto, target: str) -> str | None:
    """Drop what `target` does not know from one node; returns its op type if anything changed."""
    op = requires.OPS.get((node.domain or "", node.op_type))
    if op is None:
        return None
    changed = _drop_attributes(node, op, target)
    most = max((count for release, count in op.inputs if requires.key(release) <= requires.key(target)), default=None)
    if most is not None and len(node.input) > most:
        _drop_inputs(node, most)
        changed = True
    return node.op_type if changed else None


def _drop_attributes(node: onnx.NodeProto, op: requires.Op, target: str) -> bool:
    newer = [a for a in node.attribute
             if a.name in op.attributes and requires.key(op.attributes[a.name]) > requires.key(target)]
    for attribute in newer:
        value = onnx.helper.get_attribute_value(attribute)
        if not _is_default(value, op.defaults.get(attribute.name)):
            raise PassError(f"{node.op_type} {node.name!r} has {attribute.name}={value!r}, which onnxruntime "
                            f"{op.attributes[attribute.name]} introduced; onnxruntime {target} cannot run it")
        node.attribute.remove(attribute)
    return bool(newer)


def _is_default(value: Any, default: Any) -> bool:
    """Equal to the schema default; a float as onnxruntime stored it (float32) against the decimal one."""
    value = value.decode() if isinstance(value, bytes) else value
    if isinstance(value, float) and isinstance(default, float):
        return abs(value - default) <= 1e-6 * abs(default)
    return default is not None and value == default


def _drop_inputs(node: onnx.NodeProto, most: int) -> None:
    droppable = DROPPABLE.get((node.domain, node.op_type), {})
    kept = list(node.input)
    for slot in range(len(kept) - 1, most - 1, -1):
        if kept[slot] and slot not in droppable:
            raise PassError(f"{node.op_type} {node.name!r} uses input {slot}, which the target onnxruntime does "
                            "not have")
    kept = kept[:most]
    while kept and not kept[-1]:
        kept.pop()
    del node.input[:]
    node.input.extend(kept)


def batched_chunks(path: Path) -> bool:
    """Whether the graph runs a step of several tokens with a past at batch > 1 (see requires.limits)."""
    proto = onnx.load(str(path), load_external_data=False)
    return not any(ident == requires.BATCH_1_CHUNKS for node in proto.graph.node
                   for ident, _ in requires.node_limits(node))
