"""The one table of passes: op name -> Pass. Each pass lives in its own file beside this one."""
from __future__ import annotations

from .base import Pass, PassError, StageContext
from . import export, fuse, quantize
from . import distill, moe, prune

PASSES: dict[str, Pass] = {p.op: p for p in (export.PASS, fuse.PASS, quantize.PASS, prune.PASS, distill.PASS, moe.PASS)}

TORCH_OPS = frozenset(op for op, p in PASSES.items() if p.consumes == "torch" and p.produces == "torch")
ONNX_OPS = frozenset(op for op, p in PASSES.items() if p.consumes == "onnx")

__all__ = ["PASSES", "Pass", "PassError", "StageContext", "TORCH_OPS", "ONNX_OPS"]
