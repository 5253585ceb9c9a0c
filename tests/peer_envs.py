"""Virtual environments with other versions of the libraries recipec's output meets (an older onnxruntime,
the transformers Optimum pins), made the way bench/ makes its peers' (bench/common.py ensure_venv), cached
under ~/.cache/recipec-test/<name> and created by the first test that needs one, within a time bound.

Each environment runs this checkout's recipec from PYTHONPATH, so a probe there imports the same code.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RECIPEC_TEST_CACHE", Path.home() / ".cache" / "recipec-test"))
# name -> (pip requirements, import that proves the environment works). onnx is there because the probes import
# recipec.onnx.sessions, which imports it.
PEERS: dict[str, tuple[list[str], str]] = {
    "ort-1.20": (["onnxruntime==1.20.1", "numpy", "onnx"], "import onnxruntime, onnx"),
    "ort-1.22": (["onnxruntime==1.22.1", "numpy", "onnx"], "import onnxruntime, onnx"),
    # optimum-onnx 0.1.0 pins transformers < 4.58 (bench/common.py); its tokenizers need no torch
    "transformers-4.57": (["transformers==4.57.1"], "import transformers"),
    # lm-evaluation-harness against `recipec serve` (tests/test_lm_eval.py). Its own environment, not the dev
    # extra: it brings ~40 packages (datasets, evaluate, scikit-learn, pandas, pyarrow …), and datasets caps
    # fsspec (<= 2026.9.0 in datasets 5.2) while s3fs, in the dev extra, pins fsspec to its own release, so the
    # two would stop resolving together at the next s3fs. [api] brings aiohttp and tenacity for
    # local-completions; transformers (no torch) is its tokenizer, at this environment's version, the one that
    # wrote the variants' tokenizer files.
    "lm-eval-0.4.13": (["lm-eval[api]==0.4.13", f"transformers=={version('transformers')}"],
                       "import lm_eval.models.openai_completions, transformers"),
}
INSTALL_SECONDS = 600


def peer_python(name: str) -> Path:
    """The python of environment `name`, created when missing or stale; skips the test when it cannot be made
    (no network, no wheel for this Python), saying why."""
    requirements, probe = PEERS[name]
    CACHE.mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers may ask for the same environment at once: the second waits for the first's
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure(name, requirements, probe)


def _ensure(name: str, requirements: list[str], probe: str) -> Path:
    venv = CACHE / name
    python, marker = venv / "bin" / "python", venv / ".requirements.json"
    wanted = json.dumps(requirements)
    if marker.is_file() and marker.read_text() == wanted and _works(python, probe):
        return python
    try:
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(python), "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check", *requirements])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        output = (getattr(exc, "stderr", None) or getattr(exc, "output", None) or b"").decode(errors="replace")
        pytest.skip(f"cannot create the {name} environment in {venv} ({' '.join(requirements)}): "
                    f"{output.strip().splitlines()[-1:] or exc}")
    if not _works(python, probe):
        pytest.skip(f"{name}: installed in {venv}, but `{probe}` fails there")
    marker.write_text(wanted)
    return python


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=INSTALL_SECONDS)


def _works(python: Path, probe: str) -> bool:
    return python.exists() and subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0


def run_probe(python: Path, *args: str, timeout: float = 300) -> dict:
    """tests/ort_probe.py in that environment with this checkout's recipec; returns its JSON answer."""
    return run_python(python, [str(ROOT / "tests" / "ort_probe.py"), *args], timeout)


def run_python(python: Path, arguments: list[str], timeout: float = 300) -> dict:
    """python ARGUMENTS (a script or -c CODE) there, which prints JSON as its last line; returns it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONNOUSERSITE": "1"}
    done = subprocess.run([str(python), *arguments], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
