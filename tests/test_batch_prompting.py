"""Batch prompting: packing K questions into one prompt, splitting the numbered answers back (malformed ones
included), the template's checks and the measures; then recipes/batch-prompting.yaml built end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipec.profile.batch_prompting import (Template, accuracy, answer_prefix, failure_rate, groups, pack,
                                             split_answers, summary, template_problems)

ROOT = Path(__file__).resolve().parents[1]
T = Template("Give the number of each word.", (("ab", "1"), ("cd", "2"), ("ef", "3")))


def test_a_batch_has_the_instructions_the_exemplars_grouped_k_at_a_time_and_numbered_questions():
    assert pack(["gh", "ij"], T) == "\n".join([
        "Give the number of each word.",
        "Q[1]: ab", "Q[2]: cd", "A[1]: 1", "A[2]: 2",
        "Q[1]: ef", "A[1]: 3",
        "Q[1]: gh", "Q[2]: ij", "A[1]:"])


def test_alone_is_the_same_template_with_one_question():
    assert pack(["gh"], T) == "\n".join([
        "Give the number of each word.", "Q[1]: ab", "A[1]: 1", "Q[1]: cd", "A[1]: 2", "Q[1]: ef", "A[1]: 3",
        "Q[1]: gh", "A[1]:"])
    assert pack(["x"], Template()) == "Q[1]: x\nA[1]:"


def test_answers_are_split_back_in_question_order():
    assert split_answers(" 7\nA[2]: 8\nA[3]: 9", 3, T) == ["7", "8", "9"]
    # the template's spaces match any run of spaces (or none); numbers may come out of order
    assert split_answers(" 7\n  A[3]:9  \nA[2]:    8", 3, T) == ["7", "8", "9"]


@pytest.mark.parametrize("completion, expected", [
    (" 7\nA[2]: 8", ["7", "8", None]),                     # stopped early: the third is missing
    (" 7\nA[2]:\nA[3]: 9", ["7", None, "9"]),              # an empty answer is no answer
    (" 7\nA[2]: 8\nA[2]: 5\nA[3]: 9", ["7", "8", "9"]),    # a repeated number: the first counts
    (" 7\nA[9]: 8\nA[3]: 9", ["7", None, "9"]),            # a number outside 1..k is ignored
    (" 7 A[2]: 8 A[3]: 9", ["7 A[2]: 8 A[3]: 9", None, None]),  # all on one line: one (wrong) answer
    ("\nQ[1]: ab\nB[2]: 8", [None, None, None]),           # nothing in the answer format
    (" 7\nA[2]: 8\nA[3]: 9\nQ[1]: kl\nA[1]: 4", ["7", "8", "9"]),  # a next block after the answers is ignored
])
def test_malformed_answers_are_parse_failures(completion, expected):
    assert split_answers(completion, 3, T) == expected


def test_a_custom_answer_template_is_parsed_by_its_own_shape():
    t = Template(question="Question {n}: {question}", answer="Answer {n} => {answer}")
    assert pack(["x", "y"], t).endswith("Question 1: x\nQuestion 2: y\nAnswer 1 =>")
    assert answer_prefix(t, 2) == "Answer 2 =>"
    assert split_answers(" yes\nAnswer 2 => no", 2, t) == ["yes", "no"]
    assert split_answers(" yes\nAnswer 2 no", 2, t) == ["yes", None]


@pytest.mark.parametrize("spec, key, message", [
    ({"question": "Q: {question}"}, "question", "must hold {n} and {question} once each"),
    ({"question": "Q{n}: {question} {extra}"}, "question", "no other field"),
    ({"answer": "{answer} is A{n}"}, "answer", "{n} must come before {answer}"),
    ({"answer": "A{n}: {answer}."}, "answer", "{answer} must end it"),
    ({"answer": "A{n}: {answer"}, "answer", "not a format string"),
    ({"question": "Q{n}:\n{question}"}, "question", "one line"),
])
def test_templates_that_cannot_be_filled_or_split_are_problems(spec, key, message):
    problems = template_problems(spec)
    assert [k for k, _ in problems] == [key] and message in problems[0][1], problems
    assert template_problems({}) == [] and template_problems({"answer": "Answer {n} => {answer}"}) == []


def test_groups_accuracy_and_failure_rate_exactly():
    assert groups([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert accuracy(["7", None, "9 ", "1"], ["7", "8", " 9", "2"]) == 0.5
    assert accuracy(["7"], None) is None
    assert failure_rate(["7", None, None, "1"]) == 0.5


def test_the_summary_divides_by_questions_on_both_sides():
    alone = {"answers": ["1", "2", "3", "4"], "prompt_tokens": [10, 10, 10, 10], "seconds": 0.4,
             "output_tokens": [2, 2, 2, 2]}
    batched = {"answers": ["1", None, "3", "5"], "prompt_tokens": [16], "seconds": 0.2, "output_tokens": [12]}
    s = summary(4, ["1", "2", "3", "4"], alone, batched)
    assert s["accuracy_alone"] == 1.0 and s["accuracy_batched"] == 0.5
    assert s["prompt_tokens_per_request_alone"] == 10 and s["prompt_tokens_per_request_batched"] == 4
    assert s["prompt_tokens_per_request_ratio"] == pytest.approx(0.4)
    assert s["time_per_request_alone_ms"] == pytest.approx(100) and s["time_per_request_batched_ms"] == pytest.approx(50)
    assert s["time_per_request_ratio"] == pytest.approx(0.5)
    assert s["output_tokens_per_request_batched"] == 3
    assert s["parse_failure_rate"] == 0.25 and s["parse_failure_rate_alone"] == 0.0


def test_the_shipped_task_files_are_what_the_generator_writes(tmp_path):
    """recipes/batch-prompting/ is generated: a copy of the generator rewrites it byte for byte."""
    here = ROOT / "recipes" / "batch-prompting"
    copy = tmp_path / "batch-prompting"
    copy.mkdir()
    (copy / "make_task.py").write_text((here / "make_task.py").read_text().replace(
        "sys.path.insert(0, str(HERE.parents[1]))", f"sys.path.insert(0, {str(ROOT)!r})"))
    subprocess.run([sys.executable, str(copy / "make_task.py")], check=True, capture_output=True)
    written = sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file() and p.name != "make_task.py")
    assert written == sorted(p.relative_to(here) for p in here.rglob("*")
                             if p.is_file() and p.name != "make_task.py" and "__pycache__" not in p.parts)
    assert all((copy / p).read_bytes() == (here / p).read_bytes() for p in written)


@pytest.mark.slow
def test_the_batch_prompting_recipe_builds_and_reports_both_ways(tmp_path):
    """The shipped recipe end to end: its model is trained here (about a minute on 2 idle cores)."""
    from recipec.profile.report import validate_report

    env = {**os.environ, "RECIPEC_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "recipec.cli", "build", str(ROOT / "recipes" / "batch-prompting.yaml"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out" / "batch-prompting"
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    b = report["variants"]["baseline"]["batch_prompting"]
    assert b["size"] == 4 and b["questions"] == 20
    assert b["accuracy_alone"] >= 0.5, b  # the model can do the task: the comparison means something
    assert b["prompt_tokens_per_request_ratio"] <= 0.7, b
    assert 0 <= b["accuracy_batched"] <= 1 and 0 <= b["parse_failure_rate"] <= 1 and b["time_per_request_ratio"] > 0
    assert "## Batch prompting" in (out / "report.md").read_text()
