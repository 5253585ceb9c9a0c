"""The errors a user can act on, under one base that the CLI turns into a message and an exit code.

Kept free of heavy imports so that a serving process can use them without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass

FieldPath = tuple  # of str | int: a field's path inside a recipe, e.g. ("passes", 2, "with", "scheme")

EXIT_FAILED, EXIT_INVALID = 1, 2


class RecipecError(Exception):
    """Anything recipec reports to the user as a message, never as a traceback."""

    exit_code = EXIT_FAILED

    def messages(self) -> list[str]:
        return [str(self)]


class PassError(RecipecError):
    """A stage (or a step of a build) could not do its job for a reason the user can act on (exit 1)."""


class UsageError(RecipecError):
    """Bad arguments or files named on the command line (exit 2)."""

    exit_code = EXIT_INVALID


class BuildDirError(UsageError):
    """A path named as a build directory is not one, or lacks what the command needs."""


@dataclass(frozen=True)
class Problem:
    """One problem of a recipe, at the position of the field it concerns."""

    path: FieldPath
    message: str
    line: int = 1
    col: int = 1

    def format(self, file: str) -> str:
        where = format_path(self.path)
        return f"{file}:{self.line}:{self.col}: {where + ': ' if where else ''}{self.message}"


class RecipeInvalid(RecipecError):
    """A recipe broke one or more rules; every problem is listed, each with file:line:col (exit 2)."""

    exit_code = EXIT_INVALID

    def __init__(self, file: str, problems: list[Problem]):
        self.file, self.problems = file, problems
        super().__init__("\n".join(p.format(file) for p in problems))

    def messages(self) -> list[str]:
        return [p.format(self.file) for p in self.problems]


def format_path(path: FieldPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def one_line(exc: BaseException) -> str:
    """An exception from a library, as one line of a user-facing message (its type, its text unwrapped)."""
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())
