"""The fuse pass's graph work: recipec's rewrite rules, then onnxruntime.transformers' fusions.

Order matters. Shapes are inferred and shape arithmetic folded first, so the attention rules see static
head counts and no stray Shape consumers; recipec's rules run before onnxruntime.transformers' optimizer,
whose output no longer carries the inferred shapes the rules check; projections are merged after GPT-2's
Gemms became MatMuls, so its fused c_attn is left alone and llama's q/k/v and gate/up are merged.

Memory: the graph is an onnx-ir model whose weights stay where they are (memory-mapped from the input's
external data, or the input's own tensors); the libraries that want a ModelProto (symbolic shape inference,
onnxruntime.transformers) get one with the large initializers set aside (`set_aside`), so no step copies the
weights. Only merged projections are new tensors.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model
from onnxscript import rewriter as onnxscript_rewriter
from onnxscript.optimizer import fold_constants_ir

from recipec.errors import PassError
from recipec.onnx.fusions import attention, gemm, kept_logits, qkv, shapes

ATTENTION_OPS = {"gqa": "GroupQueryAttention", "mha": "MultiHeadAttention"}


@dataclass
class FusionReport:
    applied: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, count: int) -> None:
        if count:
            self.applied[name] = self.applied.get(name, 0) + count


def _weight_owners(model: ir.Model) -> dict[str, str]:
    """Initializer name -> name of the MatMul/Gemm that reads it."""
    return {node.inputs[1].name: node.name for node in model.graph
            if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None
            and node.inputs[1].is_initializer()}


def _single_output_rules() -> list:
    """onnxscript's default rewrite rules without its multi-output one (SlicesSplit): for those its matcher
    re-scans the graph for every candidate node, which took 4 minutes on a 24-layer llama."""
    return [rule for rule in onnxscript_rewriter._DEFAULT_REWRITE_RULES
            if rule._target_pattern.has_single_output_node]


def _forget_matched_graph(rules: list) -> None:
    """onnxscript's rule objects are module-level and each one's matcher keeps the last graph, node and match
    it saw: the whole model, weights included, would stay alive after the pass. Every match sets them anew."""
    for rule in rules:
        matcher = getattr(rule, "_matcher", None)
        for attribute in ("_graph", "_current_node", "_match", "_tracer"):
            if hasattr(matcher, attribute):
                setattr(matcher, attribute, None)


def clean(model: ir.Model) -> None:
    """What onnxscript.optimizer.optimize does (constant folding and its default rewrite rules, twice; dead
    code, lifted and deduplicated constants, CSE) minus the quadratic rule, then the exporter's names back
    on the projections: a rule that re-creates a node names it node_<Op>_<n> (a GPT-2 Gemm whose zero bias
    is dropped becomes node_Gemm_20), and node names are what quantize's `exclude` globs match."""
    owners, rules = _weight_owners(model), _single_output_rules()
    for _ in range(2):
        fold_constants_ir(model, onnx_shape_inference=True)
        onnxscript_rewriter.rewrite(model, pattern_rewrite_rules=rules)
    _forget_matched_graph(rules)
    ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
    )(model)
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None:
            node.name = owners.get(node.inputs[1].name, node.name)


# Initializers over this many bytes are set aside when the graph goes to a library as a ModelProto: norm
# weights and biases (up to 16,384 floats) stay in it, weight matrices and embedding tables do not.
ASIDE_BYTES = 64 * 1024
# No such file: a library that read a set-aside tensor fails instead of reading other bytes.
ASIDE_LOCATION = "recipec-set-aside-weights.data"


def set_aside(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, ir.TensorProtocol]]:
    """The model as a ModelProto in which each large initializer is a reference to external data that does
    not exist: names, types and shapes without the bytes. Small ones are in it by value, also those the model
    keeps in external data (shape inference reads a norm's weight). `put_back` restores the tensors by name."""
    aside = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not (tensor.nbytes > ASIDE_BYTES or isinstance(tensor, ir.ExternalTensor)):
            continue
        aside[value.name] = tensor
        if tensor.nbytes > ASIDE_BYTES:
            value.const_value = ir.ExternalTensor(ASIDE_LOCATION, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                                  name=value.name)
        else:
            value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name)
    try:
        return ir.to_proto(model), aside
    finally:
        put_back(model, aside)


def put_back(model: ir.Model, aside: dict[str, ir.TensorProtocol]) -> None:
    for name, value in model.graph.initializers.items():
        if name in aside:
            value.const_value = aside[name]
        elif isinstance(value.const_value, ir.ExternalTensor) and value.const_value.location == ASIDE_LOCATION:
            raise PassError(f"fuse: a library step renamed or derived the set-aside weight {name!r}; use level: basic")


def detach_overridable(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """Initializers that are also graph inputs (the exporter's logits_to_keep) become plain inputs while
    recipec works on the graph: onnxscript's folding reads an initializer's value even when a caller may
    override it, and folded Sub(n, logits_to_keep) into n. `reattach` restores them."""
    saved = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            saved[value.name] = value.const_value
            model.graph.initializers.pop(value.name)
            value.const_value = None
    return saved


def reattach(model: ir.Model, saved: dict[str, ir.TensorProtocol]) -> None:
    for value in model.graph.inputs:
        if value.name in saved:
            value.const_value = saved[value.name]
            model.graph.register_initializer(value)


def prepare(model: ir.Model, report: FusionReport) -> ir.Model:
    """Symbolic shapes, folded shape arithmetic, constant folding and dead-code removal."""
    light, aside = set_aside(model)
    model = ir.from_proto(shapes.infer_shapes(light))
    put_back(model, aside)
    for kind, count in shapes.fold_shape_gathers(model).items():
        report.add(f"shape_gathers_to_{kind}", count)
    clean(model)
    return model


def slice_kept_logits(model: ir.Model, report: FusionReport) -> None:
    report.add("kept_logits_slices", kept_logits.slice_kept_logits(model))


def fuse_attention(model: ir.Model, choice: str, report: FusionReport, log: Callable[[str], None],
                   shared_buffer: bool = False, rotary_positions: int | None = None) -> None:
    """rotary_positions: with shared_buffer, GroupQueryAttention rotates q and k itself from a table of that
    many positions (the model's max_position_embeddings) wherever the graph's rope allows one."""
    if choice == "none":
        return
    kinds = [ATTENTION_OPS[choice]] if choice in ATTENTION_OPS else ["MultiHeadAttention", "GroupQueryAttention"]
    if shared_buffer:  # only GroupQueryAttention can write a preallocated buffer in place
        kinds = ["GroupQueryAttention"]
    for kind in kinds:  # auto: MHA where kv heads == heads, GQA for the rest
        for name in attention.fuse_attention(model, kind, shared_buffer, rotary_positions):
            for op in name.split("+"):
                report.add(op, 2 if op == "RotaryEmbedding" else 1)
    clean(model)
    if not any(op in report.applied for op in ATTENTION_OPS.values()):
        log("fuse: no attention block matched; attention stays unfused")


def unflatten_gemms(model: ir.Model, report: FusionReport) -> None:
    report.add("gemm_to_3d_matmul", gemm.unflatten_gemms(model))
    clean(model)


def merge_projections(model: ir.Model, report: FusionReport) -> None:
    """The merged weights are new tensors; the projections they replace are unmapped from the input's external
    data at once instead of when the pass ends, so the two are not resident together for the rest of it."""
    before = {name: value.const_value for name, value in model.graph.initializers.items()}
    report.add("merged_matmul_groups", qkv.merge_sibling_matmuls(model))
    clean(model)
    for name, tensor in before.items():
        if name not in model.graph.initializers and isinstance(tensor, ir.ExternalTensor):
            tensor.release()


def pack_attention_inputs(model: ir.Model, report: FusionReport) -> None:
    report.add("packed_qkv_attention", qkv.pack_into_attention(model))
    clean(model)


def _fusion_options(gelu: bool) -> FusionOptions:
    options = FusionOptions("gpt2")
    options.enable_attention = False
    options.enable_rotary_embeddings = False
    options.enable_embed_layer_norm = False
    options.enable_gelu = options.enable_bias_gelu = gelu
    return options


QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "MatMulNBits", "DynamicQuantizeMatMul"}


def ort_transformer_fusions(model: ir.Model, provider: str, log: Callable[[str], None], num_heads: int,
                            hidden_size: int) -> ir.Model:
    """onnxruntime.transformers' optimizer for norms, skip-norms, GELU and bias adds (its attention and rotary
    fusions are off: they do not match these exports and recipec's rules already ran). It is given the model's
    head count and width, which it asks for whatever it fuses, and what it prints or logs is captured: the
    warnings go to the build's log, named, and its chatter nowhere.

    Its GELU fusions index constants they assume are there: on a quantized graph QuickGelu takes the runtime
    dequantization scale for its alpha and raises, so quantized graphs go without them."""
    quantized = any(n.op_type in QUANTIZED_OPS for n in model.graph.all_nodes())
    if quantized:
        log("fuse: the input is already quantized; GELU fusions are skipped and less fuses (fuse before quantize)")
    light, aside = set_aside(model)
    said: list[str] = []
    try:
        with library_output(said):
            fused = optimize_model(light, model_type="gpt2", num_heads=num_heads, hidden_size=hidden_size, opt_level=0,
                                   optimization_options=_fusion_options(gelu=not quantized),
                                   use_gpu=provider == "cuda").model
    except Exception as exc:  # a library fusion tripping on an unexpected graph: say which, do not crash
        raise PassError(f"fuse: onnxruntime.transformers' optimizer failed on this graph ({type(exc).__name__}: "
                        f"{exc}); use level: basic") from exc
    finally:
        for line in said:
            if not any(pattern.search(line) for pattern in ORT_CHATTER):
                log(f"fuse: onnxruntime.transformers: {line}")
    del light
    result = ir.from_proto(fused)
    put_back(result, aside)
    _keep_inputs(model, result)
    return result


def _keep_inputs(original: ir.Model, fused: ir.Model) -> None:
    """The optimizer prunes graph inputs that nothing reads any more (position_ids, once rotary runs inside
    GroupQueryAttention). They stay: the graph's inputs are its contract, and a caller that feeds one would
    otherwise get onnxruntime's "invalid input name"."""
    kept = {v.name for v in fused.graph.inputs}
    for index, value in enumerate(original.graph.inputs):
        if value.name not in kept:
            fused.graph.inputs.insert(index, ir.Value(name=value.name, type=value.type, shape=value.shape))


# What onnxruntime.transformers says that tells the user nothing: the producer of a graph recipec made, and
# bookkeeping of its own clean-ups.
ORT_CHATTER = [re.compile(p) for p in (r"^Model producer not matched",
                                       r"^Removed \d+ initializers with duplicated value")]


@contextlib.contextmanager
def library_output(lines: list[str]) -> Iterator[None]:
    """Collect what a library says while the block runs: its log records of level WARNING and above (its
    loggers propagate to the root logger's handler added here; none of its INFO chatter passes their level),
    and what it prints to stdout, from Python or native code (file descriptor 1 goes to a temporary file).
    stderr stays: the build's own console draws there, and the library writes to it only through logging."""
    handler = _Collect(lines)
    root = logging.getLogger()
    root.addHandler(handler)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()) as printed:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            root.removeHandler(handler)
            sink.seek(0)
            text = printed.getvalue() + sink.read().decode(errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


class _Collect(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def io_types(model: ir.Model) -> dict[str, tuple]:
    """The (type, shape) of each graph input and output, for `restore_io_types`."""
    return {v.name: (v.type, v.shape) for v in [*model.graph.inputs, *model.graph.outputs]}


def restore_io_types(original: dict[str, tuple], fused: ir.Model) -> None:
    """Graph inputs/outputs get back the exporter's dim names: symbolic inference renames them
    ('total_sequence_length' -> 'past_sequence_length + sequence_length'), and artifact.json, the runtime
    and serving configs read those names."""
    for value in [*fused.graph.inputs, *fused.graph.outputs]:
        if value.name in original:
            value.type, value.shape = original[value.name]
