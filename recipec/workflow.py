"""One build, end to end: run the plan's stages through the cache, stage out/<name>/ (variants, plan, manifest,
deploy files), profile the variants into the report, then swap the staged directory into place.

This is the orchestration layer: it calls down into build/, deploy/ and profile/, and nothing below calls it.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipec.build.cache import StageCache
from recipec.build.outdir import manifest, recover_interrupted, remove_path, staging_dir, swap_into_place
from recipec.build.stages import StageRun
from recipec.core import console
from recipec.core.builddir import VARIANTS
from recipec.core.diskspace import require_free, tree_bytes
from recipec.core.memory import release
from recipec.errors import UsageError
from recipec.onnx.sessions import resolve_device
from recipec.plan.stages import SOURCE, Plan


@dataclass
class BuildOptions:
    out_root: Path = Path("out")
    cache_root: Path | None = None
    device: str | None = None  # overrides serving.device
    force: bool = False
    profile: bool = True
    executor: str | None = None  # "local" (default) or "ray"; None reads RECIPEC_EXECUTOR
    ray_address: str | None = None  # None reads RAY_ADDRESS; neither: Ray starts a local instance


def open_executor(options: BuildOptions, cache: StageCache):
    """The executor the options ask for (else RECIPEC_EXECUTOR, else local), over this cache: a Ray cluster's
    workers open the same root (RAY_ADDRESS names the cluster when the options do not)."""
    from recipec.build.executor import EXECUTORS, LocalExecutor

    kind = options.executor or os.environ.get("RECIPEC_EXECUTOR") or "local"
    if kind not in EXECUTORS:
        raise UsageError(f"RECIPEC_EXECUTOR={kind!r}: choose one of {', '.join(EXECUTORS)}")
    if kind == "local":
        return LocalExecutor()
    from recipec.build.ray_tasks import RayExecutor

    return RayExecutor(options.ray_address or os.environ.get("RAY_ADDRESS"), cache.url or str(cache.root))


@dataclass
class BuildResult:
    out_dir: Path
    runs: dict[str, StageRun]
    report: dict[str, Any] | None = None  # None when the build was not profiled

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [g for g in self.report["gates"] if not g["passed"]] if self.report else []

    @property
    def gates_passed(self) -> bool:
        return self.report["gates_passed"] if self.report else True


def build(plan: Plan, options: BuildOptions) -> BuildResult:
    console.quiet_libraries()
    for warning in plan.warnings:
        console.warn(warning)
    recipe = plan.recipe
    device = resolve_device(options.device or recipe.resolved["serving"]["device"])
    cache = StageCache(options.cache_root, warn=console.warn)
    final = options.out_root / recipe.name
    recover_interrupted(final)
    executor = open_executor(options, cache)
    try:
        runs = executor.run(plan, cache, device, options.force).runs
        variant_bytes = sum(tree_bytes(runs[s].entry.output) for s in plan.variants.values())
        require_free(options.out_root, variant_bytes, f"out/{recipe.name}/")
        staging = staging_dir(options.out_root, recipe.name)
        try:
            report = assemble(plan, runs, staging, device, options.profile, serving=executor.server(plan, cache))
            swap_into_place(staging, final)
        finally:
            remove_path(staging)
    finally:
        executor.close()
    return BuildResult(final, runs, report)


def assemble(plan: Plan, runs: dict[str, StageRun], staging: Path, device: str, profile: bool,
             measured: dict[str, dict[str, Any]] | None = None, profiler: Any = None, serving: Any = None,
             **sections: Any) -> dict[str, Any] | None:
    """Fill the staging directory; returns the report (None without profiling). A searching build passes
    the variants it `measured` while it searched (and the profiler that measured them): they are not
    measured again."""
    from recipec.deploy.files import write_deploy_files

    for variant, stage_id in plan.variants.items():
        shutil.copytree(runs[stage_id].entry.output, staging / VARIANTS / variant)
    (staging / "plan.json").write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    build_manifest = manifest(plan, runs, device)
    (staging / "manifest.json").write_text(json.dumps(build_manifest, indent=2) + "\n")
    write_deploy_files(staging, build_manifest, device, warn=console.warn)
    if not profile:
        return None
    from recipec.profile.report import write_report

    if measured is not None:
        report = profiler.report(_recipe_info(plan), measured, _stage_rows(runs), **sections)
    else:
        release()  # what the last stage freed, before profiling loads the source model
        report = profile_build(plan, runs, staging, device, serving)
    write_report(staging, report)
    return report


def profile_build(plan: Plan, runs: dict[str, StageRun], staging: Path, device: str, serving: Any = None) -> dict[str, Any]:
    """The report of a build's variants, measured from the staged copies against the cached source model
    (a Ray `serving` reads each variant from the stage cache by its key on the node that measures it)."""
    from recipec.profile.variants import profile_variants

    recipe = plan.recipe
    return profile_variants(
        name=recipe.name, sha256=recipe.sha256, recipe_path=str(recipe.file), resolved=recipe.resolved,
        variants={v: (staging / VARIANTS / v, plan.stage(s).key) for v, s in plan.variants.items()},
        source_dir=runs[SOURCE].entry.output, base_dir=recipe.base_dir, device=device, stages=_stage_rows(runs),
        serving=serving)


def _recipe_info(plan: Plan) -> dict[str, str]:
    return {"name": plan.recipe.name, "sha256": plan.recipe.sha256, "path": str(plan.recipe.file)}


def _stage_rows(runs: dict[str, StageRun]) -> list[dict[str, Any]]:
    return [{"id": r.stage.id, "op": r.stage.op, "seconds": r.entry.meta["seconds"], "cached": r.cached,
             "peak_rss_mb": r.entry.meta.get("peak_rss_mb"), "node": r.node} for r in runs.values()]
