"""moe: moefy turns a dense llama into a Mixtral that computes only top_k experts per token (in PyTorch
and in the exported graph), top_k and prune_experts change an MoE model, and validation rejects
modes and sizes that do not fit the model."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import RandomWindows, read_config, run_pass

from recipec import cli
from recipec.passes import PASSES, PassError
from recipec.passes.torch.moe import experts, moefy
from recipec.passes.torch.lm import load_lm
from recipec.errors import RecipeInvalid
from recipec.plan.planner import load_plan

MOE = PASSES["moe"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_moe(model_dir: Path, out_dir: Path, **params) -> dict:
    return run_pass("moe", model_dir, out_dir, RandomWindows(samples=16, seq_len=32), **params)


def test_params_schema_is_strict_and_documented():
    jsonschema.Draft202012Validator.check_schema(MOE.params)
    assert MOE.params["additionalProperties"] is False
    assert all(spec.get("description") for spec in MOE.params["properties"].values())
    validator = jsonschema.Draft202012Validator(MOE.params)
    assert not list(validator.iter_errors({"mode": "moefy", "experts": 4, "top_k": 1}))
    assert list(validator.iter_errors({"mode": "moefy", "experts": 1}))
    assert list(validator.iter_errors({"mode": "dense"}))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_moefy_with_every_expert_active_is_the_dense_model(family, tiny_model_dir, export_op, tmp_path):
    metrics = run_moe(tiny_model_dir(family), tmp_path / "moe", mode="moefy", experts=4, top_k=4)
    assert (metrics["family_before"], metrics["family_after"]) == (family, "mixtral")
    assert read_config(tmp_path / "moe").get("sliding_window") == read_config(tiny_model_dir(family)).get("sliding_window")
    assert metrics["eval_kl_to_input"] < 1e-5  # routing weights are 1/top_k within ROUTER_SPREAD
    assert metrics["eval_perplexity_after"] == pytest.approx(metrics["eval_perplexity_before"], rel=1e-3)
    assert export_op(tmp_path / "moe", tmp_path / "onnx")["verification"]["max_abs_diff"] < 1e-4


def test_moefy_top_1_uses_a_quarter_of_the_mlp(tiny_model_dir, export_op, tmp_path):
    metrics = run_moe(tiny_model_dir("llama"), tmp_path / "moe", mode="moefy", experts=4, top_k=1)
    config = read_config(tmp_path / "moe")
    assert (config["model_type"], config["num_local_experts"], config["num_experts_per_tok"]) == ("mixtral", 4, 1)
    assert config["intermediate_size"] == 32
    mlp, router, layers = 3 * 64 * 128, 4 * 64, 2
    assert metrics["parameters_after"] == metrics["parameters_before"] + layers * router
    assert metrics["active_parameters_after"] == metrics["active_parameters_before"] - layers * (mlp * 3 // 4 - router)
    assert metrics["eval_kl_to_input"] > 0 and all(0 < r <= 1 for r in metrics["router_recall"])
    exported = export_op(tmp_path / "moe", tmp_path / "onnx")
    assert exported["verification"]["max_abs_diff"] < 1e-4
    _assert_only_chosen_experts_are_multiplied(tmp_path / "onnx", top_k=1)


def _assert_only_chosen_experts_are_multiplied(variant: Path, top_k: int) -> None:
    """Every expert weight tensor [experts, ...] reaches the math only through a Gather indexed by the
    router's TopK, and at run time that Gather hands the MatMul tokens x top_k matrices."""
    proto = onnx.load(str(variant / "model.onnx"))
    producer = {out: node for node in proto.graph.node for out in node.output}
    expert_weights = [t for t in proto.graph.initializer if len(t.dims) == 3]
    gathers = []
    for tensor in expert_weights:
        users = [n for n in proto.graph.node if tensor.name in n.input]
        assert [u.op_type for u in users] == ["Gather"], (tensor.name, [u.op_type for u in users])
        assert "TopK" in _ancestors(producer, users[0].input[1]), tensor.name
        gathers.append(users[0].output[0])
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in gathers)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    batch, seq = 2, 5
    feed = {"input_ids": np.arange(batch * seq, dtype=np.int64).reshape(batch, seq) + 3,
            "attention_mask": np.ones((batch, seq), np.int64), "position_ids": np.tile(np.arange(seq), (batch, 1))}
    for i in session.get_inputs():
        if i.name.startswith("past"):
            feed[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
    picked = session.run(gathers, feed)
    assert all(p.shape[0] == batch * seq * top_k for p in picked), [p.shape for p in picked]


def _ancestors(producer: dict, name: str, depth: int = 6) -> list[str]:
    ops = []
    while depth and name in producer:
        node = producer[name]
        ops.append(node.op_type)
        name, depth = node.input[0], depth - 1
    return ops


def test_moefy_output_is_byte_identical_across_runs(tiny_model_dir, tmp_path):
    for run in ("a", "b"):
        run_moe(tiny_model_dir("llama"), tmp_path / run, mode="moefy", experts=4, top_k=2)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_balanced_kmeans_recovers_planted_groups():
    generator = torch.Generator().manual_seed(3)
    directions = torch.eye(8)[:4]
    members = torch.arange(32) % 4
    features = directions[members] + 0.05 * torch.randn(32, 8, generator=generator)
    features = features / features.norm(dim=1, keepdim=True)
    labels = moefy.balanced_kmeans(features.double(), 4, seed=0)
    assert torch.bincount(labels).tolist() == [8, 8, 8, 8]
    for cluster in range(4):  # each found cluster is one planted group
        assert len(set(members[labels == cluster].tolist())) == 1


def test_router_fit_ranks_experts_like_a_linear_truth():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=generator, dtype=torch.float64)
    truth = torch.randn(4, 16, generator=generator, dtype=torch.float64)
    router = moefy.fit_router(x, x @ truth.T)
    logits = x @ router.T
    assert torch.equal(logits.argmax(1), (x @ truth.T).argmax(1))
    spread = (logits.max(1).values - logits.min(1).values).max()
    assert spread == pytest.approx(moefy.ROUTER_SPREAD)


def test_top_k_changes_active_parameters_of_mixtral(tiny_model_dir, export_op, tmp_path):
    metrics = run_moe(tiny_model_dir("mixtral"), tmp_path / "k1", mode="top_k", top_k=1)
    assert read_config(tmp_path / "k1")["num_experts_per_tok"] == 1
    expert = 3 * 64 * 128
    assert metrics["active_parameters_before"] - metrics["active_parameters_after"] == 2 * expert
    assert metrics["parameters_after"] == metrics["parameters_before"] and metrics["eval_kl_to_input"] > 0
    assert export_op(tmp_path / "k1", tmp_path / "onnx")["verification"]["max_abs_diff"] < 1e-4


def test_prune_experts_keeps_the_most_used(tiny_model_dir, export_op, tmp_path, monkeypatch):
    source = tiny_model_dir("mixtral")
    metrics = run_moe(source, tmp_path / "kept", mode="prune_experts", keep=3)
    assert read_config(tmp_path / "kept")["num_local_experts"] == 3
    assert metrics["parameters_before"] - metrics["parameters_after"] == 2 * (3 * 64 * 128 + 64)
    before, after = load_lm(source), load_lm(tmp_path / "kept")
    for layer, kept in enumerate(metrics["kept_experts"]):
        old, new = before.model.layers[layer].mlp, after.model.layers[layer].mlp
        assert torch.equal(new.experts.down_proj, old.experts.down_proj[kept])
        assert torch.equal(new.gate.weight, old.gate.weight[kept])
    assert export_op(tmp_path / "kept", tmp_path / "onnx")["verification"]["max_abs_diff"] < 1e-4
    # Keeping the least used instead must hurt more: the usage ranking is what protects quality.
    real = experts.expert_usage
    monkeypatch.setattr(experts, "expert_usage", lambda model, windows: [-u for u in real(model, windows)])
    inverted = run_moe(source, tmp_path / "inverted", mode="prune_experts", keep=3)
    assert inverted["eval_kl_to_input"] > metrics["eval_kl_to_input"]


def test_apply_refuses_a_dense_model_for_top_k(tiny_model_dir, tmp_path):
    with pytest.raises(PassError, match="mode top_k needs an MoE family"):
        run_moe(tiny_model_dir("llama"), tmp_path, mode="top_k", top_k=1)


# --- validation ---------------------------------------------------------------------------------------------

RECIPE = """\
recipe: 1
name: tiny
model:
  source: synthetic
  family: {family}
  config: {config}
passes:
  - id: m
    op: moe
    with: {with_}
"""
DENSE = "{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 64}"
MIXTRAL = DENSE[:-1] + ", num_local_experts: 4, num_experts_per_tok: 2}"

REJECTED = {
    "top_k over experts": ("llama", DENSE, "{mode: moefy, experts: 4, top_k: 5}",
                           r"with\.top_k: top_k 5 is more than the 4 experts"),
    "experts not dividing": ("llama", DENSE, "{mode: moefy, experts: 6}",
                             r"with\.experts: experts 6 does not divide intermediate_size 128"),
    "moefy on moe": ("mixtral", MIXTRAL, "{mode: moefy}", r"with\.mode: moefy makes a dense model an MoE; mixtral"),
    "top_k on dense": ("llama", DENSE, "{mode: top_k, top_k: 1}", r"with\.mode: mode top_k needs an MoE family"),
    "prune on dense": ("llama", DENSE, "{mode: prune_experts, keep: 2}", r"with\.mode: mode prune_experts needs an MoE"),
    "top_k over model experts": ("mixtral", MIXTRAL, "{mode: top_k, top_k: 8}",
                                 r"with\.top_k: top_k 8 is more than the model's 4 experts"),
    "keep under top_k": ("mixtral", MIXTRAL, "{mode: prune_experts, keep: 1}",
                         r"with\.keep: keep 1 is fewer than the 2 experts per token"),
    "keep everything": ("mixtral", MIXTRAL, "{mode: prune_experts, keep: 4}", r"with\.keep: keep 4 removes nothing"),
    "missing top_k": ("mixtral", MIXTRAL, "{mode: top_k}", r"with\.top_k: mode top_k needs top_k"),
    "other mode's key": ("mixtral", MIXTRAL, "{mode: top_k, top_k: 1, keep: 2}",
                         r"with\.keep: keep applies to mode prune_experts, not top_k"),
    "unsupported family": ("gpt2", "{n_embd: 64, n_layer: 2, n_head: 4, vocab_size: 64}", "{mode: moefy}",
                           r"with\.mode: moefy supports llama, mistral, not gpt2"),
}


@pytest.mark.parametrize("case", REJECTED)
def test_validation_rejects(case, tmp_path):
    family, config, with_, pattern = REJECTED[case]
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(family=family, config=config, with_=with_)))
    with pytest.raises(RecipeInvalid) as caught:
        load_plan(path, with_keys=False)
    found = [p.format(str(path)) for p in caught.value.problems]
    assert any(re.search(pattern, p) for p in found), found
    assert all(":10:" in p for p in found), found


def test_validate_rejects_moefy_of_a_model_with_biases(tmp_path, capsys):
    """Mixtral's layers have no biases: `recipec validate` says so, not the build after calibration."""
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(family="llama", config=DENSE[:-1] + ", attention_bias: true}",
                                  with_="{mode: moefy, experts: 4}"))
    assert cli.main(["validate", str(path)]) == 2
    assert (f"{path}:10:18: passes[0].with.mode: moefy: the model's attention or MLP has biases, which Mixtral's "
            "layers do not") in capsys.readouterr().err


def test_validation_accepts_moefy_then_top_k(tmp_path):
    """After moefy the source config is dense; the top_k stage is checked when it runs, not refused."""
    path = tmp_path / "ok.yaml"
    path.write_text(RECIPE.format(family="llama", config=DENSE, with_="{mode: moefy, experts: 4, top_k: 2}")
                    + "  - {id: k, op: moe, with: {mode: top_k, top_k: 1}}\n")
    assert [p["id"] for p in load_plan(path, with_keys=False).recipe.resolved["passes"]] == ["m", "k"]
