"""`recipec plan RECIPE`: the stages a build would run, their cache keys, what is cached, the variants."""
from __future__ import annotations

import json
from pathlib import Path

from recipec.cli.common import EXIT_OK
from recipec.core import console


def register(sub) -> None:
    p = sub.add_parser("plan", help="show the stages a build would run, their cache keys and variants")
    p.add_argument("recipe", type=Path)
    p.add_argument("--format", choices=["text", "json", "dot"], default="text")
    p.add_argument("--cache-dir", help="stage cache: a directory or an fsspec URL (default $RECIPEC_CACHE or ~/.cache/recipec)")
    p.set_defaults(handler=cmd_plan)


def cmd_plan(args) -> int:
    from recipec.build.cache import StageCache
    from recipec.plan.planner import load_plan

    plan = load_plan(args.recipe)
    cache = StageCache(args.cache_dir, warn=console.warn)
    cached = {s.id: cache.contains(s.key) for s in plan.stages}
    if args.format == "json":
        print(json.dumps(plan.to_json(cached), indent=2))
    elif args.format == "dot":
        print(plan.to_dot(), end="")
    else:
        _print_plan(plan, cached)
    return EXIT_OK


def _print_plan(plan, cached: dict[str, bool]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan: {plan.recipe.name}")
    for column in ("#", "stage", "op", "after", "params", "key", "cached", "variant"):
        table.add_column(column)
    for i, stage in enumerate(plan.stages):
        table.add_row(str(i), stage.id + (" (implicit)" if stage.implicit else ""), stage.op, ", ".join(stage.parents),
                      json.dumps(stage.params, sort_keys=True), stage.key[:12], "yes" if cached[stage.id] else "no",
                      stage.variant or "")
    Console(width=200).print(table)
    if plan.search:
        _print_search(plan, cached)
    for warning in plan.warnings:
        console.warn(warning)


def _print_search(plan, cached: dict[str, bool]) -> None:
    summary = plan.search.to_json(plan)
    spec = plan.search.spec
    size = summary["space_size"]
    print(f"search: {spec['strategy']}, {size if size is not None else 'a continuous'} trial space, "
          f"at most {spec['max_trials']} trials" + (f" or {spec['max_minutes']} minutes" if spec.get("max_minutes") else ""))
    for dim in summary["dimensions"]:
        print(f"  {dim['name']}: {json.dumps(dim['values'] if dim['values'] is not None else dim['range'])}")
    shared = summary["shared_stages"]
    print(f"  shared by every trial, built once: {', '.join(shared)} "
          f"({sum(cached[s] for s in shared)} of {len(shared)} cached)")
    planned = summary["planned_trials"]
    if planned:
        print(f"  {len(planned)} trials planned" + (f" ({size - len(planned)} beyond max_trials not tried)"
                                                      if size and size > len(planned) else ""))
    else:
        print(f"  trials are chosen while the build runs ({spec['strategy']} sees earlier results)")
