"""phase_split: an int8-prefill / int4-decode variant of a tiny llama against each graph alone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import RECIPE_HEAD, cli_build, RandomWindows, make_tiny_model, run_pass

from recipec import cli
from recipec.deploy import genai, triton
from recipec.onnx import artifact
from recipec.passes.base import PassError
from recipec.passes.onnx import phase_split
from recipec.runtime import engine
from recipec.runtime.lm import SPLIT_DECODE_SPIN_US, load

PROMPTS = [[5, 6, 7, 8], [9, 10]]
# Random weights drift far under quantization; these tests check plumbing, not fidelity.
LOOSE = {"max_kl": 100.0, "min_top1": 0.0}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, exported) -> dict[str, Path]:
    """The exported tiny llama quantized int8 (prefill) and int4 (decode), and their phase-split variant."""
    source, _ = exported("llama")
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("int8", "int4", "split")}
    run_pass("quantize", source, dirs["int8"], RandomWindows(), scheme="int8-dynamic", **LOOSE)
    run_pass("quantize", source, dirs["int4"], RandomWindows(), scheme="int4", **LOOSE)
    metrics = run_pass("phase_split", dirs["int4"], dirs["split"], RandomWindows(), stages={"int8": dirs["int8"]},
                       prefill="int8", max_kl=100.0)
    (dirs["split"] / "metrics.json").write_text(json.dumps(metrics))
    return dirs


def test_artifact_names_both_graphs(graphs):
    split = artifact.read_artifact(graphs["split"])
    assert split["phases"]["decode"] == {"file": "model.onnx"}
    assert split["phases"]["prefill"]["file"] == "prefill.onnx"
    assert (graphs["split"] / "prefill.onnx").is_file()
    int8, int4 = artifact.read_artifact(graphs["int8"]), artifact.read_artifact(graphs["int4"])
    assert split["weights"] == int4["weights"]  # the top-level sections describe the decode graph
    assert split["phases"]["prefill"]["weights"] == int8["weights"]
    assert split["phases"]["prefill"]["compute_dtype"] == int8["compute_dtype"]


def test_metrics_score_the_combination(graphs):
    metrics = json.loads((graphs["split"] / "metrics.json").read_text())
    assert metrics["prefill_stage"] == "int8"
    assert metrics["positions"] == 4 * (16 - 1 - 8)  # RandomWindows' eval: 4 windows of 16, half prefilled
    for key in ("decode_alone", "prefill_alone", "prefill_vs_decode"):
        assert metrics[key]["kl_mean"] >= 0 and 0 <= metrics[key]["top1_agreement"] <= 1
    assert metrics["bytes_per_decode_step"]["decode"] < metrics["bytes_per_decode_step"]["prefill"]


def test_prefill_runs_the_prefill_graph_and_decode_the_decode_graph(graphs):
    split, int8, int4 = (load(graphs[n], device="cpu") for n in ("split", "int8", "int4"))
    assert split.phase_split and not int8.phase_split
    logits, cache = split.prefill(PROMPTS)
    alone, alone_cache = int8.prefill(PROMPTS)
    np.testing.assert_allclose(logits, alone, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cache.host().keys[0], alone_cache.host().keys[0], rtol=0, atol=1e-6)
    assert not np.allclose(logits, int4.prefill(PROMPTS)[0], atol=1e-3)  # the graphs do differ
    tokens = logits.argmax(-1)
    step, _ = split.decode(tokens, cache)
    step_alone, _ = int4.decode(tokens, cache)  # the decode graph alone, given the same cache
    np.testing.assert_allclose(step, step_alone, rtol=0, atol=1e-6)


def test_the_decode_pool_spins_briefly_between_steps_and_the_prefill_pool_stops(graphs):
    """Two pools taking turns: the decode one bridges the host work between steps, the prefill one must not
    spin on into them (docs/phase-split.md)."""
    split, alone = load(graphs["split"], device="cpu"), load(graphs["int4"], device="cpu")

    def entry(session, key):
        return session.get_session_options().get_session_config_entry(key)

    assert entry(split.session, "session.intra_op.spin_duration_us") == str(SPLIT_DECODE_SPIN_US)
    assert entry(split.prefill_session, "session.force_spinning_stop") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # a single graph: no entry
        entry(alone.session, "session.intra_op.spin_duration_us")


def test_greedy_generation_is_int8_prefill_then_int4_decode(graphs):
    split, int8, int4 = (load(graphs[n], device="cpu") for n in ("split", "int8", "int4"))
    result = split.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    logits, cache = int8.prefill(PROMPTS)
    expected = [[] for _ in PROMPTS]
    for _ in range(6):
        tokens = logits.argmax(-1)
        for row, token in enumerate(tokens.tolist()):
            expected[row].append(token)
        logits, cache = int4.decode(tokens, cache)
    assert result.tokens == expected


def test_engine_serves_a_phase_split_variant(graphs):
    lm = load(graphs["split"], device="cpu")
    alone = lm.generate(PROMPTS, max_new_tokens=4, ignore_eos=True)
    eng = engine.Engine(lm, engine.Policy("continuous", max_batch_size=2), engine.RealClock())
    requests = [eng.submit(prompt, 4) for prompt in PROMPTS]
    while eng.step(flush=True):
        pass
    assert [r.tokens for r in requests] == alone.tokens


def test_kv_layout_mismatch_is_refused(tmp_path, graphs, export_op):
    other = make_tiny_model("llama", tmp_path / "torch", num_key_value_heads=1)
    export_op(other, tmp_path / "onnx")
    with pytest.raises(PassError, match=r"past_key_values\.0\.key: prefill float32 \[.*1.*\], decode float32"):
        run_pass("phase_split", graphs["int4"], tmp_path / "out", RandomWindows(), stages={"narrow": tmp_path / "onnx"},
                 prefill="narrow")


def test_external_data_is_renamed(tmp_path, graphs):
    import onnx

    source = tmp_path / "src"
    source.mkdir()
    proto = onnx.load(str(graphs["int8"] / "model.onnx"))
    onnx.save(proto, str(source / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    target = tmp_path / "dst"
    target.mkdir()
    assert phase_split.copy_graph(source / "model.onnx", target / "prefill.onnx") == ["prefill.onnx.data"]
    copy = onnx.load(str(target / "prefill.onnx"))  # loads its weights from prefill.onnx.data
    assert {i.name for i in copy.graph.initializer} == {i.name for i in proto.graph.initializer}


def test_deploy_files_say_they_cannot(graphs):
    split = artifact.read_artifact(graphs["split"])
    assert "phase-split" in genai.genai_unsupported(split)
    assert genai.write_genai_config(graphs["split"]) is None
    policy = engine.Policy("static", max_batch_size=2)
    with pytest.raises(triton.Unsupported, match="phase-split"):
        triton.triton_config("split", split, policy)


def test_validate_refuses_a_prefill_stage_that_does_not_run_first(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE_HEAD + "passes:\n  - {id: q4, op: quantize, with: {scheme: int4}}\n"
                                  "  - {id: ps, op: phase_split, after: q4, with: {prefill: q8}}\n"
                                  "  - {id: q8, op: quantize, after: q4, with: {scheme: int8-dynamic}}\n")
    assert cli.main(["validate", str(path)]) == 2
    assert "list 'q8' in `after` (after: [<decode stage>, q8])" in capsys.readouterr().err
    path.write_text(path.read_text().replace("after: q4, with: {prefill", "after: [q4, q8], with: {prefill"))
    assert cli.main(["validate", str(path)]) == 0


BUILD = RECIPE_HEAD + """\
passes:
  - {id: ex, op: export}
  - {id: int8, op: quantize, with: {scheme: int8-dynamic, max_kl: 100.0, min_top1: 0.0}}
  - {id: int4, op: quantize, after: ex, emit: true, with: {scheme: int4, max_kl: 100.0, min_top1: 0.0}}
  - {id: split, op: phase_split, after: [int4, int8], with: {prefill: int8, max_kl: 100.0}}
serving:
  batching: {policy: static, max_batch_size: 2}
  workload: {prompt_tokens: 8, output_tokens: 4, requests: 2, warmup_requests: 1, concurrency: [1]}
data:
  eval: {samples: 2, seq_len: 16}
  calibration: {samples: 2, seq_len: 16}
"""


def test_cli_build_writes_the_phase_split_variant(tmp_path):
    result, _ = cli_build(BUILD, tmp_path)
    assert result.returncode == 0, result.stderr
    build = tmp_path / "out" / "tiny"
    variant = build / "variants" / "split"
    assert artifact.read_artifact(variant)["phases"]["prefill"]["file"] == "prefill.onnx"
    assert not (variant / "genai_config.json").exists()
    assert (build / "variants" / "int4" / "genai_config.json").exists()
    assert not (build / "triton" / "split").exists() and (build / "triton" / "int8").is_dir()
    assert "no Triton model for split" in result.stderr + result.stdout
    report = json.loads((build / "report.json").read_text())
    assert "split" in report["variants"]
