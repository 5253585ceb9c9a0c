"""The `recipec` command: one module per command beside this file, each with `register(subparsers)`.

Exit codes: 0 success; 1 the build ran but did not succeed (a gate failed — artifacts and report are
still written — or a stage failed); 2 invalid input (recipe, arguments, files); 130 interrupted.
User errors never print a traceback; `--debug` does.
"""
from __future__ import annotations

import argparse
import sys

from recipec import __version__
from recipec.cli import build, compare, deploy, diff, plan, profile, run, schema, serve, validate
from recipec.cli.common import EXIT_FAILED, EXIT_INVALID, EXIT_OK, run_guarded  # noqa: F401 - the exit codes, for callers of main()

# The order of `recipec --help`.
COMMANDS = (validate, plan, build, run, schema, profile, compare, deploy, serve, diff)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_INVALID
    return run_guarded(lambda: args.handler(args), args.debug)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipec", description="Compile an LLM optimization recipe into ONNX artifacts.")
    parser.add_argument("--version", action="version", version=f"recipec {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = parser.add_subparsers(metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser
