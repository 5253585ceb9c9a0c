"""What a /v1/completions request may say, validated into a Completion, and OpenAI's error shape."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recipec.errors import RecipecError

# OpenAI parameters this server cannot honour: accepted only at their no-op value, refused otherwise.
_NO_OP = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None,), "suffix": (None, ""),
          "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0)}


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
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)


@dataclass
class Completion:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stream: bool = False
    ignore_eos: bool = False
    include_usage: bool = False
    text: str | None = None  # a text prompt until it is tokenized (off the event loop) into `prompt`


@dataclass
class ModelSpec:
    """What request validation needs to know about the served variant."""
    name: str
    vocab_size: int
    context_length: int | None
    tokenizer: Any = None  # has encode(text) -> ids and decode(ids) -> text, or None


def parse_completion(body: Any, spec: ModelSpec, max_prompt_chars: int | None = None) -> Completion:
    """Validate a /v1/completions body; ApiError(400) names the first bad field. A text prompt is checked
    (length, valid Unicode) but not tokenized: the caller tokenizes `text` and calls `set_prompt`."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != spec.name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {spec.name!r}", "model")
    for name, allowed in _NO_OP.items():
        if body.get(name) not in allowed:
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server", name)
    if body.get("stop") not in (None, "", []):
        raise ApiError(400, "stop sequences are not supported by this server", "stop")
    if body.get("logit_bias") not in (None, {}):
        raise ApiError(400, "logit_bias is not supported by this server", "logit_bias")
    prompt = _prompt(body.get("prompt"), spec, max_prompt_chars)
    max_tokens = _integer(body, "max_tokens", 16, minimum=1)
    sampling = Sampling(_number(body, "temperature", 1.0, 0.0, 2.0), _top_p(body), _top_k(body), _seed(body))
    completion = Completion([], max_tokens, sampling, _boolean(body, "stream"), _boolean(body, "ignore_eos"),
                            _include_usage(body))
    if isinstance(prompt, str):
        completion.text = prompt
        return completion
    return set_prompt(completion, prompt, spec)


def set_prompt(completion: Completion, ids: list[int], spec: ModelSpec) -> Completion:
    """The completion with its prompt's token ids, checked against the context length."""
    if not ids:
        raise ApiError(400, "prompt must hold at least one token", "prompt")
    if spec.context_length and len(ids) + completion.max_tokens > spec.context_length:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({completion.max_tokens}) exceeds the "
                            f"model's context length of {spec.context_length} tokens", "max_tokens")
    completion.prompt, completion.text = ids if isinstance(ids, list) else list(ids), None
    return completion


def _prompt(prompt: Any, spec: ModelSpec, max_chars: int | None) -> list[int] | str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt, as OpenAI clients send it
    if isinstance(prompt, str):
        return _text(prompt, spec, max_chars)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < spec.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{spec.vocab_size - 1})", "prompt")
        return list(prompt)
    if prompt is None:
        raise ApiError(400, "prompt is required", "prompt")
    raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def _text(text: str, spec: ModelSpec, max_chars: int | None) -> str:
    """A text prompt that can be tokenized: these checks are O(length) and cheap, tokenizing is not."""
    if spec.tokenizer is None:
        raise ApiError(400, "this variant has no tokenizer: send the prompt as a list of token ids", "prompt")
    if max_chars is not None and len(text) > max_chars:
        raise ApiError(400, f"the prompt has {len(text)} characters; this server accepts at most {max_chars} "
                            f"(--max-prompt-chars)", "prompt")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's \ud800 escapes decode to lone surrogates, which are not text
        raise ApiError(400, f"the prompt holds a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X}) at character "
                            f"{exc.start}: it is not valid Unicode", "prompt") from None
    return text


def _integer(body: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ApiError(400, f"{name} must be an integer >= {minimum}, got {value!r}", name)
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
    return _integer(body, "top_k", 0, minimum=0)


def _seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ApiError(400, f"seed must be a non-negative integer, got {value!r}", "seed")
    return value


def _boolean(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{param or name} must be true or false, got {value!r}", param or name)
    return value


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object, got {options!r}", "stream_options")
    return _boolean(options, "include_usage", "stream_options.include_usage")
