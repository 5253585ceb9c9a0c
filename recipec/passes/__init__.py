"""The one table of passes: op name -> Pass. Each pass is a module or package of its own under onnx/ (the
passes that write ONNX) or torch/ (those that rewrite a PyTorch model)."""
from __future__ import annotations

from recipec.passes.base import Pass, PassError, StageContext
from recipec.passes.onnx import export, fuse, phase_split, quantize, quantize_kv
from recipec.passes.torch import distill, moe, prune

PASSES: dict[str, Pass] = {p.op: p for p in (export.PASS, fuse.PASS, quantize.PASS, quantize_kv.PASS, phase_split.PASS,
                                            prune.PASS, distill.PASS, moe.PASS)}

TORCH_OPS = frozenset(op for op, p in PASSES.items() if p.consumes == "torch" and p.produces == "torch")
ONNX_OPS = frozenset(op for op, p in PASSES.items() if p.consumes == "onnx")

__all__ = ["PASSES", "Pass", "PassError", "StageContext", "TORCH_OPS", "ONNX_OPS"]
