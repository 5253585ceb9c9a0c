"""The Ray executor on a real two-node Ray cluster on loopback (ray.cluster_utils.Cluster starts a head and a
worker raylet, each with its own CPUs), driven through the CLI as a user would."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_build import recipec

ray = pytest.importorskip("ray", reason="the Ray executor needs the ray extra (in dev)")

BRANCHED = """\
recipe: 1
name: {name}
model:
  source: synthetic
  family: llama
  config: {{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 128}}
data:
  eval: {{samples: 2, seq_len: 16}}
  calibration: {{samples: 2, seq_len: 16}}
passes:
  - {{id: ex17, op: export, after: source, with: {{opset: 17}}}}
  - {{id: fused, op: fuse, after: source}}
  - {{id: int8, op: quantize, after: source, with: {{scheme: int8-dynamic, min_top1: 0}}}}
  - {{id: int4, op: quantize, after: source, with: {{scheme: int4, min_top1: 0}}}}
{extra}serving:
  batching: {{policy: continuous, max_batch_size: 2}}
  workload: {{prompt_tokens: 8, output_tokens: 3, requests: 2, warmup_requests: 1, concurrency: [1]}}
"""
SLOW_STAGE = """\
  - {id: slow, op: distill, after: source, with: {teacher: source, steps: 600, batch_size: 2}}
"""


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "resources": {"head": 1}})
    c.add_node(num_cpus=1, resources={"worker": 1})
    c.wait_for_nodes()
    yield c
    c.shutdown()


def env_for(tmp: Path) -> dict:
    return {**os.environ, "RECIPEC_CACHE": str(tmp / "cache"), "COLUMNS": "200", "RAY_DEDUP_LOGS": "0"}


def write(tmp: Path, name: str, extra: str = "") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(BRANCHED.format(name=name, extra=extra))
    return path


def model_digests(out: Path) -> dict[str, str]:
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("variants/*/model.onnx"))}


def test_branches_run_on_both_nodes_and_match_the_local_build(cluster, tmp_path):
    recipe = write(tmp_path, "branched")
    remote = recipec("build", str(recipe), "--out", str(tmp_path / "ray"), "--executor", "ray",
                     "--ray-address", cluster.address, env=env_for(tmp_path / "a"), timeout=900)
    assert remote.returncode == 0, remote.stderr[-3000:]
    local = recipec("build", str(recipe), "--out", str(tmp_path / "local"), "--no-profile", env=env_for(tmp_path / "b"))
    assert local.returncode == 0, local.stderr[-3000:]
    assert model_digests(tmp_path / "ray/branched") == model_digests(tmp_path / "local/branched")  # byte-identical
    manifest = json.loads((tmp_path / "ray/branched/manifest.json").read_text())
    nodes = {s["node"].split()[0] for s in manifest["stages"] if not s["cached"]}
    assert len(nodes) == 2, manifest["stages"]  # the branches after baseline spread over both nodes
    report = json.loads((tmp_path / "ray/branched/report.json").read_text())
    assert all(v["node"] and v["hardware"]["name"] for v in report["variants"].values())  # where each was measured
    assert all(v["serving"] for v in report["variants"].values())


@pytest.mark.slow
def test_a_worker_killed_during_a_stage_still_gives_a_complete_build(cluster, tmp_path):
    recipe = write(tmp_path, "killed", SLOW_STAGE)
    proc = subprocess.Popen([sys.executable, "-m", "recipec.cli", "build", str(recipe), "--out", str(tmp_path / "out"),
                             "--no-profile", "--executor", "ray", "--ray-address", cluster.address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_for(tmp_path))
    seen, killed, deadline = "", None, time.time() + 600
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        match = re.search(r"pid=(\d+)\).*running slow", line)
        if match and killed is None:
            killed = int(match.group(1))
            time.sleep(1.0)  # inside the distillation loop, not at its first line
            os.kill(killed, signal.SIGKILL)
    proc.wait(timeout=60)
    assert killed, seen[-3000:]
    assert proc.returncode == 0, seen[-3000:]
    assert len(re.findall(r"running slow", seen)) >= 2  # Ray ran the stage again after its worker died
    manifest = json.loads((tmp_path / "out/killed/manifest.json").read_text())
    assert {s["id"] for s in manifest["stages"]} >= {"source", "baseline", "slow", "slow-export", "int8", "int4"}
    assert not list((tmp_path / "cache/tmp").iterdir())  # no partial entry left behind


@pytest.mark.slow  # tests/test_remote_cache.py and test_reliability.py run concurrent builds of one key by default
def test_two_concurrent_builds_build_every_key_once(cluster, tmp_path):
    recipe = write(tmp_path, "twice")
    env = env_for(tmp_path)
    cmd = [sys.executable, "-m", "recipec.cli", "build", str(recipe), "--no-profile", "--executor", "ray",
           "--ray-address", cluster.address]
    procs = [subprocess.Popen(cmd + ["--out", str(tmp_path / f"out{i}")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    ran = re.findall(r"running (\S+) \(", "".join(outputs))
    assert sorted(ran) == sorted(set(ran)) and len(ran) == 6, ran  # every stage built once across both builds
    assert model_digests(tmp_path / "out0/twice") == model_digests(tmp_path / "out1/twice")


def test_ray_missing_or_unreachable_is_a_clear_error(tmp_path):
    recipe = write(tmp_path, "nowhere")
    result = recipec("build", str(recipe), "--out", str(tmp_path / "out"), "--no-profile", "--executor", "ray",
                     "--ray-address", "127.0.0.1:1", env=env_for(tmp_path), timeout=300)
    assert result.returncode != 0
    assert "Ray cluster at 127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out/nowhere").exists()


def test_a_ray_build_with_an_s3_cache_serves_a_fresh_node_from_s3(cluster, tmp_path):
    """The workers reach the bucket with the driver's AWS_* settings (forwarded through Ray's runtime_env),
    and a later build on a node with an empty mirror finds every stage in S3."""
    server = pytest.importorskip("moto.server")
    import boto3

    moto = server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        aws = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
        boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="team")
        recipe = write(tmp_path, "s3")
        remote = recipec("build", str(recipe), "--out", str(tmp_path / "ray"), "--no-profile", "--executor", "ray",
                         "--ray-address", cluster.address, "--cache-dir", "s3://team/cache",
                         env={**os.environ, **aws, "RECIPEC_CACHE_LOCAL": str(tmp_path / "mirror-a")}, timeout=900)
        assert remote.returncode == 0, remote.stdout[-3000:] + remote.stderr[-3000:]
        fresh = recipec("build", str(recipe), "--out", str(tmp_path / "fresh"), "--no-profile",
                        "--cache-dir", "s3://team/cache",
                        env={**os.environ, **aws, "RECIPEC_CACHE_LOCAL": str(tmp_path / "mirror-b")})
        assert fresh.returncode == 0, fresh.stderr[-3000:]
        stages = json.loads((tmp_path / "fresh/s3/manifest.json").read_text())["stages"]
        assert stages and all(s["cached"] for s in stages)
        assert model_digests(tmp_path / "ray/s3") == model_digests(tmp_path / "fresh/s3")
    finally:
        moto.stop()
