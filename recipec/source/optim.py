"""The optimizer and learning-rate schedule shared by pretraining and distillation (kept apart from the
pretraining code so that a distill stage's cache key does not cover the corpus reader)."""
from __future__ import annotations

import math
from typing import Any

import torch


def adamw(model: torch.nn.Module, spec: dict[str, Any], betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW at spec's learning_rate, with spec's weight_decay on matrices only (not norms, biases)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec["learning_rate"], betas=betas)


def lr_factor(step: int, spec: dict[str, Any]) -> float:
    """Multiplier of the peak rate at a 0-based step: linear warmup, then cosine down to min_lr_ratio."""
    warmup, steps, floor = spec["warmup_steps"], spec["steps"], spec["min_lr_ratio"]
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_step(model: torch.nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule, grad_clip: float) -> float:
    """One optimizer step on `loss`: backward, clip the global gradient norm, step, clear, advance the schedule."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    return loss.item()
