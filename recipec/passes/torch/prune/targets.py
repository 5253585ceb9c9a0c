"""The four ways prune removes weights, each given the size to keep: MLP channels, attention heads,
decoder layers, or (unstructured) the smallest weights zeroed in place."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from recipec.passes.torch.lm import top_indices
from recipec.passes.torch.prune.importance import (block_influence, decoder_layers, head_scores,
                                                   mlp_activation_importance, mlp_magnitude, per_head)


def prune_mlp(model, keep: int, importance: str, calibration: torch.Tensor | None, advance: Callable) -> None:
    """Remove the same number of intermediate channels from every layer's MLP, each layer its least
    important ones."""
    scores = mlp_activation_importance(model, calibration) if importance == "activation" else None
    layers = decoder_layers(model)
    kept = [top_indices(scores[i] if scores is not None else mlp_magnitude(layer), keep)
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
            kv_scores = per_head(attn.k_proj.weight, d, 0) + per_head(attn.v_proj.weight, d, 0)
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
