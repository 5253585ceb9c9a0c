"""Reliability of `recipec build` as a whole, through the real command in subprocesses:

- SIGKILL at several points (export, quantization, and under -m slow pretraining, distillation, profiling):
  out/<name>/ stays the previous complete build (or absent), and the next build completes, taking every
  stage the killed one finished from the cache;
- a damaged cache entry is found, discarded and rebuilt end to end; two builds of one recipe at once
  both succeed and leave one consistent out/<name>/ and cache;
- resource guards: a model that cannot fit is refused before allocation, with the numbers; free disk
  space is checked before a stage or out/<name>/ is written;
- security: safe YAML, trust_remote_code only when asked (and said), weights_only unpickling, and no
  recipe path (name, model.path, data paths, symlinks in out/) that makes a build write outside
  out/<name>/ and its cache.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import kill_at
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recipec import cli
from recipec.build.cache import StageCache, file_digest
from recipec.passes import PASSES

ROOT = Path(__file__).resolve().parent.parent
MODEL = ("model:\n  source: synthetic\n  family: llama\n  seed: {seed}\n"
         "  config: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
         "num_key_value_heads: 2, vocab_size: 128}}\n")
TAIL = """\
serving:
  device: cpu
  batching: {policy: static, max_batch_size: 2}
  workload: {prompt_tokens: 8, output_tokens: 4, requests: 2, warmup_requests: 0, concurrency: [1]}
data:
  eval: {samples: 4, seq_len: 16}
  calibration: {samples: 4, seq_len: 16}
"""
# Bounds wide open: random weights have near-tied logits, and these tests are about kills, not fidelity.
QUANTIZE = "  - {id: q8, op: quantize, with: {scheme: int8-dynamic, max_kl: 1000, min_top1: 0}}\n"
EXPORT = "  - {id: ex17, op: export, with: {opset: 17}}\n"
STAGE_LINE = re.compile(r"^\s+(running|done|cached)\s+(\S+) \(", re.M)
# Figures for docs/reliability.md, printed when the module finishes (pytest -s).
FIGURES: dict[str, int] = {"kills survived": 0, "builds": 0}


def recipe_text(seed: int = 0, passes: str | None = None, name: str = "rel", model: str | None = None) -> str:
    if passes is None:
        passes = QUANTIZE if "quantize" in PASSES else EXPORT
    return f"recipe: 1\nname: {name}\n" + (model or MODEL.format(seed=seed)) + "passes:\n" + passes + TAIL


def run_recipec(*args: str, env: dict, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    FIGURES["builds"] += args[0] == "build"
    return subprocess.run([sys.executable, "-m", "recipec.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def stages(stderr: str, kind: str) -> set[str]:
    return {sid for k, sid in STAGE_LINE.findall(stderr) if k == kind}


def assert_complete(out: Path, recipe: Path | None = None) -> dict:
    """out/<name>/ is a whole build: its manifest lists every variant file with the bytes it holds."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "plan.json").is_file()
    for variant, entry in manifest["variants"].items():
        assert entry["files"], variant
        for rel, digest in entry["files"].items():
            assert file_digest(out / "variants" / variant / rel) == digest, f"{variant}/{rel} differs from the manifest"
    if recipe is not None:
        assert manifest["recipe"]["sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest(), "out/ is another recipe's"
    return manifest


def assert_cache_consistent(cache_root: Path, manifest: dict) -> None:
    """Every stage the manifest names is in the cache and passes its sha256 check; no temporaries remain."""
    warnings: list[str] = []
    cache = StageCache(cache_root, warn=warnings.append)
    for stage in manifest["stages"]:
        entry = cache.lookup(stage["key"])
        assert entry is not None, f"stage {stage['id']} is missing from the cache"
        assert entry.meta["files"] == stage["files"], stage["id"]
    assert not warnings, warnings
    assert not list((cache_root / "tmp").iterdir()), "temporary stage directories left in the cache"


def env_for(tmp: Path) -> dict:
    return {**os.environ, "RECIPEC_CACHE": str(tmp / "cache"), "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module", autouse=True)
def _print_figures():
    """docs/reliability.md quotes these (run with -s to see them)."""
    yield
    print("\nreliability figures:", FIGURES)


@pytest.fixture(scope="module")
def base_build(tmp_path_factory):
    """One complete build (no profile) that the kill and cache tests start from, each on its own copy."""
    tmp = tmp_path_factory.mktemp("base")
    recipe = tmp / "rel.yaml"
    recipe.write_text(recipe_text())
    result = run_recipec("build", str(recipe), "--out", str(tmp / "out"), "--no-profile", env=env_for(tmp))
    assert result.returncode == 0, result.stderr
    return tmp


@pytest.fixture
def workspace(base_build, tmp_path):
    shutil.copy2(base_build / "rel.yaml", tmp_path / "rel.yaml")
    for name in ("cache", "out"):
        shutil.copytree(base_build / name, tmp_path / name, symlinks=True)
    return tmp_path


def kill_and_resume(tmp: Path, text: str, marker: str, delay: float = 1.0, profile: bool = False,
                    name: str = "rel") -> tuple[str, str]:
    """Build `text` and SIGKILL it at `marker`; check out/<name>/; build again and check what it reused."""
    out, recipe, env = tmp / "out" / name, tmp / f"{name}.yaml", env_for(tmp)
    previous = (out / "manifest.json").read_bytes() if out.exists() else None
    recipe.write_text(text)
    flags = [] if profile else ["--no-profile"]
    proc = subprocess.Popen([sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(tmp / "out"), *flags],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    killed = kill_at(proc, marker, delay, time.time() + 600)
    assert proc.returncode == -signal.SIGKILL
    cut = re.match(r"running (\S+)", marker)
    if cut:  # otherwise this test proves less than it says: the stage must still have been at work
        assert cut.group(1) not in stages(killed, "done"), f"the kill landed after {cut.group(1)} finished"
    assert "wrote " not in killed, "the build finished before the kill"
    if previous is None:
        assert not out.exists(), "a killed first build left out/<name>/"
    else:
        assert (out / "manifest.json").read_bytes() == previous, "out/<name>/ changed after a killed build"
        assert_complete(out)
    FIGURES["kills survived"] += 1

    resumed = run_recipec("build", str(recipe), "--out", str(tmp / "out"), *flags, env=env)
    assert resumed.returncode == 0, resumed.stderr
    manifest = assert_complete(out, recipe)
    if profile:
        assert json.loads((out / "report.json").read_text())["variants"]
    leftovers = [p.name for p in (tmp / "out").iterdir() if p.name.startswith(f".{name}.")]
    assert not leftovers, f"staging directories left in out/: {leftovers}"
    assert_cache_consistent(tmp / "cache", manifest)
    finished = stages(killed, "done")
    assert finished <= stages(resumed.stderr, "cached"), f"finished before the kill but not reused: {finished}\n{resumed.stderr}"
    assert stages(resumed.stderr, "running") == {s["id"] for s in manifest["stages"]} - stages(resumed.stderr, "cached")
    return killed, resumed.stderr


# ---------------------------------------------------------------- kills

@pytest.mark.slow  # tests/test_build.py kills builds in a stage and resumes them in the default run
def test_kill_during_export_keeps_the_previous_build_and_resumes(workspace):
    # A new seed: every stage must run again, so the source finishes in the killed build and the export is cut.
    killed, resumed = kill_and_resume(workspace, recipe_text(seed=1), "running baseline", delay=0.1)
    assert stages(killed, "done") == {"source"}
    assert "source" in stages(resumed, "cached") and "baseline" in stages(resumed, "running")


@pytest.mark.slow
@pytest.mark.skipif("quantize" not in PASSES, reason="the quantize op is not registered in recipec/passes/__init__.py")
def test_kill_during_quantization_keeps_the_previous_build_and_resumes(workspace):
    killed, resumed = kill_and_resume(workspace, recipe_text(seed=2), "running q8", delay=0.02)
    assert stages(killed, "done") == {"source", "baseline"}
    assert stages(resumed, "running") == {"q8"}


@pytest.mark.slow  # tests/test_build.py kills a first build too, at the start of a stage
def test_kill_of_a_first_build_leaves_nothing(workspace):
    shutil.rmtree(workspace / "out")
    _, resumed = kill_and_resume(workspace, recipe_text(seed=3), "running baseline", delay=0.1)
    assert "source" in stages(resumed, "cached")


@pytest.mark.slow
def test_kill_during_profiling_keeps_the_previous_build_and_resumes(workspace):
    killed, resumed = kill_and_resume(workspace, recipe_text(seed=4), "profiling:", delay=2.0, profile=True)
    assert stages(resumed, "cached") == stages(killed, "done") and not stages(resumed, "running")


@pytest.mark.slow
def test_kill_during_pretraining_leaves_nothing_and_resumes(workspace):
    import sysconfig

    # 60 small standard-library modules as a local corpus: tokenizer training and 60 steps take seconds.
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    small = sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 15_000)[:60]
    assert len(small) == 60
    (workspace / "corpus").mkdir()
    for p in small:
        shutil.copyfile(p, workspace / "corpus" / p.name)
    model = ("model:\n  source: synthetic\n  family: llama\n  config: {hidden_size: 32, intermediate_size: 64, "
             "num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}\n"
             "  pretrain: {corpus: {text: 'corpus/*.py'}, steps: 60, warmup_steps: 2, batch_size: 2, seq_len: 32, "
             "vocab_size: 300, eval_samples: 4}\n")
    killed, resumed = kill_and_resume(workspace, recipe_text(passes=EXPORT, name="pre", model=model), "pretraining",
                                      delay=0.5, name="pre")
    assert not stages(killed, "done") and "source" in stages(resumed, "running")
    assert re.search(r"pretrain: eval perplexity", resumed)


@pytest.mark.slow
@pytest.mark.skipif("distill" not in PASSES, reason="the distill op is not registered in recipec/passes/__init__.py")
def test_kill_during_distillation_keeps_the_previous_build_and_resumes(workspace):
    # 1 000 steps take ~8 s here (200 took 1.6 s on a quiet machine: a 2 s kill could land after the stage).
    passes = "  - {id: kd, op: distill, with: {steps: 1000, warmup_steps: 2, batch_size: 2, seq_len: 8}}\n"
    # seed 0 as in the base build: the source stage is the base build's, from the cache.
    killed, resumed = kill_and_resume(workspace, recipe_text(seed=0, passes=passes), "running kd", delay=1.0)
    assert "source" in stages(killed, "cached") and "kd" in stages(resumed, "running")


# ---------------------------------------------------------------- cache

def test_damaged_cache_entries_are_detected_and_rebuilt_by_the_build(workspace):
    out, recipe, env = workspace / "out" / "rel", workspace / "rel.yaml", env_for(workspace)
    manifest = json.loads((out / "manifest.json").read_text())
    before = {rel: (out / "variants" / "baseline" / rel).read_bytes() for rel in manifest["variants"]["baseline"]["files"]}
    keys = {s["id"]: s["key"] for s in manifest["stages"]}
    cache = workspace / "cache" / "stages"
    baseline_files = sorted(p for p in (cache / keys["baseline"] / "output").rglob("*") if p.is_file())
    biggest = max(baseline_files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # truncated
    config = cache / keys["source"] / "output" / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 32', '"hidden_size": 33'))  # altered, same size
    rebuilt = run_recipec("build", str(recipe), "--out", str(workspace / "out"), "--no-profile", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert len(re.findall(r"cache entry \w+ is corrupt", rebuilt.stderr)) == 2, rebuilt.stderr
    assert {"source", "baseline"} <= stages(rebuilt.stderr, "running"), rebuilt.stderr
    after = assert_complete(out, recipe)
    assert_cache_consistent(workspace / "cache", after)
    # The rebuilt export is byte-identical to the one before the damage: the cache served the real thing.
    assert {rel: (out / "variants" / "baseline" / rel).read_bytes() for rel in before} == before


def test_two_builds_of_one_recipe_at_once_both_succeed(tmp_path):
    recipe = tmp_path / "rel.yaml"
    recipe.write_text(recipe_text(seed=5))
    env = env_for(tmp_path)
    command = [sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(tmp_path / "out"), "--no-profile"]
    procs = [subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    FIGURES["builds"] += 2
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    # The cache lock makes the second build wait and take what the first one made.
    ran = [stages(err, "running") for _, err in results]
    assert not (ran[0] & ran[1]), f"both builds ran the same stages: {ran}"
    manifest = assert_complete(tmp_path / "out" / "rel", recipe)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rel"]
    assert_cache_consistent(tmp_path / "cache", manifest)


# ---------------------------------------------------------------- resource guards

def test_a_model_that_cannot_fit_is_refused_before_allocation(tmp_path):
    recipe = tmp_path / "huge.yaml"
    recipe.write_text(recipe_text(name="huge", model=(
        "model:\n  source: synthetic\n  family: llama\n  config: {hidden_size: 16384, num_hidden_layers: 200, "
        "intermediate_size: 53248, num_attention_heads: 128, num_key_value_heads: 8}\n")))
    started = time.monotonic()
    # GNU time measures the build from a process of its own: a child of this (large) pytest process would report
    # this process's peak as its own, since Linux carries the old address space's high-water mark across exec.
    rss_file = tmp_path / "peak-rss-kb"
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), sys.executable, "-m", "recipec.cli",
                             "build", str(recipe), "--out", str(tmp_path / "out"), "--no-profile"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_for(tmp_path))
    output: list[bytes] = []
    # Drain both pipes while waiting: a child blocked on a full pipe would never exit.
    readers = [threading.Thread(target=lambda s=s: output.append(s.read())) for s in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()
    proc.wait()
    for r in readers:
        r.join()
    seconds = time.monotonic() - started
    err = b"".join(output).decode()
    peak_mib = int(rss_file.read_text().split()[-1]) / 1024
    print(f"refused in {seconds:.1f} s at a peak RSS of {peak_mib:.0f} MiB: {err.strip().splitlines()[-1]}")
    assert proc.returncode == cli.EXIT_FAILED, err
    assert "Traceback" not in err and "internal error" not in err, err
    # The numbers: parameter count, the memory it needs and the memory there is.
    assert re.search(r"model has [\d,.]+M parameters: at float32, load needs about [\d,.]+ GiB .* only [\d,.]+ GiB", err), err
    # The weights alone would be ~2.4 TiB; Python with torch and transformers imported is ~0.5 GiB.
    assert peak_mib < 1536, f"peak RSS {peak_mib:.0f} MiB: something was allocated"
    assert seconds < 180
    assert not (tmp_path / "out" / "huge").exists()
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def test_a_path_model_whose_config_cannot_fit_is_refused_before_loading(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 16384, "num_hidden_layers": 200,
        "intermediate_size": 53248, "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128000}))
    # No weight file at all: reaching the loader would fail differently, after allocating the model.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(name="huge", model="model: {source: path, path: model}\n"))
    rc = cli.main(["build", str(recipe), "--out", str(tmp_path / "out"), "--no-profile", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_FAILED and re.search(r"parameters: .* needs about [\d,.]+ GiB", err), err


def test_a_build_that_would_not_fit_on_disk_is_refused_before_writing(tmp_path, monkeypatch):
    """With free space reported as 1 MiB, a build must stop with a clear error before any stage writes.
    The proposed fix reads shutil.disk_usage of the cache and of --out; this test fakes it."""
    from collections import namedtuple

    from recipec import workflow
    from recipec.build import stages
    from recipec.errors import PassError
    from recipec.plan.planner import load_plan

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2 ** 40, 2 ** 40 - 2 ** 20, 2 ** 20))

    def no_write(*args, **kwargs):
        raise AssertionError("a stage started writing without a free-space check")

    monkeypatch.setattr(stages, "_apply", no_write)
    recipe = tmp_path / "rel.yaml"
    recipe.write_text(recipe_text())
    with pytest.raises(PassError, match=r"(?i)disk|space"):
        workflow.build(load_plan(recipe), workflow.BuildOptions(out_root=tmp_path / "out", cache_root=tmp_path / "cache",
                                                                profile=False))
    assert not (tmp_path / "out" / "rel").exists()


# ---------------------------------------------------------------- security

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
            yield node, owner, name


def test_sources_use_safe_yaml_and_weights_only_torch_load():
    """Every yaml load in recipec is the safe one; every torch.load passes weights_only=True."""
    problems = []
    for path in sorted((ROOT / "recipec").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load", "Loader", "UnsafeLoader",
                                            "FullLoader", "unsafe_load_all", "full_load_all"):
                problems.append(f"{where}: yaml.{name}")
            if owner == "torch" and name == "load":
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner == "pickle" and name in ("load", "loads"):
                problems.append(f"{where}: pickle.{name}")
    assert not problems, problems


def test_yaml_python_tags_never_run(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"recipe: 1\nname: !!python/object/apply:os.system ['touch {marker}']\nmodel: {{source: synthetic}}\n"
                      f"x: !!python/object/apply:subprocess.check_call [['touch', '{marker}']]\n")
    for command in (["validate", str(recipe)], ["plan", str(recipe)],
                    ["build", str(recipe), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]):
        assert cli.main(command) == cli.EXIT_INVALID
        assert "unsupported YAML tag" in capsys.readouterr().err
    assert not marker.exists()


REMOTE_CODE = '''\
import os
import sys
open(os.environ["RECIPEC_TEST_MARKER"], "w").write("remote code ran")
sys.stderr.write("REMOTE CODE RAN\\n")
sys.stderr.flush()
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    def __init__(self, **kwargs):
        raise ValueError("remote code refuses to build a config")
'''


def _remote_code_model(where: Path) -> Path:
    """A tiny Llama whose config.json points AutoConfig at code beside it (auto_map): code that leaves a
    marker file when it is imported and then refuses to build a config."""
    from conftest import make_tiny_model

    make_tiny_model("llama", where, tokenizer=True, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    config = json.loads((where / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (where / "config.json").write_text(json.dumps(config))
    (where / "configuration_evil.py").write_text(REMOTE_CODE)
    return where


def _snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple]:
    """Every path below root (links not followed) with its kind, size, mtime and, for files, sha256."""
    found = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        st_ = path.lstat()
        kind = "link" if path.is_symlink() else ("dir" if path.is_dir() else "file")
        digest = file_digest(path) if kind == "file" else (os.readlink(path) if kind == "link" else None)
        found[str(path.relative_to(root))] = (kind, st_.st_size if kind == "file" else 0, digest,
                                               st_.st_mtime_ns if kind == "file" else 0)
    return found


@pytest.fixture(scope="module")
def outside_paths_build(tmp_path_factory):
    """A recipe whose model.path and data paths climb out of its directory, built into an out/ whose
    <name> is a symlink to another directory and which holds stale-looking symlinks (names that
    recover_interrupted() cleans, as if left by dead builds: pid 999999999 does not exist). The model
    directory carries remote code that trust_remote_code (off) must keep from running."""
    tmp = tmp_path_factory.mktemp("paths")
    models, data, project = tmp / "models", tmp / "data", tmp / "project" / "recipes"
    for d in (data, project, tmp / "home"):
        d.mkdir(parents=True)
    _remote_code_model(models / "tiny")
    rows = [json.dumps({"text": " ".join(f"w{(i * 7 + j) % 120 + 3}" for j in range(40))}) for i in range(8)]
    (data / "secret.jsonl").write_text("\n".join(rows) + "\n")
    victim = tmp / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("do not touch")
    out = tmp / "out"
    out.mkdir()
    (out / "rel").symlink_to(victim, target_is_directory=True)
    (out / ".rel.staging-999999999-abcdef").symlink_to(victim, target_is_directory=True)
    (out / ".rel.previous-999999999").symlink_to(victim / "keep.txt")
    passes = QUANTIZE if "quantize" in PASSES else EXPORT
    recipe = project / "rel.yaml"
    recipe.write_text(recipe_text(name="rel", passes=passes, model="model: {source: path, path: ../../models/tiny}\n")
                      .replace("  eval: {samples: 4, seq_len: 16}",
                               "  eval: {source: jsonl, path: ../../data/secret.jsonl, samples: 4, seq_len: 16}"))
    before = _snapshot(tmp, skip=(out, tmp / "cache"))
    result = run_recipec("build", str(recipe), "--out", str(out), "--no-profile", env=_isolated_env(tmp), cwd=project)
    after = _snapshot(tmp, skip=(out, tmp / "cache"))
    return {"tmp": tmp, "result": result, "before": before, "after": after, "recipe": recipe}


def test_recipe_paths_are_only_read_and_symlinks_in_out_not_followed(outside_paths_build):
    """After the build, nothing outside out/<name>/ and the cache differs (the model, the data, the
    symlink targets, a fake HOME), out/<name>/ is a real directory, and the remote code never ran."""
    tmp, result = outside_paths_build["tmp"], outside_paths_build["result"]
    assert result.returncode == 0, result.stderr
    assert not (tmp / "remote-code-ran").exists(), "trust_remote_code is off, yet the model's Python code ran"
    assert "REMOTE CODE RAN" not in result.stderr and "trust_remote_code" not in result.stderr
    before, after = outside_paths_build["before"], outside_paths_build["after"]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    # onnxruntime keeps a telemetry device id in ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ whatever the
    # recipe says; that is the library's, not a recipe path's doing (docs/reliability.md).
    library = "home/.cache/Microsoft"
    assert not [k for k in changed if not (k == "home/.cache" or k.startswith(library))], \
        f"written outside out/rel and the cache: {changed}"
    victim = tmp / "victim"
    assert (victim / "keep.txt").read_text() == "do not touch" and [p.name for p in victim.iterdir()] == ["keep.txt"]
    out = tmp / "out" / "rel"
    assert out.is_dir() and not out.is_symlink()
    assert_complete(out, outside_paths_build["recipe"])


def test_symlinks_in_out_are_cleaned_up(outside_paths_build):
    """The build swaps the symlinked out/<name> away and recover_interrupted() meets the stale links: none
    of them may stay in out/, where every later build would trip over them again."""
    assert outside_paths_build["result"].returncode == 0
    leftovers = sorted(p.name for p in (outside_paths_build["tmp"] / "out").iterdir() if p.name != "rel")
    assert not leftovers, f"left in out/: {leftovers}"


def _isolated_env(tmp_path: Path) -> dict:
    """HOME and the Hugging Face caches inside tmp_path: remote code is copied into HF_MODULES_CACHE."""
    home = tmp_path / "home"
    return {**env_for(tmp_path), "HOME": str(home), "HF_HOME": str(home / "hf"), "XDG_CACHE_HOME": str(home / ".cache"),
            "RECIPEC_TEST_MARKER": str(tmp_path / "remote-code-ran")}


def test_trust_remote_code_runs_only_when_asked_and_says_so(tmp_path):
    """With trust_remote_code: true the model's code runs, after the warning; it raises in its config
    class, which the user sees as an error naming the model, not a traceback. (Off, it never runs:
    test_recipe_paths_only_read_outside_out_and_the_cache.)"""
    _remote_code_model(tmp_path / "model")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(name="remote", model="model: {source: path, path: model, trust_remote_code: true}\n"))
    result = run_recipec("build", str(recipe), "--out", str(tmp_path / "out"), "--no-profile", env=_isolated_env(tmp_path))
    err = result.stderr
    assert (tmp_path / "remote-code-ran").exists(), "trust_remote_code: true, yet the model's code did not run"
    warning, ran = err.find("warning: trust_remote_code is on"), err.find("REMOTE CODE RAN")
    assert 0 <= warning < ran, f"the code ran before (or without) the warning: {err}"
    assert result.returncode == cli.EXIT_FAILED and "remote code refuses to build a config" in err[ran:], err
    assert "Traceback" not in err and "internal error" not in err, err


@pytest.mark.skipif(not any(p.check for op, p in PASSES.items() if p.consumes == "torch"),
                    reason="no registered PyTorch pass has a validation-time check (which reads the model config)")
def test_validate_does_not_run_remote_code_silently(tmp_path):
    """Passes with a `check` make validate read the source config (planner._source_config); with
    trust_remote_code that imports the model's Python code, which must not happen without the warning."""
    op = next(op for op, p in PASSES.items() if p.check and p.consumes == "torch")
    _remote_code_model(tmp_path / "model")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(name="remote", passes=f"  - {{id: p, op: {op}}}\n",
                                  model="model: {source: path, path: model, trust_remote_code: true}\n"))
    result = run_recipec("validate", str(recipe), env=_isolated_env(tmp_path))
    err = result.stderr
    ran = err.find("REMOTE CODE RAN")
    assert ran < 0 or 0 <= err.find("trust_remote_code") < ran, f"validate ran the model's code without a warning: {err}"
    assert result.returncode in (cli.EXIT_OK, cli.EXIT_INVALID) and "internal error" not in err, err


def test_pickled_weights_cannot_run_code(tmp_path, capsys):
    """A checkpoint with only pytorch_model.bin, whose pickle would call os.system: loading refuses it
    (weights_only), nothing runs, and the user gets an error naming the problem, not a traceback."""
    import torch
    from conftest import make_tiny_model

    model = make_tiny_model("llama", tmp_path / "model", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model.embed_tokens.weight": Payload()}, model / "pytorch_model.bin")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(name="pickle", model="model: {source: path, path: model}\n"))
    rc = cli.main(["build", str(recipe), "--out", str(tmp_path / "out"), "--no-profile", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert not marker.exists(), "unpickling the weights ran code"
    assert rc == cli.EXIT_FAILED, err
    assert not (tmp_path / "out" / "pickle").exists()
    assert "internal error" not in err, f"the refusal should be a user-facing error: {err}"


NAME_OR_ID = st.one_of(st.text(max_size=70), st.sampled_from(["..", ".", "a/..", "../x", "a\\b", "a/b", "-a", ".a", "a.",
                                                              "a..b", "x" * 64, "x" * 65, "a\x00b", "A", "a b", "ａ"]))


@settings(derandomize=True, deadline=None, max_examples=300, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=NAME_OR_ID, stage_id=NAME_OR_ID)
def test_names_and_ids_that_validate_are_single_path_components(tmp_path_factory, name, stage_id):
    """Whatever a recipe's name or a pass id is, if the recipe validates then out/<name>/ and
    variants/<id>/ are directories right below their parent: no separator, no '.', '..' or hidden name."""
    from recipec.errors import RecipeInvalid
    from recipec.plan.planner import load_plan

    where = tmp_path_factory.getbasetemp() / "names"
    where.mkdir(exist_ok=True)
    recipe = where / "r.yaml"
    recipe.write_text(f"recipe: 1\nname: {json.dumps(name)}\n" + MODEL.format(seed=0) +
                      f"passes:\n  - {{id: {json.dumps(stage_id)}, op: export}}\n")
    try:
        load_plan(recipe, with_keys=False)
    except RecipeInvalid:
        return
    out = Path("/srv/out")
    for part, parent in ((name, out), (stage_id, out / "x" / "variants")):
        assert "/" not in part and "\\" not in part and "\x00" not in part and not part.startswith("."), part
        assert (parent / part).parent == parent and os.path.normpath(parent / part) == str(parent / part), part
