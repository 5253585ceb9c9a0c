"""What every command shares: exit codes and the guard that turns any error into a message and an exit code."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

from recipec.core import console
from recipec.errors import EXIT_FAILED, EXIT_INVALID, RecipecError, UsageError

if TYPE_CHECKING:  # the engine loads numpy; every command starts by importing this module
    from recipec.runtime.engine import Policy
    from recipec.runtime.speculative import SpecConfig

EXIT_OK, EXIT_INTERRUPTED = 0, 130
__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_INVALID", "EXIT_INTERRUPTED", "run_guarded", "report_error"]


def run_guarded(command: Callable[[], int], debug: bool = False) -> int:
    """Run a command, turning every error into a message and an exit code (no traceback unless debug)."""
    try:
        return command()
    except RecipecError as exc:
        report_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        console.error("interrupted; finished stages stay cached and out/ is unchanged")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a traceback
        if debug:
            raise
        console.error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return EXIT_FAILED


def report_error(exc: RecipecError) -> None:
    for message in exc.messages():
        console.error(message)


def override_policy(base: Policy, args, command: str) -> Policy:
    """The recipe's batching policy with the command line's --policy/--max-batch-size/--max-wait-ms applied."""
    overrides = {"batching": args.policy, "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms}
    try:
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise UsageError(f"{command}: {exc}") from None


def speculation(args, serving: dict) -> "SpecConfig | None":
    """The recipe's serving.speculative with the command line's --speculative, --speculative-tokens and (recipec
    run) --draft applied; None for none."""
    from recipec.runtime.speculative import SpecConfig

    if args.speculative_tokens is not None and args.speculative_tokens < 1:
        raise UsageError("--speculative-tokens must be at least 1")
    section = dict(serving.get("speculative") or {})
    if args.speculative == "off" or not (section or args.speculative):
        return None
    if args.speculative and args.speculative != section.get("method"):
        # Another method: the recipe's draft (and its K, tuned for its method) does not carry over.
        section = {"method": args.speculative}
    draft = getattr(args, "draft", None)
    overrides = {"tokens": args.speculative_tokens, "draft": draft}
    section.update({key: value for key, value in overrides.items() if value is not None})
    if section["method"] == "draft" and not section.get("draft"):
        raise UsageError("speculative method draft needs the draft's variant: --draft VARIANT")
    if section["method"] == "ngram":
        if draft:
            console.warn("--draft is for --speculative draft; ngram lookup needs no draft model")
        section.pop("draft", None)
    try:
        return SpecConfig(**section)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
