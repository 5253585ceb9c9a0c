"""The quantizers behind each scheme: onnxruntime's own tools, each reading the input graph from its path.

- int8-dynamic: onnxruntime.quantization.quantize_dynamic (DynamicQuantizeLinear + MatMulInteger);
- int8-static: quantize_static in QDQ format, calibrated on prefill windows;
- int4: MatMulNBitsQuantizer (block-wise weight-only, MatMulNBits);
- fp16: onnxruntime.transformers.float16.convert_float_to_float16.
Each tool loads the graph it is given from its path (the embedding table is already quantized there, so the
float table never enters these tools). At their peak MatMulNBitsQuantizer and the fp16 converter hold that
graph once plus what they write; quantize_static adds its calibration session; quantize_dynamic holds it
about three times (its load, the deep copy it saves for shape inference, the reload), 3.3x its input measured
on a 0.5B model. What each chose is read back off the written graph (`RECORDS`), whose external data is read
per tensor, never whole.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from recipec.onnx import inspect, sessions
from recipec.passes.base import PassError, StageContext

QUANTIZED_OPS = ("MatMul", "Gemm")


class _CalibrationWindows(CalibrationDataReader):
    """Prefill feeds (empty past, no padding) of the calibration token windows, one window per batch."""

    def __init__(self, io: sessions.DecoderIO, tokens, samples: int):
        self._feeds = (io.prefill(window) for window in sessions.windows(tokens[:samples], 1))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _large(source: Path) -> bool:
    return sessions.file_bytes(source.parent) > sessions.EXTERNAL_DATA_BYTES


def _share_data_file(target: Path) -> None:
    """onnxruntime's quantizers write model.onnx.data owner-only, as onnx does (sessions.save_model's note)."""
    if (target.parent / "model.onnx.data").exists():
        sessions.share_data_file_mode(target)


def int8_dynamic(source: Path, target: Path, opts: dict, excluded: list[str], ctx: StageContext,
                 io: sessions.DecoderIO) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=opts["per_channel"],
                     reduce_range=opts["reduce_range"], weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                     use_external_data_format=_large(source))
    _share_data_file(target)
    return {}


def int8_static(source: Path, target: Path, opts: dict, excluded: list[str], ctx: StageContext,
                 io: sessions.DecoderIO) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    tokens = ctx.data.calibration()
    if tokens is None or len(tokens) == 0:
        raise PassError("quantize: int8-static needs calibration windows (the recipe's data.calibration)")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    reader = _CalibrationWindows(io, tokens, opts["calibration_samples"])
    quantize_static(source, target, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                    per_channel=opts["per_channel"], reduce_range=opts["reduce_range"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                    calibrate_method=methods[opts["method"]], use_external_data_format=_large(source),
                    extra_options={"MatMulConstBOnly": True})
    _share_data_file(target)
    return {"calibration": {"method": opts["method"], "windows": min(len(tokens), opts["calibration_samples"]),
                            "tokens_per_window": int(tokens.shape[1])}}


def int4(source: Path, target: Path, opts: dict, excluded: list[str], ctx: StageContext,
                 io: sessions.DecoderIO) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(str(source), bits=4, block_size=opts["block_size"],
                                     is_symmetric=opts["symmetric"], accuracy_level=opts["accuracy_level"],
                                     nodes_to_exclude=excluded, op_types_to_quantize=("MatMul",))
    quantizer.process()
    sessions.save_model(quantizer.model.model, target.parent)
    return {}


def fp16(source: Path, target: Path, opts: dict, excluded: list[str], ctx: StageContext,
                 io: sessions.DecoderIO) -> dict:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    blocked = list(dict.fromkeys(DEFAULT_OP_BLOCK_LIST + list(opts["keep_fp32_ops"])))
    converted = convert_float_to_float16(_shape_inferred(source, target.parent), keep_io_types=opts["keep_io_types"],
                                         op_block_list=blocked, node_block_list=excluded, disable_shape_infer=True)
    sessions.save_model(converted, target.parent)
    return {"kept_fp32_ops": list(opts["keep_fp32_ops"]), "kept_fp32_nodes": len(excluded),
            "keep_io_types": opts["keep_io_types"]}


def _shape_inferred(source: Path, scratch_parent: Path) -> onnx.ModelProto:
    """The input graph with inferred value types, by path (in-memory inference stops at protobuf's 2 GiB),
    its weights read from the input directory: nothing is written beside the input."""
    with tempfile.TemporaryDirectory(dir=scratch_parent) as scratch:
        inferred = Path(scratch) / "inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(source), str(inferred))
        proto = onnx.load(str(inferred), load_external_data=False)
    onnx.external_data_helper.load_external_data_for_model(proto, str(source.parent))
    return proto


SCHEME_FUNCTIONS: dict[str, Callable[..., dict]] = {
    "int8-dynamic": int8_dynamic, "int8-static": int8_static, "int4": int4, "fp16": fp16,
}
RECORDS: dict[str, Callable[[inspect.Graph], dict[str, Any]]] = {
    "int8-dynamic": inspect.dynamic_records, "int8-static": inspect.dequantize_records, "int4": inspect.nbits_records,
    "fp16": lambda graph: {"weights": {"dtype": "float16", "initializers": inspect.initializer_dtypes(graph.proto)}},
}


class _DropHints(logging.Filter):
    """onnxruntime.quantization logs 'consider pre-processing' (an image-model shape-inference step) on the
    root logger every call; it does not apply to a decoder that fuse already optimized."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


@contextlib.contextmanager
def quiet_quantizers():
    """The int4 quantizer logs every node at INFO: hundreds of lines for a small model. quantize_static opens
    its calibration session with onnxruntime's default logger, which warns that the overridable
    logits_to_keep initializer is a graph input (recipec's own sessions log errors only, sessions.py)."""
    import onnxruntime

    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    root, hints, level = logging.getLogger(), _DropHints(), nbits.level
    nbits.setLevel(logging.WARNING)
    root.addFilter(hints)
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(2)  # onnxruntime's default (warnings); it has no getter
        nbits.setLevel(level)
        root.removeFilter(hints)
