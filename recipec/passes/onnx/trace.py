"""How export writes its graph: the causal LM wrapped so that tensors go in and out flat, traced by torch's
TorchScript exporter, then given an overridable logits_to_keep and readable initializer names (export.py
describes the graph's inputs and outputs)."""
from __future__ import annotations

import gc
import inspect
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from recipec.onnx import artifact as art
from recipec.onnx.sessions import share_data_file_mode
from recipec.passes.base import PassError
from recipec.passes.torch.lm import load_lm

# torch's TorchScript exporter stops at opset 20; 17 is the first with LayerNormalization.
MAX_OPSET, MIN_OPSET = 20, 17
# Trace shapes: a past and more than one new token, so that no branch specialised to an empty past or to
# single-token decoding is recorded (transformers' mask code has such branches).
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 3, 4
# Tensors below this size stay inside model.onnx when the weights go to external data (onnx's convention).
INLINE_TENSOR_BYTES = 1024


def load_torch_model(model_dir: Path | str) -> torch.nn.Module:
    """The model as the exporter traces it: float32, eager attention, batched MoE experts.

    Eager attention exports as plain MatMul/Softmax/MatMul (SDPA's TorchScript lowering adds IsNaN/Where
    guards for the same numbers). MoE experts must be `batched_mm`: the default per-expert loop bakes the
    routing's split sizes into a traced graph. Half-precision checkpoints are upcast: onnxruntime's CPU
    kernels lack bfloat16, and a float16 variant is the quantize pass's job.
    """
    return load_lm(model_dir, attn_implementation="eager", experts_implementation="batched_mm")


def export_model(model: torch.nn.Module, out_dir: Path, *, opset: int = MAX_OPSET,
                 external_data_threshold_mb: float = 1024) -> bool:
    """Write out_dir/model.onnx (and model.onnx.data when external); returns whether the weights are external."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    # eval() is load-bearing: torch.onnx.export restores the wrapper's training flag afterwards, recursively,
    # and a new Module starts in training mode, which would switch the model's dropout on (gpt2's is 0.1).
    wrapper = _DecoderWrapper(model).eval()
    args, names = _trace_inputs(model, wrapper)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".trace-") as tmp:
        traced = Path(tmp) / art.MODEL_FILE
        _torchscript_export(wrapper, args, names, traced, opset, model.config.model_type)
        # Past 2 GiB torch writes external data beside the traced file; loading gathers it before we re-save.
        proto = onnx.load(str(traced))
    _expose_logits_to_keep(proto)
    _rename_folded_initializers(proto)
    external = _save(proto, Path(out_dir), external_data_threshold_mb)
    del proto
    gc.collect()
    return external


class _DecoderWrapper(torch.nn.Module):
    """Flat tensors in and out around the causal LM's base model and head.

    It holds the base model under its own attribute name (`model`, `transformer`) and `lm_head`, so the
    exporter names nodes as onnxruntime-genai does (`/model/layers.0/self_attn/q_proj/MatMul`), which later
    passes match exclude patterns against.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.prefix = lm.base_model_prefix
        setattr(self, self.prefix, getattr(lm, self.prefix))
        self.lm_head = lm.get_output_embeddings()
        params = inspect.signature(getattr(lm, self.prefix).forward).parameters
        self.has_position_ids = "position_ids" in params
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids, attention_mask, *rest):
        position_ids, rest = (rest[0], rest[1:]) if self.has_position_ids else (None, rest)
        logits_to_keep, past = rest[0], rest[1:]
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, self.cache_kwarg: _cache_from(past),
                  "use_cache": True}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = getattr(self, self.prefix)(**kwargs)
        logits = self.lm_head(_keep_last(out.last_hidden_state, logits_to_keep))
        return (logits, *_flat_cache(output_cache(out)))


def _cache_from(past: tuple[torch.Tensor, ...]):
    """A DynamicCache holding the given tensors, one plain (full-length) layer per key/value pair.

    The layers are filled directly: `update()` on an empty layer concatenates a 1-D empty tensor, which
    breaks tracing. Plain layers also for sliding-window models: a sliding layer crops what it stores, a
    length a trace would freeze; the model's sliding-window mask gives the same logits on a full cache.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for key, value in zip(past[0::2], past[1::2], strict=True):
        layer = DynamicLayer()
        layer.keys, layer.values, layer.device, layer.is_initialized = key, value, key.device, True
        cache.layers.append(layer)
    return cache


def output_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _flat_cache(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _keep_last(hidden: torch.Tensor, logits_to_keep: torch.Tensor) -> torch.Tensor:
    """The last `logits_to_keep` positions of hidden (all of them when it is 0), traceable: the bounds are
    tensors computed from the hidden state's shape, never Python ints that a trace would freeze."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    end = positions[-1] + 1
    first = torch.where(logits_to_keep > 0, end - logits_to_keep, torch.zeros_like(end)).clamp(min=0)
    return hidden.index_select(1, torch.arange(first, end, device=hidden.device))


def _trace_inputs(model, wrapper: _DecoderWrapper) -> tuple[tuple, dict[str, list[str]]]:
    """Example inputs with a real past (the model's own prefill), and the graph's input/output names."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (TRACE_BATCH, TRACE_PAST + TRACE_SEQ), generator=generator)
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids[:, :TRACE_PAST], use_cache=True))
    past = _checked_past(cache, model.config.model_type)
    mask = torch.ones(TRACE_BATCH, TRACE_PAST + TRACE_SEQ, dtype=torch.int64)
    args: list[torch.Tensor] = [ids[:, TRACE_PAST:], mask]
    inputs = ["input_ids", "attention_mask"]
    if wrapper.has_position_ids:
        args.append(torch.arange(TRACE_PAST, TRACE_PAST + TRACE_SEQ).expand(TRACE_BATCH, -1))
        inputs.append("position_ids")
    args.append(torch.tensor(0, dtype=torch.int64))
    inputs.append(art.LOGITS_TO_KEEP)
    layers = len(past) // 2
    inputs += [name.format(i=i) for i in range(layers) for name in (art.PAST_KEY, art.PAST_VALUE)]
    outputs = ["logits"] + [name.format(i=i) for i in range(layers) for name in (art.PRESENT_KEY, art.PRESENT_VALUE)]
    return (*args, *past), {"inputs": inputs, "outputs": outputs}


def _checked_past(cache, family: str) -> list[torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None or layer.keys.dim() != 4 for layer in layers):
        raise PassError(f"{family} does not keep a per-layer key/value cache of [batch, heads, sequence, head_dim] "
                        "tensors; the export supports decoder-only transformers with such a cache")
    return _flat_cache(cache)


def _dynamic_axes(names: dict[str, list[str]]) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "logits_sequence_length"}}
    for name in names["inputs"]:
        if name.startswith("past_key_values."):
            axes[name] = {0: "batch_size", 2: "past_sequence_length"}
    for name in names["outputs"]:
        if name.startswith("present."):
            axes[name] = {0: "batch_size", 2: "total_sequence_length"}
    return {k: v for k, v in axes.items() if k in names["inputs"] or k in names["outputs"]}


def _torchscript_export(wrapper, args, names, path: Path, opset: int, family: str) -> None:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # TracerWarnings name the branches frozen at the trace shapes; the verification checks the
            # graph at other shapes, which is what those warnings ask for.
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=opset,
                              input_names=names["inputs"], output_names=names["outputs"],
                              dynamic_axes=_dynamic_axes(names), do_constant_folding=True)
    except Exception as exc:  # the exporter raises many unrelated types; all mean "this model did not export"
        raise PassError(f"torch.onnx.export (TorchScript) failed for {family}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _expose_logits_to_keep(proto: onnx.ModelProto) -> None:
    """Give logits_to_keep the default 0 (all positions) as an initializer and list it last among the inputs,
    so that callers feeding only the standard inputs can run the graph."""
    graph = proto.graph
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, dtype=np.int64), art.LOGITS_TO_KEEP))
    entry = next(v for v in graph.input if v.name == art.LOGITS_TO_KEEP)
    kept = [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in graph.input if v.name != art.LOGITS_TO_KEEP]
    moved = onnx.ValueInfoProto.FromString(entry.SerializeToString())
    del graph.input[:]
    graph.input.extend(kept + [moved])


def _rename_folded_initializers(proto: onnx.ModelProto) -> None:
    """Name the exporter's folded constants (`onnx::MatMul_735`, numbered by the tracer) after their first
    consumer (`model.layers.0.self_attn.q_proj.MatMul.in1`), so names are readable and stable."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    taken = set(initializers) | {v.name for v in graph.input} | {o for n in graph.node for o in n.output}
    renames: dict[str, str] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in initializers and name.startswith("onnx::") and name not in renames:
                renames[name] = _unique(f"{node.name.strip('/').replace('/', '.') or node.op_type}.in{slot}", taken)
    for name, new in renames.items():
        initializers[name].name = new
    _rename_inputs(graph, renames)


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    taken.add(candidate)
    return candidate


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in renames:
                node.input[slot] = renames[name]
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                _rename_inputs(sub, renames)


def _save(proto: onnx.ModelProto, out_dir: Path, threshold_mb: float) -> bool:
    total = sum(art.tensor_bytes(t) for t in proto.graph.initializer)
    external = total >= threshold_mb * 2**20
    # onnx appends to an existing data file, which would leave stale bytes behind.
    (out_dir / art.DATA_FILE).unlink(missing_ok=True)
    if external:
        onnx.save_model(proto, str(out_dir / art.MODEL_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=art.DATA_FILE, size_threshold=INLINE_TENSOR_BYTES,
                        convert_attribute=False)
        share_data_file_mode(out_dir / art.MODEL_FILE)
    else:
        onnx.save_model(proto, str(out_dir / art.MODEL_FILE))
    return external
