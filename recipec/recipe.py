"""Loading a recipe: safe YAML with positions, JSON Schema validation, defaults, and the checks a schema
cannot express. Every problem of a recipe is collected and reported at once as `file:line:col: field: message`.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import jsonschema

from . import yamlpos
from .schema import build_recipe_schema

FieldPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    path: FieldPath
    message: str
    line: int = 1
    col: int = 1

    def format(self, file: str) -> str:
        where = format_path(self.path)
        return f"{file}:{self.line}:{self.col}: {where + ': ' if where else ''}{self.message}"


class RecipeInvalid(Exception):
    def __init__(self, file: str, problems: list[Problem]):
        self.file, self.problems = file, problems
        super().__init__("\n".join(p.format(file) for p in problems))


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
        return locate(self.located, path, message, at_key)


def format_path(path: FieldPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def locate(located: yamlpos.Located, path: FieldPath, message: str, at_key: bool = False) -> Problem:
    """The position of `path`, or of its nearest ancestor present in the file (a missing key's parent)."""
    table = located.key_positions if at_key else located.positions
    for cut in range(len(path), -1, -1):
        prefix = path[:cut]
        if prefix in table:
            return Problem(path, message, *table[prefix])
        if prefix in located.positions:
            return Problem(path, message, *located.positions[prefix])
    return Problem(path, message)


@lru_cache(maxsize=1)
def recipe_schema() -> dict[str, Any]:
    schema = build_recipe_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def load_recipe(path: str | Path, check_semantics: bool = True) -> Recipe:
    """Parse and validate a recipe file; raises RecipeInvalid listing every problem found."""
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
    if check_semantics:
        from .planner import plan_problems

        problems = semantic_problems(recipe) + plan_problems(recipe)
        if problems:
            raise RecipeInvalid(shown, sorted(problems, key=lambda p: (p.line, p.col)))
    return recipe


# ---------------------------------------------------------------- schema errors

def schema_problems(located: yamlpos.Located) -> list[Problem]:
    validator = jsonschema.Draft202012Validator(recipe_schema())
    problems: dict[tuple, Problem] = {}
    for error in validator.iter_errors(located.value):
        for problem in _explain(error, located):
            problems.setdefault((problem.path, problem.message), problem)
    return sorted(problems.values(), key=lambda p: (p.line, p.col, p.message))


def _explain(error: jsonschema.ValidationError, located: yamlpos.Located) -> Iterable[Problem]:
    path = tuple(error.absolute_path)
    kind = error.validator
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        for key in sorted(set(error.instance) - set(allowed)):
            yield locate(located, path + (key,), f"unknown key {key!r}{_suggest(key, allowed)}", at_key=True)
        return
    if kind == "enum":
        choices = error.validator_value
        hint = _suggest(str(error.instance), [str(c) for c in choices]) if isinstance(error.instance, str) else ""
        what = "op" if path and path[-1] == "op" else "value"
        yield locate(located, path, f"unknown {what} {error.instance!r}{hint} (expected one of: {', '.join(map(str, choices))})")
        return
    if kind == "required":
        key = error.message.split(chr(39))[1]
        yield locate(located, path, f"missing required key {key!r}{_required_params_hint(error, key)}")
        return
    if kind in ("oneOf", "anyOf") and error.context:
        yield from _explain_alternatives(error, located)
        return
    if kind == "const":
        yield locate(located, path, f"must be {error.validator_value!r}, not {error.instance!r}")
        return
    yield locate(located, path, _short(error.message))


def _explain_alternatives(error: jsonschema.ValidationError, located: yamlpos.Located) -> Iterable[Problem]:
    path = tuple(error.absolute_path)
    if error.validator == "anyOf" and all(e.validator == "required" for e in error.context):
        keys = [e.message.split("'")[1] for e in error.context]
        yield locate(located, path, f"needs at least one of: {', '.join(keys)}")
        return
    if error.validator == "oneOf" and all(e.validator == "required" for e in error.context):
        keys = [e.message.split("'")[1] for e in error.context]
        yield locate(located, path, f"needs exactly one of: {', '.join(keys)}")
        return
    deepest = jsonschema.exceptions.best_match(error.context)
    if deepest is not None and deepest.validator not in ("type",):
        yield from _explain(deepest, located)
        return
    kinds = sorted({_describe(e.schema) for e in error.context})
    yield locate(located, path, f"{_shown(error.instance)} is not valid: expected {' or '.join(kinds)}")


def _describe(schema: dict[str, Any]) -> str:
    if "type" in schema:
        return f"{'an' if schema['type'][0] in 'aeiou' else 'a'} {schema['type']}"
    return "a valid value"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _short(message: str) -> str:
    return message if len(message) <= 200 else message[:197] + "..."


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------- defaults

def fill_defaults(schema: dict[str, Any], instance: Any, root: dict[str, Any] | None = None) -> Any:
    """Fill `default` values from the schema into a valid instance (properties, items, $ref, if/then)."""
    root = root or schema
    if "$ref" in schema:
        schema = _resolve_ref(root, schema["$ref"])
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                instance[key] = fill_defaults(sub, instance[key], root)
        for branch in schema.get("allOf", []):
            if "if" in branch and jsonschema.Draft202012Validator(branch["if"]).is_valid(instance):
                fill_defaults(branch.get("then", {}), instance, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        instance[:] = [fill_defaults(schema["items"], item, root) for item in instance]
    return instance


def _resolve_ref(root: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


# ---------------------------------------------------------------- semantic checks

def semantic_problems(recipe: Recipe) -> list[Problem]:
    return _model_problems(recipe) + _data_problems(recipe) + _gate_problems(recipe)


def _model_problems(recipe: Recipe) -> list[Problem]:
    model = recipe.resolved["model"]
    if model["source"] == "path":
        where = (recipe.base_dir / model["path"])
        if not where.is_dir():
            return [recipe.problem(("model", "path"), f"directory {str(where)!r} does not exist")]
        if not (where / "config.json").is_file():
            return [recipe.problem(("model", "path"), f"{str(where)!r} has no config.json: not a save_pretrained directory")]
    if model["source"] == "synthetic":
        return _family_problems(recipe, model)
    return []


def _family_problems(recipe: Recipe, model: dict[str, Any]) -> list[Problem]:
    from transformers import CONFIG_MAPPING

    family = model["family"]
    if family not in CONFIG_MAPPING:
        known = sorted(CONFIG_MAPPING.keys())
        return [recipe.problem(("model", "family"), f"unknown model family {family!r}{_suggest(family, known)}")]
    known_keys = set(CONFIG_MAPPING[family]().to_dict())
    problems = []
    for key in model.get("config", {}):
        if key not in known_keys:
            problems.append(recipe.problem(("model", "config", key),
                                           f"{family} configs have no key {key!r}{_suggest(key, sorted(known_keys))}",
                                           at_key=True))
    return problems or _config_problems(recipe, model)


def _config_problems(recipe: Recipe, model: dict[str, Any]) -> list[Problem]:
    """Values transformers refuses (a string size, zero heads) are found here, not in the build's first stage."""
    from .errors import PassError
    from .models import family_config

    try:
        family_config(model["family"], model.get("config", {}))
    except PassError as exc:
        return [recipe.problem(("model", "config"), str(exc))]
    return []


def _data_problems(recipe: Recipe) -> list[Problem]:
    from .data import corpus_spec

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
    from .corpus import file_counts
    from .errors import PassError

    try:
        file_counts(corpus, recipe.base_dir)
    except PassError as exc:
        return [recipe.problem(path, str(exc))]
    return []


def _required_params_hint(error: jsonschema.ValidationError, key: str) -> str:
    if key != "with" or not isinstance(error.instance, dict):
        return ""
    from .passes import PASSES

    spec = PASSES.get(error.instance.get("op"))
    needed = spec.params.get("required", []) if spec else []
    return f" (op {error.instance['op']} needs with: {{{', '.join(needed)}}})" if needed else ""


def _gate_problems(recipe: Recipe) -> list[Problem]:
    from .gates import validate_gate_metric

    problems = []
    for i, gate in enumerate(recipe.resolved["gates"]):
        message = validate_gate_metric(gate["metric"])
        if message:
            problems.append(recipe.problem(("gates", i, "metric"), message))
    return problems
