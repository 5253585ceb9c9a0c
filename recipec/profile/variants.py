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
from recipec.errors import PassError

GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS, GREEDY_NEW_TOKENS = 4, 16, 16


def profile_variants(name: str, sha256: str, recipe_path: str, resolved: dict[str, Any],
                     variants: dict[str, Path | tuple[Path, str]], source_dir: Path | None, base_dir: Path,
                     device: str, stages=None, serving: Any = None) -> dict[str, Any]:
    """The report of these variants (variant -> directory, or (directory, stage key) for a `serving` that
    reads the variant from the stage cache on its own node), each measured once (`VariantProfiler`)."""
    items = {v: d if isinstance(d, tuple) else (d, "") for v, d in variants.items()}
    with VariantProfiler(resolved, source_dir, base_dir, device, serving) as profiler:
        measured = profiler.measure_many(items)
        return profiler.report({"name": name, "sha256": sha256, "path": recipe_path}, measured, stages)


class VariantProfiler:
    """Measures variants against one reference. The source model's logits are computed once, spooled to a
    scratch file, and the model is freed before the first serving process starts: while one runs, this process
    holds no model. Each variant's quality model is freed before its serving process starts.

    `serving`: where serving measurements run; None runs them here, one after another, in a process of their
    own (recipec.profile.profiler). The Ray executor passes an object with `submit(variant, stage_key, device,
    runs, threads, allowed)` and `result(handle)` that runs each on a node it holds whole, so several variants
    are measured at once on different nodes."""

    def __init__(self, resolved: dict[str, Any], source_dir: Path | None, base_dir: Path, device: str,
                 serving: Any = None):
        self.resolved, self.source_dir, self.base_dir, self.device = resolved, source_dir, base_dir, device
        self.serving = serving
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
        result = self.measure_many({variant: (directory, "")},
                                   (lambda name, entry: before_serving(entry)) if before_serving else None)
        return result[variant]

    def measure_many(self, variants: dict[str, tuple[Path, str]], before_serving=None,
                     keep_going: bool = False) -> dict[str, Any]:
        """variant -> (directory, stage key) measured: quality here, one by one, then serving (here, or
        submitted all at once to `serving` and gathered). With keep_going, a variant whose profile fails maps to
        its PassError instead of ending the build."""
        from recipec.profile.profiler import finish_serving, serve_isolated, serving_plan
        from recipec.profile.workload import prepare_runs

        spec = self.resolved["serving"]
        runs, threads = serving_plan(spec), int(spec.get("threads", 0))
        allowed = bool(spec.get("allow_cpu_fallback", False))
        out: dict[str, Any] = {}
        pending: dict[str, tuple[dict[str, Any], Any]] = {}
        for variant, (directory, key) in variants.items():
            try:
                # the prompts as this variant tokenizes them: a prompt too long for it fails before any run
                variant_runs = prepare_runs(runs, spec, Path(directory), self.base_dir, console.warn)
                entry = self._quality(variant, Path(directory))
                reason = before_serving(variant, entry) if before_serving else None
                if reason:
                    console.say(f"  {reason}")
                    out[variant] = {**entry, "pruned": reason}
                elif self.serving is None:
                    raw = serve_isolated(Path(directory), self.device, variant_runs, threads, _log, allowed)
                    out[variant] = finish_serving(entry, raw, Path(directory), spec, self.hardware, variant)
                else:
                    pending[variant] = (entry, self.serving.submit(variant, key, self.device, variant_runs, threads,
                                                                   allowed))
            except PassError as exc:
                if not keep_going:
                    raise
                out[variant] = exc
        for variant, (entry, handle) in pending.items():
            try:
                raw = self.serving.result(handle)
                out[variant] = finish_serving(entry, raw, Path(variants[variant][0]), spec, self.hardware, variant)
            except PassError as exc:
                if not keep_going:
                    raise
                out[variant] = exc
        return out

    def _quality(self, variant: str, directory: Path) -> dict[str, Any]:
        from recipec.onnx.artifact import read_artifact
        from recipec.profile.profiler import measure_quality
        from recipec.profile.projections import variant_model

        self.models[variant] = variant_model(read_artifact(directory))
        release()
        console.say(f"profiling {variant}")
        entry = measure_quality(directory, self.resolved["serving"], self.device, self.eval_tokens,
                                self.reference["logits"], self.reference["greedy"], self.hardware, _log)
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


def _log(text: str) -> None:
    console.say(f"  {text}")
