"""Speculative decoding (runtime/speculative.py): lossless token for token against OnnxLM.generate with
n-gram lookup, with a draft (the target itself, another model, one that is always wrong); the rollback
leaves the cache a plain run of the kept tokens would; the rejection scheme samples the target's
distribution; the recipe's serving.speculative and `recipec run --speculative`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
import onnxruntime as ort
import pytest

from conftest import make_tiny_model, run_export_op
from recipec.cli import main
from recipec.recipe.schema import build_recipe_schema
from recipec.runtime import lm as runtime
from recipec.runtime.kv_ops import KVOps
from recipec.runtime.proposers import DraftProposer, NgramIndex, NgramProposer, Proposal, Sampler, lookup
from recipec.runtime.speculative import SpecConfig, generate_speculative, verify

# The first prompt repeats itself, so that lookups find earlier occurrences.
PROMPTS = [[5, 17, 9, 3, 12, 8, 5, 17, 9, 3, 12, 8, 5, 17], [7, 1, 25], [9, 9, 30, 31, 3]]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def variants(tmp_path_factory, exported):
    """name -> variant directory: the shared tiny llama, another seed of it, and a 32-token vocabulary
    (random models repeat themselves more over a small one, so lookups hit)."""
    out = {"llama": exported("llama")[0]}
    for name, seed, overrides in (("other", 1, {}), ("small_vocab", 0, {"vocab_size": 32})):
        model = make_tiny_model("llama", tmp_path_factory.mktemp(f"torch-{name}"), seed=seed, **overrides)
        out[name] = tmp_path_factory.mktemp(f"onnx-{name}")
        run_export_op(model, out[name])
    return out


@pytest.fixture(scope="module")
def lms(variants):
    return {name: runtime.load(path, device="cpu") for name, path in variants.items()}


def greedy(lm, prompts=PROMPTS, tokens=NEW_TOKENS, **kwargs):
    return lm.generate(prompts, tokens, ignore_eos=True, **kwargs).tokens


def test_lookup_proposes_what_followed_the_most_recent_match():
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 3) == [7, 1]  # the later of two matches
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 5, 3) == [7, 1, 2, 3]  # as many as follow
    assert lookup([4, 2, 5, 3, 2], 3, 3) == [5, 3, 2]  # the 3- and 2-grams miss; 1-gram [2] hits
    assert lookup([4, 5, 6], 3, 3) == [] and lookup([4], 3, 3) == []


def scan(context, k, max_ngram):
    """Prompt lookup by its definition: every earlier window of n tokens compared with the last n."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        starts = [i + n for i in range(len(context) - n) if context[i:i + n] == context[-n:]]
        if starts:
            return context[starts[-1]:starts[-1] + k]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=40), st.integers(0, 5), st.integers(1, 4), st.integers(1, 40))
def test_the_index_grown_token_by_token_proposes_what_a_scan_finds(context, k, max_ngram, chunk):
    index = NgramIndex(max_ngram)
    for start in range(0, len(context), chunk):  # grown in chunks, as the engine feeds a step's tokens
        index.extend(context[start:start + chunk])
        seen = context[:start + chunk]
        assert index.propose(k) == scan(seen, k, max_ngram)
    assert index.propose(k) == scan(context, k, max_ngram)


def test_the_ngram_proposer_starts_over_on_a_context_that_does_not_extend_the_last():
    proposer, sampler = NgramProposer(2), Sampler()
    assert proposer.propose([1, 2, 3, 1, 2], 2, sampler).tokens == [3, 1]
    assert proposer.propose([1, 2, 3, 1, 2, 3], 2, sampler).tokens == [1, 2]  # extended: indexed incrementally
    assert proposer.propose([5, 2, 7, 5], 2, sampler).tokens == [2, 7]  # another sequence
    assert proposer.index.tokens == [5, 2, 7, 5]


@pytest.mark.parametrize("k", [1, 4])
def test_ngram_is_lossless_and_accepts_lookups(lms, k):
    lm = lms["small_vocab"]
    result = generate_speculative(lm, PROMPTS, NEW_TOKENS, SpecConfig("ngram", k), ignore_eos=True)
    assert result.tokens == greedy(lm)
    stats = result.stats
    assert stats.accepted > 0 and stats.proposed > stats.accepted
    assert stats.tokens_per_target_step > 1.0
    assert stats.step_tokens == len(PROMPTS) * (NEW_TOKENS - 1) == stats.target_steps + stats.accepted


def test_target_as_its_own_draft_accepts_everything(lms):
    lm = lms["llama"]
    result = generate_speculative(lm, PROMPTS, NEW_TOKENS, SpecConfig("draft", 4, draft="self"), draft=lm,
                                  ignore_eos=True)
    assert result.tokens == greedy(lm)
    assert result.stats.acceptance_rate == 1.0
    # 39 tokens after the first: 7 steps of 4 proposals + 1, then 3 proposals + 1 (room for 4 only).
    assert result.stats.target_steps == len(PROMPTS) * 8


def test_another_model_as_draft_is_lossless(lms):
    result = generate_speculative(lms["llama"], PROMPTS, NEW_TOKENS, SpecConfig("draft", 3, draft="other"),
                                  draft=lms["other"], ignore_eos=True)
    assert result.tokens == greedy(lms["llama"])
    assert result.stats.proposed > 0


class WrongProposer:
    """Proposes k tokens that each differ from the target's greedy continuation at that position."""

    def __init__(self, prompt_and_tokens: dict[tuple[int, ...], list[int]], vocab: int):
        self.truth, self.vocab = prompt_and_tokens, vocab

    def propose(self, context, k, sampler):
        for prompt, tokens in self.truth.items():
            if tuple(context[:len(prompt)]) == prompt:
                done = len(context) - len(prompt)
                nxt = tokens[done:done + k]
                return Proposal([(t + 1) % self.vocab for t in nxt] + [0] * (k - len(nxt)))
        raise AssertionError("unknown prompt")


def test_always_wrong_draft_accepts_nothing_and_changes_nothing(lms):
    lm = lms["llama"]
    expected = greedy(lm)
    proposer = WrongProposer({tuple(p): t for p, t in zip(PROMPTS, expected)}, lm.vocab_size)
    result = generate_speculative(lm, PROMPTS, NEW_TOKENS, SpecConfig("ngram", 4), proposer=proposer,
                                  ignore_eos=True)
    assert result.tokens == expected
    assert result.stats.accepted == 0 and result.stats.acceptance_rate == 0.0
    assert result.stats.tokens_per_target_step == 1.0


def test_rollback_leaves_the_cache_of_a_plain_run(lms):
    """Verify 4 proposals of which the target keeps 2: the truncated cache is the cache of feeding the
    last token and those 2 alone."""
    lm = lms["llama"]
    prompt, truth = PROMPTS[0], greedy(lm, PROMPTS[:1], 4)[0]
    proposals = [truth[1], truth[2], (truth[3] + 1) % lm.vocab_size, 7]
    _, cache = lm.prefill([prompt])
    ids = np.array([[truth[0], *proposals]])
    logits, verified = lm.forward(ids, np.ones_like(ids), cache, logits_to_keep=5)
    accepted, new = verify(logits[0], Proposal(proposals), Sampler())
    assert (accepted, new) == (2, truth[1:4])
    rolled = verified.truncate(verified.seq_len - 2).host()
    _, plain = lm.forward(ids[:, :3], np.ones((1, 3), np.int64), cache)
    plain = plain.host()
    np.testing.assert_array_equal(rolled.mask, plain.mask)
    for got, want in zip(rolled.keys + rolled.values, plain.keys + plain.values, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("device_values", [False, True])
def test_truncate_keeps_the_leading_columns_exactly(device_values):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((2, 2, 6, 4)).astype(np.float32) for _ in range(4)]
    tensors = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays] if device_values else arrays
    cache = runtime.KVCache(tensors[:2], tensors[2:], np.array([[0, 1, 1, 1, 1, 1], [1] * 6]), KVOps("cpu"))
    cut = cache.truncate(4)
    assert all(isinstance(t, ort.OrtValue) for t in cut.keys) == device_values
    cut = cut.host()
    assert cut.mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]] and cut.positions().tolist() == [3, 4]
    for got, want in zip(cut.keys + cut.values, arrays, strict=True):
        np.testing.assert_array_equal(got, want[:, :, :4])
    assert cache.truncate(6) is cache and cache.truncate(0).host().keys[0].shape == (2, 2, 0, 4)
    with pytest.raises(ValueError):
        cache.truncate(7)


def test_eos_and_callbacks_match_generate(lms):
    lm = lms["llama"]
    eos = greedy(lm)[1][5]
    seen = []
    want = lm.generate(PROMPTS, NEW_TOKENS, eos_token_id=eos)
    got = generate_speculative(lm, PROMPTS, NEW_TOKENS, SpecConfig("draft", 4, draft="self"), draft=lm,
                               eos_token_id=eos, on_token=lambda seq, tok, t: seen.append((seq, tok)))
    assert got.tokens == want.tokens and got.finish_reasons == want.finish_reasons
    assert seen == [(seq, tok) for seq, tokens in enumerate(got.tokens) for tok in tokens]
    assert all(len(times) == len(tokens) for times, tokens in zip(got.token_times, got.tokens))
    assert got.tpot(0) is not None and got.ttft(0) > 0
    assert generate_speculative(lm, PROMPTS, 0, SpecConfig()).tokens == [[], [], []]


def _first_tokens(p_logits, proposals, q_probs, trials, seed):
    """The tokens verify emits over many trials, proposals drawn from q (or fixed when q is None)."""
    sampler = Sampler(1.0, rng=np.random.default_rng(seed))
    emitted = []
    for _ in range(trials):
        if q_probs is None:
            proposal = Proposal(list(proposals))
        else:
            drawn = [int(runtime.draw(q[None], sampler.rng)[0]) for q in q_probs]
            proposal = Proposal(drawn, q_probs)
        emitted.append(verify(p_logits, proposal, sampler)[1])
    return emitted


def _assert_distribution(tokens, probs, trials):
    counts = np.bincount(tokens, minlength=len(probs)) / trials
    # Four standard errors of each frequency, plus a hair for probabilities near 0.
    tolerance = 4 * np.sqrt(probs * (1 - probs) / trials) + 1e-3
    assert np.all(np.abs(counts - probs) <= tolerance), (counts, probs)


@pytest.mark.parametrize("draft", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(draft):
    """On a 5-token vocabulary with two proposals: the first emitted token is distributed as p after the
    last token, and the second, where the first proposal was kept, as p after it."""
    rng = np.random.default_rng(1)
    p_logits = rng.standard_normal((3, 5)) * 1.5
    p = runtime.probabilities(p_logits, 1.0)
    q = runtime.probabilities(rng.standard_normal((2, 5)) * 1.5, 1.0) if draft else None
    trials = 6000
    emitted = _first_tokens(p_logits, [1, 3], q, trials, seed=2)
    _assert_distribution([e[0] for e in emitted], p[0], trials)
    if not draft:  # fixed proposals: the first token was kept whenever it is 1
        second = [e[1] for e in emitted if e[0] == 1]
        _assert_distribution(second, p[1], len(second))


def test_sampling_with_the_target_as_draft_accepts_everything(lms):
    lm = lms["llama"]
    spec = SpecConfig("draft", 4, draft="self")
    result = generate_speculative(lm, PROMPTS, 12, spec, draft=lm, temperature=0.8, seed=3, ignore_eos=True)
    # p and q come from a 1-token and a 5-token forward: equal but for rounding, so almost never rejected.
    assert result.stats.acceptance_rate >= 0.95
    again = generate_speculative(lm, PROMPTS, 12, spec, draft=lm, temperature=0.8, seed=3, ignore_eos=True)
    assert again.tokens == result.tokens
    ngram = generate_speculative(lm, PROMPTS, 12, SpecConfig(), temperature=0.8, top_k=5, seed=3, ignore_eos=True)
    assert all(len(t) == 12 for t in ngram.tokens)


def test_draft_keeps_its_cache_in_step(lms):
    """After each call the draft's cache holds exactly the tokens it lists as fed, which start with the
    sequence verified so far."""
    lm, draft = lms["llama"], DraftProposer(lms["other"], 256)
    context = list(PROMPTS[0])
    for step in range(3):
        proposal = draft.propose(context, 3, Sampler())
        assert draft.fed[:len(context)] == context and draft.cache.seq_len == len(draft.fed)
        context += proposal.tokens[:step] + [step]  # keep some proposals, then a token of "the target's"
    with pytest.raises(ValueError, match="vocabulary"):
        DraftProposer(lms["small_vocab"], lm.vocab_size)


def test_config_and_schema():
    assert SpecConfig.from_serving({}) is None
    assert SpecConfig.from_serving({"speculative": {"method": "draft", "draft": "int4", "tokens": 2}}) == \
        SpecConfig("draft", 2, "int4")
    for bad in ({"method": "draft"}, {"method": "ngram", "tokens": 0}, {"method": "eagle"}):
        with pytest.raises(ValueError):
            SpecConfig(**bad)
    schema = build_recipe_schema()["properties"]["serving"]
    jsonschema.validate({"speculative": {"method": "ngram", "tokens": 5}}, schema)
    jsonschema.validate({"speculative": {"method": "draft", "draft": "pruned"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"speculative": {"method": "draft"}}, schema)


def _build_dir(tmp_path, variants, speculative=None):
    (tmp_path / "variants").mkdir()
    for name in ("llama", "other", "small_vocab"):
        (tmp_path / "variants" / name).symlink_to(variants[name])
    serving = {"speculative": speculative} if speculative else {}
    (tmp_path / "manifest.json").write_text(json.dumps({"recipe": {"resolved": {"serving": serving}}}))
    return tmp_path


def test_run_command_speculates_from_the_recipe_or_the_flag(tmp_path, variants, lms, capsys):
    build = _build_dir(tmp_path, variants, {"method": "draft", "draft": "llama", "tokens": 3})
    args = ["run", str(build), "--variant", "llama", "--prompt", "w5 w17 w9 w3", "--max-new-tokens", "8",
            "--device", "cpu"]
    assert main(args + ["--speculative", "off"]) == 0
    plain = capsys.readouterr()
    assert "speculative" not in plain.err + plain.out
    assert main(args) == 0
    drafted = capsys.readouterr()
    assert "speculative draft llama, K=3" in drafted.err and "100%" in drafted.err
    assert drafted.out == plain.out
    assert main(args + ["--speculative", "ngram", "--speculative-tokens", "2"]) == 0
    ngram = capsys.readouterr()
    assert "speculative ngram (n <= 3), K=2" in ngram.err and ngram.out == plain.out
    assert main(args + ["--draft", "small_vocab"]) == 2
    assert "vocabulary" in capsys.readouterr().err
    assert main(args + ["--speculative", "draft", "--draft", "nope"]) == 2


def test_a_draft_that_is_no_variant_of_the_build_is_refused_at_validate(tmp_path):
    from recipec.errors import RecipeInvalid
    from recipec.plan.planner import load_plan

    recipe = tmp_path / "r.yaml"
    recipe.write_text("""\
recipe: 1
name: spec
model: {source: synthetic, family: llama, config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 64}}
passes:
  - {id: small, op: quantize, with: {scheme: int4}}
serving:
  speculative: {method: draft, draft: smal}
""")
    with pytest.raises(RecipeInvalid) as caught:
        load_plan(recipe)
    assert any("serving.speculative.draft: no variant 'smal' to draft with (variants: baseline, small)" in m
               for m in caught.value.messages())
    recipe.write_text(recipe.read_text().replace("draft: smal}", "draft: small}"))
    assert load_plan(recipe).variants == {"baseline": "baseline", "small": "small"}


def test_profiler_measures_speculation_against_plain_decoding(variants, lms, tmp_path):
    """The report's speculative section: ngram on the small-vocabulary model (whose text repeats), and a draft
    found beside the variant by name; both lossless, their entries valid against the report schema."""
    from recipec.profile.profiler import _speculative
    from recipec.profile.markdown import _speculative_md

    schema = json.loads((Path(__file__).parents[1] / "recipec/schemas/report.schema.json").read_text())
    windows = np.array([PROMPTS[0] + PROMPTS[0][:2]] * 2, dtype=np.int64)  # 16 tokens: prompts of 8
    serving = {"speculative": {"method": "ngram", "tokens": 4}, "workload": {"output_tokens": 24}}
    entry = _speculative(lms["small_vocab"], variants["small_vocab"], serving, windows, lambda s: None)
    assert entry["identical_greedy"] is True and entry["prompts"] == 2 and entry["new_tokens"] == 24
    assert entry["prompt_tokens"] == 8 and 1.0 <= entry["tokens_per_target_step"] <= 5.0
    assert entry["acceptance_rate"] is not None and entry["tpot_ratio"] > 0
    jsonschema.validate(entry, schema["$defs"]["variant"]["properties"]["speculative"])
    build = tmp_path / "variants"
    for name in ("llama", "other"):
        shutil.copytree(variants[name], build / name)
    drafted = _speculative(lms["llama"], build / "llama", {"speculative": {"method": "draft", "tokens": 3,
                                                                           "draft": "other"}}, windows, print)
    assert drafted["identical_greedy"] is True and drafted["draft"] == "other"
    assert _speculative(lms["other"], build / "other", {"speculative": {"method": "draft", "draft": "other"}},
                        windows, print) is None  # the draft itself is not measured against itself
    assert _speculative(lms["llama"], build / "llama", {}, windows, print) is None
    markdown = "\n".join(_speculative_md({"variants": {"small_vocab": {"speculative": entry}}}))
    assert "## Speculative decoding" in markdown and "ngram K=4" in markdown and "Measured: batch 1" in markdown
