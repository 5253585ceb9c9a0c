"""`recipec diff OLD.yaml NEW.yaml`: what a recipe change does to passes, cache keys and variants."""
from __future__ import annotations

import json
from pathlib import Path

from recipec.cli.common import EXIT_FAILED, EXIT_OK


def register(sub) -> None:
    p = sub.add_parser("diff", help="what changing a recipe does: passes, cache keys, affected variants")
    p.add_argument("old", type=Path, help="the recipe before")
    p.add_argument("new", type=Path, help="the recipe after")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when a stage would rerun (for CI), else 0")
    p.set_defaults(handler=cmd_diff)


def cmd_diff(args) -> int:
    from recipec.plan.diff import diff_recipes
    from recipec.plan.diff_text import format_diff

    d = diff_recipes(args.old, args.new)
    print(json.dumps(d.to_json(), indent=2, default=str) + "\n" if args.format == "json" else format_diff(d), end="")
    return EXIT_FAILED if args.exit_code and d.rebuild else EXIT_OK
