"""`recipec validate RECIPE...`: exit 0 when every recipe is valid, 2 with every problem of each."""
from __future__ import annotations

from pathlib import Path

from recipec.cli.common import EXIT_INVALID, EXIT_OK, report_error
from recipec.errors import RecipeInvalid


def register(sub) -> None:
    p = sub.add_parser("validate", help="check recipes (exit 0 valid, 2 invalid)")
    p.add_argument("recipes", nargs="+", type=Path)
    p.set_defaults(handler=cmd_validate)


def cmd_validate(args) -> int:
    from recipec.plan.planner import load_plan

    status = EXIT_OK
    for path in args.recipes:
        try:
            load_plan(path, with_keys=False)
        except RecipeInvalid as exc:
            report_error(exc)
            status = EXIT_INVALID
        else:
            print(f"{path}: valid")
    return status
