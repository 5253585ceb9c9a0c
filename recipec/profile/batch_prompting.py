"""Batch prompting (Cheng et al., 2023, "Batch Prompting: Efficient Inference with Large Language Model APIs"):
K questions in one prompt after shared instructions and exemplars, answered as K numbered answers that the
client splits back to the K requests.

A prompt of k questions is the instructions, then the exemplars in groups of k (each group its questions,
then their answers, numbered from 1 as the paper lays them out), then the k questions and the first answer's
prefix ("A[1]:"), which the model continues. Alone is the same with k = 1. Everything here is pure text
arithmetic, tested without a model; the measurement is in recipec.profile.workload.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

DEFAULT_QUESTION, DEFAULT_ANSWER = "Q[{n}]: {question}", "A[{n}]: {answer}"


@dataclass(frozen=True)
class Template:
    instructions: str = ""
    exemplars: tuple[tuple[str, str], ...] = ()
    question: str = DEFAULT_QUESTION
    answer: str = DEFAULT_ANSWER

    @classmethod
    def of(cls, spec: dict[str, Any]) -> "Template":
        return cls(spec.get("instructions", ""), tuple((e["question"], e["answer"]) for e in spec.get("exemplars", [])),
                   spec.get("question", DEFAULT_QUESTION), spec.get("answer", DEFAULT_ANSWER))


def template_problems(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for a template that could not be filled or whose answers could not be split back."""
    problems = []
    for key, names in (("question", ("n", "question")), ("answer", ("n", "answer"))):
        text = spec.get(key, DEFAULT_QUESTION if key == "question" else DEFAULT_ANSWER)
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
        except ValueError as exc:
            problems.append((key, f"{text!r} is not a format string: {exc}"))
            continue
        if sorted(fields) != sorted(names):
            problems.append((key, f"{text!r} must hold {{{names[0]}}} and {{{names[1]}}} once each, and no other "
                                  f"field (it holds {', '.join('{' + f + '}' for f in fields) or 'none'})"))
        elif key == "answer" and not (text.endswith("{answer}") and text.index("{n}") < text.index("{answer}")):
            problems.append((key, f"{text!r}: {{n}} must come before {{answer}}, and {{answer}} must end it "
                                  "(an answer is the rest of its line)"))
        elif "\n" in text:
            problems.append((key, f"{text!r} must be one line"))
    return problems


def _block(pairs: Sequence[tuple[str, str | None]], t: Template) -> list[str]:
    questions = [t.question.format(n=i, question=q) for i, (q, _) in enumerate(pairs, 1)]
    answers = [t.answer.format(n=i, answer=a) for i, (_, a) in enumerate(pairs, 1) if a is not None]
    return questions + answers


def answer_prefix(t: Template, n: int = 1) -> str:
    """What precedes answer n on its line ("A[1]:"), without trailing space: the model writes the space with
    its answer, as a byte-level BPE tokenizer joins a space to the word after it."""
    return t.answer[:t.answer.index("{answer}")].format(n=n).rstrip()


def pack(questions: Sequence[str], t: Template) -> str:
    """One prompt for `questions` (k = len(questions)), ending with the first answer's prefix."""
    k = len(questions)
    lines = [t.instructions] if t.instructions else []
    for start in range(0, len(t.exemplars), k):
        lines += _block(t.exemplars[start:start + k], t)
    lines += _block([(q, None) for q in questions], t)
    return "\n".join(lines + [answer_prefix(t)])


def _answer_pattern(t: Template) -> re.Pattern:
    before, rest = t.answer.split("{n}", 1)
    between = rest[:rest.index("{answer}")]

    def literal(text: str) -> str:  # spaces in the template match any run of spaces (or none)
        return r"\s*".join(re.escape(part) for part in text.split(" "))

    return re.compile(rf"^\s*{literal(before)}(\d+){literal(between)}(.*?)\s*$")


def split_answers(generated: str, k: int, t: Template) -> list[str | None]:
    """The k answers of a prompt's completion, in question order; None where answer n is missing or empty.
    Each line that has the answer template's shape gives the answer of its number; the first of a number
    counts, numbers outside 1..k and other lines are ignored."""
    pattern, found = _answer_pattern(t), {}
    for line in (answer_prefix(t) + generated).splitlines():
        m = pattern.match(line)
        if m and 1 <= int(m.group(1)) <= k:
            found.setdefault(int(m.group(1)), m.group(2).strip() or None)
    return [found.get(n) for n in range(1, k + 1)]


def groups(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Consecutive groups of `size`; the last may be smaller."""
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def accuracy(answers: Sequence[str | None], expected: Sequence[str] | None) -> float | None:
    """Exact matches (surrounding whitespace aside) over every question; an unparsed answer is wrong."""
    if expected is None or not answers:
        return None
    return float(np.mean([a is not None and a.strip() == str(e).strip() for a, e in zip(answers, expected)]))


def failure_rate(answers: Sequence[str | None]) -> float | None:
    return float(np.mean([a is None for a in answers])) if answers else None


def summary(size: int, expected: Sequence[str] | None, alone: dict[str, Any], batched: dict[str, Any]) -> dict[str, Any]:
    """The report's `batch_prompting` from both ways' measurements, each {answers, prompt_tokens (per prompt),
    seconds (the run's duration), output_tokens (per prompt)} over the same questions."""
    n = len(alone["answers"])
    per = {way: {"prompt": sum(m["prompt_tokens"]) / n, "time_ms": m["seconds"] / n * 1e3,
                 "output": sum(m["output_tokens"]) / n} for way, m in (("alone", alone), ("batched", batched))}
    ratio = lambda key: per["batched"][key] / per["alone"][key] if per["alone"][key] else None  # noqa: E731
    return {
        "size": size, "questions": n,
        "accuracy_alone": accuracy(alone["answers"], expected),
        "accuracy_batched": accuracy(batched["answers"], expected),
        "prompt_tokens_per_request_alone": per["alone"]["prompt"],
        "prompt_tokens_per_request_batched": per["batched"]["prompt"],
        "prompt_tokens_per_request_ratio": ratio("prompt"),
        "output_tokens_per_request_alone": per["alone"]["output"],
        "output_tokens_per_request_batched": per["batched"]["output"],
        "time_per_request_alone_ms": per["alone"]["time_ms"],
        "time_per_request_batched_ms": per["batched"]["time_ms"],
        "time_per_request_ratio": ratio("time_ms"),
        "parse_failure_rate": failure_rate(batched["answers"]),
        "parse_failure_rate_alone": failure_rate(alone["answers"]),
    }
