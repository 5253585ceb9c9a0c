"""The access log (`--access-log PATH`, `-` for stdout): one JSON object per line and request, written when
the request ends, so that a log shipper can parse it without a format of its own:

    {"time": "2026-11-27T10:00:00.123Z", "client": "127.0.0.1", "method": "POST", "path": "/v1/completions",
     "status": 200, "duration_ms": 84.2, "bytes": 612, "user_agent": "curl/8.5.0"}

`status` is null when the client left before any response; `bytes` counts the response body sent. API keys
and bodies are never logged."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import IO, Any


class AccessLog:
    """ASGI middleware outside everything else, so it also sees the guard's refusals."""

    def __init__(self, app, stream: IO[str]):
        self.app, self.stream = app, stream

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, sent = time.monotonic(), None, 0

        async def logged(message: dict[str, Any]) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, logged)
        finally:
            self.write(scope, status, sent, time.monotonic() - start)

    def write(self, scope, status: int | None, sent: int, seconds: float) -> None:
        agent = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"user-agent"), None)
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 "client": (scope.get("client") or (None,))[0], "method": scope["method"], "path": scope["path"],
                 "status": status, "duration_ms": round(seconds * 1000, 1), "bytes": sent, "user_agent": agent}
        # Written and flushed at once: a line is whole when a tailing shipper reads it. A few hundred bytes per
        # request; a file or pipe that blocks would stall the event loop, so point it at a file or stdout.
        self.stream.write(json.dumps(entry) + "\n")
        self.stream.flush()
