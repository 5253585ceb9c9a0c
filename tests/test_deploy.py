"""Deployment configs: every config.pbtxt parses with Triton's own protobuf schema and agrees with the ONNX
graph for each batching policy; KV states pair as Triton pairs them; external weights become a model
directory; genai_config.json makes onnxruntime-genai generate the runtime's tokens; the command works."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest

from recipec.cli import deploy as deploy_command
from recipec.deploy import genai, triton
from recipec.deploy.files import write_deploy_files
from recipec.errors import BuildDirError, PassError, UsageError
from recipec.onnx import artifact as art
from recipec.runtime import lm as runtime
from recipec.runtime.engine import Policy

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="Triton's config schema comes with tritonclient[grpc] (the dev extra)")
from google.protobuf import text_format  # noqa: E402  (protobuf arrives with tritonclient)

SERVING = {"device": "cpu", "threads": 2, "batching": {"policy": "dynamic", "max_batch_size": 4, "max_wait_ms": 7.5},
           "workload": {"prompt_tokens": {"min": 8, "max": 12}}}
ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(float16)": "TYPE_FP16"}
PROMPT = [5, 17, 99, 3, 42, 8, 200]


def fake_build(root, variants: dict, serving=SERVING):
    """out/<name>/ as deploy reads it: manifest.json (resolved serving, variants, device) and variants/;
    returns the directory and the manifest, which a build hands to deploy."""
    for name, directory in variants.items():
        shutil.copytree(directory, root / "variants" / name)
    manifest = {"recipe": {"name": "tiny", "file": "tiny.yaml", "sha256": "0", "resolved": {"serving": serving}},
                "variants": {name: {"stage": name} for name in variants}, "device": "cpu"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, manifest


def _parse(path) -> "model_config_pb2.ModelConfig":
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _dtype(enum_value: int) -> str:
    return model_config_pb2.DataType.Name(enum_value)


def _graph_io(variant_dir):
    """(name, Triton dtype, dims without batch) of the session's inputs and outputs: the graph's truth."""
    session = onnxruntime.InferenceSession(str(variant_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    def entry(v):
        return v.name, ORT_TYPES[v.type], [d if isinstance(d, int) else -1 for d in v.shape[1:]]
    return [entry(v) for v in session.get_inputs()], [entry(v) for v in session.get_outputs()]


def _entries(tensors):
    return [(t.name, _dtype(t.data_type), list(t.dims)) for t in tensors]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("policy", ["static", "dynamic", "continuous"])
def test_configs_parse_with_tritons_schema_and_match_the_graph(family, policy, exported, tmp_path):
    variant, _ = exported(family)
    build, manifest = fake_build(tmp_path, {"baseline": variant})
    repo = triton.write_triton_repo(build, manifest, policy=Policy(policy, 4, 7.5))
    config = _parse(repo / "baseline" / "config.pbtxt")
    inputs, outputs = _graph_io(variant)
    assert config.name == "baseline" and config.backend == "onnxruntime" and config.max_batch_size == 4
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    assert config.parameters["intra_op_thread_count"].string_value == "2"
    assert (repo / "baseline" / "1" / "model.onnx").read_bytes() == (variant / "model.onnx").read_bytes()
    if policy == "continuous":
        states = [(s.input_name, s.output_name) for s in config.sequence_batching.state]
        stateful = {n for pair in states for n in pair}
        assert _entries(config.input) == [i for i in inputs if i[0] not in stateful]
        assert _entries(config.output) == [o for o in outputs if o[0] not in stateful]
        _check_states(config, inputs, outputs)
        assert config.WhichOneof("scheduling_choice") == "sequence_batching" and not config.model_warmup
    else:
        assert _entries(config.input) == inputs and _entries(config.output) == outputs
        assert "logits_to_keep" not in {i.name for i in config.input}
        _check_warmup(config, inputs)
    if policy == "static":
        assert config.WhichOneof("scheduling_choice") is None
    if policy == "dynamic":
        assert list(config.dynamic_batching.preferred_batch_size) == [4]
        assert config.dynamic_batching.max_queue_delay_microseconds == 7500


def _check_states(config, inputs, outputs):
    kv = [i for i in inputs if i[0].startswith("past_key_values.")]
    by_input = {s.input_name: s for s in config.sequence_batching.state}
    assert sorted(by_input) == sorted(i[0] for i in kv)
    for name, dtype, dims in kv:
        state = by_input[name]
        assert state.output_name == name.replace("past_key_values.", "present.")
        assert _dtype(state.data_type) == dtype and list(state.dims) == dims
        assert dict(outputs_by_name(outputs))[state.output_name] == dims
        (initial,) = state.initial_state
        assert initial.zero_data and list(initial.dims) == [dims[0], 1, dims[2]]
    strategy = config.sequence_batching.oldest
    assert strategy.max_candidate_sequences == 4 and strategy.max_queue_delay_microseconds == 7500


def outputs_by_name(outputs):
    return [(name, dims) for name, _, dims in outputs]


def _check_warmup(config, inputs):
    """A prefill of the workload's longest prompt (12) after a one-column masked cache, and a decode step."""
    assert [w.name for w in config.model_warmup] == ["prefill", "decode"]
    sizes = {"prefill": {"input_ids": [12], "attention_mask": [13]}, "decode": {"input_ids": [1], "attention_mask": [13]}}
    for warmup in config.model_warmup:
        assert warmup.batch_size == 4 and set(warmup.inputs) == {i[0] for i in inputs}
        for name, dtype, dims in inputs:
            sample = warmup.inputs[name]
            assert sample.zero_data and _dtype(sample.data_type) == dtype
            assert all(d > 0 for d in sample.dims) and len(sample.dims) == len(dims)
            assert [d for d, want in zip(sample.dims, dims) if want != -1] == [d for d in dims if d != -1]
            if name in sizes[warmup.name]:
                assert list(sample.dims) == sizes[warmup.name][name]


def test_kv_states_sort_alike_past_ten_layers_and_a_mismatch_is_refused():
    kv = {"num_layers": 12, "inputs": {"key": art.PAST_KEY, "value": art.PAST_VALUE},
          "outputs": {"key": art.PRESENT_KEY, "value": art.PRESENT_VALUE}}
    pairs = triton.kv_states({"kv_cache": kv})
    assert len(pairs) == 24
    inputs, outputs = [i for i, _ in pairs], [o for _, o in pairs]
    assert inputs == sorted(inputs) and outputs == sorted(outputs)  # Triton pairs index i with index i
    assert inputs.index("past_key_values.10.key") < inputs.index("past_key_values.2.key")
    assert all(o == i.replace("past_key_values.", "present.") for i, o in pairs)
    swapped = {**kv, "outputs": {"key": "present.{i}.v", "value": "present.{i}.k"}}
    with pytest.raises(triton.Unsupported, match="8586"):
        triton.kv_states({"kv_cache": swapped})


def test_the_first_sequence_request_masks_its_zero_cache_column(exported):
    """The continuous config gives each new sequence a one-column zero cache; with that column masked the
    graph computes exactly what it computes from an empty cache, so the documented protocol is sound."""
    lm = runtime.load(exported("llama")[0], "cpu")
    ids = np.array([PROMPT])
    empty = lm.empty_cache(1)
    zero = runtime.KVCache([np.zeros((1, lm.kv_heads, 1, lm.head_dim), np.float32)] * lm.num_layers,
                           [np.zeros((1, lm.kv_heads, 1, lm.head_dim), np.float32)] * lm.num_layers,
                           np.zeros((1, 1), np.int64))
    reference, _ = lm.forward(ids, np.ones_like(ids), empty)
    masked, cache = lm.forward(ids, np.ones_like(ids), zero)
    np.testing.assert_allclose(masked, reference, atol=1e-5)
    assert cache.seq_len == len(PROMPT) + 1


def test_external_weights_become_a_model_directory(exported, tmp_path):
    variant, _ = exported("qwen2")
    external = tmp_path / "external"
    external.mkdir()
    art.copy_support_files(variant, external)
    onnx.save_model(onnx.load(str(variant / "model.onnx")), str(external / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=art.DATA_FILE, size_threshold=0)
    art.write_artifact_json(external, base=art.read_artifact(variant))
    build, manifest = fake_build(tmp_path / "build", {"big": external})
    repo = triton.write_triton_repo(build, manifest)
    model_dir = repo / "big" / "1" / "model.onnx"
    assert model_dir.is_dir() and sorted(p.name for p in model_dir.iterdir()) == ["model.onnx", art.DATA_FILE]
    # Triton's onnxruntime backend opens <dir>/model.onnx; its weights must resolve beside it.
    session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} >= {"input_ids", "attention_mask"}


def test_a_graph_triton_cannot_batch_is_refused_alone_or_skipped_in_a_build(exported, tmp_path):
    build, manifest = fake_build(tmp_path, {"baseline": exported("llama")[0], "fixed": exported("gpt2")[0]})
    path = build / "variants" / "fixed" / "artifact.json"
    artifact = json.loads(path.read_text())
    artifact["graph"]["inputs"][0]["shape"] = [1, "sequence_length"]
    path.write_text(json.dumps(artifact))
    with pytest.raises(PassError, match="dynamic first"):
        triton.write_triton_repo(build, manifest)
    warnings = []
    repo = write_deploy_files(build, manifest, warn=warnings.append)
    assert [p.name for p in repo.iterdir()] == ["baseline"]
    assert len(warnings) == 1 and "no Triton model for fixed" in warnings[0] and "input_ids" in warnings[0]


def _og_tokens(onnxruntime_genai, variant_dir, prompt, new_tokens):
    model = onnxruntime_genai.Model(str(variant_dir))
    params = onnxruntime_genai.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = onnxruntime_genai.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.parametrize("family", genai.GENAI_TYPES)
def test_genai_generates_the_runtimes_tokens(family, exported, tmp_path):
    """og.Generator feeds only the standard inputs, so the graph's optional logits_to_keep initializer keeps
    its default (all positions) and genai reads the last: this checks genai tolerates it."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is the optional genai extra")
    variant = tmp_path / family
    shutil.copytree(exported(family)[0], variant)
    artifact = json.loads((variant / "artifact.json").read_text())
    if artifact["model"]["eos_token_id"] is None:  # the tiny qwen2 config has none; real checkpoints do
        artifact["model"]["eos_token_id"] = 2
        (variant / "artifact.json").write_text(json.dumps(artifact))
    assert genai.write_genai_config(variant) == variant / genai.GENAI_CONFIG
    config = json.loads((variant / genai.GENAI_CONFIG).read_text())
    assert config["search"]["past_present_share_buffer"] is False and config["model"]["type"] == family
    expected = runtime.load(variant, "cpu").generate([PROMPT], 10).tokens[0]
    assert _og_tokens(og, variant, PROMPT, 10) == expected


def test_genai_config_is_withheld_where_genai_cannot_run_it(exported, tmp_path):
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(exported("gpt2")[0], gpt2)
    (gpt2 / genai.GENAI_CONFIG).write_text("{}")  # a stale one from an earlier build goes
    assert genai.write_genai_config(gpt2) is None and not (gpt2 / genai.GENAI_CONFIG).exists()
    assert "gpt2" in genai.genai_unsupported(art.read_artifact(gpt2))
    assert "eos_token_id" in genai.genai_unsupported(art.read_artifact(exported("qwen2")[0]))


def test_write_deploy_files_writes_genai_configs_and_the_repository(exported, tmp_path):
    build, manifest = fake_build(tmp_path, {"baseline": exported("llama")[0], "other": exported("gpt2")[0]})
    (build / "manifest.json").unlink()  # a build hands over the manifest it wrote; deploy never reads it back
    repo = write_deploy_files(build, manifest, device="cuda")
    assert (build / "variants" / "baseline" / genai.GENAI_CONFIG).is_file()
    assert not (build / "variants" / "other" / genai.GENAI_CONFIG).exists()
    assert sorted(p.name for p in repo.iterdir()) == ["baseline", "other"]
    kind = _parse(repo / "other" / "config.pbtxt").instance_group[0].kind
    assert kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert not list(build.glob(".triton*")), "no staging directory is left behind"


def _command(argv):
    parser = argparse.ArgumentParser()
    deploy_command.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.handler(args)


def test_deploy_triton_command(exported, tmp_path):
    build, _ = fake_build(tmp_path, {"baseline": exported("llama")[0], "other": exported("gpt2")[0]})
    assert _command(["deploy", "triton", str(build), "--variant", "other", "--policy", "continuous",
                     "--max-batch-size", "3"]) == 0
    assert [p.name for p in (build / "triton").iterdir()] == ["other"]
    config = _parse(build / "triton" / "other" / "config.pbtxt")
    assert config.max_batch_size == 3 and config.WhichOneof("scheduling_choice") == "sequence_batching"
    assert _command(["deploy", "genai", str(build)]) == 0
    assert (build / "variants" / "baseline" / genai.GENAI_CONFIG).is_file()
    with pytest.raises(BuildDirError, match="no variant 'nope'"):
        _command(["deploy", "triton", str(build), "--variant", "nope"])
    with pytest.raises(BuildDirError, match="not a recipec build directory"):
        _command(["deploy", "triton", str(tmp_path / "missing")])
    with pytest.raises(UsageError, match="max_batch_size"):
        _command(["deploy", "triton", str(build), "--max-batch-size", "0"])
