"""Speculative decoding in the serving engine (n-gram lookup over shared-buffer slots): a batch of rows is
verified in one forward, each row keeps what its target accepts, and greedy output equals plain decoding
token for token, under every batching policy; where verification cannot run, the engine decodes plainly."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from conftest import run_pass
from recipec.onnx.requires import BATCH_1_CHUNKS
from recipec.runtime import lm as runtime
from recipec.runtime.engine import Engine, Policy
from recipec.runtime.slots import SlotLM
from recipec.runtime.speculative import SpecConfig
from test_runtime import PROMPTS

# repetitive prompts, so that prompt lookup proposes from the start, and two that are not
LOOKUP_PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [9, 9, 9, 9, 9, 9], *PROMPTS[:2]]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def shared_dir(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared-llama-spec")
    run_pass("fuse", exported("llama")[0], out, kv_buffer="shared")
    return out


def _serve(model, prompts, policy="continuous", batch=8, speculation=None):
    engine = Engine(model, Policy(policy, max_batch_size=batch), speculation=speculation)
    requests = [engine.submit(prompt, NEW_TOKENS) for prompt in prompts]
    for _ in range(2000):
        if not engine.step(flush=True):
            break
    assert all(r.finished and r.error is None for r in requests)
    return [r.tokens for r in requests], engine


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_speculative_batches_give_the_plain_greedy_tokens(shared_dir, policy):
    lm = runtime.load(shared_dir, device="cpu")
    plain, _ = _serve(SlotLM(lm, slots=4), LOOKUP_PROMPTS, policy)
    spec, engine = _serve(SlotLM(lm, slots=4), LOOKUP_PROMPTS, policy, speculation=SpecConfig("ngram", tokens=3))
    assert spec == plain
    stats = engine.spec_stats
    assert stats.proposed > 0 and 0 < stats.accepted <= stats.proposed
    # every token after each row's first came from a target step, so the steps account for all of them
    assert stats.step_tokens == sum(len(t) - 1 for t in spec)
    assert stats.tokens_per_target_step > 1.0


def test_verification_writes_in_place_and_rolls_back_by_length_alone(shared_dir):
    slots = SlotLM(runtime.load(shared_dir, device="cpu"), slots=2, capacity=64)
    logits, batch = slots.prefill([[5, 6, 7, 8], [9, 9]])
    pointers, lengths = slots.buffer_pointers(), slots.lengths.copy()
    fed = np.array([[int(logits[0].argmax()), 5, 6], [int(logits[1].argmax()), 9, 9]])
    verified = slots.verify(fed, batch)
    assert verified.shape == (2, 3, slots.vocab_size)
    assert slots.buffer_pointers() == pointers and list(slots.lengths) == list(lengths + 3)
    slots.keep(batch, [2, 0])
    assert list(slots.lengths) == [lengths[0] + 1, lengths[1] + 3]
    # the first verified position is what a plain decode step of the same token gives
    plain = SlotLM(runtime.load(shared_dir, device="cpu"), slots=2, capacity=64)
    _, plain_batch = plain.prefill([[5, 6, 7, 8], [9, 9]])
    one, _ = plain.decode(fed[:, 0], plain_batch)
    np.testing.assert_allclose(verified[:, 0], one, atol=1e-4)


def test_a_graph_that_verifies_at_batch_1_only_decodes_a_batch_plainly(shared_dir):
    lm = runtime.load(shared_dir, device="cpu")
    plain, _ = _serve(SlotLM(lm, slots=4), LOOKUP_PROMPTS[:2])
    lm.artifact.setdefault("requires", {})["limits"] = [{"id": BATCH_1_CHUNKS, "text": "older onnxruntime"}]
    slots = SlotLM(lm, slots=4)
    spec, engine = _serve(slots, LOOKUP_PROMPTS[:2], speculation=SpecConfig("ngram", tokens=3))
    assert spec == plain
    # both rows run side by side the whole time: no step could verify, so every step emitted one token a row
    assert engine.spec_stats.proposed == 0 and engine.spec_stats.tokens_per_target_step == 1.0
    _, batch = slots.prefill([[1, 2, 3]])
    assert slots.verifies(batch)  # one row: the graph runs it


def test_the_engine_refuses_a_draft_model_and_ignores_speculation_without_verify(shared_dir):
    lm = runtime.load(shared_dir, device="cpu")
    with pytest.raises(ValueError, match="ngram"):
        Engine(SlotLM(lm, slots=2), Policy(), speculation=SpecConfig("draft", 2, draft="int4"))
    assert Engine(lm, Policy(), speculation=SpecConfig("ngram", 2)).speculation is None


def test_the_profilers_serving_runs_speculate_as_the_recipe_says(shared_dir, exported):
    from recipec.profile.markdown import _engine_speculation_md
    from recipec.profile.profiler import measure_runs, serving_plan

    serving = {"speculative": {"method": "ngram", "tokens": 3},
               "workload": {"prompt_tokens": 8, "output_tokens": 16, "requests": 4, "warmup_requests": 1,
                            "concurrency": [2]}}
    runs = serving_plan(serving)
    assert runs[0]["speculative"] == {"method": "ngram", "tokens": 3}
    assert "speculative" not in serving_plan({**serving, "speculative": {"method": "draft", "draft": "x"}})[0]
    shared = measure_runs(runtime.load(shared_dir, device="cpu"), runs, 256)[0]["speculation"]
    growing = measure_runs(runtime.load(exported("llama")[0], device="cpu"), runs, 256)[0]["speculation"]
    assert shared["ran"] is True and shared["target_steps"] > 0 and shared["tokens_per_target_step"] >= 1.0
    assert growing == {"ran": False, "why": "the variant's graph has no shared KV buffer (fuse kv_buffer: shared)"}
    schema = json.loads((Path(__file__).parents[1] / "recipec/schemas/report.schema.json").read_text())
    for stats in (shared, growing):
        jsonschema.validate(stats, schema["$defs"]["run"]["properties"]["speculation"])
    report = {"variants": {"shared": {"serving": [{**runs[0], "speculation": shared, "tpot_ms": {"p50": 1.5}}]}}}
    assert "| **shared** | continuous | 2 |" in "\n".join(_engine_speculation_md(report))


def test_recipec_serve_speculates_from_the_recipe_and_answers_as_without(shared_dir, tmp_path):
    from openai_server import make_build, serving

    def complete(server, prompt):
        body = json.dumps({"model": "tiny/baseline", "prompt": prompt, "max_tokens": NEW_TOKENS,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"{server.url}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["choices"][0]["text"]

    build = make_build(tmp_path / "out", shared_dir, {
        "device": "cpu", "threads": 1, "speculative": {"method": "ngram", "tokens": 3},
        "batching": {"policy": "continuous", "max_batch_size": 4, "max_wait_ms": 5, "max_tokens_per_step": 4096}})
    with serving(build, tmp_path, "--speculative", "off") as server:
        plain = [complete(server, prompt) for prompt in LOOKUP_PROMPTS]
    with serving(build, tmp_path) as server:
        speculative = [complete(server, prompt) for prompt in LOOKUP_PROMPTS]
        started = server.log.read_text()
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
            metrics = dict(line.rsplit(" ", 1) for line in response.read().decode().splitlines()
                           if line and not line.startswith("#"))
    assert "speculative ngram K=3" in started
    assert speculative == plain and all(plain)
    proposed, accepted = (int(metrics[f"recipec_spec_decode_{kind}_tokens_total"]) for kind in ("proposed", "accepted"))
    assert proposed > 0 and 0 <= accepted <= proposed


def test_the_batch_1_comparison_runs_a_shared_buffer_variant_through_the_engine(shared_dir, exported):
    from recipec.profile.speculative import measure_speculative

    # the half window [9] * 6, whose greedy continuation on this model repeats one token for a while
    windows = np.array([[9] * 12] * 2, dtype=np.int64)
    serving = {"workload": {"output_tokens": NEW_TOKENS}}
    spec = SpecConfig("ngram", tokens=3)
    shared = measure_speculative(runtime.load(shared_dir, device="cpu"), shared_dir, spec, windows, serving)
    growing_dir = exported("llama")[0]
    growing = measure_speculative(runtime.load(growing_dir, device="cpu"), growing_dir, spec, windows, serving)
    assert shared["path"] == "engine" and growing["path"] == "run"
    for entry in (shared, growing):
        assert entry["identical_greedy"] is True and entry["acceptance_rate"] > 0
        assert entry["tokens_per_target_step"] > 1.0 and entry["new_tokens"] == NEW_TOKENS
