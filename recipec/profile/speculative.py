"""The report's `variants.<v>.speculative`: the recipe's serving.speculative measured on the variant at batch 1.

Each prompt (the first half of an eval window: real text where the recipe's eval data is text, which is where
prompt lookup finds its n-grams) is decoded greedily twice in this process, plainly and speculatively, for the
workload's output tokens (eos ignored). n-gram lookup on a shared-buffer variant runs through the serving
engine over slots (runtime/engine.py: what `recipec serve` does, rollback by length); a draft model, or a
growing-cache variant, runs `recipec run`'s path (runtime/speculative.py, rollback by a Slice of the cache).
The entry says whether every speculative output equals the plain one token for token, the acceptance rate and
tokens per target step over all prompts, and the median TPOT of each way.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from recipec.runtime.engine import Engine, Policy
from recipec.runtime.lm import load
from recipec.runtime.slots import SlotLM
from recipec.runtime.speculative import SpecConfig, generate_speculative

# Prompts decoded each way: enough for a median, few enough that a build's profile stays short.
MAX_PROMPTS = 4
MAX_NEW_TOKENS = 64


def measure_speculative(lm: Any, variant_dir: Path, spec: SpecConfig, eval_tokens: np.ndarray,
                        serving_spec: dict[str, Any]) -> dict[str, Any]:
    tokens = np.asarray(eval_tokens, dtype=np.int64)
    prompts = [row[: max(1, tokens.shape[1] // 2)].tolist() for row in tokens[:MAX_PROMPTS]]
    new_tokens = min(_output_tokens(serving_spec), MAX_NEW_TOKENS)
    draft = load(variant_dir.parent / spec.draft, device=lm.device) if spec.method == "draft" else None
    in_engine = spec.method == "ngram" and lm.artifact["kv_cache"].get("buffer") == "shared"
    decode = _engine_decode if in_engine else _run_decode
    plain, fast, identical, proposed, accepted, steps, emitted = [], [], True, 0, 0, 0, 0
    for prompt in prompts:
        alone_tokens, alone_tpot, _ = decode(lm, prompt, new_tokens, None, None)
        tokens, tpot, stats = decode(lm, prompt, new_tokens, spec, draft)
        identical &= tokens == alone_tokens
        plain.append(alone_tpot)
        fast.append(tpot)
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
        steps, emitted = steps + stats.target_steps, emitted + stats.step_tokens
    tpot_plain, tpot_spec = _median_ms(plain), _median_ms(fast)
    return {
        "method": spec.method, "tokens": spec.tokens, "draft": spec.draft, "path": "engine" if in_engine else "run",
        "prompts": len(prompts),
        "prompt_tokens": len(prompts[0]), "new_tokens": new_tokens, "identical_greedy": identical,
        "acceptance_rate": accepted / proposed if proposed else None,
        "tokens_per_target_step": emitted / steps if steps else None,
        "tpot_ms": {"plain": tpot_plain, "speculative": tpot_spec},
        "tpot_ratio": tpot_spec / tpot_plain if tpot_plain and tpot_spec else None,
        "how": "measured: batch 1, greedy, the first half of each eval window as the prompt, decoded plainly and "
               "then speculatively in the profiling process, "
               + ("through the serving engine over shared-buffer slots (recipec serve's path)" if in_engine else
                  "through recipec run's path (generate_speculative; the engine speculates with ngram on "
                  "shared-buffer variants only)") + "; TPOT is the median over prompts",
    }


def _run_decode(lm: Any, prompt: list[int], new_tokens: int, spec: SpecConfig | None, draft: Any):
    """recipec run's path: OnnxLM.generate, or generate_speculative with the spec."""
    if spec is None:
        result = lm.generate([prompt], new_tokens, ignore_eos=True)
        return result.tokens[0], result.tpot(0), None
    result = generate_speculative(lm, [prompt], new_tokens, spec, draft=draft, ignore_eos=True)
    return result.tokens[0], result.tpot(0), result.stats


def _engine_decode(lm: Any, prompt: list[int], new_tokens: int, spec: SpecConfig | None, _draft: Any):
    """recipec serve's path at batch 1: the engine over one slot, speculating with the spec."""
    slots = SlotLM(lm, 1, len(prompt) + new_tokens + (spec.tokens if spec else 0) + 1)
    engine = Engine(slots, Policy("continuous", 1), speculation=spec)
    request = engine.submit(prompt, new_tokens)
    for _ in range(new_tokens + 1):  # a prefill, then at least one token per step
        if not engine.step():
            break
    if request.error is not None or not request.finished:
        raise RuntimeError(f"the engine did not finish a {new_tokens}-token request: {request.error}")
    times = request.token_times
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return request.tokens, tpot, engine.spec_stats


def _output_tokens(serving_spec: dict[str, Any]) -> int:
    value = (serving_spec.get("workload") or {}).get("output_tokens", 32)
    return int(value["max"]) if isinstance(value, dict) else int(value)


def _median_ms(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) * 1e3 if present else None
