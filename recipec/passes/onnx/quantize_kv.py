"""quantize_kv: an int8 KV cache, in onnxruntime's GroupQueryAttention (k_quant_type / v_quant_type).

A decode step reads the whole cache, so past a few hundred tokens of context the cache, not the weights, is
most of the bytes a step moves; int8 halves them against float16 and quarters them against float32. The
kernel quantizes each new key and value into the int8 cache with a fixed scale per channel (kv head x head
dim, PER_CHANNEL) or one per tensor (PER_TENSOR), and dequantizes what it reads. The scales are calibrated
here: the input graph runs the calibration windows, and each layer's scale is max |key| (|value|) over them
per channel / 127, so the calibrated range is never clipped.

The input must be a graph fused with `kv_buffer: shared` (GroupQueryAttention taking its lengths from the
mask); the pass marks every GroupQueryAttention as quantizing, adds the scales as initializers and makes
past_key_values.* / present.* int8. Quality is scored teacher-forced on the eval windows as phase_split does:
half of each window prefills, the rest are decode steps, which read the int8 cache; the mean KL of those
next-token distributions from the input graph's must stay under max_kl.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from recipec.core.params import prop
from recipec.onnx import artifact as art
from recipec.onnx.logits import log_softmax
from recipec.passes.base import Pass, PassError, StageContext
from recipec.passes.onnx.phase_split import step_logits
from recipec.runtime.lm import OnnxLM, load

GRANULARITY = {"per_channel": "PER_CHANNEL", "per_tensor": "PER_TENSOR"}
K_SCALE, V_SCALE = 12, 13  # GroupQueryAttention's input slots
INT8_MAX = 127.0
# Windows run per batch: bounds the cache and logits held at once.
BATCH = 8

PARAMS: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "granularity": {"enum": list(GRANULARITY), "default": "per_channel",
                        "description": "per_channel: one scale per kv head and head-dim channel per layer (keys "
                                       "have outlier channels); per_tensor: one scale per layer tensor."},
        "max_kl": prop("number", 0.05, "Largest mean KL, over teacher-forced decode steps on the eval windows, of "
                                       "the int8-cache graph's next-token distributions from the input graph's.",
                       minimum=0),
    },
}


def calibrate(lm: OnnxLM, windows: np.ndarray, per_channel: bool) -> list[np.ndarray]:
    """max |x| / 127 of each cache tensor (layer 0 key, value, 1 ...) over the windows, [1, H, 1, D] per channel
    or [1] per tensor."""
    peaks: list[np.ndarray] | None = None
    for start in range(0, len(windows), BATCH):
        batch = windows[start:start + BATCH]
        _, cache = lm.forward(batch, np.ones_like(batch), lm.empty_cache(len(batch)))
        host = cache.host()
        tensors = [t for pair in zip(host.keys, host.values) for t in pair]
        batch_peaks = [np.abs(t.astype(np.float32)).max(axis=(0, 2)) for t in tensors]  # [H, D]
        peaks = batch_peaks if peaks is None else [np.maximum(a, b) for a, b in zip(peaks, batch_peaks)]
    assert peaks is not None
    scales = [np.maximum(p, 1e-8) / INT8_MAX for p in peaks]
    if per_channel:
        return [s[None, :, None, :].astype(np.float32) for s in scales]
    return [np.array([s.max()], np.float32) for s in scales]


def rewrite(model: ir.Model, scales: list[np.ndarray], quant_type: str) -> int:
    """Quantizing GroupQueryAttention nodes and int8 cache inputs/outputs; returns the nodes changed."""
    graph = model.graph
    nodes = [n for n in graph if n.op_type == "GroupQueryAttention"]
    layers = {v.name: i for i, v in enumerate(graph.inputs) if v.name.startswith("past_key_values.")}
    for node in nodes:
        layer = _layer_of(node.inputs[3], layers)
        key_scale, value_scale = (_initializer(graph, f"kv_scale.{layer}.{kind}", scales[2 * layer + j])
                                  for j, kind in enumerate(("key", "value")))
        inputs = list(node.inputs) + [None] * (V_SCALE + 1 - len(node.inputs))
        inputs[K_SCALE], inputs[V_SCALE] = key_scale, value_scale
        node.resize_inputs(len(inputs))
        for slot, value in enumerate(inputs):
            node.replace_input_with(slot, value)
        for name, value in (("k_quant_type", quant_type), ("v_quant_type", quant_type)):
            node.attributes[name] = ir.AttrString(name, value)
        node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", 8)
    for value in [*graph.inputs, *graph.outputs]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type = ir.TensorType(ir.DataType.INT8)
    return len(nodes)


def _layer_of(past_key: ir.Value | None, layers: dict[str, int]) -> int:
    if past_key is None or past_key.name not in layers:
        raise PassError("quantize_kv: a GroupQueryAttention does not read a past_key_values input directly")
    return int(past_key.name.split(".")[1])


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.FLOAT))
    graph.register_initializer(value)
    return value


def score(reference: OnnxLM, candidate: OnnxLM, tokens: np.ndarray) -> dict[str, float]:
    prompt = tokens.shape[1] // 2
    kl, top1, positions = 0.0, 0.0, 0
    for start in range(0, len(tokens), BATCH):
        windows = tokens[start:start + BATCH]
        p, q = step_logits(reference, windows, prompt), step_logits(candidate, windows, prompt)
        lp, lq = log_softmax(p), log_softmax(q)
        kl += float((np.exp(lp) * (lp - lq)).sum())
        top1 += float((p.argmax(-1) == q.argmax(-1)).sum())
        positions += p.shape[0] * p.shape[1]
    return {"kl_mean": kl / positions, "top1_agreement": top1 / positions, "positions": positions,
            "prompt_tokens": prompt}


def _windows(ctx: StageContext, section: str) -> np.ndarray:
    tokens = getattr(ctx.data, section)() if ctx.data is not None else None
    if tokens is None or len(tokens) == 0:
        raise PassError(f"quantize_kv: needs {section} windows (the recipe's data.{section})")
    tokens = np.asarray(tokens, dtype=np.int64)
    if section == "eval" and tokens.shape[1] < 4:
        raise PassError(f"quantize_kv: eval windows of {tokens.shape[1]} tokens leave no decode step to score")
    return tokens


def apply(ctx: StageContext) -> dict[str, Any]:
    base = art.read_artifact(ctx.input_dir)
    kv = base.get("kv_cache") or {}
    if kv.get("buffer") != "shared":
        raise PassError("quantize_kv: the input graph must be fused with kv_buffer: shared (GroupQueryAttention "
                        "taking its lengths from the mask); fuse it first")
    if kv.get("dtype") == "int8":
        raise PassError("quantize_kv: the input's KV cache is int8 already")
    quant_type = GRANULARITY[ctx.params["granularity"]]
    reference = load(ctx.input_dir, device=ctx.device)
    with ctx.progress("calibrating KV scales", total=None):
        scales = calibrate(reference, _windows(ctx, "calibration"), quant_type == "PER_CHANNEL")
    model = ir.load(str(ctx.input_dir / art.MODEL_FILE))
    changed = rewrite(model, scales, quant_type)
    _save(model, ctx.input_dir, ctx.output_dir)
    art.copy_support_files(ctx.input_dir, ctx.output_dir)
    written = art.write_artifact_json(ctx.output_dir, base=base)
    with ctx.progress("scoring the int8 cache on decode steps", total=None):
        scores = score(reference, load(ctx.output_dir, device=ctx.device), _windows(ctx, "eval"))
    if scores["kl_mean"] > ctx.params["max_kl"]:
        raise PassError(f"quantize_kv: decode steps over the int8 cache drift from the input graph: mean KL "
                        f"{scores['kl_mean']:.4g} (max_kl {ctx.params['max_kl']:g}); try granularity per_channel "
                        "or keep the float cache")
    ctx.log(f"quantize_kv: {changed} attention nodes read an int8 cache; decode-step KL {scores['kl_mean']:.4g}")
    return {"granularity": ctx.params["granularity"], "nodes": changed, "max_kl": ctx.params["max_kl"], **scores,
            "kv_dtype": {"before": kv["dtype"], "after": written["kv_cache"]["dtype"]},
            "scale_range": [float(min(s.min() for s in scales)), float(max(s.max() for s in scales))]}


def _save(model: ir.Model, source_dir: Path, output_dir: Path) -> None:
    """Weights stay external when the input's were."""
    target = output_dir / art.MODEL_FILE
    if (source_dir / art.DATA_FILE).exists():
        ir.save(model, target, external_data=art.DATA_FILE, size_threshold_bytes=1024)
    else:
        ir.save(model, target)


PASS = Pass(
    op="quantize_kv",
    consumes="onnx",
    produces="onnx",
    params=PARAMS,
    apply=apply,
    summary="int8 KV cache in GroupQueryAttention (needs fuse kv_buffer: shared): calibrated per-channel or "
            "per-tensor scales; decode steps over the int8 cache scored against the input graph.",
    uses_data=("calibration", "eval"),
)
