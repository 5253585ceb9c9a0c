"""The server's limits and timeouts in one place: what `recipec serve`'s flags set, checked by the HTTP
layer (guard, server) before any work is spent on a request."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_QUEUE = 64
# A text prompt longer than this many characters per context token cannot fit (tokenizers put a few
# characters in a token, 32 is generous even for runs of whitespace in code), so it is refused before the
# tokenizer spends time on it.
CHARS_PER_TOKEN = 32
NO_CONTEXT_MAX_CHARS = 1_000_000


@dataclass(frozen=True)
class Limits:
    """Limits on one request and one connection. Seconds for the timeouts."""
    max_body_bytes: int = 2 * 1024 * 1024
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN x the model's context length
    header_timeout: float = 10.0  # from connecting (or a first byte after keep-alive) to the end of the headers
    body_timeout: float = 30.0  # from the end of the headers to the end of the body
    keep_alive_timeout: int = 5  # an idle connection between requests (uvicorn's timeout_keep_alive)
    request_timeout: float = 600.0  # admission to the last token; past it the request ends with an error
    max_connections: int = 1000  # uvicorn's limit_concurrency: past it, 503 and the connection closes
    shutdown_grace: float = 5.0  # running requests may finish this long after SIGTERM/SIGINT

    def prompt_chars(self, context_length: int | None) -> int:
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return CHARS_PER_TOKEN * context_length if context_length else NO_CONTEXT_MAX_CHARS

    def check(self) -> list[str]:
        """What is wrong with these limits, each naming its flag."""
        problems = [f"--{flag} must be > 0" for flag, value in (
            ("max-body-bytes", self.max_body_bytes), ("header-timeout", self.header_timeout),
            ("body-timeout", self.body_timeout), ("keep-alive-timeout", self.keep_alive_timeout),
            ("request-timeout", self.request_timeout), ("max-connections", self.max_connections)) if value <= 0]
        if self.max_prompt_chars is not None and self.max_prompt_chars <= 0:
            problems.append("--max-prompt-chars must be > 0")
        if self.shutdown_grace < 0:
            problems.append("--shutdown-grace must be >= 0")
        return problems
