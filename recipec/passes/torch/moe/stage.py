"""The moe stage: re-check the parameters against the model it receives, run the mode, save, and score
the result against the input model on the eval windows."""
from __future__ import annotations

import copy
from typing import Any

from recipec.passes.base import Pass, PassError, StageContext
from recipec.passes.torch.lm import count_parameters, eval_windows, load_lm, save_lm, score
from recipec.passes.torch.moe.experts import active_parameters, moe_blocks, prune_experts
from recipec.passes.torch.moe.moefy import moefy
from recipec.passes.torch.moe.params import PARAMS, check, problems_for, resolved


def apply(ctx: StageContext) -> dict[str, Any]:
    model = load_lm(ctx.input_dir)
    p = resolved(ctx.params)
    problems = problems_for(ctx.params, model.config)
    if problems:
        raise PassError("moe: " + "; ".join(f"{'.'.join(map(str, where))}: {message}" for where, message in problems))
    windows = eval_windows(ctx.data)
    active_before, total_before = active_parameters(model), count_parameters(model)
    reference = model if p["mode"] == "moefy" else copy.deepcopy(model)
    result, details = _run_mode(ctx, model, p)
    save_lm(result, ctx.input_dir, ctx.output_dir)
    result = load_lm(ctx.output_dir)  # what later stages and the export load
    after = score(result, windows, reference)
    active_after = active_parameters(result)
    ctx.log(f"moe {p['mode']}: active parameters per token {active_before:,} -> {active_after:,}, "
            f"perplexity {after['reference_perplexity']:.2f} -> {after['perplexity']:.2f}")
    return {"mode": p["mode"], "family_before": model.config.model_type, "family_after": result.config.model_type,
            **details, "parameters_before": total_before,
            "parameters_after": count_parameters(result),
            "active_parameters_before": active_before, "active_parameters_after": active_after,
            "eval_perplexity_before": after["reference_perplexity"], "eval_perplexity_after": after["perplexity"],
            "eval_kl_to_input": after["kl"]}


def _run_mode(ctx: StageContext, model, p: dict[str, Any]):
    mode = p["mode"]
    if mode == "top_k":
        before = model.config.num_experts_per_tok
        model.config.num_experts_per_tok = p["top_k"]  # the modules are rebuilt from it on reload
        return model, {"top_k_before": before, "top_k_after": p["top_k"]}
    calibration = ctx.data.calibration()
    steps = model.config.num_hidden_layers if mode == "moefy" else len(moe_blocks(model))
    with ctx.progress("moefy" if mode == "moefy" else "pruning experts", total=steps) as advance:
        if mode == "moefy":
            return moefy(model, calibration, p, advance)
        return model, prune_experts(model, p["keep"], calibration, advance)


PASS = Pass(
    op="moe",
    consumes="torch",
    produces="torch",
    params=PARAMS,
    apply=apply,
    summary="dense -> mixture of experts (MoEfication), experts per token, expert pruning (docs/torch-passes.md)",
    uses_data=("calibration", "eval"),
    check=check,
)
