"""Terminal output: one line per stage, and progress bars for the long ones (rich)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Protocol

from rich.console import Console
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as ProgressBar

console = Console(stderr=True, highlight=False)


class Progress(Protocol):
    """What a stage reports its progress through (`progress` below, or a test's stand-in)."""

    def __call__(self, description: str, total: int | None) -> ContextManager[Callable[..., None]]:
        """`with ctx.progress("training", total=steps) as advance: advance(1, loss=0.3)`."""


def say(message: str) -> None:
    """Plain text: messages carry user input (paths, ids, YAML keys) that must not be read as rich markup."""
    console.print(Text(message))


def tagged(tag: str, color: str, message: str) -> None:
    console.print(Text.assemble((tag, color), " ", message))


def warn(message: str) -> None:
    tagged("warning:", "yellow", message)


def error(message: str) -> None:
    console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yields advance(n=1, **fields): the fields (e.g. loss=0.31) are shown beside the bar."""
    if not console.is_terminal:
        yield _plain_advance(description, total)
        return
    columns = [TextColumn("  {task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}", markup=False)]
    with ProgressBar(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: object) -> None:
            bar.update(task, advance=n, info=_fields(fields))

        yield advance


def _plain_advance(description: str, total: int | None) -> Callable[..., None]:
    """Without a terminal (CI logs), print about ten progress lines instead of redrawing a bar."""
    state = {"done": 0, "next": 0}
    step = max(1, (total or 10) // 10)

    def advance(n: int = 1, **fields: object) -> None:
        state["done"] += n
        if state["done"] >= state["next"] or (total and state["done"] >= total):
            state["next"] = state["done"] + step
            of = f"/{total}" if total else ""
            print(f"  {description} {state['done']}{of} {_fields(fields)}", file=sys.stderr, flush=True)

    return advance


def _fields(fields: dict[str, object]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def quiet_libraries() -> None:
    """transformers' own progress bars and notices would interleave with the stage lines."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
