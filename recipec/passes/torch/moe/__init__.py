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

params: the schema and every rule the parameters follow; moefy: dense -> Mixtral; experts: what an MoE
model's experts are (usage, pruning, active parameters); stage: the pass itself.
"""
from __future__ import annotations

from recipec.passes.torch.moe.stage import PASS

__all__ = ["PASS"]
