"""`recipec diff OLD.yaml NEW.yaml`: what a recipe change does to a build, for review.

Both recipes are planned (recipec.plan.planner.load_plan) with the same library versions, so the stage cache
keys compare: a stage whose key changes reruns, one whose key is unchanged comes from the cache, and a
variant is affected when the key of the stage that produces it changes. Beside the passes (added, removed,
moved, op, `after` and parameter changes) it lists the recipe's other settings that changed: model and
data change keys; serving and gates change only what the report measures and judges.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recipec.core.versions import library_versions
from recipec.plan.planner import load_plan
from recipec.plan.stages import Plan

# Sections whose changes reach no cache key: they decide what is measured and judged, not what is built.
REPORT_ONLY = ("serving", "gates", "description")


@dataclass
class PassChange:
    id: str
    op: tuple[str, str] | None = None
    after: tuple[list[str], list[str]] | None = None
    params: list[tuple[str, Any, Any]] = field(default_factory=list)


@dataclass
class StageChange:
    id: str
    status: str  # "changed", "added" or "removed"
    reason: str


@dataclass
class RecipeDiff:
    old: str
    new: str
    added: list[str]
    removed: list[str]
    moved: list[str]
    changed: list[PassChange]
    stages: list[StageChange]
    cached: list[str]
    variants: dict[str, list[str]]  # rebuilt, added, removed, unchanged
    settings: list[tuple[str, Any, Any]]

    @property
    def rebuild(self) -> bool:
        return any(s.status != "removed" for s in self.stages)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def diff_recipes(old_path: Path | str, new_path: Path | str, versions: dict[str, str] | None = None) -> RecipeDiff:
    """Compare two recipe files; raises RecipeInvalid when either is invalid."""
    versions = versions or library_versions()
    old, new = load_plan(old_path, versions=versions), load_plan(new_path, versions=versions)
    return diff_plans(old, new, str(old_path), str(new_path))


def diff_plans(old: Plan, new: Plan, old_name: str = "old", new_name: str = "new") -> RecipeDiff:
    old_passes, new_passes = _declared(old), _declared(new)
    common = [i for i in old_passes if i in new_passes]
    stages, cached = _stage_changes(old, new)
    return RecipeDiff(
        old=old_name, new=new_name,
        added=[i for i in new_passes if i not in old_passes],
        removed=[i for i in old_passes if i not in new_passes],
        moved=_moved(common, [i for i in new_passes if i in old_passes]),
        changed=[c for c in (_pass_change(i, old_passes[i], new_passes[i]) for i in common) if c],
        stages=stages, cached=cached, variants=_variant_changes(old, new),
        settings=_setting_changes(old.recipe.resolved, new.recipe.resolved))


def _declared(plan: Plan) -> dict[str, dict[str, Any]]:
    """The recipe's own passes in declaration order, with `after` as the planner resolved it."""
    return {s.id: {"op": s.op, "params": s.params, "after": _declared_after(plan, s)}
            for s in sorted((s for s in plan.stages if s.path), key=lambda s: s.path)}


def _declared_after(plan: Plan, stage) -> list[str]:
    # The planner rewires a PyTorch parent to the export it inserted; the recipe's author wrote the parent.
    return [plan.stage(p).parents[0] if plan.stage(p).implicit else p for p in stage.parents]


def _moved(old_order: list[str], new_order: list[str]) -> list[str]:
    """Passes outside the longest common subsequence of the two orders: the ones that moved."""
    matcher = difflib.SequenceMatcher(a=old_order, b=new_order, autojunk=False)
    kept = {old_order[block.a + k] for block in matcher.get_matching_blocks() for k in range(block.size)}
    return [i for i in new_order if i not in kept]


def _pass_change(stage_id: str, old: dict[str, Any], new: dict[str, Any]) -> PassChange | None:
    change = PassChange(stage_id)
    if old["op"] != new["op"]:
        change.op = (old["op"], new["op"])
    if old["after"] != new["after"]:
        change.after = (old["after"], new["after"])
    change.params = _value_changes(old["params"], new["params"])
    return change if (change.op or change.after or change.params) else None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


ABSENT = "(absent)"


def _value_changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    a, b = _flatten(old, prefix), _flatten(new, prefix)
    return [(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b)) if a.get(k, ABSENT) != b.get(k, ABSENT)]


def _stage_changes(old: Plan, new: Plan) -> tuple[list[StageChange], list[str]]:
    old_keys = {s.id: s.key for s in old.stages}
    changes, cached, changed_ids = [], [], set()
    for stage in new.stages:
        if old_keys.get(stage.id) == stage.key:
            cached.append(stage.id)
            continue
        status = "added" if stage.id not in old_keys else "changed"
        changes.append(StageChange(stage.id, status, _why(old, stage, changed_ids)))
        changed_ids.add(stage.id)
    new_ids = {s.id for s in new.stages}
    changes += [StageChange(s.id, "removed", "no longer in the plan") for s in old.stages if s.id not in new_ids]
    return changes, cached


def _why(old: Plan, stage, changed_ids: set[str]) -> str:
    if stage.id not in old.graph:
        return "new stage" + (f" (implicit {stage.op})" if stage.implicit else "")
    before = old.stage(stage.id)
    if stage.op == "source":
        return "the model or its pretraining changed"
    if before.op != stage.op:
        return f"op {before.op} -> {stage.op}"
    if before.params != stage.params:
        return "its parameters changed"
    upstream = [p for p in stage.parents if p in changed_ids]
    if upstream:
        return f"its input changed ({', '.join(upstream)})"
    if before.parents != stage.parents:
        return "its position in the graph changed"
    return "the data it reads changed"


def _variant_changes(old: Plan, new: Plan) -> dict[str, list[str]]:
    old_keys = {v: old.stage(s).key for v, s in old.variants.items()}
    new_keys = {v: new.stage(s).key for v, s in new.variants.items()}
    return {"rebuilt": [v for v in new_keys if v in old_keys and old_keys[v] != new_keys[v]],
            "added": [v for v in new_keys if v not in old_keys],
            "removed": [v for v in old_keys if v not in new_keys],
            "unchanged": [v for v in new_keys if old_keys.get(v) == new_keys[v]]}


def _setting_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    keys = sorted((set(old) | set(new)) - {"passes"})
    return [c for key in keys for c in _value_changes(old.get(key, ABSENT), new.get(key, ABSENT), key)]
