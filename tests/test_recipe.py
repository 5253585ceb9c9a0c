"""Recipe validation: what is accepted, and how each kind of mistake is reported (file:line:col, field, no traceback)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import RECIPE_HEAD

from recipec.errors import RecipeInvalid
from recipec.plan.planner import load_plan
from recipec.recipe.schema import SCHEMAS_DIR, build_recipe_schema, schema_json

ROOT = Path(__file__).resolve().parent.parent



def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(RecipeInvalid) as caught:
        load_plan(path, with_keys=False)
    return [p.format(str(path)) for p in caught.value.problems]


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_plan(write(tmp_path, RECIPE_HEAD), with_keys=False).recipe
    resolved = recipe.resolved
    assert resolved["model"]["seed"] == 0 and resolved["model"]["dtype"] == "float32"
    assert resolved["data"]["calibration"] == {"source": "synthetic", "samples": 32, "seq_len": 128, "seed": 0, "field": "text"}
    assert resolved["serving"]["batching"]["policy"] == "continuous"
    assert resolved["passes"] == [] and resolved["gates"] == []


def test_pass_parameters_get_their_op_defaults(tmp_path):
    recipe = load_plan(write(tmp_path, RECIPE_HEAD + "passes:\n  - {id: ex, op: export}\n"), with_keys=False).recipe
    params = recipe.resolved["passes"][0]["with"]
    assert params and all(v is not None for v in params.values())


def test_every_recipe_in_the_repository_is_valid():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes, "recipes/ holds no example"
    for path in recipes:
        load_plan(path, with_keys=False)


def test_committed_schema_is_current():
    committed = (SCHEMAS_DIR / "recipe.schema.json").read_text()
    assert committed == schema_json(build_recipe_schema()), "run: recipec schema recipe > recipec/schemas/recipe.schema.json"


@pytest.mark.parametrize("name", ["recipe.schema.json", "report.schema.json"])
def test_published_schemas_equal_the_package_data(name):
    """schemas/ at the top is the copy editors and CI use without installing recipec; the package reads its own."""
    assert (ROOT / "schemas" / name).read_bytes() == (SCHEMAS_DIR / name).read_bytes(), f"cp recipec/schemas/{name} schemas/"


# Each case: recipe text, expected (line, col) of the first problem, and a regex its message matches.
REJECTED = {
    "malformed yaml": ("recipe: 1\nname: [unclosed\n", r"malformed YAML"),
    "empty file": ("", r"file is empty"),
    "only a comment": ("# nothing\n", r"file is empty"),
    "list instead of mapping": ("- recipe: 1\n", r"YAML mapping, not a list"),
    "scalar instead of mapping": ("just text\n", r"YAML mapping, not a str"),
    "python tag": ("recipe: 1\nname: !!python/object/apply:os.system ['true']\n", r"unsupported YAML tag"),
    "python tag on a mapping": ("recipe: 1\nname: x\nmodel: !!python/object:object {}\n", r"unsupported YAML tag"),
    "duplicate key": ("recipe: 1\nname: a\nname: b\n", r"duplicate key 'name'"),
    "unknown top-level key": (RECIPE_HEAD + "pases: []\n", r"unknown key 'pases' \(did you mean 'passes'\?\)"),
    "unknown op": (RECIPE_HEAD + "passes:\n  - {id: a, op: quantise}\n", r"passes\[0\]\.op: unknown op 'quantise'"),
    "typo'd parameter": (RECIPE_HEAD + "passes:\n  - id: a\n    op: export\n    with: {opst: 17}\n", r"passes\[0\]\.with\.opst: unknown key 'opst' \(did you mean 'opset'\?\)"),
    "value out of range": (RECIPE_HEAD + "passes:\n  - id: a\n    op: export\n    with: {opset: 99}\n", r"passes\[0\]\.with\.opset: 99 is greater than the maximum"),
    "wrong type": (RECIPE_HEAD + "serving:\n  workload: {requests: many}\n", r"serving\.workload\.requests: 'many' is not of type 'integer'"),
    "duplicate id": (RECIPE_HEAD + "passes:\n  - {id: a, op: export}\n  - {id: a, op: export, after: source}\n", r"passes\[1\]\.id: duplicate id 'a'"),
    "after names no pass": (RECIPE_HEAD + "passes:\n  - {id: a, op: export, after: nothing}\n", r"passes\[0\]\.after: `after` names 'nothing'"),
    "cycle": (RECIPE_HEAD + "passes:\n  - {id: a, op: export, after: b}\n  - {id: b, op: export, after: a}\n", r"cycle: .*a -> b|cycle: .*b -> a"),
    "torch stage after onnx stage": (RECIPE_HEAD + "passes:\n  - {id: a, op: export}\n  - {id: b, op: export}\n",
                                     r"passes\[1\]\.op: 'export' works on the PyTorch model but comes after 'a'"),
    "name with a path separator": (RECIPE_HEAD.replace("name: tiny", "name: ../evil"), r"name: '\.\./evil' does not match"),
    "name with a slash": (RECIPE_HEAD.replace("name: tiny", "name: a/b"), r"name: 'a/b' does not match"),
    "missing path directory": ("recipe: 1\nname: p\nmodel: {source: path, path: ./no-such-model}\n", r"model\.path: directory .* does not exist"),
    "unknown family": (RECIPE_HEAD.replace("family: llama", "family: lama"), r"unknown model family 'lama'"),
    "typo in model config": (RECIPE_HEAD.replace("hidden_size: 32", "hiden_size: 32"), r"model\.config\.hiden_size: llama configs have no key 'hiden_size'"),
    "pretrained vocabulary set in the config": (
        RECIPE_HEAD.replace("  config:", "  pretrain: {steps: 4, warmup_steps: 1}\n  config:"),
        r"model\.config\.vocab_size: vocab_size is set by the trained tokenizer"),
    "pretrain warmup as long as training": (
        RECIPE_HEAD.replace(", vocab_size: 64}", "}").replace("  config:", "  pretrain: {steps: 4, warmup_steps: 4}\n  config:"),
        r"model\.pretrain\.warmup_steps: warmup_steps \(4\) must be fewer than steps \(4\)"),
    "pretrain windows past the model's positions": (
        RECIPE_HEAD.replace(", vocab_size: 64}", ", max_position_embeddings: 8}").replace(
            "  config:", "  pretrain: {steps: 4, warmup_steps: 1, seq_len: 16}\n  config:"),
        r"model\.pretrain\.seq_len: seq_len 16 exceeds the model's max_position_embeddings 8"),
    "reserved id": (RECIPE_HEAD + "passes:\n  - {id: baseline, op: export}\n", r"'baseline' is reserved"),
    "missing required key": ("recipe: 1\nname: x\n", r"missing required key 'model'"),
    "wrong format version": (RECIPE_HEAD.replace("recipe: 1", "recipe: 2"), r"recipe: must be 1"),
    "gate without a limit": (RECIPE_HEAD + "gates:\n  - {metric: tpot_ms.p50}\n", r"gates\[0\]: needs at least one of: min, max"),
    "gate on an unknown variant": (RECIPE_HEAD + "gates:\n  - {metric: tpot_ms.p50, max: 1, variant: nope}\n", r"gates\[0\]\.variant: no variant 'nope'"),
    "poisson without a rate": (RECIPE_HEAD + "serving:\n  workload: {arrival: poisson}\n", r"missing required key 'rate_rps'"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_rejections_name_file_line_column_and_field(tmp_path, case):
    text, pattern = REJECTED[case]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    found = problems(path)
    assert found, case
    assert any(re.search(pattern, f) for f in found), f"{case}: {found}"
    for line in found:
        assert re.match(rf"^{re.escape(str(path))}:\d+:\d+: ", line), line


def test_positions_point_at_the_offending_line(tmp_path):
    path = write(tmp_path, RECIPE_HEAD + "passes:\n  - id: a\n    op: export\n    with: {opset: 99}\n")
    [line] = problems(path)
    assert line.startswith(f"{path}:10:"), line


def test_all_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path, RECIPE_HEAD + "pases: []\nserving: {device: tpu}\ngates: [{metric: x}]\n")
    found = problems(path)
    assert len(found) >= 3, found


def test_alias_bomb_is_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]" for i in range(1, 9)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    assert any("too large" in p for p in problems(path))


def test_cli_validate_exit_codes_and_no_traceback(tmp_path):
    good = write(tmp_path, RECIPE_HEAD, "good.yaml")
    bad = write(tmp_path, RECIPE_HEAD + "passes:\n  - {id: a, op: quantise}\n", "bad.yaml")
    ok = subprocess.run([sys.executable, "-m", "recipec.cli", "validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    failed = subprocess.run([sys.executable, "-m", "recipec.cli", "validate", str(good), str(bad)], capture_output=True, text=True)
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr and f"{bad}:8:" in failed.stderr.replace("\n", "")
    missing = subprocess.run([sys.executable, "-m", "recipec.cli", "validate", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_schema_command_prints_the_schema():
    out = subprocess.run([sys.executable, "-m", "recipec.cli", "schema", "recipe"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["$id"].endswith("recipe.schema.json")
