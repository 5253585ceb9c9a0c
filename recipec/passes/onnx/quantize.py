"""quantize: int8 (dynamic or calibrated QDQ), int4 weight-only, or fp16, with onnxruntime's own tools.

The schemes (quantize_schemes.py): int8-dynamic (quantize_dynamic: MatMulInteger), int8-static (quantize_static,
QDQ, calibrated on ctx.data.calibration() prefill windows), int4 (MatMulNBitsQuantizer: MatMulNBits), fp16
(convert_float_to_float16). The int8 and int4 schemes also quantize the token-embedding table into
GatherBlockQuantized, and an LM head tied to it into MatMulNBits over the same data (quantize_embeddings.py),
unless `embeddings: keep`.
Every result is scored against the input graph on ctx.data.eval() windows (KL of next-token distributions
with the input graph as P, and top-1 agreement, over all positions; quantize_fidelity.py) and fails the stage
past its bounds.

Memory: the phases run one after the other and no two hold weights at once. The input graph's reference
logits are computed and spooled to disk first, its session closed; the embedding step reads the input lazily
(onnx-ir keeps external initializers on disk) and writes the quantizer's input; the quantizer reads that from
its path (quantize_schemes.py says what each holds); the quantized graph's session opens last; the reports
read graphs without their external data.
"""
from __future__ import annotations

import fnmatch
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from recipec.core.params import NO_DEFAULT, prop
from recipec.onnx import artifact, inspect, requires, sessions
from recipec.onnx.fusions import compat
from recipec.passes.base import CheckContext, Pass, PassError, StageContext, kv_cache_last
from recipec.passes.onnx import quantize_embeddings as embeddings
from recipec.passes.onnx import quantize_fidelity as fidelity
from recipec.passes.onnx.quantize_schemes import RECORDS, SCHEME_FUNCTIONS, quiet_quantizers

SCHEMES = ("int8-dynamic", "int8-static", "int4", "fp16")
# Scheme-specific options and their defaults; an option given for another scheme is an error.
OPTIONS: dict[str, dict[str, Any]] = {
    "int8-dynamic": {"per_channel": False, "reduce_range": False, "embeddings": "quantize"},
    "int8-static": {"per_channel": False, "reduce_range": False, "method": "minmax", "calibration_samples": 32,
                    "embeddings": "quantize"},
    "int4": {"block_size": 32, "symmetric": True, "accuracy_level": None, "embeddings": "quantize"},
    "fp16": {"keep_io_types": True, "keep_fp32_ops": []},
}
# (max_kl, min_top1) per scheme: measured on a small trained llama (docs/onnx-passes.md), with margin.
BOUNDS: dict[str, tuple[float, float]] = {
    "int8-dynamic": (0.05, 0.90), "int8-static": (0.10, 0.85), "int4": (0.10, 0.85), "fp16": (0.001, 0.99),
}
# The int8 schemes store the embedding table as 8-bit blocks of this many values per scale (onnxruntime-genai's
# default block size too). A tied head reads it with accuracy_level 4 (int8 inputs, as the int8 schemes
# compute anyway): onnxruntime 1.32's 8-bit MatMulNBits has no fast CPU path for float inputs, measured 25x
# slower than a float32 MatMul at one token and 2x faster with int8 inputs (vocab 32000, hidden 896).
INT8_EMBEDDING_BLOCK, INT8_HEAD_ACCURACY = 32, 4
# Every scheme's keys; the rest are its options (OPTIONS), which have no schema default so that one given
# for another scheme can be told apart from one left out.
COMMON_KEYS = frozenset({"scheme", "exclude", "max_kl", "min_top1", "target_onnxruntime"})

PARAMS: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["scheme"],
    "properties": {
        "scheme": {"enum": list(SCHEMES), "description": "int8-dynamic | int8-static | int4 | fp16."},
        "exclude": prop("array", [], "Node-name globs kept in float (e.g. '*lm_head*', '/model/layers.0/*'); a "
                                     "pattern that matches no node fails the stage. Excluding the embedding "
                                     "Gather or a head tied to it keeps their shared table in float.",
                        items={"type": "string", "minLength": 1}),
        "per_channel": prop("boolean", NO_DEFAULT, "int8: one weight scale per output channel (default false)."),
        "reduce_range": prop("boolean", NO_DEFAULT, "int8: 7-bit weights, for CPUs without VNNI (default false)."),
        "method": {"enum": ["minmax", "entropy", "percentile"],
                   "description": "int8-static: calibration method (default minmax)."},
        "calibration_samples": prop("integer", NO_DEFAULT, "int8-static: calibration windows used (default 32).",
                                    minimum=1),
        "block_size": {"enum": [32, 64, 128], "description": "int4: weights per scale (default 32), for the "
                                                            "MatMul weights and the embedding table alike."},
        "symmetric": prop("boolean", NO_DEFAULT, "int4: zero point fixed at the midpoint (default true)."),
        "accuracy_level": prop(["integer", "null"], NO_DEFAULT, "int4: MatMulNBits accuracy_level, the minimum "
                                                                "input precision (4 = int8 compute; default unset "
                                                                "= fp32).", minimum=0, maximum=4),
        "embeddings": {"enum": ["quantize", "keep"],
                       "description": "int8-dynamic, int8-static, int4: what happens to the token-embedding "
                                      "table (the initializer a Gather reads with input_ids). quantize (default): "
                                      "stored block-quantized and read by com.microsoft GatherBlockQuantized "
                                      "(int4: 4-bit with the scheme's block_size and symmetric; int8: 8-bit, "
                                      f"symmetric, blocks of {INT8_EMBEDDING_BLOCK}); an LM head tied to the table "
                                      "becomes MatMulNBits over the same quantized data, so the file keeps one "
                                      "table. keep: the table stays float32, and so does a head tied to it."},
        "keep_io_types": prop("boolean", NO_DEFAULT, "fp16: graph inputs/outputs stay float32 (default true)."),
        "keep_fp32_ops": prop("array", NO_DEFAULT, "fp16: op types kept in float32 besides onnxruntime's own list.",
                              items={"type": "string"}),
        "max_kl": prop(["number", "null"], None, "Largest mean KL(input || quantized) of next-token distributions "
                                                 "on the eval windows; null = the scheme's default "
                                                 + ", ".join(f"{s} {b[0]}" for s, b in BOUNDS.items()) + ".",
                       minimum=0),
        "min_top1": prop(["number", "null"], None, "Smallest top-1 agreement with the input graph on the eval "
                                                   "windows; null = the scheme's default "
                                                   + ", ".join(f"{s} {b[1]}" for s, b in BOUNDS.items()) + ".",
                         minimum=0, maximum=1),
        "target_onnxruntime": compat.TARGET_PROPERTY,
    },
}


def option_problems(params: dict[str, Any]) -> list[tuple[tuple, str]]:
    """Options given for a scheme that does not take them: quantizing would ignore them silently."""
    scheme = params["scheme"]
    return [((key,), f"{key} applies to {', '.join(s for s in SCHEMES if key in OPTIONS[s])}, not {scheme}")
            for key in sorted(params) if key not in COMMON_KEYS and key not in OPTIONS[scheme]]


def check(params: dict[str, Any], ctx: CheckContext) -> list[tuple[tuple, str]]:
    return option_problems(params) + compat.quantize_problems(params) + kv_cache_last(ctx, "quantize")


def _options(params: dict[str, Any]) -> dict[str, Any]:
    problems = option_problems(params)
    if problems:
        raise PassError("quantize: " + "; ".join(message for _, message in problems))
    scheme = params["scheme"]
    return {**OPTIONS[scheme], **{k: params[k] for k in OPTIONS[scheme] if k in params}}


def resolve_exclude(proto: onnx.ModelProto, patterns: list[str]) -> list[str]:
    """Node names matched by the globs; a pattern that matches nothing is a typo, not a no-op."""
    names = [n.name for n in proto.graph.node]
    matched: list[str] = []
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            close = [n for n in names if pattern.strip("*").split("*")[0] in n][:3]
            raise PassError(f"quantize: exclude pattern {pattern!r} matches no node" +
                            (f" (nodes look like {close})" if close else f" (e.g. {names[:3]})"))
        matched.extend(h for h in hits if h not in matched)
    return matched


def embedding_spec(scheme: str, opts: dict[str, Any]) -> embeddings.Spec | None:
    """How the scheme stores the embedding table; None where it stays float."""
    if opts.get("embeddings") != "quantize":
        return None
    if scheme == "int4":
        return embeddings.Spec(4, opts["block_size"], opts["symmetric"], opts["accuracy_level"])
    return embeddings.Spec(8, INT8_EMBEDDING_BLOCK, True, INT8_HEAD_ACCURACY)


def _prepare_embeddings(source: Path, scheme: str, opts: dict[str, Any], excluded: list[str], scratch: Path,
                        ctx: StageContext) -> tuple[Path, dict[str, Any]]:
    """The graph the scheme's quantizer reads: the input with its embedding tables quantized (or its kept
    tied heads in a form the quantizer leaves alone), written to scratch; the input itself when that changes
    nothing. Done before the quantizer, so that the float table never enters its memory. The input is read
    lazily: onnx-ir leaves external initializers on disk until they are written."""
    model = ir.load(str(source))
    record, messages, changed = embeddings.prepare(model, embedding_spec(scheme, opts), set(excluded))
    for message in messages:
        ctx.log(f"quantize: {message}")
    if not changed:
        return source, {"mode": opts["embeddings"], **record}
    prepared = scratch / "input"
    prepared.mkdir()
    _save_ir(model, prepared)
    return prepared / artifact.MODEL_FILE, {"mode": opts["embeddings"], **record}


def _save_ir(model: ir.Model, out_dir: Path) -> None:
    """model.onnx, with weights in model.onnx.data past protobuf's comfort (sessions.save_model's rule)."""
    tensors = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    external = (sum(t.nbytes for t in tensors) > sessions.EXTERNAL_DATA_BYTES
                or any(isinstance(t, ir.ExternalTensor) for t in tensors))
    path = out_dir / artifact.MODEL_FILE
    ir.save(model, path, external_data=artifact.DATA_FILE if external else None, size_threshold_bytes=1024)
    if external:
        sessions.share_data_file_mode(path)


def _eval_tokens(ctx: StageContext):
    tokens = ctx.data.eval()
    if tokens is None or len(tokens) == 0:
        raise PassError("quantize: scoring the quantized graph needs eval windows (the recipe's data.eval)")
    return tokens


def _evaluate(params: dict[str, Any], target: Path, reference: fidelity.Reference) -> dict[str, Any]:
    candidate = sessions.session(target)
    if not sessions.logits_to_keep_works(candidate):
        raise PassError("quantize: the quantized graph no longer honours logits_to_keep")
    scores = fidelity.score(candidate, reference)
    del candidate
    max_kl = params["max_kl"] if params["max_kl"] is not None else BOUNDS[params["scheme"]][0]
    min_top1 = params["min_top1"] if params["min_top1"] is not None else BOUNDS[params["scheme"]][1]
    scores.update(max_kl=max_kl, min_top1=min_top1)
    if scores["kl_mean"] > max_kl or scores["top1_agreement"] < min_top1:
        raise PassError(f"quantize: {params['scheme']} drifts too far from its input graph: KL "
                        f"{scores['kl_mean']:.4g} (max {max_kl:g}), top-1 agreement "
                        f"{scores['top1_agreement']:.3f} (min {min_top1:g}); exclude sensitive layers "
                        f"(e.g. '*lm_head*'), use a finer scheme, or relax max_kl/min_top1")
    return scores


def apply(ctx: StageContext) -> dict[str, Any]:
    params = {**ctx.params, "target_onnxruntime": compat.effective_target(ctx.params["target_onnxruntime"])}
    source = ctx.input_dir / artifact.MODEL_FILE
    if not source.exists():
        raise PassError(f"quantize: {source} does not exist; quantize consumes an exported ONNX variant")
    scheme, opts = params["scheme"], compat.quantize_options(params, _options(params), ctx.log)
    tokens = _eval_tokens(ctx)
    base = artifact.read_artifact(ctx.input_dir)
    before = inspect.Graph.load(source)
    excluded = resolve_exclude(before.proto, params["exclude"])
    target = ctx.output_dir / artifact.MODEL_FILE
    with tempfile.TemporaryDirectory(dir=ctx.output_dir, prefix=".scratch-") as tmp:
        scratch = Path(tmp)
        with ctx.progress("scoring the input graph", total=None):
            reference = fidelity.reference_logits(source, tokens, scratch / "reference.f32")
        with ctx.progress(f"quantizing ({scheme})", total=None), quiet_quantizers():
            prepared, tables = (_prepare_embeddings(source, scheme, opts, excluded, scratch, ctx)
                                if "embeddings" in opts else (source, None))
            extra = SCHEME_FUNCTIONS[scheme](prepared, target, opts, excluded, ctx, reference.io)
        with ctx.progress("scoring against the input graph", total=None):
            scores = _evaluate(params, target, reference)
    artifact.copy_support_files(ctx.input_dir, ctx.output_dir)
    written = artifact.write_artifact_json(ctx.output_dir, base=base)
    requires.check_target(written["requires"], params["target_onnxruntime"], "quantize")
    after = inspect.Graph.load(target)
    records = {**RECORDS[scheme](after), **extra, **({"embeddings": tables} if tables is not None else {})}
    return {
        "scheme": scheme, "options": opts, "excluded_nodes": excluded, "quantization": records,
        "matmul_weight_bytes": {"before": inspect.matmul_weight_bytes(before),
                                "after": inspect.matmul_weight_bytes(after)},
        "file_bytes": {"before": sessions.file_bytes(ctx.input_dir), "after": sessions.file_bytes(ctx.output_dir)},
        "ops": _quant_ops(after.proto), **scores,
    }


def _quant_ops(proto: onnx.ModelProto) -> dict[str, int]:
    wanted = {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "MatMulNBits",
              "GatherBlockQuantized", "Cast", "DynamicQuantizeMatMul"}
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in wanted:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


PASS = Pass(
    op="quantize",
    consumes="onnx",
    produces="onnx",
    params=PARAMS,
    apply=apply,
    summary="Quantize with onnxruntime's tools (int8 dynamic / static QDQ, int4 MatMulNBits, fp16), the token "
            "embeddings into GatherBlockQuantized (one table with a tied head), and score KL and top-1 "
            "agreement against the input graph on eval windows.",
    uses_data=("calibration", "eval"),
    check=check,
)
