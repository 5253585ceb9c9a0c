"""Filling a recipe's defaults from its JSON Schema: the one defaults filler (recipe sections and pass
parameters alike)."""
from __future__ import annotations

import copy
from typing import Any

import jsonschema


def fill_defaults(schema: dict[str, Any], instance: Any, root: dict[str, Any] | None = None) -> Any:
    """Fill `default` values from the schema into a valid instance (properties, items, $ref, if/then)."""
    root = root or schema
    if "$ref" in schema:
        schema = _resolve_ref(root, schema["$ref"])
    if "anyOf" in schema:  # a searchable parameter: fill from the branch the value is (a plain value or a search)
        branch = next((b for b in schema["anyOf"]
                       if jsonschema.Draft202012Validator(b).is_valid(instance)), {})
        instance = fill_defaults(branch, instance, root)
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


