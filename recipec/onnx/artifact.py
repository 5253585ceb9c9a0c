"""artifact.json: what a variant directory holds, read from its ONNX graph so it always matches.

Every pass that produces an ONNX variant writes one, the export from the torch model's config and later
passes from their input's artifact: `write_artifact_json(out_dir, base=read_artifact(in_dir))`.

Sections:
- model: identity copied from the source (model_type, vocab_size, eos/bos/pad ids, sizes, MoE expert counts).
- graph: opset, files, required inputs and outputs with dtypes and symbolic dims, `optional_inputs`
  (initializers listed as graph inputs: onnxruntime uses their value unless a caller feeds one), and
  `tied_embedding`: the one table the embedding Gather and the head both read, or null (see `tied_embedding`).
- kv_cache: layer count, kv heads, head_dim, dtype and the name patterns of past/present tensors.
- logits: whether the graph can skip the vocabulary projection of positions a caller does not need.
- weights: elements and bytes of the initializers by dtype (external data counted, never loaded), the
  parameter count, MoE active parameters and the embedding tables (see `weight_stats`).
- compute_dtype: per device, the dtype most of the matmul weights are multiplied in (see `compute_dtypes`).
- verification: the export's check against PyTorch (null on variants nobody compared).
- requires: the oldest onnxruntime that runs the graph(s), the operators outside the ONNX standard with their
  domains, input counts and attributes, the IR version and opsets, and what an older operator form cannot do
  (see recipec.onnx.requires, which holds the facts); checked against this environment's onnxruntime.
- phases (phase-split variants only, docs/phase-split.md): the graph each phase runs, {"decode": {"file":
  "model.onnx"}, "prefill": {"file": "prefill.onnx", external_data, weights, compute_dtype}}; every other
  section describes model.onnx, the decode graph, whose KV layout and logits the prefill graph shares.
- files: every file of the directory with its size.

This module imports neither torch nor transformers at import time: the runtime reads artifacts in serving
processes whose memory is measured.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from recipec.core.files import MODEL_INPUT_NAMES, TOKENIZER_FILES
from recipec.errors import PassError
from recipec.onnx import requires

FORMAT = 1
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
PREFILL_FILE = "prefill.onnx"  # a phase-split variant's prefill graph (its decode graph is MODEL_FILE)
ARTIFACT_FILE = "artifact.json"
# Files a variant directory keeps from the model directory so that tokenizers, Optimum and
# onnxruntime-genai style loaders find the model's configuration beside the graph.
SUPPORT_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
PAST_KEY, PAST_VALUE = "past_key_values.{i}.key", "past_key_values.{i}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{i}.key", "present.{i}.value"
LOGITS_TO_KEEP = "logits_to_keep"
MODEL_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "num_experts", "num_experts_per_tok")
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

# Inputs that carry quantization metadata rather than weights: (op type -> input slots). Their bytes count,
# their elements are not parameters.
_QUANT_METADATA = {
    "DequantizeLinear": (1, 2), "QuantizeLinear": (1, 2), "MatMulNBits": (2, 3, 4), "MatMulInteger": (2, 3),
    "DynamicQuantizeMatMul": (2, 3), "MatMulIntegerToFloat": (2, 3, 4, 5), "GatherBlockQuantized": (2, 3),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
}
_SUB_BYTE_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4,
                  getattr(TensorProto, "INT2", -1): 2, getattr(TensorProto, "UINT2", -1): 2}
_GATHERS = ("Gather", "GatherBlockQuantized")
_HEADS = ("Gemm", "MatMul", "MatMulNBits", "FusedMatMul")
_NOT_WEIGHTS = {TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL, TensorProto.STRING}


def copy_support_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the config, generation config and tokenizer files that `src_dir` has; returns their names. The
    tokenizer config names the inputs the graph takes (`model_input_names`), whatever the source said."""
    copied = []
    for name in SUPPORT_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(dst_dir) / name)
            copied.append(name)
    if "tokenizer_config.json" in copied:
        _declare_model_inputs(Path(dst_dir) / "tokenizer_config.json")
    return copied


def _declare_model_inputs(path: Path) -> None:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PassError(f"{path} is not valid JSON ({exc}); fix the model's tokenizer_config.json") from None
    if config.get("model_input_names") != list(MODEL_INPUT_NAMES):
        config["model_input_names"] = list(MODEL_INPUT_NAMES)
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def read_artifact(variant_dir: Path | str) -> dict[str, Any]:
    path = Path(variant_dir) / ARTIFACT_FILE
    try:
        artifact = json.loads(path.read_text())
    except FileNotFoundError:
        raise PassError(f"{variant_dir} is not an ONNX variant directory: it has no {ARTIFACT_FILE}") from None
    except json.JSONDecodeError as exc:
        raise PassError(f"{path} is not valid JSON ({exc}); rebuild the variant") from None
    if artifact.get("format") != FORMAT:
        raise PassError(f"{path} has format {artifact.get('format')!r}, this recipec reads format {FORMAT}; "
                        "rebuild the variant")
    return artifact


def write_artifact_json(variant_dir: Path | str, model_dir_or_config: Any = None, *,
                        base: dict[str, Any] | None = None,
                        verification: dict[str, Any] | None = None,
                        phases: dict[str, str] | None = None) -> dict[str, Any]:
    """Describe the ONNX variant in `variant_dir`; returns what it wrote to artifact.json.

    The model identity comes from `model_dir_or_config` (a save_pretrained directory or a transformers
    config) or else from `base`, the artifact of the variant this one was derived from. Everything else is
    read from the graph and the directory, so a pass that rewrote the graph gets a true description.
    `phases` ({"prefill": file, "decode": MODEL_FILE}) marks a phase-split variant; its prefill graph is
    described from that file.
    """
    variant_dir = Path(variant_dir)
    if model_dir_or_config is not None:
        model = model_identity(model_dir_or_config)
    elif base is not None:
        model = dict(base["model"])
    else:
        raise ValueError("write_artifact_json needs the model's config (or directory) or a base artifact")
    proto = _load_graph(variant_dir / MODEL_FILE)
    graph = graph_io(proto)
    artifact = {
        "format": FORMAT,
        "model": model,
        "graph": {"file": MODEL_FILE, **_external_data(variant_dir, proto), **graph,
                  "tied_embedding": tied_embedding(proto)},
        "kv_cache": kv_cache_layout(graph, proto),
        "logits": logits_mode(graph),
        "weights": weight_stats(proto, model),
        "compute_dtype": compute_dtypes(proto),
        "verification": verification,
    }
    graphs = [proto]
    if phases:
        artifact["phases"] = {"decode": {"file": phases["decode"]},
                              "prefill": _phase_graph(variant_dir, phases["prefill"], model)}
        graphs.append(_load_graph(variant_dir / phases["prefill"]))
    artifact["requires"] = requires.derive(graphs)
    requires.check_installed(artifact["requires"])
    (variant_dir / ARTIFACT_FILE).unlink(missing_ok=True)
    artifact["files"] = _files(variant_dir)
    (variant_dir / ARTIFACT_FILE).write_text(json.dumps(artifact, indent=2, sort_keys=True) + "\n")
    return artifact


def model_identity(model_dir_or_config: Any) -> dict[str, Any]:
    """model_type, sizes and special token ids; a generation_config.json overrides the config's token ids
    because that is what transformers' generate() stops on."""
    config, generation = _config_and_generation(model_dir_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    identity = {key: getattr(text, key, None) for key in MODEL_KEYS}
    identity["model_type"] = config.model_type
    if identity["num_experts"] is None:
        identity["num_experts"] = getattr(text, "num_local_experts", None)
    for key in TOKEN_KEYS:
        value = generation.get(key, getattr(config, key, None))
        identity[key] = list(value) if isinstance(value, (list, tuple)) else value
    return identity


def _config_and_generation(model_dir_or_config: Any) -> tuple[Any, dict[str, Any]]:
    if not isinstance(model_dir_or_config, (str, Path)):
        return model_dir_or_config, {}
    from transformers import AutoConfig

    model_dir = Path(model_dir_or_config)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise PassError(f"cannot read the model config in {model_dir}: {exc}") from None
    generation_file = model_dir / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    return config, generation


def _phase_graph(variant_dir: Path, name: str, model: dict[str, Any]) -> dict[str, Any]:
    """What a second graph of the variant stores and computes in: the sections a profile reads per graph."""
    proto = _load_graph(variant_dir / name)
    return {"file": name, "external_data": _external_data(variant_dir, proto)["external_data"],
            "weights": weight_stats(proto, model), "compute_dtype": compute_dtypes(proto)}


def _load_graph(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise PassError(f"{path.parent} has no {path.name}")
    return onnx.load(str(path), load_external_data=False)


def _external_data(variant_dir: Path, proto: onnx.ModelProto) -> dict[str, Any]:
    locations = sorted({entry.value for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL
                        for entry in t.external_data if entry.key == "location"})
    return {"external_data": locations, "opset": _onnx_opset(proto), "ir_version": proto.ir_version,
            "producer": f"{proto.producer_name} {proto.producer_version}".strip()}


def _onnx_opset(proto: onnx.ModelProto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def graph_io(proto: onnx.ModelProto) -> dict[str, Any]:
    """Inputs, optional inputs (initializer-backed, with their default) and outputs of the main graph."""
    initializers = {t.name: t for t in proto.graph.initializer}
    inputs = [_value_info(v) for v in proto.graph.input if v.name not in initializers]
    optional = []
    for v in proto.graph.input:
        if v.name in initializers:
            tensor = initializers[v.name]
            inline = tensor.data_location != TensorProto.EXTERNAL
            default = onnx.numpy_helper.to_array(tensor).tolist() if inline else None
            optional.append({**_value_info(v), "default": default})
    return {"inputs": inputs, "optional_inputs": optional, "outputs": [_value_info(v) for v in proto.graph.output]}


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
             for d in tensor.shape.dim] if tensor.HasField("shape") else None
    return {"name": value.name, "dtype": dtype_name(tensor.elem_type), "shape": shape}


def dtype_name(elem_type: int) -> str:
    """numpy-style name of an ONNX element type ('float32', 'int4', 'bfloat16')."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name


def kv_cache_layout(graph: dict[str, Any], proto: onnx.ModelProto | None = None) -> dict[str, Any] | None:
    """Layer count, kv heads and head_dim read from the past_key_values inputs, and (given the graph) whether
    past and present may share one buffer; None without a KV cache."""
    inputs = {v["name"]: v for v in graph["inputs"]}
    layers = 0
    while PAST_KEY.format(i=layers) in inputs and PAST_VALUE.format(i=layers) in inputs:
        layers += 1
    if layers == 0:
        return None
    first = inputs[PAST_KEY.format(i=0)]
    shape = first["shape"]
    return {"num_layers": layers, "num_kv_heads": shape[1], "head_dim": shape[3], "dtype": first["dtype"],
            "layout": ["batch_size", "num_kv_heads", "sequence", "head_dim"],
            "buffer": kv_buffer(proto) if proto is not None else "growing",
            "inputs": {"key": PAST_KEY, "value": PAST_VALUE}, "outputs": {"key": PRESENT_KEY, "value": PRESENT_VALUE}}


# GroupQueryAttention inputs that carry padding or per-row query lengths outside the attention mask: with
# either, the kernel cannot take genai's right-padded rows in a shared buffer.
_GQA_ATTENTION_BIAS = 10


def kv_buffer(proto: onnx.ModelProto) -> str:
    """"shared" when every attention is a GroupQueryAttention that takes its lengths from the mask alone (fuse's
    kv_buffer: shared): its present may then alias a preallocated past. Otherwise "growing"."""
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    layers = sum(1 for v in proto.graph.input if v.name.startswith("past_key_values.") and v.name.endswith(".key"))
    if not gqa or len(gqa) != layers:
        return "growing"
    def extra(node, index):
        return len(node.input) > index and node.input[index] != ""
    # recipec's growing form feeds the exporter's mask as attention_bias; the shared form (and genai's) takes
    # its lengths from the mask, with query_seqlens or without
    if any(extra(n, _GQA_ATTENTION_BIAS) for n in gqa):
        return "growing"
    return "shared"


def kv_names(patterns: dict[str, str], layers: int) -> list[str]:
    """The cache tensor names of a kv_cache section's `inputs` or `outputs` patterns: layer 0 key, value, 1 ..."""
    return [patterns[kind].format(i=i) for i in range(layers) for kind in ("key", "value")]


def logits_mode(graph: dict[str, Any]) -> dict[str, Any]:
    optional = {v["name"]: v for v in graph["optional_inputs"]}
    if LOGITS_TO_KEEP in optional:
        return {"mode": "selectable", "input": LOGITS_TO_KEEP, "default": optional[LOGITS_TO_KEEP]["default"],
                "meaning": "0 = logits of every position (what Optimum, onnxruntime-genai and quality evaluation "
                           "get by default); k > 0 = logits of the last k positions only",
                "runtime": "recipec.runtime feeds logits_to_keep=1 at prefill"}
    return {"mode": "all", "input": None, "default": None,
            "meaning": "logits of every position", "runtime": "recipec.runtime keeps the last position"}


def weight_stats(proto: onnx.ModelProto, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Elements and bytes of every initializer, grouped by dtype, and the parameter counts.

    `parameters` counts the elements of weight tensors: float and quantized initializers of rank >= 1
    (rank-0 ones are constants folded by the exporter), with quantization scales and zero points
    excluded and packed low-bit weights (MatMulNBits, GatherBlockQuantized) counted as the values they
    hold. Integer index/shape constants are not parameters. Each initializer counts once whatever reads
    it, so a tied table shared by the embedding Gather and the head counts once, as transformers'
    num_parameters() counts it. `active_parameters` subtracts, for MoE
    models, the experts a token does not use: tensors of rank 3 whose first dim is `num_experts` count
    `num_experts_per_tok / num_experts` of their elements. `embedding_*` are the tables only Gathers
    read (untied token and position embeddings), of which a decode step reads one row; a tied table is
    not among them, since the head reads all of it at every step. `bytes_per_decode_step` is what one
    batch-1 decode step reads: every initializer as stored (packed int4 with its scales) except those
    embedding tables, and of each expert tensor its routed share, tensor by tensor, so experts and attention
    stored at different precisions each count at their own bytes.
    """
    consumers = node_consumers(proto.graph)
    by_dtype: dict[str, dict[str, int]] = {}
    totals = {"parameters": 0, "expert_parameters": 0, "embedding_parameters": 0, "embedding_bytes": 0,
              "step_bytes": 0.0}
    experts = (model or {}).get("num_experts")
    routed = _routed_share(model)
    for tensor in proto.graph.initializer:
        elements, nbytes = _elements(tensor), tensor_bytes(tensor)
        entry = by_dtype.setdefault(dtype_name(tensor.data_type), {"elements": 0, "bytes": 0})
        entry["elements"] += elements
        entry["bytes"] += nbytes
        params = _parameter_elements(tensor, consumers.get(tensor.name, []))
        totals["parameters"] += params
        expert = bool(experts) and len(tensor.dims) == 3 and tensor.dims[0] == experts
        if expert:
            totals["expert_parameters"] += params
        if _is_embedding(tensor, consumers.get(tensor.name, [])):
            totals["embedding_parameters"] += params
            totals["embedding_bytes"] += nbytes
        else:
            totals["step_bytes"] += nbytes * (routed if expert else 1.0)
    active = totals["parameters"] - round(totals["expert_parameters"] * (1 - routed))
    return {"parameters": totals["parameters"], "active_parameters": active,
            "bytes": sum(e["bytes"] for e in by_dtype.values()), "by_dtype": dict(sorted(by_dtype.items())),
            "embedding_parameters": totals["embedding_parameters"], "embedding_bytes": totals["embedding_bytes"],
            "bytes_per_decode_step": int(round(totals["step_bytes"]))}


def _routed_share(model: dict[str, Any] | None) -> float:
    """The share of each expert tensor one token reads and multiplies: top-k of the experts (1 if dense)."""
    experts, top_k = (model or {}).get("num_experts"), (model or {}).get("num_experts_per_tok")
    return top_k / experts if experts and top_k else 1.0


_INTEGER_MATMULS = ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearMatMul")


def compute_dtypes(proto: onnx.ModelProto) -> dict[str, str]:
    """{"cpu": dtype, "cuda": dtype}: the dtype of the arithmetic that multiplies most weight elements, the
    dtype whose peak FLOP/s an MFU divides by. Integer matmuls (and a DequantizeLinear feeding a float one,
    which onnxruntime fuses into an integer kernel) compute in int8. MatMulNBits computes in its scales'
    dtype, except that the CPU kernel quantizes activations to int8 at accuracy_level 4 (the CUDA kernel
    ignores accuracy_level). Float matmuls compute in their weight's dtype."""
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    elements: dict[str, dict[str, int]] = {"cpu": {}, "cuda": {}}
    for node in proto.graph.node:
        kinds = _matmul_dtypes(node, inits, producer)
        if kinds is None:
            continue
        weight, (cpu, cuda) = kinds
        for device, dtype in (("cpu", cpu), ("cuda", cuda)):
            elements[device][dtype] = elements[device].get(dtype, 0) + weight
    return {device: max(sorted(counts), key=counts.get) if counts else "float32"
            for device, counts in elements.items()}


def _matmul_dtypes(node: onnx.NodeProto, inits: dict[str, TensorProto],
                   producer: dict[str, onnx.NodeProto]) -> tuple[int, tuple[str, str]] | None:
    """(weight elements, (cpu dtype, cuda dtype)) of a matmul node with a constant weight, else None."""
    if node.op_type == "MatMulNBits":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scale = dtype_name(inits[node.input[2]].data_type) if node.input[2] in inits else "float32"
        cpu = "int8" if attrs.get("accuracy_level", 0) == 4 else scale
        return int(attrs["N"]) * int(attrs["K"]), (cpu, scale)
    if node.op_type in _INTEGER_MATMULS or node.op_type in _HEADS:
        slot = 3 if node.op_type == "QLinearMatMul" else 1
        name = node.input[slot] if len(node.input) > slot else ""
        source = producer.get(name)
        if source is not None and source.op_type == "Transpose":  # a tied head reads the table transposed
            name, source = source.input[0], producer.get(source.input[0])
        if source is not None and source.op_type == "DequantizeLinear":
            name, dtype = source.input[0], "int8"
        elif name in inits:
            dtype = "int8" if node.op_type in _INTEGER_MATMULS else dtype_name(inits[name].data_type)
        else:
            return None
        return (_elements(inits[name]) if name in inits else 0), (dtype, dtype)
    return None


def tied_embedding(proto: onnx.ModelProto) -> dict[str, str] | None:
    """{"initializer", "gather", "head"}: the table that both an embedding Gather (or GatherBlockQuantized,
    directly or through a Reshape of a packed table) and the head's weight input read, so that it is stored
    once; None when no initializer is shared so (an untied model, or a pass that untied it)."""
    consumers = node_consumers(proto.graph)
    for tensor in proto.graph.initializer:
        uses = list(consumers.get(tensor.name, []))
        uses += [use for node, _ in uses if node.op_type == "Reshape" for use in consumers.get(node.output[0], [])]
        gathers = [node.name for node, slot in uses if node.op_type in _GATHERS and slot == 0]
        heads = [node.name for node, slot in uses if node.op_type in _HEADS and slot == 1]
        if gathers and heads:
            return {"initializer": tensor.name, "gather": gathers[0], "head": heads[0]}
    return None


def node_consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """value name -> the (node, input slot) pairs that read it."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, slot))
    return consumers


def _elements(tensor: TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64))


def tensor_bytes(tensor: TensorProto) -> int:
    """Bytes of the tensor's data, from its dims and dtype (so external data need not be read)."""
    bits = _SUB_BYTE_BITS.get(tensor.data_type)
    if bits:
        return (_elements(tensor) * bits + 7) // 8
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return _elements(tensor) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def _parameter_elements(tensor: TensorProto, uses: list[tuple[onnx.NodeProto, int]]) -> int:
    if tensor.data_type in _NOT_WEIGHTS or len(tensor.dims) == 0:
        return 0
    if uses and all(slot in _QUANT_METADATA.get(node.op_type, ()) for node, slot in uses):
        return 0
    for node, slot in uses:
        if node.op_type == "MatMulNBits" and slot == 1:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            return int(attrs["N"]) * int(attrs["K"])
        if node.op_type == "GatherBlockQuantized" and slot == 0 and tensor.data_type == TensorProto.UINT8:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            return _elements(tensor) * 8 // int(attrs.get("bits", 4))
    return _elements(tensor)


def _is_embedding(tensor: TensorProto, uses: list[tuple[onnx.NodeProto, int]]) -> bool:
    """A 2-D table (or a quantized table's per-row scales and zero points) that only Gathers read: a decode
    step reads one row of it, not all of it."""
    return len(tensor.dims) == 2 and bool(uses) and all(
        node.op_type in _GATHERS and (slot == 0 or node.op_type == "GatherBlockQuantized") for node, slot in uses)


def _files(variant_dir: Path) -> list[dict[str, Any]]:
    return [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(variant_dir.iterdir()) if p.is_file()]
