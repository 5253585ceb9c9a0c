"""Text in and out of the server: a variant's tokenizer, and the detokenizer that streams text by the token."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from recipec.runtime import lm as runtime


class Detokenizer:
    """Text of a growing token list, emitted incrementally. A token may end inside a multi-byte character
    (decoded as U+FFFD until the next token completes it), so text is held back until it decodes cleanly;
    decoding restarts from a recent offset, keeping each step O(1) in the output length."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.tokens, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        if self.tokenizer is None:
            return ""
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before):]


class _FastTokenizer:
    """tokenizer.json through the `tokenizers` library: what transformers' fast tokenizers run, without
    importing transformers (and torch) into the serving process."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        # encode_batch, not encode: `encode` holds the GIL throughout (3 s for a 3 MB prompt, measured), so
        # even on a worker thread it would stall the event loop; encode_batch releases it while it works.
        return self._tok.encode_batch([text])[0].ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class _HfTokenizer:
    def __init__(self, tok):
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return self._tok(text)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(variant_dir: Path):
    """The variant's tokenizer as encode(text) -> ids and decode(ids) -> text, or None when it has none."""
    if (variant_dir / "tokenizer.json").is_file():
        return _FastTokenizer(variant_dir / "tokenizer.json")
    tok = runtime.tokenizer(variant_dir)
    return _HfTokenizer(tok) if tok is not None else None
