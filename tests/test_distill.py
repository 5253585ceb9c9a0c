"""distill: on a small llama trained offline on stdlib text, distillation from the unpruned model wins
back most of what pruning half the MLP cost; training is deterministic for a seed; the teacher must be
an upstream PyTorch stage."""
from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import make_tiny_model, no_progress, run_pass

from recipec.source import corpus
from recipec.passes import PASSES, PassError
from recipec.passes.base import CheckContext
from recipec.passes.torch.distill import check, sample_batch
from recipec.source.pretrain import pretrain
from recipec.errors import RecipeInvalid
from recipec.plan.planner import load_plan

DISTILL = PASSES["distill"]
CORPUS = {"text": "src/*.py"}
# A 190k-parameter llama, 300 steps on 120 small stdlib modules: ~20 s on one core, eval perplexity ~50
# with a 512-token vocabulary, and its MLPs matter enough that removing half their channels shows.
REFERENCE = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 128}
PRETRAIN = {"corpus": CORPUS, "steps": 300, "warmup_steps": 10, "batch_size": 8, "seq_len": 64,
            "vocab_size": 512, "eval_samples": 16, "learning_rate": 0.003}


class Windows:
    def __init__(self, calibration: torch.Tensor, evaluation: torch.Tensor):
        self._calibration, self._eval = calibration, evaluation

    def calibration(self) -> torch.Tensor:
        return self._calibration

    def eval(self) -> torch.Tensor:
        return self._eval


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Windows]:
    """The offline reference model (pretrained here) and real text windows: calibration from the corpus's
    train split, evaluation from its eval split."""
    root = tmp_path_factory.mktemp("corpus")
    small = [f for f in corpus.resolve_files("stdlib", "train", Path(".")) if 2_000 < f.stat().st_size < 15_000]
    for i, f in enumerate(small[:120]):
        (root / "src").mkdir(exist_ok=True)
        shutil.copyfile(f, root / "src" / f"m{i:03d}.py")
    model_dir = tmp_path_factory.mktemp("reference")
    pretrain("llama", REFERENCE, 0, PRETRAIN, root, model_dir, no_progress, lambda message: None)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Windows(corpus.token_windows(tokenizer, CORPUS, "train", 64, 64, 0, root),
                   corpus.token_windows(tokenizer, CORPUS, "eval", 16, 64, 1, root))
    return model_dir, data


def test_params_schema_is_strict_and_documented():
    jsonschema.Draft202012Validator.check_schema(DISTILL.params)
    assert DISTILL.params["additionalProperties"] is False
    for name, prop in DISTILL.params["properties"].items():
        assert "default" in prop and prop.get("description"), name
    validator = jsonschema.Draft202012Validator(DISTILL.params)
    assert list(validator.iter_errors({"alpha": 1.5})) and list(validator.iter_errors({"schedule": "linear"}))


def test_distillation_recovers_what_mlp_pruning_lost(reference, export_op, tmp_path):
    model_dir, data = reference
    pruned = run_pass("prune", model_dir, tmp_path / "pruned", data, target="mlp", amount=0.5)
    distilled = run_pass("distill", tmp_path / "pruned", tmp_path / "distilled", data, stages={"source": model_dir},
                       steps=150, learning_rate=0.001)
    teacher_ppl, pruned_ppl = pruned["eval_perplexity_before"], pruned["eval_perplexity_after"]
    assert distilled["teacher_eval_perplexity"] == pytest.approx(teacher_ppl)
    assert distilled["eval_perplexity_before"] == pytest.approx(pruned_ppl)
    assert pruned_ppl > teacher_ppl * 1.02, "pruning half the MLP channels should visibly hurt"
    recovered = (pruned_ppl - distilled["eval_perplexity_after"]) / (pruned_ppl - teacher_ppl)
    assert recovered > 0.5, (teacher_ppl, pruned_ppl, distilled["eval_perplexity_after"])
    assert distilled["eval_kl_to_teacher_after"] < 0.5 * distilled["eval_kl_to_teacher_before"]
    assert distilled["train_loss"] < distilled["initial_train_loss"] and distilled["train_seconds"] > 0
    assert export_op(tmp_path / "distilled", tmp_path / "onnx")["verification"]["max_abs_diff"] < 1e-4


def test_same_seed_gives_identical_weights(reference, tmp_path):
    model_dir, data = reference
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_pass("distill", model_dir, tmp_path / run, data, steps=3, warmup_steps=1, seed=seed, alpha=0.5,
               learning_rate=0.01)
    weights = {run: (tmp_path / run / "model.safetensors").read_bytes() for run in "abc"}
    assert weights["a"] == weights["b"] and weights["a"] != weights["c"]
    assert (tmp_path / "a" / "tokenizer.json").is_file()


def test_teacher_is_the_named_stage(reference, tmp_path):
    model_dir, data = reference
    run_pass("prune", model_dir, tmp_path / "p", data, target="heads", amount=0.5)
    metrics = run_pass("distill", tmp_path / "p", tmp_path / "d", data, stages={"p": tmp_path / "p"}, teacher="p",
                     steps=2, warmup_steps=1)
    assert metrics["eval_kl_to_teacher_before"] == pytest.approx(0, abs=1e-12)


def test_batches_are_seeded_slices_of_the_calibration_windows():
    calibration = torch.arange(4 * 16).view(4, 16)
    first = sample_batch(calibration, 64, 8, torch.Generator().manual_seed(0))
    again = sample_batch(calibration, 64, 8, torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and first.shape == (64, 8)
    rows = first[:, 0] // 16
    assert torch.equal(first, calibration[rows[:, None], first[:, :1] % 16 + torch.arange(8)])
    assert len({tuple(r) for r in first.tolist()}) > calibration.shape[0]  # more sequences than windows


def test_hidden_state_loss_needs_equal_widths(tmp_path):
    student, narrow = make_tiny_model("llama", tmp_path / "s"), make_tiny_model("llama", tmp_path / "t", hidden_size=32)
    data = Windows(torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0)),
                   torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)))
    metrics = run_pass("distill", student, tmp_path / "ok", data, steps=2, warmup_steps=1, hidden_weight=1.0, alpha=0.5)
    assert metrics["train_loss"] > 0
    with pytest.raises(PassError, match="hidden_weight needs equal hidden sizes"):
        run_pass("distill", student, tmp_path / "bad", data, stages={"t": narrow}, teacher="t", steps=2,
               warmup_steps=1, hidden_weight=1.0)
    with pytest.raises(PassError, match="seq_len 32 is longer than the calibration windows"):
        run_pass("distill", student, tmp_path / "long", data, steps=2, warmup_steps=1, seq_len=32)


# --- validation ---------------------------------------------------------------------------------------------

RECIPE = """\
recipe: 1
name: tiny
model:
  source: synthetic
  family: llama
  config: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 64}
passes:
  - {id: a, op: prune, with: {target: mlp, amount: 0.5}}
  - {id: b, op: prune, after: source, with: {target: layers, keep_layers: 1}}
"""


def _load(tmp_path: Path, distill_entry: str):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE) + distill_entry + "\n")
    return path


@pytest.mark.parametrize("entry, pattern", [
    ("  - {id: d, op: distill, after: a, with: {teacher: b}}",
     (r":10:\d+: passes\[2\]\.with\.teacher: teacher 'b' is not a stage that runs before 'd'; name one of a, source, "
      r"or list 'b' in `after`")),
    ("  - {id: d, op: distill, after: a, with: {teacher: nowhere}}", r"passes\[2\]\.with\.teacher: teacher 'nowhere'"),
    ("  - {id: d, op: distill, after: a, with: {teacher: d}}", r"passes\[2\]\.with\.teacher: 'd' cannot be its own"),
    ("  - {id: d, op: distill, after: a, with: {steps: 5, warmup_steps: 5}}",
     r"passes\[2\]\.with\.warmup_steps: warmup_steps \(5\) must be fewer than steps \(5\)"),
    ("  - {id: d, op: distill, after: a, with: {seq_len: 4096}}",
     r"passes\[2\]\.with\.seq_len: seq_len 4096 is longer than the calibration windows \(\d+ tokens\)"),
])
def test_validation_rejects(entry, pattern, tmp_path):
    path = _load(tmp_path, entry)
    with pytest.raises(RecipeInvalid) as caught:
        load_plan(path, with_keys=False)
    found = [p.format(str(path)) for p in caught.value.problems]
    assert any(re.search(pattern, p) for p in found), found


def test_validation_accepts_a_teacher_listed_in_after(tmp_path):
    recipe = load_plan(_load(tmp_path, "  - {id: d, op: distill, after: [a, b], with: {teacher: b}}"), with_keys=False).recipe
    assert recipe.resolved["passes"][2]["with"]["teacher"] == "b"


def test_check_rejects_an_onnx_teacher():
    """The planner already refuses a PyTorch stage below an ONNX one; the check says why for the teacher."""
    params = {**{k: v["default"] for k, v in DISTILL.params["properties"].items()}, "teacher": "baseline"}
    problems = check(params, CheckContext("d", None, {"source": "source", "baseline": "export"},
                                               {"source": "torch", "baseline": "onnx"}, {"calibration": {"seq_len": 128}}))
    assert problems == [(("teacher",), ("teacher 'baseline' is an ONNX stage (export); the teacher must be a "
                                        "PyTorch model: source or a stage before the export"))]
