"""The report's `variants.<v>.speculative`: the recipe's serving.speculative measured on the variant.

Speculation runs in `recipec run`'s path (runtime/speculative.py, batch 1), not in the batching engine, so
this is its own measurement beside the serving runs: each prompt (the first half of an eval window: real
text where the recipe's eval data is text, which is where prompt lookup finds its n-grams) is decoded greedily
twice in this process, plainly and speculatively, for the workload's output tokens (eos ignored). The entry
says whether every speculative output equals the plain one token for token, the acceptance rate and tokens per
target step over all prompts, and the median TPOT of each way.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from recipec.runtime.lm import load
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
    plain, fast, identical, proposed, accepted, steps, emitted = [], [], True, 0, 0, 0, 0
    for prompt in prompts:
        alone = lm.generate([prompt], new_tokens, ignore_eos=True)
        result = generate_speculative(lm, [prompt], new_tokens, spec, draft=draft, ignore_eos=True)
        identical &= result.tokens == alone.tokens
        plain.append(alone.tpot(0))
        fast.append(result.tpot(0))
        stats = result.stats
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
        steps, emitted = steps + stats.target_steps, emitted + stats.step_tokens
    tpot_plain, tpot_spec = _median_ms(plain), _median_ms(fast)
    return {
        "method": spec.method, "tokens": spec.tokens, "draft": spec.draft, "prompts": len(prompts),
        "prompt_tokens": len(prompts[0]), "new_tokens": new_tokens, "identical_greedy": identical,
        "acceptance_rate": accepted / proposed if proposed else None,
        "tokens_per_target_step": emitted / steps if steps else None,
        "tpot_ms": {"plain": tpot_plain, "speculative": tpot_spec},
        "tpot_ratio": tpot_spec / tpot_plain if tpot_plain and tpot_spec else None,
        "how": "measured: batch 1, greedy, the first half of each eval window as the prompt, decoded plainly and "
               "then speculatively in the profiling process (recipec run's path; the serving engine does not "
               "speculate); TPOT is the median over prompts",
    }


def _output_tokens(serving_spec: dict[str, Any]) -> int:
    value = (serving_spec.get("workload") or {}).get("output_tokens", 32)
    return int(value["max"]) if isinstance(value, dict) else int(value)


def _median_ms(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) * 1e3 if present else None
