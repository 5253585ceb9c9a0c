"""Shared fixtures: tiny seeded models of each family as save_pretrained directories, and their exports."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import pytest

# initializer_range 0.5 (transformers' default is 0.02) makes random-weight logits decisive: at 0.02 the
# gap between the two best tokens drops to ~1e-5 (mixtral), close to the ~1e-6 that onnxruntime and
# PyTorch differ by, so greedy comparisons could flip on rounding; at 0.5 the smallest gap seen is ~4e-3.
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, initializer_range=0.5)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _COMMON,
    # A window shorter than the test prompts plus their continuations, so the sliding-window mask matters.
    "mistral": {**_COMMON, "sliding_window": 4},
    "qwen2": _COMMON,
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256, initializer_range=0.5,
                 bos_token_id=1, eos_token_id=2),
    "mixtral": {**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**_COMMON, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 64},
}
FAMILIES = tuple(TINY_CONFIGS)


def make_tiny_model(family: str, out_dir: Path, seed: int = 0, tokenizer: bool = False, **overrides) -> Path:
    """Save a seeded random model of `family` (TINY_CONFIGS plus overrides) into out_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**TINY_CONFIGS[family], **overrides})
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    if tokenizer:
        _tiny_tokenizer(config.vocab_size).save_pretrained(out_dir)
    return out_dir


def _tiny_tokenizer(vocab_size: int):
    """A word-level tokenizer: ids 0-2 are <unk> <s> </s>, id i >= 3 is the word f"w{i}"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """family -> a save_pretrained directory of that family's tiny model (llama's has a tokenizer)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_tiny_model(family, tmp_path_factory.mktemp(f"torch-{family}"),
                                           tokenizer=family == "llama")
        return made[family]

    return get


@contextlib.contextmanager
def _no_progress(description: str, total: int | None):
    yield lambda *args, **kwargs: None


def run_export_op(model_dir: Path, out_dir: Path, **params) -> dict[str, Any]:
    """Run the export pass as the executor would: schema defaults filled in, an empty output directory."""
    from recipec.passes.base import StageContext
    from recipec.passes.export import PASS

    defaults = {name: spec["default"] for name, spec in PASS.params["properties"].items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(stage_id="export", params={**defaults, **params}, input_dir=model_dir, output_dir=out_dir,
                       recipe={}, data=None, stage_dir=lambda stage_id: model_dir, progress=_no_progress,
                       log=lambda message: None)
    return PASS.apply(ctx)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_model_dir) -> Callable[[str], tuple[Path, dict[str, Any]]]:
    """family -> (variant directory, metrics) of the export op with default parameters."""
    done: dict[str, tuple[Path, dict[str, Any]]] = {}

    def get(family: str) -> tuple[Path, dict[str, Any]]:
        if family not in done:
            out = tmp_path_factory.mktemp(f"onnx-{family}")
            done[family] = (out, run_export_op(tiny_model_dir(family), out))
        return done[family]

    return get


@pytest.fixture(scope="session")
def export_op() -> Callable[..., dict[str, Any]]:
    """run_export_op(model_dir, out_dir, **params): the export pass through a hand-made StageContext."""
    return run_export_op
