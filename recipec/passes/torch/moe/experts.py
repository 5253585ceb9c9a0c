"""What an MoE model's experts are to the moe pass: its MoE blocks, the routing weight each expert gets on
the calibration tokens, dropping the least used, and the parameters a token actually uses."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from recipec.passes.torch.lm import count_parameters, run_with_hooks, top_indices
from recipec.passes.torch.moe.params import EXPERTS_KEY


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
