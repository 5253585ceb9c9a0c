"""How export writes its graph: the causal LM wrapped so that tensors go in and out flat, traced by torch's
TorchScript exporter with the model's parameters as graph inputs, which then become initializers written
one at a time to model.onnx.data (or into model.onnx), plus an overridable logits_to_keep, a head that
shares a tied embedding table, and readable initializer names (export.py describes the graph's inputs and
outputs).

Why parameters travel as inputs: the exporter folds every `Transpose(weight)` of an nn.Linear into a new
tensor while the model still holds the original, and below 2 GiB it serializes everything into one
protobuf in memory and parses it again: up to three copies of the weights at once. As inputs, the weights
never enter the exporter; `_save` writes each from the model's own tensor (transposed where the graph reads
it only through a Transpose, the folding the exporter would have done), so the export holds one copy.
"""
from __future__ import annotations

import contextlib
import inspect
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

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
# Transposed weights are written in blocks of rows of about this size.
WRITE_CHUNK_BYTES = 64 << 20
# The traced graph's output for a tied model: the head's input, before recipec appends the head itself.
HEAD_INPUT = "lm_head_input"
HEAD = "/lm_head/Gemm"


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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # eval() is load-bearing: torch.onnx.export restores the wrapper's training flag afterwards, recursively,
    # and a new Module starts in training mode, which would switch the model's dropout on (gpt2's is 0.1).
    wrapper = _DecoderWrapper(model).eval()
    args, names = _trace_inputs(model, wrapper)
    weights = wrapper.weights()
    names["inputs"] += list(weights)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".trace-") as tmp:
        traced = Path(tmp) / art.MODEL_FILE
        _torchscript_export(wrapper, (*args, *weights.values()), names, traced, opset, model.config.model_type)
        proto = onnx.load(str(traced))  # small: the weights are inputs, not initializers
    plan = _weight_plan(proto, weights)
    if wrapper.tied is not None:
        _append_tied_head(proto, wrapper.tied, tuple(weights[wrapper.tied].shape))
    _expose_logits_to_keep(proto)
    _rename_folded_initializers(proto)
    return _save(proto, plan, out_dir, external_data_threshold_mb)


def _is_tied(lm: torch.nn.Module) -> bool:
    """Whether the head is a bias-free Linear over the input embedding's own table (tie_word_embeddings)."""
    head, embedding = lm.get_output_embeddings(), lm.get_input_embeddings()
    return (isinstance(head, torch.nn.Linear) and head.bias is None and embedding is not None
            and head.weight is embedding.weight)


class _DecoderWrapper(torch.nn.Module):
    """Flat tensors in and out around the causal LM's base model and head.

    It holds the base model under its own attribute name (`model`, `transformer`) and `lm_head`, so the
    exporter names nodes as onnxruntime-genai does (`/model/layers.0/self_attn/q_proj/MatMul`), which later
    passes match exclude patterns against. The parameters come last among the inputs and are bound to the
    modules for the call. A tied model returns the head's input: `_append_tied_head` adds the head over the
    embedding's initializer, which a traced Linear would transpose into a second copy.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.prefix = lm.base_model_prefix
        setattr(self, self.prefix, getattr(lm, self.prefix))
        self.lm_head = lm.get_output_embeddings()
        params = inspect.signature(getattr(lm, self.prefix).forward).parameters
        self.has_position_ids = "position_ids" in params
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        aliases: dict[int, list[str]] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        self.aliases = {names[0]: names for names in aliases.values()}  # in named_parameters() order
        self.tied = next((name for name, names in self.aliases.items() if "lm_head.weight" in names), None) \
            if _is_tied(lm) else None

    def weights(self) -> dict[str, torch.Tensor]:
        """Every parameter once, by its first name (a tied table by the embedding's), in module order."""
        return {name: param.detach() for name, param in self.named_parameters()}

    def forward(self, input_ids, attention_mask, *rest):
        rest, weights = rest[:len(rest) - len(self.aliases)], rest[len(rest) - len(self.aliases):]
        with _bound(self, dict(zip(self.aliases, weights, strict=True)), self.aliases):
            return self._decode(input_ids, attention_mask, *rest)

    def _decode(self, input_ids, attention_mask, *rest):
        position_ids, rest = (rest[0], rest[1:]) if self.has_position_ids else (None, rest)
        logits_to_keep, past = rest[0], rest[1:]
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, self.cache_kwarg: _cache_from(past),
                  "use_cache": True}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = getattr(self, self.prefix)(**kwargs)
        hidden = _keep_last(out.last_hidden_state, logits_to_keep)
        return (hidden if self.tied else self.lm_head(hidden), *_flat_cache(output_cache(out)))


@contextlib.contextmanager
def _bound(module: torch.nn.Module, weights: dict[str, torch.Tensor], aliases: dict[str, list[str]]):
    """The modules read `weights` (traced inputs) in place of their parameters, under every alias of each."""
    saved = []
    for name, tensor in weights.items():
        for alias in aliases[name]:
            owner_path, _, leaf = alias.rpartition(".")
            owner = module.get_submodule(owner_path)
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = tensor
    try:
        yield
    finally:
        for owner, leaf, param in reversed(saved):
            owner._parameters[leaf] = param


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
        cache = output_cache(model(input_ids=ids[:, :TRACE_PAST], use_cache=True, logits_to_keep=1))
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
    outputs = [HEAD_INPUT if wrapper.tied else "logits"]
    outputs += [name.format(i=i) for i in range(layers) for name in (art.PRESENT_KEY, art.PRESENT_VALUE)]
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
            "logits": {0: "batch_size", 1: "logits_sequence_length"},
            HEAD_INPUT: {0: "batch_size", 1: "logits_sequence_length"}}
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


@dataclass
class _Weight:
    name: str  # the initializer's name
    tensor: torch.Tensor
    perm: tuple[int, ...] | None  # stored transposed (the Transpose the graph read it through is gone)


def _weight_plan(proto: onnx.ModelProto, weights: dict[str, torch.Tensor]) -> list[_Weight]:
    """Turn the parameter inputs into the initializers `_save` will write: a parameter read only through one
    Transpose is stored transposed under its reader's name (`model.layers.0.self_attn.q_proj.MatMul.in1`,
    what constant folding gave before), any other under its own name; unread ones are dropped."""
    graph = proto.graph
    consumers = art.node_consumers(graph)
    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {o for n in graph.node
                                                                                   for o in n.output}
    plan, renames = [], {}
    for name, tensor in weights.items():
        uses = consumers.get(name, [])
        if len(uses) == 1 and uses[0][0].op_type == "Transpose":
            transpose = uses[0][0]
            reader, slot = (consumers.get(transpose.output[0]) or [(transpose, 0)])[0]
            renames[transpose.output[0]] = new = _unique(f"{_node_label(reader)}.in{slot}", taken)
            perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
            plan.append(_Weight(new, tensor, tuple(perm or reversed(range(tensor.dim())))))
        elif uses:
            plan.append(_Weight(name, tensor, None))
    kept = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in renames)]
    del graph.node[:]
    graph.node.extend(kept)
    _rename_inputs(graph, renames)
    inputs = [v for v in graph.input if v.name not in weights]
    del graph.input[:]
    graph.input.extend(inputs)
    return plan


def _append_tied_head(proto: onnx.ModelProto, table: str, shape: tuple[int, int]) -> None:
    """logits = Gemm(hidden as [-1, hidden_size], table, transB=1) reshaped back to [batch, positions, vocab].

    Gemm with transB reads the [vocab, hidden] table the embedding Gather reads, so one initializer serves
    both; a MatMul over Transpose(table) would be constant-folded into a second copy by onnxruntime's
    offline optimizer (the fuse pass). The quantize pass finds it by name (HEAD) and artifact.json's
    graph.tied_embedding."""
    vocab, hidden = shape
    graph = proto.graph
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array([-1, hidden], np.int64), "lm_head.Reshape.in1"),
                              onnx.numpy_helper.from_array(np.array([vocab], np.int64), "lm_head.Concat.in1")])
    graph.node.extend([
        helper.make_node("Reshape", [HEAD_INPUT, "lm_head.Reshape.in1"], ["/lm_head/Reshape_output_0"],
                         name="/lm_head/Reshape"),
        helper.make_node("Gemm", ["/lm_head/Reshape_output_0", table], ["/lm_head/Gemm_output_0"], name=HEAD,
                         transB=1),
        helper.make_node("Shape", [HEAD_INPUT], ["/lm_head/Shape_output_0"], name="/lm_head/Shape", end=-1),
        helper.make_node("Concat", ["/lm_head/Shape_output_0", "lm_head.Concat.in1"], ["/lm_head/Concat_output_0"],
                         name="/lm_head/Concat", axis=0),
        helper.make_node("Reshape", ["/lm_head/Gemm_output_0", "/lm_head/Concat_output_0"], ["logits"],
                         name="/lm_head/Reshape_1"),
    ])
    head_input = next(v for v in graph.output if v.name == HEAD_INPUT)
    dims = [d.dim_param or d.dim_value for d in head_input.type.tensor_type.shape.dim][:-1] + [vocab]
    head_input.CopyFrom(helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims))


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
    consumer (`model.rotary_emb.Expand.in0`), so names are readable and stable."""
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    taken = set(initializers) | {v.name for v in graph.input} | {o for n in graph.node for o in n.output}
    renames: dict[str, str] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in initializers and name.startswith("onnx::") and name not in renames:
                renames[name] = _unique(f"{_node_label(node)}.in{slot}", taken)
    for name, new in renames.items():
        initializers[name].name = new
    _rename_inputs(graph, renames)


def _node_label(node: onnx.NodeProto) -> str:
    return node.name.strip("/").replace("/", ".") or node.op_type


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


def _save(proto: onnx.ModelProto, plan: list[_Weight], out_dir: Path, threshold_mb: float) -> bool:
    """model.onnx, and model.onnx.data when the initializers total at least threshold_mb. Weights go to the
    data file straight from the model's tensors, a block of rows at a time (`_write_rows`)."""
    total = sum(art.tensor_bytes(t) for t in proto.graph.initializer) + sum(
        w.tensor.numel() * w.tensor.element_size() for w in plan)
    external = total >= threshold_mb * 2**20
    data_path = out_dir / art.DATA_FILE
    data_path.unlink(missing_ok=True)
    with open(data_path, "wb") if external else contextlib.nullcontext() as data:
        for tensor in proto.graph.initializer:
            if data is not None and len(tensor.raw_data) >= INLINE_TENSOR_BYTES:
                _point_to(tensor, data.tell(), data.write(tensor.raw_data))
                tensor.ClearField("raw_data")
        for weight in plan:
            view = weight.tensor if weight.perm is None else weight.tensor.permute(weight.perm)
            if data is None or view.numel() * view.element_size() < INLINE_TENSOR_BYTES:
                proto.graph.initializer.append(onnx.numpy_helper.from_array(view.contiguous().numpy(), weight.name))
                continue
            tensor = TensorProto(name=weight.name, dims=view.shape,
                                 data_type=helper.np_dtype_to_tensor_dtype(view[:0].numpy().dtype))
            _point_to(tensor, data.tell(), _write_rows(view, data))
            proto.graph.initializer.append(tensor)
    (out_dir / art.MODEL_FILE).write_bytes(proto.SerializeToString())
    if external:
        share_data_file_mode(out_dir / art.MODEL_FILE)
    return external


def _write_rows(view: torch.Tensor, data) -> int:
    """Write the tensor's bytes in row-major order, in blocks of rows of at most WRITE_CHUNK_BYTES: a big
    transposed weight (an untied head is over a GiB) is never copied whole, a contiguous one not at all."""
    rows = max(1, WRITE_CHUNK_BYTES // max(1, view[0].numel() * view.element_size()))
    return sum(data.write(memoryview(_rows(view, start, rows).numpy()).cast("B"))
               for start in range(0, view.shape[0], rows))


def _rows(view: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """view[start:start + count], contiguous. A 2-D transpose goes through a contiguous column stripe of
    the source first, which torch transposes twice as fast as it gathers the strided rows directly."""
    if view.dim() == 2 and not view.is_contiguous() and view.t().is_contiguous():
        return view.t()[:, start:start + count].contiguous().t().contiguous()
    return view[start:start + count].contiguous()


def _point_to(tensor: TensorProto, offset: int, length: int) -> None:
    """Make the tensor read `length` bytes at `offset` of model.onnx.data (onnx's external layout)."""
    del tensor.external_data[:]
    for key, value in (("location", art.DATA_FILE), ("offset", offset), ("length", length)):
        tensor.external_data.add(key=key, value=str(value))
    tensor.data_location = TensorProto.EXTERNAL
