"""Search spaces: the `{search: ...}` values of a recipe's passes, the trials they make, and the concrete pass
entries a set of trials expands to.

A trial is one variant: a variant-producing pass (a leaf, or `emit: true`) and a value for every searched
parameter on its path from the source (its own and its ancestors'). Parameters on other branches do not
multiply it: a quantize searched on one branch and a prune searched on another make their choices' sum of
trials, not their product. Expanding trials gives each searched stage one concrete stage per distinct
assignment of the dimensions it depends on, so a stage no search reaches (a fuse every quantize trial
starts from) stays one stage, built and cached once.

Concrete ids are readable and stable: `q.scheme=int4`, `q4.block_size=32`, and an ancestor's dimension
prefixed with its stage: `q4.pruned.amount=0.2,block_size=32`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable

from recipec.plan.stages import SOURCE
from recipec.recipe.search_schema import SEARCH


def is_search(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {SEARCH}


@dataclass(frozen=True)
class Dim:
    owner: str  # the pass id whose parameter this is
    param: str
    path: tuple  # field path of the search value, for messages
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def name(self) -> str:
        return f"{self.owner}.{self.param}"

    def grid(self) -> list[Any] | None:
        """Every value grid search takes: the choices, or low, low + step, ... up to high; None for a range
        without a step (grid cannot enumerate it)."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            return None
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [self.value(self.low + i * self.step) for i in range(count)]

    def value(self, x: float) -> Any:
        """A range value as the parameter takes it, rounded to the step's decimals so labels stay short."""
        if self.integer:
            return int(round(x))
        digits = max(0, -int(math.floor(math.log10(self.step)))) + 2 if self.step else 6
        return round(float(x), digits)

    def probe(self) -> list[Any]:
        """Values that validation checks the passes with: every choice, or a range's ends."""
        return list(self.choices) if self.choices is not None else [self.value(self.low), self.value(self.high)]


@dataclass(frozen=True)
class Trial:
    template: str  # the variant-producing pass id
    assignment: tuple[tuple[str, Any], ...]  # (dim name, value), in declaration order

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.assignment)


def find_dims(entries: list[dict[str, Any]], param_schemas: dict[str, dict[str, Any]]) -> list[Dim]:
    dims = []
    for i, entry in enumerate(entries):
        properties = param_schemas.get(entry["op"], {}).get("properties", {})
        for param, value in entry.get("with", {}).items():
            if is_search(value):
                kind = properties.get(param, {}).get("type")
                dims.append(_dim(entry["id"], param, ("passes", i, "with", param, SEARCH), value[SEARCH], kind))
    return dims


def _dim(owner: str, param: str, path: tuple, spec: Any, kind: Any) -> Dim:
    if isinstance(spec, list):
        return Dim(owner, param, path, choices=tuple(spec))
    return Dim(owner, param, path, low=spec["low"], high=spec["high"], step=spec.get("step"),
               log=bool(spec.get("log")), integer=kind == "integer")


def parents_of(entries: list[dict[str, Any]]) -> dict[str, list[str]]:
    """pass id -> its parent ids as the recipe declares them (`after`, else the previous entry)."""
    out = {}
    for i, entry in enumerate(entries):
        after = entry.get("after", entries[i - 1]["id"] if i else SOURCE)
        out[entry["id"]] = [after] if isinstance(after, str) else list(dict.fromkeys(after))
    return out


def ancestors(entry_id: str, parents: dict[str, list[str]]) -> list[str]:
    """entry_id and every pass it builds on, in no particular order (unknown ids are skipped: the planner
    reports them)."""
    seen, todo = [], [entry_id]
    while todo:
        current = todo.pop()
        if current in seen or current not in parents:
            continue
        seen.append(current)
        todo.extend(parents[current])
    return seen


def variant_templates(entries: list[dict[str, Any]]) -> list[str]:
    """Pass ids that make a variant: leaves (nothing takes them as input) and `emit: true` passes."""
    parents = parents_of(entries)
    inputs = {ps[0] for ps in parents.values() if ps}
    return [e["id"] for e in entries if e["id"] not in inputs or e.get("emit")]


def dims_of(entry_id: str, entries: list[dict[str, Any]], dims: list[Dim]) -> list[Dim]:
    """The dimensions a pass's output depends on: its own and its ancestors', in declaration order."""
    chain = set(ancestors(entry_id, parents_of(entries)))
    return [d for d in dims if d.owner in chain]


def grid_trials(entries: list[dict[str, Any]], dims: list[Dim]) -> list[Trial]:
    """Every trial of every searched variant template, templates in declaration order."""
    trials = []
    for template in variant_templates(entries):
        own = dims_of(template, entries, dims)
        if not own:
            continue
        values = [d.grid() or [] for d in own]
        for combo in itertools.product(*values):
            trials.append(Trial(template, tuple((d.name, v) for d, v in zip(own, combo))))
    return trials


def probe_trials(entries: list[dict[str, Any]], dims: list[Dim]) -> list[Trial]:
    """Trials that put every value of every dimension through the passes' checks once (the other dimensions
    at their first value): what validation plans, whatever the strategy."""
    trials = []
    for template in variant_templates(entries):
        own = dims_of(template, entries, dims)
        for k, dim in enumerate(own):
            for value in dim.probe():
                trials.append(Trial(template, tuple((d.name, value if j == k else d.probe()[0])
                                                    for j, d in enumerate(own))))
    return list(dict.fromkeys(trials))


def concrete_id(entry_id: str, assignment: Iterable[tuple[str, Any]]) -> str:
    labels = []
    for name, value in assignment:
        owner, param = name.split(".", 1)
        labels.append(f"{param if owner == entry_id else name}={_label(value)}")
    return f"{entry_id}.{','.join(labels)}" if labels else entry_id


def _label(value: Any) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def expand(entries: list[dict[str, Any]], dims: list[Dim], trials: Iterable[Trial]) -> list[dict[str, Any]]:
    """The concrete pass entries of these trials: unsearched passes once, each searched pass once per distinct
    assignment of the dimensions it depends on, with `with` values filled in and `after` pointing at the
    concrete parents. A searched template with no trial here has no stage."""
    parents = parents_of(entries)
    depends = {e["id"]: dims_of(e["id"], entries, dims) for e in entries}
    out: dict[str, dict[str, Any]] = {}
    plain = [e for e in entries if not depends[e["id"]]]
    for entry in plain:
        out[entry["id"]] = {**entry, "after": parents[entry["id"]], "template": entry["id"]}
    for trial in trials:
        values = trial.params
        for entry in entries:
            if not depends[entry["id"]] or entry["id"] not in ancestors(trial.template, parents):
                continue
            concrete = _instantiate(entry, depends, values, parents)
            out.setdefault(concrete["id"], concrete)
    order = {e["id"]: i for i, e in enumerate(entries)}
    return sorted(out.values(), key=lambda e: order[e["template"]])  # stable: trials keep their order


def _instantiate(entry: dict[str, Any], depends: dict[str, list[Dim]], values: dict[str, Any],
                 parents: dict[str, list[str]]) -> dict[str, Any]:
    def cid(entry_id: str) -> str:
        if entry_id not in depends or not depends[entry_id]:
            return entry_id
        return concrete_id(entry_id, [(d.name, values[d.name]) for d in depends[entry_id]])

    params = {k: (values[f"{entry['id']}.{k}"] if is_search(v) else v) for k, v in entry.get("with", {}).items()}
    return {**entry, "id": cid(entry["id"]), "with": params, "after": [cid(p) for p in parents[entry["id"]]],
            "template": entry["id"]}


@dataclass
class SearchSpace:
    """A recipe's search: its dimensions, its `search:` block (defaults filled) and its pass entries."""
    dims: list[Dim]
    spec: dict[str, Any]
    entries: list[dict[str, Any]]

    @property
    def strategy(self) -> str:
        return self.spec["strategy"]

    def all_grid(self) -> list[Trial]:
        return grid_trials(self.entries, self.dims)

    def planned(self) -> list[Trial]:
        """The trials known before anything runs: grid's first max_trials; random and tpe choose as they go."""
        return self.all_grid()[:self.spec["max_trials"]] if self.strategy == "grid" else []

    def probes(self) -> list[Trial]:
        return probe_trials(self.entries, self.dims)

    def size(self) -> int | None:
        """How many distinct trials there are; None when a range has no step (a continuum)."""
        if any(d.grid() is None for d in self.dims):
            return None
        return len(self.all_grid())

    def templates(self) -> dict[str, list[Dim]]:
        """Searched variant templates -> the dimensions each depends on."""
        out = {t: dims_of(t, self.entries, self.dims) for t in variant_templates(self.entries)}
        return {t: ds for t, ds in out.items() if ds}

    def to_json(self, plan: Any) -> dict[str, Any]:
        import networkx as nx

        roots = {s.id for s in plan.stages if s.template and s.id != s.template}  # searched concrete stages
        searched = roots.union(*(nx.descendants(plan.graph, r) for r in roots))
        return {"strategy": self.strategy, "max_trials": self.spec["max_trials"], "space_size": self.size(),
                "dimensions": [{"name": d.name, "values": d.grid(), "range": None if d.choices is not None else
                                {"low": d.low, "high": d.high, "step": d.step, "log": d.log}} for d in self.dims],
                "planned_trials": [{"variant": concrete_id(t.template, t.assignment), "params": t.params}
                                   for t in plan.trials],
                "shared_stages": [s.id for s in plan.stages if s.id not in searched]}


def search_space(recipe: Any) -> SearchSpace | None:
    from recipec.passes import PASSES

    entries = recipe.resolved["passes"]
    dims = find_dims(entries, {op: spec.params for op, spec in PASSES.items()})
    spec = recipe.resolved.get("search")
    return SearchSpace(dims, spec, entries) if dims and spec else None


def search_problems(recipe: Any) -> list[Any]:
    """What the schema cannot say about a search: it needs both values and a block, grid needs steps, a
    range needs a numeric parameter and low <= high, the objective and constraints name report metrics."""
    from recipec.passes import PASSES
    from recipec.profile.gates import validate_gate_metric

    entries = recipe.resolved["passes"]
    dims = find_dims(entries, {op: spec.params for op, spec in PASSES.items()})
    spec = recipe.resolved.get("search")
    problems = []
    if dims and not spec:
        problems.append(recipe.problem(dims[0].path[:-1], "a `{search: ...}` value needs a top-level `search:` "
                                                          "block that names the objective"))
    if spec and not dims:
        problems.append(recipe.problem(("search",), "the search block has nothing to search: no pass parameter "
                                                    "is a `{search: ...}` value", at_key=True))
    problems += [p for d in dims for p in _range_problems(recipe, d, spec)]
    if spec:
        problems += _objective_problems(recipe, spec, validate_gate_metric)
    return problems


def _range_problems(recipe: Any, dim: Dim, spec: dict[str, Any] | None) -> list[Any]:
    if dim.choices is not None:
        return []
    out = []
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (dim.low, dim.high)):
        return [recipe.problem(dim.path, f"a range needs a numeric parameter; give {dim.param} a list of choices")]
    if dim.low > dim.high:
        out.append(recipe.problem(dim.path + ("low",), f"low {dim.low} is above high {dim.high}"))
    if dim.log and dim.low <= 0:
        out.append(recipe.problem(dim.path + ("log",), "a log range needs low > 0"))
    if spec and spec.get("strategy", "grid") == "grid" and dim.step is None:
        out.append(recipe.problem(dim.path, "grid search needs a `step` to enumerate a range "
                                            "(or use strategy random or tpe)"))
    return out


def _objective_problems(recipe: Any, spec: dict[str, Any], validate_metric) -> list[Any]:
    out = []
    objective = spec["objective"]
    direction = "minimize" if "minimize" in objective else "maximize"
    metric = objective[direction]
    if metric == "cost":
        if direction != "minimize":
            out.append(recipe.problem(("search", "objective", direction), "cost can only be minimized"))
        out += _cost_hardware_problems(recipe, objective.get("hardware"))
    else:
        reason = validate_metric(metric)
        if reason:
            out.append(recipe.problem(("search", "objective", direction), reason))
        if "hardware" in objective:
            out.append(recipe.problem(("search", "objective", "hardware"), "hardware applies to the cost objective"))
    for i, constraint in enumerate(spec["constraints"]):
        reason = validate_metric(constraint["metric"])
        if reason:
            out.append(recipe.problem(("search", "constraints", i, "metric"), reason))
    workload = recipe.resolved["serving"]["workload"]
    levels = workload["concurrency"] if isinstance(workload["concurrency"], list) else [workload["concurrency"]]
    if workload["arrival"] != "closed" or spec["concurrency"] not in levels:
        out.append(recipe.problem(("search", "concurrency"),
                                  f"the workload does not measure closed-loop concurrency {spec['concurrency']} "
                                  f"(it measures {workload['arrival']} arrival"
                                  + (f", concurrency {levels})" if workload["arrival"] == "closed" else ")")))
    return out


def _cost_hardware_problems(recipe: Any, name: str | None) -> list[Any]:
    from recipec.profile.projections import CPU_ROW, hardware_table

    cost = recipe.resolved["serving"].get("cost")
    try:
        rows = hardware_table(None, cost)
    except (KeyError, ValueError):  # a broken override is reported by the serving.cost check
        return []
    names = [r.name for r in rows] + [CPU_ROW]
    if name is not None and name not in names:
        return [recipe.problem(("search", "objective", "hardware"),
                               f"no hardware row {name!r} (rows: {', '.join(names)}; add one under serving.cost)")]
    return []
