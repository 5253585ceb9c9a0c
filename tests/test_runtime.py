"""The runtime: greedy generation equals transformers' generate token for token, caches can be split and
merged mid-decode, sampling obeys its parameters, and load/tokenizer behave."""
from __future__ import annotations

import onnxruntime
import numpy as np
import onnx
import pytest
import torch

from recipec.errors import PassError
from recipec.onnx import artifact as art
from recipec.runtime import lm as runtime
from recipec.passes.onnx.export import TESTED_FAMILIES

PROMPTS = [[5, 17, 99, 3, 42, 8, 200], [7, 1, 250], [9, 9, 30, 31, 32]]
NEW_TOKENS = 10


def _transformers_greedy(model_dir, prompts, new_tokens):
    """transformers' generate on a left-padded batch, without eos so every row runs new_tokens steps."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.eos_token_id = None
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[:, width:].tolist()


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_greedy_matches_transformers(family, exported, tiny_model_dir):
    lm = runtime.load(exported(family)[0], device="cpu")
    single = lm.generate(PROMPTS[:1], NEW_TOKENS, ignore_eos=True).tokens
    assert single == _transformers_greedy(tiny_model_dir(family), PROMPTS[:1], NEW_TOKENS)
    batch = lm.generate(PROMPTS, NEW_TOKENS, ignore_eos=True).tokens
    assert batch == _transformers_greedy(tiny_model_dir(family), PROMPTS, NEW_TOKENS)
    assert len({tuple(t) for t in batch}) == len(PROMPTS), "prompts should not all continue alike"


def test_eos_stops_only_its_sequence(exported):
    lm = runtime.load(exported("llama")[0])
    free = lm.generate(PROMPTS, NEW_TOKENS, ignore_eos=True).tokens
    eos = free[1][3]
    stopped = lm.generate(PROMPTS, NEW_TOKENS, eos_token_id=eos)
    for seq, tokens in enumerate(free):
        cut = tokens.index(eos) + 1 if eos in tokens else NEW_TOKENS
        assert stopped.tokens[seq] == tokens[:cut]
        assert stopped.finish_reasons[seq] == ("eos" if eos in tokens else "length")
    assert lm.generate(PROMPTS, NEW_TOKENS, eos_token_id=eos, ignore_eos=True).tokens == free


def test_artifact_eos_is_the_default(exported):
    lm = runtime.load(exported("llama")[0])
    assert lm.eos_token_ids == (2,)
    free = lm.generate(PROMPTS, NEW_TOKENS, ignore_eos=True).tokens
    assert lm.generate(PROMPTS, NEW_TOKENS).tokens == lm.generate(PROMPTS, NEW_TOKENS, eos_token_id=2).tokens
    assert lm.generate(PROMPTS, NEW_TOKENS).tokens == [t[:t.index(2) + 1] if 2 in t else t for t in free]


def _alone(lm, prompt, tokens):
    """Logits before each of `tokens` when the prompt runs alone, fed those tokens."""
    logits, cache = lm.prefill([prompt])
    out = [logits[0]]
    for token in tokens[:-1]:
        logits, cache = lm.decode([token], cache)
        out.append(logits[0])
    return out


def test_requests_can_leave_and_join_a_running_batch(exported):
    """Continuous batching: a row selected out of one cache and merged with another decodes exactly as it
    would alone (logits compared, not only tokens: decisive logits would hide small errors)."""
    lm = runtime.load(exported("qwen2")[0])
    seqs = {i: lm.generate([p], 6, ignore_eos=True).tokens[0] for i, p in enumerate(PROMPTS)}
    got = {0: [], 1: [], 2: []}
    logits, running = lm.prefill(PROMPTS[:2])
    for step in range(4):
        got[0].append(logits[0])
        got[1].append(logits[1])
        if step < 3:
            logits, running = lm.decode([seqs[0][step], seqs[1][step]], running)
    # Sequence 0 leaves; sequence 2 joins with a fresh prefill: a shorter cache, left-padded by merge.
    joining_logits, joining = lm.prefill([PROMPTS[2]])
    got[2].append(joining_logits[0])
    running = running.select([1]).merge(joining)
    assert running.batch_size == 2 and running.mask.sum(axis=1).tolist() == [len(PROMPTS[1]) + 3, len(PROMPTS[2])]
    for step in range(2):
        logits, running = lm.decode([seqs[1][3 + step], seqs[2][step]], running)
        got[1].append(logits[0])
        got[2].append(logits[1])
    for seq, logits in got.items():
        np.testing.assert_allclose(np.array(logits), np.array(_alone(lm, PROMPTS[seq], seqs[seq])[:len(logits)]),
                                   atol=1e-4, err_msg=f"sequence {seq}")


def test_select_drops_columns_that_only_padding_used():
    cache = runtime.KVCache([np.arange(24, dtype=np.float32).reshape(2, 1, 4, 3)], [np.zeros((2, 1, 4, 3), np.float32)],
                            np.array([[0, 0, 1, 1], [0, 1, 1, 1]]))
    kept = cache.select([0])
    assert kept.seq_len == 2 and kept.mask.tolist() == [[1, 1]]
    np.testing.assert_array_equal(kept.keys[0], cache.keys[0][:1, :, 2:])
    merged = kept.merge(cache.select([1]))
    assert merged.mask.tolist() == [[0, 1, 1], [1, 1, 1]] and merged.keys[0].shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(merged.keys[0][0, :, 1:], kept.keys[0][0])
    assert not merged.keys[0][0, :, 0].any() and not merged.values[0][0, :, 0].any()
    assert merged.positions().tolist() == [2, 3]


def test_prefill_returns_the_last_position_of_each_prompt(exported):
    lm = runtime.load(exported("gpt2")[0])
    logits, cache = lm.prefill(PROMPTS)
    assert logits.shape == (3, 256) and cache.seq_len == 7 and cache.mask.sum(axis=1).tolist() == [7, 3, 5]
    for row, prompt in enumerate(PROMPTS):
        alone, _ = lm.forward(np.array([prompt]), np.ones((1, len(prompt)), np.int64), lm.empty_cache(1))
        np.testing.assert_allclose(logits[row], alone[0, -1], atol=1e-4)


def test_graph_without_logits_to_keep_still_generates(exported, tmp_path):
    """A later pass may fold the optional input into a constant; the runtime then slices the logits."""
    variant, _ = exported("llama")
    proto = onnx.load(str(variant / "model.onnx"))
    keep = [v for v in proto.graph.input if v.name != "logits_to_keep"]
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    art.write_artifact_json(tmp_path, base=art.read_artifact(variant))
    folded = runtime.load(tmp_path)
    assert art.read_artifact(tmp_path)["logits"]["mode"] == "all"
    expected = runtime.load(variant).generate(PROMPTS, 5, ignore_eos=True).tokens
    assert folded.generate(PROMPTS, 5, ignore_eos=True).tokens == expected


def test_sampling_is_seeded_and_obeys_top_k_and_top_p(exported):
    lm = runtime.load(exported("llama")[0])
    greedy = lm.generate(PROMPTS, 6, ignore_eos=True).tokens
    a = lm.generate(PROMPTS, 6, temperature=1.0, seed=7, ignore_eos=True).tokens
    assert a == lm.generate(PROMPTS, 6, temperature=1.0, seed=7, ignore_eos=True).tokens
    assert a != lm.generate(PROMPTS, 6, temperature=1.0, seed=8, ignore_eos=True).tokens
    assert lm.generate(PROMPTS, 6, temperature=1.5, top_k=1, seed=1, ignore_eos=True).tokens == greedy
    assert lm.generate(PROMPTS, 6, temperature=1.5, top_p=1e-6, seed=1, ignore_eos=True).tokens == greedy
    for bad in ({"top_p": 0}, {"top_k": -1}, {"temperature": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            lm.generate(PROMPTS, 6, **bad)


def test_sample_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 20000))
    rng = np.random.default_rng(0)
    counts = np.bincount(runtime.sample(logits, 1.0, rng=rng), minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    counts = np.bincount(runtime.sample(logits, 1.0, top_k=2, rng=rng), minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.015)
    counts = np.bincount(runtime.sample(logits, 1.0, top_p=0.9, rng=rng), minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.015)


def test_callback_and_timestamps(exported):
    lm = runtime.load(exported("mixtral")[0], threads=1)
    seen = []
    result = lm.generate(PROMPTS, 4, ignore_eos=True, on_token=lambda seq, tok, t: seen.append((seq, tok, t)))
    generated = [(s, tok) for s, toks in enumerate(result.tokens) for tok in toks]
    assert sorted((s, tok) for s, tok, _ in seen) == sorted(generated)
    for seq in range(len(PROMPTS)):
        times = result.token_times[seq]
        assert len(times) == 4 and times == sorted(times) and times == [t for s, _, t in seen if s == seq]
        assert 0 < result.ttft(seq) and 0 < result.tpot(seq) == pytest.approx((times[-1] - times[0]) / 3)
    assert lm.generate(PROMPTS, 0).tokens == [[], [], []]


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="a GPU is present")
def test_cuda_requested_without_provider_is_a_clear_error(exported):
    with pytest.raises(PassError, match="no CUDAExecutionProvider"):
        runtime.load(exported("llama")[0], device="cuda")
    assert runtime.load(exported("llama")[0], device="auto").device == "cpu"


def test_tokenizer(exported):
    tok = runtime.tokenizer(exported("llama")[0])
    assert tok("w5 w17 w99")["input_ids"] == [5, 17, 99] and tok.eos_token_id == 2
    assert runtime.tokenizer(exported("gpt2")[0]) is None


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(PassError, match="has no artifact.json"):
        runtime.load(tmp_path)
    with pytest.raises(ValueError, match="device must be one of"):
        runtime.load(tmp_path, device="tpu")


def test_runtime_import_leaves_torch_out():
    """Serving processes measure their memory; torch would add ~250 MB resident to every one."""
    import subprocess
    import sys

    code = ("import sys, recipec.runtime.engine, recipec.runtime.lm; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
