"""Text in and out of the server: a variant's tokenizer, and the detokenizer that streams text by the token."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from recipec.runtime import lm as runtime


# Prompt tokens a detokenizer starts from (as vLLM's incremental detokenizer): the first generated token
# decodes as it follows the prompt, so SentencePiece's leading space, which decoding a sequence's first
# token drops, is kept.
CONTEXT_TOKENS = 5


class Detokenizer:
    """Text of a growing token list, emitted incrementally. A token may end inside a multi-byte character
    (decoded as U+FFFD until the next token completes it), so text is held back until it decodes cleanly;
    decoding restarts from a recent offset, keeping each step O(1) in the output length. `context`: the
    tokens the text follows (a prompt), not part of it."""

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()):
        context = list(context[-CONTEXT_TOKENS:]) if tokenizer is not None else []
        self.tokenizer, self.tokens, self.prefix, self.read = tokenizer, context, 0, len(context)

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

    def flush(self) -> str:
        """The text add() still holds back (the last tokens did not finish a character), at the text's end."""
        if self.tokenizer is None or self.read == len(self.tokens):
            return ""
        before = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before):] if len(text) > len(before) else ""


class _FastTokenizer:
    """tokenizer.json through the `tokenizers` library: what transformers' fast tokenizers run, without
    importing transformers (and torch) into the serving process."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """special_tokens=False for a chat template's output, which writes its special tokens itself."""
        # encode_batch, not encode: `encode` holds the GIL throughout (3 s for a 3 MB prompt, measured), so
        # even on a worker thread it would stall the event loop; encode_batch releases it while it works.
        return self._tok.encode_batch([text], add_special_tokens=special_tokens)[0].ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's text as logprobs name it, a special token's included."""
        return self._tok.decode([token], skip_special_tokens=False)


class _HfTokenizer:
    def __init__(self, tok):
        self._tok = tok

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        return self._tok(text, add_special_tokens=special_tokens)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        return self._tok.decode([token], skip_special_tokens=False)


def load_tokenizer(variant_dir: Path):
    """The variant's tokenizer as encode(text) -> ids and decode(ids) -> text, or None when it has none."""
    if (variant_dir / "tokenizer.json").is_file():
        return _FastTokenizer(variant_dir / "tokenizer.json")
    tok = runtime.tokenizer(variant_dir)
    return _HfTokenizer(tok) if tok is not None else None
