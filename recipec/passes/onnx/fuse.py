"""fuse: rewrite an exported decoder into onnxruntime's fused operators and save ORT's optimized graph.

What does the work (docs/onnx-passes.md has the detail):
- recipec's rewrite rules (recipec/fusions): shape-arithmetic folding, decoder attention with KV cache ->
  GroupQueryAttention / MultiHeadAttention with RotaryEmbedding, merged sibling projections;
- onnxruntime.transformers' optimizer: RMSNorm/LayerNorm and their skip forms, FastGelu/BiasGelu, bias adds;
- onnxruntime's own graph optimizer at the chosen level, saved offline (constant folding and more).
The output is checked against the input graph on seeded inputs before the stage succeeds.

Memory: the graph work holds the input's weights memory-mapped (plus the merged projections), the graph goes to
onnxruntime through a file onnx-ir writes tensor by tensor, and each onnxruntime session is the one copy of the
weights while it lives (recipec.onnx.fusions.pipeline has the detail).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx_ir as ir
import onnxruntime as ort

from recipec.core.memory import release
from recipec.core.params import prop
from recipec.onnx import artifact
from recipec.onnx.fusions import compat, pipeline
from recipec.onnx import requires, sessions
from recipec.onnx.fusions._utils import contrib_ops, op_counts
from recipec.passes.base import CheckContext, Pass, PassError, StageContext, kv_cache_last

ORT_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

FP32_TOLERANCE, FP16_TOLERANCE = 1e-3, 5e-2

PARAMS: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "level": {
            "enum": ["basic", "extended", "all"], "default": "extended",
            "description": "basic: constant folding and shape clean-up only. extended: + attention, rotary, "
                           "norm, GELU and bias fusions, merged projections, onnxruntime's extended "
                           "optimizations. all: + onnxruntime's layout optimizations, which are specific to "
                           "the CPU that runs the build (applied for provider cpu only).",
        },
        "provider": {
            "enum": ["cpu", "cuda"], "default": "cpu",
            "description": "Execution provider the graph is optimized for. Offline optimizations beyond "
                           "basic need that provider at build time; without CUDA here, a cuda graph gets "
                           "recipec's and onnxruntime.transformers' fusions plus basic optimizations.",
        },
        "attention": {
            "enum": ["auto", "gqa", "mha", "none"], "default": "auto",
            "description": "Attention operator: auto = MultiHeadAttention where kv heads equal heads, "
                           "GroupQueryAttention otherwise; mha matches only kv heads == heads; none keeps "
                           "attention unfused.",
        },
        "kv_buffer": {
            "enum": ["growing", "shared"], "default": "growing",
            "description": "growing: each step returns a present one token longer than the past (Optimum's "
                           "contract; left-padded batches). shared: GroupQueryAttention with onnxruntime-genai's "
                           "lengths from the attention mask (right-padded rows), so past and present can be one "
                           "preallocated buffer written in place (genai_config past_present_share_buffer; "
                           "recipec's runtime then batches by slot with no cache copy). Needs attention auto "
                           "or gqa.",
        },
        "merge_projections": prop("boolean", True, "Merge MatMuls that share their input (q/k/v, gate/up) into "
                                                   "one MatMul + Split."),
        "tolerance": prop(["number", "null"], None,
                          "Largest allowed |Δ| of logits and present.* between the fused and the input graph "
                          "(left-padded prefill and one decode step on seeded inputs); the stage fails beyond "
                          f"it. null = {FP32_TOLERANCE:g} for float32 graphs, {FP16_TOLERANCE:g} when the input "
                          "holds float16 weights (reordered half-precision sums differ by more).",
                          exclusiveMinimum=0),
        "seed": prop("integer", 0, "Seed of the check inputs."),
        "target_onnxruntime": compat.TARGET_PROPERTY,
    },
}


def _graph_fusions(model: ir.Model, params: dict[str, Any], ctx: StageContext,
                   config: dict[str, Any]) -> tuple[ir.Model, dict]:
    report = pipeline.FusionReport()
    overridable = pipeline.detach_overridable(model)
    model = pipeline.prepare(model, report)
    if params["level"] != "basic":
        pipeline.slice_kept_logits(model, report)
        shared = params["kv_buffer"] == "shared"
        whole = shared and compat.whole_attention_in_gqa(params["target_onnxruntime"])
        pipeline.fuse_attention(model, params["attention"], report, ctx.log, shared_buffer=shared,
                                rotary_positions=compat.rotary_positions(config) if whole else None)
        pipeline.unflatten_gemms(model, report)
        if params["merge_projections"]:
            pipeline.merge_projections(model, report)
            if whole:
                pipeline.pack_attention_inputs(model, report)
    pipeline.reattach(model, overridable)
    if params["level"] != "basic":
        model = pipeline.ort_transformer_fusions(model, params["provider"], ctx.log, int(config["num_attention_heads"]),
                                                 int(config["hidden_size"]))
    return model, report.applied


def _ort_level(params: dict[str, Any], ctx: StageContext) -> ort.GraphOptimizationLevel:
    level = params["level"]
    if params["provider"] == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        if level != "basic":
            ctx.log("fuse: no CUDA execution provider here; onnxruntime's offline optimizations stop at basic")
        return ORT_LEVELS["basic"]
    if params["provider"] == "cuda" and level == "all":
        return ORT_LEVELS["extended"]  # layout optimizations target CPU kernels
    return ORT_LEVELS[level]


def _write(model: ir.Model, path: Path, external: bool) -> None:
    """onnx-ir writes tensor by tensor, the weights external when the input's were (or when they would not fit
    one protobuf)."""
    if external:
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
    else:
        ir.save(model, path)


def _save_optimized(staged: Path, external: bool, params: dict[str, Any], ctx: StageContext) -> Path:
    """onnxruntime applies its own optimizations and writes the result as the stage's model.onnx."""
    target = ctx.output_dir / "model.onnx"
    sessions.session(staged, params["provider"], _ort_level(params, ctx), target, external=external)
    return target


def _check(params: dict[str, Any], source: Path, target: Path, tolerance: float) -> dict[str, float]:
    reference = sessions.session(source, params["provider"])
    candidate = sessions.session(target, params["provider"])
    # A shared-buffer graph reads padding as right-padding (genai's convention), so its check runs unpadded;
    # the runtime's slots, which pad on the right, are checked against transformers in tests/test_slots.py.
    left_pad = 0 if params["kv_buffer"] == "shared" else 3
    diffs = sessions.max_logit_diffs(reference, candidate, params["seed"], pad=left_pad,
                                     batched_chunk=compat.batched_chunks(target))
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > tolerance:
        raise PassError(f"fuse: the fused graph differs from its input by {diffs[worst]:.3g} in {worst} "
                        f"(tolerance {tolerance:g}); try level: basic or attention: none, and fuse before quantize")
    return diffs


def _tolerance(params: dict[str, Any], model: ir.Model) -> float:
    if params["tolerance"] is not None:
        return params["tolerance"]
    half = any(v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT16
               for v in model.graph.initializers.values())
    return FP16_TOLERANCE if half else FP32_TOLERANCE


def _external(source: Path, model: ir.Model) -> bool:
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    return (source.parent / "model.onnx.data").exists() or weights > sessions.EXTERNAL_DATA_BYTES


def apply(ctx: StageContext) -> dict[str, Any]:
    target_ort = compat.effective_target(ctx.params["target_onnxruntime"])
    params = {**ctx.params, "target_onnxruntime": target_ort,
              "attention": compat.attention_choice(ctx.params["attention"], target_ort, ctx.log,
                                                   shared_buffer=ctx.params["kv_buffer"] == "shared")}
    source = ctx.input_dir / "model.onnx"
    if not source.exists():
        raise PassError(f"fuse: {source} does not exist; fuse consumes an exported ONNX variant")
    base = artifact.read_artifact(ctx.input_dir)
    model = ir.load(str(source))  # the weights stay memory-mapped from model.onnx.data, when external
    before, tolerance, external = op_counts(model), _tolerance(params, model), _external(source, model)
    io_types = pipeline.io_types(model)
    with ctx.progress("fusing", total=None), tempfile.TemporaryDirectory(dir=ctx.output_dir) as scratch:
        model, applied = _graph_fusions(model, params, ctx, base["model"])
        pipeline.restore_io_types(io_types, model)
        if params["provider"] == "cuda" and "GroupQueryAttention" in applied:
            ctx.log("fuse: GroupQueryAttention runs on CUDA in float16/bfloat16 only; follow with quantize "
                    "scheme: fp16")
        _write(model, Path(scratch) / "model.onnx", external)
        del model  # onnxruntime's session is the one copy of the weights from here
        release()
        target = _save_optimized(Path(scratch) / "model.onnx", external, params, ctx)
        compat.rewrite_saved(target, params["target_onnxruntime"], ctx.log)
    release()
    with ctx.progress("checking fused graph", total=None):
        diffs = _check(params, source, target, tolerance)
    fused_model = ir.load(str(target))
    after, contrib = op_counts(fused_model), contrib_ops(fused_model)
    if params["kv_buffer"] == "shared" and "GroupQueryAttention" not in after:
        raise PassError("fuse: kv_buffer: shared needs GroupQueryAttention, and no attention block matched; "
                        "use kv_buffer: growing for this model")
    artifact.copy_support_files(ctx.input_dir, ctx.output_dir)
    written = artifact.write_artifact_json(ctx.output_dir, base=base)
    requires.check_target(written["requires"], params["target_onnxruntime"], "fuse")
    return _metrics(params, before, after, contrib, applied, diffs, tolerance)


def check(params: dict[str, Any], ctx: CheckContext) -> list[tuple[tuple, str]]:
    problems = kv_cache_last(ctx, "fuse") + compat.fuse_problems(params)
    if params["kv_buffer"] != "shared":
        return problems
    if params["attention"] in ("mha", "none"):
        return problems + [(("kv_buffer",), f"kv_buffer: shared needs GroupQueryAttention; attention is {params['attention']} "
                                 "(use auto or gqa)")]
    if params["level"] == "basic":
        return problems + [(("kv_buffer",), "kv_buffer: shared needs attention fusion, which level basic skips")]
    return problems


def _metrics(params, before: dict[str, int], after: dict[str, int], contrib: set[str], applied: dict[str, int],
             diffs: dict[str, float], tolerance: float) -> dict[str, Any]:
    fused_ops = {op: after[op] - before.get(op, 0) for op in sorted(contrib) if after[op] > before.get(op, 0)}
    return {
        "level": params["level"], "provider": params["provider"], "attention": params["attention"],
        "target_onnxruntime": params["target_onnxruntime"],
        "kv_buffer": params["kv_buffer"],
        "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
        "ops_before": before, "ops_after": after,
        "fused_ops": fused_ops, "rewrites": applied,
        "max_abs_diff": diffs, "tolerance": tolerance,
    }


PASS = Pass(
    op="fuse",
    consumes="onnx",
    produces="onnx",
    params=PARAMS,
    apply=apply,
    check=check,
    summary="Fuse attention (GQA/MHA + rotary), norms, GELU and projections into onnxruntime's fused "
            "operators; save onnxruntime's optimized graph; check logits against the input graph.",
)
