"""What a pass is: a typed parameter schema and an apply function, declared together.

A stage's input and output are directories:
- "torch": a transformers `save_pretrained` directory (config.json, model.safetensors, tokenizer files
  when the model has a tokenizer).
- "onnx": a variant directory (model.onnx, model.onnx.data when the weights are external,
  artifact.json, tokenizer files).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

from recipec.core.console import Progress
from recipec.errors import PassError  # noqa: F401 - re-exported: passes import it from here

if TYPE_CHECKING:  # a serving process imports this module and must not pay torch's 250 MB
    import torch

Kind = Literal["torch", "onnx"]


class Data(Protocol):
    def calibration(self) -> "torch.Tensor": ...  # int64 [samples, seq_len]

    def eval(self) -> "torch.Tensor": ...  # int64 [samples, seq_len]


@dataclass
class StageContext:
    stage_id: str
    params: dict[str, Any]  # validated against the pass's schema, defaults filled
    input_dir: Path  # the parent stage's output directory
    output_dir: Path  # an empty directory this stage fills; moved into the cache only on success
    recipe: dict[str, Any]  # the resolved recipe (defaults filled)
    data: Data
    stage_dir: Callable[[str], Path]  # output directory of an upstream stage by id ("source" = the loaded model)
    progress: Progress
    log: Callable[[str], None]
    device: str = "cpu"  # "cpu" or "cuda": where the stage may compute


@dataclass
class CheckContext:
    """What a pass's validation-time check may look at (no weights are loaded)."""

    stage_id: str
    model_config: Any  # the source model's transformers config; None where it cannot be read offline (hub)
    upstream: dict[str, str]  # every stage that runs before this one (its ancestors, "source" included) -> op
    produces: dict[str, Kind]  # the same stages -> what they write ("torch" or "onnx")
    data: dict[str, Any] = field(default_factory=dict)  # the recipe's data sections, defaults filled


Check = Callable[[dict[str, Any], CheckContext], list[tuple[tuple, str]]]  # -> [(path inside `with`, message)]


@dataclass(frozen=True)
class Pass:
    op: str
    consumes: Kind
    produces: Kind
    params: dict[str, Any]  # JSON Schema (Draft 2020-12) of the `with` mapping; "default" keywords are filled in
    apply: Callable[[StageContext], dict[str, Any]]  # returns JSON-serializable metrics for the manifest
    summary: str
    uses_data: tuple[str, ...] = field(default=())  # data sections ("calibration", "eval") that enter the cache key
    check: Check | None = None  # semantic checks of the parameters the schema cannot express, run by `validate`


def kv_cache_last(ctx: CheckContext, op: str) -> list[tuple[tuple, str]]:
    """quantize_kv makes the cache int8, which the graph passes' float-cache checks cannot feed: it goes last."""
    if "quantize_kv" in ctx.upstream.values():
        return [((), f"{op} runs after a quantize_kv stage; run quantize_kv last (quantize the weights first)")]
    return []
