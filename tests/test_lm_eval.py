"""lm-evaluation-harness against `recipec serve` (issue #19): lm-eval 0.4.13's local-completions model, in its
own environment (tests/peer_envs.py says why), runs tasks defined from local files (task YAML over a JSONL
file; nothing downloads) against the server on loopback. Every loglikelihood of the multiple-choice task,
which lm-eval computes from the server's echo logprobs, equals recipec's own: log_softmax over the model's
logits for the same tokens, summed over the continuation. The generation task's answers are recipec's greedy
tokens. docs/evaluate.md shows the same tasks for a team's own benchmark."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openai_server import chat_variant  # noqa: F401 (a fixture)
from openai_server import greedy, make_build, serving, token_logprobs
from peer_envs import peer_python

TASK, GEN_TASK = "recipec_words", "recipec_generate"  # neither name prefixes the other
DOCS = [{"context": "w40 w41", "choices": ["w3 w4", "w100", "w200 w201 w202"], "answer": 1},
        {"context": "w11", "choices": ["w12", "w13"], "answer": 1},
        {"context": "w60 w61 w62 w63 w64", "choices": ["w65", "w66 w67"], "answer": 0}]
GREEDY_CONTEXT = [5, 17, 99]  # a doc whose first choice is the model's own greedy continuation (is_greedy true)
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: context
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["w3 w3"]
  max_gen_toks: {tokens}
  do_sample: false
metric_list:
  - metric: exact_match
"""
GEN_TOKENS = 6
LM_EVAL_SECONDS = 300


@pytest.fixture(scope="module")
def lm_eval_python() -> Path:
    return peer_python("lm-eval-0.4.13")


def _docs(variant: Path) -> list[dict]:
    best = greedy(variant, GREEDY_CONTEXT, 2, ignore_eos=True)
    words = " ".join(f"w{t}" for t in best)
    return [{"context": "w5 w17 w99", "choices": [words, "w7 w8"], "answer": 0}, *DOCS]


def _task(directory: Path, docs: list[dict]) -> Path:
    directory.mkdir()
    data = directory / "words.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    (directory / f"{GEN_TASK}.yaml").write_text(GEN_TASK_YAML.format(task=GEN_TASK, data=data, tokens=GEN_TOKENS))
    return directory


def _run_lm_eval(python: Path, url: str, variant: Path, tasks: Path, out: Path, home: Path) -> None:
    # Offline, with caches in the test's own directory: the task's data is a local file and the tokenizer a
    # local directory, so nothing may reach the network or the user's Hugging Face cache.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON"))},
           "HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONNOUSERSITE": "1"}
    model_args = (f"base_url={url}/v1/completions,model=baseline,tokenizer={variant},"
                  f"tokenizer_backend=huggingface,max_length=512")
    command = [str(python), "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
               "--tasks", f"{TASK},{GEN_TASK}", "--include_path", str(tasks), "--batch_size", "3",
               "--output_path", str(out), "--log_samples"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=LM_EVAL_SECONDS, cwd=home)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def _encode(variant: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(variant)(text, add_special_tokens=False)["input_ids"]


def _expected(variant: Path, context: str, continuation: str) -> tuple[float, bool]:
    """recipec's loglikelihood of `continuation` after `context`, tokenized as lm-eval tokenizes a pair (the
    context's trailing spaces moved to the continuation, the continuation's tokens those the whole adds)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids, whole = _encode(variant, context), _encode(variant, context + continuation)
    rows = token_logprobs(variant, whole)
    positions = range(len(context_ids), len(whole))
    greedy = all(rows[i - 1].argmax() == whole[i] for i in positions)
    return float(sum(rows[i - 1, whole[i]] for i in positions)), greedy


def test_lm_eval_loglikelihoods_are_recipecs(chat_variant, lm_eval_python, tmp_path):  # noqa: F811
    build = make_build(tmp_path / "build", chat_variant)
    docs = _docs(chat_variant)
    tasks, out, home = _task(tmp_path / "tasks", docs), tmp_path / "out", tmp_path / "home"
    home.mkdir()
    with serving(build, tmp_path, "--max-queue", "16", "--max-queue-per-client", "16") as server:
        _run_lm_eval(lm_eval_python, server.url, build / "variants" / "baseline", tasks, out, home)
    samples = [json.loads(line) for path in out.rglob(f"samples_{TASK}_*.jsonl") for line in path.open()]
    assert len(samples) == len(docs)
    differences, greedy_seen, correct = [], 0, 0
    for sample in samples:
        # One [loglikelihood, is_greedy] per choice, written as strings, for lm-eval's (context, continuation).
        answers = [(float(r[0][0]), r[0][1] == "True") for r in sample["resps"]]
        pairs = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        expected = [_expected(build / "variants" / "baseline", *pair) for pair in pairs]
        for (got, got_greedy), (want, want_greedy) in zip(answers, expected, strict=True):
            differences.append(abs(got - want))
            assert got_greedy == want_greedy
            greedy_seen += got_greedy
        correct += int(np.argmax([want for want, _ in expected]) == sample["doc"]["answer"])
    assert greedy_seen >= 1, "the model's own continuation should be greedy"
    print(f"lm-eval vs recipec: {len(differences)} loglikelihoods, max |difference| {max(differences):.3g}",
          file=sys.stderr)
    assert max(differences) <= 1e-5
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["results"][TASK]["acc,none"] == pytest.approx(correct / len(docs))
    _check_generations(build / "variants" / "baseline", out)


def _check_generations(variant: Path, out: Path) -> None:
    """lm-eval's generate_until sends token ids, stop strings and max_tokens; the text is recipec's greedy."""
    samples = [json.loads(line) for path in out.rglob(f"samples_{GEN_TASK}_*.jsonl") for line in path.open()]
    assert samples
    for sample in samples:
        ids = _encode(variant, sample["doc"]["context"])
        words = lambda tokens: " ".join(f"w{t}" for t in tokens if t > 2)  # noqa: E731
        text = words(ids + greedy(variant, ids, GEN_TOKENS))[len(words(ids)):]
        assert sample["resps"][0][0] == text.split("w3 w3")[0]
