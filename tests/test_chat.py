"""/v1/chat/completions driven with the real openai client against `recipec serve` on loopback (issue #19):
the prompt is the model's chat template rendered as transformers renders it, whole and streamed answers are
recipec's own greedy tokens, stop strings and n, chat's logprobs shape, a template from the recipe or
--chat-template, and a clear 400 for a base model that has none."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import openai
import pytest

from openai_server import chat_variant  # noqa: F401 (a fixture)
from openai_server import CHAT_TEMPLATE, SERVING, greedy, make_build, serving, token_logprobs
from recipec.cli.serve import main
from recipec.errors import UsageError
from recipec.serve.chat import ChatTemplate
from recipec.serve.service import build_service

MODEL = "tiny/baseline"
MESSAGES = [{"role": "system", "content": "w40 w41"}, {"role": "user", "content": "w5 w17 w99"}]


@pytest.fixture(scope="module")
def servers(chat_variant, tmp_path_factory):  # noqa: F811
    """One server whose tokenizer has a chat template, one (a base model) whose has none."""
    logs = tmp_path_factory.mktemp("chat-logs")
    with serving(make_build(tmp_path_factory.mktemp("chat-build"), chat_variant), logs) as chat, \
            serving(make_build(tmp_path_factory.mktemp("base-build"), chat_variant, chat_template=False), logs) as base:
        yield {"chat": chat, "base": base}


def _template_ids(variant: Path, messages=MESSAGES) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(variant).apply_chat_template(messages, add_generation_prompt=True,
                                                                      tokenize=True)["input_ids"]


def _after(prompt: list[int], generated: list[int]) -> str:
    """What generated tokens add to the prompt's text under the word-level tokenizer (specials skipped)."""
    words = lambda ids: " ".join(f"w{t}" for t in ids if t > 2)  # noqa: E731
    return words(prompt + generated)[len(words(prompt)):]


def test_a_whole_answer_is_the_templates_prompt_greedily_continued(servers, chat_variant):  # noqa: F811
    ids = _template_ids(chat_variant)
    expected = greedy(chat_variant, ids, 8)
    answer = servers["chat"].client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                                              temperature=0)
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", answer.id) and answer.object == "chat.completion"
    assert answer.model == MODEL and len(answer.choices) == 1
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == _after(ids, expected)
    assert choice.finish_reason == ("stop" if expected[-1] == 2 and len(expected) < 8 else "length")
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == len(expected)


def test_a_streamed_answer_equals_the_whole_one(servers):
    client = servers["chat"].client()
    body = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**body).choices[0]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **body))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stop_strings_and_n(servers):
    client = servers["chat"].client()
    body = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**body).choices[0].message.content
    stop = " ".join(full.split()[2:4])
    expected = full[:full.index(stop)]
    answer = client.chat.completions.create(n=2, stop=stop, **body)
    assert [c.index for c in answer.choices] == [0, 1]
    assert [(c.message.content, c.finish_reason) for c in answer.choices] == [(expected, "stop")] * 2
    streamed = list(client.chat.completions.create(stop=[stop], stream=True, **body))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_chat_logprobs_are_recipecs_log_softmax(servers, chat_variant):  # noqa: F811
    ids = _template_ids(chat_variant)
    choice = servers["chat"].client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True}).choices[0]
    generated = greedy(chat_variant, ids, 5, ignore_eos=True)
    ours = token_logprobs(chat_variant, ids + generated)
    entries = choice.logprobs.content
    assert len(entries) == 5
    for i, (entry, token) in enumerate(zip(entries, generated)):
        row = ours[len(ids) - 1 + i]
        assert entry.logprob == pytest.approx(row[token], abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(np.sort(row)[::-1][:3], abs=1e-4)


def test_a_base_model_without_a_template_gets_a_400_saying_how_to_give_one(servers):
    client = servers["base"].client()
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    error = raised.value.response.json()["error"]
    assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    assert "--chat-template" in error["message"] and "serving.chat_template" in error["message"]
    assert client.completions.create(model=MODEL, prompt="w5 w17", max_tokens=2).choices[0].text


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "w5"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": MESSAGES, "n": 0}, "n"),
    ({"messages": MESSAGES, "model": "other"}, "model"),
])
def test_bad_chat_requests_name_the_field(servers, body, param):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", servers["chat"].port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        status, error = response.status, json.loads(response.read())["error"]
    finally:
        conn.close()
    assert status == (404 if param == "model" else 400) and error["param"] == param and error["message"]


def test_content_parts_are_joined_as_text(servers):
    client = servers["chat"].client()
    parts = [{"role": "system", "content": [{"type": "text", "text": "w40 w41"}]}, MESSAGES[1]]
    body = dict(model=MODEL, max_tokens=4, temperature=0)
    assert client.chat.completions.create(messages=parts, **body).choices[0].message.content == \
        client.chat.completions.create(messages=MESSAGES, **body).choices[0].message.content


def test_the_command_lines_template_then_the_recipes_then_the_tokenizers(chat_variant, tmp_path):  # noqa: F811
    recipe_template = "{% for m in messages %}w20 {{ m['content'] }} {% endfor %}w21"
    build = make_build(tmp_path / "b", chat_variant, {**SERVING, "chat_template": recipe_template})
    given = "{% for m in messages %}w30 {{ m['content'] }} {% endfor %}"
    chosen = build_service(build, "baseline", chat_template=(given, "--chat-template t.jinja")).spec.chat_template
    assert chosen.origin == "--chat-template t.jinja" and chosen.render(MESSAGES) == "w30 w40 w41 w30 w5 w17 w99 "
    recipe = build_service(build, "baseline").spec.chat_template
    assert recipe.origin == "the recipe's serving.chat_template" and recipe.render(MESSAGES).endswith("w21")
    own = build_service(make_build(tmp_path / "c", chat_variant), "baseline").spec.chat_template
    assert own.origin.endswith("chat_template.jinja")
    with pytest.raises(UsageError, match=r"--chat-template t.jinja is not valid Jinja: line 1"):
        build_service(build, "baseline", chat_template=("{% for %}", "--chat-template t.jinja"))


def test_a_missing_template_file_is_a_usage_error(chat_variant, tmp_path, capsys):  # noqa: F811
    build = make_build(tmp_path / "b", chat_variant)
    assert main([str(build), "--chat-template", str(tmp_path / "none.jinja")]) == 2
    assert "cannot read --chat-template" in capsys.readouterr().err


def test_templates_render_as_transformers_renders_them(chat_variant):  # noqa: F811
    """The serving process renders without transformers; the environment must be the one transformers gives
    templates: trim_blocks/lstrip_blocks, loop controls, {% generation %}, tojson, raise_exception."""
    from transformers import AutoTokenizer

    template = """{%- for m in messages %}
  {%- if m['role'] == 'system' %}{{ m['content'] | tojson }}{% continue %}{% endif %}
  {% generation %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endgeneration %}
{% endfor %}
{%- if add_generation_prompt %}[assistant]{% endif %}"""
    messages = [{"role": "system", "content": "é \"q\" <b>"}, *MESSAGES[1:], {"role": "assistant", "content": "w7"}]
    tokenizer = AutoTokenizer.from_pretrained(chat_variant)
    ours = ChatTemplate(template, "test", {"bos_token": "<s>", "eos_token": "</s>"})
    for generation_prompt in (True, False):
        assert ours.render(messages, generation_prompt) == tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=generation_prompt, tokenize=False)
    refusing = ChatTemplate("{{ raise_exception('only user messages') }}", "test")
    with pytest.raises(Exception, match="only user messages") as raised:
        refusing.render(MESSAGES)
    assert raised.value.status == 400 and raised.value.param == "messages"
    assert CHAT_TEMPLATE in (chat_variant / "chat_template.jinja").read_text()
