"""JSON Schema errors explained as recipe problems: the field, its position, and a suggestion for a typo."""
from __future__ import annotations

import difflib
from typing import Any, Iterable

import jsonschema

from recipec.errors import Problem
from recipec.recipe import yamlpos
from recipec.recipe.schema import recipe_schema
from recipec.recipe.search_schema import SEARCH
from recipec.recipe.yamlpos import locate


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
    deepest = jsonschema.exceptions.best_match(_meant_branch(error))
    if deepest is not None and deepest.validator not in ("type",):
        yield from _explain(deepest, located)
        return
    kinds = sorted({_describe(e.schema) for e in error.context})
    yield locate(located, path, f"{_shown(error.instance)} is not valid: expected {' or '.join(kinds)}")


def _meant_branch(error: jsonschema.ValidationError) -> list[jsonschema.ValidationError]:
    """A searchable parameter is its own schema or a `{search: ...}`: explain the one the value was meant as."""
    branches = error.validator_value if isinstance(error.validator_value, list) else []
    searchy = {i for i, b in enumerate(branches) if isinstance(b, dict) and SEARCH in b.get("properties", {})}
    if not searchy:
        return list(error.context)
    meant_search = isinstance(error.instance, dict) and SEARCH in error.instance
    return [e for e in error.context if (e.schema_path[0] in searchy) == meant_search] or list(error.context)


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


def _required_params_hint(error: jsonschema.ValidationError, key: str) -> str:
    if key != "with" or not isinstance(error.instance, dict):
        return ""
    from recipec.passes import PASSES

    spec = PASSES.get(error.instance.get("op"))
    needed = spec.params.get("required", []) if spec else []
    return f" (op {error.instance['op']} needs with: {{{', '.join(needed)}}})" if needed else ""
