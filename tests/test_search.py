"""Search: the recipe language, the plan's shared prefixes, grid and TPE builds, the report's search block."""
from __future__ import annotations

import json
import os
import re

import pytest
from test_build import recipec

from recipec.errors import RecipeInvalid
from recipec.plan.planner import load_plan
from recipec.plan.search import Dim, concrete_id
from recipec.profile.report import validate_report
from recipec.profile.search import pareto, search_block

MODEL = """\
recipe: 1
name: {name}
model:
  source: synthetic
  family: llama
  config: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 128}}
data:
  eval: {{samples: 2, seq_len: 16}}
  calibration: {{samples: 2, seq_len: 16}}
serving:
  batching: {{policy: continuous, max_batch_size: 2}}
  workload: {{prompt_tokens: 8, output_tokens: 3, requests: 2, warmup_requests: 1, concurrency: [1]}}
"""
PASSES = """\
passes:
  - {id: fused, op: fuse, emit: true}
  - id: q
    op: quantize
    with: {scheme: {search: [int8-dynamic, int4]}, min_top1: 0}
  - id: q4
    op: quantize
    after: fused
    with: {scheme: int4, block_size: {search: [32, 64]}, min_top1: 0}
"""
SEARCH = """\
search:
  strategy: {strategy}
  max_trials: {max_trials}
  objective: {{minimize: tpot_ms.p50}}
  constraints: [{{metric: kl_divergence, max: {max_kl}}}]
"""


def write(tmp_path, passes=PASSES, search=SEARCH, name="s", **fields):
    values = {"strategy": "grid", "max_trials": 16, "max_kl": 0.05, **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(MODEL.format(name=name) + passes + (search.format(**values) if search else ""))
    return path


def problems(path) -> list[str]:
    with pytest.raises(RecipeInvalid) as caught:
        load_plan(path)
    return caught.value.messages()


def test_the_plan_shares_every_prefix_and_names_trials_readably(tmp_path):
    plan = load_plan(write(tmp_path))
    ops = [s.op for s in plan.stages]
    assert ops.count("fuse") == 1 and ops.count("export") == 1  # one fuse stage for all four quantize trials
    assert sorted(plan.variants) == ["baseline", "fused", "q.scheme=int4", "q.scheme=int8-dynamic",
                                     "q4.block_size=32", "q4.block_size=64"]
    assert all(plan.stage(plan.variants[v]).parents == ["fused"] for v in plan.variants if v.startswith("q"))
    summary = plan.to_json()["search"]
    assert summary["space_size"] == 4 and summary["shared_stages"] == ["source", "baseline", "fused"]
    # the same stage in two plans gets the same key: trials hit the cache of the stages they share
    keys = {s.id: s.key for s in plan.stages}
    again = {s.id: s.key for s in load_plan(write(tmp_path, max_trials=2)).stages}
    assert all(keys[k] == v for k, v in again.items())


def test_grid_respects_max_trials_and_plan_says_what_is_not_tried(tmp_path):
    plan = load_plan(write(tmp_path, max_trials=3))
    assert len(plan.trials) == 3
    env = {**os.environ, "RECIPEC_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    out = recipec("plan", str(write(tmp_path, max_trials=3)), env=env)
    assert out.returncode == 0, out.stderr
    assert "shared by every trial, built once: source, baseline, fused" in out.stdout
    assert "3 trials planned (1 beyond max_trials not tried)" in out.stdout


def test_a_searched_ancestor_multiplies_its_descendants_only(tmp_path):
    passes = """\
passes:
  - id: pruned
    op: prune
    with: {target: mlp, amount: {search: {low: 0.25, high: 0.5, step: 0.25}}}
  - {id: q, op: quantize, with: {scheme: int4, min_top1: 0}}
  - {id: other, op: fuse, after: source}
"""
    plan = load_plan(write(tmp_path, passes=passes))
    assert sorted(plan.variants) == ["baseline", "other", "q.pruned.amount=0.25", "q.pruned.amount=0.5"]
    assert plan.stage("q.pruned.amount=0.5").parents == ["pruned.amount=0.5-export"]
    assert plan.stage("pruned.amount=0.5").params["amount"] == 0.5


REJECTED = {
    "an empty choice list": ("block_size: {search: []}", r":\d+:\d+: passes\[2\]\.with\.block_size\.search.*(empty|short)"),
    "a choice outside the schema": ("block_size: {search: [32, 7]}", r"passes\[2\]\.with\.block_size\.search\[1\]: unknown value 7"),
    "a typo'd choice": ("scheme: {search: [int4, int5]}", r"passes\[2\]\.with\.scheme\.search\[1\]: unknown value 'int5'"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_bad_choices_are_rejected_at_their_position(tmp_path, case):
    replacement, pattern = REJECTED[case]
    passes = PASSES.replace("block_size: {search: [32, 64]}", replacement) if "block" in replacement else \
        PASSES.replace("scheme: int4, block_size: {search: [32, 64]}", replacement + ", block_size: 32")
    found = problems(write(tmp_path, passes=passes))
    assert any(re.search(pattern, f) for f in found), found


def test_bad_search_blocks_are_rejected_with_positions(tmp_path):
    unknown = SEARCH.replace("tpot_ms.p50", "tpot_ms.p51")
    assert any(re.search(r"search\.objective\.minimize: unknown metric 'tpot_ms.p51'", f)
               for f in problems(write(tmp_path, search=unknown)))
    plain = "passes:\n  - {id: q, op: quantize, with: {scheme: int4}}\n"
    assert any(re.search(r":\d+:\d+: search: the search block has nothing to search", f)
               for f in problems(write(tmp_path, passes=plain)))
    assert any("needs a top-level `search:` block" in f for f in problems(write(tmp_path, search="")))
    ranged = PASSES.replace("block_size: {search: [32, 64]}", "block_size: {search: {low: 32, high: 64}}")
    assert any("grid search needs a `step`" in f for f in problems(write(tmp_path, passes=ranged)))
    level = SEARCH + "  concurrency: 4\n"
    assert any("does not measure closed-loop concurrency 4" in f for f in problems(write(tmp_path, search=level)))


def test_concrete_ids_and_range_values():
    assert concrete_id("q4", [("q4.block_size", 32), ("pruned.amount", 0.2)]) == "q4.block_size=32,pruned.amount=0.2"
    assert concrete_id("q", [("q.accuracy_level", None), ("q.symmetric", True)]) == "q.accuracy_level=null,symmetric=true"
    assert Dim("p", "amount", (), low=0.1, high=0.5, step=0.1).grid() == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert Dim("q", "block_size", (), low=16, high=64, step=16, integer=True).grid() == [16, 32, 48, 64]


def test_pareto_front_by_hand():
    points = {"a": (0.0, 10.0), "b": (0.1, 5.0), "c": (0.2, 6.0), "d": (0.1, 5.0), "e": (0.3, 1.0)}
    assert pareto(points) == {"a", "b", "d", "e"}  # c is beaten by b on both; b and d tie, neither dominates


def _entry(kl: float, tpot: float) -> dict:
    run = {"batching": "continuous", "concurrency": 1, "tpot_ms": {"p50": tpot}}
    return {"artifact": {"path": "x", "bytes": 1, "parameters": 1}, "quality": {"kl_divergence": kl}, "serving": [run]}


def test_search_block_feasibility_and_recommendation():
    spec = {"strategy": "grid", "objective": {"minimize": "tpot_ms.p50"}, "concurrency": 1,
            "constraints": [{"metric": "kl_divergence", "max": 0.05}]}
    variants = {"baseline": _entry(0.0, 10.0), "fast": _entry(0.04, 4.0), "faster": _entry(0.2, 3.0),
                "pruned": {**_entry(0.5, 1.0), "serving": []}}
    trials = [{"variant": "fast", "params": {"q.x": 1}, "pruned": None},
              {"variant": "faster", "params": {"q.x": 2}, "pruned": None},
              {"variant": "pruned", "params": {"q.x": 3}, "pruned": "pruned by constraint kl_divergence"}]
    block = search_block(spec, trials, variants, {"space_size": 3, "tried": 3, "count": 0})
    rows = {t["variant"]: t for t in block["trials"]}
    assert block["recommended"] == "fast"  # faster breaks the KL constraint
    assert [rows[v]["feasible"] for v in ("fast", "faster", "pruned", "baseline")] == [True, False, False, True]
    assert {v for v, t in rows.items() if t["pareto"]} == {"fast", "faster", "baseline"}
    assert rows["pruned"]["metrics"]["objective"] is None and rows["faster"]["metrics"]["objective"] == 3.0
    maximize = {**spec, "objective": {"maximize": "tpot_ms.p50"}}
    assert search_block(maximize, trials, variants, {})["recommended"] == "baseline"


@pytest.fixture(scope="module")
def grid_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    env = {**os.environ, "RECIPEC_CACHE": str(tmp / "cache"), "COLUMNS": "200"}
    recipe = write(tmp, name="grid", max_kl="0.00001")  # int4 (KL 1.1e-4 on this model) breaks it, int8 (1.5e-6) does not
    result = recipec("build", str(recipe), "--out", str(tmp / "out"), env=env)
    return tmp, env, result


def test_grid_build_writes_the_search_block_plot_and_projections(grid_build):
    tmp, _, result = grid_build
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp / "out/grid/report.json").read_text())
    validate_report(report)
    search = report["search"]
    trials = {t["variant"]: t for t in search["trials"]}
    assert set(trials) == {"q.scheme=int8-dynamic", "q.scheme=int4", "q4.block_size=32", "q4.block_size=64",
                           "baseline", "fused"}
    for name in ("q.scheme=int4", "q4.block_size=32", "q4.block_size=64"):  # broke the quality constraint
        assert trials[name]["pruned"].startswith("pruned by constraint kl_divergence")
        assert report["variants"][name]["serving"] == [] and not trials[name]["feasible"]
    assert trials["q.scheme=int8-dynamic"]["feasible"] and report["variants"]["q.scheme=int8-dynamic"]["serving"]
    assert search["recommended"] in {"baseline", "fused", "q.scheme=int8-dynamic"}
    assert trials[search["recommended"]]["feasible"]
    assert "search: recommended " in result.stderr + result.stdout
    assert (tmp / "out/grid/plots/pareto.png").stat().st_size > 0
    md = (tmp / "out/grid/report.md").read_text()
    assert "## Search" in md and "pruned by constraint" in md and "## Projections (PROJECTED, not measured)" in md
    rows = report["projections"]
    assert {r["hardware"] for r in rows} >= {"H100 SXM 80GB", "L4", "this CPU"} and all(r["projected"] for r in rows)
    assert all(r["variant"] in report["variants"] for r in rows)
    stages = [s["op"] for s in report["build"]["stages"]]
    assert stages.count("fuse") == 1 and stages.count("quantize") == 4


def test_no_feasible_trial_exits_1_with_the_reason(grid_build):
    tmp, env, _ = grid_build
    recipe = write(tmp, name="none", max_kl=0.0)
    recipe.write_text(recipe.read_text().replace("kl_divergence, max: 0.0", "kl_divergence, max: 0.0}, "
                                                 "{metric: tpot_ms.p50, max: 0.000001"))
    result = recipec("build", str(recipe), "--out", str(tmp / "out"), env=env)
    assert result.returncode == 1, result.stderr
    assert "search: no feasible trial" in result.stderr


def test_tpe_asks_and_tells_within_the_budget(grid_build):
    tmp, env, _ = grid_build
    recipe = write(tmp, name="tpe", strategy="tpe", max_trials=3)
    result = recipec("build", str(recipe), "--out", str(tmp / "out"), env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp / "out/tpe/report.json").read_text())
    searched = [t for t in report["search"]["trials"] if t["params"]]
    assert len(searched) == 3 and len({t["variant"] for t in searched}) == 3
    assert report["search"]["strategy"] == "tpe" and report["search"]["not_tried"]["count"] == 1
    assert "search: trial 3 of at most 3" in result.stderr + result.stdout


def test_a_trial_whose_stage_fails_is_recorded_and_the_search_goes_on(grid_build):
    tmp, env, _ = grid_build
    passes = """\
passes:
  - id: q
    op: quantize
    with: {scheme: int4, min_top1: 0, max_kl: {search: [10.0, 0.0]}}
"""
    recipe = write(tmp, passes=passes, name="fails")
    result = recipec("build", str(recipe), "--out", str(tmp / "out"), env=env)
    assert result.returncode == 0, result.stderr
    trials = {t["variant"]: t for t in json.loads((tmp / "out/fails/report.json").read_text())["search"]["trials"]}
    assert trials["q.max_kl=0.0"]["error"] and not trials["q.max_kl=0.0"]["feasible"]
    assert trials["q.max_kl=10.0"]["error"] is None and "q.max_kl=10.0" in os.listdir(tmp / "out/fails/variants")
    assert "q.max_kl=0.0" not in os.listdir(tmp / "out/fails/variants")
