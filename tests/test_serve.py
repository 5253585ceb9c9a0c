"""`recipec serve` in a subprocess on a loopback port, driven over real HTTP: streamed and whole completions
equal the runtime's tokens, bad requests get 400 naming the field, /metrics is Prometheus text, a full
queue answers 429, a client that disconnects frees its slot, profile_url measures the server, and SIGINT
stops it cleanly. One tiny Llama (max batch 1, so a long request holds the only slot) serves them all."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest

from recipec.cli.serve import main
from recipec.profile.remote import profile_url
from recipec.runtime import lm as runtime
from recipec.serve.tokenizer import Detokenizer
from conftest import free_port

CONTEXT = 4096  # room for LONG tokens
LONG = 2000  # ~3 s of decoding here: a request that holds the slot while the test acts
SERVING = {"device": "cpu", "threads": 1,
           "batching": {"policy": "continuous", "max_batch_size": 1, "max_wait_ms": 5, "max_tokens_per_step": 4096},
           "workload": {"prompt_tokens": 6, "output_tokens": 4, "requests": 3, "warmup_requests": 1,
                        "concurrency": [1, 2], "seed": 0}}


def fake_build(root: Path, variant_dir: Path, serving: dict) -> Path:
    """out/<name>/ as far as serve reads it: manifest.json (resolved serving section) and variants/."""
    import shutil

    shutil.copytree(variant_dir, root / "variants" / "baseline")
    manifest = {"recipe": {"name": "tiny", "file": "tiny.yaml", "sha256": "0", "resolved": {"serving": serving}},
                "variants": {"baseline": {"stage": "baseline"}}, "device": "cpu"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def build(tmp_path_factory, export_op) -> Path:
    from conftest import make_tiny_model

    model = make_tiny_model("llama", tmp_path_factory.mktemp("serve-torch"), tokenizer=True,
                            max_position_embeddings=CONTEXT)
    variant = tmp_path_factory.mktemp("serve-onnx")
    export_op(model, variant)
    return fake_build(tmp_path_factory.mktemp("serve-build"), variant, SERVING)


@pytest.fixture(scope="module")
def server(build):
    port = free_port()
    # One client fills the whole queue here (fairness between clients is tests/test_serve_hardening.py's).
    proc = subprocess.Popen([sys.executable, "-m", "recipec.cli", "serve", str(build), "--port", str(port),
                             "--max-queue", "2", "--max-queue-per-client", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"recipec serve exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if _get(port, "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("recipec serve did not become healthy within 60 s")
    yield {"port": port, "proc": proc, "build": build}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _get(port: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type"), r.read().decode()
    finally:
        conn.close()


def _post(port: int, body, timeout: float = 60) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body if isinstance(body, str) else json.dumps(body),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _open_stream(port: int, body: dict):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    return conn, response


def _events(response):
    for line in response:
        if line.startswith(b"data: "):
            yield line[6:].strip()


def _metrics(port: int) -> dict[str, float]:
    status, ctype, text = _get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_streamed_and_whole_completions_are_the_runtimes_tokens(server):
    prompt = "w5 w17 w99 w3"
    variant = server["build"] / "variants" / "baseline"
    ids = runtime.tokenizer(variant)(prompt)["input_ids"]
    expected = runtime.load(variant, "cpu").generate([ids], 12).tokens[0]  # greedy, stops at eos as served
    conn, response = _open_stream(server["port"], {"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                   "stream_options": {"include_usage": True}})
    events = list(_events(response))
    conn.close()
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = [t for c in chunks if c["choices"] for t in c["choices"][0]["token_ids"]]
    assert streamed == expected
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                                   "total_tokens": len(ids) + len(expected)}
    status, whole = _post(server["port"], {"prompt": ids, "max_tokens": 12, "temperature": 0, "model": "tiny/baseline"})
    assert status == 200 and whole["choices"][0]["token_ids"] == expected
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    assert whole["choices"][0]["text"].split() == [f"w{t}" for t in expected if t > 2]


def test_seeded_sampling_repeats_and_seeds_differ(server):
    body = {"prompt": [5, 17, 99], "max_tokens": 8, "temperature": 2.0}
    runs = [_post(server["port"], {**body, "seed": seed})[1]["choices"][0]["token_ids"] for seed in (1, 1, 2, 3, 4)]
    assert runs[0] == runs[1]
    assert len({tuple(r) for r in runs}) > 1, "temperature 2 should not always give the same tokens"


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": [], "max_tokens": 4}, "prompt"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": CONTEXT}, "max_tokens"),
    ({"prompt": [1, 2], "temperature": -1}, "temperature"),
    ({"prompt": [1, 2], "top_p": 0}, "top_p"),
    ({"prompt": [1, 2], "stream": "yes"}, "stream"),
    ({"prompt": [1, 2], "n": 0}, "n"),
    ({"prompt": [1, 2], "n": 3}, "n"),  # three batch slots, where this server queues two
    ({"prompt": [1, 2], "stop": [""]}, "stop"),
    ({"prompt": [1, 2], "logprobs": 21}, "logprobs"),
    ({"prompt": [1, 2], "logprobs": True}, "logprobs"),
    ({"prompt": [1, 2], "stop_token_ids": [99999]}, "stop_token_ids"),
    ({"prompt": [[1, 2], "w5"]}, "prompt"),
    ("{not json", None),
])
def test_bad_requests_get_400_naming_the_field(server, body, param):
    status, answer = _post(server["port"], body)
    assert status == 400
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"]


def test_unknown_model_is_404(server):
    status, answer = _post(server["port"], {"prompt": [1], "model": "other"})
    assert status == 404 and "tiny/baseline" in answer["error"]["message"]


def test_metrics_are_prometheus_text(server):
    _post(server["port"], {"prompt": [4, 5, 6], "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    m = _metrics(server["port"])
    assert m['recipec_requests_total{outcome="length"}'] >= 1
    assert m["recipec_generation_tokens_total"] >= 3 and m["recipec_prompt_tokens_total"] >= 3
    assert m['recipec_requests_rejected_total{reason="invalid"}'] >= 11
    for family in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        name = f"recipec_{family}_seconds"
        buckets = [v for k, v in m.items() if k.startswith(name + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == m[name + "_count"] >= 1
        assert m[name + "_sum"] > 0


def test_full_queue_gets_429_and_a_disconnect_frees_the_slot(server):
    port = server["port"]
    before = _metrics(port)
    conn, response = _open_stream(port, {"prompt": [7, 8, 9], "max_tokens": LONG, "temperature": 0,
                                         "ignore_eos": True})
    first = next(_events(response))  # the long request holds the only batch slot
    assert json.loads(first)["choices"][0]["token_ids"]
    waiting = []
    for _ in range(2):  # fill --max-queue 2
        t = threading.Thread(target=lambda: waiting.append(_post(port, {"prompt": [1, 2], "max_tokens": 2,
                                                                        "temperature": 0, "ignore_eos": True})))
        t.start()
    _wait_for(lambda: _metrics(port)["recipec_queue_depth"] == 2, "two requests queued")
    status, answer = _post(port, {"prompt": [1, 2], "max_tokens": 2})
    assert status == 429 and "--max-queue 2" in answer["error"]["message"]
    conn.close()  # disconnect mid-stream
    _wait_for(lambda: len(waiting) == 2, "the queued requests to finish once the slot is free", timeout=15)
    assert [s for s, _ in waiting] == [200, 200]
    after = _metrics(port)
    assert after['recipec_requests_total{outcome="cancelled"}'] == before['recipec_requests_total{outcome="cancelled"}'] + 1
    assert after['recipec_requests_rejected_total{reason="queue_full"}'] == \
           before['recipec_requests_rejected_total{reason="queue_full"}'] + 1
    generated = after["recipec_generation_tokens_total"] - before["recipec_generation_tokens_total"]
    assert generated < LONG, "the cancelled request should have stopped well before its max_tokens"
    assert after["recipec_queue_depth"] == 0 and after["recipec_requests_running"] == 0


def _wait_for(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_profile_url_measures_the_workload_in_report_shape(server):
    # The recipe compares two policies; the server runs one, so each load level is measured once, under it.
    spec = {**SERVING, "batching": {**SERVING["batching"], "policy": ["static", "dynamic"]}}
    runs = profile_url(f"http://127.0.0.1:{server['port']}", spec)
    assert [r["concurrency"] for r in runs] == [1, 2]
    schema = json.loads((Path(__file__).parent.parent / "schemas" / "report.schema.json").read_text())
    for run in runs:
        jsonschema.Draft202012Validator({"$defs": schema["$defs"], "$ref": "#/$defs/run"}).validate(run)
        assert run["completed"] == 3 and run["total_output_tokens"] == 3 * 4
        assert run["batching"] == "continuous" and run["max_batch_size"] == 1
        assert run["ttft_ms"]["p50"] > 0 and run["tpot_ms"]["p50"] > 0 and run["mbu"] is None
        assert len(run["samples"]["ttft_ms"]) == 3


def test_profile_url_says_when_nothing_listens():
    with pytest.raises(ValueError, match="cannot reach"):
        profile_url(f"http://127.0.0.1:{free_port()}", SERVING)


def test_sigint_stops_the_server_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("recipec serve did not stop within 20 s of SIGINT")
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_command_errors_are_clear(build, tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "not a recipec build directory" in capsys.readouterr().err
    assert main([str(build), "--variant", "nope"]) == 2
    assert "no variant 'nope'" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main([str(build), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_detokenizer_holds_back_split_characters():
    class Bytes:  # one token per byte, as byte-level BPE vocabularies have
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    text = Detokenizer(Bytes())
    pieces = [text.add(b) for b in "né!".encode()]
    assert pieces == ["n", "", "é", "!"]
