"""Train a small causal LM from scratch, offline, so that quality metrics mean something.

Random-weight models have near-tied logits: a compression pass can flip most greedy tokens while logits
stay at cosine 0.999, and perplexity is ~vocab size whatever a pass does. A model trained on real text
(docs/reference-model.md) has a perplexity far below its vocabulary size that passes can visibly hurt.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import jsonschema
import torch

from recipec.source import corpus
from recipec.errors import PassError
from recipec.core.console import Progress
from recipec.core.params import prop
from recipec.core.defaults import fill_defaults
from recipec.source.config import DTYPES, count_parameters, family_config
from recipec.source.optim import adamw, lr_factor, train_step

_CORPUS_SCHEMA = {
    "description": "Training text: \"stdlib\" (this Python's standard-library source; different Python "
                   "versions give different corpora) or {text: glob} (files relative to the recipe's "
                   "directory; ** recurses). Each file is one document; 5% of files, chosen by a hash of "
                   "their relative path, form the eval split.",
    "default": "stdlib",
    "oneOf": [
        {"const": "stdlib"},
        {"type": "object", "additionalProperties": False, "required": ["text"],
         "properties": {"text": {"type": "string", "minLength": 1, "description": "A glob of text files."}}},
    ],
}


PRETRAIN_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "description": "Train the model from scratch on a local text corpus before the passes run (model.source: "
                   "synthetic). Deterministic on the CPU for a given seed and thread count.",
    "properties": {
        "corpus": _CORPUS_SCHEMA,
        "steps": prop("integer", 400, "Optimizer steps.", minimum=1),
        "batch_size": prop("integer", 16, "Sequences per step.", minimum=1),
        "seq_len": prop("integer", 128, "Tokens per training sequence (and per eval window).", minimum=2),
        "learning_rate": prop("number", 0.003, "Peak AdamW learning rate (write 0.003, not 3e-3: YAML 1.1 "
                                               "reads 3e-3 as a string).", exclusiveMinimum=0),
        "min_lr_ratio": prop("number", 0.1, "Final learning rate as a fraction of the peak (cosine decay).",
                             minimum=0, maximum=1),
        "warmup_steps": prop("integer", 40, "Steps of linear warmup from 0 to the peak rate; fewer than steps.",
                             minimum=0),
        "weight_decay": prop("number", 0.1, "AdamW weight decay, applied to matrices only (not norms, "
                                            "biases).", minimum=0),
        "grad_clip": prop("number", 1.0, "Maximum global gradient norm.", exclusiveMinimum=0),
        "vocab_size": prop("integer", 4096, "Byte-level BPE vocabulary size, including <|endoftext|>; the "
                                            "model's vocab_size is the size the tokenizer reached.", minimum=258),
        "eval_samples": prop("integer", 64, "Eval-split windows of seq_len tokens for the reported "
                                            "perplexity.", minimum=1),
    },
}

# Set from the tokenizer: an override would make the embedding disagree with the token ids.
_TOKENIZER_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def resolve_spec(spec: dict[str, Any] | None) -> dict[str, Any]:
    """A pretraining spec checked against its schema, defaults filled (a recipe's was vetted at validation;
    this guards direct callers)."""
    spec = dict(spec or {})
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(PRETRAIN_SCHEMA).iter_errors(spec))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path)
        raise PassError(f"pretrain{'.' + where if where else ''}: {error.message}")
    return fill_defaults(PRETRAIN_SCHEMA, spec)


def pretrain_problems(family: str, overrides: dict[str, Any], spec: dict[str, Any]) -> list[tuple[tuple, str]]:
    """The rules of a pretraining spec (defaults filled) that its schema cannot express, as (path under
    `model`, message): `recipec validate` reports them, and pretraining refuses to start on them."""
    problems = [(("config", key), f"{key} is set by the trained tokenizer; use pretrain.vocab_size")
                for key in overrides if key in _TOKENIZER_KEYS]
    if spec["warmup_steps"] >= spec["steps"]:
        problems.append((("pretrain", "warmup_steps"),
                         f"warmup_steps ({spec['warmup_steps']}) must be fewer than steps ({spec['steps']})"))
    if not problems:
        max_positions = getattr(family_config(family, overrides), "max_position_embeddings", None)
        if max_positions is not None and spec["seq_len"] > max_positions:
            problems.append((("pretrain", "seq_len"), f"seq_len {spec['seq_len']} exceeds the model's "
                                                      f"max_position_embeddings {max_positions}"))
    return problems


def _train(model, stream: torch.Tensor, spec: dict[str, Any], seed: int, progress: Progress) -> list[float]:
    batch, seq_len = spec["batch_size"], spec["seq_len"]
    if len(stream) <= seq_len:
        raise PassError(f"the train split has {len(stream)} tokens, fewer than seq_len + 1 ({seq_len + 1})")
    opt = adamw(model, spec)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, spec))
    # Its own generator: the data order must not depend on how many random numbers model init consumed.
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    losses = []
    model.train()
    with progress("pretraining", total=spec["steps"]) as advance:
        for _ in range(spec["steps"]):
            starts = torch.randint(0, len(stream) - seq_len, (batch, 1), generator=gen)
            ids = stream[starts + offsets]
            losses.append(train_step(model, model(input_ids=ids, labels=ids).loss, opt, sched, spec["grad_clip"]))
            advance(1, loss=round(losses[-1], 3))
    return losses


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token negative log-likelihood (nats) over every predicted position of the windows."""
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        target = chunk[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   reduction="sum").item()
        count += target.numel()
    return total / count


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PassError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _save(model, config, out_dir: Path, dtype: torch.dtype) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.to(dtype).save_pretrained(out_dir)


def pretrain(family: str, config_overrides: dict[str, Any], seed: int, spec: dict[str, Any], base_dir: Path,
             out_dir: Path, progress: Progress, log: Callable[[str], None], dtype: str = "float32") -> dict[str, Any]:
    """Train tokenizer and model; write a save_pretrained directory with tokenizer files to out_dir.

    Training runs in float32 whatever `dtype` is; `dtype` is the precision of the saved weights.
    """
    started = time.perf_counter()
    spec, out_dir, save_dtype = resolve_spec(spec), Path(out_dir), _dtype(dtype)
    problems = pretrain_problems(family, config_overrides, spec)
    if problems:
        where, message = problems[0]
        raise PassError(f"model.{'.'.join(where)}: {message}")
    config = family_config(family, config_overrides)
    max_positions = getattr(config, "max_position_embeddings", None)
    counts = corpus.file_counts(spec["corpus"], base_dir)
    log(f"pretrain: training a {spec['vocab_size']}-token BPE tokenizer on {counts['train']} files")
    tokenizer = corpus.train_tokenizer(spec["corpus"], spec["vocab_size"], base_dir, out_dir, max_positions)
    config.vocab_size = len(tokenizer)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    stream = corpus.token_stream(tokenizer, spec["corpus"], "train", base_dir)
    eval_windows = corpus.token_windows(tokenizer, spec["corpus"], "eval", spec["eval_samples"], spec["seq_len"],
                                        seed, base_dir)
    model = _init_model(config, seed)
    log(f"pretrain: {family} with {count_parameters(model):,} parameters on {len(stream):,} train tokens")
    losses = _train(model, torch.from_numpy(stream.astype("int64")), spec, seed, progress)
    eval_loss = evaluate(model, eval_windows)
    _save(model, config, out_dir, save_dtype)
    metrics = _metrics(spec, losses, eval_loss, model, counts, len(stream), eval_windows.numel(), started)
    log(f"pretrain: eval perplexity {metrics['eval_perplexity']:.2f} (vocab {config.vocab_size}), "
        f"train loss {metrics['train_loss']:.3f}, {metrics['seconds']:.0f} s")
    return metrics


def _init_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _metrics(spec, losses, eval_loss, model, counts, train_tokens, eval_tokens, started) -> dict[str, Any]:
    tail = losses[-min(10, len(losses)):]  # one batch's loss is noisy; the last ten steps' mean is not
    return {
        "eval_perplexity": math.exp(eval_loss), "eval_loss": eval_loss,
        "train_loss": sum(tail) / len(tail), "initial_train_loss": losses[0],
        "vocab_size": model.config.vocab_size, "parameters": count_parameters(model), "steps": spec["steps"],
        "tokens_seen": spec["steps"] * spec["batch_size"] * spec["seq_len"],
        "train_tokens": train_tokens, "train_files": counts["train"], "eval_files": counts["eval"],
        "eval_tokens": eval_tokens, "seconds": time.perf_counter() - started,
    }
