"""Node placement: onnxruntime's profiling trace parsed into {provider: {op: nodes}}, the CPU-fallback rule as a
pure function, the recipe field that allows fallback, the report's placement block, and a profile that fails
on fallback the recipe does not allow."""
from __future__ import annotations

import copy

import pytest
from conftest import RECIPE_HEAD

from recipec.errors import PassError, RecipeInvalid
from recipec.onnx.placement import (CPU, CUDA, fallback_ops, is_fallback, measure_placement, provider_counts,
                                    summarize, trace_nodes)
from recipec.plan.planner import load_plan
from recipec.profile import profiler
from recipec.profile.markdown import render_markdown
from recipec.profile.report import validate_report

from test_report import report  # noqa: F401  (the module fixture: a valid report of two fake variants)


def _event(name: str, op: str, provider: str, inputs=({"float": [1, 4]},), cat: str = "Node") -> dict:
    return {"cat": cat, "name": f"{name}_kernel_time", "ph": "X", "dur": 1, "ts": 0,
            "args": {"op_name": op, "provider": provider, "input_type_shape": list(inputs)}}


def test_a_real_cpu_trace_counts_each_node_once_and_has_no_fallback(exported):
    variant_dir, _ = exported("llama")
    placement = measure_placement(variant_dir / "model.onnx", "cpu")
    assert set(placement["providers"]) == {CPU} and placement["requested_provider"] == CPU
    ops = placement["providers"][CPU]
    # two layers: q, k, v, o, gate, up, down projections each, plus the LM head (fused or not, at least these)
    assert sum(n for op, n in ops.items() if "MatMul" in op or op == "Gemm") >= 2 * 7 + 1
    assert ops.get("Shape", 0) > 0  # shape computations run too, and are never fallback
    assert placement["fallback_ops"] == [] and placement["fallback_nodes"] == 0


def test_the_real_trace_has_the_fields_the_parser_reads(exported, tmp_path):
    """The prefill and the decode step run the same nodes: the trace has two events per node, counted once."""
    import json

    from recipec.onnx.placement import _prefill_and_decode
    from recipec.onnx.sessions import session

    variant_dir, _ = exported("llama")
    sess = session(variant_dir / "model.onnx", "cpu", profile_prefix=tmp_path / "ort")
    _prefill_and_decode(sess)
    events = json.loads(open(sess.end_profiling()).read())
    kernels = [e for e in events if e["cat"] == "Node" and e["name"].endswith("_kernel_time")]
    assert kernels and all({"op_name", "provider"} <= set(e["args"]) for e in kernels)
    nodes = trace_nodes(events)
    assert len(kernels) == 2 * len(nodes)


def test_trace_nodes_keeps_kernel_events_only_and_flags_half_precision_inputs():
    events = [{"cat": "Session", "name": "model_run", "args": {}},
              _event("a", "MatMul", CUDA), _event("a", "MatMul", CUDA),
              {"cat": "Node", "name": "a_fence_before", "args": {"op_name": "MatMul"}},
              _event("cast", "Cast", CPU, inputs=({"float16": [1, 4]},)),
              _event("shape", "Shape", CPU, inputs=())]
    nodes = trace_nodes(events)
    assert set(nodes) == {"a", "cast", "shape"}
    assert nodes["cast"]["half_input"] and not nodes["shape"]["half_input"]
    assert provider_counts(nodes) == {CPU: {"Cast": 1, "Shape": 1}, CUDA: {"MatMul": 1}}


@pytest.mark.parametrize("op, provider, device, half, expected", [
    ("DynamicQuantizeMatMul", CPU, "cuda", False, True),   # no CUDA kernel at all
    ("GroupQueryAttention", CPU, "cuda", False, True),     # the CUDA kernel is float16/bfloat16 only
    ("Shape", CPU, "cuda", False, False),                  # the CUDA provider's own choice for shape math
    ("Gather", CPU, "cuda", False, False),
    ("MatMul", CPU, "cuda", False, False),                 # the rotary-frequency product on CPU-side values
    ("Cast", CPU, "cuda", True, True),                     # the CPU is never preferred for half precision
    ("MemcpyToHost", CUDA, "cuda", False, False),
    ("DynamicQuantizeMatMul", CPU, "cpu", False, False),   # on device cpu, the CPU is what was asked for
])
def test_the_fallback_rule(op, provider, device, half, expected):
    assert is_fallback(op, provider, device, half) is expected


def test_fallback_ops_over_a_placement_dict():
    providers = {CUDA: {"MatMul": 12, "MemcpyFromHost": 2, "Softmax": 2},
                 CPU: {"DynamicQuantizeMatMul": 14, "Shape": 6, "Gather": 4, "Cast": 2}}
    assert fallback_ops(providers, "cuda") == ["DynamicQuantizeMatMul"]
    assert fallback_ops(providers, "cuda", half_input_ops=["Cast"]) == ["Cast", "DynamicQuantizeMatMul"]
    assert fallback_ops(providers, "cpu") == []
    assert fallback_ops({CPU: {"Shape": 3, "Concat": 2}}, "cuda") == []


def test_summarize_counts_fallen_nodes():
    nodes = trace_nodes([_event("q", "GroupQueryAttention", CPU), _event("k", "GroupQueryAttention", CPU),
                         _event("m", "MatMulNBits", CUDA), _event("s", "Shape", CPU)])
    block = summarize(nodes, "cuda")
    assert block["fallback_ops"] == ["GroupQueryAttention"] and block["fallback_nodes"] == 2
    assert block["requested_provider"] == CUDA and block["providers"][CPU] == {"GroupQueryAttention": 2, "Shape": 1}


def _placement(ops: list[str], allowed: bool) -> dict:
    return {"device": "cuda", "requested_provider": CUDA, "fallback_ops": ops, "fallback_nodes": 2 * len(ops),
            "providers": {CUDA: {"MatMul": 4}, CPU: {op: 2 for op in ops}}, "allowed": allowed, "source": "test"}


def test_check_placement_fails_a_variant_with_fallback_the_recipe_does_not_allow():
    with pytest.raises(PassError) as caught:
        profiler.check_placement("int8", _placement(["DynamicQuantizeMatMul"], allowed=False))
    message = str(caught.value)
    assert "variant int8" in message and "DynamicQuantizeMatMul" in message
    assert "serving.allow_cpu_fallback: true" in message
    profiler.check_placement("int8", _placement(["DynamicQuantizeMatMul"], allowed=True))
    profiler.check_placement("baseline", _placement([], allowed=False))


def test_profile_variant_fails_when_fallback_is_not_allowed(monkeypatch, tmp_path, exported):
    variant_dir, _ = exported("llama")
    seen = {}

    def fake_serve(directory, device, runs, threads, log, allowed):
        seen["allowed"] = allowed
        return {"placement": {k: v for k, v in _placement(["GroupQueryAttention"], False).items() if k != "allowed"},
                "load_seconds": None, "runs": []}

    monkeypatch.setattr(profiler, "serve_isolated", fake_serve)
    with pytest.raises(PassError, match="GroupQueryAttention"):
        profiler.profile_variant(variant_dir, {"workload": {"requests": 1}}, "cpu")
    assert seen["allowed"] is False


def test_serve_runs_skips_the_runs_when_fallback_is_not_allowed(monkeypatch, exported):
    import recipec.onnx.placement as placement

    variant_dir, _ = exported("llama")
    monkeypatch.setattr(placement, "measure_placement", lambda *a: _placement(["MatMulInteger"], False))
    monkeypatch.setattr(profiler, "load_model", lambda *a: pytest.fail("the model was loaded for skipped runs"))
    result = profiler.serve_runs(variant_dir, "cpu", [{"batching": "static"}], allow_cpu_fallback=False)
    assert result["runs"] == [] and result["placement"]["fallback_ops"] == ["MatMulInteger"]


def test_the_recipe_field_defaults_false_and_must_be_a_boolean(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE_HEAD)
    assert load_plan(path, with_keys=False).recipe.resolved["serving"]["allow_cpu_fallback"] is False
    path.write_text(RECIPE_HEAD + "serving:\n  device: cuda\n  allow_cpu_fallback: true\n")
    assert load_plan(path, with_keys=False).recipe.resolved["serving"]["allow_cpu_fallback"] is True
    path.write_text(RECIPE_HEAD + "serving:\n  allow_cpu_fallback: sometimes\n")
    with pytest.raises(RecipeInvalid) as caught:
        load_plan(path, with_keys=False)
    assert any("allow_cpu_fallback" in m for m in caught.value.messages())


def test_the_report_schema_takes_the_placement_block_and_report_md_shows_fallback(report):  # noqa: F811
    report = copy.deepcopy(report)
    report["variants"]["baseline"]["placement"] = {**_placement([], False), "device": "cpu",
                                                   "requested_provider": CPU, "providers": {CPU: {"MatMul": 15}}}
    validate_report(report)
    assert "## CPU fallback" not in render_markdown(report)
    report["variants"]["int4"]["placement"] = _placement(["DynamicQuantizeMatMul"], True)
    validate_report(report)
    md = render_markdown(report)
    assert "## CPU fallback" in md and "| **int4** | cuda | DynamicQuantizeMatMul | 2 | yes |" in md
    report["variants"]["int4"]["placement"]["providers"] = {CPU: {"Shape": -1}}
    with pytest.raises(Exception, match="-1"):
        validate_report(report)
