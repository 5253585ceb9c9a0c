"""The export op: every family exports and verifies, artifact.json describes the graph, exports are
byte-identical, the verification catches a graph that computes something else, a tied embedding stays one
initializer, parameters are counted as transformers counts them, and the export holds one copy of the
weights at a time (tests/test_real_configs.py does the same at real widths)."""
from __future__ import annotations

import json
import shutil

import jsonschema
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import numpy_helper

from recipec.onnx import artifact as art
from recipec.passes import PASSES, PassError
from recipec.passes.onnx.export import PARAMS, TESTED_FAMILIES
from recipec.passes.onnx.verify import verify_variant

from conftest import read_config


def _session(variant_dir):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(variant_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])


def test_params_schema_is_strict_and_documented():
    jsonschema.Draft202012Validator.check_schema(PARAMS)
    assert PARAMS["additionalProperties"] is False
    for name, spec in PARAMS["properties"].items():
        assert "default" in spec and spec.get("description"), name
    validator = jsonschema.Draft202012Validator(PARAMS)
    defaults = {name: spec["default"] for name, spec in PARAMS["properties"].items()}
    assert not list(validator.iter_errors(defaults))
    assert list(validator.iter_errors({"opsett": 18})), "an unknown key must be rejected"
    assert list(validator.iter_errors({"opset": 21})), "the TorchScript exporter stops at opset 20"
    assert PASSES["export"].consumes == "torch" and PASSES["export"].produces == "onnx"


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_each_family_exports_and_verifies(family, exported):
    variant, metrics = exported(family)
    v = metrics["verification"]
    assert set(v) >= {"prefill_max_abs_diff", "prefill_last_max_abs_diff", "decode_max_abs_diff", "onnxruntime"}
    assert v["max_abs_diff"] < 1e-4 and v["atol"] == 1e-3 and v["onnxruntime"] == onnxruntime.__version__
    assert metrics["exporter"] == "torchscript" and metrics["opset"] == 20 and metrics["logits"] == "selectable"
    json.dumps(metrics)  # the manifest stores it
    proto = onnx.load(str(variant / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [20]


def test_node_names_follow_module_paths(exported):
    names = {n.name for n in onnx.load(str(exported("llama")[0] / "model.onnx")).graph.node}
    assert "/model/layers.0/self_attn/q_proj/MatMul" in names and "/lm_head/MatMul" in names
    inits = [t.name for t in onnx.load(str(exported("llama")[0] / "model.onnx")).graph.initializer]
    assert not [n for n in inits if n.startswith("onnx::")], "folded constants keep tracer-numbered names"


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_artifact_json_matches_graph(family, exported, tiny_model_dir):
    variant, _ = exported(family)
    a = art.read_artifact(variant)
    session = _session(variant)
    dtypes = {"tensor(float)": "float32", "tensor(int64)": "int64"}
    assert [(i["name"], i["dtype"], i["shape"]) for i in a["graph"]["inputs"]] == \
           [(i.name, dtypes[i.type], i.shape) for i in session.get_inputs()]
    outputs = [(o.name, o.shape) for o in session.get_outputs()]
    assert [(o["name"], o["shape"]) for o in a["graph"]["outputs"]] == outputs
    assert a["graph"]["optional_inputs"] == [{"name": "logits_to_keep", "dtype": "int64", "shape": [], "default": 0}]
    config = json.loads((tiny_model_dir(family) / "config.json").read_text())
    assert a["kv_cache"]["num_layers"] == config["num_hidden_layers"]
    assert a["kv_cache"]["num_kv_heads"] == config["num_key_value_heads"]
    assert a["kv_cache"]["head_dim"] == config["hidden_size"] // config["num_attention_heads"]
    assert a["model"]["model_type"] == family and a["model"]["vocab_size"] == config["vocab_size"]
    assert a["model"]["eos_token_id"] == config["eos_token_id"]
    arrays = [numpy_helper.to_array(t) for t in onnx.load(str(variant / "model.onnx")).graph.initializer]
    weights = [x for x in arrays if x.dtype == np.float32 and x.ndim > 0]
    assert a["weights"]["parameters"] == sum(x.size for x in weights)
    assert a["weights"]["bytes"] == sum(x.nbytes for x in arrays)
    assert {f["name"] for f in a["files"]} == {p.name for p in variant.iterdir()} - {"artifact.json"}


def test_moe_active_parameters_count_the_experts_a_token_uses(exported, tiny_model_dir):
    a = art.read_artifact(exported("mixtral")[0])
    c = json.loads((tiny_model_dir("mixtral") / "config.json").read_text())
    per_expert = 3 * c["hidden_size"] * c["intermediate_size"]
    unused = c["num_hidden_layers"] * (c["num_local_experts"] - c["num_experts_per_tok"]) * per_expert
    assert a["weights"]["active_parameters"] == a["weights"]["parameters"] - unused


def test_support_files_are_copied(exported, tiny_model_dir):
    variant = exported("llama")[0]
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (variant / name).read_bytes() == (tiny_model_dir("llama") / name).read_bytes(), name
    # the tokenizer config also names the graph's inputs (tests/test_tokenizer_inputs.py)
    source = json.loads((tiny_model_dir("llama") / "tokenizer_config.json").read_text())
    assert json.loads((variant / "tokenizer_config.json").read_text()) == {
        **source, "model_input_names": ["input_ids", "attention_mask"]}


def test_logits_to_keep_is_an_optional_input(exported):
    variant, _ = exported("llama")
    session = _session(variant)
    assert "logits_to_keep" not in [i.name for i in session.get_inputs()]
    assert [i.name for i in session.get_overridable_initializers()] == ["logits_to_keep"]
    ids = np.array([[3, 4, 5, 6]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None]}
    feed.update({i.name: np.zeros((1, 2, 0, 16), np.float32) for i in session.get_inputs() if "past" in i.name})
    every = session.run(["logits"], feed)[0]
    last = session.run(["logits"], {**feed, "logits_to_keep": np.array(1, np.int64)})[0]
    assert every.shape == (1, 4, 256) and last.shape == (1, 1, 256)
    np.testing.assert_allclose(last[:, 0], every[:, -1], atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])  # gpt2: a tied head
def test_reexport_is_byte_identical_and_external_data_works(family, tiny_model_dir, export_op, tmp_path):
    for run in ("a", "b"):
        export_op(tiny_model_dir(family), tmp_path / run, external_data_threshold_mb=0)
    for name in ("model.onnx", "model.onnx.data", "artifact.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    a = art.read_artifact(tmp_path / "a")
    assert a["graph"]["external_data"] == ["model.onnx.data"]
    assert a["verification"]["max_abs_diff"] < 1e-4  # the verification ran on the external-data graph
    mode = (tmp_path / "a" / "model.onnx").stat().st_mode
    assert (tmp_path / "a" / "model.onnx.data").stat().st_mode == mode  # onnx alone makes it owner-only


def test_graphs_saved_by_later_passes_share_model_onnx_permissions(exported, tmp_path, monkeypatch):
    """fuse and quantize save through onnx.sessions.save_model; its external data file must be as
    readable as model.onnx, as the export's is."""
    from recipec.onnx import sessions

    monkeypatch.setattr(sessions, "EXTERNAL_DATA_BYTES", 0)
    path = sessions.save_model(onnx.load(str(exported("llama")[0] / "model.onnx")), tmp_path)
    assert (tmp_path / "model.onnx.data").stat().st_mode == path.stat().st_mode


def test_small_model_stays_in_one_file(exported):
    variant, metrics = exported("gpt2")
    assert not (variant / "model.onnx.data").exists() and metrics["external_data"] is False
    assert art.read_artifact(variant)["graph"]["external_data"] == []


def test_corrupted_weight_fails_verification(exported, tiny_model_dir, tmp_path):
    variant, _ = exported("llama")
    assert verify_variant(variant, tiny_model_dir("llama"))["max_abs_diff"] < 1e-4
    broken = tmp_path / "broken"
    shutil.copytree(variant, broken)
    proto = onnx.load(str(broken / "model.onnx"))
    name = next(n.input[1] for n in proto.graph.node if n.name == "/model/layers.1/mlp/down_proj/MatMul")
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    weights = numpy_helper.to_array(tensor).copy()
    weights[:, 0] += 0.5
    tensor.CopyFrom(numpy_helper.from_array(weights, name))
    onnx.save(proto, str(broken / "model.onnx"))
    with pytest.raises(PassError, match=r"export verification failed at prefill .*max \|Δlogits\| = "):
        verify_variant(broken, tiny_model_dir("llama"))


def test_tolerance_is_applied(exported, tiny_model_dir):
    with pytest.raises(PassError, match="exceeds the tolerance verify_atol 1e-12"):
        verify_variant(exported("llama")[0], tiny_model_dir("llama"), atol=1e-12, rtol=0)


def test_opset_17_exports(tiny_model_dir, export_op, tmp_path):
    metrics = export_op(tiny_model_dir("gpt2"), tmp_path, opset=17, verify_seed=3)
    assert metrics["opset"] == 17 and metrics["verification"]["seed"] == 3
    assert art.read_artifact(tmp_path)["graph"]["opset"] == 17


def test_not_a_model_directory_is_a_clear_error(export_op, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PassError, match="cannot load a causal LM from"):
        export_op(tmp_path / "empty", tmp_path / "out")


def test_read_artifact_errors_are_clear(tmp_path):
    with pytest.raises(PassError, match="has no artifact.json"):
        art.read_artifact(tmp_path)
    (tmp_path / "artifact.json").write_text("{")
    with pytest.raises(PassError, match="not valid JSON"):
        art.read_artifact(tmp_path)


def test_write_artifact_json_from_a_base(exported, tmp_path):
    """What a later pass does: rewrite the graph, then describe it with the input's identity."""
    variant, _ = exported("llama")
    proto = onnx.load(str(variant / "model.onnx"))
    onnx.save(proto, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    base = art.read_artifact(variant)
    new = art.write_artifact_json(tmp_path, base=base)
    assert new["model"] == base["model"] and new["verification"] is None
    assert new["weights"]["parameters"] == base["weights"]["parameters"]
    assert new["graph"]["external_data"] == ["model.onnx.data"]
    assert art.read_artifact(tmp_path) == json.loads(json.dumps(new))


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_parameter_count_is_transformers(family, exported, tiny_model_dir):
    """Every parameter is one initializer: none merged with an equal one (the random init's all-ones norms),
    none stored twice (a tied head)."""
    from transformers import AutoModelForCausalLM

    a = art.read_artifact(exported(family)[0])
    assert a["weights"]["parameters"] == AutoModelForCausalLM.from_pretrained(tiny_model_dir(family)).num_parameters()


def test_tied_embedding_is_one_initializer_read_by_gather_and_head(tiny_model_dir, export_op, tmp_path):
    """gpt2 ties its head to wte: one [vocab, hidden] table, read by the Gather and by the head's Gemm
    (transB), named in artifact.json; only the learned positions count as embedding-only."""
    variant, config = tmp_path / "onnx", read_config(tiny_model_dir("gpt2"))
    metrics = export_op(tiny_model_dir("gpt2"), variant)
    assert config["tie_word_embeddings"] is True and metrics["tied_embedding"] is True
    proto = onnx.load(str(variant / "model.onnx"))
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    table = arrays["transformer.wte.weight"]
    assert table.shape == (config["vocab_size"], config["n_embd"])
    copies = [n for n, x in arrays.items() if x.shape in (table.shape, table.T.shape)
              and (np.array_equal(x, table) or np.array_equal(x, table.T))]
    assert copies == ["transformer.wte.weight"]
    head = next(n for n in proto.graph.node if n.name == "/lm_head/Gemm")
    assert list(head.input[1:]) == ["transformer.wte.weight"] and _attrs(head) == {"transB": 1}
    a = art.read_artifact(variant)
    assert a["graph"]["tied_embedding"] == {"initializer": "transformer.wte.weight", "head": "/lm_head/Gemm",
                                            "gather": "/transformer/wte/Gather"}
    assert a["weights"]["embedding_parameters"] == config["n_positions"] * config["n_embd"]
    assert metrics["verification"]["max_abs_diff"] < 1e-4


def test_untied_head_keeps_its_own_weight(exported):
    a = art.read_artifact(exported("llama")[0])
    assert a["graph"]["tied_embedding"] is None
    assert a["weights"]["embedding_parameters"] == a["model"]["vocab_size"] * a["model"]["hidden_size"]


def test_weights_written_in_row_blocks_are_the_same_bytes(tiny_model_dir, export_op, tmp_path, monkeypatch):
    """Big weights go to model.onnx.data a block of rows at a time; with blocks of one row the files match."""
    from recipec.passes.onnx import trace

    export_op(tiny_model_dir("mixtral"), tmp_path / "whole", external_data_threshold_mb=0, verify=False)
    monkeypatch.setattr(trace, "WRITE_CHUNK_BYTES", 1)
    export_op(tiny_model_dir("mixtral"), tmp_path / "rows", external_data_threshold_mb=0, verify=False)
    for name in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "rows" / name).read_bytes(), name


def test_torch_model_is_freed_before_onnxruntime_verifies(tiny_model_dir, export_op, tmp_path, monkeypatch):
    """One copy of the weights at a time: the PyTorch model the export loaded is gone when the session opens."""
    import weakref

    from recipec.passes.onnx import export

    loaded, alive_at_check = [], []
    load, check = export.load_torch_model, export.check_against

    def tracked_load(path):
        model = load(path)
        loaded.append(weakref.ref(model))
        return model

    def tracked_check(*args, **kwargs):
        alive_at_check.append(loaded[0]() is not None)
        return check(*args, **kwargs)

    monkeypatch.setattr(export, "load_torch_model", tracked_load)
    monkeypatch.setattr(export, "check_against", tracked_check)
    assert export_op(tiny_model_dir("llama"), tmp_path)["verification"]["max_abs_diff"] < 1e-4
    assert alive_at_check == [False]


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
