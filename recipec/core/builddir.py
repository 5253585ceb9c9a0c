"""The one reader of a build directory (out/<name>/): its manifest.json and its variants/<variant>/.

Commands name a build directory on the command line, so anything missing from it is a BuildDirError
(a usage error, exit 2) whose message says what is missing. Kept free of heavy imports: `recipec run`,
`recipec serve` and `recipec deploy` all start here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from recipec.errors import BuildDirError

MANIFEST = "manifest.json"
VARIANTS = "variants"
# The graph every variant directory holds (recipec.onnx.artifact.MODEL_FILE, which core cannot import).
_GRAPH = "model.onnx"


def read_manifest(build_dir: Path | str) -> dict[str, Any]:
    path = Path(build_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BuildDirError(f"{build_dir} is not a recipec build directory (no {MANIFEST})") from None
    except ValueError as exc:  # not JSON, or not even UTF-8
        raise BuildDirError(f"{path} is not valid JSON ({exc}); rebuild") from None


def chosen_variants(manifest: dict[str, Any], wanted: Sequence[str] | None, build_dir: Path | str) -> list[str]:
    """The variants a command asked for (all the manifest lists when none), each checked to exist."""
    known = list(manifest.get("variants", {}))
    for name in wanted or []:
        if name not in known:
            raise BuildDirError(f"no variant {name!r} in {build_dir} (variants: {', '.join(known)})")
    return list(wanted) if wanted else known


def command_manifest(build_dir: Path | str, variants: Sequence[str] | None) -> dict[str, Any]:
    """The build's manifest, read once by a command that works on `variants` of it (all when None)."""
    manifest = read_manifest(build_dir)
    chosen_variants(manifest, variants, build_dir)
    return manifest


def variant_dir(build_dir: Path | str, variant: str) -> Path:
    """build_dir/variants/<variant>, which must hold a graph."""
    variants = Path(build_dir) / VARIANTS
    if not variants.is_dir():
        raise BuildDirError(f"{build_dir} is not a recipec build directory (no {VARIANTS}/)")
    target = variants / variant
    if not (target / _GRAPH).is_file():
        known = sorted(p.name for p in variants.iterdir() if (p / _GRAPH).is_file())
        raise BuildDirError(f"no variant {variant!r} in {build_dir} (variants: {', '.join(known)})")
    return target
