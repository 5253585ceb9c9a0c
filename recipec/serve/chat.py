"""/v1/chat/completions' messages, rendered into one text prompt by the model's chat template.

The template is, first found: `recipec serve --chat-template FILE`, the recipe's `serving.chat_template`, the
variant's tokenizer's own (chat_template.jinja, or tokenizer_config.json's chat_template). It renders as
transformers' apply_chat_template renders it (a sandboxed Jinja environment with the same options, filters,
globals and special-token variables), without importing transformers into the serving process; the text is
then tokenized without adding special tokens, since the template writes them itself."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from recipec.errors import UsageError
from recipec.serve.protocol import (MAX_TOP_LOGPROBS, ApiError, Completion, ModelSpec, boolean_field, check_text,
                                    integer_field, json_object, parse_common)

NO_TEMPLATE = ("this model has no chat template: its tokenizer has none (tokenizer_config.json chat_template or "
               "chat_template.jinja), so give one with `recipec serve --chat-template FILE` (a Jinja template) or the "
               "recipe's serving.chat_template, or send the prompt as text to /v1/completions")
# OpenAI's tool-calling fields: the server has no tool parser, so a request that relies on them is refused.
_TOOLS = ("tools", "functions", "function_call")
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplate:
    """A compiled chat template and the special-token strings it may refer to."""

    def __init__(self, source: str, origin: str, special_tokens: dict[str, str] | None = None):
        import jinja2

        self.origin, self.special_tokens = origin, dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise UsageError(f"the chat template from {origin} is not valid Jinja: line {exc.lineno}: {exc.message}") \
                from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                         documents=None, **self.special_tokens)
        except jinja2.TemplateError as exc:  # raise_exception() in the template: it refuses these messages
            raise ApiError(400, f"the chat template refused the messages: {exc}", "messages") from None


def _environment():
    """transformers' chat-template environment (utils/chat_template_utils.py): sandboxed, trim_blocks and
    lstrip_blocks, loop controls, `{% generation %}` blocks, tojson without HTML escaping, raise_exception
    and strftime_now."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        # transformers marks the assistant's part with {% generation %}; rendering only needs its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def load_chat_template(variant_dir: Path, given: str | None = None, origin: str = "") -> ChatTemplate | None:
    """The template `given` (from `origin`: the command line or the recipe), else the tokenizer's, else None."""
    special = _special_tokens(variant_dir)
    if given is not None:
        return ChatTemplate(given, origin, special)
    found = tokenizer_chat_template(variant_dir)
    return None if found is None else ChatTemplate(found[0], found[1], special)


def tokenizer_chat_template(variant_dir: Path) -> tuple[str, str] | None:
    """The tokenizer's own template and where it was found: chat_template.jinja (what transformers 4.43+
    saves) before tokenizer_config.json's chat_template (a string, or named templates of which "default")."""
    jinja = variant_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), str(jinja)
    template = _tokenizer_config(variant_dir).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return (template, f"{variant_dir / 'tokenizer_config.json'} chat_template") if isinstance(template, str) else None


def _special_tokens(variant_dir: Path) -> dict[str, str]:
    """bos_token, eos_token … as strings, the variables transformers gives every template."""
    found: dict[str, str] = {}
    for source in (_json(variant_dir / "special_tokens_map.json"), _tokenizer_config(variant_dir)):
        for name in _SPECIAL_TOKENS:
            value = source.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                found[name] = value
    return found


def _tokenizer_config(variant_dir: Path) -> dict[str, Any]:
    return _json(variant_dir / "tokenizer_config.json")


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def parse_chat(body: Any, spec: ModelSpec, max_prompt_chars: int | None = None) -> Completion:
    """Validate a /v1/chat/completions body and render its messages; ApiError(400) names the first bad field.
    The rendered text is checked but not tokenized (as parse_completion's text prompts)."""
    body = json_object(body)
    spec.check_model(body)
    _refuse_unsupported(body)
    messages = _messages(body.get("messages"), max_prompt_chars)
    if spec.chat_template is None:
        raise ApiError(400, NO_TEMPLATE, "messages")
    completion = parse_common(body, spec, _max_tokens(body), _chat_logprobs(body))
    text = spec.chat_template.render(messages, boolean_field(body, "add_generation_prompt", default=True))
    completion.texts, completion.special_tokens = [check_text(text, spec, max_prompt_chars, "messages")], False
    return completion


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name in _TOOLS:
        if body.get(name) not in (None, []):
            raise ApiError(400, f"{name} is not supported by this server (it has no tool-call parser)", name)
    if body.get("tool_choice") not in (None, "none"):
        raise ApiError(400, "tool_choice is not supported by this server (it has no tool-call parser)", "tool_choice")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "response_format other than {\"type\": \"text\"} is not supported by this server",
                       "response_format")
    if body.get("echo") not in (None, False):
        raise ApiError(400, "echo is a /v1/completions parameter; /v1/chat/completions does not take it", "echo")


def _messages(value: Any, max_chars: int | None) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    messages = [_message(m, i) for i, m in enumerate(value)]
    total = sum(len(m["content"]) for m in messages)
    if max_chars is not None and total > max_chars:
        raise ApiError(400, f"the messages have {total} characters; this server accepts at most {max_chars} "
                            f"(--max-prompt-chars)", "messages")
    return messages


def _message(value: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(value, dict) or not isinstance(value.get("role"), str) or not value["role"]:
        raise ApiError(400, f"{where} must be an object with a string role", f"{where}.role")
    message = {"role": value["role"], "content": _content(value.get("content"), where)}
    if isinstance(value.get("name"), str):
        message["name"] = value["name"]
    return message


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's content parts when all are text (joined by newlines, as vLLM)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list) and all(_text_part(p) for p in value):
        return "\n".join(p["text"] for p in value)
    raise ApiError(400, f"{where}.content must be a string or a list of {{\"type\": \"text\", \"text\"}} parts "
                        f"(this server takes text only)", f"{where}.content")


def _text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _max_tokens(body: dict[str, Any]) -> int | None:
    """max_completion_tokens (OpenAI's current name) or max_tokens; neither: the rest of the context."""
    if body.get("max_completion_tokens") is not None:
        return integer_field(body, "max_completion_tokens", None, minimum=1)
    return integer_field(body, "max_tokens", None, minimum=1)


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat's form: logprobs true or false, and top_logprobs alternatives (0 to 20) when true."""
    wanted = boolean_field(body, "logprobs")
    top = integer_field(body, "top_logprobs", None, minimum=0, maximum=MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None
