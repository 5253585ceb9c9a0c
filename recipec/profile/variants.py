"""Profiling a set of variants into a report: quality against the source model (from the stage cache) on the
recipe's eval data, serving under the recipe's batching policy and workload (recipec.profile.profiler).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from recipec.core import console
from recipec.core.memory import release
from recipec.core.versions import library_versions

GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS, GREEDY_NEW_TOKENS = 4, 16, 16


def profile_variants(name: str, sha256: str, recipe_path: str, resolved: dict[str, Any], variants: dict[str, Path],
                     source_dir: Path | None, base_dir: Path, device: str, stages=None) -> dict[str, Any]:
    """The source model's logits are computed once for all variants, spooled to a scratch file, and the model is
    freed before the first serving process starts: while one runs, this process holds no model. Each variant's
    quality model is freed before the next one's serving process starts."""
    from recipec.profile.hardware import hardware_info
    from recipec.profile.profiler import profile_variant
    from recipec.profile.report import build_report

    console.say("profiling: measuring this machine's peak bandwidth and FLOP/s")
    hardware = hardware_info(device)
    measured = {}
    with tempfile.TemporaryDirectory(prefix="recipec-reference-") as scratch:
        eval_tokens, reference = _reference(resolved, source_dir, base_dir, Path(scratch) / "logits.f32")
        for variant, directory in variants.items():
            release()
            console.say(f"profiling {variant}")
            entry = profile_variant(directory, resolved["serving"], device, eval_tokens, reference["logits"],
                                    reference["greedy"], hardware=hardware, log=lambda s: console.say(f"  {s}"))
            entry["artifact"]["path"] = f"variants/{variant}"
            measured[variant] = entry
    return build_report({"name": name, "sha256": sha256, "path": recipe_path}, hardware, measured, resolved["gates"],
                        stages=stages, environment=library_versions())


def _reference(resolved: dict[str, Any], source_dir: Path | None, base_dir: Path, spool: Path):
    """(eval tokens, the source model's reference) or (None, nothing) without a source model."""
    if source_dir is None:
        return None, {"logits": None, "greedy": None}
    from recipec.profile.quality import source_reference
    from recipec.source.data import RecipeData

    eval_tokens = RecipeData(resolved["data"], source_dir, base_dir).eval().numpy()
    prompts = [row[:GREEDY_PROMPT_TOKENS].tolist() for row in eval_tokens[:GREEDY_PROMPTS]]
    console.say("profiling: source model logits on the eval data")
    return eval_tokens, source_reference(source_dir, eval_tokens, prompts, n_new=GREEDY_NEW_TOKENS, spool=spool)
