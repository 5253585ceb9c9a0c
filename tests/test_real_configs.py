"""The export on the configurations users bring (bench/shapes.py REAL_CONFIGS) at reduced depth: 2 layers,
real widths, heads and vocabularies, seeded random weights. Each is exported and verified against PyTorch by
the export's own check (onnxruntime vs transformers logits on a left-padded prefill, its last position alone
and a decode step), and its parameter count is transformers' num_parameters(), a tied table stored once.

What each carries that the tiny models do not: Llama-3.2-1B llama3 rope scaling and a tied 128,256-token
table; Qwen2.5-0.5B q/k/v biases and a tied 151,936-token table; Mistral-7B sliding-window attention at
width 4096; GPT-2 a tied table beside learned positions; Qwen1.5-MoE-A2.7B a router, a gated shared expert
and an untied 151,936-token vocabulary.

Reduced, to keep the file near two minutes on 2 cores:
- 2 layers each;
- Qwen1.5-MoE keeps 8 of its 60 experts (top-4 routing, shared expert and its gate as published): 60 experts
  x 2 layers alone are 1.04B parameters;
- Mistral's window is 4 tokens, not 4096, so that the verification's 7-token prompts and decode step cross it.
The 1-D parameters that random initialization sets to constants (norm weights 1, biases 0) are perturbed, so
that a dropped bias or two swapped norms would change the logits the verification compares.

Four of the five exceed 100M parameters (Qwen1.5-MoE at 2 layers is 864M, 3.5 GB): on the shared machine
run this file alone, under `flock /tmp/recipec-big.lock`.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from recipec.onnx import artifact as art

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from shapes import REAL_CONFIGS, make_model  # noqa: E402

from conftest import run_export_op  # noqa: E402

OVERRIDES = {"qwen1.5-moe-a2.7b": {"num_experts": 8}, "mistral-7b": {"sliding_window": 4}}
TIED = {"llama-3.2-1b", "qwen2.5-0.5b", "gpt2"}


@pytest.fixture
def built(tmp_path):
    """name -> (model directory, variant directory, export metrics); both directories are removed after the
    test, since each pair holds up to 7 GB."""
    def build(name: str):
        model_dir = make_model(name, tmp_path / "torch", layers=2, **OVERRIDES.get(name, {}))
        _perturb_constants(model_dir)
        return model_dir, tmp_path / "onnx", run_export_op(model_dir, tmp_path / "onnx")

    yield build
    shutil.rmtree(tmp_path, ignore_errors=True)


def _perturb_constants(model_dir: Path) -> None:
    """Add N(0, 0.1) noise to every 1-D float32 tensor, in place in the safetensors files (an 8-byte header
    size, a JSON header of dtypes, shapes and data offsets, then the data), so that the gigabytes of 2-D
    weights around them are not read and rewritten."""
    generator = np.random.default_rng(1)
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "r+b") as file:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(size))
            for name in sorted(k for k in header if k != "__metadata__"):
                if len(header[name]["shape"]) != 1 or header[name]["dtype"] != "F32":
                    continue
                begin, end = header[name]["data_offsets"]
                file.seek(8 + size + begin)
                values = np.frombuffer(file.read(end - begin), np.float32)
                file.seek(8 + size + begin)
                file.write((values + 0.1 * generator.standard_normal(values.shape)).astype(np.float32).tobytes())


def _num_parameters(model_dir: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # the count without allocating or initializing the weights
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).num_parameters()


# The MoE configuration's export is the longest (8 experts); tests/test_export.py and test_moe.py export MoE
# models in the default run.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "qwen1.5-moe-a2.7b" else n
                                  for n in REAL_CONFIGS])
def test_real_config_exports_verified_with_transformers_parameter_count(name, built):
    model_dir, variant, metrics = built(name)
    v = metrics["verification"]
    assert {"prefill_max_abs_diff", "prefill_last_max_abs_diff", "decode_max_abs_diff"} <= set(v)
    assert v["max_abs_diff"] < 1e-4, v
    a = art.read_artifact(variant)
    config = json.loads((model_dir / "config.json").read_text())
    assert a["weights"]["parameters"] == metrics["parameters"] == _num_parameters(model_dir)
    assert a["model"]["vocab_size"] == config["vocab_size"] == REAL_CONFIGS[name]["vocab_size"]
    assert a["kv_cache"]["num_layers"] == 2
    assert a["graph"]["external_data"] == (["model.onnx.data"] if a["weights"]["bytes"] >= 2**30 else [])
    _check_tables(name, variant, a, config)
    _check_feature(name, variant, a, config)


def _check_tables(name: str, variant: Path, a: dict, config: dict) -> None:
    """A tied model stores its [vocab, hidden] table once, read by the Gather and the head's Gemm; it is not
    counted as embedding-only then (the head reads all of it every step)."""
    vocab, hidden = config["vocab_size"], config.get("hidden_size", config.get("n_embd"))
    proto = onnx.load(str(variant / "model.onnx"), load_external_data=False)
    tables = [t.name for t in proto.graph.initializer if sorted(t.dims) == sorted([vocab, hidden])]
    positions = config["n_positions"] * hidden if name == "gpt2" else 0  # gpt2's learned positions: a Gather only
    if name in TIED:
        assert len(tables) == 1 and a["weights"]["embedding_parameters"] == positions
        assert a["graph"]["tied_embedding"] == {"initializer": tables[0], "gather": _gather_of(proto, tables[0]),
                                                "head": "/lm_head/Gemm"}
    else:
        assert a["graph"]["tied_embedding"] is None and len(tables) == 2
        assert a["weights"]["embedding_parameters"] == vocab * hidden


def _gather_of(proto: onnx.ModelProto, table: str) -> str:
    return next(n.name for n in proto.graph.node if n.op_type == "Gather" and n.input[0] == table)


def _check_feature(name: str, variant: Path, a: dict, config: dict) -> None:
    """The feature each configuration is here for reached the exported model."""
    exported = json.loads((variant / "config.json").read_text())
    names = {t.name for t in onnx.load(str(variant / "model.onnx"), load_external_data=False).graph.initializer}
    if name == "llama-3.2-1b":
        assert exported["rope_parameters"]["rope_type"] == "llama3"
    elif name == "qwen2.5-0.5b":
        assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= names
    elif name == "mistral-7b":
        assert exported["sliding_window"] == 4
    elif name == "qwen1.5-moe-a2.7b":
        assert (a["model"]["num_experts"], a["model"]["num_experts_per_tok"]) == (8, 4)
        assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.shared_expert_gate.MatMul.in1"} <= names
        assert a["weights"]["active_parameters"] < a["weights"]["parameters"]
    elif name == "gpt2":
        assert exported["n_embd"] == 768 and "transformer.wpe.weight" in names
