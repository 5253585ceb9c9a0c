"""Writes the batch-prompting task of recipes/batch-prompting.yaml: a table of made-up words and their numbers,
a training corpus that asks for them in the prompt format recipec's batch prompting sends (the recipe's four
exemplars grouped k at a time, then k numbered questions, k from 1 to 6, each document ended by <|endoftext|>),
the questions with their answers, and prompts.jsonl: whole prompts of 1 to 6 questions with their output
budgets, the workload of recipes/workload-sweep.yaml.

The task is recall of a table the model was trained on, asked alone and batched: it tests whether the model
answers numbered questions in a batch as well as one at a time, not whether it generalizes. The files are
committed; `python recipes/batch-prompting/make_task.py` rewrites them identically (a test checks that).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout's recipec, installed or not

from recipec.profile.batch_prompting import Template, pack  # noqa: E402

INSTRUCTIONS = "Give the number of each word."
WORDS, FILES, DOCS_PER_FILE, PROMPTS, SEED = 24, 24, 40, 64, 0
EXEMPLARS = 4  # the recipe's template shows the first four words


def table(rng: random.Random) -> dict[str, str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: dict[str, str] = {}
    while len(words) < WORDS:
        word = "".join(rng.choice(syllables) for _ in range(rng.randint(2, 3)))
        words.setdefault(word, str(rng.randint(10, 99)))
    return words


def document(rng: random.Random, words: dict[str, str]) -> str:
    """One prompt of k questions after a few exemplars, as recipec packs it, with its answers."""
    keys = list(words)
    k = rng.randint(1, 6)
    # the recipe's exemplars, as every prompt shows them: the model learns that the block after them is the
    # question and ends its answers with <|endoftext|> (recipec's engine stops on that, not on stop strings)
    exemplars = tuple((w, words[w]) for w in keys[:EXEMPLARS])
    questions = [rng.choice(keys) for _ in range(k)]
    t = Template(INSTRUCTIONS, exemplars)
    answers = [t.answer.format(n=n, answer=words[q]) for n, q in enumerate(questions, 1)]
    first = answers[0][len(t.answer.split("{answer}")[0].format(n=1).rstrip()):]  # " 47" after "A[1]:"
    return pack(questions, t) + "\n".join([first] + answers[1:]) + "<|endoftext|>"


def main() -> None:
    rng = random.Random(SEED)
    words = table(rng)
    corpus = HERE / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(FILES):
        (corpus / f"part-{i:02d}.txt").write_text("".join(document(rng, words) for _ in range(DOCS_PER_FILE)))
    with open(HERE / "prompts.jsonl", "w") as f:  # recipes/workload-sweep.yaml: prompts of 1 to 6 questions
        for _ in range(PROMPTS):
            questions = [rng.choice(list(words)[EXEMPLARS:]) for _ in range(rng.randint(1, 6))]
            text = pack(questions, Template(INSTRUCTIONS, tuple(list(words.items())[:EXEMPLARS])))
            # each answer line is at most 6 tokens ("\nA[2]: 46"), and one more ends the completion
            f.write(json.dumps({"text": text, "max_tokens": 6 * len(questions) + 1}) + "\n")
    with open(HERE / "questions.jsonl", "w") as f:  # the exemplars' words are not asked
        for word, number in list(words.items())[EXEMPLARS:]:
            f.write(json.dumps({"question": word, "answer": number}) + "\n")
    print(json.dumps([{"question": w, "answer": n} for w, n in list(words.items())[:EXEMPLARS]]))


if __name__ == "__main__":
    main()
