"""Running the app under uvicorn: connection limits and timeouts, and a graceful shutdown.

uvicorn gives the idle timeout (timeout_keep_alive) and the connection cap (limit_concurrency: past it a
request gets uvicorn's plain-text 503 and its connection closes). It has no timeout for a request's
headers: a connection that says nothing, or half a request line, would stay open for good. The h11
protocol below adds one. The body's timeout and size are the guard's (recipec.serve.guard).

Shutdown (SIGTERM or SIGINT): uvicorn stops accepting and closes idle connections; before that the
service starts draining (new requests 503, queued ones answered 503 at once), running requests get
--shutdown-grace seconds, then end with an SSE error event or a JSON 503, and a second later the guard ends
whatever is still writing. uvicorn's own deadline comes after both, so it never cancels a handler (which
would log a CancelledError traceback)."""
from __future__ import annotations

import asyncio
import math
import signal
from contextlib import contextmanager
from typing import IO

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from recipec.serve.access_log import AccessLog
from recipec.serve.app import create_app
from recipec.serve.guard import Access, Guard
from recipec.serve.limits import Limits
from recipec.serve.service import Service

# After the grace period: the handlers' last events go out, then the guard ends the rest, then uvicorn.
STOP_AFTER_GRACE_S = 1.0
UVICORN_AFTER_GRACE_S = 3


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than `seconds`: from
    connecting, or from the first byte of a next request on a kept-alive connection."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._between_requests():
                if self._header_timer is None:  # keep the first deadline: trickling bytes do not extend it
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            # No response: there is no request to answer (h11 cannot send one before a request line).
            if self._between_requests() and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, guard: Guard, grace: float):
        super().__init__(config)
        self.service, self.guard, self.grace = service, guard, grace

    @contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal after its graceful shutdown, which turns the stop a user asked
        # for into a KeyboardInterrupt traceback (SIGINT) or death by signal (SIGTERM).
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets=None) -> None:
        self.service.drain()
        loop = asyncio.get_running_loop()
        timers = [loop.call_later(self.grace, self.service.expire),
                  loop.call_later(self.grace + STOP_AFTER_GRACE_S, self.guard.stop)]
        try:
            await super().shutdown(sockets)
        finally:
            for timer in timers:
                timer.cancel()


def run_server(service: Service, host: str, port: int, limits: Limits | None = None, access: Access | None = None,
               openapi: bool = False, access_log: IO[str] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (the module's docstring)."""
    limits = limits or Limits()
    guard = Guard(create_app(service, limits, openapi), service, limits, access or Access())
    app = AccessLog(guard, access_log) if access_log is not None else guard
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            http=header_timeout_protocol(limits.header_timeout),
                            timeout_keep_alive=max(1, math.ceil(limits.keep_alive_timeout)),
                            limit_concurrency=limits.max_connections,
                            timeout_graceful_shutdown=math.ceil(limits.shutdown_grace) + UVICORN_AFTER_GRACE_S)
    _Server(config, service, guard, limits.shutdown_grace).run()
