"""What a /v1/completions or /v1/chat/completions request may say, validated into a Completion, and OpenAI's
error shape. The fields both endpoints share are parsed here; chat's messages are recipec.serve.chat's."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recipec.errors import RecipecError

# OpenAI parameters this server cannot honour: accepted only at their no-op value, refused otherwise.
_NO_OP = {"best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
          "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {})}
# n up to 128 as OpenAI; up to 16 stop sequences (OpenAI takes 4, vLLM any number); 20 alternatives per token,
# vLLM's default cap (OpenAI's completions take 5).
MAX_N = 128
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
# Chat's max_tokens defaults to the rest of the context; a model that states no context length gets this.
NO_CONTEXT_MAX_TOKENS = 4096

# OpenAI's error types by status; anything else is a server_error.
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
                405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                415: "invalid_request_error", 421: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(RecipecError):
    """An HTTP error answered in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.
    Every error the server answers goes through this one shape (see `content`)."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = dict(headers or {})
        if status in (429, 503) and "Retry-After" not in self.headers:
            self.headers["Retry-After"] = "1"

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}

    def content(self) -> bytes:
        # ASCII-escaped: a message quoting the client's text may hold a lone surrogate, which UTF-8 cannot encode.
        return json.dumps(self.body(), ensure_ascii=True).encode()


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: int | None = None  # alternatives to report per generated token (0: the chosen one's only); None: none
    copy: int = 0  # which of a prompt's n choices: each draws its own tokens, copy 0 as a request with n = 1
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        seed = self.seed if self.seed is None or self.copy == 0 else [self.seed, self.copy]
        self.rng = np.random.default_rng(seed)

    def for_choice(self, copy: int) -> "Sampling":
        """A fresh copy for one choice: every choice's random stream starts anew, so a seeded prompt draws
        the same tokens alone as in a list of prompts."""
        return Sampling(self.temperature, self.top_p, self.top_k, self.seed, self.logprobs, copy)


@dataclass
class Completion:
    """One request: its prompts (token ids; one choice per prompt and copy, n copies each) and its parameters."""
    prompts: list[list[int]]
    max_tokens: int | None  # None until set_prompts: the rest of the context (chat's default)
    sampling: Sampling
    stream: bool = False
    ignore_eos: bool = False
    include_usage: bool = False
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    echo: bool = False  # completions: the prompt's text and its tokens' logprobs lead each choice
    texts: list[str] | None = None  # the prompts as text, when they came as text (tokenized off the event loop)
    special_tokens: bool = True  # tokenize texts adding the tokenizer's special tokens (a chat template has its own)

    def __post_init__(self):
        if self.prompts and not isinstance(self.prompts[0], list):  # one prompt's ids
            self.prompts = [list(self.prompts)]

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class ModelSpec:
    """What request validation needs to know about the served variant."""
    name: str
    vocab_size: int
    context_length: int | None
    tokenizer: Any = None  # has encode(text) -> ids, decode(ids) -> text and token_text(id), or None
    aliases: tuple[str, ...] = ()  # other names a request's `model` may use (the variant's)
    chat_template: Any = None  # a recipec.serve.chat.ChatTemplate, or None

    def check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.name and model not in self.aliases:
            names = " or ".join(repr(n) for n in (self.name, *self.aliases))
            raise ApiError(404, f"model {model!r} does not exist; this server serves {names}", "model")


def parse_completion(body: Any, spec: ModelSpec, max_prompt_chars: int | None = None) -> Completion:
    """Validate a /v1/completions body; ApiError(400) names the first bad field. Text prompts are checked
    (length, valid Unicode) but not tokenized: the caller tokenizes `texts` and calls `set_prompts`."""
    body = json_object(body)
    spec.check_model(body)
    echo = boolean_field(body, "echo")
    completion = parse_common(body, spec, integer_field(body, "max_tokens", 16, minimum=0 if echo else 1),
                              _logprobs(body))
    completion.echo = echo
    prompts = _prompts(body.get("prompt"), spec, max_prompt_chars)
    if isinstance(prompts[0], str):
        completion.texts = prompts
        return completion
    return set_prompts(completion, prompts, spec)


def parse_common(body: dict[str, Any], spec: ModelSpec, max_tokens: int | None, logprobs: int | None) -> Completion:
    """The fields /v1/completions and /v1/chat/completions share, prompts left empty."""
    for name, allowed in _NO_OP.items():
        if body.get(name) not in allowed:
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server", name)
    sampling = Sampling(_number(body, "temperature", 1.0, 0.0, 2.0), _top_p(body), _top_k(body), _seed(body), logprobs)
    return Completion([], max_tokens, sampling, boolean_field(body, "stream"), boolean_field(body, "ignore_eos"),
                      _include_usage(body), _n(body), _stop(body), _stop_ids(body, spec))


def set_prompts(completion: Completion, prompts: list[list[int]], spec: ModelSpec) -> Completion:
    """The completion with its prompts' token ids, checked against the context length; a max_tokens left
    open becomes the room the longest prompt leaves."""
    for ids in prompts:
        if not ids:
            raise ApiError(400, "prompt must hold at least one token", "prompt")
    longest = max(len(ids) for ids in prompts)
    if completion.max_tokens is None:
        completion.max_tokens = max(1, spec.context_length - longest) if spec.context_length else NO_CONTEXT_MAX_TOKENS
    if spec.context_length and longest + completion.max_tokens > spec.context_length:
        raise ApiError(400, f"the prompt ({longest} tokens) plus max_tokens ({completion.max_tokens}) exceeds the "
                            f"model's context length of {spec.context_length} tokens", "max_tokens")
    completion.prompts = [list(ids) for ids in prompts]
    return completion


def check_text(text: str, spec: ModelSpec, max_chars: int | None, param: str = "prompt") -> str:
    """A text that can be tokenized: these checks are O(length) and cheap, tokenizing is not."""
    if spec.tokenizer is None:
        raise ApiError(400, "this variant has no tokenizer: send the prompt as a list of token ids", param)
    if max_chars is not None and len(text) > max_chars:
        raise ApiError(400, f"the {param} has {len(text)} characters; this server accepts at most {max_chars} "
                            f"(--max-prompt-chars)", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
        raise ApiError(400, f"the {param} holds a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X}) at "
                            f"character {exc.start}: it is not valid Unicode", param) from None
    return text


def json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _prompts(prompt: Any, spec: ModelSpec, max_chars: int | None) -> list[str] | list[list[int]]:
    """OpenAI's four prompt forms: a string, a list of strings, a list of token ids, a list of token-id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and _ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt is required" if prompt is None else "prompt must be a string, a list of strings, "
                            "a list of token ids or a list of token-id lists, and not empty", "prompt")
    if all(isinstance(p, str) for p in prompt):
        total = sum(len(p) for p in prompt)
        if max_chars is not None and total > max_chars:
            raise ApiError(400, f"the prompts have {total} characters; this server accepts at most {max_chars} "
                                f"(--max-prompt-chars)", "prompt")
        return [check_text(p, spec, max_chars) for p in prompt]
    if all(isinstance(p, list) and _ids(p) for p in prompt):
        for ids in prompt:
            bad = [t for t in ids if not 0 <= t < spec.vocab_size]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{spec.vocab_size - 1})", "prompt")
        return prompt
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of token-id "
                        "lists, not a mix", "prompt")


def _ids(values: list[Any]) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in values)


def integer_field(body: dict[str, Any], name: str, default: int | None, minimum: int, maximum: int | None = None,
             param: str | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or \
            (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ApiError(400, f"{param or name} must be an integer {bound}, got {value!r}", param or name)
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _top_p(body: dict[str, Any]) -> float:
    value = _number(body, "top_p", 1.0, 0.0, 1.0)
    if value == 0:
        raise ApiError(400, "top_p must be in (0, 1]", "top_p")
    return value


def _top_k(body: dict[str, Any]) -> int:
    value = body.get("top_k")
    if value in (None, -1):  # -1 is vLLM's "no limit"
        return 0
    return integer_field(body, "top_k", 0, minimum=0)


def _seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ApiError(400, f"seed must be a non-negative integer, got {value!r}", "seed")
    return value


def _n(body: dict[str, Any]) -> int:
    return integer_field(body, "n", 1, minimum=1, maximum=MAX_N)


def _logprobs(body: dict[str, Any]) -> int | None:
    """Completions' logprobs: how many alternatives per token (OpenAI adds the chosen token when it is not
    among them)."""
    if isinstance(body.get("logprobs"), bool):
        raise ApiError(400, f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] on /v1/completions (true or "
                            f"false is /v1/chat/completions' form), got {body['logprobs']!r}", "logprobs")
    return integer_field(body, "logprobs", None, minimum=0, maximum=MAX_TOP_LOGPROBS)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None or value == "":
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a string or a list of non-empty strings, got {value!r}", "stop")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop holds {len(stops)} sequences; this server accepts at most {MAX_STOP}", "stop")
    return tuple(dict.fromkeys(stops))


def _stop_ids(body: dict[str, Any], spec: ModelSpec) -> frozenset[int]:
    """vLLM's stop_token_ids: generation stops at any of them (its text is not part of the output)."""
    value = body.get("stop_token_ids")
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not _ids(value) or not all(0 <= t < spec.vocab_size for t in value):
        raise ApiError(400, f"stop_token_ids must be a list of token ids in 0..{spec.vocab_size - 1}, got {value!r}",
                       "stop_token_ids")
    return frozenset(value)


def boolean_field(body: dict[str, Any], name: str, param: str | None = None, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{param or name} must be true or false, got {value!r}", param or name)
    return value


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object, got {options!r}", "stream_options")
    return boolean_field(options, "include_usage", "stream_options.include_usage")
