"""prune: remove MLP channels, attention heads or whole decoder layers, so the exported graph has smaller
tensors; or zero small weights (unstructured, for size/sparsity experiments: it saves no latency).

- mlp: torch-pruning's dependency graph removes the chosen intermediate channels from gate_proj and
  up_proj (rows) and down_proj (columns) together (llama, mistral, qwen2); gpt2's Conv1D MLP is sliced
  by hand (see targets._slice_gpt2_mlp).
- heads: whole heads are sliced out of q/k/v (rows) and o_proj (columns) with transformers'
  prune_linear_layer. torch-pruning 1.6.1 cannot do it on transformers 5: building the group of any
  q/k/v/o projection never ends (reproduced here; torch-pruning issue #527). GQA is respected: either
  whole kv groups go with their query heads, or every group loses the same number of query heads.
- layers: decoder layers with the lowest block influence (ShortGPT) are dropped.
- unstructured: torch.nn.utils.prune's L1 magnitude zeroing of each decoder-layer matrix.

The same number of channels/heads is removed in every layer (a config has one size), each layer choosing
its own by importance. docs/torch-passes.md has the measured effect.

params: the schema, the kept sizes and the validation-time check; importance: how channels, heads and
layers are ranked; targets: the four ways of removing them; stage: the pass itself.
"""
from __future__ import annotations

from recipec.passes.torch.prune.stage import PASS

__all__ = ["PASS"]
