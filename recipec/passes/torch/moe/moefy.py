"""Dense -> Mixtral (MoEfication): cluster each MLP's channels into experts by co-activation on the
calibration tokens and fit a router per layer (the package docstring explains the router's scaling)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from recipec.passes.base import PassError
from recipec.passes.torch.lm import run_with_hooks

ROUTER_SPREAD = 1e-3
RIDGE = 1e-3  # of the mean diagonal of X^T X: keeps the router fit stable with few calibration tokens
KMEANS_ITERATIONS = 30
MAX_TOKENS = 16384  # calibration tokens used to cluster channels and fit routers


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
    so the logits span ROUTER_SPREAD on these tokens (see the package docstring). [experts, hidden]."""
    gram = x.T @ x
    ridge = RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram + ridge, x.T @ targets).T
    logits = x @ weight.T
    spread = (logits.max(1).values - logits.min(1).values).max().clamp_min(1e-12)
    return weight * (ROUTER_SPREAD / spread)


def mixtral_config(dense, experts: int, top_k: int):
    """The dense config as a Mixtral's; a model with biases was refused by params.problems_for."""
    from transformers import MixtralConfig

    c = dense.config
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
