"""recipec works when installed from its wheel, not only from a checkout: package data (the JSON Schemas,
py.typed) ships inside it, and nothing reads files from beside the package."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_build import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed (not editable) into a fresh target directory."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools leaves build/ and *.egg-info in the source tree, and a stale build/ would
    # put deleted modules into the next wheel.
    source = tmp / "source"
    shutil.copytree(ROOT / "recipec", source / "recipec", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
                    str(source)], check=True, capture_output=True, text=True, timeout=300)
    wheel = next((tmp / "dist").glob("recipec-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"recipec/schemas/recipe.schema.json", "recipec/schemas/report.schema.json", "recipec/py.typed"} <= set(names)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(tmp / "site"),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return tmp / "site"


def run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The wheel's own `recipec` script, run by this interpreter (its dependencies are installed here). The
    checkout is not importable from cwd, and the target directory comes before the editable install."""
    env = {**os.environ, "PYTHONPATH": str(site), "RECIPEC_CACHE": str(cwd / "cache"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(site / "bin" / "recipec"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_the_installed_package_is_the_wheel(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run([sys.executable, "-c", "import recipec; print(recipec.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(installed)


def test_schemas_print_from_the_wheel(installed, tmp_path):
    for which in ("report", "recipe"):
        result = run(installed, tmp_path, "schema", which)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == json.loads((ROOT / "schemas" / f"{which}.schema.json").read_text())


def test_validate_and_build_from_the_wheel(installed, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    result = run(installed, tmp_path, "validate", str(recipe))
    assert result.returncode == 0 and "valid" in result.stdout, result.stderr
    result = run(installed, tmp_path, "build", str(recipe), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "tiny" / "report.json").read_text())
    assert set(report["variants"]) == {"baseline", "ex17"}
    assert (tmp_path / "out" / "tiny" / "report.md").is_file()
