"""The deployment files a build writes after its variants: genai_config.json where onnxruntime-genai can
run a variant, and the Triton repository."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from recipec.core import builddir
from recipec.deploy.genai import write_genai_config
from recipec.deploy.triton import write_triton_repo


def write_deploy_files(build_dir: Path | str, manifest: dict[str, Any], device: str | None = None,
                       warn: Callable[[str], None] = lambda message: None) -> Path:
    """Write them for every variant of `manifest` (the build's manifest.json) and return the repository.
    A variant Triton cannot express is left out with a warning: the build itself stands."""
    for variant in manifest.get("variants", {}):
        write_genai_config(builddir.variant_dir(build_dir, variant))
    return write_triton_repo(build_dir, manifest, device=device,
                             skip=lambda variant, reason: warn(f"no Triton model for {variant}: {reason}"))
