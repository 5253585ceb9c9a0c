"""The part of a cache key that covers recipec's own code: an edited pass must not be served from the cache."""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
MODELS_MODULE = "recipec.source.models"  # what the source stage runs
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
