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
    """The report of these variants, each measured once (`VariantProfiler`)."""
    with VariantProfiler(resolved, source_dir, base_dir, device) as profiler:
        measured = {variant: profiler.measure(variant, directory) for variant, directory in variants.items()}
        return profiler.report({"name": name, "sha256": sha256, "path": recipe_path}, measured, stages)


class VariantProfiler:
    """Measures variants one at a time against one reference. The source model's logits are computed once,
    spooled to a scratch file, and the model is freed before the first serving process starts: while one runs,
    this process holds no model. Each variant's quality model is freed before its serving process starts."""

    def __init__(self, resolved: dict[str, Any], source_dir: Path | None, base_dir: Path, device: str):
        self.resolved, self.source_dir, self.base_dir, self.device = resolved, source_dir, base_dir, device
        self._scratch: tempfile.TemporaryDirectory | None = None
        self.models: dict[str, Any] = {}  # variant -> projections.VariantModel, read while its directory exists

    def __enter__(self) -> "VariantProfiler":
        from recipec.profile.hardware import hardware_info

        console.say("profiling: measuring this machine's peak bandwidth and FLOP/s")
        self.hardware = hardware_info(self.device)
        self._scratch = tempfile.TemporaryDirectory(prefix="recipec-reference-")
        self.eval_tokens, self.reference = _reference(self.resolved, self.source_dir, self.base_dir,
                                                      Path(self._scratch.name) / "logits.f32")
        return self

    def __exit__(self, *exc) -> bool:
        if self._scratch is not None:
            self._scratch.cleanup()
        return False

    def measure(self, variant: str, directory: Path, before_serving=None) -> dict[str, Any]:
        """The report's variants.<variant> entry. `before_serving(entry)` may return a reason not to serve
        it (a broken quality constraint): the entry then has no serving runs and says why under `pruned`."""
        from recipec.onnx.artifact import read_artifact
        from recipec.profile.profiler import profile_variant
        from recipec.profile.projections import variant_model

        self.models[variant] = variant_model(read_artifact(directory))
        release()
        console.say(f"profiling {variant}")
        entry = profile_variant(directory, self.resolved["serving"], self.device, self.eval_tokens,
                                self.reference["logits"], self.reference["greedy"], hardware=self.hardware,
                                log=lambda s: console.say(f"  {s}"), name=variant, before_serving=before_serving)
        entry["artifact"]["path"] = f"variants/{variant}"
        return entry

    def report(self, recipe: dict[str, Any], measured: dict[str, dict[str, Any]], stages=None,
               **sections: Any) -> dict[str, Any]:
        from recipec.profile.report import build_report

        sections.setdefault("projections", self.projections(measured))
        return build_report(recipe, self.hardware, measured, self.resolved["gates"], stages=stages,
                            environment=library_versions(), **sections)

    def projections(self, measured: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """PROJECTED rows (recipec.profile.projections) of the measured variants on other hardware."""
        from recipec.profile.projections import project_report

        models = {v: self.models[v] for v in measured if v in self.models}
        return project_report({"hardware": self.hardware, "variants": measured}, models,
                              self.resolved["serving"].get("cost"))


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
