"""The stage cache at an s3:// URL, against a real S3 API on loopback (moto's server, through s3fs): entries are
published files first and record last, read through a local mirror with their digests verified, built once
when two workers want the same key (a lease at the URL, with an expiry and a heartbeat), and a missing bucket
or unreachable endpoint is one clear error naming the URL."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from recipec.build.cache import StageCache
from recipec.build.store.location import resolve
from recipec.build.store.remote import RemoteStore
from recipec.errors import RecipecError

sys.path.insert(0, str(Path(__file__).parent))
from conftest import free_port  # noqa: E402
from test_build import TINY, model_bytes, recipec  # noqa: E402 - the tiny recipe and CLI runner test_build uses

KEY = "k" * 64


@pytest.fixture(scope="module")
def endpoint():
    """moto's S3 server on a free loopback port, and the environment s3fs and botocore read it from."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}.items():
            env.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "RECIPEC_CACHE_LEASE_SECONDS"):
            env.delenv(name, raising=False)
        yield url
    server.stop()


@pytest.fixture
def bucket(endpoint):
    """A fresh bucket: (its boto3 client, its name, the cache URL under it)."""
    client = boto3.client("s3", endpoint_url=endpoint)
    name = f"cache-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name, f"s3://{name}/team/cache"


def open_cache(url: str, mirror: Path, monkeypatch, warnings: list[str] | None = None) -> StageCache:
    monkeypatch.setenv("RECIPEC_CACHE_LOCAL", str(mirror))
    return StageCache(url, warn=warnings.append if warnings is not None else lambda _: None)


def commit(cache: StageCache, key: str = KEY, payload: bytes = b"weights"):
    work = cache.new_workdir(key)
    (work / "output" / "model.onnx").write_bytes(payload)
    (work / "output" / "sub").mkdir()
    (work / "output" / "sub" / "a.json").write_text("{}")
    return cache.commit(key, work, {"m": 1}, 0.5)


def objects(client, name: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=name).get("Contents", []))


def test_an_entry_committed_on_one_node_is_downloaded_and_verified_on_another(bucket, tmp_path, monkeypatch):
    client, name, url = bucket
    writer = open_cache(url, tmp_path / "node-a", monkeypatch)
    commit(writer)
    keys = objects(client, name)
    assert f"team/cache/stages/{KEY}/entry.json" in keys
    uploads = {k.split("/")[4] for k in keys if "/output/" in k}
    assert len(uploads) == 1
    assert {k.split("/output/")[1] for k in keys if "/output/" in k} == {"model.onnx", "sub/a.json"}

    reader = open_cache(url, tmp_path / "node-b", monkeypatch)
    assert reader.root == tmp_path / "node-b" and reader.contains(KEY)
    entry = reader.lookup(KEY)
    assert entry is not None and entry.output == tmp_path / "node-b" / "stages" / KEY / "output"
    assert (entry.output / "model.onnx").read_bytes() == b"weights"
    assert entry.meta == writer.lookup(KEY).meta  # the record's remote fields stay remote
    assert not list((tmp_path / "node-b" / "tmp").iterdir())


def test_a_second_lookup_on_the_same_mirror_reads_nothing_remote(bucket, tmp_path, monkeypatch):
    _, _, url = bucket
    commit(open_cache(url, tmp_path / "node-a", monkeypatch))
    assert open_cache(url, tmp_path / "node-b", monkeypatch).lookup(KEY) is not None
    again = open_cache(url, tmp_path / "node-b", monkeypatch)
    remote_calls: list[str] = []
    for method in ("read", "has_record", "download", "create", "replace", "publish"):
        monkeypatch.setattr(RemoteStore, method, lambda *a, _m=method, **k: remote_calls.append(_m))
    with again.lock(KEY):
        entry = again.lookup(KEY)
    assert entry is not None and (entry.output / "model.onnx").read_bytes() == b"weights"
    assert again.contains(KEY) and remote_calls == []


def test_a_tampered_remote_file_is_detected_and_the_entry_discarded(bucket, tmp_path, monkeypatch):
    client, name, url = bucket
    commit(open_cache(url, tmp_path / "node-a", monkeypatch))
    model = next(k for k in objects(client, name) if k.endswith("/output/model.onnx"))
    client.put_object(Bucket=name, Key=model, Body=b"weightz")
    warnings: list[str] = []
    reader = open_cache(url, tmp_path / "node-b", monkeypatch, warnings)
    assert reader.lookup(KEY) is None
    assert len(warnings) == 1 and "corrupt" in warnings[0] and url in warnings[0] and "sha256" in warnings[0]
    assert not (tmp_path / "node-b" / "stages" / KEY).exists() and not list((tmp_path / "node-b" / "tmp").iterdir())
    assert not [k for k in objects(client, name) if "/stages/" in k]  # record and files gone: the next build remakes it
    assert not reader.contains(KEY)


class Died(BaseException):
    """A worker killed between two requests (not an Exception: nothing on the way may handle it)."""


def test_the_record_is_written_last_and_an_interrupted_publish_leaves_no_entry(bucket, tmp_path, monkeypatch):
    client, name, url = bucket
    calls: list[str] = []
    create = RemoteStore.create

    def spy_create(self, path, data):
        uploaded = [k for k in objects(client, name) if "/output/" in k]
        calls.append(f"create {path.rsplit('/', 1)[1]} after {len(uploaded)} files")
        return create(self, path, data)
    monkeypatch.setattr(RemoteStore, "create", spy_create)
    commit(open_cache(url, tmp_path / "node-a", monkeypatch))
    assert calls == ["create entry.json after 2 files"]

    def die(self, path, data):
        raise Died
    monkeypatch.setattr(RemoteStore, "create", die)
    with pytest.raises(Died):
        commit(open_cache(url, tmp_path / "node-c", monkeypatch), "c" * 64)
    monkeypatch.setattr(RemoteStore, "create", create)
    left = [k for k in objects(client, name) if f"/stages/{'c' * 64}/" in k]
    assert len(left) == 2 and all("/output/" in k for k in left)  # files without a record
    reader = open_cache(url, tmp_path / "node-d", monkeypatch)
    assert not reader.contains("c" * 64) and reader.lookup("c" * 64) is None


CONTENDER = """
import os, sys, time
from pathlib import Path
from recipec.build.cache import StageCache
url, key, go = sys.argv[1:4]
cache = StageCache(url, warn=lambda message: print("warn", message, flush=True))
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.01)
waited = []
with cache.lock(key, on_wait=lambda: waited.append(True)):
    entry = cache.lookup(key)
    if entry is None:
        work = cache.new_workdir(key)
        (work / "output" / "model.onnx").write_text(str(os.getpid()))
        time.sleep(2.0)
        entry = cache.commit(key, work, {}, 2.0)
        print("built", (entry.output / "model.onnx").read_text(), flush=True)
    else:
        print("reused", (entry.output / "model.onnx").read_text(), "after waiting" if waited else "", flush=True)
"""


def test_two_processes_on_one_key_build_it_once(bucket, tmp_path):
    """Two nodes (two processes, each with its own mirror, so only the lease at the URL is shared)."""
    _, _, url = bucket
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, url, KEY, str(go)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RECIPEC_CACHE_LOCAL": str(tmp_path / f"node-{i}"),
                                   "RECIPEC_CACHE_LEASE_SECONDS": "6"}) for i in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    go.touch()
    lines = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs), lines
    built, reused = lines
    assert built.startswith("built ") and reused == f"reused {built.split()[1]} after waiting", lines


def write_lease(client, name: str, owner: str, expires: float) -> None:
    body = json.dumps({"owner": owner, "host": "gone", "pid": 1, "expires": expires})
    client.put_object(Bucket=name, Key=f"team/cache/leases/{KEY}.json", Body=body)


def read_lease(client, name: str) -> dict:
    return json.loads(client.get_object(Bucket=name, Key=f"team/cache/leases/{KEY}.json")["Body"].read())


def test_the_lease_of_a_dead_worker_is_taken_over(bucket, tmp_path, monkeypatch):
    client, name, url = bucket
    write_lease(client, name, "gone:1:dead", time.time() - 30)
    warnings: list[str] = []
    cache = open_cache(url, tmp_path / "node", monkeypatch, warnings)
    started = time.monotonic()
    with cache.lock(KEY):
        assert time.monotonic() - started < 2
        assert read_lease(client, name)["owner"].startswith(f"{socket.gethostname()}:{os.getpid()}:")
        commit(cache)
    assert warnings == [f"cache key {KEY[:12]}: took over the build from gone:1:dead, whose lease ran out"]
    assert f"team/cache/leases/{KEY}.json" not in objects(client, name)  # released


def test_a_waiter_waits_for_a_live_lease_then_takes_it_over_when_it_runs_out(bucket, tmp_path, monkeypatch):
    client, name, url = bucket
    cache = open_cache(url, tmp_path / "node", monkeypatch, [])  # first: opening it may take seconds on a busy host
    expires = time.time() + 1.5
    write_lease(client, name, "stalled:2:gone", expires)
    waits: list[bool] = []
    with cache.lock(KEY, on_wait=lambda: waits.append(True)):
        taken = time.time()
    assert waits == [True] and expires <= taken < expires + 1  # woken when it ran out, not a backoff step later


def test_the_heartbeat_keeps_a_working_holder_s_lease(bucket, tmp_path, monkeypatch):
    """A term of 0.9 s, held for 2 s or until a renewal is seen: without renewals the other worker would take
    over after 0.9 s. (On a busy host a renewal can come late; the takeover check below is what matters.)"""
    client, name, url = bucket
    monkeypatch.setenv("RECIPEC_CACHE_LEASE_SECONDS", "0.9")
    holder = open_cache(url, tmp_path / "node-a", monkeypatch)
    other = open_cache(url, tmp_path / "node-b", monkeypatch)
    times: dict[str, float] = {}

    def contend():
        with other.lock(KEY):
            times["other"] = time.monotonic()
    with holder.lock(KEY):
        first = read_lease(client, name)["expires"]
        thread = threading.Thread(target=contend)
        thread.start()
        time.sleep(2.0)
        deadline = time.monotonic() + 20
        while read_lease(client, name)["expires"] <= first + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert read_lease(client, name)["expires"] > first + 1
        times["released"] = time.monotonic()
    thread.join(timeout=20)
    assert times["other"] >= times["released"]


def test_a_missing_bucket_is_one_clear_error_naming_the_url(endpoint, tmp_path, monkeypatch):
    started = time.monotonic()
    with pytest.raises(RecipecError) as caught:
        open_cache("s3://no-such-bucket-here/cache", tmp_path / "m", monkeypatch)
    assert "s3://no-such-bucket-here/cache" in str(caught.value) and "does not exist" in str(caught.value)
    assert time.monotonic() - started < 10 and not (tmp_path / "m").exists()


def test_an_unreachable_endpoint_fails_fast_naming_the_url(endpoint, tmp_path, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    started = time.monotonic()
    with pytest.raises(RecipecError) as caught:
        open_cache("s3://bucket/cache", tmp_path / "m", monkeypatch)
    assert "s3://bucket/cache" in str(caught.value) and dead in str(caught.value)
    assert time.monotonic() - started < 10


def test_where_a_cache_lives(tmp_path, monkeypatch):
    """argparse's type=Path folds s3:// into s3:/; file:// and plain paths stay local caches."""
    monkeypatch.setenv("RECIPEC_CACHE_LOCAL", str(tmp_path / "mirror"))
    assert resolve(Path("s3://bucket/prefix/")).url == "s3://bucket/prefix"
    assert resolve("s3://bucket/prefix").local == tmp_path / "mirror"
    assert resolve(f"file://{tmp_path}/c") == resolve(tmp_path / "c") and resolve(tmp_path / "c").url is None
    assert resolve(Path(f"file://{tmp_path}/c")).local == tmp_path / "c"
    monkeypatch.delenv("RECIPEC_CACHE_LOCAL")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    mirror = resolve("gs://b/p").local
    assert mirror.parent == tmp_path / "xdg" / "recipec" / "mirrors" and mirror != resolve("gs://b/q").local


def test_a_cache_crosses_processes_by_its_url(bucket, tmp_path, monkeypatch):
    _, _, url = bucket
    monkeypatch.setenv("RECIPEC_CACHE_LOCAL", str(tmp_path / "node-a"))
    cache = StageCache(url, warn=print)  # as a Ray task's argument: a picklable warn, a connected client
    commit(cache)
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.location == url and copy.lookup(KEY) is not None


def test_a_cli_build_with_an_s3_cache_is_served_from_s3_on_a_fresh_node(bucket, tmp_path):
    client, name, url = bucket
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    outs = []
    for node in ("a", "b"):
        env = {**os.environ, "RECIPEC_CACHE_LOCAL": str(tmp_path / f"mirror-{node}"), "COLUMNS": "200"}
        out = tmp_path / f"out-{node}"
        result = recipec("build", str(recipe), "--cache-dir", url, "--out", str(out), "--no-profile", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        outs.append(out / "tiny")
    manifest = json.loads((outs[1] / "manifest.json").read_text())
    assert manifest["stages"] and all(s["cached"] for s in manifest["stages"])
    assert "running" not in result.stderr and result.stderr.count("cached ") >= len(manifest["stages"]), result.stderr
    first, second = model_bytes(outs[0]), model_bytes(outs[1])
    assert set(first) >= {"variants/baseline/model.onnx", "variants/ex17/model.onnx"} and first == second

    missing = recipec("build", str(recipe), "--cache-dir", "s3://no-such-bucket-here/x", "--out", str(tmp_path / "o"),
                      "--no-profile", env={**os.environ, "RECIPEC_CACHE_LOCAL": str(tmp_path / "mirror-c")})
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "s3://no-such-bucket-here/x" in missing.stdout + missing.stderr
