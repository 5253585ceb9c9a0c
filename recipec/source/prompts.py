"""Prompts as users have them: the records of a JSON-lines file or the lines of text files, read for
`serving.workload.prompts` with the data section's readers.

Each problem is a `PromptsError` naming the key of the prompts spec it concerns (`path`, `field`,
`output_field`) and the file and line, so that `recipec validate` can place it at that key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from recipec.errors import PassError
from recipec.source.corpus import text_files
from recipec.source.data import jsonl_records, text_lines


class PromptsError(PassError):
    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class PromptRecord:
    text: str
    where: str  # file:line, for messages about this record
    output_tokens: int | None = None  # from spec.output_field; None: the workload's output_tokens
    record: dict[str, Any] = field(default_factory=dict, compare=False)  # the whole jsonl record


def read_prompts(spec: dict[str, Any], base_dir: Path, more_fields: tuple[str, ...] = ()) -> list[PromptRecord]:
    """Every prompt of `spec` ({source: jsonl | text, path, field, output_field}) in file order; `more_fields`
    are fields every jsonl record must also have (a batch-prompting task's answer)."""
    if spec["source"] == "jsonl":
        return _jsonl(Path(base_dir) / spec["path"], spec, more_fields)
    return _text(spec["path"], Path(base_dir))


def _jsonl(path: Path, spec: dict[str, Any], more_fields: tuple[str, ...]) -> list[PromptRecord]:
    if not path.is_file():
        raise PromptsError("path", f"{spec['path']!r} is not a file")
    try:
        rows = jsonl_records(path, ())
    except PassError as exc:
        raise PromptsError("path", str(exc)) from None
    text_field, out_field = spec.get("field", "text"), spec.get("output_field")
    out = []
    for number, record in rows:
        where = f"{path}:{number}"
        out.append(PromptRecord(_text_of(record, text_field, where), where,
                                _length_of(record, out_field, where) if out_field else None, record))
        for name in more_fields:
            if name not in record:
                raise PromptsError("more_fields", f"{where}: no field {name!r}")
    return _non_empty(out, spec["path"])


def _text_of(record: dict[str, Any], name: str, where: str) -> str:
    if name not in record:
        raise PromptsError("field", f"{where}: no field {name!r} (the record has: {', '.join(map(repr, record))})")
    text = record[name]
    if not isinstance(text, str) or not text:
        raise PromptsError("field", f"{where}: field {name!r} is {text!r}, not a non-empty string")
    return text


def _length_of(record: dict[str, Any], name: str, where: str) -> int:
    if name not in record:
        raise PromptsError("output_field", f"{where}: no field {name!r}")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PromptsError("output_field", f"{where}: field {name!r} is {value!r}, not an output length (an integer >= 1)")
    return value


def _text(pattern: str, base_dir: Path) -> list[PromptRecord]:
    try:
        root, rels = text_files(pattern, base_dir)
        return _non_empty([PromptRecord(line, f"{root / rel}:{number}")
                           for rel in rels for number, line in text_lines(root / rel)], pattern)
    except PromptsError:
        raise
    except PassError as exc:
        raise PromptsError("path", str(exc)) from None


def _non_empty(records: list[PromptRecord], shown: str) -> list[PromptRecord]:
    if not records:
        raise PromptsError("path", f"{shown!r} holds no prompts (every line is blank)")
    return records


@dataclass
class TokenizedPrompts:
    ids: list[list[int]]
    output_tokens: list[int] | None  # per prompt, from the spec's output_field
    truncated: list[str]  # where each truncated prompt is (file:line)


def tokenize_prompts(records: list[PromptRecord], encode: Callable[[str], list[int]], context: int | None,
                     output_tokens: int, truncate: bool) -> TokenizedPrompts:
    """Token ids of each prompt. One that cannot fit the model's context with its output (its own output
    length, else `output_tokens`, the workload's longest) is an error naming its file and line, or with
    `truncate` keeps its last tokens (the question usually ends a prompt) and is listed in `truncated`."""
    ids, truncated = [], []
    for r in records:
        tokens = list(encode(r.text))
        if not tokens:
            raise PromptsError("field", f"{r.where}: the prompt encodes to no tokens")
        out = r.output_tokens or output_tokens
        room = None if context is None else context - out
        if room is not None and len(tokens) > room:
            if not truncate or room < 1:
                raise PromptsError("path", f"{r.where}: the prompt is {len(tokens)} tokens; with its {out} output "
                                           f"tokens it exceeds the model's context of {context} tokens"
                                           + ("" if truncate else " (serving.workload.prompts.truncate: true keeps "
                                                                  "its last tokens instead)"))
            tokens = tokens[-room:]
            truncated.append(r.where)
        ids.append(tokens)
    outputs = [r.output_tokens for r in records] if records and records[0].output_tokens is not None else None
    return TokenizedPrompts(ids, outputs, truncated)


def load_tokenizer(model_dir: Path):
    """The Hugging Face tokenizer saved in a model directory, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        return None


def context_length(config: dict[str, Any]) -> int | None:
    """The longest sequence a model's config.json allows (positions it has embeddings or rotary range for)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None
