"""artifact.json's `requires` and `target_onnxruntime`: the requirement is read off the graph, a targeted build
runs on that onnxruntime, and an untargeted one is refused by it. The older onnxruntimes run in their own
environments (tests/peer_envs.py), created on first use."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import RECIPE_HEAD, RandomWindows, run_pass
from peer_envs import peer_python, run_probe

from recipec.deploy import triton
from recipec.errors import PassError, RecipeInvalid
from recipec.onnx import requires, sessions
from recipec.onnx.fusions import compat
from recipec.plan.planner import load_plan
from recipec.runtime.engine import Policy

GQA = "GroupQueryAttention"
# Scores are quantize's business (tests/test_quantize.py); here only the operators it writes matter.
ANY_SCORE = {"max_kl": 1e6, "min_top1": 0.0}


@pytest.fixture(scope="module")
def built(exported, tmp_path_factory):
    """(family, target, scheme) -> variant directory: the export fused (and quantized) for that target."""
    done = {}

    def get(family: str, target: str | None = None, scheme: str | None = None):
        if (family, target, scheme) not in done:
            out = tmp_path_factory.mktemp(f"{family}-{target}-{scheme}")
            if scheme in (None, "shared"):
                run_pass("fuse", exported(family)[0], out, target_onnxruntime=target,
                         kv_buffer="shared" if scheme else "growing")
            elif scheme == "kv8":
                run_pass("quantize_kv", get(family, target, "shared"), out, data=RandomWindows(), max_kl=1e6)
            else:
                run_pass("quantize", get(family, target), out, data=RandomWindows(), scheme=scheme,
                         target_onnxruntime=target, **ANY_SCORE)
            done[(family, target, scheme)] = out
        return done[(family, target, scheme)]

    return get


def needs(variant) -> dict:
    return json.loads((variant / "artifact.json").read_text())["requires"]


def ops_of(variant) -> dict[str, int]:
    """op type -> input count of its nodes (the largest, where they differ)."""
    found = {}
    for node in onnx.load(str(variant / "model.onnx"), load_external_data=False).graph.node:
        found[node.op_type] = max(found.get(node.op_type, 0), len(node.input))
    return found


def test_an_export_needs_nothing_newer_than_the_oldest_known_release(exported):
    found = needs(exported("llama")[0])
    assert found["onnxruntime"] == requires.OLDEST and found["because"] == [] and found["contrib_ops"] == []
    assert found["opsets"] == {"ai.onnx": 20} and found["built_with"] == requires.installed()


def test_a_default_fuse_and_quantize_record_the_signatures_they_use(built, exported):
    fused = needs(built("llama"))
    gqa = next(e for e in fused["contrib_ops"] if e["op_type"] == GQA)
    assert (gqa["domain"], gqa["inputs"], gqa["nodes"], gqa["onnxruntime"]) == ("com.microsoft", 17, 2, "1.32")
    assert fused["onnxruntime"] == "1.32" and fused["because"] == [f"{GQA} with 17 inputs"]
    assert fused["opsets"] == {"ai.onnx": 20, "com.microsoft": 1} and fused["limits"] == []
    table = next(e for e in needs(built("llama", scheme="int4"))["contrib_ops"] if e["op_type"] == "GatherBlockQuantized")
    assert table["onnxruntime"] == "1.23" and table["why"] == "attribute bits" and "bits" in table["attributes"]
    mha = needs(built("gpt2"))
    assert mha["onnxruntime"] == "1.21" and "wrong values at batch > 1" in mha["because"][0]


def test_the_facts_answer_per_signature():
    assert [requires.release_for("com.microsoft", GQA, n)[0] for n in (9, 11, 12, 17, 18)] == [
        "1.20", "1.22", "1.23", "1.32", None]
    assert requires.release_for("com.microsoft", "GatherBlockQuantized", 3, dtypes={0: "uint8"})[0] == "1.22"
    assert requires.release_for("com.microsoft", "NoSuchOp", 1)[0] is None
    assert requires.key("1.9") < requires.key("1.20") < requires.key("1.22.1")
    node = onnx.helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")
    graph = onnx.helper.make_graph([node], "g", [], [])
    unknown = requires.derive([onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])])
    # no fact: only the onnxruntime that built it is known to run it
    assert unknown["onnxruntime"] == requires.installed() and unknown["contrib_ops"][0]["known"] is False


def test_a_requirement_newer_than_this_onnxruntime_is_refused():
    with pytest.raises(PassError, match="needs onnxruntime 9.99.*this environment has onnxruntime"):
        requires.check_installed({"onnxruntime": "9.99", "because": ["X with 3 inputs"]})


def test_a_default_valued_newer_attribute_is_dropped_and_any_other_value_refused():
    def gqa(causal: int) -> onnx.NodeProto:
        return onnx.helper.make_node(GQA, ["q", "k", "v", "pk", "pv", "s", "t"], ["o", "ok", "ov"],
                                     domain="com.microsoft", num_heads=4, kv_num_heads=2, causal=causal)
    kept = gqa(1)
    assert compat._downgrade(kept, "1.22") == GQA and {a.name for a in kept.attribute} == {"num_heads", "kv_num_heads"}
    with pytest.raises(PassError, match="causal=0.*onnxruntime 1.22 cannot run it"):
        compat._downgrade(gqa(0), "1.22")


def test_without_a_target_the_passes_write_for_this_environments_onnxruntime(monkeypatch):
    assert compat.effective_target("1.20") == "1.20"
    monkeypatch.setattr(requires, "installed", lambda: "1.22")  # pyproject allows onnxruntime >= 1.22
    assert compat.effective_target(None) == "1.22"
    monkeypatch.setattr(requires, "installed", lambda: requires.KNOWN[-1])
    assert compat.effective_target(None) is None  # the newest signatures recipec knows


def test_target_onnxruntime_is_validated_by_name(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE_HEAD + """passes:
  - {id: a, op: fuse, with: {target_onnxruntime: "1.19"}}
  - {id: b, op: fuse, after: a, with: {target_onnxruntime: "1.21", attention: gqa}}
  - {id: c, op: quantize, after: b, with: {scheme: int4, target_onnxruntime: "1.22", embeddings: quantize}}
""")
    with pytest.raises(RecipeInvalid) as caught:
        load_plan(recipe, with_keys=False)
    text = "\n".join(p.format(str(recipe)) for p in caught.value.problems)
    assert "passes[0].with.target_onnxruntime: unknown value '1.19'" in text
    recipe.write_text(recipe.read_text().replace('"1.19"', '"1.20"'))
    with pytest.raises(RecipeInvalid) as caught:
        load_plan(recipe, with_keys=False)
    text = "\n".join(p.format(str(recipe)) for p in caught.value.problems)
    assert "passes[1].with.attention: attention: gqa needs onnxruntime 1.22" in text
    assert "passes[2].with.embeddings: embeddings: quantize needs onnxruntime 1.23" in text


def test_asymmetric_int4_embeddings_need_the_release_that_reads_their_zero_points():
    asymmetric = {"scheme": "int4", "symmetric": False, "embeddings": "quantize", "target_onnxruntime": "1.26"}
    [(field, message)] = compat.quantize_problems(asymmetric)
    assert field == ("embeddings",) and "needs onnxruntime 1.27" in message and "odd number of blocks" in message
    assert compat.quantize_problems({**asymmetric, "target_onnxruntime": "1.27"}) == []
    assert compat.quantize_problems({**asymmetric, "symmetric": True}) == []  # no zero points: 1.23 reads them


def test_quantize_refuses_a_target_its_input_graph_cannot_meet(built, tmp_path):
    with pytest.raises(PassError, match=f"target_onnxruntime 1.20, but the graph needs onnxruntime 1.32: {GQA}"):
        run_pass("quantize", built("llama"), tmp_path, data=RandomWindows(), scheme="int4",
                 target_onnxruntime="1.20", **ANY_SCORE)


def test_the_triton_config_names_the_onnxruntime_its_backend_must_carry(built):
    text = triton.triton_config("int4", json.loads((built("llama", scheme="int4") / "artifact.json").read_text()),
                                Policy("dynamic", 4, 5.0))
    assert f"# The graph needs onnxruntime >= 1.32 ({GQA} with 17 inputs)" in text


def test_onnxruntime_120_runs_the_graphs_built_for_it(built, exported, tmp_path):
    python = peer_python("ort-1.20")
    fused = built("llama", "1.20")
    assert needs(fused)["onnxruntime"] == "1.20" and GQA not in ops_of(fused)  # GQA needs attention_bias (1.22)
    answer = run_probe(python, "compare", str(exported("llama")[0] / "model.onnx"), str(fused / "model.onnx"))
    assert answer["onnxruntime"] == "1.20.1" and answer["error"] is None, answer
    assert max(answer["diffs"].values()) < 1e-3 and answer["batched_chunk_error"] is None
    for scheme in ("int4", "int8-dynamic"):
        variant = built("llama", "1.20", scheme)
        assert needs(variant)["onnxruntime"] == "1.20" and "GatherBlockQuantized" not in ops_of(variant)
        there = run_probe(python, "logits", str(variant / "model.onnx"), str(tmp_path / f"{scheme}.npy"))
        assert there["error"] is None, there
        here = sessions.run(sessions.session(variant / "model.onnx"),
                            sessions.seeded_cases(sessions.DecoderIO.of(sessions.session(variant / "model.onnx")), 0)[0])
        np.testing.assert_allclose(np.load(tmp_path / f"{scheme}.npy"), here["logits"], atol=1e-3, rtol=1e-3)


def test_onnxruntime_120_refuses_or_miscomputes_what_requires_says_needs_newer(built, exported):
    python = peer_python("ort-1.20")
    for variant in (built("llama"), built("llama", scheme="int4")):
        newer = {e["op_type"] for e in needs(variant)["contrib_ops"] if requires.key(e["onnxruntime"]) > (1, 20)}
        answer = run_probe(python, "load", str(variant / "model.onnx"))
        # onnxruntime names the first node it refuses: one of those requires said it cannot run
        assert answer["error"] is not None and any(op in answer["error"] for op in newer), (newer, answer)
    # MultiHeadAttention loads in 1.20 but computes other values at batch 2: why requires says 1.21 for it
    gpt2 = built("gpt2")
    assert needs(gpt2)["onnxruntime"] == "1.21"
    answer = run_probe(python, "compare", str(exported("gpt2")[0] / "model.onnx"), str(gpt2 / "model.onnx"))
    assert answer["error"] is None and answer["diffs"]["prefill_logits"] > 1.0, answer


def test_onnxruntime_122_runs_the_older_group_query_attention(built, exported):
    python = peer_python("ort-1.22")
    fused = built("llama", "1.22")
    found = needs(fused)
    assert ops_of(fused)[GQA] == 11 and found["onnxruntime"] == "1.22"
    assert [limit["id"] for limit in found["limits"]] == [requires.BATCH_1_CHUNKS]
    answer = run_probe(python, "compare", str(exported("llama")[0] / "model.onnx"), str(fused / "model.onnx"))
    assert answer["onnxruntime"] == "1.22.1" and answer["error"] is None, answer
    assert max(answer["diffs"].values()) < 1e-3
    assert "batch_size must be 1 when sequence_length > 1 and past context is given" in answer["batched_chunk_error"]
    refused = run_probe(python, "load", str(built("llama") / "model.onnx"))
    assert "input size 17 not in range [min=7, max=11]" in refused["error"], refused


def test_a_shared_buffer_runs_in_onnxruntime_120_through_the_slot_runtime(built, exported):
    """GroupQueryAttention with the mask's lengths has 7 inputs and query_seqlens (17, 1.32: batched speculative
    verification): 1.20 takes it once query_seqlens and onnxruntime 1.32's saved default attributes (causal,
    1.30) are dropped, then verifies at batch 1 only, and computes the tokens of the unfused graph."""
    assert needs(built("llama", scheme="shared"))["because"][0] == f"{GQA} with 17 inputs"
    shared = built("llama", "1.20", "shared")
    assert ops_of(shared)[GQA] == 7 and needs(shared)["onnxruntime"] == "1.20"
    assert [limit["id"] for limit in needs(shared)["limits"]] == [requires.BATCH_1_CHUNKS]
    answer = run_probe(peer_python("ort-1.20"), "slots", str(exported("llama")[0]), str(shared))
    assert answer["error"] is None and answer["tokens"] == answer["expected"], answer


def test_an_int8_cache_needs_the_release_whose_cpu_kernel_runs_it(built):
    kv8 = needs(built("llama", "1.25", "kv8"))
    assert kv8["onnxruntime"] == "1.27" and kv8["because"] == [f"{GQA} int8 input 3"]
