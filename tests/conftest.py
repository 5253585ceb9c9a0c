"""Shared fixtures: tiny seeded models of each family as save_pretrained directories, and their exports."""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
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
# The top of a minimal valid recipe, for tests that write recipes: append passes/data/serving/gates.
RECIPE_HEAD = """\
recipe: 1
name: tiny
model:
  source: synthetic
  family: llama
  config: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 64}
"""


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
def no_progress(description: str, total: int | None):
    yield lambda *args, **kwargs: None


def run_pass(op: str, model_dir: Path, out_dir: Path, data=None, stages: dict[str, Path] | None = None,
             log: Callable[[str], None] | None = None, **params) -> dict[str, Any]:
    """Run a pass as the executor would: schema defaults filled in, an empty output directory, and the
    stages it may read by id (the source model is `model_dir`)."""
    from recipec.core.defaults import fill_defaults
    from recipec.passes import PASSES
    from recipec.passes.base import StageContext

    spec = PASSES[op]
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = {"source": model_dir, **(stages or {})}
    ctx = StageContext(op, fill_defaults(spec.params, dict(params)), model_dir, out_dir, {}, data, stages.__getitem__,
                       no_progress, log or (lambda message: None))
    return spec.apply(ctx)


class RandomWindows:
    """Seeded random token windows standing in for the recipe's data sections."""

    def __init__(self, vocab: int = 256, samples: int = 8, seq_len: int = 16):
        self.vocab, self.samples, self.seq_len = vocab, samples, seq_len

    def calibration(self):
        import torch

        return torch.randint(0, self.vocab, (self.samples, self.seq_len), generator=torch.Generator().manual_seed(0))

    def eval(self):
        import torch

        return torch.randint(0, self.vocab, (4, self.seq_len), generator=torch.Generator().manual_seed(1))


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def one_torch_thread():
    """Other test runs share these two cores, where two contending OpenMP threads made a PyTorch training
    step ~30x slower than one thread. Use it where results are compared within one module only."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_export_op(model_dir: Path, out_dir: Path, **params) -> dict[str, Any]:
    return run_pass("export", model_dir, out_dir, **params)


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


def free_port() -> int:
    """A loopback port no one listens on now, for a server a test starts."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_build(recipe_text: str, tmp_path: Path, timeout: float = 900) -> tuple[subprocess.CompletedProcess, Path]:
    """`recipec build` of the recipe in a fresh process with its own cache under tmp_path; (result, out dir)."""
    import os
    import sys

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    env = {**os.environ, "RECIPEC_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=timeout)
    return result, tmp_path / "out"


def kill_at(proc: subprocess.Popen, marker: str, delay: float, deadline: float) -> str:
    """Read the build's stderr until `marker` shows, wait `delay` seconds (so the kill lands inside the stage's
    work, not at its first line) and SIGKILL it; returns everything it printed."""
    seen = ""
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
        if marker in line:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            _, rest = proc.communicate()  # stderr printed during the delay
            return seen + (rest or "")
    proc.kill()
    proc.wait()
    raise AssertionError(f"never saw {marker!r}: {seen[-3000:]}")


# Files whose tests take the longest (CI's log, 2026-12-01), started first: with -n each worker takes whole
# files in collection order (pyproject's addopts), so a long file collected last would run alone at the end
# while the other worker idles.
LONGEST_FILES = ("test_ray.py", "test_lm_eval.py", "test_search.py", "test_build.py", "test_real_configs.py",
                 "test_soak.py", "test_slo.py", "test_workloads.py", "test_wheel.py", "test_phase_split.py",
                 "test_remote_cache.py", "test_memory.py", "test_quantize_kv.py", "test_tokenizer_inputs.py",
                 "test_requires.py", "test_recipe.py", "test_reliability.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))  # stable: order within a file kept
