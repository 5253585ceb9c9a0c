"""The plan: a recipe becomes a networkx DiGraph of stages, the one source of their order.

Rules (each with its own error): pass ids are unique and not reserved; `after` names an existing stage;
the graph has no cycle; nothing that works on the PyTorch model follows an ONNX stage; an export is
inserted wherever a path goes from the PyTorch model to an ONNX stage; every leaf is an output variant;
`baseline` (the source model exported with default parameters) is always a variant.

`after` takes an id or a list of ids: the first is the stage's input, the others only order it
(for instance a distillation teacher) and enter its cache key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx

from recipec.errors import PassError, Problem, RecipeInvalid, one_line
from recipec.passes import PASSES
from recipec.passes.base import CheckContext
from recipec.plan.keys import assign_keys
from recipec.plan.search import Trial, expand, search_problems, search_space
from recipec.plan.stages import BASELINE, RESERVED, SOURCE, Plan, Stage
from recipec.recipe.checks import semantic_problems
from recipec.core.defaults import fill_defaults
from recipec.recipe.loader import Recipe, load_recipe
from recipec.source.config import family_config

QUANTIZE_BEFORE_FUSE = (
    "quantize before fuse fuses less and cannot be checked as tightly: QDQ pairs and fp16 casts hide attention "
    "from the fusion rules, quantized weights cannot be merged, and int8's per-tensor activation scales span "
    "padded rows that fused attention leaves unspecified; fuse first, then quantize"
)


def load_plan(path: str | Path, with_keys: bool = True, versions: dict[str, str] | None = None) -> Plan:
    """Load a recipe and plan it: every problem it has (schema, semantic checks, the plan's rules and the
    passes' own checks) is raised at once as RecipeInvalid. `recipec validate` plans without keys, which
    hash data files."""
    recipe = load_recipe(path)
    problems = semantic_problems(recipe) + search_problems(recipe)
    plan = None
    try:
        plan = build_plan(recipe, with_keys=False)
        if plan.search:  # every searched value goes through its pass's own check once
            build_plan(recipe, with_keys=False, trials=plan.search.probes())
    except RecipeInvalid as exc:
        problems += [p for p in exc.problems if p not in problems]
    if problems:
        raise RecipeInvalid(str(path), sorted(problems, key=lambda p: (p.line, p.col)))
    if with_keys:
        assign_keys(plan, versions)
    return plan


def build_plan(recipe: Recipe, versions: dict[str, str] | None = None, with_keys: bool = True,
               trials: list[Trial] | None = None) -> Plan:
    """Build and check the stage graph; raises RecipeInvalid with every rule that is broken. A searching
    recipe's passes are expanded for `trials` (default: the trials known before anything runs)."""
    space = search_space(recipe)
    entries = recipe.resolved["passes"]
    if space is not None:
        trials = space.planned() if trials is None else trials
        entries = expand(entries, space.dims, trials)
    stages, problems = _declared_stages(recipe, entries)
    if problems:
        raise RecipeInvalid(str(recipe.file), problems)
    graph = nx.DiGraph()
    for stage in stages:
        graph.add_node(stage.id, stage=stage)
        for parent in stage.parents:
            graph.add_edge(parent, stage.id)
    problems = _cycle_problems(recipe, graph) or _kind_problems(recipe, graph)
    if problems:
        raise RecipeInvalid(str(recipe.file), problems)
    _insert_exports(graph)
    order = list(nx.lexicographical_topological_sort(graph, key=_declaration_rank(graph)))
    plan = Plan(recipe, graph, order, _warnings(graph), search=space, trials=list(trials or []))
    _mark_variants(plan)
    problems = _gate_variant_problems(plan) + _draft_problems(plan) + _pass_check_problems(plan)
    if problems:
        raise RecipeInvalid(str(recipe.file), problems)
    if with_keys:
        assign_keys(plan, versions)
    return plan


def _declared_stages(recipe: Recipe, entries: list[dict[str, Any]]) -> tuple[list[Stage], list[Problem]]:
    problems: list[Problem] = []
    stages = [Stage(SOURCE, SOURCE, {}, [])]
    seen: dict[str, int] = {}
    index = {e["id"]: i for i, e in enumerate(recipe.resolved["passes"])}
    for j, entry in enumerate(entries):
        sid = entry["id"]
        i = index.get(entry.get("template", sid), j)
        if sid in RESERVED:
            problems.append(recipe.problem(("passes", i, "id"), f"{sid!r} is reserved (it names a built-in stage)"))
        elif sid in seen:
            problems.append(recipe.problem(("passes", i, "id"), f"duplicate id {sid!r} (first used by passes[{seen[sid]}])"))
        seen.setdefault(sid, i)
        previous = entries[j - 1]["id"] if j else SOURCE
        after = entry.get("after", previous)
        parents = [after] if isinstance(after, str) else list(dict.fromkeys(after))
        stages.append(Stage(sid, entry["op"], entry.get("with", {}), parents, path=("passes", i),
                            template=entry.get("template", sid), emit=bool(entry.get("emit"))))
    known = {SOURCE, *seen}
    for stage in stages[1:]:
        for j, parent in enumerate(stage.parents):
            if parent not in known:
                where = stage.path + ("after",) + ((j,) if isinstance(recipe.resolved["passes"][stage.path[1]].get("after"), list) else ())
                problems.append(recipe.problem(where, f"`after` names {parent!r}, which is no pass id (known: {', '.join(sorted(known))})"))
            elif parent == stage.id:
                problems.append(recipe.problem(stage.path + ("after",), f"{stage.id!r} cannot come after itself"))
    return ([] if problems else stages), problems


def _cycle_problems(recipe: Recipe, graph: nx.DiGraph) -> list[Problem]:
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return []
    names = [a for a, _ in cycle] + [cycle[0][0]]
    first = graph.nodes[cycle[0][1]]["stage"]
    return [recipe.problem(first.path + ("after",), f"the passes form a cycle: {' -> '.join(names)}")]


def _kind_problems(recipe: Recipe, graph: nx.DiGraph) -> list[Problem]:
    problems = []
    for sid in graph.nodes:
        stage: Stage = graph.nodes[sid]["stage"]
        if stage.consumes != "torch":
            continue
        onnx_before = [a for a in nx.ancestors(graph, sid) if graph.nodes[a]["stage"].produces == "onnx"]
        if onnx_before:
            culprit = sorted(onnx_before, key=lambda a: graph.nodes[a]["stage"].path)[-1]
            kind = graph.nodes[culprit]["stage"].op
            problems.append(recipe.problem(
                stage.path + ("op",),
                f"{stage.op!r} works on the PyTorch model but comes after {culprit!r} ({kind}), which is an ONNX stage; "
                "move it before the export or give it an explicit `after`"))
    return problems


def _insert_exports(graph: nx.DiGraph) -> None:
    """Put an export between every PyTorch-stage output and the ONNX stages that read it, and after PyTorch leaves."""
    default_params = fill_defaults(PASSES["export"].params, {})
    for sid in list(graph.nodes):
        stage: Stage = graph.nodes[sid]["stage"]
        if stage.produces != "torch":
            continue
        readers = [c for c in graph.successors(sid)
                   if graph.nodes[c]["stage"].consumes == "onnx" and graph.nodes[c]["stage"].parents[0] == sid]
        is_leaf = not any(graph.nodes[c]["stage"].parents[0] == sid for c in graph.successors(sid))
        if sid == SOURCE:
            _add_export(graph, SOURCE, BASELINE, default_params, readers)
        elif readers or is_leaf or stage.emit:
            _add_export(graph, sid, _free_id(graph, f"{sid}-export"), default_params, readers)


def _add_export(graph: nx.DiGraph, parent: str, export_id: str, params: dict, readers: list[str]) -> None:
    graph.add_node(export_id, stage=Stage(export_id, "export", dict(params), [parent], implicit=True))
    graph.add_edge(parent, export_id)
    for reader in readers:
        stage: Stage = graph.nodes[reader]["stage"]
        stage.parents[0] = export_id
        graph.remove_edge(parent, reader)
        graph.add_edge(export_id, reader)


def _free_id(graph: nx.DiGraph, wanted: str) -> str:
    candidate, n = wanted, 2
    while candidate in graph:
        candidate, n = f"{wanted}-{n}", n + 1
    return candidate


def _declaration_rank(graph: nx.DiGraph):
    rank = {sid: i for i, sid in enumerate(graph.nodes)}
    return lambda sid: f"{rank[sid]:06d}"


def _mark_variants(plan: Plan) -> None:
    graph = plan.graph
    for sid in plan.order:
        stage = plan.stage(sid)
        primary_children = [c for c in graph.successors(sid) if plan.stage(c).parents[0] == sid]
        if sid == BASELINE:
            stage.variant = BASELINE
        elif (not primary_children or _emitted(plan, stage)) and stage.produces == "onnx":
            # An implicit export names its variant after the PyTorch stage it exports.
            stage.variant = stage.parents[0] if stage.implicit else sid


def _emitted(plan: Plan, stage: Stage) -> bool:
    """An `emit: true` stage, or the export of an `emit: true` PyTorch stage."""
    return stage.emit or (stage.implicit and plan.stage(stage.parents[0]).emit)


def _warnings(graph: nx.DiGraph) -> list[str]:
    warnings = []
    for sid in graph.nodes:
        if graph.nodes[sid]["stage"].op != "fuse":
            continue
        quantized = sorted(a for a in nx.ancestors(graph, sid) if graph.nodes[a]["stage"].op == "quantize")
        for q in quantized:
            warnings.append(f"{q!r} -> {sid!r}: {QUANTIZE_BEFORE_FUSE}")
    return warnings


def _gate_variant_problems(plan: Plan) -> list[Problem]:
    variants = set(plan.variants)
    problems = []
    for i, gate in enumerate(plan.recipe.resolved["gates"]):
        name = gate.get("variant")
        if plan.search and name in plan.search.templates():
            problems.append(plan.recipe.problem(("gates", i, "variant"), f"{name!r} is searched: its trials are "
                                                "variants of their own; bound them with search.constraints"))
        elif name is not None and name not in variants:
            problems.append(plan.recipe.problem(("gates", i, "variant"),
                                                f"no variant {name!r} (variants: {', '.join(sorted(variants))})"))
    return problems


def _draft_problems(plan: Plan) -> list[Problem]:
    """A draft model for speculative decoding is a variant of the same build."""
    spec = plan.recipe.resolved["serving"].get("speculative") or {}
    draft = spec.get("draft")
    if spec.get("method") != "draft" or draft is None or draft in plan.variants:
        return []
    return [plan.recipe.problem(("serving", "speculative", "draft"),
                                f"no variant {draft!r} to draft with (variants: {', '.join(sorted(plan.variants))})")]


def _pass_check_problems(plan: Plan) -> list[Problem]:
    checked = [s for s in plan.stages if s.op in PASSES and PASSES[s.op].check and not s.implicit]
    if not checked:
        return []
    try:
        config = source_config(plan.recipe.resolved["model"], plan.recipe.base_dir)
    except PassError as exc:
        field = "config" if plan.recipe.resolved["model"]["source"] == "synthetic" else "path"
        return [plan.recipe.problem(("model", field), str(exc))]
    problems = []
    for stage in checked:
        upstream = {a: plan.stage(a).op for a in nx.ancestors(plan.graph, stage.id)}
        context = CheckContext(stage.id, config, upstream, {a: plan.stage(a).produces for a in upstream},
                               plan.recipe.resolved["data"])
        for where, message in PASSES[stage.op].check(stage.params, context):
            problems.append(plan.recipe.problem(stage.path + ("with", *where), message))
    return problems


def source_config(model: dict[str, Any], base_dir):
    """The source model's config without loading weights; None where it would need the network or would run
    the model's own code (validate and plan never run remote code: only the build does, after warning)."""
    from transformers import AutoConfig

    if model["source"] == "synthetic":
        return family_config(model["family"], model["config"])
    if model["source"] != "path" or model["trust_remote_code"]:
        return None
    try:
        return AutoConfig.from_pretrained(base_dir / model["path"])
    except Exception as exc:  # a broken config.json raises whatever its parser or transformers' checks raise
        raise PassError(f"cannot read {model['path']}/config.json: {one_line(exc)}") from None


__all__ = ["Plan", "Stage", "build_plan", "load_plan", "SOURCE", "BASELINE"]
