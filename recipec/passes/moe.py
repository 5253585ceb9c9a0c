"""moe: make a dense model a mixture of experts (moefy), or change an MoE model's experts per token
(top_k) or drop its least-used experts (prune_experts).

moefy (MoEfication, Zhang et al. 2022) on llama/mistral: each MLP's intermediate channels are clustered
by co-activation on the calibration tokens (balanced k-means on the channels' |activation| profiles)
into `experts` equal groups; expert e is the dense MLP restricted to its channels, so the sum of all
experts is exactly the dense MLP. A linear router per layer is fitted (ridge regression) to predict the
size of each expert's contribution to a token from the MLP's input. The model becomes a `mixtral`
(same attention, norms and embeddings; a sparse MoE block in place of the MLP), so it saves, loads and
exports like any Mixtral.

Mixtral weighs the top_k experts by a softmax over the router logits renormalized over the chosen ones.
MoEfication adds the chosen experts unweighted, so the fitted router is scaled until its logits on the
calibration tokens span ROUTER_SPREAD: the top_k choice (scale-invariant) is unchanged while every chosen
weight is 1/top_k within ~ROUTER_SPREAD, and each expert's down projection is multiplied by top_k. With
top_k = experts the result computes the dense model.

In the exported graph (export's experts_implementation="batched_mm"), a token's top_k expert ids
index a Gather of those experts' weight matrices, followed by batched MatMuls over (token, chosen
expert) pairs: tokens x top_k expert products, never the unselected experts'. The Gather copies the
chosen experts' weights per token, so prefill moves tokens x top_k expert matrices through memory where
a dense MLP reads its weights once (docs/torch-passes.md).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .base import CheckContext, Pass, PassError, StageContext
from .torch_lm import RESHAPING_OPS, count_parameters, eval_windows, load_lm, run_with_hooks, save_lm, score, top_indices

MODES = ("moefy", "top_k", "prune_experts")
MOEFY_FAMILIES = {"llama": "mixtral", "mistral": "mixtral"}
EXPERTS_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts"}
MODE_KEYS = {"moefy": ("experts", "top_k", "seed"), "top_k": ("top_k",), "prune_experts": ("keep",)}
ROUTER_SPREAD = 1e-3
RIDGE = 1e-3  # of the mean diagonal of X^T X: keeps the router fit stable with few calibration tokens
KMEANS_ITERATIONS = 30
MAX_TOKENS = 16384  # calibration tokens used to cluster channels and fit routers

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
        "experts": {"type": ["integer", "null"], "minimum": 2, "default": None,
                    "description": "moefy: experts per MLP (default 8); must divide intermediate_size."},
        "top_k": {"type": ["integer", "null"], "minimum": 1, "default": None,
                  "description": "moefy: experts computed per token (default 2); top_k: the new experts per token."},
        "keep": {"type": ["integer", "null"], "minimum": 1, "default": None,
                 "description": "prune_experts: experts kept per layer (at least the experts per token)."},
        "seed": {"type": ["integer", "null"], "minimum": 0, "default": None,
                 "description": "moefy: seed of the k-means initialisation (default 0)."},
    },
}
MOEFY_DEFAULTS = {"experts": 8, "top_k": 2, "seed": 0}


# --- validation -------------------------------------------------------------------------------------------

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


# --- parameter counts ---------------------------------------------------------------------------------------

def active_parameters(model) -> int:
    """Parameters a token uses: all, less the share of expert weights its router does not choose."""
    total = count_parameters(model)
    top_k = getattr(model.config, "num_experts_per_tok", None)
    for module in model.modules():
        if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and module.gate_up_proj.ndim == 3:
            experts = module.gate_up_proj.shape[0]
            expert_params = module.gate_up_proj.numel() + module.down_proj.numel()
            total -= round(expert_params * (1 - top_k / experts))
    return total


# --- moefy ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def mlp_inputs(model, calibration: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the MLP's input (the post-attention-norm hidden state) at every calibration token."""
    layers = model.model.layers
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [layer.mlp.register_forward_hook(lambda m, args, out, i=i: captured[i].append(args[0].flatten(0, 1)))
               for i, layer in enumerate(layers)]
    run_with_hooks(model, calibration, handles)
    return [torch.cat(xs)[:MAX_TOKENS].double() for xs in captured]


def balanced_kmeans(features: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """Labels of rows of `features` (unit vectors) in `clusters` groups of equal size: spherical k-means
    whose assignment step fills each cluster to capacity in order of similarity."""
    n = features.shape[0]
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=generator)[:clusters]]
    labels = None
    for _ in range(KMEANS_ITERATIONS):
        new = _balanced_assign(features @ centroids.T, n // clusters)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = torch.stack([features[labels == c].mean(0) for c in range(clusters)])
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return labels


def _balanced_assign(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    n, k = similarity.shape
    order = np.argsort(-similarity.flatten().numpy(), kind="stable")
    labels, counts, left = np.full(n, -1), np.zeros(k, dtype=np.int64), n
    for flat in order:
        row, cluster = divmod(int(flat), k)
        if labels[row] < 0 and counts[cluster] < capacity:
            labels[row], left = cluster, left - 1
            counts[cluster] += 1
            if not left:
                break
    return torch.from_numpy(labels)


@torch.no_grad()
def split_layer(mlp, x: torch.Tensor, experts: int, top_k: int, seed: int) -> dict[str, Any]:
    """Expert channel groups, router weight and expert tensors for one dense MLP, from its inputs x."""
    gate, up, down = (w.double() for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
    h = mlp.act_fn(x @ gate.T) * (x @ up.T)  # [tokens, intermediate]
    profiles = h.abs().T
    profiles = profiles / profiles.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = balanced_kmeans(profiles, experts, seed)
    groups = [torch.nonzero(labels == e).flatten() for e in range(experts)]
    # Each expert's contribution to each token's MLP output, whose size the router learns to predict.
    sizes = torch.stack([(h[:, g] @ down[:, g].T).norm(dim=1) for g in groups], dim=1)  # [tokens, experts]
    router = fit_router(x, sizes)
    predicted = (x @ router.T).topk(top_k, dim=1).indices
    best = sizes.topk(top_k, dim=1).indices
    recall = (predicted[:, :, None] == best[:, None, :]).any(-1).double().mean().item()
    return {"groups": groups, "router": router, "router_recall": recall,
            "gate_up": torch.stack([torch.cat([gate[g], up[g]]) for g in groups]),
            "down": torch.stack([down[:, g] * top_k for g in groups])}


def fit_router(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Ridge regression of the expert sizes on the MLP input (no bias: Mixtral's router has none), scaled
    so the logits span ROUTER_SPREAD on these tokens (see the module docstring). [experts, hidden]."""
    gram = x.T @ x
    ridge = RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram + ridge, x.T @ targets).T
    logits = x @ weight.T
    spread = (logits.max(1).values - logits.min(1).values).max().clamp_min(1e-12)
    return weight * (ROUTER_SPREAD / spread)


def mixtral_config(dense, experts: int, top_k: int):
    from transformers import MixtralConfig

    c = dense.config
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise PassError("moefy: the model's attention or MLP has biases, which Mixtral's layers do not")
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size // experts,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None), hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters, attention_dropout=c.attention_dropout,
        sliding_window=getattr(c, "sliding_window", None), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        num_local_experts=experts, num_experts_per_tok=top_k)


def moefy(dense, calibration: torch.Tensor, p: dict[str, Any], advance: Callable) -> tuple[Any, dict[str, Any]]:
    from transformers import MixtralForCausalLM

    inputs = mlp_inputs(dense, calibration)
    config = mixtral_config(dense, p["experts"], p["top_k"])
    torch.manual_seed(p["seed"])  # the new modules' initial weights are all overwritten; seeded anyway
    moe = MixtralForCausalLM(config).eval()
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if unexpected or any(".mlp." not in k for k in missing):
        raise PassError(f"moefy: {dense.config.model_type} weights do not map onto mixtral "
                        f"(unexpected {unexpected[:3]}, missing {[k for k in missing if '.mlp.' not in k][:3]})")
    recalls = []
    for layer, target, x in zip(dense.model.layers, moe.model.layers, inputs):
        split = split_layer(layer.mlp, x, p["experts"], p["top_k"], p["seed"])
        with torch.no_grad():
            target.mlp.gate.weight.copy_(split["router"])
            target.mlp.experts.gate_up_proj.copy_(split["gate_up"])
            target.mlp.experts.down_proj.copy_(split["down"])
        recalls.append(round(split["router_recall"], 4))
        advance(1)
    return moe, {"experts": p["experts"], "top_k": p["top_k"], "router_recall": recalls,
                 "calibration_tokens": int(inputs[0].shape[0])}


# --- MoE families ------------------------------------------------------------------------------------------

def moe_blocks(model) -> list[torch.nn.Module]:
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


@torch.no_grad()
def expert_usage(model, calibration: torch.Tensor) -> list[torch.Tensor]:
    """Per MoE block and expert: the routing weight it received, summed over the calibration tokens."""
    blocks = moe_blocks(model)
    usage = [torch.zeros(block.gate.weight.shape[0], dtype=torch.float64) for block in blocks]

    def hook(i):
        def record(module, args, out):
            _, weights, indices = out
            usage[i].index_add_(0, indices.flatten(), weights.flatten().double())
        return record

    handles = [block.gate.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    run_with_hooks(model, calibration, handles)
    return usage


def prune_experts(model, keep: int, calibration: torch.Tensor, advance: Callable) -> dict[str, Any]:
    usage = expert_usage(model, calibration)
    kept_all = []
    for block, used in zip(moe_blocks(model), usage):
        kept = top_indices(used, keep)
        with torch.no_grad():
            block.gate.weight = torch.nn.Parameter(block.gate.weight[kept].clone())
            block.experts.gate_up_proj = torch.nn.Parameter(block.experts.gate_up_proj[kept].clone())
            block.experts.down_proj = torch.nn.Parameter(block.experts.down_proj[kept].clone())
        block.gate.num_experts = block.experts.num_experts = keep
        kept_all.append(kept.tolist())
        advance(1)
    setattr(model.config, EXPERTS_KEY[model.config.model_type], keep)
    total = [float(u.sum()) for u in usage]
    share = [round(float(u[k].sum()) / t, 4) if t else 0.0 for u, k, t in zip(usage, kept_all, total)]
    return {"kept_experts": kept_all, "kept_routing_share": share}


# --- the pass ------------------------------------------------------------------------------------------------

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
