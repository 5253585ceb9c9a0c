"""onnxruntime-genai's genai_config.json, written into each variant directory it can run.

Everything is derived from the variant's artifact.json (graph tensor names, KV layout, model sizes) and
generation_config.json, so the config always matches the graph it describes. docs/deploy.md says what
onnxruntime-genai can and cannot do with it.

This module imports neither torch nor transformers: it runs in builds and in `recipec deploy` alike.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipec.onnx import artifact as art

GENAI_CONFIG = "genai_config.json"
# model_type values whose genai_config.json was run through og.Generator here and gave recipec.runtime's
# greedy tokens (tests/test_deploy.py). onnxruntime-genai 0.18 knows more types (phi3, gemma, ...) but has
# none for mixtral or qwen2_moe; types nobody checked get no config rather than one that may not load.
GENAI_TYPES = ("llama", "mistral", "qwen2")


def genai_unsupported(artifact: dict[str, Any]) -> str | None:
    """Why onnxruntime-genai cannot run this variant from a genai_config.json, or None when it can."""
    model, graph, kv = artifact["model"], artifact["graph"], artifact.get("kv_cache")
    names = {t["name"] for t in graph["inputs"]}
    if model.get("model_type") not in GENAI_TYPES:
        return (f"model_type {model.get('model_type')!r} is not one recipec checked with onnxruntime-genai "
                f"({', '.join(GENAI_TYPES)})")
    if not kv:
        return "the graph has no KV cache"
    if artifact.get("phases"):
        # genai's decoder runs one `filename` for prompt and token generation alike; its multi-model
        # `pipeline` chains sub-graphs within one step rather than choosing a graph per phase, and nobody
        # checked it here, so a config naming model.onnx alone would prefill with the decode graph silently.
        return ("a phase-split variant has a prefill graph and a decode graph, and genai_config.json's decoder "
                "names one graph (docs/phase-split.md)")
    if not {"input_ids", "attention_mask"} <= names or "logits" not in {t["name"] for t in graph["outputs"]}:
        return "the graph lacks input_ids, attention_mask or logits"
    if not model.get("max_position_embeddings"):
        return "the model's context length (max_position_embeddings) is unknown"
    if model.get("eos_token_id") is None:
        return "the model has no eos_token_id, which genai_config.json requires"
    return None


def genai_config(artifact: dict[str, Any], generation: dict[str, Any] | None = None) -> dict[str, Any]:
    """genai_config.json for the variant: the decoder's tensor names from the graph, sizes from the model,
    search defaults from generation_config.json."""
    model, kv = artifact["model"], artifact["kv_cache"]
    eos = model.get("eos_token_id")
    first_eos = eos[0] if isinstance(eos, list) else eos
    pad = model.get("pad_token_id")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": artifact["graph"]["file"],
        "head_size": kv["head_dim"], "hidden_size": model["hidden_size"],
        "num_attention_heads": model["num_attention_heads"], "num_hidden_layers": kv["num_layers"],
        "num_key_value_heads": kv["num_kv_heads"],
        "inputs": _genai_inputs(artifact), "outputs": _genai_outputs(kv),
    }
    config = {"model": {"type": model["model_type"], "vocab_size": model["vocab_size"],
                        "context_length": model["max_position_embeddings"], "decoder": decoder,
                        "eos_token_id": eos, "pad_token_id": pad if pad is not None else first_eos},
              "search": _genai_search(model["max_position_embeddings"], generation or {},
                                      kv.get("buffer") == "shared")}
    if model.get("bos_token_id") is not None:
        config["model"]["bos_token_id"] = model["bos_token_id"]
    return config


def _genai_inputs(artifact: dict[str, Any]) -> dict[str, str]:
    # logits_to_keep is not named: genai feeds only these, so the graph keeps its default 0 (logits of
    # every position) and genai samples from the last; checked against recipec.runtime in the tests.
    names = {t["name"] for t in artifact["graph"]["inputs"]}
    inputs = {k: k for k in ("input_ids", "attention_mask", "position_ids") if k in names}
    kv = artifact["kv_cache"]
    inputs["past_key_names"] = kv["inputs"]["key"].replace("{i}", "%d")
    inputs["past_value_names"] = kv["inputs"]["value"].replace("{i}", "%d")
    return inputs


def _genai_outputs(kv: dict[str, Any]) -> dict[str, str]:
    return {"logits": "logits", "present_key_names": kv["outputs"]["key"].replace("{i}", "%d"),
            "present_value_names": kv["outputs"]["value"].replace("{i}", "%d")}


def _genai_search(context: int, generation: dict[str, Any], shared_buffer: bool) -> dict[str, Any]:
    # Sharing needs a graph whose GroupQueryAttention takes right-padded lengths from the mask and writes a
    # max_length buffer in place (fuse kv_buffer: shared); a growing graph returns present = past + new.
    return {"past_present_share_buffer": shared_buffer, "max_length": context, "min_length": 0, "num_beams": 1,
            "num_return_sequences": 1, "early_stopping": True, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            "length_penalty": 1.0, "do_sample": bool(generation.get("do_sample", False)),
            "temperature": float(generation.get("temperature") or 1.0), "top_k": int(generation.get("top_k") or 50),
            "top_p": float(generation.get("top_p") or 1.0),
            "repetition_penalty": float(generation.get("repetition_penalty") or 1.0)}


def write_genai_config(variant_dir: Path | str) -> Path | None:
    """Write variant_dir/genai_config.json so `onnxruntime_genai.Model(variant_dir)` loads the variant;
    returns its path, or None (removing a stale one) where genai_unsupported() names a reason."""
    variant_dir = Path(variant_dir)
    artifact = art.read_artifact(variant_dir)
    target = variant_dir / GENAI_CONFIG
    if genai_unsupported(artifact):
        target.unlink(missing_ok=True)
        return None
    generation_file = variant_dir / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    target.write_text(json.dumps(genai_config(artifact, generation), indent=2) + "\n")
    return target
