"""bench/gpu_check.sh is run where a GPU is lent, for a few minutes, so it must work the first time: its
--cpu dry run takes the same path end to end on the CPU at a tiny size."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "VIRTUAL_ENV": sys.prefix,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "recipec build on cpu" in out and "NOT MEASURED" not in out, out
    table = out[out.index("variant"):]
    for variant in ("baseline", "fp16", "int4"):
        assert any(line.startswith(variant) and len(line.split()) >= 8 for line in table.splitlines()), table
    assert "batch 1: TTFT" in out and "batch 8: TTFT" in out, out
    assert (tmp_path / "out" / "report.json").is_file()
