"""out/<name>/: its manifest, and the atomic swap that puts a complete build in place.

Everything of a build is first written to a staging directory beside out/<name>/ and swapped in only
when complete (renameat2 RENAME_EXCHANGE where the kernel has it), so a killed or failed build leaves
out/<name>/ as the previous complete build, or absent when there was none.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

from recipec.build.cache import process_alive
from recipec.build.stages import StageRun
from recipec.core.hashing import canonical, sha256_text
from recipec.core.versions import library_versions
from recipec.errors import PassError
from recipec.plan.stages import Plan


def staging_dir(out_root: Path, name: str) -> Path:
    staging = out_root / f".{name}.staging-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    staging.mkdir(parents=True)
    return staging


def manifest(plan: Plan, runs: dict[str, StageRun], device: str) -> dict[str, Any]:
    recipe = plan.recipe
    return {
        "recipe": {"name": recipe.name, "file": str(recipe.file), "sha256": recipe.sha256, "resolved": recipe.resolved},
        "versions": library_versions(),
        "device": device,
        "stages": [
            {"id": r.stage.id, "op": r.stage.op, "params": r.stage.params, "after": r.stage.parents,
             "implicit": r.stage.implicit, "key": r.stage.key, "cached": r.cached, "node": r.node,
             "seconds": r.entry.meta["seconds"], "output_sha256": sha256_text(canonical(r.entry.meta["files"])),
             "files": r.entry.meta["files"], "metrics": r.entry.meta["metrics"], **stage_memory(r)}
            for r in runs.values()
        ],
        # a variant is a copy of its stage's cache entry, whose files the cache verified against these digests
        "variants": {v: {"stage": s, "files": runs[s].entry.meta["files"]} for v, s in plan.variants.items()},
        "warnings": plan.warnings,
    }


def stage_memory(run: StageRun) -> dict[str, Any]:
    """The peak resident set of the run that built the stage (a cached stage's comes from its cache entry;
    entries from before recipec recorded it have none), how it was measured, and what was estimated for it."""
    meta = run.entry.meta
    return {k: meta.get(k) for k in ("peak_rss_mb", "peak_rss_method", "memory_estimate_mb")}


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
