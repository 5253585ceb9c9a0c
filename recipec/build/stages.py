"""Running a plan's stages in topological order, each through the content-addressed cache."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from recipec.build.cache import Entry, StageCache
from recipec.core import console
from recipec.core.diskspace import require_free, tree_bytes
from recipec.errors import PassError
from recipec.passes import PASSES, StageContext
from recipec.plan.stages import SOURCE, Plan, Stage
from recipec.source.data import RecipeData


@dataclass
class StageRun:
    stage: Stage
    entry: Entry
    cached: bool
    seconds: float


def run_stages(plan: Plan, cache: StageCache, device: str, force: bool) -> dict[str, StageRun]:
    runs: dict[str, StageRun] = {}
    for stage in plan.stages:
        runs[stage.id] = run_stage(plan, stage, runs, cache, device, force)
    return runs


def run_stage(plan: Plan, stage: Stage, runs: dict[str, StageRun], cache: StageCache, device: str, force: bool) -> StageRun:
    label = f"{stage.id} ({stage.op}{', implicit' if stage.implicit else ''})"
    with cache.lock(stage.key, on_wait=lambda: console.tagged("  waiting", "yellow", f"{label}: another build is running it")):
        entry = None if force else cache.lookup(stage.key)
        if entry is not None:
            console.tagged("  cached ", "green", f"{label}  {stage.key[:12]}")
            return StageRun(stage, entry, True, 0.0)
        require_free(cache.root, _stage_bytes_estimate(plan, stage, runs), f"stage {stage.id!r}")
        console.tagged("  running", "cyan", label)
        work = cache.new_workdir(stage.key)
        started = time.perf_counter()
        try:
            metrics = _apply(plan, stage, runs, work / "output", device)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        seconds = time.perf_counter() - started
        entry = cache.commit(stage.key, work, metrics, seconds)
    console.tagged("  done   ", "green", f"{label} in {seconds:.1f} s{_headline(metrics)}")
    return StageRun(stage, entry, False, seconds)


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
