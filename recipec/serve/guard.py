"""What every HTTP request passes before the app sees it, at the ASGI level where a refusal costs no body
read: the Host allow-list (DNS rebinding), the API key, the framing (Transfer-Encoding with
Content-Length), the body's type (JSON) and size, read in full within the body timeout. Then the app runs
under a hard deadline, which also ends whatever is left at the end of a shutdown's grace period.

Starlette has a TrustedHostMiddleware, but it answers in plain text; every refusal here is in OpenAI's
error shape, closes the connection (its body may be unread) and is counted in /metrics."""
from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from recipec.serve.limits import Limits
from recipec.serve.protocol import ApiError
from recipec.serve.service import Service

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# The soft deadline (Service.request_timeout) ends a request's generation; this much later the guard also
# ends a handler stuck writing to a client that does not read.
HARD_DEADLINE_SLACK_S = 5.0
# /metrics' reason for each refusal the guard answers.
_REASONS = {401: "unauthorized", 408: "timeout", 413: "too_large"}

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Access:
    """Who may talk to the server: Host names it answers to (None: any) and the API keys (none: no auth)."""
    allowed_hosts: frozenset[str] | None = None
    api_keys: tuple[str, ...] = ()


class Guard:
    def __init__(self, app, service: Service, limits: Limits, access: Access):
        self.app, self.service, self.limits, self.access = app, service, limits, access
        self._keys = [key.encode() for key in access.api_keys]
        self._stopped: asyncio.Event | None = None

    def stop(self) -> None:
        """End every request still running (the end of a shutdown): they get a 503, or their connection closes."""
        self._stop_event().set()

    def _stop_event(self) -> asyncio.Event:
        if self._stopped is None:  # created on the event loop, where it is awaited
            self._stopped = asyncio.Event()
        return self._stopped

    async def __call__(self, scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        try:
            receive = await self._admit(scope, receive)
        except ApiError as exc:
            self.service.metrics.reject(_REASONS.get(exc.status, "invalid"))
            await send_error(send, exc, close=True)
            return
        if receive is not None:  # else the client hung up before its body was in: nobody to answer
            await self._run(scope, receive, send)

    async def _admit(self, scope, receive: Receive) -> Receive | None:
        headers = _headers(scope)
        self._check_host(headers.get(b"host"))
        scope.setdefault("state", {})["client"] = self._authenticated_client(scope, headers)
        if b"transfer-encoding" in headers and b"content-length" in headers:
            # Request smuggling: a proxy in front may frame the body by the other header than we do.
            raise ApiError(400, "the request carries both Transfer-Encoding and Content-Length; send one "
                                "(RFC 9112, section 6.3)")
        length = _length(headers.get(b"content-length"))
        if length is not None and length > self.limits.max_body_bytes:
            raise ApiError(413, f"the request body has {length} bytes; this server accepts at most "
                                f"{self.limits.max_body_bytes} (--max-body-bytes)")
        if scope["method"] != "POST":
            return receive
        _check_json(headers.get(b"content-type"))
        body = await self._read_body(receive)
        return None if body is None else _replay(body, receive)

    def _check_host(self, value: bytes | None) -> None:
        allowed = self.access.allowed_hosts
        if allowed is None:
            return
        name = _host_name(value)
        if name not in allowed:
            # A page on another site that resolves its own name to this address (DNS rebinding) sends its
            # own name here: answering only to known names keeps it from reading responses.
            raise ApiError(400, f"Host {name!r} is not served here; allowed: {', '.join(sorted(allowed))} "
                                f"(--allowed-host)")

    def _authenticated_client(self, scope, headers: dict[bytes, bytes]) -> str:
        """Whose share of the queue a request takes: its API key's when keys are on (401 without a valid one),
        else its address's."""
        if not self._keys or not _needs_key(scope["path"]):
            return f"addr:{(scope.get('client') or ('?',))[0]}"
        value = headers.get(b"authorization")
        scheme, _, token = (value or b"").partition(b" ")
        if value is None or scheme.lower() != b"bearer":
            raise ApiError(401, "this server requires an API key: send the header 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        token = token.strip()
        matches = [hmac.compare_digest(token, key) for key in self._keys]  # all compared: no early exit to time
        if not any(matches):
            raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        return f"key:{matches.index(True)}"

    async def _read_body(self, receive: Receive) -> bytes | None:
        limit, chunks, size = self.limits.max_body_bytes, [], 0

        async def read() -> bytes | None:
            nonlocal size
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:  # a chunked body, whose size no header announced
                    raise ApiError(413, f"the request body exceeds {limit} bytes (--max-body-bytes)")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.limits.body_timeout:g} s "
                                f"(--body-timeout)") from None

    async def _run(self, scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        app = asyncio.ensure_future(self.app(scope, receive, tracked))
        stop = asyncio.ensure_future(self._stop_event().wait())
        try:
            done, _ = await asyncio.wait({app, stop}, timeout=self.limits.request_timeout + HARD_DEADLINE_SLACK_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            app.cancel()
            raise
        finally:
            stop.cancel()
        if app in done:
            app.result()  # an exception here is a bug: uvicorn logs it with its traceback
            return
        app.cancel()
        await asyncio.wait({app})
        if not app.cancelled() and app.exception() is not None:
            raise app.exception()
        if not started:
            shutting = self._stop_event().is_set()
            await send_error(send, ApiError(503, "the server shut down before the request finished") if shutting
                             else ApiError(504, "the request ran past its deadline (--request-timeout)"), close=True)
        # else the response was cut off mid-body: uvicorn closes the connection, which is all a client can see


async def send_error(send: Send, exc: ApiError, close: bool = False) -> None:
    """An ApiError as a whole ASGI response."""
    body = exc.content()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in exc.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _headers(scope) -> dict[bytes, bytes]:
    # Lower-case names (ASGI servers lower them); a repeated header keeps its last value, enough for presence.
    return {name.lower(): value for name, value in scope["headers"]}


def _length(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:  # h11 refuses these first; this is for a server that does not
        raise ApiError(400, f"Content-Length must be a number of bytes, got {value.decode('latin-1')!r}") from None


def _needs_key(path: str) -> bool:
    # As vLLM: the API needs the key; /health, /ready and /metrics stay open for probes and scrapers.
    return path == "/v1" or path.startswith("/v1/")


def _check_json(value: bytes | None) -> None:
    media = (value or b"").split(b";")[0].strip().lower()
    if media != b"application/json":
        # A web page can POST text/plain to a local server without a CORS preflight; application/json needs one.
        got = f"got {value.decode('latin-1')!r}" if value else "there is none"
        raise ApiError(415, f"Content-Type must be application/json; {got}")


def _host_name(value: bytes | None) -> str:
    """The host name of a Host header, without its port or IPv6 brackets, lower-cased."""
    host = (value or b"").decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


def _replay(body: bytes, receive: Receive) -> Receive:
    """The receive channel the app sees: the body read here, then the server's (for the disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replayed
