"""prune's parameters: their schema, the size each target keeps, and every rule they must follow, which
`validate` checks against the source config and the stage re-checks against the model it receives."""
from __future__ import annotations

from typing import Any

from recipec.core.params import prop
from recipec.passes.base import CheckContext, PassError
from recipec.passes.torch.lm import RESHAPING_OPS

TARGETS = ("mlp", "heads", "layers", "unstructured")
LLAMA_LIKE = ("llama", "mistral", "qwen2")
FAMILIES = {"mlp": LLAMA_LIKE + ("gpt2",), "heads": LLAMA_LIKE, "layers": LLAMA_LIKE + ("gpt2",),
            "unstructured": None}  # None: any family
KEEP_KEYS = {"mlp": "keep_intermediate_size", "heads": "keep_heads", "layers": "keep_layers"}
IMPORTANCE = {"mlp": ("activation", "magnitude"), "heads": ("activation", "magnitude"),
              "layers": ("block_influence",), "unstructured": ("magnitude",)}

PARAMS: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["target"],
    "properties": {
        "target": {"enum": list(TARGETS),
                   "description": "mlp: intermediate channels | heads: attention heads | layers: decoder layers | "
                                  "unstructured: zero the smallest weights (no latency saved by itself)."},
        "amount": prop(["number", "null"], None, "Fraction removed (of channels, heads, layers, or weights for "
                                                 "unstructured). Give either this or the target's keep_* size.",
                       exclusiveMinimum=0, exclusiveMaximum=1),
        "keep_intermediate_size": prop(["integer", "null"], None, "mlp: intermediate channels kept per layer "
                                                                  "(instead of amount).", minimum=1),
        "keep_heads": prop(["integer", "null"], None, "heads: query heads kept per layer (instead of amount); a "
                                                      "multiple of the query heads per kv group (gqa: kv_groups) "
                                                      "or of num_key_value_heads (gqa: query_heads).", minimum=1),
        "keep_layers": prop(["integer", "null"], None, "layers: decoder layers kept (instead of amount).",
                            minimum=1),
        "importance": {"enum": ["auto", "activation", "magnitude", "block_influence"], "default": "auto",
                       "description": "How channels/heads/layers are ranked. activation: the size of what each "
                                      "channel/head adds to the residual stream on the calibration windows "
                                      "(Minitron, Wanda); magnitude: weight norms; block_influence (layers): "
                                      "1 - cosine between a layer's input and output (ShortGPT). auto: "
                                      "activation for mlp/heads, block_influence for layers, magnitude for "
                                      "unstructured."},
        "multiple_of": prop("integer", 8, "mlp with amount: the kept intermediate size is rounded to a multiple "
                                          "of this (matrix kernels prefer such sizes).", minimum=1),
        "gqa": {"enum": ["kv_groups", "query_heads"], "default": "kv_groups",
                "description": "heads: kv_groups removes whole kv heads with their query heads (shrinks the KV "
                               "cache); query_heads removes the same number of query heads from every group."},
    },
}


def intermediate_size(config) -> int:
    if config.model_type == "gpt2":
        return config.n_inner or 4 * config.n_embd
    return config.intermediate_size


def _from_amount(total: int, amount: float, unit: int = 1) -> int:
    """Units of `unit` kept out of `total` when `amount` of them go, at least one unit."""
    return max(unit, round((1 - amount) * total / unit) * unit)


class SizeError(PassError):
    """A size that cannot be pruned to, with the `with` field to blame."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def kept_size(params: dict[str, Any], config) -> tuple[int, int]:
    """(kept, current) in the target's unit: channels, query heads or layers. Raises SizeError."""
    target, amount = params["target"], params["amount"]
    explicit = params.get(KEEP_KEYS[target])
    field = KEEP_KEYS[target] if explicit is not None else "amount"
    if target == "mlp":
        current, unit = intermediate_size(config), params["multiple_of"]
    elif target == "layers":
        current, unit = config.num_hidden_layers, 1
    else:
        current, unit = config.num_attention_heads, _head_unit(params["gqa"], config)
    kept = explicit if explicit is not None else _from_amount(current, amount, unit)
    if target == "heads" and kept % unit:
        raise SizeError(field, f"keep_heads {kept} is not a multiple of {unit}: "
                               f"{_head_unit_reason(params['gqa'], config)}")
    if kept >= current:
        raise SizeError(field, f"prune {target}: keeping {kept} of {current} removes nothing"
                               + (f" (amount {amount} rounds to whole multiples of {unit})" if explicit is None else ""))
    return kept, current


def _head_unit(gqa: str, config) -> int:
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % kv:
        raise SizeError("target", f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if gqa == "query_heads":
        if heads == kv:
            raise SizeError("gqa", "gqa: query_heads needs grouped-query attention (num_key_value_heads < "
                                   f"num_attention_heads, here both {heads}); use gqa: kv_groups")
        return kv
    return heads // kv


def _head_unit_reason(gqa: str, config) -> str:
    if gqa == "query_heads":
        return f"every one of the {config.num_key_value_heads} kv groups must keep the same number of query heads"
    return f"whole kv groups of {config.num_attention_heads // config.num_key_value_heads} query heads are removed"


def resolved_importance(params: dict[str, Any]) -> str:
    return IMPORTANCE[params["target"]][0] if params["importance"] == "auto" else params["importance"]


def param_problems(params: dict[str, Any]) -> list[tuple[tuple, str]]:
    """The rules between the parameters themselves, whatever the model."""
    target = params["target"]
    problems = []
    for other, key in KEEP_KEYS.items():
        if other != target and params.get(key) is not None:
            problems.append(((key,), f"{key} applies to target {other}, not {target}"))
    explicit = KEEP_KEYS.get(target)
    given = params["amount"] is not None, explicit is not None and params.get(explicit) is not None
    if all(given):
        problems.append(((explicit,), f"give either amount or {explicit}, not both"))
    elif not any(given):
        problems.append((("amount",), "give amount (a fraction in (0, 1))" + (f" or {explicit}" if explicit else "")))
    importance = resolved_importance(params)
    if importance not in IMPORTANCE[target]:
        problems.append((("importance",), (f"importance {importance} does not apply to target {target} "
                                           f"(use {' or '.join(IMPORTANCE[target])})")))
    return problems


def family_problem(target: str, family: str) -> str | None:
    families = FAMILIES[target]
    if families is not None and family not in families:
        return f"prune {target} supports {', '.join(families)}, not {family}"
    return None


def check(params: dict[str, Any], ctx: CheckContext) -> list[tuple[tuple, str]]:
    problems = param_problems(params)
    config = ctx.model_config
    reshaped = any(op in RESHAPING_OPS for op in ctx.upstream.values())
    if problems or config is None or reshaped:
        return problems  # the apply re-checks against the model it gets
    unsupported = family_problem(params["target"], config.model_type)
    if unsupported:
        return [(("target",), unsupported)]
    if params["target"] == "unstructured":
        return problems
    try:
        kept_size(params, config)
    except SizeError as exc:
        return [((exc.field,), str(exc))]
    return problems
