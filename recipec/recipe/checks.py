"""The checks of a recipe that its schema cannot express: the model, the data files, the gate metrics."""
from __future__ import annotations

from typing import Any

from recipec.errors import PassError, Problem
from recipec.recipe.loader import Recipe
from recipec.source.config import config_key_problems, family_config
from recipec.source.pretrain import pretrain_problems


def semantic_problems(recipe: Recipe) -> list[Problem]:
    from recipec.recipe.checks_workload import workload_problems

    return (_model_problems(recipe) + _data_problems(recipe) + _gate_problems(recipe) + _cost_problems(recipe)
            + workload_problems(recipe))


def _cost_problems(recipe: Recipe) -> list[Problem]:
    from recipec.profile.projections import override_problems

    cost = recipe.resolved["serving"].get("cost")
    if not cost:
        return []
    return [recipe.problem(("serving", "cost", "prices"), message) for message in override_problems(cost)]


def _model_problems(recipe: Recipe) -> list[Problem]:
    model = recipe.resolved["model"]
    if model["source"] == "path":
        where = (recipe.base_dir / model["path"])
        if not where.is_dir():
            return [recipe.problem(("model", "path"), f"directory {str(where)!r} does not exist")]
        if not (where / "config.json").is_file():
            return [recipe.problem(("model", "path"), f"{str(where)!r} has no config.json: not a save_pretrained directory")]
    if model["source"] == "synthetic":
        return _family_problems(recipe, model) or _pretrain_problems(recipe, model)
    return []


def _pretrain_problems(recipe: Recipe, model: dict[str, Any]) -> list[Problem]:
    if "pretrain" not in model:
        return []
    return [recipe.problem(("model", *where), message, at_key=where[0] == "config")
            for where, message in pretrain_problems(model["family"], model["config"], model["pretrain"])]


def _family_problems(recipe: Recipe, model: dict[str, Any]) -> list[Problem]:
    """Unknown families and keys are placed at their field; values transformers refuses (a string size, zero
    heads) are found here too, not in the build's first stage."""
    overrides = model.get("config", {})
    keyed = config_key_problems(model["family"], overrides)
    if keyed:
        return [recipe.problem(("model", "family"), message) if key is None else
                recipe.problem(("model", "config", key), message, at_key=True) for key, message in keyed]
    try:
        family_config(model["family"], overrides)
    except PassError as exc:
        return [recipe.problem(("model", "config"), str(exc))]
    return []


def _data_problems(recipe: Recipe) -> list[Problem]:
    from recipec.source.data import corpus_spec

    problems = []
    for section in ("calibration", "eval"):
        spec = recipe.resolved["data"][section]
        if spec["source"] == "jsonl":
            where = recipe.base_dir / spec["path"]
            if not where.is_file():  # a directory, a device or a FIFO would fail or hang when hashed
                problems.append(recipe.problem(("data", section, "path"), f"{spec['path']!r} is not a file"))
        elif spec["source"] == "text":
            field = "corpus" if "corpus" in spec else "path"
            problems += _corpus_problems(recipe, ("data", section, field), corpus_spec(spec))
    pretrain = recipe.resolved["model"].get("pretrain")
    if pretrain is not None:
        problems += _corpus_problems(recipe, ("model", "pretrain", "corpus"), pretrain["corpus"])
    return problems


def _corpus_problems(recipe: Recipe, path: tuple, corpus: Any) -> list[Problem]:
    from recipec.source.corpus import file_counts

    try:
        file_counts(corpus, recipe.base_dir)
    except PassError as exc:
        return [recipe.problem(path, str(exc))]
    return []


def _gate_problems(recipe: Recipe) -> list[Problem]:
    from recipec.profile.gates import validate_gate_metric

    problems = []
    for i, gate in enumerate(recipe.resolved["gates"]):
        message = validate_gate_metric(gate["metric"])
        if message:
            problems.append(recipe.problem(("gates", i, "metric"), message))
    return problems
