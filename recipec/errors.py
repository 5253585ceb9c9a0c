"""Errors a user can act on; the CLI prints them without a traceback. Kept free of heavy imports so
that a serving process can use them without loading torch."""


class PassError(Exception):
    """A stage could not do its job for a reason the user can act on."""


def one_line(exc: BaseException) -> str:
    """An exception from a library, as one line of a user-facing message (its type, its text unwrapped)."""
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())
