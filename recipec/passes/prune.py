"""prune: remove MLP channels, attention heads or whole decoder layers, so the exported graph has smaller
tensors; or zero small weights (unstructured, for size/sparsity experiments: it saves no latency).

- mlp: torch-pruning's dependency graph removes the chosen intermediate channels from gate_proj and
  up_proj (rows) and down_proj (columns) together (llama, mistral, qwen2); gpt2's Conv1D MLP is sliced
  by hand (see _slice_gpt2_mlp).
- heads: whole heads are sliced out of q/k/v (rows) and o_proj (columns) with transformers'
  prune_linear_layer. torch-pruning 1.6.1 cannot do it on transformers 5: building the group of any
  q/k/v/o projection never ends (reproduced here; torch-pruning issue #527). GQA is respected: either
  whole kv groups go with their query heads, or every group loses the same number of query heads.
- layers: decoder layers with the lowest block influence (ShortGPT) are dropped.
- unstructured: torch.nn.utils.prune's L1 magnitude zeroing of each decoder-layer matrix.

The same number of channels/heads is removed in every layer (a config has one size), each layer choosing
its own by importance. docs/torch-passes.md has the measured effect.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .base import CheckContext, Pass, PassError, StageContext
from .torch_lm import RESHAPING_OPS, count_parameters, eval_windows, load_lm, run_with_hooks, save_lm, score, top_indices

TARGETS = ("mlp", "heads", "layers", "unstructured")
LLAMA_LIKE = ("llama", "mistral", "qwen2")
FAMILIES = {"mlp": LLAMA_LIKE + ("gpt2",), "heads": LLAMA_LIKE, "layers": LLAMA_LIKE + ("gpt2",),
            "unstructured": None}  # None: any family
KEEP_KEYS = {"mlp": "keep_intermediate_size", "heads": "keep_heads", "layers": "keep_layers"}
IMPORTANCE = {"mlp": ("activation", "magnitude"), "heads": ("activation", "magnitude"),
              "layers": ("block_influence",), "unstructured": ("magnitude",)}


def _keep(description: str) -> dict[str, Any]:
    return {"type": ["integer", "null"], "minimum": 1, "default": None, "description": description}


PARAMS: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["target"],
    "properties": {
        "target": {"enum": list(TARGETS),
                   "description": "mlp: intermediate channels | heads: attention heads | layers: decoder layers | "
                                  "unstructured: zero the smallest weights (no latency saved by itself)."},
        "amount": {"type": ["number", "null"], "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": None,
                   "description": "Fraction removed (of channels, heads, layers, or weights for unstructured). "
                                  "Give either this or the target's keep_* size."},
        "keep_intermediate_size": _keep("mlp: intermediate channels kept per layer (instead of amount)."),
        "keep_heads": _keep("heads: query heads kept per layer (instead of amount); a multiple of the query "
                            "heads per kv group (gqa: kv_groups) or of num_key_value_heads (gqa: query_heads)."),
        "keep_layers": _keep("layers: decoder layers kept (instead of amount)."),
        "importance": {"enum": ["auto", "activation", "magnitude", "block_influence"], "default": "auto",
                       "description": "How channels/heads/layers are ranked. activation: the size of what each "
                                      "channel/head adds to the residual stream on the calibration windows "
                                      "(Minitron, Wanda); magnitude: weight norms; block_influence (layers): "
                                      "1 - cosine between a layer's input and output (ShortGPT). auto: "
                                      "activation for mlp/heads, block_influence for layers, magnitude for "
                                      "unstructured."},
        "multiple_of": {"type": "integer", "minimum": 1, "default": 8,
                        "description": "mlp with amount: the kept intermediate size is rounded to a multiple of "
                                       "this (matrix kernels prefer such sizes)."},
        "gqa": {"enum": ["kv_groups", "query_heads"], "default": "kv_groups",
                "description": "heads: kv_groups removes whole kv heads with their query heads (shrinks the KV "
                               "cache); query_heads removes the same number of query heads from every group."},
    },
}


# --- sizes ----------------------------------------------------------------------------------------------

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


def _resolved_importance(params: dict[str, Any]) -> str:
    return IMPORTANCE[params["target"]][0] if params["importance"] == "auto" else params["importance"]


def _param_problems(params: dict[str, Any]) -> list[tuple[tuple, str]]:
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
    importance = _resolved_importance(params)
    if importance not in IMPORTANCE[target]:
        problems.append((("importance",), (f"importance {importance} does not apply to target {target} "
                                           f"(use {' or '.join(IMPORTANCE[target])})")))
    return problems


def check(params: dict[str, Any], ctx: CheckContext) -> list[tuple[tuple, str]]:
    problems = _param_problems(params)
    config = ctx.model_config
    reshaped = any(op in RESHAPING_OPS for op in ctx.upstream.values())
    if problems or config is None or reshaped:
        return problems  # the apply re-checks against the model it gets
    families = FAMILIES[params["target"]]
    if families is not None and config.model_type not in families:
        return [(("target",), f"prune {params['target']} supports {', '.join(families)}, not {config.model_type}")]
    if params["target"] == "unstructured":
        return problems
    try:
        kept_size(params, config)
    except SizeError as exc:
        return [((exc.field,), str(exc))]
    return problems


# --- importance -------------------------------------------------------------------------------------------

def decoder_layers(model) -> torch.nn.ModuleList:
    base = model.base_model
    return base.h if model.config.model_type == "gpt2" else base.layers


def _mlp_down(layer) -> torch.nn.Module:
    return layer.mlp.c_proj if hasattr(layer.mlp, "c_proj") else layer.mlp.down_proj


def _down_columns(module) -> torch.Tensor:
    """down projection as [hidden, intermediate] whatever the module type (gpt2's Conv1D is transposed)."""
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()


@torch.no_grad()
def _collect(model, calibration: torch.Tensor, modules: list[torch.nn.Module],
             reduce: Callable[[int, torch.nn.Module, tuple, Any], None]) -> None:
    """Run the calibration windows with a forward hook on each module calling reduce(i, module, inputs, output)."""
    handles = [m.register_forward_hook(lambda mod, args, out, i=i: reduce(i, mod, args, out))
               for i, m in enumerate(modules)]
    run_with_hooks(model, calibration, handles)


def mlp_activation_importance(model, calibration: torch.Tensor) -> list[torch.Tensor]:
    """Per layer and channel: the Frobenius norm, over calibration tokens, of what the channel adds to the
    MLP output (its activation times its down-projection column): ||h_i|| * ||W_down[:, i]||."""
    downs = [_mlp_down(layer) for layer in decoder_layers(model)]
    sums = [torch.zeros(_down_columns(d).shape[1], dtype=torch.float64) for d in downs]

    def reduce(i, module, args, out):
        sums[i] += args[0].double().pow(2).sum(dim=(0, 1))

    _collect(model, calibration, downs, reduce)
    return [s.sqrt() * _down_columns(d).double().norm(dim=0) for s, d in zip(sums, downs)]


def head_scores(model, importance: str, calibration: torch.Tensor | None) -> list[torch.Tensor]:
    """Per layer and query head: the norm of the head's contribution through o_proj on the calibration
    tokens (activation), or the norm of its q rows and o columns (magnitude)."""
    layers = decoder_layers(model)
    d = layers[0].self_attn.head_dim
    if importance == "magnitude":
        return [_per_head(a.q_proj.weight, d, 0) + _per_head(a.o_proj.weight, d, 1)
                for a in (layer.self_attn for layer in layers)]
    outs = [layer.self_attn.o_proj for layer in layers]
    sums = [torch.zeros(o.in_features // d, dtype=torch.float64) for o in outs]

    def reduce(i, module, args, out):
        x = args[0].double().unflatten(-1, (-1, d))  # [batch, seq, heads, head_dim]
        w = module.weight.double().unflatten(1, (-1, d))  # [hidden, heads, head_dim]
        sums[i] += torch.einsum("bshd,ohd->bsho", x, w).pow(2).sum(dim=(0, 1, 3))

    _collect(model, calibration, outs, reduce)
    return sums


def _per_head(weight: torch.Tensor, head_dim: int, dim: int) -> torch.Tensor:
    """Squared norm of each head's slice of a projection matrix (rows for dim 0, columns for dim 1)."""
    w = weight.double() if dim == 0 else weight.double().t()
    return w.unflatten(0, (-1, head_dim)).pow(2).sum(dim=(1, 2))


@torch.no_grad()
def block_influence(model, calibration: torch.Tensor) -> torch.Tensor:
    """ShortGPT's block influence per layer: 1 - mean cosine between its input and output hidden states."""
    layers = list(decoder_layers(model))
    totals = torch.zeros(len(layers), dtype=torch.float64)
    count = [0]

    def pre(i):
        def hook(module, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).double()
        return hook

    def post(i):
        def hook(module, args, kwargs, out):
            hidden = (out[0] if isinstance(out, tuple) else out).double()
            totals[i] += (1 - torch.nn.functional.cosine_similarity(inputs[i], hidden, dim=-1)).sum()
            if i == 0:
                count[0] += hidden.shape[0] * hidden.shape[1]
        return hook

    inputs: dict[int, torch.Tensor] = {}
    handles = [h for i, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(pre(i), with_kwargs=True),
        layer.register_forward_hook(post(i), with_kwargs=True))]
    run_with_hooks(model, calibration, handles)
    return totals / count[0]


# --- the four targets --------------------------------------------------------------------------------------

def prune_mlp(model, keep: int, importance: str, calibration: torch.Tensor | None, advance: Callable) -> None:
    """Remove the same number of intermediate channels from every layer's MLP, each layer its least
    important ones."""
    scores = mlp_activation_importance(model, calibration) if importance == "activation" else None
    layers = decoder_layers(model)
    kept = [top_indices(scores[i] if scores is not None else _mlp_magnitude(layer), keep)
            for i, layer in enumerate(layers)]
    if model.config.model_type == "gpt2":
        for layer, index in zip(layers, kept):
            _slice_gpt2_mlp(layer.mlp, index)
            advance(1)
        model.config.n_inner = keep
        return
    _prune_gated_mlp(model, kept, advance)
    model.config.intermediate_size = keep


def _prune_gated_mlp(model, kept: list[torch.Tensor], advance: Callable) -> None:
    """torch-pruning's dependency graph finds every tensor that shares an intermediate channel (gate and up
    rows, down columns) and removes them together."""
    import torch_pruning as tp

    example = torch.zeros(1, 8, dtype=torch.long)  # the graph is traced from one short forward; any ids do
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # norms' weights are reported as "unwrapped parameters"; no MLP group has them
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                      output_transform=lambda out: out.logits)
    for layer, index in zip(decoder_layers(model), kept):
        gate = layer.mlp.gate_proj
        keep = set(index.tolist())
        drop = [c for c in range(gate.out_features) if c not in keep]
        graph.get_pruning_group(gate, tp.prune_linear_out_channels, idxs=drop).prune()
        advance(1)


def _slice_gpt2_mlp(mlp, index: torch.Tensor) -> None:
    """gpt2's MLP by hand: torch-pruning 1.6.1 fails to build gpt2's graph (a concat of unknown size), and
    transformers 5 dropped prune_conv1d_layer. Conv1D stores its weight [in, out]."""
    with torch.no_grad():
        mlp.c_fc.weight = torch.nn.Parameter(mlp.c_fc.weight[:, index].clone())
        mlp.c_fc.bias = torch.nn.Parameter(mlp.c_fc.bias[index].clone())
        mlp.c_proj.weight = torch.nn.Parameter(mlp.c_proj.weight[index].clone())
    mlp.c_fc.nf, mlp.c_proj.nx = len(index), len(index)


def _mlp_magnitude(layer) -> torch.Tensor:
    """Per intermediate channel: the L2 norm of all its weights (gate/up rows and down column)."""
    mlp = layer.mlp
    if hasattr(mlp, "c_fc"):  # Conv1D weights are [in, out]
        parts = [mlp.c_fc.weight.t(), mlp.c_fc.bias[:, None], mlp.c_proj.weight]
    else:
        parts = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.t()]
    return sum(p.double().pow(2).sum(1) for p in parts).sqrt()


def prune_heads(model, keep_heads: int, gqa: str, importance: str, calibration: torch.Tensor,
                advance: Callable) -> dict[str, int]:
    from transformers.pytorch_utils import prune_linear_layer

    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    group = heads // kv
    scores = head_scores(model, importance, calibration)
    for layer, q_scores in zip(decoder_layers(model), scores):
        attn = layer.self_attn
        d = attn.head_dim
        if importance == "magnitude":
            kv_scores = _per_head(attn.k_proj.weight, d, 0) + _per_head(attn.v_proj.weight, d, 0)
        else:  # activation: a kv head matters through the query heads it serves
            kv_scores = torch.zeros(kv, dtype=torch.float64)
        q_keep, kv_keep = _kept_heads(q_scores, kv_scores, group, keep_heads, gqa)
        attn.q_proj = prune_linear_layer(attn.q_proj, _rows(q_keep, d), dim=0)
        attn.k_proj = prune_linear_layer(attn.k_proj, _rows(kv_keep, d), dim=0)
        attn.v_proj = prune_linear_layer(attn.v_proj, _rows(kv_keep, d), dim=0)
        attn.o_proj = prune_linear_layer(attn.o_proj, _rows(q_keep, d), dim=1)
        attn.num_key_value_groups = len(q_keep) // len(kv_keep)
        advance(1)
    kept_kv = keep_heads // group if gqa == "kv_groups" else kv
    # head_dim is written out: families derive it from hidden_size / num_attention_heads otherwise.
    config.head_dim = decoder_layers(model)[0].self_attn.head_dim
    config.num_attention_heads, config.num_key_value_heads = keep_heads, kept_kv
    return {"num_attention_heads": keep_heads, "num_key_value_heads": kept_kv}


def _kept_heads(q_scores: torch.Tensor, kv_scores: torch.Tensor, group: int, keep_heads: int,
                gqa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, kv heads) kept, ascending. Query head h reads kv head h // group (repeat_kv), so the
    kept query heads stay grouped in kv order."""
    per_group = q_scores.view(-1, group)
    if gqa == "kv_groups":
        kv_keep = top_indices(per_group.sum(1) + kv_scores, keep_heads // group)
        q_keep = (kv_keep[:, None] * group + torch.arange(group)).flatten()
        return q_keep, kv_keep
    per = keep_heads // per_group.shape[0]
    q_keep = torch.cat([g * group + top_indices(row, per) for g, row in enumerate(per_group)])
    return q_keep, torch.arange(per_group.shape[0])


def _rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def prune_layers(model, keep: int, calibration: torch.Tensor, advance: Callable) -> dict[str, Any]:
    influence = block_influence(model, calibration)
    kept = top_indices(influence, keep).tolist()
    layers = decoder_layers(model)
    new = torch.nn.ModuleList(layers[i] for i in kept)
    for position, layer in enumerate(new):
        attn = layer.self_attn if hasattr(layer, "self_attn") else layer.attn
        attn.layer_idx = position  # the KV cache is indexed by it
    base = model.base_model
    if model.config.model_type == "gpt2":
        base.h = new
    else:
        base.layers = new
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.num_hidden_layers = keep
    advance(1)
    return {"kept_layers": kept, "block_influence": [round(float(x), 6) for x in influence]}


def prune_unstructured(model, amount: float, advance: Callable) -> dict[str, Any]:
    from torch.nn.utils import prune as torch_prune
    from transformers.pytorch_utils import Conv1D

    matrices = [m for layer in decoder_layers(model) for m in layer.modules()
                if isinstance(m, (torch.nn.Linear, Conv1D))]
    for module in matrices:
        torch_prune.l1_unstructured(module, "weight", amount=amount)
        torch_prune.remove(module, "weight")
    total = sum(m.weight.numel() for m in matrices)
    zeros = sum(int((m.weight == 0).sum()) for m in matrices)
    advance(1)
    return {"zeroed_weights": zeros, "decoder_matrix_sparsity": round(zeros / total, 6),
            "saves_latency": False,
            "note": "zeros are stored and multiplied like any weight: the graph keeps its shapes; only a "
                    "sparse kernel or compression of the file would profit"}


# --- the pass ---------------------------------------------------------------------------------------------

def apply(ctx: StageContext) -> dict[str, Any]:
    params = ctx.params
    problems = _param_problems(params)
    if problems:
        raise PassError("prune: " + "; ".join(message for _, message in problems))
    model = load_lm(ctx.input_dir)
    target, family = params["target"], model.config.model_type
    if FAMILIES[target] is not None and family not in FAMILIES[target]:
        raise PassError(f"prune {target} supports {', '.join(FAMILIES[target])}, not {family}")
    windows = eval_windows(ctx.data)
    reference = copy.deepcopy(model)
    parameters_before = count_parameters(model)
    details = _run_target(ctx, model)
    save_lm(model, ctx.input_dir, ctx.output_dir)
    pruned = load_lm(ctx.output_dir)  # what later stages load: proves the config round-trips
    after, parameters_after = score(pruned, windows, reference), count_parameters(pruned)
    ctx.log(f"prune {target}: {parameters_before:,} -> {parameters_after:,} parameters, "
            f"perplexity {after['reference_perplexity']:.2f} -> {after['perplexity']:.2f}")
    return {"target": target, "importance": _resolved_importance(params), **details,
            "parameters_before": parameters_before, "parameters_after": parameters_after,
            "eval_perplexity_before": after["reference_perplexity"], "eval_perplexity_after": after["perplexity"],
            "eval_kl_to_unpruned": after["kl"]}


def _run_target(ctx: StageContext, model) -> dict[str, Any]:
    params, config = ctx.params, model.config
    target, importance = params["target"], _resolved_importance(params)
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
