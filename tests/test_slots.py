"""The shared-buffer KV path (fuse kv_buffer: shared + runtime.slots): the graph describes itself as sharable,
requests join and leave a running batch with no cache copy and the buffers are written in place, and greedy
output equals transformers at batch 1 and on a batch of prompts of different lengths."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import run_pass
from recipec.deploy.genai import write_genai_config
from recipec.runtime import lm as runtime
from recipec.runtime.engine import Engine, Policy
from recipec.runtime.kv_ops import KVOps
from recipec.runtime.slots import SlotLM, step_model
from test_runtime import NEW_TOKENS, PROMPTS, _transformers_greedy


@pytest.fixture(scope="module")
def shared(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared-llama")
    metrics = run_pass("fuse", exported("llama")[0], out, kv_buffer="shared")
    return out, metrics


def _engine_tokens(model, prompts, new_tokens, policy="continuous", batch=8):
    engine = Engine(model, Policy(policy, max_batch_size=batch))
    requests = [engine.submit(prompt, new_tokens) for prompt in prompts]
    for _ in range(1000):
        if not engine.step(flush=True):
            break
    assert all(r.finished for r in requests)
    return [r.tokens for r in requests]


def test_fused_graph_says_its_buffer_is_shared(shared, exported):
    out, metrics = shared
    artifact = json.loads((out / "artifact.json").read_text())
    assert metrics["kv_buffer"] == "shared" and metrics["fused_ops"]["GroupQueryAttention"] == 2
    assert artifact["kv_cache"]["buffer"] == "shared"
    # rotary runs inside GroupQueryAttention, from cos/sin tables by position: no RotaryEmbedding, no per-step cos
    assert metrics["rewrites"]["rotary_in_attention"] == 2
    assert not {"RotaryEmbedding", "Cos", "Sin"} & set(metrics["ops_after"])
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]  # kept as contract
    # q/k/v packed in GroupQueryAttention's query input: no Split between the projection and the attention
    assert metrics["rewrites"]["packed_qkv_attention"] == 2
    assert all(list(n.input[1:3]) == ["", ""] for n in graph.node if n.op_type == "GroupQueryAttention")
    assert json.loads(write_genai_config(out).read_text())["search"]["past_present_share_buffer"] is True
    growing = json.loads((exported("llama")[0] / "artifact.json").read_text())
    assert growing["kv_cache"]["buffer"] == "growing"


def test_an_older_target_keeps_rotary_embedding_and_three_attention_inputs(exported, tmp_path):
    metrics = run_pass("fuse", exported("llama")[0], tmp_path, kv_buffer="shared", target_onnxruntime="1.22")
    assert metrics["ops_after"]["RotaryEmbedding"] == 4 and "packed_qkv_attention" not in metrics["rewrites"]


def test_greedy_equals_transformers_alone_and_in_a_batch_of_different_lengths(shared, tiny_model_dir):
    slots = SlotLM(runtime.load(shared[0], device="cpu"), slots=4)
    reference = tiny_model_dir("llama")
    assert _engine_tokens(slots, PROMPTS[:1], NEW_TOKENS) == _transformers_greedy(reference, PROMPTS[:1], NEW_TOKENS)
    batched = _engine_tokens(slots, PROMPTS, NEW_TOKENS, policy="static", batch=len(PROMPTS))
    assert batched == _transformers_greedy(reference, PROMPTS, NEW_TOKENS)
    assert len({tuple(t) for t in batched}) == len(PROMPTS)


def test_joining_and_leaving_copy_no_cache_and_write_in_place(shared, monkeypatch):
    lm = runtime.load(shared[0], device="cpu")
    prompts, lengths = [*PROMPTS, [11, 12, 13, 14]], [9, 3, 8, 4]
    alone = [lm.generate([p], n, ignore_eos=True).tokens[0] for p, n in zip(prompts, lengths)]
    slots = SlotLM(lm, slots=3, capacity=64)
    pointers = slots.buffer_pointers()

    def no_cache_move(*args, **kwargs):
        raise AssertionError("a join or leave moved the cache")

    for move in ("select", "merge", "truncate", "widen"):
        monkeypatch.setattr(KVOps, move, no_cache_move)
    decoded_slots = []
    decode = slots.decode
    monkeypatch.setattr(slots, "decode", lambda tokens, batch: (decoded_slots.append(list(batch.slots)),
                                                                 decode(tokens, batch))[1])
    engine = Engine(slots, Policy("continuous", max_batch_size=3))
    requests = [engine.submit(p, n) for p, n in zip(prompts[:3], lengths[:3])]
    for step in range(100):
        if step == 5:  # the short request has left slot 1; this one joins into it
            requests.append(engine.submit(prompts[3], lengths[3]))
        if not engine.step(flush=True):
            break
    assert [r.tokens for r in requests] == alone
    assert [0, 2] in decoded_slots, "a decode step should have run around the free slot 1"
    assert [0, 2, 1] in decoded_slots, "the late request should have joined into slot 1"
    assert slots.buffer_pointers() == pointers
    assert slots.in_use() == set()  # the engine dropped its batches, so every slot is free again


def test_a_buffer_that_outgrows_its_capacity_doubles_and_still_decodes_exactly(shared):
    lm = runtime.load(shared[0], device="cpu")
    alone = [lm.generate([p], NEW_TOKENS, ignore_eos=True).tokens[0] for p in PROMPTS]
    slots = SlotLM(lm, slots=3, capacity=8)
    assert _engine_tokens(slots, PROMPTS, NEW_TOKENS) == alone
    # 8 -> 16: the longest row holds 7 prompt tokens + 9 fed back (the 10th new token is never fed)
    assert slots.capacity == 16


def test_the_left_padded_path_refuses_a_shared_buffer_graph_and_step_model_picks_slots(shared, exported):
    lm = runtime.load(shared[0], device="cpu")
    with pytest.raises(ValueError, match="right-padding"):
        lm.prefill(PROMPTS)
    assert isinstance(step_model(lm, 2), SlotLM)
    growing = runtime.load(exported("llama")[0], device="cpu")
    assert step_model(growing, 2) is growing


def test_slots_run_out_with_a_clear_error(shared):
    slots = SlotLM(runtime.load(shared[0], device="cpu"), slots=1)
    _, held = slots.prefill([PROMPTS[0]])
    with pytest.raises(RuntimeError, match="all 1 slots are in use"):
        slots.prefill([PROMPTS[1]])
    del held
    slots.prefill([PROMPTS[1]])
    assert np.all(slots.lengths == [len(PROMPTS[1])])
