"""Cache keys: sha256 over a stage's parents' keys, its op and canonical parameters, the inputs it
reads (model spec and its files, data sections and their corpora), the library versions and the source of
the recipec code that runs it (an edited pass must not be served from the cache)."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from recipec.core.hashing import canonical, file_digest, sha256_text, tree_digest
from recipec.source.data import corpus_spec
from recipec.passes import PASSES
from recipec.plan.code_digest import MODELS_MODULE, code_digest
from recipec.plan.stages import SOURCE, Plan
from recipec.core.versions import library_versions


def assign_keys(plan: Plan, versions: dict[str, str] | None = None) -> None:
    versions = versions or library_versions()
    recipe = plan.recipe
    data: dict[str, dict[str, Any]] = {}  # a text section's fingerprint reads its whole corpus: once per plan

    def section(name: str) -> dict[str, Any]:
        if name not in data:
            data[name] = data_material(recipe.resolved["data"][name], recipe.base_dir)
        return data[name]

    for stage in plan.stages:
        if stage.op == SOURCE:
            material: dict[str, Any] = {"op": SOURCE, "model": source_material(recipe.resolved["model"], recipe.base_dir)}
        else:
            material = {
                "op": stage.op,
                "params": stage.params,
                "parents": [plan.stage(p).key for p in stage.parents],
                "data": {s: section(s) for s in PASSES[stage.op].uses_data},
            }
        material["versions"] = versions
        material["code"] = code_digest(MODELS_MODULE if stage.op == SOURCE else PASSES[stage.op].apply.__module__)
        stage.key = sha256_text(canonical(material))


def source_material(model: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    material = dict(model)
    if model["source"] == "path":
        material["path"] = directory_fingerprint(str((base_dir / model["path"]).resolve()))
    if "pretrain" in model:
        from recipec.source.corpus import corpus_fingerprint

        material["corpus"] = corpus_fingerprint(model["pretrain"]["corpus"], base_dir)
    return material


def data_material(spec: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    material = dict(spec)
    if spec["source"] == "text":
        from recipec.source.corpus import corpus_fingerprint

        material["fingerprint"] = corpus_fingerprint(corpus_spec(spec), base_dir)
    elif spec["source"] == "jsonl":
        material["fingerprint"] = file_sha256(str((base_dir / spec["path"]).resolve()))
    return material


@lru_cache(maxsize=64)
def directory_fingerprint(path: str) -> str:
    """Content hash of a model directory (relative paths and bytes), so an edited checkpoint rebuilds."""
    digest = hashlib.sha256()
    for relative, file_hash in tree_digest(Path(path)).items():
        digest.update(relative.encode() + b"\0")
        digest.update(file_hash.encode())
    return digest.hexdigest()


@lru_cache(maxsize=256)
def file_sha256(path: str) -> str:
    return file_digest(Path(path))
