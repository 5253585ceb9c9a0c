"""Where onnxruntime ran each node of a variant, and which of those nodes fell back from the GPU to the CPU.

On device cuda, a node the CUDA execution provider has no kernel for runs on the CPU provider without a
word: DynamicQuantizeMatMul has no CUDA kernel, GroupQueryAttention's CUDA kernel is float16/bfloat16 only.
Such a variant's MBU/MFU would divide CPU time by the GPU's peaks, so the profile has to know.

The placement is read from onnxruntime's own profiling trace of one prefill and one decode step: each
Node event's args name the kernel that ran (`op_name`) and its provider (`provider`). That is what ran, after
every graph optimization, unlike the partitioner's assignment (which sees the graph before the fusions).

Not every CPU node on a CUDA session is a fallback: the CUDA provider hands small shape, index and mask
computations to the CPU on purpose (onnxruntime/core/framework/fallback_cpu_capability.cc,
GetCpuPreferredNodes). It does so only for nodes whose inputs are all CPU-side values (shapes, graph inputs,
initializers of at most 100 elements) and never for a node with a float16/bfloat16/float8 input. So a CPU
node counts as a fallback when it has such a half-precision input, or when its op is one that a decoder
applies only to activations and weights (COMPUTE_OPS), which that rule can never move. A plain MatMul is
not in the list: the CUDA provider has MatMul kernels for every float type, so a MatMul on the CPU is the
rotary-frequency product that the rule does move (a half-precision one is still caught by its input).
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from recipec.onnx.sessions import DecoderIO, resolve_device, run, session

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
REQUESTED = {"cpu": CPU, "cuda": CUDA}
COMPUTE_OPS = frozenset({
    "DynamicQuantizeMatMul", "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "QGemm", "QLinearMatMul",
    "MatMulBnb4", "GatherBlockQuantized", "QAttention",
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention", "PackedMultiHeadAttention",
    "SparseAttention", "PagedAttention", "DecoderMaskedMultiHeadAttention", "RotaryEmbedding", "Softmax",
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization", "MoE", "QMoE",
})
HALF_TYPES = frozenset({"float16", "bfloat16", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz"})
SOURCE = ("onnxruntime's profiling trace of one prefill (4 tokens) and one decode step in a separate session: "
          "the provider of every node that ran, counted once per node")
_PROMPT_TOKENS = 4
_KERNEL_SUFFIX = "_kernel_time"


def trace_nodes(events: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """node name -> {op, provider, half_input} from a trace's kernel events; a node that ran in several
    steps is one node."""
    nodes = {}
    for event in events:
        args = event.get("args") or {}
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith(_KERNEL_SUFFIX) or "provider" not in args:
            continue
        nodes[name[:-len(_KERNEL_SUFFIX)]] = {"op": args.get("op_name", "?"), "provider": args["provider"],
                                              "half_input": _has_half_input(args)}
    return nodes


def _has_half_input(args: dict[str, Any]) -> bool:
    # input_type_shape is a list of {element type: shape}, one per input the kernel saw
    return any(dtype in HALF_TYPES for entry in args.get("input_type_shape") or [] for dtype in entry)


def is_fallback(op: str, provider: str, device: str, half_input: bool = False) -> bool:
    """True for a node that ran off the requested device because that device had no kernel for it."""
    if device != "cuda" or provider != CPU:
        return False
    return op in COMPUTE_OPS or half_input


def provider_counts(nodes: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{provider: {op type: node count}}, both levels sorted."""
    counts: dict[str, Counter] = {}
    for node in nodes.values():
        counts.setdefault(node["provider"], Counter())[node["op"]] += 1
    return {p: dict(sorted(c.items())) for p, c in sorted(counts.items())}


def fallback_ops(providers: dict[str, dict[str, int]], device: str, half_input_ops: Iterable[str] = ()) -> list[str]:
    """The op types placed off the requested device for want of a kernel, from a {provider: {op: count}}
    placement; half_input_ops are the CPU nodes' op types that had a half-precision input."""
    half = set(half_input_ops)
    return sorted({op for provider, ops in providers.items() for op in ops
                   if is_fallback(op, provider, device, op in half)})


def summarize(nodes: dict[str, dict[str, Any]], device: str) -> dict[str, Any]:
    """The report's placement block, less `allowed` (the recipe's to say)."""
    providers = provider_counts(nodes)
    half = {n["op"] for n in nodes.values() if n["provider"] == CPU and n["half_input"]}
    ops = fallback_ops(providers, device, half)
    fallen = sum(1 for n in nodes.values() if is_fallback(n["op"], n["provider"], device, n["half_input"]))
    return {"device": device, "requested_provider": REQUESTED[device], "providers": providers,
            "fallback_ops": ops, "fallback_nodes": fallen, "source": SOURCE}


def measure_placement(model_path: Path | str, device: str, threads: int | None = None) -> dict[str, Any]:
    """The placement block of the graph at model_path on device (auto | cpu | cuda), from a short-lived
    profiled session of its own, so that the serving session is created exactly as `recipec serve` creates
    it, profiling off."""
    resolved = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="recipec-placement-") as tmp:
        sess = session(Path(model_path), resolved, threads=threads, profile_prefix=Path(tmp) / "ort")
        _prefill_and_decode(sess)
        events = json.loads(Path(sess.end_profiling()).read_text())
        del sess  # hand its memory (on CUDA, its arena) back before the serving session loads
    return summarize(trace_nodes(events), resolved)


def _prefill_and_decode(sess) -> None:
    io = DecoderIO.of(sess)
    prefill = io.prefill(np.zeros((1, _PROMPT_TOKENS), np.int64))
    outputs = run(sess, prefill)
    run(sess, io.step(prefill, io.presents(outputs), np.zeros((1, 1), np.int64)))
