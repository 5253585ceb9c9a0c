"""Quality of a variant against its source model: KL divergence, top-1 agreement and perplexity over the
eval tokens, and greedy agreement of generated continuations. Evaluated in the calling process, against the
source model's eval logits computed once (`source_reference`) and read back a sequence at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from recipec.core.memory import release
from recipec.onnx.logits import log_softmax
from recipec.runtime.engine import Engine, Policy, RealClock
from recipec.runtime.slots import step_model


def logit_quality(tokens: np.ndarray, logits: Iterable[np.ndarray],
                  source_logits: Iterable[np.ndarray]) -> dict[str, float]:
    """tokens [N,T], logits [N,T,V] of the variant and of the source (each an array or rows one at a time),
    next-token logits at each position.
    One sequence at a time: float64 log-softmax of a whole eval set of a 32k vocabulary would take GBs."""
    kl = top1 = nll = src_nll = 0.0
    for tok, ours, theirs in zip(np.asarray(tokens), logits, source_logits):
        lq, lp = log_softmax(ours), log_softmax(theirs)
        kl += float((np.exp(lp) * (lp - lq)).sum())
        top1 += float((ours.argmax(-1) == theirs.argmax(-1)).sum())
        nll, src_nll = nll + _nll_sum(tok, lq), src_nll + _nll_sum(tok, lp)
    n, n_pred = tokens.size, tokens.shape[0] * (tokens.shape[1] - 1)
    ppl, src_ppl = math.exp(nll / n_pred), math.exp(src_nll / n_pred)
    return {"kl_divergence": kl / n, "top1_agreement": top1 / n, "perplexity": ppl, "source_perplexity": src_ppl,
            "perplexity_ratio": ppl / src_ppl, "eval_tokens": int(n)}


def _nll_sum(tokens: np.ndarray, logprobs: np.ndarray) -> float:
    """Position t predicts token t+1; the last position has nothing to predict."""
    return float(-logprobs[np.arange(len(tokens) - 1), tokens[1:]].sum())


def greedy_agreement(ours: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]]) -> float:
    """Mean over prompts of the fraction of tokens generated before the first divergence: after it the
    two continuations condition on different text, so later matches mean nothing."""
    fractions = []
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        fractions.append(n / max(len(b), 1))
    return float(np.mean(fractions)) if fractions else float("nan")


def greedy_generate(model, prompts: Sequence[Sequence[int]], n_new: int) -> list[list[int]]:
    """Through the same engine that is measured, so the tokens compared are the tokens served."""
    engine = Engine(step_model(model, len(prompts)), Policy("static", max_batch_size=len(prompts)), RealClock())
    reqs = [engine.submit(p, n_new) for p in prompts]
    while engine.step(flush=True):
        pass
    return [r.tokens for r in reqs]


def evaluate_quality(model, eval_tokens: np.ndarray | None, source_logits: Iterable[np.ndarray] | None,
                     source_greedy: dict[str, Any] | None) -> dict[str, Any]:
    q: dict[str, Any] = {"kl_divergence": None, "top1_agreement": None, "perplexity": None, "reason": None}
    if eval_tokens is not None and source_logits is not None:
        tokens = np.asarray(eval_tokens)
        q.update(logit_quality(tokens, sequence_logits(model, tokens), source_logits))
    else:
        q["reason"] = "no source eval logits were given"
    if source_greedy:
        ours = greedy_generate(model, source_greedy["prompts"], len(source_greedy["tokens"][0]))
        q["greedy_agreement"] = greedy_agreement(ours, source_greedy["tokens"])
        q["greedy_prompts"] = len(source_greedy["prompts"])
    return q


def sequence_logits(model, tokens: np.ndarray) -> Iterator[np.ndarray]:
    """[T,V] logits at every position (logits_to_keep=0) of each sample in turn: alone, so no padding is
    involved, and lazily, so a large eval set never sits in memory twice."""
    for row in np.asarray(tokens, dtype=np.int64):
        ids = row[None, :]
        logits, _ = model.forward(ids, np.ones_like(ids), model.empty_cache(1), logits_to_keep=0)
        yield logits[0]


def source_reference(model_dir: Path, eval_tokens: np.ndarray, prompts: Sequence[Sequence[int]] = (),
                     n_new: int = 16, spool: Path | None = None) -> dict[str, Any]:
    """What profile_variant compares against, computed once from the source (transformers) model:
    {"logits": [N,T,V] float32, "greedy": {"prompts", "tokens"} or None}. With `spool`, the logits are written
    there and read back a sequence at a time (SpooledLogits): a 150k vocabulary makes 1.2 GB of them for 16 x 128
    eval tokens, which the profiling process then does not hold while variants are served. The transformers
    model is freed before this returns."""
    import torch
    from transformers import AutoModelForCausalLM

    tokens = np.asarray(eval_tokens)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.as_tensor(tokens, dtype=torch.long)
        rows = (model(ids[i:i + 1]).logits[0].float().numpy() for i in range(len(ids)))
        logits = SpooledLogits.write(spool, rows, len(ids)) if spool is not None else _stack(rows, len(ids))
        toks = [_torch_greedy(model, p, n_new) for p in prompts]
    del model
    release()
    greedy = {"prompts": [list(p) for p in prompts], "tokens": toks} if prompts else None
    return {"logits": logits, "greedy": greedy}


def _stack(rows: Iterator[np.ndarray], n: int) -> np.ndarray:
    """Into one array allocated once (a list of rows and their concatenation would be two copies)."""
    out = None
    for i, row in enumerate(rows):
        if out is None:
            out = np.empty((n, *row.shape), np.float32)
        out[i] = row
    return out if out is not None else np.empty((0, 0, 0), np.float32)


@dataclass(frozen=True)
class SpooledLogits:
    """[N,T,V] float32 logits in a file, read back one sequence at a time with plain reads (a memory map would
    leave every page read resident in this process)."""
    path: Path
    shape: tuple[int, int, int]

    @classmethod
    def write(cls, path: Path, rows: Iterable[np.ndarray], n: int) -> "SpooledLogits":
        shape = None
        with open(path, "wb") as out:
            for row in rows:
                shape = shape or (n, *row.shape)
                row.astype(np.float32, copy=False).tofile(out)
        return cls(Path(path), shape or (0, 0, 0))

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        with open(self.path, "rb") as f:
            for _ in range(self.shape[0]):
                yield np.fromfile(f, np.float32, self.shape[1] * self.shape[2]).reshape(self.shape[1:])


def _torch_greedy(model, prompt: Sequence[int], n_new: int) -> list[int]:
    """Plain argmax, eos not special: generate()'s min_new_tokens would mask eos, which the served
    variant (ignore_eos, no masking) does not, and the two would diverge wherever eos is the argmax."""
    import torch

    ids, out = torch.tensor([list(prompt)]), []
    for _ in range(n_new):
        out.append(int(model(ids).logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out
