"""Loading a recipe: safe YAML with positions, JSON Schema validation, defaults. Every problem is collected and
reported at once as `file:line:col: field: message`."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipec.errors import FieldPath, Problem, RecipeInvalid
from recipec.recipe import yamlpos
from recipec.core.defaults import fill_defaults
from recipec.recipe.explain import schema_problems
from recipec.recipe.schema import recipe_schema

@dataclass
class Recipe:
    file: Path
    sha256: str
    raw: dict[str, Any]
    resolved: dict[str, Any]  # the recipe with every default filled in
    located: yamlpos.Located = field(repr=False)

    @property
    def name(self) -> str:
        return self.resolved["name"]

    @property
    def base_dir(self) -> Path:
        return self.file.parent

    def problem(self, path: FieldPath, message: str, at_key: bool = False) -> Problem:
        return yamlpos.locate(self.located, path, message, at_key)


def load_recipe(path: str | Path) -> Recipe:
    """Parse a recipe file and validate it against the schema, defaults filled; raises RecipeInvalid listing
    every problem found. The checks beyond the schema (recipe.checks) and the plan's rules run in
    plan.planner.load_plan, which is what the commands call."""
    file = Path(path)
    shown = str(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise RecipeInvalid(shown, [Problem((), "no such file")]) from None
    except IsADirectoryError:
        raise RecipeInvalid(shown, [Problem((), "is a directory, not a recipe file")]) from None
    except OSError as exc:
        raise RecipeInvalid(shown, [Problem((), f"cannot read: {exc.strerror}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeInvalid(shown, [Problem((), f"not UTF-8 text (byte {exc.start})")]) from None
    try:
        located = yamlpos.load(text)
    except yamlpos.YamlProblem as exc:
        raise RecipeInvalid(shown, [Problem(exc.path, exc.message, exc.line, exc.col)]) from None
    if not isinstance(located.value, dict):
        kind = type(located.value).__name__ if located.value is not None else "null"
        raise RecipeInvalid(shown, [Problem((), f"a recipe is a YAML mapping, not a {kind}", 1, 1)])

    problems = schema_problems(located)
    if problems:
        raise RecipeInvalid(shown, problems)
    resolved = fill_defaults(recipe_schema(), copy.deepcopy(located.value))
    recipe = Recipe(file.resolve(), hashlib.sha256(data).hexdigest(), located.value, resolved, located)
    return recipe
