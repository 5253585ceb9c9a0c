"""Log-probabilities the server reports: of each generated token (from the logits the engine chose it by)
and of a prompt's tokens (echo: one forward over the whole prompt). Both are recipec.onnx.logits.log_softmax
of the model's raw logits, before temperature, top-k or top-p, as vLLM reports them by default."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from recipec.onnx.logits import log_softmax

# As vLLM: a log-probability of -inf (a masked or underflowed logit) is reported as this, since JSON has no
# infinity and OpenAI's clients would reject the response.
FLOOR = -9999.0
# Rows of a prompt's logits taken through the float64 log-softmax at once: its temporary is rows x vocab x 8
# bytes, which for a whole long prompt at a large vocabulary would be gigabytes.
ROWS_PER_CHUNK = 64


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens at that position, most likely first


def pick(logprobs: np.ndarray, token: int, k: int) -> TokenLogprob:
    """The entry of `token` in one position's log-probabilities [V], with the k most likely alternatives."""
    top = _top(logprobs, k)
    return TokenLogprob(int(token), _finite(logprobs[token]), tuple((int(t), _finite(logprobs[t])) for t in top))


def _top(logprobs: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logprobs.shape[0])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-logprobs, k - 1)[:k]  # O(V), where sorting the vocabulary would be O(V log V)
    return top[np.argsort(-logprobs[top], kind="stable")]


def of_logits(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """A generated token's entry from the logits [V] of the step that chose it."""
    return pick(log_softmax(np.asarray(logits)), token, k)


def prompt_logprobs(model: Any, ids: Sequence[int], k: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it (None for the first, which has no
    context), with k alternatives: the model alone over the whole prompt, every position's logits kept.
    Blocking; callers run it off the event loop."""
    tokens = np.asarray([ids], dtype=np.int64)
    logits, _ = model.forward(tokens, np.ones_like(tokens), model.empty_cache(1), logits_to_keep=0)
    logits = np.asarray(logits)[0]
    entries: list[TokenLogprob | None] = [None]
    for start in range(0, len(ids) - 1, ROWS_PER_CHUNK):
        rows = log_softmax(logits[start:min(start + ROWS_PER_CHUNK, len(ids) - 1)])
        entries += [pick(row, ids[start + 1 + i], k) for i, row in enumerate(rows)]
    return entries


def _finite(value: float) -> float:
    return max(float(value), FLOOR)
