"""`recipec schema [recipe|report]`: print a JSON Schema."""
from __future__ import annotations

from recipec.cli.common import EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("schema", help="print a JSON Schema")
    p.add_argument("which", choices=["recipe", "report"], nargs="?", default="recipe")
    p.set_defaults(handler=cmd_schema)


def cmd_schema(args) -> int:
    from recipec.recipe.schema import build_recipe_schema, report_schema, schema_json

    print(schema_json(build_recipe_schema() if args.which == "recipe" else report_schema()), end="")
    return EXIT_OK
