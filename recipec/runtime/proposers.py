"""Who proposes the tokens that speculative decoding (speculative.py) asks the target to verify.

A proposer gets the sequence so far (prompt and generated tokens) and a budget of k tokens, and returns up
to k tokens with the distribution it drew each from: the rejection scheme needs q(x) beside the target's
p(x). A proposal without distributions stands for point masses (q(x) = 1), which is what a lookup is.

- NgramProposer (prompt lookup): the tokens that followed the most recent earlier occurrence of the
  sequence's last n tokens, n from max_ngram down to 1; no occurrence proposes nothing.
- DraftProposer: a second, cheaper OnnxLM (another variant of the same build) decodes k tokens. It keeps
  its own KV cache across calls and, at each call, rolls it back to the longest prefix it shares with the
  sequence, so the tokens the target rejected are forgotten and the ones it emitted are fed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from recipec.runtime.lm import KVCache, OnnxLM, draw, probabilities, sample


@dataclass
class Sampler:
    """The call's sampling settings, shared by the proposer and the verification so that both draw from
    the same distributions as OnnxLM.generate does."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pick(self, logits: np.ndarray) -> np.ndarray:
        """One token per row of logits [N, V], as OnnxLM.generate picks it."""
        return sample(logits, self.temperature, self.top_k, self.top_p, self.rng)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution `pick` draws from (sampling only), float64 [N, V]."""
        return probabilities(logits, self.temperature, self.top_k, self.top_p)


@dataclass
class Proposal:
    tokens: list[int] = field(default_factory=list)
    probs: np.ndarray | None = None  # [len(tokens), V]: q each token was drawn from; None = point masses

    def cut(self, k: int) -> "Proposal":
        """At most k tokens (a proposer may offer more than the sequence has room for)."""
        if len(self.tokens) <= k:
            return self
        return Proposal(self.tokens[:k], None if self.probs is None else self.probs[:k])


class Proposer(Protocol):
    def propose(self, context: Sequence[int], k: int, sampler: Sampler) -> Proposal: ...


class NgramProposer:
    """Prompt lookup over one growing context at a time: a call whose context extends the last one's only
    indexes the new tokens (NgramIndex); any other context starts a new index."""

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram
        self.index = NgramIndex(max_ngram)

    def propose(self, context: Sequence[int], k: int, sampler: Sampler) -> Proposal:
        known = self.index.tokens
        if len(context) < len(known) or list(context[:len(known)]) != known:
            self.index = NgramIndex(self.max_ngram)
        self.index.extend(context[len(self.index.tokens):])
        return Proposal(self.index.propose(k))


class NgramIndex:
    """`lookup` kept up to date as a sequence grows: for each n-gram (n <= max_ngram) that has a follower,
    where its most recent such occurrence was followed. A proposal then costs max_ngram dictionary reads
    instead of a scan of the whole context per step, and indexing costs max_ngram entries per new token."""

    def __init__(self, max_ngram: int):
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self._followers: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram)]  # [n - 1]

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending just before the new token are followed by it
            self.tokens.append(int(token))
            for n in range(1, min(self.max_ngram, end) + 1):
                self._followers[n - 1][tuple(self.tokens[end - n:end])] = end

    def propose(self, k: int) -> list[int]:
        """lookup(self.tokens, k, max_ngram), without the scan."""
        tokens = self.tokens
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            start = self._followers[n - 1].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start:start + k]
        return []


def lookup(context: Sequence[int], k: int, max_ngram: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of context's last n tokens, for the
    longest n <= max_ngram that occurs; [] when even the last token never occurred before."""
    index = NgramIndex(max_ngram)
    index.extend(context)
    return index.propose(k)


class DraftProposer:
    def __init__(self, draft: OnnxLM, vocab_size: int | None = None):
        if vocab_size is not None and draft.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary has {draft.vocab_size} tokens and the target's "
                             f"{vocab_size}: a draft must share the target's tokenizer")
        self.draft = draft
        self.cache: KVCache | None = None
        self.fed: list[int] = []  # the tokens self.cache holds, in order
        self.steps = 0  # draft forwards, prefills of the prompt included

    def propose(self, context: Sequence[int], k: int, sampler: Sampler) -> Proposal:
        logits = self._catch_up(context)
        tokens, dists = [], []
        for i in range(k):
            if sampler.greedy:
                token = int(logits.argmax(axis=-1)[0])
            else:
                dists.append(sampler.probs(logits)[0])
                token = int(draw(dists[-1][None], sampler.rng)[0])
            tokens.append(token)
            if i + 1 < k:  # the last proposal's logits are never needed
                logits = self._feed([token])
        return Proposal(tokens, np.stack(dists) if dists else None)

    def _catch_up(self, context: Sequence[int]) -> np.ndarray:
        """Roll the cache back to what it shares with context, then feed the rest; logits [1, V]."""
        common = 0
        for mine, theirs in zip(self.fed, context):
            if mine != theirs:
                break
            common += 1
        # The last token is fed again when the cache already holds it: its logits are what come next.
        common = min(common, len(context) - 1)
        if self.cache is None:
            self.cache = self.draft.empty_cache(1)
        self.cache, self.fed = self.cache.truncate(common), self.fed[:common]
        return self._feed(list(context[common:]))

    def _feed(self, tokens: list[int]) -> np.ndarray:
        ids = np.asarray([tokens], dtype=np.int64)
        logits, self.cache = self.draft.forward(ids, np.ones_like(ids), self.cache, logits_to_keep=1)
        self.fed += tokens
        self.steps += 1
        return logits[:, -1]
