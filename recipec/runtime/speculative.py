"""Speculative decoding: a cheap proposer guesses the next K tokens and the target verifies them all in one
forward, so each target step (the bandwidth-bound pass over the weights) can emit several tokens.

    spec = SpecConfig("ngram", tokens=4)                     # or SpecConfig("draft", 4, draft="int4")
    result = generate_speculative(lm, prompts, 64, spec)     # draft=load(...) for the draft method
    result.tokens, result.stats.acceptance_rate, result.stats.tokens_per_target_step

It is lossless. One step feeds [last token, x1..xk] with logits_to_keep=k+1; the target's distribution
after each position decides:
- greedy: x_i is accepted while it equals the target's argmax; the first mismatch is replaced by the
  target's argmax, and when all k match the target's next token is emitted as well. The output is the
  target's own greedy output (up to floating-point ties between a one-token and a k+1-token forward);
- sampling: the rejection scheme of Leviathan et al. and Chen et al. (2023): accept x_i with probability
  min(1, p(x_i)/q(x_i)), on rejection draw from norm(max(0, p - q)) and stop; after k acceptances draw
  one more from p. Every emitted token is then distributed as the target's p (temperature, top_k and
  top_p applied as OnnxLM.generate applies them). A lookup's q is a point mass: accept with p(x), else
  draw from p without x.
The cache is then rolled back to the tokens kept (KVCache.truncate, a Slice on the device): the rejected
positions are dropped, and the emitted token that replaced the first rejection is fed at the next step.

Batch: each prompt runs alone (batch 1), one after another. Rows of one batch accept different counts,
and a rectangular cache rolled back by different amounts per row would need holes in the mask or a
per-row shift; speculation pays most at batch 1 anyway, where a decode step is bound by reading the
weights and verifying k more tokens costs little more than one.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from recipec.runtime.lm import GenerationResult, OnnxLM, _check_sampling, draw
from recipec.runtime.proposers import DraftProposer, NgramProposer, Proposal, Proposer, Sampler

METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpecConfig:
    """serving.speculative: the method, K proposed tokens per step, the draft variant's name (draft)."""

    method: str = "ngram"
    tokens: int = 4
    draft: str | None = None
    max_ngram: int = 3

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {self.method!r}")
        if self.tokens < 1 or self.max_ngram < 1:
            raise ValueError("speculative tokens and max_ngram must be >= 1")
        if self.method == "draft" and not self.draft:
            raise ValueError("speculative method draft needs the draft variant's name")

    @classmethod
    def from_serving(cls, serving: dict[str, Any]) -> "SpecConfig | None":
        """The recipe's serving.speculative, None when the recipe does not speculate."""
        section = serving.get("speculative")
        return cls(**section) if section else None


@dataclass
class SpecStats:
    proposed: int = 0  # tokens the proposer offered
    accepted: int = 0  # of those, the ones the target kept
    target_steps: int = 0  # target forwards after prefill (verifications and plain decodes)
    step_tokens: int = 0  # tokens those forwards emitted

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tokens_per_target_step(self) -> float | None:
        """1.0 without speculation; up to K+1 when every proposal is accepted."""
        return self.step_tokens / self.target_steps if self.target_steps else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "tokens_per_target_step": self.tokens_per_target_step}


@dataclass
class SpeculativeResult(GenerationResult):
    stats: SpecStats = field(default_factory=SpecStats)


def make_proposer(spec: SpecConfig, target: OnnxLM, draft: OnnxLM | None = None) -> Proposer:
    if spec.method == "ngram":
        return NgramProposer(spec.max_ngram)
    if draft is None:
        raise ValueError(f"speculative method draft needs the draft model (variant {spec.draft!r}) loaded")
    return DraftProposer(draft, target.vocab_size)


def generate_speculative(lm: OnnxLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, spec: SpecConfig,
                         draft: OnnxLM | None = None, proposer: Proposer | None = None, temperature: float = 0.0,
                         top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                         eos_token_id: int | Sequence[int] | None = None, ignore_eos: bool = False,
                         on_token: Callable[[int, int, float], None] | None = None) -> SpeculativeResult:
    """OnnxLM.generate's contract and output distribution, with speculation (`proposer` overrides the
    one spec names); the prompts run one after another at batch 1."""
    _check_sampling(temperature, top_k, top_p)
    stop = set(lm.eos_token_ids if eos_token_id is None else np.atleast_1d(eos_token_id).tolist())
    result = SpeculativeResult([[] for _ in prompts], [[] for _ in prompts], time.perf_counter(),
                               ["length"] * len(prompts))
    run = _Run(lm, proposer or make_proposer(spec, lm, draft), spec.tokens,
               Sampler(temperature, top_k, top_p, np.random.default_rng(seed)),
               set() if ignore_eos else stop, max_new_tokens, on_token, result)
    if max_new_tokens > 0:
        for seq, prompt in enumerate(prompts):
            run.sequence(seq, prompt)
    return run.result


@dataclass
class _Run:
    lm: OnnxLM
    proposer: Proposer
    k: int
    sampler: Sampler
    stop: set[int]
    limit: int
    on_token: Callable[[int, int, float], None] | None
    result: SpeculativeResult

    def sequence(self, seq: int, prompt: Sequence[int]) -> None:
        """Generate one prompt's tokens. Invariant: the cache holds every token of context but the last."""
        if not prompt:
            raise ValueError("prefill needs at least one prompt and no empty prompt")
        logits, cache = self.lm.prefill([prompt])
        context = list(prompt)
        new = self.sampler.pick(logits).tolist()
        while not self._emit(seq, new, context):
            # A step emits its accepted proposals and one token more: propose no more than fit.
            k = min(self.k, self.limit - len(self.result.tokens[seq]) - 1)
            proposal = self.proposer.propose(context, k, self.sampler).cut(k) if k > 0 else Proposal()
            new, cache = self._step(context[-1], proposal, cache)

    def _step(self, last: int, proposal: Proposal, cache):
        """One target forward: the tokens to emit and the cache holding last and the accepted proposals."""
        stats = self.result.stats
        stats.target_steps += 1
        if not proposal.tokens:
            logits, cache = self.lm.decode([last], cache)
            return self.sampler.pick(logits).tolist(), cache
        ids = np.asarray([[last, *proposal.tokens]], dtype=np.int64)
        logits, cache = self.lm.forward(ids, np.ones_like(ids), cache, logits_to_keep=ids.shape[1])
        accepted, new = verify(logits[0], proposal, self.sampler)
        stats.proposed += len(proposal.tokens)
        stats.accepted += accepted
        return new, cache.truncate(cache.seq_len - (len(proposal.tokens) - accepted))

    def _emit(self, seq: int, new: list[int], context: list[int]) -> bool:
        """Append the step's tokens; True when the sequence is done (an eos, or max_new_tokens)."""
        now = time.perf_counter()
        tokens = self.result.tokens[seq]
        for token in new:
            tokens.append(token)
            self.result.token_times[seq].append(now)
            context.append(token)
            if len(tokens) > 1:
                self.result.stats.step_tokens += 1
            if self.on_token is not None:
                self.on_token(seq, token, now)
            if token in self.stop:
                self.result.finish_reasons[seq] = "eos"
                return True
            if len(tokens) >= self.limit:
                return True
        return False


def verify(logits: np.ndarray, proposal: Proposal, sampler: Sampler) -> tuple[int, list[int]]:
    """The target's logits [k+1, V] after the last token and each of the k proposed ones: how many
    proposals it accepts, and the tokens to emit (those, then one of its own)."""
    x = proposal.tokens
    if sampler.greedy:
        target = logits.argmax(axis=-1)
        n = 0
        while n < len(x) and target[n] == x[n]:
            n += 1
        return n, [*x[:n], int(target[n])]
    p = sampler.probs(logits)
    for i, token in enumerate(x):
        q = None if proposal.probs is None else proposal.probs[i]
        q_x = 1.0 if q is None else q[token]
        if sampler.rng.random() * q_x < p[i, token]:  # accepted with probability min(1, p/q)
            continue
        return i, [*x[:i], int(draw(_residual(p[i], q, token)[None], sampler.rng)[0])]
    return len(x), [*x, int(draw(p[-1:], sampler.rng)[0])]


def _residual(p: np.ndarray, q: np.ndarray | None, token: int) -> np.ndarray:
    """max(0, p - q), where a rejected token is drawn from; q None is a point mass at token."""
    if q is None:
        residual = p.copy()
        residual[token] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    # A rejection means p(x) < q(x), so some other token has p > q; only rounding can leave nothing.
    return residual if residual.sum() > 0 else p
