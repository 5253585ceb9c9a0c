"""Running a plan: stages in topological order through the cache, then out/<name>/ in one atomic step.

Everything of a build is first written to a staging directory beside out/<name>/ and swapped in only
when complete (renameat2 RENAME_EXCHANGE where the kernel has it), so a killed or failed build leaves
out/<name>/ as the previous complete build, or absent when there was none.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from . import console
from .cache import Entry, StageCache, process_alive
from .data import RecipeData
from .diskspace import require_free, tree_bytes
from .passes import PASSES, PassError, StageContext
from .planner import SOURCE, Plan, Stage, build_plan, canonical, sha256_text
from .recipe import Recipe
from .versions import library_versions


@dataclass
class BuildOptions:
    out_root: Path = Path("out")
    cache_root: Path | None = None
    device: str | None = None  # overrides serving.device
    force: bool = False
    profile: bool = True


@dataclass
class StageRun:
    stage: Stage
    entry: Entry
    cached: bool
    seconds: float


@dataclass
class BuildResult:
    out_dir: Path
    runs: dict[str, StageRun]
    gates_passed: bool = True
    report: dict[str, Any] | None = None
    failed_gates: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(requested: str) -> str:
    if requested == "cpu":
        return "cpu"
    import onnxruntime

    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if requested == "cuda" and not has_cuda:
        raise PassError("device cuda was asked for, but onnxruntime has no CUDAExecutionProvider "
                        "(install the gpu extra: see docs/gpu.md)")
    return "cuda" if has_cuda else "cpu"


def build(recipe: Recipe, options: BuildOptions) -> BuildResult:
    console.quiet_libraries()
    plan = build_plan(recipe)
    for warning in plan.warnings:
        console.warn(warning)
    device = resolve_device(options.device or recipe.resolved["serving"]["device"])
    cache = StageCache(options.cache_root, warn=console.warn)
    final = options.out_root / recipe.name
    recover_interrupted(final)
    runs = run_stages(plan, cache, device, options.force)
    variant_bytes = sum(tree_bytes(runs[s].entry.output) for s in plan.variants.values())
    require_free(options.out_root, variant_bytes, f"out/{recipe.name}/")
    staging = options.out_root / f".{recipe.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    staging.mkdir(parents=True)
    try:
        result = assemble(plan, runs, staging, device, options)
        swap_into_place(staging, final)
    finally:
        remove_path(staging)
    result.out_dir = final
    return result


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
        from .models import check_source_fits

        return check_source_fits(plan.recipe.resolved["model"], plan.recipe.base_dir)
    # no pass writes more than twice its input (an export of bf16 weights writes float32)
    return 2 * tree_bytes(runs[stage.parents[0]].entry.output)


def _apply(plan: Plan, stage: Stage, runs: dict[str, StageRun], output: Path, device: str) -> dict[str, Any]:
    recipe = plan.recipe
    if stage.op == SOURCE:
        from .models import materialize

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


# ---------------------------------------------------------------- out/<name>/

def assemble(plan: Plan, runs: dict[str, StageRun], staging: Path, device: str, options: BuildOptions) -> BuildResult:
    variants_dir = staging / "variants"
    for variant, stage_id in plan.variants.items():
        shutil.copytree(runs[stage_id].entry.output, variants_dir / variant)
    (staging / "plan.json").write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    (staging / "manifest.json").write_text(json.dumps(manifest(plan, runs, device), indent=2) + "\n")
    from .deploy import write_deploy_files

    write_deploy_files(staging, device, warn=console.warn)
    result = BuildResult(staging, runs)
    if options.profile:
        from .build_report import profile_build

        profile_build(plan, runs, staging, device, result)
    return result


def manifest(plan: Plan, runs: dict[str, StageRun], device: str) -> dict[str, Any]:
    recipe = plan.recipe
    return {
        "recipe": {"name": recipe.name, "file": str(recipe.file), "sha256": recipe.sha256, "resolved": recipe.resolved},
        "versions": library_versions(),
        "device": device,
        "stages": [
            {"id": r.stage.id, "op": r.stage.op, "params": r.stage.params, "after": r.stage.parents,
             "implicit": r.stage.implicit, "key": r.stage.key, "cached": r.cached,
             "seconds": r.entry.meta["seconds"], "output_sha256": sha256_text(canonical(r.entry.meta["files"])),
             "files": r.entry.meta["files"], "metrics": r.entry.meta["metrics"]}
            for r in runs.values()
        ],
        # a variant is a copy of its stage's cache entry, whose files the cache verified against these digests
        "variants": {v: {"stage": s, "files": runs[s].entry.meta["files"]} for v, s in plan.variants.items()},
        "warnings": plan.warnings,
    }


def swap_into_place(staging: Path, final: Path) -> None:
    """Make `staging` appear at `final` in one step; the previous build is deleted only afterwards."""
    for _ in range(3):  # a concurrent first build of the same recipe can create `final` between look and rename
        if final.exists() or final.is_symlink():
            _replace(staging, final)
            return
        try:
            os.rename(staging, final)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise PassError(f"{final} keeps changing under this build: is another build of the same recipe looping?")


def _replace(staging: Path, final: Path) -> None:
    if _exchange(staging, final):
        return  # staging now holds the previous build (or the symlink that stood there), which the caller removes
    previous = final.with_name(f".{final.name}.previous-{os.getpid()}")
    os.rename(final, previous)
    os.rename(staging, final)
    remove_path(previous)


def remove_path(path: Path) -> None:
    """Delete a directory tree, or a symlink itself (rmtree refuses symlinks, and we never follow them)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def recover_interrupted(final: Path) -> None:
    """Clean what killed builds left beside out/<name>/; bring back a previous build caught mid-swap."""
    if not final.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:staging-(\d+)-[0-9a-f]+|previous-(\d+))$")
    for leftover in sorted(final.parent.iterdir()):
        match = pattern.match(leftover.name)
        if not match or process_alive(int(match.group(1) or match.group(2))):
            continue
        if match.group(2) and not final.exists() and not leftover.is_symlink():
            os.rename(leftover, final)
        else:
            remove_path(leftover)
