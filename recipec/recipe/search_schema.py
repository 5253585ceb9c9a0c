"""The recipe's search language in JSON Schema: `{search: [...]}` or `{search: {low, high, step}}` in place of
any pass parameter, `emit: true` on a pass, and the top-level `search:` block (strategy, budget, objective,
constraints).

A searched parameter is checked against that parameter's own schema, choice by choice (and a range's ends),
so a typo'd or out-of-range choice is a validation error at its own line and column.
"""
from __future__ import annotations

import copy
from typing import Any

SEARCH = "search"
STRATEGIES = ("grid", "random", "tpe")


def searchable(params: dict[str, Any]) -> dict[str, Any]:
    """A pass's `with` schema where every parameter may also be a search over values of its own schema."""
    out = copy.deepcopy(params)
    out["properties"] = {name: _either(sub) for name, sub in params.get("properties", {}).items()}
    return out


def _either(sub: dict[str, Any]) -> dict[str, Any]:
    """The parameter's schema, or a search over it. The default stays on the outside so that defaults fill."""
    plain = {k: v for k, v in sub.items() if k != "default"}
    either: dict[str, Any] = {"anyOf": [plain, search_value(plain)]}
    if "default" in sub:
        either["default"] = sub["default"]
    if "description" in sub:
        either["description"] = sub["description"]
    return either


def search_value(plain: dict[str, Any]) -> dict[str, Any]:
    bound = {k: v for k, v in plain.items() if k != "description"}
    return {
        "type": "object", "additionalProperties": False, "required": [SEARCH],
        "properties": {SEARCH: {"oneOf": [
            {"type": "array", "minItems": 1, "uniqueItems": True, "items": bound,
             "description": "the choices, each a valid value of the parameter"},
            {"type": "object", "additionalProperties": False, "required": ["low", "high"],
             "description": "a numeric range: grid takes low, low + step, ... <= high; random and tpe sample it",
             "properties": {"low": bound, "high": bound, "step": {"type": "number", "exclusiveMinimum": 0},
                            "log": {"type": "boolean", "default": False}}},
        ]}},
    }


def search_section(gate: dict[str, Any]) -> dict[str, Any]:
    constraint = copy.deepcopy(gate)
    constraint["properties"].pop("variant", None)
    return {
        "type": "object", "additionalProperties": False, "required": ["objective"],
        "description": "Search the `{search: ...}` values of the passes for the variant with the best objective "
                       "that meets every constraint.",
        "properties": {
            "strategy": {"enum": list(STRATEGIES), "default": "grid",
                         "description": "grid: every combination; random or tpe: Optuna's samplers, which see the "
                                        "measured results of earlier trials"},
            "max_trials": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 16},
            "max_minutes": {"type": "number", "exclusiveMinimum": 0,
                            "description": "no new trial starts after this many minutes"},
            "objective": {
                "type": "object", "additionalProperties": False, "minProperties": 1,
                "properties": {
                    "minimize": {"type": "string", "minLength": 1},
                    "maximize": {"type": "string", "minLength": 1},
                    "hardware": {"type": "string", "minLength": 1,
                                 "description": "minimize: cost — the hardware row whose $ per million output "
                                                "tokens is minimized (default H100 SXM 80GB)"},
                },
                "oneOf": [{"required": ["minimize"]}, {"required": ["maximize"]}],
                "description": "a report metric path (as gates take them) or `cost`",
            },
            "constraints": {"type": "array", "items": constraint, "default": []},
            "concurrency": {"type": "integer", "minimum": 1, "default": 1,
                            "description": "the closed-loop load level the objective and serving constraints are "
                                           "read at (the workload must measure it)"},
            "seed": {"type": "integer", "minimum": 0, "default": 0},
        },
    }


EMIT = {"type": "boolean", "default": False,
        "description": "make this stage a variant even when later stages build on it"}
