"""Decoder self-attention with a KV cache -> onnxruntime's GroupQueryAttention / MultiHeadAttention.

Hand-written onnxscript rewrite rules. onnxruntime.transformers' optimizer and onnxscript's ort_fusions do
not fire on TorchScript exports of llama-family decoders (their GQA rule expects the dynamo exporter's
mask construction and derives seqlens_k from position_ids), so recipec matches the eager attention that
transformers traces:

    q/k/v = Transpose(Reshape(x_proj))                       x_proj: [B, S, H*Dh]
    q, k  = q*cos + rotate_half(q)*sin                       (rotary families only)
    present_k = Concat(past_k, k); present_v = Concat(past_v, v)
    k, v  = repeat_kv(present_k / present_v)                 (only when kv heads < heads)
    out   = Reshape(Transpose(Softmax(q @ k^T * scale + mask) @ v))

and replaces it by RotaryEmbedding on the 3-D projections plus one attention op that keeps the graph's
contract: same inputs, present.* in BNSH with the same shapes. The exporter's own 4-D mask (causal and
padding, min-float where masked) is passed as `attention_bias`, and GroupQueryAttention gets
seqlens_k = total - 1 and query_seqlens = S for every row, so left padding and multi-token steps with a
past behave exactly as in the unfused graph (GQA alone would treat the cache as right-padded).

With `shared_buffer` (fuse's kv_buffer: shared) GroupQueryAttention instead takes its lengths the way
onnxruntime-genai's graphs do: seqlens_k = sum(attention_mask) - 1 per row and total = the mask's width, with
no attention_bias. Rows are then right-padded, each row writes its new keys at its own length, and the past
buffer may be longer than the sequence, so past and present can be one preallocated buffer written in place
(recipec.runtime.slots). Without padding both forms compute the same thing.

Rotary: GQA's built-in rotary derives positions from seqlens_k, which disagrees with transformers'
position_ids under left padding, so in the growing form rotary stays a separate RotaryEmbedding node fed with
the graph's own per-token cos/sin: cos [B,1,S,Dh] is flattened to a [B*S, Dh/2] cache indexed by row number.
That keeps any rope variant's exact values and needs no max-position table. In the shared form rows are
right-padded, where GQA's positions are the runtime's, so GQA rotates q and k itself (do_rotary) from tables
by position (recipec.onnx.fusions.rotary_table) wherever the graph's rope allows one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._matcher import SimplePatternMatcher

from recipec.onnx.fusions import _utils, rotary_table

MS = "com.microsoft"


def _heads(op, x_lin, tag: str):
    """[B, S, H*Dh] -> [B, H, S, Dh]; the Reshape target is computed from shapes in TorchScript exports."""
    bshd = op.Reshape(x_lin, pattern.ANY_VALUE, _outputs=[f"{tag}_bshd"])
    return op.Transpose(bshd, perm=[0, 2, 1, 3])


def _rotary(op, x, cos, sin, tag: str):
    """transformers' apply_rotary_pos_emb: x*cos + rotate_half(x)*sin, rotate_half = cat(-x2, x1)."""
    anys = [pattern.ANY_VALUE] * 4
    lo = op.Slice(x, *anys, _outputs=[f"{tag}_lo"])
    hi = op.Slice(x, *anys, _outputs=[f"{tag}_hi"])
    rotated = op.Concat(op.Neg(hi), lo, axis=-1)
    return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))


def _repeat_kv(op, x, tag: str):
    """transformers' repeat_kv: x[:, :, None].expand(B, Hkv, G, T, Dh).reshape(B, Hkv*G, T, Dh)."""
    expanded = op.Expand(op.Unsqueeze(x, [2]), pattern.ANY_VALUE)
    return op.Reshape(expanded, pattern.ANY_VALUE, _outputs=[f"{tag}_rep"])


class DecoderAttention(pattern.RewriteRuleClassBase):
    """One rule per (rotary?, repeat_kv?) variant; `kind` picks the replacement op."""

    def __init__(self, *, rotary: bool, repeat: bool, kind: str, shared_buffer: bool = False,
                 rotary_positions: int | None = None):
        super().__init__(f"DecoderAttention[rotary={rotary},repeat={repeat},{kind}]")
        self._rotary, self._repeat, self._kind = rotary, repeat, kind
        self._shared = shared_buffer
        self._rotary_positions = rotary_positions if shared_buffer and rotary else None
        self.applied: list[str] = []

    def pattern(self, op, q_lin, k_lin, v_lin, past_key, past_value, mask, scale, cos, sin):
        q, k, v = _heads(op, q_lin, "q"), _heads(op, k_lin, "k"), _heads(op, v_lin, "v")
        if self._rotary:
            q, k = _rotary(op, q, cos, sin, "q"), _rotary(op, k, cos, sin, "k")
        present_key = op.Concat(past_key, k, axis=-2)
        present_value = op.Concat(past_value, v, axis=-2)
        k_all, v_all = present_key, present_value
        if self._repeat:
            k_all, v_all = _repeat_kv(op, present_key, "k"), _repeat_kv(op, present_value, "v")
        scores = op.MatMul(q, op.Transpose(k_all, perm=[0, 1, 3, 2]))
        scaled = pattern.OrValue([op.Mul(scores, scale), op.Div(scores, scale)],
                                 tag_var="scale_is_divisor", tag_values=[False, True])
        probs = op.Softmax(op.Add(scaled, mask), _outputs=["probs"])
        context = op.Transpose(op.MatMul(probs, v_all), perm=[0, 2, 1, 3])
        out = op.Reshape(context, pattern.ANY_VALUE, _outputs=["out_bsd"])
        return out, present_key, present_value

    def check(self, context, q_bshd, k_bshd, v_bshd, past_key, scale, mask, probs, out_bsd, scale_is_divisor=False,
              cos=None, sin=None, q_lo=None, q_hi=None, k_lo=None, k_hi=None, k_rep=None, v_rep=None, **_):
        result = pattern.MatchResult()
        dims = _head_dims(q_bshd, k_bshd, v_bshd)
        if dims is None:
            return result.fail("head counts / head size not static", [q_bshd, k_bshd, v_bshd])
        heads, kv_heads, head_size = dims
        if (heads != kv_heads) != self._repeat or heads % kv_heads:
            return result.fail("repeat_kv does not match the head counts", [q_bshd, k_bshd])
        if self._repeat and not all(_dim(rep, 1) == heads for rep in (k_rep, v_rep)):
            return result.fail("repeat_kv does not produce one kv head per query head", [k_rep, v_rep])
        if self._kind == "MultiHeadAttention" and heads != kv_heads:
            return result.fail("MultiHeadAttention needs as many kv heads as heads", k_bshd)
        if probs.producer().attributes.get_int("axis", -1) not in (-1, 3):
            return result.fail("softmax is not over the key axis", probs)
        if past_key not in context.graph_or_function.inputs:
            return result.fail("past key is not a graph input", past_key)
        if mask.shape is None or mask.shape.rank() != 4 or mask.shape[1] != 1:
            return result.fail("attention mask is not [B, 1, S, T]", mask)
        if out_bsd.shape is None or out_bsd.shape.rank() not in (2, 3) or out_bsd.shape[-1] != heads * head_size:
            # onnxscript's optimizer may merge the output Reshape with a following [-1, D] one (GPT-2's Conv1D)
            return result.fail("attention output is not [B, S, H*Dh] or [B*S, H*Dh]", out_bsd)
        factor = _utils.scalar(scale)
        if factor is None or factor == 0:
            return result.fail("attention scale is not a constant scalar", scale)
        if self._rotary:
            half = head_size // 2
            for lo, hi in ((q_lo, q_hi), (k_lo, k_hi)):
                if not _utils.is_half_split(lo, hi, half):
                    return result.fail("rotate_half does not split the head in halves", [lo, hi])
            if not (_utils.is_duplicated_cos_sin(cos) and _utils.is_duplicated_cos_sin(sin)):
                return result.fail("cos/sin are not cat(freqs, freqs) per token", [cos, sin])
        self._heads_info = (heads, kv_heads, head_size, 1.0 / factor if scale_is_divisor else factor)
        self._length_sources = _length_sources(context.graph_or_function.inputs, past_key)
        if self._shared:
            self._mask_input = _graph_input(context.graph_or_function.inputs, "attention_mask", rank=2)
            if self._mask_input is None:
                return result.fail("a shared KV buffer needs the attention_mask [B, T] graph input", mask)
        self._tables = self._position_tables(context, cos, sin)
        self._flat_output = out_bsd.shape.rank() == 2
        return result

    def _position_tables(self, context, cos, sin) -> tuple[ir.Value, ir.Value] | None:
        if self._rotary_positions is None:
            return None
        graph = context.graph_or_function
        positions = _graph_input(graph.inputs, "position_ids", rank=2)
        if positions is None or not isinstance(graph, ir.Graph):
            return None
        return rotary_table.position_tables(context.model, graph, cos, sin, positions, self._rotary_positions)

    def rewrite(self, op, q_lin, k_lin, v_lin, past_key, past_value, mask, cos=None, sin=None, **_):
        heads, kv_heads, head_size, scale = self._heads_info
        out_shape, out_type = q_lin.shape, q_lin.type  # [B, S, H*Dh], as the attention output
        if self._rotary and self._tables is None:
            tokens, _ = self._length_sources
            cos2d, sin2d, positions = _rotary_cache(op, cos, sin, q_lin if tokens is None else tokens, head_size // 2)
            q_lin = op.RotaryEmbedding(q_lin, positions, cos2d, sin2d, _domain=MS)
            k_lin = op.RotaryEmbedding(k_lin, positions, cos2d, sin2d, _domain=MS)
            self.applied.append(self._kind + "+RotaryEmbedding")
        else:
            self.applied.append(self._kind + ("+rotary_in_attention" if self._rotary else ""))
        if self._kind == "MultiHeadAttention":
            out, present_key, present_value = op.MultiHeadAttention(
                q_lin, k_lin, v_lin, None, None, mask, past_key, past_value,
                num_heads=heads, scale=scale, _domain=MS, _outputs=3)
        elif self._shared:
            tokens, _ = self._length_sources
            seqlens_k, total, query_lens = _shared_buffer_lengths(op, self._mask_input,
                                                                  q_lin if tokens is None else tokens)
            cos_cache, sin_cache = self._tables or (None, None)
            out, present_key, present_value = op.GroupQueryAttention(
                q_lin, k_lin, v_lin, past_key, past_value, seqlens_k, total,
                cos_cache, sin_cache, None, None, None, None, None, None, None, query_lens,
                num_heads=heads, kv_num_heads=kv_heads, scale=scale, do_rotary=int(self._tables is not None),
                _domain=MS, _outputs=3)
        else:
            tokens, first_past_key = self._length_sources
            seqlens_k, total, query_lens = _gqa_lengths(op, q_lin if tokens is None else tokens,
                                                         past_key if first_past_key is None else first_past_key)
            out, present_key, present_value = op.GroupQueryAttention(
                q_lin, k_lin, v_lin, past_key, past_value, seqlens_k, total,
                None, None, None, mask, None, None, None, None, None, query_lens,
                num_heads=heads, kv_num_heads=kv_heads, scale=scale, _domain=MS, _outputs=3)
        out.shape, out.type = out_shape, out_type  # the Gemm unflattening after this reads it
        if self._flat_output:
            out = op.Reshape(out, op.Constant(value_ints=[-1, heads * head_size]))
        return out, present_key, present_value


def _dim(value: ir.Value | None, axis: int):
    return None if value is None or value.shape is None or value.shape.rank() <= axis else value.shape[axis]


def _head_dims(q_bshd: ir.Value, k_bshd: ir.Value, v_bshd: ir.Value) -> tuple[int, int, int] | None:
    shapes = [v.shape for v in (q_bshd, k_bshd, v_bshd)]
    if any(s is None or s.rank() != 4 for s in shapes):
        return None
    (_, _, heads, size), (_, _, kv_heads, k_size), (_, _, v_heads, v_size) = shapes
    ints = (heads, size, kv_heads, k_size, v_heads, v_size)
    if not all(isinstance(d, int) for d in ints) or size != k_size or size != v_size or kv_heads != v_heads:
        return None
    return heads, kv_heads, size


def _graph_input(inputs: Sequence[ir.Value], name: str, rank: int) -> ir.Value | None:
    value = next((v for v in inputs if v.name == name), None)
    return value if value is not None and value.shape is not None and value.shape.rank() == rank else None


def _length_sources(inputs: Sequence[ir.Value], past_key: ir.Value) -> tuple[ir.Value | None, ir.Value | None]:
    """Graph inputs that every layer can read its [B, S] and past length off: input_ids and the first past
    key of the same length. Lengths computed from them are the same nodes in every layer, which CSE merges
    into one set, instead of ~20 shape ops per layer that a decode step would run for nothing."""
    by_name = {v.name: v for v in inputs}
    tokens = by_name.get("input_ids")
    if tokens is None or tokens.shape is None or tokens.shape.rank() != 2:
        tokens = None
    past_length = _dim(past_key, 2)
    if past_length is None:
        return tokens, None
    first = next((v for v in inputs if v.name.startswith("past_key_values.") and v.shape is not None
                  and v.shape.rank() == 4 and _dim(v, 2) == past_length), None)
    return tokens, first


def _rotary_cache(op, cos, sin, q_lin, half: int):
    """Per-token cos/sin [Bc,1,S,Dh] -> caches [Bc*S, Dh/2] and position ids [B,S] = row numbers.
    `q_lin` only lends its first two dims [B, S] (input_ids does as well)."""
    def table(x):
        first_half = op.Slice(x, op.Constant(value_ints=[0]), op.Constant(value_ints=[half]),
                              op.Constant(value_ints=[3]))
        return op.Reshape(first_half, op.Constant(value_ints=[-1, half]))

    cos2d, sin2d = table(cos), table(sin)
    rows = op.Squeeze(op.Shape(cos2d, start=0, end=1))
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    cos_bs = op.Concat(op.Shape(cos, start=0, end=1), op.Shape(cos, start=2, end=3), axis=0)
    positions = op.Reshape(op.Range(zero, rows, one), cos_bs)
    positions = op.Expand(positions, op.Shape(q_lin, start=0, end=2))
    return cos2d, sin2d, positions


def _gqa_lengths(op, q_lin, past_key):
    """GQA's length inputs from shapes: every row holds past+S slots; the mask carries the padding.
    `q_lin` only lends [B, S] and `past_key` its length: any layer's (or input_ids) give the same."""
    batch = op.Shape(q_lin, start=0, end=1)
    new = op.Shape(q_lin, start=1, end=2)
    total = op.Add(op.Shape(past_key, start=2, end=3), new)
    one = op.Constant(value_ints=[1])
    seqlens_k = op.Expand(op.Cast(op.Sub(total, one), to=ir.DataType.INT32), batch)
    query_lens = op.Expand(op.Cast(new, to=ir.DataType.INT32), batch)
    total_scalar = op.Cast(op.Reshape(total, op.Constant(value=ir.tensor(np.zeros(0, np.int64)))), to=ir.DataType.INT32)
    return seqlens_k, total_scalar, query_lens


def _shared_buffer_lengths(op, attention_mask, q_lin):
    """onnxruntime-genai's convention for a shared past/present buffer: rows are right-padded, so row b holds
    sum(mask[b]) tokens and writes its new ones at that offset; total is the mask's width. The past buffer
    may be longer than total (preallocated), which is what lets present alias past. query_seqlens = S for
    every row (each row's S new tokens are all real) is what lets a step of several tokens after a past run
    at batch > 1: speculative verification of a whole batch (recipec.runtime.slots). `q_lin` only lends
    [B, S]: input_ids, which every layer shares, makes these nodes one set after CSE."""
    lengths = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)
    seqlens_k = op.Cast(op.Sub(lengths, op.Constant(value_int=1)), to=ir.DataType.INT32)
    width = op.Shape(attention_mask, start=1, end=2)
    total = op.Cast(op.Reshape(width, op.Constant(value=ir.tensor(np.zeros(0, np.int64)))), to=ir.DataType.INT32)
    query_lens = op.Expand(op.Cast(op.Shape(q_lin, start=1, end=2), to=ir.DataType.INT32),
                           op.Shape(q_lin, start=0, end=1))
    return seqlens_k, total, query_lens


def attention_rules(kind: str, shared_buffer: bool = False, rotary_positions: int | None = None) -> list[DecoderAttention]:
    """kind: 'GroupQueryAttention' or 'MultiHeadAttention' (the latter only matches kv heads == heads);
    shared_buffer (GroupQueryAttention only): lengths from the attention mask, right-padded rows, no bias;
    rotary_positions (with shared_buffer): rotary inside GroupQueryAttention, from a table of that many
    positions, where the graph's cos/sin allow one (recipec.onnx.fusions.rotary_table)."""
    return [DecoderAttention(rotary=r, repeat=p, kind=kind, shared_buffer=shared_buffer,
                             rotary_positions=rotary_positions)
            for r in (True, False) for p in (True, False)]


def fuse_attention(model: ir.Model, kind: str, shared_buffer: bool = False,
                   rotary_positions: int | None = None) -> list[str]:
    """Apply the rules; returns one entry per fused layer (e.g. 'GroupQueryAttention+RotaryEmbedding')."""
    instances = attention_rules(kind, shared_buffer, rotary_positions)
    rules = pattern.RewriteRuleSet([_rule_of(i) for i in instances])
    rules.apply_to_model(model)
    return [name for inst in instances for name in inst.applied]


class _AnchoredMatcher(SimplePatternMatcher):
    """Matches a multi-output pattern whose other outputs (present_k, present_v) are reached while matching
    the first: their nodes are read off that match. onnxscript's matcher instead tries every combination of
    same-type nodes (every Concat pair, re-matching the whole attention each time): 30 s for a 24-layer
    llama, against well under a second this way."""

    def match(self, model, graph_or_function, node, *, verbose=0, remove_nodes=True, tracer=None):
        if self.pattern.has_single_output_node:
            return super().match(model, graph_or_function, node, verbose=verbose, remove_nodes=remove_nodes,
                                 tracer=tracer)
        self._tracer = tracer
        self._graph = graph_or_function if isinstance(graph_or_function, ir.Graph) else graph_or_function.graph
        self._init_match(verbose)
        if not self._match_node(self.pattern.output_nodes[0], node):
            return self._match
        others = [self._match.lookup_node(p) for p in self.pattern.output_nodes[1:]]
        if any(other is None for other in others):
            return self._match.fail("an output of the pattern is not reached from its first output")
        self._init_match(verbose)
        return self._multi_match([node, *others], check_removable=remove_nodes)


def _rule_of(instance: DecoderAttention) -> pattern.RewriteRule:
    return pattern.RewriteRule(instance.pattern, instance.rewrite, instance.check, matcher=_AnchoredMatcher,
                               name=instance.name, remove_nodes=instance.remove_nodes)


__all__: Sequence[str] = ["fuse_attention", "attention_rules", "DecoderAttention"]
