"""How prune ranks what it may remove: per-channel and per-head contributions to the residual stream on
the calibration windows (activation), weight norms (magnitude), and ShortGPT's block influence of layers."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from recipec.passes.torch.lm import run_with_hooks


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


def mlp_magnitude(layer) -> torch.Tensor:
    """Per intermediate channel: the L2 norm of all its weights (gate/up rows and down column)."""
    mlp = layer.mlp
    if hasattr(mlp, "c_fc"):  # Conv1D weights are [in, out]
        parts = [mlp.c_fc.weight.t(), mlp.c_fc.bias[:, None], mlp.c_proj.weight]
    else:
        parts = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.t()]
    return sum(p.double().pow(2).sum(1) for p in parts).sqrt()


def head_scores(model, importance: str, calibration: torch.Tensor | None) -> list[torch.Tensor]:
    """Per layer and query head: the norm of the head's contribution through o_proj on the calibration
    tokens (activation), or the norm of its q rows and o columns (magnitude)."""
    layers = decoder_layers(model)
    d = layers[0].self_attn.head_dim
    if importance == "magnitude":
        return [per_head(a.q_proj.weight, d, 0) + per_head(a.o_proj.weight, d, 1)
                for a in (layer.self_attn for layer in layers)]
    outs = [layer.self_attn.o_proj for layer in layers]
    sums = [torch.zeros(o.in_features // d, dtype=torch.float64) for o in outs]

    def reduce(i, module, args, out):
        x = args[0].double().unflatten(-1, (-1, d))  # [batch, seq, heads, head_dim]
        w = module.weight.double().unflatten(1, (-1, d))  # [hidden, heads, head_dim]
        sums[i] += torch.einsum("bshd,ohd->bsho", x, w).pow(2).sum(dim=(0, 1, 3))

    _collect(model, calibration, outs, reduce)
    return sums


def per_head(weight: torch.Tensor, head_dim: int, dim: int) -> torch.Tensor:
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
