"""The prune stage: re-check the parameters against the model it receives, prune, save, and score the
result against the unpruned model on the eval windows."""
from __future__ import annotations

import copy
from typing import Any

from recipec.passes.base import Pass, PassError, StageContext
from recipec.passes.torch.lm import count_parameters, eval_windows, load_lm, save_lm, score
from recipec.passes.torch.prune.params import (PARAMS, check, family_problem, kept_size, param_problems,
                                               resolved_importance)
from recipec.passes.torch.prune.targets import prune_heads, prune_layers, prune_mlp, prune_unstructured


def apply(ctx: StageContext) -> dict[str, Any]:
    params = ctx.params
    problems = param_problems(params)
    if problems:
        raise PassError("prune: " + "; ".join(message for _, message in problems))
    model = load_lm(ctx.input_dir)
    target = params["target"]
    unsupported = family_problem(target, model.config.model_type)
    if unsupported:
        raise PassError(unsupported)
    windows = eval_windows(ctx.data)
    reference = copy.deepcopy(model)
    parameters_before = count_parameters(model)
    details = _run_target(ctx, model)
    save_lm(model, ctx.input_dir, ctx.output_dir)
    pruned = load_lm(ctx.output_dir)  # what later stages load: proves the config round-trips
    after, parameters_after = score(pruned, windows, reference), count_parameters(pruned)
    ctx.log(f"prune {target}: {parameters_before:,} -> {parameters_after:,} parameters, "
            f"perplexity {after['reference_perplexity']:.2f} -> {after['perplexity']:.2f}")
    return {"target": target, "importance": resolved_importance(params), **details,
            "parameters_before": parameters_before, "parameters_after": parameters_after,
            "eval_perplexity_before": after["reference_perplexity"], "eval_perplexity_after": after["perplexity"],
            "eval_kl_to_unpruned": after["kl"]}


def _run_target(ctx: StageContext, model) -> dict[str, Any]:
    params, config = ctx.params, model.config
    target, importance = params["target"], resolved_importance(params)
    if target == "unstructured":
        with ctx.progress("zeroing weights", total=1) as advance:
            return prune_unstructured(model, params["amount"], advance)
    keep, current = kept_size(params, config)
    calibration = ctx.data.calibration() if importance != "magnitude" else None
    with ctx.progress(f"pruning {target}", total=1 if target == "layers" else config.num_hidden_layers) as advance:
        if target == "mlp":
            prune_mlp(model, keep, importance, calibration, advance)
            return {"intermediate_size_before": current, "intermediate_size_after": keep}
        if target == "heads":
            kv_before = config.num_key_value_heads
            sizes = prune_heads(model, keep, params["gqa"], importance, calibration, advance)
            return {"num_attention_heads_before": current, "num_key_value_heads_before": kv_before, **sizes}
        return {"num_hidden_layers_before": current, "num_hidden_layers_after": keep,
                **prune_layers(model, keep, calibration, advance)}


PASS = Pass(
    op="prune",
    consumes="torch",
    produces="torch",
    params=PARAMS,
    apply=apply,
    summary="structured pruning of MLP channels, attention heads or layers (docs/torch-passes.md)",
    uses_data=("calibration", "eval"),
    check=check,
)
