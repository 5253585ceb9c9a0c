"""Cache keys: sha256 over a stage's parents' keys, its op and canonical parameters, the inputs it
reads (model spec and its files, data sections and their corpora) and the library versions."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from .cache import file_digest
from .data import corpus_spec
from .passes import PASSES
from .planner import SOURCE, Plan, canonical, sha256_text
from .versions import library_versions


def assign_keys(plan: Plan, versions: dict[str, str] | None = None) -> None:
    versions = versions or library_versions()
    recipe = plan.recipe
    for stage in plan.stages:
        if stage.op == SOURCE:
            material: dict[str, Any] = {"op": SOURCE, "model": source_material(recipe.resolved["model"], recipe.base_dir)}
        else:
            material = {
                "op": stage.op,
                "params": stage.params,
                "parents": [plan.stage(p).key for p in stage.parents],
                "data": {s: data_material(recipe.resolved["data"][s], recipe.base_dir) for s in PASSES[stage.op].uses_data},
            }
        material["versions"] = versions
        stage.key = sha256_text(canonical(material))


def source_material(model: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    material = dict(model)
    if model["source"] == "path":
        material["path"] = directory_fingerprint(str((base_dir / model["path"]).resolve()))
    if "pretrain" in model:
        from .corpus import corpus_fingerprint

        material["corpus"] = corpus_fingerprint(model["pretrain"]["corpus"], base_dir)
    return material


def data_material(spec: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    material = dict(spec)
    if spec["source"] == "text":
        from .corpus import corpus_fingerprint

        material["fingerprint"] = corpus_fingerprint(corpus_spec(spec), base_dir)
    elif spec["source"] == "jsonl":
        material["fingerprint"] = file_sha256(str((base_dir / spec["path"]).resolve()))
    return material


@lru_cache(maxsize=64)
def directory_fingerprint(path: str) -> str:
    """Content hash of a model directory (relative paths and bytes), so an edited checkpoint rebuilds."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        digest.update(file_sha256(str(file)).encode())
    return digest.hexdigest()


@lru_cache(maxsize=256)
def file_sha256(path: str) -> str:
    return file_digest(Path(path))
