"""A recipe diff as text for a reviewer: passes, stages that rerun and why, variants, other settings."""
from __future__ import annotations

import json
from typing import Any

from recipec.plan.diff import ABSENT, REPORT_ONLY, RecipeDiff

def format_diff(d: RecipeDiff) -> str:
    lines = [f"recipec diff {d.old} -> {d.new}", ""]
    lines += _passes_text(d) + _stages_text(d) + _variants_text(d) + _settings_text(d)
    return "\n".join(lines).rstrip() + "\n"


def _shown(value: Any) -> str:
    return value if value == ABSENT else json.dumps(value, sort_keys=True)


def _passes_text(d: RecipeDiff) -> list[str]:
    lines = [f"  + {i}" for i in d.added] + [f"  - {i}" for i in d.removed]
    lines += [f"  ~ {i} moved" for i in d.moved]
    for c in d.changed:
        if c.op:
            lines.append(f"  ~ {c.id}: op {c.op[0]} -> {c.op[1]}")
        if c.after:
            lines.append(f"  ~ {c.id}: after {', '.join(c.after[0])} -> {', '.join(c.after[1])}")
        lines += [f"  ~ {c.id}: {path} {_shown(a)} -> {_shown(b)}" for path, a, b in c.params]
    return ["passes:", *(lines or ["  (no change)"]), ""]


def _stages_text(d: RecipeDiff) -> list[str]:
    width = max((len(s.id) for s in d.stages), default=0)
    lines = [f"  {s.id:<{width}}  {s.status}: {s.reason}" for s in d.stages]
    lines = ["stages whose cache key changes (they rerun):", *(lines or ["  none: the build is fully cached"])]
    if d.cached:
        lines.append(f"  cached: {', '.join(d.cached)}")
    return lines + [""]


def _variants_text(d: RecipeDiff) -> list[str]:
    lines = [f"  {kind}: {', '.join(names)}" for kind, names in d.variants.items() if names]
    return ["variants:", *lines, ""]


def _settings_text(d: RecipeDiff) -> list[str]:
    if not d.settings:
        return []
    lines = []
    for path, a, b in d.settings:
        note = "  (report only)" if path.split(".")[0] in REPORT_ONLY else ""
        lines.append(f"  {path}: {_shown(a)} -> {_shown(b)}{note}")
    return ["other settings:", *lines, ""]
