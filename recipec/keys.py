"""Cache keys: sha256 over a stage's parents' keys, its op and canonical parameters, the inputs it
reads (model spec and its files, data sections and their corpora), the library versions and the source of
the recipec code that runs it (an edited pass must not be served from the cache)."""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from .cache import file_digest, tree_digest
from .data import corpus_spec
from .passes import PASSES
from .planner import SOURCE, Plan, canonical, sha256_text
from .versions import library_versions


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
    for relative, file_hash in tree_digest(Path(path)).items():
        digest.update(relative.encode() + b"\0")
        digest.update(file_hash.encode())
    return digest.hexdigest()


@lru_cache(maxsize=256)
def file_sha256(path: str) -> str:
    return file_digest(Path(path))


# ---------------------------------------------------------------- the code a stage runs

PACKAGE_DIR = Path(__file__).resolve().parent
MODELS_MODULE = "recipec.models"  # what the source stage runs
# The pass table imports every pass to register it; following it would tie each pass's key to all others.
NOT_FOLLOWED = {"recipec.passes"}


@lru_cache(maxsize=None)
def code_digest(module: str) -> str:
    """sha256 over the source of `module` and of every recipec module it imports, directly or not (imports
    inside functions included): what a stage's output can depend on among recipec's own files."""
    digest = hashlib.sha256()
    for name in sorted(_closure(module)):
        path = _module_file(name)
        digest.update(f"{path.relative_to(PACKAGE_DIR.parent)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen or _module_file(name) is None:
            continue
        seen.add(name)
        if name not in NOT_FOLLOWED:
            todo += _imports(name)
    return seen


def _imports(module: str) -> list[str]:
    path = _module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names]  # `from . import x` names a module
    return [name for name in found if name == "recipec" or name.startswith("recipec.")]


def _module_file(module: str) -> Path | None:
    relative = Path(*module.split("."))
    for candidate in (PACKAGE_DIR.parent / relative.with_suffix(".py"), PACKAGE_DIR.parent / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None
