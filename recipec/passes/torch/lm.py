"""What the passes that read a PyTorch model (prune, distill, moe, export) share: reading and writing a
causal-LM directory, counting parameters, and scoring a model on token windows against a reference model."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from recipec.source.config import copy_tokenizer_files, count_parameters  # noqa: F401 - the passes count through here
from recipec.passes.base import PassError

SCORE_BATCH = 8


def load_lm(model_dir: Path | str, **kwargs: Any) -> torch.nn.Module:
    """The model in float32 (passes compute in float32 whatever the checkpoint holds), in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise PassError(f"cannot load a causal LM from {model_dir}: {exc}") from None
    return model.eval()


def saved_dtype(model_dir: Path | str) -> torch.dtype:
    """The dtype the input checkpoint was stored in, so a pass writes back what it read."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def save_lm(model: torch.nn.Module, input_dir: Path, output_dir: Path) -> None:
    model.to(saved_dtype(input_dir)).save_pretrained(output_dir)
    copy_tokenizer_files(Path(input_dir), Path(output_dir))


def eval_windows(data: Any) -> torch.Tensor:
    windows = data.eval()
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise PassError(f"data.eval must give [samples, seq_len >= 2] token windows, got {tuple(windows.shape)}")
    return windows


@torch.no_grad()
def score(model: torch.nn.Module, windows: torch.Tensor, reference: torch.nn.Module | None = None) -> dict[str, float]:
    """Perplexity of next-token prediction over every predicted position of the windows, and, with a
    reference model, the mean KL(reference || model) of the next-token distributions at every position and
    the reference's own perplexity (the same number score(reference, windows) gives, without a second pass)."""
    model.eval()
    nll, ref_nll, kl, count, positions = 0.0, 0.0, 0.0, 0, 0
    for chunk in windows.split(SCORE_BATCH):
        targets = chunk[:, 1:, None]
        logp = torch.log_softmax(model(input_ids=chunk).logits.double(), dim=-1)
        nll -= logp[:, :-1].gather(-1, targets).sum().item()
        count += chunk[:, 1:].numel()
        if reference is not None:
            ref = torch.log_softmax(reference(input_ids=chunk).logits.double(), dim=-1)
            ref_nll -= ref[:, :-1].gather(-1, targets).sum().item()
            kl += (ref.exp() * (ref - logp)).sum().item()
            positions += chunk.numel()
    result = {"perplexity": math.exp(nll / count)}
    if reference is not None:
        result["kl"] = kl / positions
        result["reference_perplexity"] = math.exp(ref_nll / count)
    return result


# Ops after which the source config no longer describes the model a later stage gets.
RESHAPING_OPS = ("prune", "moe")


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, ascending (stable ranking: ties keep the lower index)."""
    order = torch.argsort(-scores, stable=True)[:keep]
    return torch.sort(order).values


@torch.no_grad()
def run_with_hooks(model: torch.nn.Module, calibration: torch.Tensor, handles: list) -> None:
    """Run the calibration windows through the model (8 per forward), then remove the hooks, whatever happens."""
    try:
        for chunk in calibration.split(8):
            model(input_ids=chunk)
    finally:
        for handle in handles:
            handle.remove()
