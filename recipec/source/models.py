"""The source stage: the model a recipe names, materialized as a save_pretrained directory.

Sources: `synthetic` (a family's config with overrides and seeded random weights, optionally pretrained
offline on a local corpus), `path` (a save_pretrained directory) and `hub` (a Hugging Face id, where
the hub is reachable). Before any weight is allocated, the model's size is estimated on the meta
device and the stage is refused when it would not fit in the memory that is free.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import torch

from recipec.errors import PassError, one_line
from recipec.source.config import DTYPES, check_fits, copy_tokenizer_files, count_parameters, family_config

def materialize(model: dict[str, Any], base_dir: Path, out_dir: Path, progress, log: Callable[[str], None]) -> dict[str, Any]:
    source = model["source"]
    if source == "synthetic":
        return _synthetic(model, base_dir, out_dir, progress, log)
    if source == "path":
        return _from_directory(model, base_dir / model["path"], out_dir, log)
    return _from_hub(model, out_dir, log)


def check_source_fits(model: dict[str, Any], base_dir: Path) -> int:
    """Refuse a synthetic model that cannot fit in memory (before anything is allocated); return what the
    source stage will write: the weights at the recipe's dtype (0 where only the hub knows)."""
    if model["source"] == "synthetic":
        pretraining = "pretrain" in model
        config = family_config(model["family"], model["config"])
        fit = check_fits(config, "float32" if pretraining else model["dtype"], "pretrain" if pretraining else "load")
        return fit["parameters"] * torch.tensor([], dtype=DTYPES[model["dtype"]]).element_size()
    if model["source"] == "path":
        from recipec.core.diskspace import tree_bytes

        return 2 * tree_bytes(base_dir / model["path"])  # a bf16 checkpoint saved at float32 doubles
    return 0


def _synthetic(model, base_dir, out_dir, progress, log) -> dict[str, Any]:
    """The executor has run check_source_fits: the model fits."""
    if "pretrain" in model:
        from recipec.source.pretrain import pretrain

        metrics = pretrain(model["family"], model["config"], model["seed"], model["pretrain"], base_dir, out_dir,
                           progress, log, dtype=model["dtype"])
        return {"source": "synthetic", "pretrained": True, **metrics}
    from transformers import AutoModelForCausalLM

    config = family_config(model["family"], model["config"])
    torch.manual_seed(model["seed"])
    lm = AutoModelForCausalLM.from_config(config, dtype=DTYPES[model["dtype"]])
    lm.eval()
    lm.save_pretrained(out_dir)
    return {"source": "synthetic", "pretrained": False, "parameters": count_parameters(lm)}


def _from_directory(model, directory: Path, out_dir: Path, log) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = model["trust_remote_code"]
    if trust:
        log(f"warning: trust_remote_code is on: Python code from {directory} will run")
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust)
    except Exception as exc:  # the file (or, with trust_remote_code, its code) is the user's: any error is theirs
        raise PassError(f"cannot read the model config in {directory}: {one_line(exc)}") from None
    fit = check_fits(config, model["dtype"], "load")
    if not any(directory.glob("*.safetensors")):
        log(f"note: {directory} has no safetensors weights; loading PyTorch weights with weights_only=True")
    try:
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[model["dtype"]], trust_remote_code=trust)
    except pickle.UnpicklingError as exc:  # torch's weights_only refusal: the checkpoint pickles more than tensors
        raise PassError(f"refused to load the PyTorch weights in {directory}: the checkpoint holds objects other "
                        f"than tensors, and unpickling them could run code ({one_line(exc)[:300]}); convert it to "
                        "safetensors") from None
    except (OSError, ValueError) as exc:
        raise PassError(f"cannot load the model in {directory}: {exc}") from None
    lm.save_pretrained(out_dir)
    copy_tokenizer_files(directory, out_dir)
    return {"source": "path", "parameters": fit["parameters"]}


def _from_hub(model, out_dir: Path, log) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = model["trust_remote_code"]
    if trust:
        log(f"warning: trust_remote_code is on: Python code from {model['id']} will run")
    try:
        lm = AutoModelForCausalLM.from_pretrained(model["id"], revision=model["revision"],
                                                  dtype=DTYPES[model["dtype"]], trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(model["id"], revision=model["revision"], trust_remote_code=trust)
    except OSError as exc:
        raise PassError(f"cannot load {model['id']}@{model['revision']} from the Hugging Face hub "
                        f"(is it reachable from this machine?): {str(exc).splitlines()[0]}") from None
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"source": "hub", "parameters": count_parameters(lm)}
