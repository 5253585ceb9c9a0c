"""A request's answer: its choices followed from the engine's events to their ends, whole or as server-sent
events, in the shape of /v1/completions or of /v1/chat/completions (the two `Format`s)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from starlette.responses import StreamingResponse

from recipec.serve.output import Choice, chat_logprobs, completion_logprobs, echo_of
from recipec.serve.protocol import ApiError, Completion, ModelSpec
from recipec.serve.service import Handle, Service


class Format:
    """The envelope both endpoints share; ids are random (uuid4), so they never repeat across restarts."""
    prefix = kind = chunk_kind = ""

    def __init__(self, spec: ModelSpec, completion: Completion):
        self.id, self.created = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.model, self.tokenizer, self.completion = spec.name, spec.tokenizer, completion
        self.logprobs = completion.sampling.logprobs is not None

    def body(self, choices: list[dict[str, Any]], chunk: bool = False) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_kind if chunk else self.kind, "created": self.created,
                "model": self.model, "choices": choices}

    def opening(self, choices: list[Choice]) -> list[dict[str, Any]]:
        """The events a stream starts with, before any token."""
        return []

    def _finish(self, choice: Choice) -> str | None:
        """The finish reason, in the one chunk that announces it."""
        if choice.finish is None or choice.announced:
            return None
        choice.announced = True
        return choice.finish


class CompletionsFormat(Format):
    prefix, kind, chunk_kind = "cmpl", "text_completion", "text_completion"

    def delta(self, choice: Choice) -> dict[str, Any] | None:
        text, first = choice.take()
        lead = None if choice.echoed else choice.echo
        choice.echoed = True
        finish = self._finish(choice)
        if not text and first == len(choice.tokens) and finish is None and lead is None:
            return None
        return self._choice(choice, text, first, finish, lead)

    def whole(self, choice: Choice) -> dict[str, Any]:
        return self._choice(choice, choice.text, 0, choice.finish, choice.echo)

    def _choice(self, choice: Choice, text: str, first: int, finish: str | None, lead) -> dict[str, Any]:
        tokens, entries, offsets = choice.tokens[first:], choice.logprobs[first:], choice.offsets[first:]
        if lead is not None:  # echo: the prompt leads the choice's text, tokens and logprobs
            offsets = lead.offsets + [len(lead.text) + o for o in offsets]
            text, tokens, entries = lead.text + text, lead.tokens + tokens, lead.logprobs + entries
        logprobs = completion_logprobs(self.tokenizer, tokens, entries, offsets) if self.logprobs and tokens else None
        return {"index": choice.index, "text": text, "token_ids": choice.tokens[first:], "logprobs": logprobs,
                "finish_reason": finish}


class ChatFormat(Format):
    prefix, kind, chunk_kind = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def opening(self, choices: list[Choice]) -> list[dict[str, Any]]:
        return [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for c in choices]

    def delta(self, choice: Choice) -> dict[str, Any] | None:
        text, first = choice.take()
        finish = self._finish(choice)
        if not text and first == len(choice.tokens) and finish is None:
            return None
        return {"index": choice.index, "delta": {"content": text} if text else {},
                "logprobs": self._logprobs(choice, first), "finish_reason": finish}

    def whole(self, choice: Choice) -> dict[str, Any]:
        return {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                "logprobs": self._logprobs(choice, 0), "finish_reason": choice.finish}

    def _logprobs(self, choice: Choice, first: int) -> dict[str, Any] | None:
        wanted = self.logprobs and first < len(choice.tokens)
        return chat_logprobs(self.tokenizer, choice.logprobs[first:]) if wanted else None


async def respond(service: Service, completion: Completion, form: type[Format], client: str, receive):
    """Score the prompts when echo asks for their logprobs, start the choices, and answer."""
    scores = await service.score(completion, client) if completion.echo and completion.sampling.logprobs is not None \
        else [None] * len(completion.prompts)
    choices = _choices(service.spec, completion, scores)
    handle = service.submit(completion, client) if completion.max_tokens else None
    if handle is None:
        service.metrics.scored([len(c.echo.tokens) for c in choices])
    answer = form(service.spec, completion)
    if completion.stream:
        return _Stream(service, handle, answer, choices)
    return await _complete(service, handle, answer, choices, receive)


def _choices(spec: ModelSpec, completion: Completion, scores: list) -> list[Choice]:
    texts = completion.texts or [None] * len(completion.prompts)
    choices = []
    for prompt, text, score in zip(completion.prompts, texts, scores):
        echo = echo_of(spec.tokenizer, prompt, text, score) if completion.echo else None
        start = len(choices)
        choices += [Choice(start + copy, spec.tokenizer, prompt, completion.stop, completion.stop_ids, echo)
                    for copy in range(completion.n)]
    return choices


async def _progress(service: Service, handle: Handle | None, choices: list[Choice]) -> AsyncIterator[Choice]:
    """Each choice that changed, as the engine's events arrive, until every choice has ended; a stop string
    stops its choice's generation. Raises the ApiError of a request that cannot finish."""
    if handle is None:  # max_tokens 0: the echo is all there is
        for choice in choices:
            choice.end("length")
            yield choice
        return
    left = len(choices)
    while left:
        kind, index, *value = await handle.events.get()
        if index is None:
            raise _ended(service, handle, value[0])
        choice = choices[index]
        if kind == "token":
            if choice.add(*value):
                service.stop(handle, index)
        else:
            left -= 1
            if value[0] not in ("stop", "length") and choice.finish is None:
                raise _ended(service, handle, value[0], index)
            choice.end(value[0])
        yield choice


def _usage(completion: Completion, choices: list[Choice]) -> dict[str, int]:
    n_in, n_out = sum(len(p) for p in completion.prompts), sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _ended(service: Service, handle: Handle, reason: str, index: int | None = None) -> ApiError:
    """The error a request that did not finish answers with, by why it ended."""
    if reason == "error":
        failed = [handle.requests[index]] if index is not None else [r for r in handle.requests if r.error]
        return ApiError(500, f"generation failed: {failed[0].error if failed else 'unknown error'}")
    if reason == "shutdown":
        return ApiError(503, "the server shut down before the request finished" if handle.started
                        else "the server is shutting down; the request was not started, retry on another instance")
    if reason == "deadline":
        return ApiError(504, f"the request ran past its deadline of {service.request_timeout:g} s (--request-timeout)")
    if reason == "disconnected":
        return ApiError(499, "client disconnected")  # nobody reads it; it shows in the access log
    return ApiError(503, "the request was cancelled")


async def _sse(service: Service, handle: Handle | None, answer: Format, choices: list[Choice]):
    """An event per change of a choice (its new text and tokens, then its finish reason), usage when asked,
    and [DONE]; a request that cannot finish (shutdown, deadline, failure) ends with an error event in
    OpenAI's shape, then [DONE]. A disconnect cancels the generator at its await; `finally` then frees its
    batch slots."""
    try:
        try:
            for payload in answer.opening(choices):
                yield _event(answer.body([payload], chunk=True))
            async for choice in _progress(service, handle, choices):
                payload = answer.delta(choice)
                if payload is not None:
                    yield _event(answer.body([payload], chunk=True))
            if answer.completion.include_usage:
                yield _event({**answer.body([], chunk=True), "usage": _usage(answer.completion, choices)})
        except ApiError as exc:
            yield _event(exc.body())
        yield "data: [DONE]\n\n"
    finally:
        _release(service, handle)


class _Stream(StreamingResponse):
    """The SSE response, freeing the request's slots however it ends: a client that hangs up before the first
    event cancels the response before `_sse` ever runs, so the generator's own `finally` cannot be relied on."""

    def __init__(self, service: Service, handle: Handle | None, answer: Format, choices: list[Choice]):
        super().__init__(_sse(service, handle, answer, choices), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.service, self.handle = service, handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _release(self.service, self.handle)


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _release(service: Service, handle: Handle | None) -> None:
    if handle is not None:
        service.release(handle)


async def _complete(service: Service, handle: Handle | None, answer: Format, choices: list[Choice],
                    receive) -> dict[str, Any]:
    """Wait for every choice while a watcher ends the request the moment its client hangs up."""
    watcher = asyncio.ensure_future(_hang_up(service, handle, receive)) if handle is not None else None
    try:
        async for _ in _progress(service, handle, choices):
            pass
        return {**answer.body([answer.whole(c) for c in choices]), "usage": _usage(answer.completion, choices)}
    finally:
        if watcher is not None:
            watcher.cancel()
        _release(service, handle)


async def _hang_up(service: Service, handle: Handle, receive) -> None:
    # The body is read, so the server's next message is http.disconnect, sent when the client closes.
    while (await receive())["type"] != "http.disconnect":
        pass
    service.end(handle, "disconnected")
