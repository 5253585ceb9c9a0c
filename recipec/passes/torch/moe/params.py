"""moe's parameters: their schema, moefy's defaults, and every rule they must follow given the config of
the model the stage receives; `validate` checks them against the source config, the stage against its input."""
from __future__ import annotations

from typing import Any

from recipec.core.params import prop
from recipec.passes.base import CheckContext
from recipec.passes.torch.lm import RESHAPING_OPS

MODES = ("moefy", "top_k", "prune_experts")
MOEFY_FAMILIES = {"llama": "mixtral", "mistral": "mixtral"}
EXPERTS_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts"}
MODE_KEYS = {"moefy": ("experts", "top_k", "seed"), "top_k": ("top_k",), "prune_experts": ("keep",)}

PARAMS: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["mode"],
    "properties": {
        "mode": {"enum": list(MODES),
                 "description": "moefy: split a dense model's MLPs into routed experts (llama, mistral -> "
                                "mixtral) | top_k: set an MoE model's experts per token | prune_experts: keep "
                                "the experts its routers use most on the calibration windows."},
        "experts": prop(["integer", "null"], None, "moefy: experts per MLP (default 8); must divide "
                                                   "intermediate_size.", minimum=2),
        "top_k": prop(["integer", "null"], None, "moefy: experts computed per token (default 2); top_k: the new "
                                                 "experts per token.", minimum=1),
        "keep": prop(["integer", "null"], None, "prune_experts: experts kept per layer (at least the experts per "
                                                "token).", minimum=1),
        "seed": prop(["integer", "null"], None, "moefy: seed of the k-means initialisation (default 0).", minimum=0),
    },
}
MOEFY_DEFAULTS = {"experts": 8, "top_k": 2, "seed": 0}


def experts_of(config) -> int | None:
    key = EXPERTS_KEY.get(config.model_type)
    return getattr(config, key) if key else None


def resolved(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters with moefy's defaults filled in (they are null in the schema: other modes use none)."""
    if params["mode"] != "moefy":
        return params
    return {**params, **{k: v for k, v in MOEFY_DEFAULTS.items() if params.get(k) is None}}


def problems_for(params: dict[str, Any], config) -> list[tuple[tuple, str]]:
    """Every mistake in the parameters, given the config of the model the stage receives (None: unknown)."""
    mode, p = params["mode"], resolved(params)
    problems = [((key,), (f"{key} applies to mode {', '.join(m for m, keys in MODE_KEYS.items() if key in keys)}, "
                          f"not {mode}"))
                for key in ("experts", "top_k", "keep", "seed") if params.get(key) is not None
                and key not in MODE_KEYS[mode]]
    required = {"top_k": "top_k", "prune_experts": "keep"}.get(mode)
    if required and p.get(required) is None:
        problems.append(((required,), f"mode {mode} needs {required}"))
    if problems or config is None:
        return problems
    return _config_problems(p, config)


def _config_problems(p: dict[str, Any], config) -> list[tuple[tuple, str]]:
    mode, family, experts = p["mode"], config.model_type, experts_of(config)
    if mode == "moefy":
        if experts is not None:
            return [(("mode",), (f"moefy makes a dense model an MoE; {family} already has {experts} experts "
                                 "(use mode top_k or prune_experts)"))]
        if family not in MOEFY_FAMILIES:
            return [(("mode",), f"moefy supports {', '.join(MOEFY_FAMILIES)}, not {family}")]
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            return [(("mode",), "moefy: the model's attention or MLP has biases, which Mixtral's layers do not")]
        if config.intermediate_size % p["experts"]:
            return [(("experts",), (f"experts {p['experts']} does not divide intermediate_size "
                                    f"{config.intermediate_size}"))]
        if p["top_k"] > p["experts"]:
            return [(("top_k",), f"top_k {p['top_k']} is more than the {p['experts']} experts")]
        return []
    if experts is None:
        return [(("mode",), (f"mode {mode} needs an MoE family ({', '.join(EXPERTS_KEY)}); {family} is dense "
                             "(use mode moefy first)"))]
    if mode == "top_k" and p["top_k"] > experts:
        return [(("top_k",), f"top_k {p['top_k']} is more than the model's {experts} experts")]
    if mode == "prune_experts":
        if p["keep"] >= experts:
            return [(("keep",), f"keep {p['keep']} removes nothing: the model has {experts} experts")]
        if p["keep"] < config.num_experts_per_tok:
            return [(("keep",), (f"keep {p['keep']} is fewer than the {config.num_experts_per_tok} experts per "
                                 "token (lower it with mode top_k first)"))]
    return []


def check(params: dict[str, Any], ctx: CheckContext) -> list[tuple[tuple, str]]:
    reshaped = any(op in RESHAPING_OPS for op in ctx.upstream.values())
    # After another prune/moe stage the source config no longer describes this stage's input: apply re-checks.
    return problems_for(params, None if reshaped else ctx.model_config)
