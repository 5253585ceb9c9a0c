"""The fuse pass's graph work: recipec's rewrite rules, then onnxruntime.transformers' fusions.

Order matters. Shapes are inferred and shape arithmetic folded first, so the attention rules see static
head counts and no stray Shape consumers; recipec's rules run before onnxruntime.transformers' optimizer,
whose output no longer carries the inferred shapes the rules check; projections are merged after GPT-2's
Gemms became MatMuls, so its fused c_attn is left alone and llama's q/k/v and gate/up are merged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model
from onnxscript import rewriter as onnxscript_rewriter
from onnxscript.optimizer import fold_constants_ir

from recipec.errors import PassError
from recipec.onnx.fusions import attention, gemm, qkv, shapes

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


def clean(model: ir.Model) -> None:
    """What onnxscript.optimizer.optimize does (constant folding and its default rewrite rules, twice; dead
    code, lifted and deduplicated constants, CSE) minus the quadratic rule, then the exporter's names back
    on the projections: a rule that re-creates a node names it node_<Op>_<n> (a GPT-2 Gemm whose zero bias
    is dropped becomes node_Gemm_20), and node names are what quantize's `exclude` globs match."""
    owners = _weight_owners(model)
    for _ in range(2):
        fold_constants_ir(model, onnx_shape_inference=True)
        onnxscript_rewriter.rewrite(model, pattern_rewrite_rules=_single_output_rules())
    ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
    )(model)
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None:
            node.name = owners.get(node.inputs[1].name, node.name)


def detach_overridable(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers that are also graph inputs (the exporter's logits_to_keep) become plain inputs while
    recipec works on the graph: onnxscript's folding reads an initializer's value even when a caller may
    override it, and folded Sub(n, logits_to_keep) into n. `reattach` restores them."""
    inputs = {v.name for v in proto.graph.input}
    saved = {t.name: t for t in proto.graph.initializer if t.name in inputs}
    kept = [t for t in proto.graph.initializer if t.name not in saved]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return saved


def reattach(model: ir.Model, saved: dict[str, onnx.TensorProto]) -> None:
    for value in model.graph.inputs:
        if value.name in saved:
            value.const_value = ir.serde.deserialize_tensor(saved[value.name])
            model.graph.register_initializer(value)


def prepare(proto: onnx.ModelProto, report: FusionReport) -> ir.Model:
    """Symbolic shapes, folded shape arithmetic, constant folding and dead-code removal."""
    model = ir.from_proto(shapes.infer_shapes(proto))
    for kind, count in shapes.fold_shape_gathers(model).items():
        report.add(f"shape_gathers_to_{kind}", count)
    clean(model)
    return model


def fuse_attention(model: ir.Model, choice: str, report: FusionReport, log: Callable[[str], None]) -> None:
    if choice == "none":
        return
    kinds = [ATTENTION_OPS[choice]] if choice in ATTENTION_OPS else ["MultiHeadAttention", "GroupQueryAttention"]
    for kind in kinds:  # auto: MHA where kv heads == heads, GQA for the rest
        for name in attention.fuse_attention(model, kind):
            for op in name.split("+"):
                report.add(op, 2 if op == "RotaryEmbedding" else 1)
    clean(model)
    if not any(op in report.applied for op in ATTENTION_OPS.values()):
        log("fuse: no attention block matched; attention stays unfused")


def unflatten_gemms(model: ir.Model, report: FusionReport) -> None:
    report.add("gemm_to_3d_matmul", gemm.unflatten_gemms(model))
    clean(model)


def merge_projections(model: ir.Model, report: FusionReport) -> None:
    report.add("merged_matmul_groups", qkv.merge_sibling_matmuls(model))
    clean(model)


def _fusion_options(gelu: bool) -> FusionOptions:
    options = FusionOptions("gpt2")
    options.enable_attention = False
    options.enable_rotary_embeddings = False
    options.enable_embed_layer_norm = False
    options.enable_gelu = options.enable_bias_gelu = gelu
    return options


QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QuantizeLinear", "MatMulNBits", "DynamicQuantizeMatMul"}


def ort_transformer_fusions(proto: onnx.ModelProto, provider: str, log: Callable[[str], None]) -> onnx.ModelProto:
    """onnxruntime.transformers' optimizer for norms, skip-norms, GELU and bias adds (its attention and rotary
    fusions are off: they do not match these exports and recipec's rules already ran).

    Its GELU fusions index constants they assume are there: on a quantized graph QuickGelu takes the runtime
    dequantization scale for its alpha and raises, so quantized graphs go without them."""
    quantized = any(n.op_type in QUANTIZED_OPS for n in proto.graph.node)
    if quantized:
        log("fuse: the input is already quantized; GELU fusions are skipped and less fuses (fuse before quantize)")
    try:
        return optimize_model(proto, model_type="gpt2", num_heads=0, hidden_size=0, opt_level=0,
                              optimization_options=_fusion_options(gelu=not quantized),
                              use_gpu=provider == "cuda").model
    except Exception as exc:  # a library fusion tripping on an unexpected graph: say which, do not crash
        raise PassError(f"fuse: onnxruntime.transformers' optimizer failed on this graph ({type(exc).__name__}: "
                        f"{exc}); use level: basic") from exc


def restore_io_types(original: onnx.ModelProto, fused: onnx.ModelProto) -> None:
    """Graph inputs/outputs get back the exporter's dim names: symbolic inference renames them
    ('total_sequence_length' -> 'past_sequence_length + sequence_length'), and artifact.json, the runtime
    and serving configs read those names."""
    types = {v.name: v.type for v in list(original.graph.input) + list(original.graph.output)}
    for value in list(fused.graph.input) + list(fused.graph.output):
        if value.name in types:
            value.type.CopyFrom(types[value.name])
