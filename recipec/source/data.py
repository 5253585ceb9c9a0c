"""Token windows for calibration and evaluation, as the recipe's data section describes them.

`synthetic` draws seeded random ids from the model's vocabulary; `text` reads a corpus (the standard
library's sources or the user's files) through the source model's tokenizer, calibration from the
corpus's train split and evaluation from its disjoint eval split; `jsonl` reads one text per line, and splits
the records the same way (by a hash of each record's text), so that no eval window holds text that
calibration (or distillation, which trains on it) saw.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from recipec.errors import PassError
from recipec.source.corpus import split_disjoint, token_windows

SPLITS = {"calibration": "train", "eval": "eval"}


def corpus_spec(spec: dict[str, Any]) -> Any:
    """The corpus a `text` data section names, in the form recipec.source.corpus takes."""
    return spec["corpus"] if "corpus" in spec else {"text": spec["path"]}


class RecipeData:
    def __init__(self, data: dict[str, Any], model_dir: Path, base_dir: Path):
        self.spec, self.model_dir, self.base_dir = data, model_dir, base_dir

    def calibration(self) -> torch.Tensor:
        return self._windows("calibration")

    def eval(self) -> torch.Tensor:
        return self._windows("eval")

    @cached_property
    def vocab_size(self) -> int:
        return json.loads((self.model_dir / "config.json").read_text())["vocab_size"]

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.model_dir)
        except (OSError, ValueError):
            return None

    def _windows(self, section: str) -> torch.Tensor:
        cached = self.__dict__.setdefault("_cache", {})
        if section not in cached:
            cached[section] = self._make(section, self.spec[section])
        return cached[section]

    def _make(self, section: str, spec: dict[str, Any]) -> torch.Tensor:
        if spec["source"] == "synthetic":
            generator = torch.Generator().manual_seed(spec["seed"])
            return torch.randint(0, self.vocab_size, (spec["samples"], spec["seq_len"]), generator=generator)
        if self.tokenizer is None:
            raise PassError(f"data.{section} reads text, but the model has no tokenizer; use source: synthetic")
        if spec["source"] == "text":
            return token_windows(self.tokenizer, corpus_spec(spec), SPLITS[section], spec["samples"],
                                 spec["seq_len"], spec["seed"], self.base_dir)
        return self._jsonl(section, spec)

    def _jsonl(self, section: str, spec: dict[str, Any]) -> torch.Tensor:
        path = self.base_dir / spec["path"]
        ids: list[int] = []
        for text in jsonl_split(path, spec["field"])[SPLITS[section]]:
            ids.extend(self.tokenizer(text)["input_ids"])
            if self.tokenizer.eos_token_id is not None:
                ids.append(self.tokenizer.eos_token_id)
        if len(ids) < spec["seq_len"]:
            raise PassError(f"data.{section}: the {SPLITS[section]} records of {path} hold {len(ids)} tokens, "
                            f"fewer than seq_len={spec['seq_len']}")
        stream = torch.tensor(ids, dtype=torch.long)
        generator = torch.Generator().manual_seed(spec["seed"])
        starts = torch.randint(0, len(ids) - spec["seq_len"] + 1, (spec["samples"],), generator=generator)
        return torch.stack([stream[s:s + spec["seq_len"]] for s in starts.tolist()])


def jsonl_split(path: Path, field: str) -> dict[str, list[str]]:
    """The texts of a JSON-lines file, split into disjoint train and eval records."""
    texts = [str(record[field]) for _, record in jsonl_records(path, (field,))]
    return split_disjoint(texts, what=f"distinct records (in {path})")


def jsonl_records(path: Path, fields: tuple[str, ...]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of each non-blank line of a JSON-lines file; a PassError names the file and line
    of a record that is not UTF-8, not a JSON object, or lacks one of `fields`."""
    out = []
    for number, line in text_lines(path):
        try:
            record = json.loads(line)
        except ValueError:
            raise PassError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict):
            raise PassError(f"{path}:{number}: not a JSON object")
        missing = [f for f in fields if f not in record]
        if missing:
            raise PassError(f"{path}:{number}: no field {missing[0]!r} (the record has: "
                            f"{', '.join(map(repr, record)) or 'nothing'})")
        out.append((number, record))
    return out


def text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of each non-blank line, decoded strictly: a prompt or record with a stray byte
    would be a different text than the file's author wrote, so it is an error naming the line."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PassError(f"{path}: cannot read: {exc.strerror}") from None
    out = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise PassError(f"{path}:{number}: not UTF-8 (byte {exc.start + 1} of the line)") from None
        if line.strip():
            out.append((number, line))
    return out
