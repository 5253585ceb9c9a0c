"""What a response says about each choice: its text as it grows (stop strings cut off and never sent, even
across streamed chunks), its tokens and their log-probabilities, why it ended, and echo's prompt; then
those in OpenAI's two logprobs shapes, completions' and chat's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from recipec.serve.logprobs import TokenLogprob
from recipec.serve.tokenizer import Detokenizer


@dataclass
class Echo:
    """A prompt leading its choices (completions' echo): its text, tokens, and their log-probabilities
    (None for the first token, and for all of them when logprobs were not asked for)."""
    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob | None]
    offsets: list[int]  # where each token's text starts in `text`


def echo_of(tokenizer: Any, tokens: list[int], text: str | None, logprobs: list[TokenLogprob | None] | None) -> Echo:
    """The echo of a prompt given as `text` (None: as token ids, whose decoded text it shows)."""
    offsets, length, decoder = [], 0, Detokenizer(tokenizer)
    for token in tokens:
        offsets.append(length)
        length += len(decoder.add(token))
    decoded = tokenizer.decode(tokens) if tokenizer is not None else ""
    text = decoded if text is None else text
    return Echo(text, list(tokens), logprobs or [None] * len(tokens), [min(o, len(text)) for o in offsets])


class Choice:
    """One choice as its tokens arrive. Text that could be the start of a stop string is held back until
    it cannot be; a stop string ends the choice, and its text and what follows never reach the client. A
    stop token ends it too, its own text left out (as vLLM)."""

    def __init__(self, index: int, tokenizer: Any, prompt: Sequence[int] = (), stop: Sequence[str] = (),
                 stop_ids: frozenset[int] = frozenset(), echo: Echo | None = None):
        self.index, self.tokenizer, self.echo = index, tokenizer, echo
        self._decoder = Detokenizer(tokenizer, prompt)
        self._stop, self._stop_ids = tuple(stop), stop_ids
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._sent: list[str] = []  # text handed out
        self._sent_chars = 0
        self._pending = ""  # decoded and not handed out: a stop string can only begin here
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob | None] = []
        self.offsets: list[int] = []  # where each token's text starts in the choice's text (echo excluded)
        self.finish: str | None = None
        self.taken = 0  # tokens handed out by take()
        self.announced = False  # the finish reason has been sent (streaming)
        self.echoed = False  # the echo has been sent (streaming)

    @property
    def text(self) -> str:
        return "".join(self._sent) + self._pending

    def add(self, token: int, logprob: TokenLogprob | None) -> bool:
        """Take the next generated token; True when it completed a stop string (generation should stop)."""
        if self.finish is not None:  # tokens the engine made before it saw the stop
            return False
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.offsets.append(self._sent_chars + len(self._pending))
        if token in self._stop_ids:
            self.finish = "stop"
            return False
        self._pending += self._decoder.add(token)
        return self._cut()

    def end(self, reason: str) -> None:
        """The engine ended the choice: text the detokenizer held back (an unfinished character) comes out."""
        if self.finish is None:
            self._pending += self._decoder.flush()
            self._cut()
        self.finish = self.finish or reason

    def take(self) -> tuple[str, int]:
        """The text that can be sent now, and the index of the first token not handed out before."""
        end = len(self._pending) if self.finish is not None else max(0, len(self._pending) - self._hold)
        text, self._pending = self._pending[:end], self._pending[end:]
        if text:
            self._sent.append(text)
            self._sent_chars += len(text)
        first, self.taken = self.taken, len(self.tokens)
        return text, first

    def _cut(self) -> bool:
        found = [at for at in (self._pending.find(s) for s in self._stop) if at >= 0]
        if not found:
            return False
        self._pending = self._pending[:min(found)]
        self.finish = "stop"
        return True


def token_text(tokenizer: Any, token: int) -> str:
    """A token as logprobs name it: its text, or vLLM's "token_id:N" for a variant without a tokenizer."""
    return tokenizer.token_text(token) if tokenizer is not None else f"token_id:{token}"


def completion_logprobs(tokenizer: Any, tokens: Sequence[int], entries: Sequence[TokenLogprob | None],
                        offsets: Sequence[int]) -> dict[str, Any]:
    """OpenAI completions' shape: parallel lists, top_logprobs a {token text: logprob} dict holding the chosen
    token too (so up to logprobs + 1 entries); None where a token has no entry (the prompt's first)."""
    return {"tokens": [token_text(tokenizer, t) for t in tokens],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else _top_dict(tokenizer, e) for e in entries],
            "text_offset": list(offsets)}


def _top_dict(tokenizer: Any, entry: TokenLogprob) -> dict[str, float]:
    top = {token_text(tokenizer, t): lp for t, lp in entry.top}
    top.setdefault(token_text(tokenizer, entry.token), entry.logprob)
    return top


def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob | None]) -> dict[str, Any]:
    """OpenAI chat's shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    return {"content": [{**_chat_entry(tokenizer, e.token, e.logprob),
                         "top_logprobs": [_chat_entry(tokenizer, t, lp) for t, lp in e.top]}
                        for e in entries if e is not None]}


def _chat_entry(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}
