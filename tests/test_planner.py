"""The planner's rules: order, implicit exports, variants, and cache keys."""
from __future__ import annotations

import textwrap

import pytest
from conftest import RECIPE_HEAD

from recipec.passes import PASSES
from recipec.plan.planner import build_plan
from recipec.recipe.loader import load_recipe

needs_onnx_ops = pytest.mark.skipif(not {"fuse", "quantize"} <= set(PASSES), reason="fuse/quantize not registered")


def plan_of(tmp_path, passes: str = "", extra: str = ""):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE_HEAD + textwrap.dedent(passes) + textwrap.dedent(extra))
    return build_plan(load_recipe(path))


def test_no_passes_gives_the_baseline_variant(tmp_path):
    plan = plan_of(tmp_path)
    assert plan.order == ["source", "baseline"]
    assert plan.variants == {"baseline": "baseline"}
    assert plan.stage("baseline").implicit and plan.stage("baseline").op == "export"


def test_explicit_export_is_its_own_variant_beside_baseline(tmp_path):
    plan = plan_of(tmp_path, "passes:\n  - {id: ex, op: export, with: {opset: 17}}\n")
    assert set(plan.variants) == {"baseline", "ex"}
    assert plan.stage("ex").parents == ["source"]


@needs_onnx_ops
def test_implicit_export_is_inserted_before_onnx_stages_and_branches_share_it(tmp_path):
    plan = plan_of(tmp_path, """\
        passes:
          - {id: fuse, op: fuse}
          - {id: int4, op: quantize, with: {scheme: int4}}
          - {id: int8, op: quantize, after: fuse, with: {scheme: int8-dynamic}}
        """)
    assert plan.stage("fuse").parents == ["baseline"]
    assert plan.variants == {"baseline": "baseline", "int4": "int4", "int8": "int8"}
    assert plan.order.index("fuse") < plan.order.index("int4") and plan.order.index("fuse") < plan.order.index("int8")
    assert [s.id for s in plan.stages if s.op == "export"] == ["baseline"]


@needs_onnx_ops
def test_quantize_before_fuse_warns_with_the_reason(tmp_path):
    plan = plan_of(tmp_path, """\
        passes:
          - {id: q, op: quantize, with: {scheme: int8-dynamic}}
          - {id: f, op: fuse}
        """)
    assert plan.warnings and "fuse first, then quantize" in plan.warnings[0]


def test_order_is_deterministic_and_follows_declaration(tmp_path):
    text = """\
        passes:
          - {id: b, op: export, after: source, with: {opset: 17}}
          - {id: a, op: export, after: source, with: {opset: 18}}
        """
    first = plan_of(tmp_path, text)
    second = plan_of(tmp_path, text)
    assert first.order == second.order == ["source", "b", "a", "baseline"]


def test_cache_keys_chain_through_parents(tmp_path):
    base = plan_of(tmp_path, "passes:\n  - {id: ex, op: export, with: {opset: 17}}\n")
    changed_param = plan_of(tmp_path, "passes:\n  - {id: ex, op: export, with: {opset: 18}}\n")
    assert base.stage("ex").key != changed_param.stage("ex").key
    assert base.stage("source").key == changed_param.stage("source").key
    assert base.stage("baseline").key == changed_param.stage("baseline").key
    assert plan_of(tmp_path, "passes:\n  - {id: ex, op: export, with: {opset: 17}}\n").stage("ex").key == base.stage("ex").key


def test_model_change_changes_every_key(tmp_path):
    a = plan_of(tmp_path)
    path = tmp_path / "r2.yaml"
    path.write_text(RECIPE_HEAD.replace("hidden_size: 32", "hidden_size: 48"))
    b = build_plan(load_recipe(path))
    assert all(a.stage(s).key != b.stage(s).key for s in a.order)


def test_library_versions_enter_the_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE_HEAD)
    recipe = load_recipe(path)
    assert build_plan(recipe, {"onnx": "1"}).stage("baseline").key != build_plan(recipe, {"onnx": "2"}).stage("baseline").key


def test_plan_formats(tmp_path):
    plan = plan_of(tmp_path, "passes:\n  - {id: ex, op: export}\n")
    as_json = plan.to_json({s: False for s in plan.order})
    assert [s["id"] for s in as_json["stages"]] == plan.order
    assert as_json["variants"]["baseline"] == "baseline"
    assert plan.to_dot().startswith('digraph "tiny"') and '"source" -> "baseline"' in plan.to_dot()


def _code_digests(tmp_path, monkeypatch):
    """A copy of the package to edit, and a function giving each op's code digest over that copy."""
    import shutil

    from recipec.plan import code_digest

    copy = tmp_path / "recipec"
    shutil.copytree(code_digest.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(code_digest, "PACKAGE_DIR", copy)
    modules = {op: p.apply.__module__ for op, p in PASSES.items()} | {"source": code_digest.MODELS_MODULE}

    def digests():
        code_digest.code_digest.cache_clear()
        return {op: code_digest.code_digest(module) for op, module in modules.items()}

    yield copy, digests
    code_digest.code_digest.cache_clear()


def _edited(digests, path) -> set[str]:
    before = digests()
    with open(path, "a") as f:
        f.write("\n# an edit\n")
    after = digests()
    return {op for op in before if after[op] != before[op]}


def test_editing_the_code_a_pass_runs_changes_its_key_and_only_its_key(tmp_path, monkeypatch):
    """A stage's key covers the recipec modules its op imports (transitively), so an edited pass is rebuilt,
    not served stale from the cache, while ops that never import the edited file keep their keys."""
    for copy, digests in _code_digests(tmp_path, monkeypatch):
        assert _edited(digests, copy / "onnx" / "fusions" / "attention.py") == {"fuse"}


def test_torch_pass_keys_do_not_cover_the_corpus_or_pretraining(tmp_path, monkeypatch):
    """Editing the corpus reader or pretraining rebuilds the source model (which they make), not the torch
    passes, which only read the model and the data windows."""
    for copy, digests in _code_digests(tmp_path, monkeypatch):
        assert _edited(digests, copy / "source" / "pretrain.py") == {"source"}
        assert _edited(digests, copy / "source" / "corpus.py") == {"source"}
