"""The export op: a transformers causal LM -> one ONNX decoder graph with a KV cache, checked against PyTorch.

The graph serves prefill and decode alike (Optimum / onnxruntime-genai names and layout):
  inputs   input_ids [batch_size, sequence_length] int64
           attention_mask [batch_size, total_sequence_length] int64 (past + new tokens, 0 = padding)
           position_ids [batch_size, sequence_length] int64 (families whose forward takes them)
           past_key_values.{i}.key/.value [batch_size, num_kv_heads, past_sequence_length, head_dim]
           logits_to_keep: int64 scalar, also an initializer (default 0): optional, see below
  outputs  logits [batch_size, logits_sequence_length, vocab_size]
           present.{i}.key/.value [batch_size, num_kv_heads, total_sequence_length, head_dim]

`logits_to_keep` is an initializer listed among the graph inputs, which onnxruntime treats as an
overridable default and leaves out of `session.get_inputs()`: consumers that feed only the standard inputs
get the logits of every position (what quality evaluation needs), and recipec's runtime feeds 1 at
prefill so it does not pay for the vocabulary projection of prompt positions it would throw away.

A tied model (tie_word_embeddings) keeps one [vocab, hidden] table: the embedding Gather and the head,
`/lm_head/Gemm` with transB=1, both read it; artifact.json names them under graph.tied_embedding.

docs/export.md explains the choices (TorchScript exporter, opset, eager attention, full-length cache).
"""
from __future__ import annotations

import gc
import time
from typing import Any

from recipec.core.params import prop
from recipec.onnx import artifact as art
from recipec.passes.base import Pass, StageContext
from recipec.passes.onnx.trace import MAX_OPSET, MIN_OPSET, export_model, load_torch_model
from recipec.passes.onnx.verify import check_against, torch_reference

# Families that the tests export, verify and generate with; others are tried and left to verification.
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "mixtral", "qwen2_moe")

PARAMS: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "opset": prop("integer", MAX_OPSET, "ONNX opset of the graph. 20 is the newest torch's TorchScript exporter "
                                            "writes; onnxruntime 1.22+ runs it.",
                      minimum=MIN_OPSET, maximum=MAX_OPSET),
        "external_data_threshold_mb": prop("number", 1024, "Weights go to model.onnx.data beside model.onnx when "
                                                           "they total at least this many MiB (0 = always). The "
                                                           "maximum keeps a single-file graph under protobuf's 2 GiB "
                                                           "limit.", minimum=0, maximum=1800),
        "verify": prop("boolean", True, "Run the graph in onnxruntime against the PyTorch model on seeded random "
                                        "inputs (left-padded prefill, a decode step) and fail the stage when the "
                                        "logits differ."),
        "verify_atol": prop("number", 1e-3, "Absolute tolerance: every compared logit must satisfy "
                                            "|onnx - torch| <= verify_atol + verify_rtol * |torch|.",
                            exclusiveMinimum=0),
        "verify_rtol": prop("number", 1e-3, "Relative tolerance of the verification (see verify_atol).", minimum=0),
        "verify_seed": prop("integer", 0, "Seed of the verification's random token ids.", minimum=0),
    },
}


def apply(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params
    model = load_torch_model(ctx.input_dir)
    family = model.config.model_type
    if family not in TESTED_FAMILIES:
        ctx.log(f"{family} is not among the families the exporter is tested with ({', '.join(TESTED_FAMILIES)}); "
                "the verification decides whether its graph is right")
    with ctx.progress("exporting to ONNX", total=3 if p["verify"] else 2) as advance:
        started = time.perf_counter()
        external = export_model(model, ctx.output_dir, opset=p["opset"],
                                external_data_threshold_mb=p["external_data_threshold_mb"])
        export_seconds = time.perf_counter() - started
        advance(1)
        art.copy_support_files(ctx.input_dir, ctx.output_dir)
        advance(1)
        reference = torch_reference(model, ctx.output_dir, seed=p["verify_seed"]) if p["verify"] else None
        # One copy of the weights at a time: PyTorch's goes before onnxruntime loads the graph's.
        del model
        gc.collect()
        verification = None
        if reference is not None:
            verification = check_against(ctx.output_dir, reference, atol=p["verify_atol"], rtol=p["verify_rtol"])
            advance(1)
    artifact = art.write_artifact_json(ctx.output_dir, ctx.input_dir, verification=verification)
    ctx.log(f"exported {family} (opset {p['opset']}, {'external' if external else 'inline'} weights"
            + (", tied embedding" if artifact["graph"]["tied_embedding"] else "") + ")"
            + (f", max |Δlogits| {verification['max_abs_diff']:.2e}" if verification else ", not verified"))
    return {"exporter": "torchscript", "opset": p["opset"], "external_data": external,
            "logits": artifact["logits"]["mode"], "parameters": artifact["weights"]["parameters"],
            "tied_embedding": artifact["graph"]["tied_embedding"] is not None,
            "bytes": sum(f["bytes"] for f in artifact["files"]), "export_seconds": round(export_seconds, 3),
            "verification": verification}


PASS = Pass(
    op="export",
    consumes="torch",
    produces="onnx",
    params=PARAMS,
    apply=apply,
    summary="one decoder graph with a KV cache, verified against PyTorch (docs/export.md)",
)
