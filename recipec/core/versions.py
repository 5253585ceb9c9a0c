"""Versions of the libraries whose behaviour changes what a stage produces (they enter every cache key)."""
from __future__ import annotations

from functools import lru_cache
from importlib import metadata

from recipec import __version__

LIBRARIES = ("torch", "transformers", "tokenizers", "onnx", "onnxruntime", "onnxruntime-gpu",
             "onnxscript", "onnx-ir", "numpy", "safetensors")


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    found = {"recipec": __version__}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
