"""The `recipec` command.

Exit codes: 0 success; 1 the build ran but did not succeed (a gate failed — artifacts and report are
still written — or a stage failed); 2 invalid input (recipe, arguments, files); 130 interrupted.
User errors never print a traceback; `--debug` does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from . import __version__, console

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad arguments or files named on the command line (exit 2)."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_INVALID
    return run_guarded(lambda: args.handler(args), args.debug)


def run_guarded(command: Callable[[], int], debug: bool = False) -> int:
    """Run a command, turning every error into a message and an exit code (no traceback unless debug)."""
    from .errors import PassError
    from .recipe import RecipeInvalid

    try:
        return command()
    except RecipeInvalid as exc:
        _print_problems(exc)
        return EXIT_INVALID
    except UsageError as exc:
        console.error(str(exc))
        return EXIT_INVALID
    except PassError as exc:
        console.error(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.error("interrupted; finished stages stay cached and out/ is unchanged")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if debug:
            raise
        console.error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return EXIT_FAILED


def _print_problems(exc) -> None:
    for problem in exc.problems:
        console.error(problem.format(exc.file))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipec", description="Compile an LLM optimization recipe into ONNX artifacts.")
    parser.add_argument("--version", action="version", version=f"recipec {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("validate", help="check recipes (exit 0 valid, 2 invalid)")
    p.add_argument("recipes", nargs="+", type=Path)
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("plan", help="show the stages a build would run, their cache keys and variants")
    p.add_argument("recipe", type=Path)
    p.add_argument("--format", choices=["text", "json", "dot"], default="text")
    p.add_argument("--cache-dir", type=Path, help="stage cache (default $RECIPEC_CACHE or ~/.cache/recipec)")
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("build", help="run a recipe: artifacts and report under OUT/<name>/")
    p.add_argument("recipe", type=Path)
    p.add_argument("--out", type=Path, default=Path("out"), help="root under which <name>/ is written (default ./out)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides serving.device")
    p.add_argument("--no-profile", action="store_true", help="skip profiling and the report")
    p.add_argument("--force", action="store_true", help="rerun every stage, ignoring the cache")
    p.add_argument("--cache-dir", type=Path, help="stage cache (default $RECIPEC_CACHE or ~/.cache/recipec)")
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("run", help="generate text from a built variant")
    p.add_argument("build_dir", type=Path, help="out/<name>")
    p.add_argument("--variant", default="baseline")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("schema", help="print a JSON Schema")
    p.add_argument("which", choices=["recipe", "report"], nargs="?", default="recipe")
    p.set_defaults(handler=cmd_schema)

    from .build_report import add_report_commands
    from .deploy import add_deploy_commands
    from .diff import add_diff_commands
    from .serve import add_serve_commands

    for add in (add_report_commands, add_deploy_commands, add_serve_commands, add_diff_commands):
        add(sub)
    return parser


def _load(path: Path):
    from .recipe import load_recipe

    return load_recipe(path)


def cmd_validate(args) -> int:
    from .recipe import RecipeInvalid, load_recipe

    status = EXIT_OK
    for path in args.recipes:
        try:
            load_recipe(path)
        except RecipeInvalid as exc:
            _print_problems(exc)
            status = EXIT_INVALID
        else:
            print(f"{path}: valid")
    return status


def cmd_plan(args) -> int:
    from .cache import StageCache
    from .planner import build_plan

    plan = build_plan(_load(args.recipe))
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
    for warning in plan.warnings:
        console.warn(warning)


def cmd_build(args) -> int:
    from .executor import BuildOptions, build

    recipe = _load(args.recipe)
    console.say(f"building {recipe.name} from {args.recipe}")
    result = build(recipe, BuildOptions(out_root=args.out, cache_root=args.cache_dir, device=args.device,
                                        force=args.force, profile=not args.no_profile))
    source = result.runs["source"].entry.meta["metrics"]
    if "eval_perplexity" in source:
        console.say(f"reference model: eval perplexity {source['eval_perplexity']:.2f} "
                    f"(vocabulary {source.get('vocab_size')} tokens)")
    console.say(f"wrote {result.out_dir}")
    for gate in result.failed_gates:
        console.error(f"gate failed: {gate['metric']} on {gate['variant']}: {gate.get('reason') or gate['value']}")
    return EXIT_OK if result.gates_passed else EXIT_FAILED


def cmd_run(args) -> int:
    from .generate import run_prompt

    return run_prompt(args)


def cmd_schema(args) -> int:
    from .schema import build_recipe_schema, report_schema, schema_json

    print(schema_json(build_recipe_schema() if args.which == "recipe" else report_schema()), end="")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
