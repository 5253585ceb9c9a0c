"""What a plan is: its stages (op, parameters, parents, cache key, variant) in a networkx DiGraph, the one
source of their order."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from recipec.passes import PASSES
from recipec.recipe.loader import Recipe

SOURCE = "source"
BASELINE = "baseline"
RESERVED = {SOURCE, BASELINE}


@dataclass
class Stage:
    id: str
    op: str
    params: dict[str, Any]
    parents: list[str]  # the first is the input; the rest only order this stage
    implicit: bool = False
    variant: str | None = None  # set on output stages
    key: str = ""
    path: tuple = ()  # field path of the recipe entry, for messages
    template: str = ""  # the recipe pass this stage instantiates (its id, or a searched pass's id)
    emit: bool = False  # a variant even when later stages build on it

    @property
    def consumes(self) -> str:
        return "none" if self.op == SOURCE else PASSES[self.op].consumes

    @property
    def produces(self) -> str:
        return "torch" if self.op == SOURCE else PASSES[self.op].produces


@dataclass
class Plan:
    recipe: Recipe
    graph: nx.DiGraph
    order: list[str]
    warnings: list[str] = field(default_factory=list)
    search: Any = None  # plan.search.SearchSpace when the recipe searches
    trials: list[Any] = field(default_factory=list)  # the plan.search.Trial each searched variant is

    def stage(self, stage_id: str) -> Stage:
        return self.graph.nodes[stage_id]["stage"]

    @property
    def stages(self) -> list[Stage]:
        return [self.stage(s) for s in self.order]

    @property
    def variants(self) -> dict[str, str]:
        """variant name -> stage id, baseline first."""
        found = {s.variant: s.id for s in self.stages if s.variant}
        return {BASELINE: found.pop(BASELINE), **dict(sorted(found.items()))}

    def to_json(self, cached: dict[str, bool] | None = None) -> dict[str, Any]:
        return {
            "recipe": self.recipe.name,
            "stages": [
                {"id": s.id, "op": s.op, "params": s.params, "after": s.parents, "implicit": s.implicit,
                 "variant": s.variant, "key": s.key, **({"cached": cached[s.id]} if cached else {})}
                for s in self.stages
            ],
            "variants": self.variants,
            "warnings": self.warnings,
            **({"search": self.search.to_json(self)} if self.search else {}),
        }

    def to_dot(self) -> str:
        lines = [f'digraph "{self.recipe.name}" {{', "  rankdir=LR;"]
        for s in self.stages:
            shape = "doubleoctagon" if s.variant else ("box" if s.produces == "onnx" else "ellipse")
            style = ',style="dashed"' if s.implicit else ""
            label = f"{s.id}\\n{s.op}" + (f"\\n→ {s.variant}" if s.variant else "")
            lines.append(f'  "{s.id}" [label="{label}",shape={shape}{style}];')
        for a, b in self.graph.edges:
            lines.append(f'  "{a}" -> "{b}";')
        lines.append("}")
        return "\n".join(lines) + "\n"
