"""prune: each target shrinks the tensors the exported graph holds (or zeroes weights), the result exports
and matches its own PyTorch model in onnxruntime, importance scores remove what matters least, and
recipe validation rejects impossible sizes."""
from __future__ import annotations

import textwrap
from pathlib import Path

import jsonschema
import onnx
import pytest
import torch
from conftest import RandomWindows, make_tiny_model, read_config, run_pass
from onnx import numpy_helper

from recipec.passes import PASSES, PassError
from recipec.errors import RecipeInvalid
from recipec.plan.planner import load_plan

PRUNE = PASSES["prune"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_prune(model_dir: Path, out_dir: Path, **params) -> dict:
    return run_pass("prune", model_dir, out_dir, RandomWindows(), **params)


def _weight(variant: Path, node_name: str):
    """The weight initializer a MatMul node multiplies by (its second input)."""
    proto = onnx.load(str(variant / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.name == node_name)
    return numpy_helper.to_array(inits[node.input[1]])


def _exports_and_verifies(export_op, model_dir: Path, out: Path) -> dict:
    metrics = export_op(model_dir, out)
    assert metrics["verification"]["max_abs_diff"] < 1e-4
    return metrics


def test_params_schema_is_strict_and_documented():
    jsonschema.Draft202012Validator.check_schema(PRUNE.params)
    validator = jsonschema.Draft202012Validator(PRUNE.params)
    assert PRUNE.params["additionalProperties"] is False
    for name, spec in PRUNE.params["properties"].items():
        assert spec.get("description"), name
    assert not list(validator.iter_errors({"target": "mlp", "amount": 0.5}))
    for amount in (0, 1, 1.5, -0.1):
        assert list(validator.iter_errors({"target": "mlp", "amount": amount})), amount
    assert list(validator.iter_errors({"target": "neurons"}))
    assert PRUNE.consumes == PRUNE.produces == "torch"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_mlp_channels_leave_the_exported_graph(family, tiny_model_dir, export_op, tmp_path):
    source = tiny_model_dir(family)
    metrics = run_prune(source, tmp_path / "pruned", target="mlp", amount=0.5)
    hidden, layers = 64, 2
    before = read_config(source).get("intermediate_size") or 4 * hidden
    assert metrics["intermediate_size_before"] == before and metrics["intermediate_size_after"] == before // 2
    # Every layer loses before/2 channels of each of its 2 (gpt2: 2 + bias) or 3 (gated) matrices.
    per_channel = 2 * hidden + 1 if family == "gpt2" else 3 * hidden
    assert metrics["parameters_before"] - metrics["parameters_after"] == layers * before // 2 * per_channel
    assert metrics["eval_kl_to_unpruned"] > 0
    _exports_and_verifies(export_op, tmp_path / "pruned", tmp_path / "onnx")
    if family != "gpt2":
        assert _weight(tmp_path / "onnx", "/model/layers.1/mlp/down_proj/MatMul").shape == (before // 2, hidden)


def test_mlp_amount_rounds_to_multiple_of(tiny_model_dir, tmp_path):
    metrics = run_prune(tiny_model_dir("llama"), tmp_path, target="mlp", amount=0.3, multiple_of=32)
    assert metrics["intermediate_size_after"] == 96  # 0.7 * 128 = 89.6 -> nearest multiple of 32
    assert read_config(tmp_path)["intermediate_size"] == 96


@pytest.mark.parametrize("family, gqa, heads, kv", [("llama", "kv_groups", 2, 1), ("llama", "query_heads", 2, 2),
                                                   ("qwen2", "kv_groups", 2, 1), ("mistral", "query_heads", 2, 2)])
def test_heads_respect_gqa_and_export(family, gqa, heads, kv, tiny_model_dir, export_op, tmp_path):
    metrics = run_prune(tiny_model_dir(family), tmp_path / "pruned", target="heads", amount=0.5, gqa=gqa)
    config = read_config(tmp_path / "pruned")
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (heads, kv, 16)
    assert (metrics["num_attention_heads"], metrics["num_key_value_heads"]) == (heads, kv)
    _exports_and_verifies(export_op, tmp_path / "pruned", tmp_path / "onnx")
    assert _weight(tmp_path / "onnx", "/model/layers.0/self_attn/q_proj/MatMul").shape == (64, heads * 16)
    assert _weight(tmp_path / "onnx", "/model/layers.0/self_attn/k_proj/MatMul").shape == (64, kv * 16)
    assert _weight(tmp_path / "onnx", "/model/layers.0/self_attn/o_proj/MatMul").shape == (heads * 16, 64)
    past = [i for i in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.input if i.name.startswith("past")]
    assert past[0].type.tensor_type.shape.dim[1].dim_value == kv


def test_layers_drop_and_the_cache_follows(tiny_model_dir, export_op, tmp_path):
    metrics = run_prune(tiny_model_dir("llama"), tmp_path / "pruned", target="layers", keep_layers=1)
    assert read_config(tmp_path / "pruned")["num_hidden_layers"] == 1 and len(metrics["kept_layers"]) == 1
    assert metrics["kept_layers"] == [max(range(2), key=lambda i: metrics["block_influence"][i])]
    _exports_and_verifies(export_op, tmp_path / "pruned", tmp_path / "onnx")
    outputs = [o.name for o in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.output]
    assert outputs == ["logits", "present.0.key", "present.0.value"]


def test_unstructured_zeroes_weights_but_keeps_shapes(tiny_model_dir, export_op, tmp_path):
    metrics = run_prune(tiny_model_dir("llama"), tmp_path / "pruned", target="unstructured", amount=0.5)
    assert metrics["parameters_after"] == metrics["parameters_before"] and metrics["saves_latency"] is False
    assert metrics["decoder_matrix_sparsity"] == pytest.approx(0.5, abs=0.01)
    exported = _exports_and_verifies(export_op, tmp_path / "pruned", tmp_path / "onnx")
    down = _weight(tmp_path / "onnx", "/model/layers.0/mlp/down_proj/MatMul")
    assert down.shape == (128, 64) and (down == 0).mean() == pytest.approx(0.5, abs=0.01)
    assert exported["parameters"] == export_op(tiny_model_dir("llama"), tmp_path / "base", verify=False)["parameters"]


def _edited_llama(out: Path, edit) -> Path:
    """A tiny llama whose weights `edit(model)` changed, saved to out."""
    from transformers import AutoModelForCausalLM

    make_tiny_model("llama", out)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_importance_removes_channels_that_contribute_nothing(importance, tmp_path):
    def kill_odd_channels(model):  # odd channels add nothing to the output (and have no weights)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 1::2] = 0
            layer.mlp.gate_proj.weight[1::2] = 0
            layer.mlp.up_proj.weight[1::2] = 0

    source = _edited_llama(tmp_path / "src", kill_odd_channels)
    metrics = run_prune(source, tmp_path / "pruned", target="mlp", amount=0.5, importance=importance)
    assert metrics["eval_kl_to_unpruned"] < 1e-9
    assert metrics["eval_perplexity_after"] == pytest.approx(metrics["eval_perplexity_before"], rel=1e-6)


def test_heads_importance_removes_a_silent_kv_group(tmp_path):
    def silence_group_0(model):  # query heads 0, 1 (kv group 0) write nothing through o_proj
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, :32] = 0

    source = _edited_llama(tmp_path / "src", silence_group_0)
    metrics = run_prune(source, tmp_path / "pruned", target="heads", keep_heads=2)
    assert metrics["eval_kl_to_unpruned"] < 1e-9


def test_layers_importance_drops_an_identity_layer(tmp_path):
    def make_layer_1_identity(model):  # nothing is added to the residual stream: block influence 0
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()

    source = _edited_llama(tmp_path / "src", make_layer_1_identity)
    metrics = run_prune(source, tmp_path / "pruned", target="layers", amount=0.5)
    assert metrics["kept_layers"] == [0] and metrics["block_influence"][1] < 1e-9
    assert metrics["eval_kl_to_unpruned"] < 1e-9


def test_output_is_byte_identical_across_runs(tiny_model_dir, tmp_path):
    for run in ("a", "b"):
        run_prune(tiny_model_dir("llama"), tmp_path / run, target="heads", amount=0.5)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_apply_rejects_what_check_rejects(tiny_model_dir, tmp_path):
    with pytest.raises(PassError, match="give amount"):
        run_prune(tiny_model_dir("llama"), tmp_path / "a", target="mlp")
    with pytest.raises(PassError, match="prune heads supports llama, mistral, qwen2, not gpt2"):
        run_prune(tiny_model_dir("gpt2"), tmp_path / "b", target="heads", amount=0.5)


# --- validation ---------------------------------------------------------------------------------------------

HEAD = """\
recipe: 1
name: tiny
model:
  source: synthetic
  family: {family}
  config: {config}
passes:
  - id: p
    op: prune
    with: {with_}
"""
LLAMA = "{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 64}"
GPT2 = "{n_embd: 64, n_layer: 2, n_head: 4, vocab_size: 64}"


def _problems(tmp_path: Path, with_: str, family: str = "llama", config: str = LLAMA) -> list[str]:
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(HEAD.format(family=family, config=config, with_=with_)))
    with pytest.raises(RecipeInvalid) as caught:
        load_plan(path, with_keys=False)
    return [p.format(str(path)) for p in caught.value.problems]


REJECTED = {
    "amount 0": ("{target: mlp, amount: 0}", r"passes\[0\]\.with\.amount: 0 is less than or equal to the minimum"),
    "amount 1": ("{target: mlp, amount: 1}", r"passes\[0\]\.with\.amount: 1 is greater than or equal to the maximum"),
    "no size": ("{target: mlp}", r"passes\[0\]\.with\.amount: give amount .* or keep_intermediate_size"),
    "both sizes": ("{target: layers, amount: 0.5, keep_layers: 1}", r"with\.keep_layers: give either amount or keep_layers"),
    "wrong keep": ("{target: mlp, keep_heads: 2}", r"with\.keep_heads: keep_heads applies to target heads, not mlp"),
    "heads not divisible": ("{target: heads, keep_heads: 3}",
                            r"with\.keep_heads: keep_heads 3 is not a multiple of 2: whole kv groups of 2 query heads"),
    "query heads not divisible": ("{target: heads, keep_heads: 3, gqa: query_heads}",
                                  r"with\.keep_heads: keep_heads 3 is not a multiple of 2: every one of the 2 kv groups"),
    "keeps everything": ("{target: layers, keep_layers: 2}", r"with\.keep_layers: prune layers: keeping 2 of 2 removes nothing"),
    "amount too small": ("{target: mlp, amount: 0.01}", r"with\.amount: .*keeping 128 of 128 removes nothing .*multiples of 8"),
    "importance": ("{target: layers, amount: 0.5, importance: magnitude}",
                   r"with\.importance: importance magnitude does not apply to target layers"),
}


@pytest.mark.parametrize("case", REJECTED)
def test_validation_rejects(case, tmp_path):
    with_, pattern = REJECTED[case]
    found = _problems(tmp_path, with_)
    assert any(__import__("re").search(pattern, p) for p in found), found
    assert all(":10:" in p for p in found), found  # positioned on the `with` line


def test_validation_rejects_heads_on_gpt2_and_gqa_on_mha(tmp_path):
    found = _problems(tmp_path, "{target: heads, amount: 0.5}", "gpt2", GPT2)
    assert any("with.target: prune heads supports llama, mistral, qwen2, not gpt2" in p for p in found), found
    mha = LLAMA.replace("num_key_value_heads: 2", "num_key_value_heads: 4")
    found = _problems(tmp_path, "{target: heads, amount: 0.5, gqa: query_heads}", "llama", mha)
    assert any("with.gqa: gqa: query_heads needs grouped-query attention" in p for p in found), found


@pytest.mark.parametrize("with_", ["{target: heads, keep_heads: 2, gqa: query_heads}",
                                   "{target: unstructured, amount: 0.9}", "{target: mlp, keep_intermediate_size: 100}"])
def test_validation_accepts_sizes_that_fit(with_, tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(HEAD.format(family="llama", config=LLAMA, with_=with_))
    assert load_plan(path, with_keys=False).recipe.resolved["passes"][0]["with"]["target"] in with_
