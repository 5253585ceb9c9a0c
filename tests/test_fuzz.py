"""Fuzzing `recipec validate`: valid recipes mutated in their structure (types, values, keys, nesting) and
in their text (YAML syntax, unicode, bytes), plus hand-picked nasty documents (aliases, tags, huge numbers,
deep nesting). Whatever the input, validation must end with exit 0 (valid) or 2 (invalid), never a traceback
or an internal error, and every rejection must start `file:line:col:` with a line that exists in the file.

Validation runs in-process through recipec.cli.main() (a subprocess costs seconds of imports per case);
a few cases also go through a real subprocess to cover the entry point. Hypothesis is derandomized, so a
run explores the same cases every time and a failure reproduces.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import RECIPE_HEAD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recipec import cli
from recipec.passes import PASSES

# Valid starting points covering every section of the schema; test_bases_are_valid keeps them so.
BASES: dict[str, str] = {
    "minimal": RECIPE_HEAD,
    "passes": RECIPE_HEAD + textwrap.dedent("""\
        passes:
          - {id: ex17, op: export, with: {opset: 17}}
          - id: ex18
            op: export
            after: source
            with: {opset: 18}
        """),
    "everything": RECIPE_HEAD + textwrap.dedent("""\
        description: "a recipe with every section: ünïcode ✓"
        data:
          calibration: {source: synthetic, samples: 4, seq_len: 16, seed: 0}
          eval: {source: synthetic, samples: 2, seq_len: 8}
        passes:
          - {id: ex, op: export}
        serving:
          device: cpu
          threads: 1
          batching: {policy: dynamic, max_batch_size: 4, max_wait_ms: 2.5}
          workload:
            prompt_tokens: {min: 4, max: 8}
            output_tokens: 4
            requests: 4
            concurrency: [1, 2]
            arrival: poisson
            rate_rps: [1.5, 3]
        gates:
          - {metric: tpot_ms.p50, max: 100, variant: ex}
          - {metric: kl_divergence, min: 0}
        """),
    # the trained tokenizer sets vocab_size: a config override of it is refused at validation
    "pretrain": RECIPE_HEAD.replace(", vocab_size: 64}", "}").replace(
        "  config:", "  pretrain: {corpus: stdlib, steps: 4, warmup_steps: 1, batch_size: 2, seq_len: 16, vocab_size: 300}\n"
                     "  config:"),
    "path model": "recipe: 1\nname: from-dir\nmodel: {source: path, path: ., dtype: float16}\n",
    "hub model": "recipe: 1\nname: hub\nmodel: {source: hub, id: org/model, revision: main}\n",
}
# Passes with a validation-time `check` read the model config while validating: fuzz them too, once registered.
if {"prune", "distill", "quantize"} <= set(PASSES):
    BASES["checked passes"] = RECIPE_HEAD + textwrap.dedent("""\
        passes:
          - {id: pruned, op: prune, with: {target: mlp, amount: 0.5}}
          - {id: kd, op: distill, with: {teacher: source, steps: 4, warmup_steps: 1}}
          - {id: q, op: quantize, with: {scheme: int8-dynamic}}
        """)
    BASES["path model, checked pass"] = ("recipe: 1\nname: from-dir\nmodel: {source: path, path: .}\n"
                                         "passes:\n  - {id: pruned, op: prune, with: {target: heads, keep_heads: 1}}\n")

SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 63, 10 ** 40]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e-308, 0.5, 1e-3]),
    st.text(max_size=30), st.sampled_from(["", "..", "../../etc/passwd", "a/b", "/abs", "~", "[/]", "[bold]x",
                                           "\x00", "\u202e", "𝔘𝔫𝔦", "ＡＢＣ", "synthetic", "export", "llama"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)
# Tokens that carry meaning in YAML, for text-level edits.
YAML_TOKENS = [":", ": ", "-", "- ", "{", "}", "[", "]", ",", "&a ", "*a", "!", "!!str ", "!!python/object:os.system ",
               "|", ">", "'", '"', "#", "%YAML 1.1\n", "---\n", "...\n", "? ", "<<: ", "\t", "  ", "\n", "\r\n",
               "\\", "@", "`", "\ufeff", "\x00", "\x85", "\u2028", "é", "💥", "1e999", "0x1F", "0o17", ".inf",
               "~", "null", "yes", "no", "on", "=", "99999999999999999999999999"]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, prefix + (i,))
    return out


def _parent(tree: Any, path: tuple) -> Any:
    for part in path[:-1]:
        tree = tree[part]
    return tree


@st.composite
def tree_mutants(draw) -> str:
    """A base recipe with 1-3 structural edits, dumped back to YAML in a drawn style."""
    tree = yaml.safe_load(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(tree)))
        action = draw(st.sampled_from(["replace", "delete", "add key", "rename key", "nest", "listify"]))
        if not path:  # the root itself
            if action == "replace":
                tree = draw(VALUES)
            elif action == "nest":
                tree = {draw(st.text(max_size=5)): tree}
            elif action == "listify":
                tree = [tree]
            continue
        parent, last = _parent(tree, path), path[-1]
        if not isinstance(parent, (dict, list)) or (isinstance(parent, dict) and last not in parent) or \
                (isinstance(parent, list) and last >= len(parent)):
            continue  # an earlier edit removed or replaced this path
        if action == "replace":
            parent[last] = draw(VALUES)
        elif action == "delete":
            del parent[last]
        elif action == "add key" and isinstance(parent[last], dict):
            parent[last][draw(st.one_of(st.text(max_size=12), st.sampled_from(["with", "op", "id", "after", "pretrain"])))] = draw(VALUES)
        elif action == "rename key" and isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = parent.pop(last)
        elif action == "nest":
            depth = draw(st.integers(1, 80))
            value = parent[last]
            for _ in range(depth):
                value = {"x": value} if draw(st.booleans()) else [value]
            parent[last] = value
        elif action == "listify":
            parent[last] = [parent[last]]
    return yaml.safe_dump(tree, allow_unicode=draw(st.booleans()), default_flow_style=draw(st.sampled_from([None, True, False])),
                          sort_keys=False, width=draw(st.sampled_from([20, 80, 10 ** 6])))


@st.composite
def text_mutants(draw) -> bytes:
    """A base recipe with 1-4 edits of its text: YAML tokens or unicode inserted, spans deleted or
    duplicated, lines swapped or re-indented; sometimes raw bytes that are not UTF-8."""
    text = BASES[draw(st.sampled_from(sorted(BASES)))]
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["token", "unicode", "delete", "duplicate", "swap lines", "indent", "dedent"]))
        if kind == "token":
            text = text[:at] + draw(st.sampled_from(YAML_TOKENS)) + text[at:]
        elif kind == "unicode":
            text = text[:at] + draw(st.text(min_size=1, max_size=8)) + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
        elif kind == "duplicate":
            end = min(len(text), at + draw(st.integers(1, 60)))
            text = text[:end] + text[at:end] + text[end:]
        else:
            lines = text.split("\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if kind == "swap lines":
                lines[i], lines[j] = lines[j], lines[i]
            elif kind == "indent":
                lines[i] = " " * draw(st.integers(1, 9)) + lines[i]
            else:
                lines[i] = lines[i].lstrip()
            text = "\n".join(lines)
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xfe\xff", b"\x80\x80"])) + data[at:]
    return data


def _nested(depth: int, flow: bool) -> str:
    if flow:
        return "recipe: 1\nname: deep\nmodel: " + "[" * depth + "1" + "]" * depth + "\n"
    return "recipe: 1\nname: deep\nmodel:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(depth)) + \
        "  " * (depth + 1) + "v\n"


# Hand-picked documents, each aimed at one corner of loading. Their names show in failures.
NASTY: dict[str, str | bytes] = {
    "huge int": RECIPE_HEAD + "serving: {threads: " + "9" * 5000 + "}\n",
    "huge int in pass params": RECIPE_HEAD + "passes:\n  - {id: a, op: export, with: {opset: " + "9" * 400 + "}}\n",
    "float overflow": RECIPE_HEAD + "serving: {batching: {max_wait_ms: 1e999}}\n",
    "nan": RECIPE_HEAD + "serving: {batching: {max_wait_ms: .nan}}\n",
    "negative inf gate": RECIPE_HEAD + "gates: [{metric: tpot_ms.p50, max: -.inf}]\n",
    "deep flow nesting": _nested(5000, flow=True),
    "deep block nesting": _nested(200, flow=False),
    "deep nesting just under the limit": _nested(60, flow=False),
    "alias bomb": "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"b{i}: &b{i} [{', '.join([f'*b{i - 1}' if i else '*a'] * 10)}]\n" for i in range(8)),
    "recursive alias": "recipe: 1\nname: &n [*n]\n",
    "merge key": "base: &b {source: synthetic, family: llama}\nrecipe: 1\nname: m\nmodel: {<<: *b}\n",
    "python tag": "recipe: 1\nname: !!python/object/apply:os.system ['echo pwned']\nmodel: {source: synthetic}\n",
    "python name tag": "recipe: !!python/name:os.system 1\n",
    "binary tag": "recipe: 1\nname: !!binary aGVsbG8=\n",
    "set tag": "recipe: 1\nname: x\nmodel: !!set {a, b}\n",
    "timestamp": "recipe: 1\nname: 2024-01-01\nmodel: {source: synthetic, family: llama}\n",
    "omap": "recipe: 1\nname: x\nmodel: !!omap [{source: synthetic}]\n",
    "custom tag": "recipe: !custom 1\n",
    "complex key": "? [a, b]\n: 1\nrecipe: 1\n",
    "null key": "~: 1\nrecipe: 1\n",
    "int key": "1: x\nrecipe: 1\nname: x\nmodel: {source: synthetic, family: llama}\n",
    "bool key": "yes: x\n",
    "two documents": RECIPE_HEAD + "---\n" + RECIPE_HEAD,
    "directive": "%YAML 1.2\n---\n" + RECIPE_HEAD,
    "bad directive": "%YAML 9.9\n---\n" + RECIPE_HEAD,
    "bom": "\ufeff" + RECIPE_HEAD,
    "crlf": RECIPE_HEAD.replace("\n", "\r\n"),
    "tabs": RECIPE_HEAD.replace("  ", "\t"),
    "nul byte": RECIPE_HEAD + "description: a\x00b\n",
    "not utf-8": RECIPE_HEAD.encode() + b"description: \xff\xfe\n",
    "utf-16": RECIPE_HEAD.encode("utf-16"),
    "empty": "",
    "whitespace": "   \n\n\t\n",
    "only a dash": "-\n",
    "scalar": "42\n",
    "long line": RECIPE_HEAD + "description: " + "x" * 200_000 + "\n",
    "many keys": RECIPE_HEAD + "".join(f"k{i}: {i}\n" for i in range(3000)),
    "unicode key": RECIPE_HEAD + "ключ: 1\n",
    "rtl override in name": RECIPE_HEAD.replace("name: tiny", "name: \"ti\u202eny\""),
    "markup in a key": RECIPE_HEAD + "\"[/]\": 1\n",
    "markup in a value": RECIPE_HEAD.replace("family: llama", "family: \"[bold]x[/]\""),
    "markup in a pass id": RECIPE_HEAD + "passes:\n  - {id: a, op: export, after: \"[/red]\"}\n",
    "name traversal": RECIPE_HEAD.replace("name: tiny", "name: ../../etc"),
    "name absolute": RECIPE_HEAD.replace("name: tiny", "name: /tmp/x"),
    "name with nul": RECIPE_HEAD.replace("name: tiny", "name: \"a\\0b\""),
    "model path traversal": "recipe: 1\nname: p\nmodel: {source: path, path: ../../../../../../etc}\n",
    "data path traversal": RECIPE_HEAD + "data: {eval: {source: jsonl, path: ../../../../etc/passwd}}\n",
    "data glob outside": RECIPE_HEAD + "data: {eval: {source: text, path: '/nonexistent-recipec/**/*.txt'}}\n",
    "config with a nested object": RECIPE_HEAD.replace("vocab_size: 64", "vocab_size: 64, rope_scaling: {type: [1, {a: b}]}"),
    "config wrong type": RECIPE_HEAD.replace("vocab_size: 64", "vocab_size: many"),
    "config huge": RECIPE_HEAD.replace("vocab_size: 64", "vocab_size: 100000000000000000000"),
    "config negative": RECIPE_HEAD.replace("num_hidden_layers: 1", "num_hidden_layers: -3"),
    "config zero heads": RECIPE_HEAD.replace("num_attention_heads: 2", "num_attention_heads: 0"),
    "config float where int": RECIPE_HEAD.replace("hidden_size: 32", "hidden_size: 32.5"),
    "family is a list": RECIPE_HEAD.replace("family: llama", "family: [llama]"),
    "after is a number": RECIPE_HEAD + "passes:\n  - {id: a, op: export, after: 3}\n",
    "after is an empty list": RECIPE_HEAD + "passes:\n  - {id: a, op: export, after: []}\n",
    "after lists itself twice": RECIPE_HEAD + "passes:\n  - {id: a, op: export, after: [a, a]}\n",
    "with is a list": RECIPE_HEAD + "passes:\n  - {id: a, op: export, with: [1]}\n",
    "passes is a mapping": RECIPE_HEAD + "passes: {id: a, op: export}\n",
    "pretrain on a path model": "recipe: 1\nname: p\nmodel: {source: path, path: ., pretrain: {steps: 1}}\n",
    "pretrain warmup past steps": RECIPE_HEAD.replace("  config:", "  pretrain: {steps: 2, warmup_steps: 5}\n  config:"),
    "pretrain corpus glob traversal": RECIPE_HEAD.replace("  config:", "  pretrain: {corpus: {text: '../../../nothing/**'}}\n  config:"),
    "gate on a bogus metric": RECIPE_HEAD + "gates: [{metric: '....', max: 1}]\n",
    "range min above max": RECIPE_HEAD + "serving: {workload: {prompt_tokens: {min: 9, max: 2}}}\n",
    "pretrain corpus of one file": RECIPE_HEAD.replace("  config:", "  pretrain: {corpus: {text: config.json}}\n  config:"),
}
if "prune" in PASSES:
    _PRUNE = "passes:\n  - {id: p, op: prune, with: {target: mlp, amount: 0.5}}\n"
    NASTY["checked pass, broken config.json"] = "recipe: 1\nname: b\nmodel: {source: path, path: broken}\n" + _PRUNE
    NASTY["checked pass, config value of the wrong type"] = RECIPE_HEAD.replace("hidden_size: 32", "hidden_size: '32'") + _PRUNE
    NASTY["checked pass, zero heads"] = RECIPE_HEAD.replace("num_attention_heads: 2", "num_attention_heads: 0") + _PRUNE
    NASTY["checked pass, config null"] = RECIPE_HEAD.replace("intermediate_size: 64", "intermediate_size: null") + _PRUNE
if "quantize" in PASSES:  # data paths are read (hashed into cache keys) only for passes that use data
    _QUANTIZE = "passes:\n  - {id: q, op: quantize, with: {scheme: int8-dynamic}}\n"
    NASTY["jsonl data path is a directory"] = RECIPE_HEAD + _QUANTIZE + "data: {eval: {source: jsonl, path: .}}\n"
    NASTY["text data path is a directory"] = RECIPE_HEAD + _QUANTIZE + "data: {eval: {source: text, path: .}}\n"


def _yaml_lines(data: bytes) -> int:
    """Lines as YAML counts them: it breaks lines at CR, LF, CRLF, NEL, LS and PS."""
    text = data.decode("utf-8", "replace")
    return len(re.findall("\r\n|[\r\n\x85\u2028\u2029]", text)) + 1


def _check(path: Path, capsys) -> tuple[int, str]:
    """Validate in-process and hold the outcome to the contract; returns (exit code, stderr)."""
    capsys.readouterr()
    rc = cli.main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert rc in (cli.EXIT_OK, cli.EXIT_INVALID), f"exit {rc}: {err}"
    assert "Traceback" not in err and "internal error" not in err, err
    if rc == cli.EXIT_OK:
        assert out.strip() == f"{path}: valid" and not err.strip(), (out, err)
        return rc, err
    # split("\n"), not splitlines(): a message may hold U+0085 or U+2028, which splitlines() breaks on.
    errors = [line for line in err.split("\n") if line.startswith("error:")]
    assert errors, f"rejected without a message: {err!r}"
    assert err.startswith("error: "), err
    n_lines = _yaml_lines(path.read_bytes())
    for line in errors:
        where = re.match(rf"error: {re.escape(str(path))}:(\d+):(\d+): .", line, re.S)
        assert where, f"no file:line:col prefix: {line!r}"
        assert 1 <= int(where.group(1)) <= n_lines, f"line {where.group(1)} is not in the {n_lines}-line file: {line}"
        assert int(where.group(2)) >= 1, line
    return rc, err


FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
# Cases per strategy in the default suite (each ~10-30 ms of validation) and in the slow one.
FAST, SLOW = 150, 1500
# The figures docs/reliability.md quotes; summed by _count so that a changed budget shows there.
COUNTS: dict[str, int] = {}


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _print_figures():
    """docs/reliability.md quotes these (run with -s to see them)."""
    yield
    print("\nfuzz cases validated:", dict(sorted(COUNTS.items())), "total", sum(COUNTS.values()))


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    """One directory for every case, so that a `path: .` model resolves, and so we can check that
    validation creates nothing beside the recipe."""
    where = tmp_path_factory.mktemp("fuzz")
    (where / "config.json").write_text('{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, '
                                       '"num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64}')
    (where / "broken").mkdir()
    (where / "broken" / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return where


def _run_case(case_dir: Path, data: str | bytes, capsys, name: str) -> int:
    path = case_dir / "r.yaml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    rc, _ = _check(path, capsys)
    assert sorted(p.name for p in case_dir.iterdir()) == ["broken", "config.json", "r.yaml"], "validate wrote a file"
    _count(name)
    return rc


@pytest.mark.parametrize("name", sorted(BASES))
def test_bases_are_valid(case_dir, capsys, name):
    assert _run_case(case_dir, BASES[name], capsys, "bases") == cli.EXIT_OK


@pytest.mark.parametrize("name", sorted(NASTY))
def test_nasty_documents(case_dir, capsys, name):
    _run_case(case_dir, NASTY[name], capsys, "nasty")


@settings(FUZZ, max_examples=FAST)
@given(text=tree_mutants())
def test_structural_mutations(case_dir, capsys, text):
    _run_case(case_dir, text, capsys, "structural")


@settings(FUZZ, max_examples=FAST)
@given(data=text_mutants())
def test_text_mutations(case_dir, capsys, data):
    _run_case(case_dir, data, capsys, "text")


@pytest.mark.slow
@settings(FUZZ, max_examples=SLOW)
@given(text=tree_mutants())
def test_structural_mutations_many(case_dir, capsys, text):
    _run_case(case_dir, text, capsys, "structural-slow")


@pytest.mark.slow
@settings(FUZZ, max_examples=SLOW)
@given(data=text_mutants())
def test_text_mutations_many(case_dir, capsys, data):
    _run_case(case_dir, data, capsys, "text-slow")


@pytest.mark.parametrize("op", sorted(op for op, p in PASSES.items() if p.params.get("required")))
def test_an_op_with_required_parameters_needs_its_with(case_dir, capsys, op):
    """`with` defaults to {}, so an entry without it must still meet its op's required parameters,
    at validation: otherwise the first to notice is the pass itself (a KeyError, at best in a check)."""
    path = case_dir / "r.yaml"
    path.write_text(RECIPE_HEAD + f"passes:\n  - {{id: x, op: {op}}}\n")
    rc, err = _check(path, capsys)
    required = PASSES[op].params["required"]
    assert rc == cli.EXIT_INVALID and any(f"'{key}'" in err for key in [*required, "with"]), f"{op} without {required}: {err!r}"
    _count("required")


def test_nasty_documents_through_a_subprocess(tmp_path):
    """The real entry point, once for a batch of files: exit 2, each rejected file named, no traceback."""
    picked = ["deep flow nesting", "alias bomb", "python tag", "not utf-8", "huge int", "markup in a key",
              "name traversal", "two documents"]
    files = []
    for i, name in enumerate(picked):
        path = tmp_path / f"case{i}.yaml"
        data = NASTY[name]
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        files.append(str(path))
    env = {**os.environ, "COLUMNS": "80"}
    result = subprocess.run([sys.executable, "-m", "recipec.cli", "validate", *files], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    for name, path in zip(picked, files):
        assert re.search(rf"^error: {re.escape(path)}:\d+:\d+: ", result.stderr, re.M), f"{name}: {result.stderr}"
