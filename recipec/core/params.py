"""The one helper for a JSON-Schema property of a pass's (or pretraining's) parameters, so that every
parameter is declared the same way: a type, a default when it has one, a description, then its bounds."""
from __future__ import annotations

from typing import Any

NO_DEFAULT = object()  # an option that only some settings use has no default: its absence means "not given"


def prop(kind: Any, default: Any, description: str, **keywords: Any) -> dict[str, Any]:
    """{"type": kind, "default": default, "description": ..., **keywords}; default NO_DEFAULT leaves it out."""
    schema: dict[str, Any] = {"type": kind}
    if default is not NO_DEFAULT:
        schema["default"] = default
    return {**schema, "description": description, **keywords}
