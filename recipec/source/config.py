"""Model configs and sizes without weights: a family's config with the recipe's overrides (the one place
configs are checked), parameter counts on the meta device, the memory check, and the tokenizer files a
model directory carries. Light enough for validation, which builds no model."""
from __future__ import annotations

import difflib
import shutil
from pathlib import Path
from typing import Any

import torch

from recipec.core.files import TOKENIZER_FILES
from recipec.core.memory import require_memory, size as memory_size
from recipec.errors import PassError, one_line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The source stage holds the model once while it loads and saves it (1.05x the float32 weights measured on the
# Qwen2.5-0.5B shape, rounded up); pretraining adds gradients and two AdamW moments. Export is its own stage,
# sized by build/stages.py.
HEADROOM = {"load": 1.5, "pretrain": 6.0}


def config_key_problems(family: str, overrides: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(key, message) for an unknown family (key None) or each override the family's config does not have."""
    from transformers import CONFIG_MAPPING

    if family not in CONFIG_MAPPING:
        close = difflib.get_close_matches(family, sorted(CONFIG_MAPPING.keys()), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [(None, f"unknown model family {family!r}{hint} (a transformers model_type such as llama, gpt2, "
                       "mixtral, qwen2_moe)")]
    known = sorted(CONFIG_MAPPING[family]().to_dict())
    problems = []
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            problems.append((key, f"{family} configs have no key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")))
    return problems


def family_config(family: str, overrides: dict[str, Any]):
    """The family's default config with the overrides; an unknown family or key, or a value transformers
    refuses, is a PassError."""
    from transformers import AutoConfig

    problems = config_key_problems(family, overrides)
    if problems:
        raise PassError(problems[0][1])
    try:
        config = AutoConfig.for_model(family, **overrides)
        config.validate()
        return config
    except Exception as exc:  # transformers raises whatever its dataclass checks or __init__ arithmetic raise
        raise PassError(f"cannot build a {family} config from {overrides}: {one_line(exc)}") from None


def check_fits(config, dtype: str, purpose: str) -> dict[str, Any]:
    """Count parameters on the meta device and refuse before allocation when they cannot fit."""
    parameters = config_parameters(config)
    weights = parameters * torch.tensor([], dtype=DTYPES[dtype]).element_size()
    need = int(weights * HEADROOM[purpose])
    require_memory("source", f"the model has {parameters / 1e6:,.1f}M parameters: at {dtype}, {purpose}", need,
                   f"{HEADROOM[purpose]:g}x the {memory_size(weights)} of weights",
                   "use a smaller config or a smaller dtype")
    return {"parameters": parameters, "estimated_peak_bytes": need}


def config_parameters(config) -> int:
    """The parameter count of the model a config describes, built on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # a config transformers accepts can still describe an impossible model
        raise PassError(f"cannot build a {config.model_type} model from its config: {one_line(exc)}") from None
    return count_parameters(model)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
