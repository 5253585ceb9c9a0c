"""/v1/completions as clients use it, driven with the real openai client against `recipec serve` on loopback
(issue #19): lists of prompts, n, stop strings and stop tokens (never leaking, across streamed chunks too),
logprobs and echo equal to recipec's own log-softmax of the model's logits, the model by its variant name,
/v1/models/{id}, OpenAI's error shape for an unknown model, ids that never repeat, and /metrics under
vLLM's names as prometheus_client parses them."""
from __future__ import annotations

import http.client
import re

import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from openai_server import chat_variant  # noqa: F401 (a fixture)
from openai_server import greedy, make_build, serving, token_logprobs, wait_for
from recipec.serve.metrics import Metrics

MODEL = "tiny/baseline"
PROMPT = [5, 17, 99, 3]
# Float tolerance between the server's numbers and recipec's own: the same graph and inputs, so the echo's
# forward is the same computation; generated tokens come from prefill and decode steps over a KV cache.
ECHO_TOLERANCE = 1e-5
STEP_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def server(chat_variant, tmp_path_factory):  # noqa: F811
    build = make_build(tmp_path_factory.mktemp("api-build"), chat_variant)
    with serving(build, tmp_path_factory.mktemp("api-logs"), "--metric-names", "both", "--max-queue", "8",
                 "--max-queue-per-client", "8") as running:
        yield running


def _words(ids: list[int]) -> str:
    """What the word-level tokenizer decodes ids to (special tokens skipped)."""
    return " ".join(f"w{t}" for t in ids if t > 2)


def _token(t: int) -> str:
    """A token's text as logprobs name it, special tokens included."""
    return ("<unk>", "<s>", "</s>")[t] if t < 3 else f"w{t}"


def _after(prompt: list[int], generated: list[int]) -> str:
    """A completion's text: what its tokens add to the prompt's text (a space first, for this tokenizer)."""
    return _words(prompt + generated)[len(_words(prompt)):]


def test_a_list_of_prompts_is_answered_as_each_alone(server, chat_variant):  # noqa: F811
    client = server.client()
    prompts = [[5, 17, 99], [40, 41], [7]]
    expected = [_after(ids, greedy(chat_variant, ids, 6)) for ids in prompts]
    as_text = client.completions.create(model=MODEL, prompt=[_words(p) for p in prompts], max_tokens=6, temperature=0)
    as_ids = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    for answer in (as_text, as_ids):
        assert [c.index for c in answer.choices] == [0, 1, 2]
        assert [c.text for c in answer.choices] == expected
        assert answer.usage.prompt_tokens == 6
        assert answer.usage.completion_tokens == sum(len(c.token_ids) for c in answer.choices)


def test_n_choices_each_draw_their_own_tokens(server):
    client = server.client()
    body = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.5, seed=11, extra_body={"ignore_eos": True})
    two = client.completions.create(n=2, **body)
    one = client.completions.create(n=1, **body)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].token_ids == one.choices[0].token_ids  # copy 0 draws as a request with n = 1
    assert two.usage.completion_tokens == 16 and two.usage.prompt_tokens == len(PROMPT)
    many = client.completions.create(n=4, **{**body, "seed": 12})
    assert len({tuple(c.token_ids) for c in many.choices}) > 1, "four sampled choices should not all be equal"


def test_n_4_takes_four_batch_slots_and_a_hang_up_frees_them(server):
    client = server.client()
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3000, n=4, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    wait_for(lambda: _gauge(server, "vllm:num_requests_running") == 4, "four choices running side by side")
    stream.close()
    wait_for(lambda: _gauge(server, "vllm:num_requests_running") == 0, "the hang-up to free the four slots")


def _gauge(server, name: str) -> float:
    families = {f.name: f for f in text_string_to_metric_families(_get(server, "/metrics")[1])}
    return families[name].samples[0].value


def _get(server, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_stop_strings_end_the_text_before_them_streamed_or_whole(server):
    client = server.client()
    body = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**body).choices[0].text
    words = full.split()
    stop = f" {words[3]} {words[4]}"  # two tokens: the second arrives in its own chunk
    expected = full[:full.index(stop)]
    whole = client.completions.create(stop=[stop, "never-generated"], **body).choices[0]
    assert (whole.text, whole.finish_reason) == (expected, "stop")
    chunks = [c.choices[0] for c in client.completions.create(stop=stop, stream=True, **body)]
    assert "".join(c.text for c in chunks) == expected
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]


def test_a_stop_token_ends_the_choice_without_its_text(server, chat_variant):  # noqa: F811
    client = server.client()
    tokens = greedy(chat_variant, PROMPT, 10, ignore_eos=True)
    stop = tokens[3]
    at = tokens.index(stop)
    choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True, "stop_token_ids": [stop]}).choices[0]
    assert choice.finish_reason == "stop" and choice.token_ids == tokens[:at + 1]
    assert choice.text == _after(PROMPT, tokens[:at])


def test_echo_logprobs_are_recipecs_log_softmax(server, chat_variant):  # noqa: F811
    """lm-eval's loglikelihood request (max_tokens 1, echo, logprobs 1) and the bare scoring one (max_tokens 0)."""
    client = server.client()
    ids = [5, 17, 99, 3, 40, 41, 7]
    ours = token_logprobs(chat_variant, ids)
    scored = client.completions.create(model=MODEL, prompt=[ids], max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert choice.text == _words(ids) and choice.finish_reason == "length" and choice.token_ids == []
    lp = choice.logprobs
    assert lp.tokens == [_token(t) for t in ids] and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = np.array(lp.token_logprobs[1:])
    want = ours[np.arange(len(ids) - 1), ids[1:]]
    assert np.abs(got - want).max() <= ECHO_TOLERANCE
    assert [max(top.values()) for top in lp.top_logprobs[1:]] == pytest.approx(ours[:-1].max(axis=1),
                                                                                abs=ECHO_TOLERANCE)
    assert lp.text_offset == [len(_words(ids[:i])) for i in range(len(ids))]  # each token's piece starts there
    lm_eval = client.completions.create(model=MODEL, prompt=[ids], max_tokens=1, echo=True, logprobs=1,
                                        temperature=0).choices[0]
    assert lm_eval.logprobs.token_logprobs[:-1] == pytest.approx(lp.token_logprobs, abs=ECHO_TOLERANCE)
    generated = lm_eval.token_ids[0]
    assert lm_eval.logprobs.token_logprobs[-1] == pytest.approx(ours[-1, generated], abs=STEP_TOLERANCE)
    assert lm_eval.text == _words(ids + [generated])  # the echo, then what the token adds to it


def test_generated_logprobs_and_their_alternatives(server, chat_variant):  # noqa: F811
    client = server.client()
    choice = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True}).choices[0]
    sequence = PROMPT + choice.token_ids
    ours = token_logprobs(chat_variant, sequence)
    rows = np.arange(len(PROMPT) - 1, len(sequence) - 1)
    assert np.abs(np.array(choice.logprobs.token_logprobs) - ours[rows, choice.token_ids]).max() <= STEP_TOLERANCE
    for top, row, token in zip(choice.logprobs.top_logprobs, rows, choice.token_ids):
        assert len(top) == 2  # greedy: the chosen token is the most likely, among the two
        best = np.argsort(-ours[row])[:2]
        assert top == pytest.approx({_token(t): ours[row, t] for t in best}, abs=STEP_TOLERANCE)
        assert token == best[0]
    streamed = [c.choices[0] for c in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                                                 temperature=0, logprobs=2, stream=True,
                                                                 extra_body={"ignore_eos": True})]
    assert [t for c in streamed if c.logprobs for t in c.logprobs.token_logprobs] == \
        pytest.approx(choice.logprobs.token_logprobs, abs=1e-9)


def test_the_model_answers_to_its_variant_name_and_models_lists_it(server):
    client = server.client()
    assert client.completions.create(model="baseline", prompt=PROMPT, max_tokens=2).model == MODEL
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve("baseline").id == MODEL
    assert [m.id for m in client.models.list()] == [MODEL]


@pytest.mark.parametrize("call", ["models", "completions", "route"])
def test_unknown_names_are_404_in_openais_shape(server, call):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as raised:
        if call == "models":
            client.models.retrieve("other")
        elif call == "completions":
            client.completions.create(model="other", prompt=PROMPT, max_tokens=2)
        else:
            client.get("/nope", cast_to=object)
    error = raised.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "not_found_error"
    assert error["code"] == 404
    assert call == "route" or ("tiny/baseline" in error["message"] and error["param"] == "model")


def test_ids_are_random_and_unique(server):
    client = server.client()
    ids = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).id for _ in range(3)]
    assert all(re.fullmatch(r"cmpl-[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 3


def test_metrics_under_vllms_names_parse_and_agree(server):
    server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    families = {f.name: f for f in text_string_to_metric_families(_get(server, "/metrics")[1])}
    for name in ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_prompt_tokens", "vllm:request_generation_tokens"):
        assert families[name].type == "histogram"
        assert {s.labels["model_name"] for s in families[name].samples} == {MODEL}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert families[name].type == "gauge" and families[name].samples[0].labels == {"engine": "0",
                                                                                       "model_name": MODEL}
    assert families["vllm:prompt_tokens"].type == "counter"
    value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels.get("le")
             and "finished_reason" not in s.labels and "outcome" not in s.labels and "reason" not in s.labels}
    assert value["vllm:prompt_tokens_total"] == value["recipec_prompt_tokens_total"] > 0
    assert value["vllm:generation_tokens_total"] == value["recipec_generation_tokens_total"] > 0
    assert value["vllm:time_to_first_token_seconds_count"] == value["recipec_time_to_first_token_seconds_count"]
    success = {s.labels["finished_reason"]: s.value for s in families["vllm:request_success"].samples}
    outcomes = {s.labels["outcome"]: s.value for s in families["recipec_requests"].samples}
    assert success == {"stop": outcomes["stop"], "length": outcomes["length"],
                       "abort": outcomes["cancelled"] + outcomes["error"]}


def test_vllm_names_alone_leave_recipecs_out():
    text = Metrics("vllm", 256).render(1, 2, {"model": "m/v"})
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "vllm:num_requests_waiting" in names and not any(n.startswith("recipec_") for n in names)
    with pytest.raises(ValueError, match="metric names"):
        Metrics("prometheus")
