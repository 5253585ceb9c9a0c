"""The configurations of models users bring, as published in their config.json (Hugging Face, November 2026),
for tests at reduced depth and for the scale benchmark at full size. Weights are seeded random: nothing
loads from the hub here. Quality numbers on them are KL-based (random logits are near-tied)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

REAL_CONFIGS: dict[str, dict[str, Any]] = {
    # llama3 rope scaling, tied embeddings, head_dim 64
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    # qkv bias, tied embeddings, vocabulary 151,936
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False, bos_token_id=151643,
        eos_token_id=151643),
    # sliding-window attention
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(
        model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
        bos_token_id=50256, eos_token_id=50256),
    # router, 60 routed experts (top 4) and a gated shared expert
    "qwen1.5-moe-a2.7b": dict(
        model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=151936, max_position_embeddings=8192,
        rms_norm_eps=1e-6, rope_theta=1000000.0, norm_topk_prob=False, decoder_sparse_step=1,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
}
DEPTH_KEY = {"gpt2": "n_layer"}


def make_model(name: str, out_dir: Path, layers: int | None = None, seed: int = 0, **overrides: Any) -> Path:
    """save_pretrained a seeded random model of REAL_CONFIGS[name] (at `layers` depth when given)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(REAL_CONFIGS[name])
    family = spec.pop("model_type")
    if layers is not None:
        spec[DEPTH_KEY.get(family, "num_hidden_layers")] = layers
    config = AutoConfig.for_model(family, **{**spec, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    return Path(out_dir)
