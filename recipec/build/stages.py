"""Running a plan's stages in topological order, each through the content-addressed cache.

Before a stage runs, the memory the stage before it freed is handed back to the OS, and the stage is sized:
disk for what it writes, memory for what it holds (`memory_need`), refused with the numbers when the machine
cannot give it. Its peak resident set goes into its cache entry, so a cached stage still reports the peak of
the run that built it.
"""
from __future__ import annotations

import json
import math
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from recipec.build.cache import Entry, StageCache
from recipec.core import console
from recipec.core.diskspace import require_free, tree_bytes
from recipec.core.memory import peak_rss, release, require_memory, size
from recipec.errors import PassError
from recipec.onnx.sessions import file_bytes
from recipec.passes import PASSES, StageContext
from recipec.plan.stages import SOURCE, Plan, Stage
from recipec.source.data import RecipeData

# What a pass holds at its peak beyond what the process held before it, as a multiple of its input's weights:
# float32 bytes of a PyTorch input (the passes load it at float32), stored bytes of an ONNX input. Measured on
# the Qwen2.5-0.5B shape (1.84 GiB of float32 weights, tied), then rounded up: export 1.35x (the traced model and
# the verification session one after the other), fuse 2.6x (two onnxruntime sessions compare the fused graph with
# its input; each prepacks the tied head's Gemm, +0.5 GiB). Not measured at that size: quantize (set to the bound
# the issue sets for the whole build until its own measurement), prune, moe, distill (counted from what they hold:
# the model and its importance statistics or routed copies; distill: student, teacher, gradients, two AdamW
# moments).
MEMORY_FACTORS = {"export": 2.0, "fuse": 3.0, "quantize": 3.0, "prune": 2.5, "moe": 3.0, "distill": 6.0}
DEFAULT_MEMORY_FACTOR = 3.0


@dataclass
class StageRun:
    stage: Stage
    entry: Entry
    cached: bool
    seconds: float
    node: str | None = None  # where it ran: the hostname, or the Ray node id and hostname


def run_stage(plan: Plan, stage: Stage, runs: dict[str, StageRun], cache: StageCache, device: str, force: bool) -> StageRun:
    label = f"{stage.id} ({stage.op}{', implicit' if stage.implicit else ''})"
    with cache.lock(stage.key, on_wait=lambda: console.tagged("  waiting", "yellow", f"{label}: another build is running it")):
        entry = None if force else cache.lookup(stage.key)
        if entry is not None:
            console.tagged("  cached ", "green", f"{label}  {stage.key[:12]}")
            return StageRun(stage, entry, True, 0.0)
        require_free(cache.root, _stage_bytes_estimate(plan, stage, runs), f"stage {stage.id!r}")
        release()
        need = memory_need(stage, runs)
        console.tagged("  running", "cyan", label)
        work = cache.new_workdir(stage.key)
        started = time.perf_counter()
        try:
            with peak_rss() as peak:
                metrics = _apply(plan, stage, runs, work / "output", device)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        seconds = time.perf_counter() - started
        memory = {"peak_rss_mb": round(peak.mb, 1), "peak_rss_method": peak.method,
                  "memory_estimate_mb": None if need is None else round(need / 2**20, 1)}
        entry = cache.commit(stage.key, work, metrics, seconds, memory)
    peak_text = size(peak.mb * 2**20)
    console.tagged("  done   ", "green", f"{label} in {seconds:.1f} s, peak RSS {peak_text}{_headline(metrics)}")
    return StageRun(stage, entry, False, seconds)


def memory_need(stage: Stage, runs: dict[str, StageRun]) -> int | None:
    """The memory a pass stage will hold, refused (a PassError naming the stage, the need and what is
    available) when the machine cannot give it. The source stage sizes itself from the model's config
    (source.config.check_fits), before any weight is allocated; None for it here."""
    if stage.op == SOURCE:
        return None
    consumes = PASSES[stage.op].consumes
    weights = _weight_bytes(runs[stage.parents[0]].entry.output, consumes)
    factor = MEMORY_FACTORS.get(stage.op, DEFAULT_MEMORY_FACTOR)
    need = int(weights * factor)
    kind = "float32 weights" if consumes == "torch" else "weights"
    require_memory(stage.id, stage.op, need, f"{factor:g}x the {size(weights)} of {kind} of its input",
                   "stop other programs using memory, or build on a machine with more")
    return need


def _weight_bytes(directory: Path, consumes: str) -> int:
    if consumes == "onnx":
        return file_bytes(directory)
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:  # PyTorch pickles: no header to count elements in; a half-precision one doubles at float32
        return 2 * tree_bytes(directory)
    return 4 * sum(_safetensors_elements(shard) for shard in shards)


def _safetensors_elements(path: Path) -> int:
    """Elements of every tensor, from the file's JSON header (8-byte length, then the header): nothing is loaded."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__")


def _stage_bytes_estimate(plan: Plan, stage: Stage, runs: dict[str, StageRun]) -> int:
    if stage.op == SOURCE:
        from recipec.source.models import check_source_fits

        return check_source_fits(plan.recipe.resolved["model"], plan.recipe.base_dir)
    # no pass writes more than twice its input (an export of bf16 weights writes float32)
    return 2 * tree_bytes(runs[stage.parents[0]].entry.output)


def _apply(plan: Plan, stage: Stage, runs: dict[str, StageRun], output: Path, device: str) -> dict[str, Any]:
    recipe = plan.recipe
    if stage.op == SOURCE:
        from recipec.source.models import materialize

        return materialize(recipe.resolved["model"], recipe.base_dir, output, console.progress, console.say)
    upstream = nx.ancestors(plan.graph, stage.id)

    def stage_dir(stage_id: str) -> Path:
        if stage_id not in upstream:
            raise PassError(f"stage {stage.id!r} reads {stage_id!r}, which does not run before it")
        return runs[stage_id].entry.output

    ctx = StageContext(
        stage_id=stage.id, params=stage.params, input_dir=runs[stage.parents[0]].entry.output, output_dir=output,
        recipe=recipe.resolved, data=RecipeData(recipe.resolved["data"], runs[SOURCE].entry.output, recipe.base_dir),
        stage_dir=stage_dir, progress=console.progress, log=console.say, device=device)
    return PASSES[stage.op].apply(ctx) or {}


def _headline(metrics: dict[str, Any]) -> str:
    shown = [f"{k}={metrics[k]:.4g}" for k in ("eval_perplexity", "max_abs_diff", "kl_divergence") if
             isinstance(metrics.get(k), (int, float))]
    return f"  ({', '.join(shown)})" if shown else ""
