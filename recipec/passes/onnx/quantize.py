"""quantize: int8 (dynamic or calibrated QDQ), int4 weight-only, or fp16, with onnxruntime's own tools.

- int8-dynamic: onnxruntime.quantization.quantize_dynamic (DynamicQuantizeLinear + MatMulInteger);
- int8-static: quantize_static in QDQ format, calibrated on ctx.data.calibration() prefill windows;
- int4: MatMulNBitsQuantizer (block-wise weight-only, MatMulNBits);
- fp16: onnxruntime.transformers.float16.convert_float_to_float16.
Every result is scored against the input graph on ctx.data.eval() windows (KL of next-token distributions
with the input graph as P, and top-1 agreement, over all positions) and fails the stage past its bounds.
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from recipec.core.params import NO_DEFAULT, prop
from recipec.onnx import artifact
from recipec.onnx import inspect, sessions
from recipec.onnx.logits import log_softmax
from recipec.passes.base import CheckContext, Pass, PassError, StageContext

SCHEMES = ("int8-dynamic", "int8-static", "int4", "fp16")
# Scheme-specific options and their defaults; an option given for another scheme is an error.
OPTIONS: dict[str, dict[str, Any]] = {
    "int8-dynamic": {"per_channel": False, "reduce_range": False},
    "int8-static": {"per_channel": False, "reduce_range": False, "method": "minmax", "calibration_samples": 32},
    "int4": {"block_size": 32, "symmetric": True, "accuracy_level": None},
    "fp16": {"keep_io_types": True, "keep_fp32_ops": []},
}
# (max_kl, min_top1) per scheme: measured on a small trained llama (docs/onnx-passes.md), with margin.
BOUNDS: dict[str, tuple[float, float]] = {
    "int8-dynamic": (0.05, 0.90), "int8-static": (0.10, 0.85), "int4": (0.10, 0.85), "fp16": (0.001, 0.99),
}
QUANTIZED_OPS = ("MatMul", "Gemm")
# Windows scored per run: float64 log-probabilities of both graphs are held, batch x seq x vocab each.
EVAL_ELEMENTS = 1 << 24
# Every scheme's keys; the rest are its options (OPTIONS), which have no schema default so that one given
# for another scheme can be told apart from one left out.
COMMON_KEYS = frozenset({"scheme", "exclude", "max_kl", "min_top1"})

PARAMS: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["scheme"],
    "properties": {
        "scheme": {"enum": list(SCHEMES), "description": "int8-dynamic | int8-static | int4 | fp16."},
        "exclude": prop("array", [], "Node-name globs kept in float (e.g. '*lm_head*', '/model/layers.0/*'); a "
                                     "pattern that matches no node fails the stage.",
                        items={"type": "string", "minLength": 1}),
        "per_channel": prop("boolean", NO_DEFAULT, "int8: one weight scale per output channel (default false)."),
        "reduce_range": prop("boolean", NO_DEFAULT, "int8: 7-bit weights, for CPUs without VNNI (default false)."),
        "method": {"enum": ["minmax", "entropy", "percentile"],
                   "description": "int8-static: calibration method (default minmax)."},
        "calibration_samples": prop("integer", NO_DEFAULT, "int8-static: calibration windows used (default 32).",
                                    minimum=1),
        "block_size": {"enum": [32, 64, 128], "description": "int4: weights per scale (default 32)."},
        "symmetric": prop("boolean", NO_DEFAULT, "int4: zero point fixed at the midpoint (default true)."),
        "accuracy_level": prop(["integer", "null"], NO_DEFAULT, "int4: MatMulNBits accuracy_level, the minimum "
                                                                "input precision (4 = int8 compute; default unset "
                                                                "= fp32).", minimum=0, maximum=4),
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
    },
}


def option_problems(params: dict[str, Any]) -> list[tuple[tuple, str]]:
    """Options given for a scheme that does not take them: quantizing would ignore them silently."""
    scheme = params["scheme"]
    return [((key,), f"{key} applies to {', '.join(s for s in SCHEMES if key in OPTIONS[s])}, not {scheme}")
            for key in sorted(params) if key not in COMMON_KEYS and key not in OPTIONS[scheme]]


def check(params: dict[str, Any], ctx: CheckContext) -> list[tuple[tuple, str]]:
    return option_problems(params)


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


class _CalibrationWindows(CalibrationDataReader):
    """Prefill feeds (empty past, no padding) of the calibration token windows, one window per batch."""

    def __init__(self, io: sessions.DecoderIO, tokens, samples: int):
        self._feeds = (io.prefill(window) for window in sessions.windows(tokens[:samples], 1))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _int8_dynamic(source: Path, target: Path, opts: dict, excluded: list[str], ctx: StageContext) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=opts["per_channel"],
                     reduce_range=opts["reduce_range"], weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                     use_external_data_format=_large(source))
    return inspect.dynamic_records(onnx.load(str(target)))


def _int8_static(source: Path, target: Path, opts: dict, excluded: list[str], ctx: StageContext) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    tokens = ctx.data.calibration()
    if tokens is None or len(tokens) == 0:
        raise PassError("quantize: int8-static needs calibration windows (the recipe's data.calibration)")
    io = sessions.DecoderIO.of(sessions.session(source))
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    reader = _CalibrationWindows(io, tokens, opts["calibration_samples"])
    quantize_static(source, target, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                    per_channel=opts["per_channel"], reduce_range=opts["reduce_range"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                    calibrate_method=methods[opts["method"]], use_external_data_format=_large(source),
                    extra_options={"MatMulConstBOnly": True})
    records = inspect.dequantize_records(onnx.load(str(target)))
    records["calibration"] = {"method": opts["method"], "windows": min(len(tokens), opts["calibration_samples"]),
                              "tokens_per_window": int(tokens.shape[1])}
    return records


def _int4(source: Path, target: Path, opts: dict, excluded: list[str], ctx: StageContext) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=opts["block_size"],
                                     is_symmetric=opts["symmetric"], accuracy_level=opts["accuracy_level"],
                                     nodes_to_exclude=excluded, op_types_to_quantize=("MatMul",))
    quantizer.process()
    sessions.save_model(quantizer.model.model, target.parent)
    return inspect.nbits_records(quantizer.model.model)


def _fp16(source: Path, target: Path, opts: dict, excluded: list[str], ctx: StageContext) -> dict:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = list(dict.fromkeys(DEFAULT_OP_BLOCK_LIST + list(opts["keep_fp32_ops"])))
    converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=opts["keep_io_types"],
                                         op_block_list=blocked, node_block_list=excluded)
    sessions.save_model(converted, target.parent)
    return {"weights": {"dtype": "float16", "initializers": inspect.initializer_dtypes(converted)},
            "kept_fp32_ops": list(opts["keep_fp32_ops"]), "kept_fp32_nodes": len(excluded),
            "keep_io_types": opts["keep_io_types"]}


SCHEME_FUNCTIONS: dict[str, Callable[..., dict]] = {
    "int8-dynamic": _int8_dynamic, "int8-static": _int8_static, "int4": _int4, "fp16": _fp16,
}


class _DropHints(logging.Filter):
    """onnxruntime.quantization logs 'consider pre-processing' (an image-model shape-inference step) on the
    root logger every call; it does not apply to a decoder that fuse already optimized."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizers():
    """The int4 quantizer logs every node at INFO: hundreds of lines for a small model."""
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    root, hints, level = logging.getLogger(), _DropHints(), nbits.level
    nbits.setLevel(logging.WARNING)
    root.addFilter(hints)
    try:
        yield
    finally:
        nbits.setLevel(level)
        root.removeFilter(hints)


def _large(source: Path) -> bool:
    return sessions.file_bytes(source.parent) > sessions.EXTERNAL_DATA_BYTES


def fidelity(reference, candidate, tokens) -> dict[str, float]:
    """Mean KL(P_ref || P_q) and top-1 agreement over every position of every eval window."""
    io = sessions.DecoderIO.of(reference)
    kl_sum = agree = positions = worst = 0.0
    per_run = max(1, EVAL_ELEMENTS // (int(tokens.shape[1]) * io.vocab))
    for batch in sessions.windows(tokens, per_run):
        feeds = io.prefill(batch)
        ref = sessions.run(reference, feeds)["logits"].astype(np.float64)
        new = sessions.run(candidate, feeds)["logits"].astype(np.float64)
        log_p, log_q = log_softmax(ref), log_softmax(new)
        kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
        kl_sum, worst = kl_sum + float(kl.sum()), max(worst, float(kl.max()))
        agree += float((ref.argmax(-1) == new.argmax(-1)).sum())
        positions += kl.size
    return {"kl_mean": kl_sum / positions, "kl_max": worst, "top1_agreement": agree / positions,
            "positions": int(positions)}


def _evaluate(params: dict[str, Any], source: Path, target: Path, ctx: StageContext) -> dict[str, Any]:
    tokens = ctx.data.eval()
    if tokens is None or len(tokens) == 0:
        raise PassError("quantize: scoring the quantized graph needs eval windows (the recipe's data.eval)")
    candidate = sessions.session(target)
    if not sessions.logits_to_keep_works(candidate):
        raise PassError("quantize: the quantized graph no longer honours logits_to_keep")
    scores = fidelity(sessions.session(source), candidate, tokens)
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
    params, source = ctx.params, ctx.input_dir / "model.onnx"
    if not source.exists():
        raise PassError(f"quantize: {source} does not exist; quantize consumes an exported ONNX variant")
    opts = _options(params)
    base = artifact.read_artifact(ctx.input_dir)
    source_proto = onnx.load(str(source))
    excluded = resolve_exclude(source_proto, params["exclude"])
    weight_bytes_before = inspect.matmul_weight_bytes(source_proto)
    del source_proto
    target = ctx.output_dir / "model.onnx"
    with ctx.progress(f"quantizing ({params['scheme']})", total=None):
        with _quiet_quantizers():
            records = SCHEME_FUNCTIONS[params["scheme"]](source, target, opts, excluded, ctx)
    with ctx.progress("scoring against the input graph", total=None):
        scores = _evaluate(params, source, target, ctx)
    artifact.copy_support_files(ctx.input_dir, ctx.output_dir)
    artifact.write_artifact_json(ctx.output_dir, base=base)
    quantized = onnx.load(str(target))
    return {
        "scheme": params["scheme"], "options": opts, "excluded_nodes": excluded, "quantization": records,
        "matmul_weight_bytes": {"before": weight_bytes_before, "after": inspect.matmul_weight_bytes(quantized)},
        "file_bytes": {"before": sessions.file_bytes(ctx.input_dir), "after": sessions.file_bytes(ctx.output_dir)},
        "ops": _quant_ops(quantized), **scores,
    }


def _quant_ops(proto: onnx.ModelProto) -> dict[str, int]:
    wanted = {"DynamicQuantizeLinear", "MatMulInteger", "QuantizeLinear", "DequantizeLinear", "MatMulNBits",
              "Cast", "DynamicQuantizeMatMul"}
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
    summary="Quantize with onnxruntime's tools (int8 dynamic / static QDQ, int4 MatMulNBits, fp16) and score "
            "KL and top-1 agreement against the input graph on eval windows.",
    uses_data=("calibration", "eval"),
    check=check,
)
