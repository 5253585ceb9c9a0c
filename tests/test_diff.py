"""`recipec diff`: pass changes, which stages' cache keys change and why, which variants are affected, and
settings that only change the report, all read from two real plans."""
from __future__ import annotations

import argparse
import json
import textwrap

import pytest
from conftest import RECIPE_HEAD

from recipec.cli.diff import register as add_diff_commands
from recipec.plan.diff import diff_recipes
from recipec.plan.diff_text import format_diff
from recipec.errors import RecipeInvalid

MODEL = RECIPE_HEAD
PASSES = """\
passes:
  - {id: fuse, op: fuse}
  - {id: int8, op: quantize, with: {scheme: int8-static}}
  - {id: fp16, op: quantize, after: fuse, with: {scheme: fp16}}
"""
SERVING = "serving: {batching: {policy: continuous, max_batch_size: 4}}\n"
VERSIONS = {"recipec": "test"}  # both plans must share library versions for their keys to compare


def _recipe(tmp_path, name: str, text: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _diff(tmp_path, old: str, new: str):
    return diff_recipes(_recipe(tmp_path, "old", old), _recipe(tmp_path, "new", new), VERSIONS)


def test_passes_added_removed_moved_and_report_only_settings(tmp_path):
    new_passes = """\
        passes:
          - {id: fp16, op: quantize, after: fuse, with: {scheme: fp16}}
          - {id: fuse, op: fuse, after: source}
          - {id: int4, op: quantize, after: fuse, with: {scheme: int4}}
        """
    d = _diff(tmp_path, MODEL + PASSES + SERVING,
              MODEL + textwrap.dedent(new_passes) + SERVING.replace("continuous", "dynamic"))
    assert (d.added, d.removed, d.moved) == (["int4"], ["int8"], ["fp16"])
    assert {(s.id, s.status) for s in d.stages} == {("int4", "added"), ("int8", "removed")}
    assert d.cached == ["source", "baseline", "fuse", "fp16"], "moving a pass without changing its input reruns nothing"
    assert d.variants == {"rebuilt": [], "added": ["int4"], "removed": ["int8"], "unchanged": ["baseline", "fp16"]}
    assert d.settings == [("serving.batching.policy", "continuous", "dynamic")]
    text = format_diff(d)
    assert "+ int4" in text and "- int8" in text and "~ fp16 moved" in text
    assert 'serving.batching.policy: "continuous" -> "dynamic"  (report only)' in text


def test_a_parameter_change_reruns_that_stage_and_its_variant(tmp_path):
    new = PASSES.replace("{scheme: fp16}", "{scheme: fp16, exclude: ['*lm_head*']}")
    d = _diff(tmp_path, MODEL + PASSES, MODEL + new)
    assert [c.params for c in d.changed] == [[("exclude", [], ["*lm_head*"])]] and d.changed[0].id == "fp16"
    assert [(s.id, s.status, s.reason) for s in d.stages] == [("fp16", "changed", "its parameters changed")]
    assert d.variants["rebuilt"] == ["fp16"] and d.variants["unchanged"] == ["baseline", "int8"]
    assert "~ fp16: exclude [] -> [\"*lm_head*\"]" in format_diff(d)


def test_a_model_change_reruns_everything_downstream(tmp_path):
    d = _diff(tmp_path, MODEL + PASSES, MODEL.replace("hidden_size: 32", "hidden_size: 64") + PASSES)
    reasons = {s.id: s.reason for s in d.stages}
    assert reasons["source"] == "the model or its pretraining changed"
    assert reasons["baseline"] == "its input changed (source)"
    assert reasons["int8"] == "its input changed (fuse)"
    assert d.cached == [] and d.variants["rebuilt"] == ["baseline", "fp16", "int8"]
    assert ("model.config.hidden_size", 32, 64) in d.settings


def test_calibration_data_reruns_only_the_passes_that_read_it(tmp_path):
    data = "data: {calibration: {source: synthetic, samples: %d, seq_len: 16}}\n"
    d = _diff(tmp_path, MODEL + PASSES + data % 8, MODEL + PASSES + data % 16)
    assert [(s.id, s.reason) for s in d.stages] == [("int8", "the data it reads changed"),
                                                     ("fp16", "the data it reads changed")]
    assert d.variants["unchanged"] == ["baseline"]


def _command(argv) -> int:
    parser = argparse.ArgumentParser()
    add_diff_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.handler(args)


def test_command_exit_code_and_json(tmp_path, capsys):
    old = _recipe(tmp_path, "old", MODEL + PASSES)
    same = _recipe(tmp_path, "same", MODEL + PASSES)
    changed = _recipe(tmp_path, "changed", MODEL + PASSES.replace("int8-static", "int8-dynamic"))
    assert _command(["diff", str(old), str(same), "--exit-code"]) == 0
    assert "none: the build is fully cached" in capsys.readouterr().out
    assert _command(["diff", str(old), str(changed), "--exit-code"]) == 1
    assert _command(["diff", str(old), str(changed)]) == 0
    capsys.readouterr()
    assert _command(["diff", str(old), str(changed), "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["variants"]["rebuilt"] == ["int8"] and payload["changed"][0]["id"] == "int8"


def test_an_invalid_recipe_is_reported_not_diffed(tmp_path):
    with pytest.raises(RecipeInvalid):
        _diff(tmp_path, MODEL + PASSES, MODEL + PASSES.replace("op: fuse", "op: fusee"))
