"""`recipec serve` against hostile and careless clients (issue #21), on loopback, each server started and
stopped by its fixture or test. Each numbered problem of the issue has a test here that fails without its
fix: (1) a lone surrogate, (2) limits before any work, (3) a whole request whose client hangs up, (4) a
partial body then a hang-up, (5) header, body and idle timeouts and the connection cap, (6) graceful
shutdown, (7) a tiny temperature, (8) stream_options, docs, Host, Content-Type, TE+CL and error shapes.
Then per-client fairness, API keys, the request deadline, readiness, the access log and the CLI's checks.

Slow clients, partial headers and framing tricks go through raw sockets: http.client would not send them."""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from recipec.cli.serve import main
from test_serve import SERVING, fake_build
from conftest import free_port

# A request that holds the only batch slot while a test acts: every test ends it (a hang-up, a deadline, a
# shutdown) seconds in, so it must last longer than that on a fast host too (4000 tokens took under 3 s on a
# 2-core EPYC). Its tokens are never all decoded, so a long one costs nothing.
LONG = 60000
CONTEXT = LONG + 64
HARD = ["--max-queue", "4", "--max-queue-per-client", "2", "--max-body-bytes", "8000000",
        "--max-prompt-chars", "1500000", "--header-timeout", "1", "--body-timeout", "1", "--keep-alive-timeout", "1",
        "--max-connections", "12"]
KEYS = "key-a,key-b"


@pytest.fixture(scope="module")
def build(tmp_path_factory, export_op) -> Path:
    from conftest import make_tiny_model

    model = make_tiny_model("llama", tmp_path_factory.mktemp("hard-torch"), tokenizer=True,
                            max_position_embeddings=CONTEXT)
    variant = tmp_path_factory.mktemp("hard-onnx")
    export_op(model, variant)
    return fake_build(tmp_path_factory.mktemp("hard-build"), variant, SERVING)


def _start(build: Path, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    # stderr to a file, not a pipe: nobody reads a pipe while the tests run, and a full one blocks the server.
    proc = subprocess.Popen([sys.executable, "-m", "recipec.cli", "serve", str(build), "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"recipec serve exited {proc.returncode}: {log.read_text()}")
        try:
            if _request(port, "GET", "/health")[0] == 200:
                return {"port": port, "proc": proc, "log": log}
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("recipec serve did not become healthy within 60 s")
        time.sleep(0.2)


def _stop(server: dict) -> None:
    if server["proc"].poll() is None:
        server["proc"].kill()
        server["proc"].wait()


@pytest.fixture(scope="module")
def hard(build, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("hard-logs")
    server = _start(build, log_dir, *HARD, "--access-log", str(log_dir / "access.jsonl"))
    yield {**server, "access": log_dir / "access.jsonl"}
    _stop(server)


@pytest.fixture(scope="module")
def keyed(build, tmp_path_factory):
    server = _start(build, tmp_path_factory.mktemp("keyed-logs"), "--openapi", "--allowed-host", "models.internal",
                    "--allowed-host", "127.0.0.1", "--max-body-bytes", "4096", "--request-timeout", "1.5",
                    "--max-queue", "4", "--max-queue-per-client", "2", env={"RECIPEC_API_KEY": KEYS})
    yield server
    _stop(server)


def _request(port: int, method: str, path: str, body: bytes | str | dict | None = None,
             headers: dict[str, str] | None = None, source: str | None = None,
             timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    if isinstance(body, dict):
        body = json.dumps(body)
    if body is not None:
        headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _complete(port: int, body: dict, **kwargs) -> tuple[int, dict]:
    status, _, answer = _request(port, "POST", "/v1/completions", body, **kwargs)
    return status, json.loads(answer)


def _raw(port: int, data: bytes, wait: float = 5.0) -> tuple[bytes, bool, float]:
    """Send `data` on a new connection and read until the server closes it or `wait` passes: what came
    back, whether the server closed, and when that was."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        start = time.monotonic()
        if data:
            s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
            return out, True, time.monotonic() - start
        except ConnectionResetError:
            return out, True, time.monotonic() - start
        except socket.timeout:
            return out, False, time.monotonic() - start


def _headers_for(length: int) -> bytes:
    """A POST's request line and headers, announcing a JSON body of `length` bytes."""
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n")


def _metrics(port: int) -> dict[str, float]:
    status, _, text = _request(port, "GET", "/metrics")
    assert status == 200
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.decode().splitlines() if line and not line.startswith("#"))}


def _wait_for(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _error(answer: bytes | dict, status: int, param: str | None = None) -> str:
    """The message of an answer in OpenAI's error shape, checking the shape."""
    error = (json.loads(answer) if isinstance(answer, bytes) else answer)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status and error["param"] == param and error["message"], error
    return error["message"]


def _no_traceback(server: dict) -> None:
    log = server["log"].read_text()
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


def _hold_the_slot(port: int, **headers: str):
    """A long greedy stream that holds the only batch slot until its connection closes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": [7, 8, 9], "max_tokens": LONG, "temperature": 0,
                                                       "ignore_eos": True, "stream": True}),
                 {"Content-Type": "application/json", **headers})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the first token: it runs
    return conn, response


def _in_thread(results: list, call, *args, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(call(*args, **kwargs)), daemon=True)
    thread.start()
    return thread


# (1) A lone surrogate

def test_a_lone_surrogate_in_the_prompt_is_a_400_counted_invalid(hard):
    before = _metrics(hard["port"])['recipec_requests_rejected_total{reason="invalid"}']
    status, _, answer = _request(hard["port"], "POST", "/v1/completions", '{"prompt": "x\\ud800y", "max_tokens": 4}')
    assert status == 400
    assert "surrogate" in _error(answer, 400, "prompt")
    assert _metrics(hard["port"])['recipec_requests_rejected_total{reason="invalid"}'] == before + 1
    _no_traceback(hard)


# (2) Limits before any work

def test_a_body_over_the_limit_is_refused_before_it_is_read(hard):
    # 50 MB announced, none of it sent: the answer can only come from the headers.
    answer, closed, seconds = _raw(hard["port"], _headers_for(50_000_000))
    assert answer.startswith(b"HTTP/1.1 413 ") and closed and seconds < 1, (answer, seconds)
    assert "--max-body-bytes" in _error(answer.split(b"\r\n\r\n", 1)[1], 413)
    assert _metrics(hard["port"])['recipec_requests_rejected_total{reason="too_large"}'] >= 1


REFUSE_5MB_S, HEALTH_MEANWHILE_S = 0.1, 0.05


def test_a_5mb_prompt_is_refused_in_under_100ms_while_health_answers_in_under_50ms(hard):
    """Up to three tries: an event loop blocked by the prompt fails every one, while a host busy with other
    work (CI runs two test files at once on 2 cores) can delay one call of one try."""
    tries = [_refuse_a_5mb_prompt(hard["port"])]
    while not _fast(*tries[-1]) and len(tries) < 3:
        tries.append(_refuse_a_5mb_prompt(hard["port"]))
    refused_in, health = tries[-1]
    print(f"hardening figures: a 5.1 MB prompt refused in {refused_in * 1000:.0f} ms; /health at most "
          f"{max(health) * 1000:.0f} ms over {len(health)} calls meanwhile ({len(tries)} tries)")
    assert refused_in < REFUSE_5MB_S, f"refused in {refused_in * 1000:.0f} ms in each of {len(tries)} tries"
    assert health and max(health) < HEALTH_MEANWHILE_S, f"/health took up to {max(health) * 1000:.0f} ms in each of {len(tries)} tries"


def _fast(refused_in: float, health: list[float]) -> bool:
    return refused_in < REFUSE_5MB_S and bool(health) and max(health) < HEALTH_MEANWHILE_S


def _refuse_a_5mb_prompt(port: int) -> tuple[float, list[float]]:
    body = json.dumps({"prompt": "w5 " * 1_700_000, "max_tokens": 4})  # 5.1 MB, under --max-body-bytes 8 MB
    health: list[float] = []
    stop = threading.Event()

    def poll_health():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set():
            start = time.perf_counter()
            conn.request("GET", "/health")
            assert conn.getresponse().read()
            health.append(time.perf_counter() - start)
            time.sleep(0.002)
        conn.close()

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        time.sleep(0.05)
        start = time.perf_counter()
        status, _, answer = _request(port, "POST", "/v1/completions", body)
        refused_in = time.perf_counter() - start
        time.sleep(0.05)
    finally:
        stop.set()
        poller.join(timeout=10)
    assert status == 400 and "--max-prompt-chars" in _error(answer, 400, "prompt")
    return refused_in, health


def test_tokenizing_a_long_prompt_leaves_the_event_loop_free(hard):
    """1.4 M characters (under --max-prompt-chars) take the tokenizer a while; /health must not wait for it."""
    port = hard["port"]
    results: list = []
    thread = _in_thread(results, _request, port, "POST", "/v1/completions", {"prompt": "w5 " * 470_000})
    health, start = [], time.perf_counter()
    while thread.is_alive() and time.perf_counter() - start < 30:
        t = time.perf_counter()
        assert _request(port, "GET", "/health")[0] == 200
        health.append(time.perf_counter() - t)
        time.sleep(0.01)
    thread.join()
    took = time.perf_counter() - start
    status, _, answer = results[0]
    assert status == 400 and "context length" in _error(answer, 400, "max_tokens")
    print(f"hardening figures: 1.4 M characters tokenized in {took:.2f} s; /health at most "
          f"{max(health) * 1000:.0f} ms over {len(health)} calls meanwhile")
    # Only meaningful if tokenizing took long enough to show: on the event loop /health would wait as long.
    assert took > 0.3 and len(health) >= 5, (took, len(health))
    assert max(health) < 0.1, f"/health took up to {max(health) * 1000:.0f} ms while the prompt was tokenized"


# (3) A whole request whose client hangs up

def test_a_whole_request_is_cancelled_when_its_client_hangs_up(hard):
    port = hard["port"]
    before = _metrics(port)
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": LONG, "temperature": 0, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(_headers_for(len(body)) + body)
    _wait_for(lambda: _metrics(port)["recipec_requests_running"] == 1, "the request to run")
    s.close()  # tokens keep coming: the old server only looked for a hang-up after 0.5 s without one
    hung_up = time.monotonic()
    cancelled = 'recipec_requests_total{outcome="cancelled"}'
    _wait_for(lambda: _metrics(port)[cancelled] == before[cancelled] + 1, "the request to be cancelled", timeout=20)
    print(f"hardening figures: a whole request cancelled {(time.monotonic() - hung_up) * 1000:.0f} ms after its "
          f"client hung up")
    assert time.monotonic() - hung_up < 0.5
    after = _metrics(port)
    assert after["recipec_requests_running"] == 0
    assert after["recipec_generation_tokens_total"] - before["recipec_generation_tokens_total"] < LONG


# (4) A partial body, then a hang-up

def test_a_partial_body_then_a_hang_up_logs_no_traceback(hard):
    port = hard["port"]
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(_headers_for(100) + b'{"prompt": [1')
            time.sleep(0.05)
    time.sleep(0.3)
    assert _request(port, "GET", "/health")[0] == 200
    log = hard["log"].read_text()
    assert "ClientDisconnect" not in log
    _no_traceback(hard)


# (5) Timeouts and the connection cap

def test_silent_slow_and_idle_connections_are_closed(hard):
    """--header-timeout 1, --body-timeout 1, --keep-alive-timeout 1: none of these stays open."""
    port = hard["port"]
    cases = {"silent": b"", "half a request line": b"POST /v1/compl",
             "half the headers": b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
             "half the body": _headers_for(100) + b'{"prompt": [1, 2'}
    results: dict[str, tuple] = {}
    threads = [threading.Thread(target=lambda k=k, d=d: results.__setitem__(k, _raw(port, d, wait=6)))
               for k, d in cases.items()]
    for t in threads:
        t.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=6)
    conn.request("GET", "/health")
    assert conn.getresponse().read()
    idle = time.monotonic()
    assert conn.sock.recv(1) == b""  # the server closed the kept-alive connection
    idle = time.monotonic() - idle
    conn.close()
    for t in threads:
        t.join()
    for name, (answer, closed, seconds) in results.items():
        assert closed and 0.8 < seconds < 3, f"{name}: closed={closed} after {seconds:.1f} s"
    assert results["half the body"][0].startswith(b"HTTP/1.1 408 ")
    assert all(answer == b"" for name, (answer, _, _) in results.items() if name != "half the body")
    assert 0.5 < idle < 3, idle
    _no_traceback(hard)


def test_connections_past_the_cap_are_refused(hard):
    port = hard["port"]
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]  # --max-connections 12
    try:
        time.sleep(0.2)
        assert _request(port, "GET", "/health")[0] == 503
    finally:
        for s in silent:
            s.close()
    _wait_for(lambda: _request(port, "GET", "/health")[0] == 200, "the cap to free up", timeout=5)


# (7) A tiny temperature

@pytest.mark.parametrize("temperature", [1e-310, 1e-8])
def test_a_tiny_temperature_is_greedy(hard, temperature):
    body = {"prompt": "w5 w17 w99 w3", "max_tokens": 8}
    status, greedy = _complete(hard["port"], {**body, "temperature": 0})
    assert status == 200 and greedy["choices"][0]["token_ids"]
    status, tiny = _complete(hard["port"], {**body, "temperature": temperature})
    assert status == 200 and tiny["choices"][0]["token_ids"] == greedy["choices"][0]["token_ids"]


# (8) Smaller gaps

@pytest.mark.parametrize("options, param", [([], "stream_options"), ("yes", "stream_options"),
                                            ({"include_usage": "no"}, "stream_options.include_usage"),
                                            ({"include_usage": 1}, "stream_options.include_usage")])
def test_stream_options_must_be_an_object_with_a_boolean(hard, options, param):
    status, answer = _complete(hard["port"], {"prompt": [1, 2], "stream": True, "stream_options": options})
    assert status == 400
    assert param in _error(answer, 400, param)


def test_no_docs_or_schema_unless_asked_and_no_outside_scripts(hard, keyed):
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        status, headers, answer = _request(hard["port"], "GET", path)
        assert status == 404 and headers["content-type"] == "application/json", path
        _error(answer, 404)
    status, _, schema = _request(keyed["port"], "GET", "/openapi.json")  # --openapi
    assert status == 200 and "/v1/completions" in json.loads(schema)["paths"]
    assert _request(keyed["port"], "GET", "/docs")[0] == 404
    for port, path in [(hard["port"], "/health"), (hard["port"], "/ready"), (hard["port"], "/v1/models"),
                       (hard["port"], "/metrics"), (keyed["port"], "/openapi.json")]:
        assert b"<script" not in _request(port, "GET", path)[2].lower(), path


def test_only_loopback_host_names_are_answered_by_default(hard):
    port = hard["port"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert _request(port, "GET", "/health", headers={"Host": host})[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        status, _, answer = _request(port, "GET", "/v1/models", headers={"Host": host})
        assert status == 400 and "--allowed-host" in _error(answer, 400), host


def test_post_bodies_must_be_json(hard):
    port, body = hard["port"], json.dumps({"prompt": [1, 2], "max_tokens": 2})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, answer = _request(port, "POST", "/v1/completions", body, {"Content-Type": ctype})
        assert status == 415 and ctype.split(";")[0] in _error(answer, 415), ctype
    answer, _, _ = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 415 ")
    status, _, _ = _request(port, "POST", "/v1/completions", body, {"Content-Type": "Application/JSON; charset=utf-8"})
    assert status == 200


def test_transfer_encoding_with_content_length_is_refused(hard):
    answer, closed, _ = _raw(hard["port"], b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and closed
    assert "Transfer-Encoding and Content-Length" in _error(answer.split(b"\r\n\r\n", 1)[1], 400)


def test_unknown_routes_and_methods_answer_in_openai_shape(hard):
    status, _, answer = _request(hard["port"], "GET", "/v2/nothing")
    assert status == 404 and "/v2/nothing" in _error(answer, 404)
    status, headers, answer = _request(hard["port"], "GET", "/v1/completions")
    assert status == 405 and headers["allow"] == "POST"
    assert json.loads(answer)["error"]["type"] == "invalid_request_error"


# Fairness, keys, deadlines, readiness, the access log

def test_one_client_cannot_fill_the_queue(hard):
    """--max-queue 4, --max-queue-per-client 2: client A (127.0.0.2) gets two waiting requests, not a third;
    client B (127.0.0.3) still gets in."""
    port = hard["port"]
    conn, _ = _hold_the_slot(port)
    results: list = []
    short = {"prompt": [1, 2], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    threads = [_in_thread(results, _complete, port, short, source="127.0.0.2") for _ in range(2)]
    _wait_for(lambda: _metrics(port)["recipec_queue_depth"] == 2, "client A's two requests to queue")
    status, answer = _complete(port, short, source="127.0.0.2")
    assert status == 429 and "--max-queue-per-client 2" in _error(answer, 429)
    threads.append(_in_thread(results, _complete, port, short, source="127.0.0.3"))
    _wait_for(lambda: _metrics(port)["recipec_queue_depth"] == 3, "client B's request to queue")
    conn.close()
    for t in threads:
        t.join(timeout=20)
    assert sorted(status for status, _ in results) == [200, 200, 200]
    assert _metrics(port)['recipec_requests_rejected_total{reason="client_queue_full"}'] >= 1


def test_an_api_key_is_required_on_the_api(keyed):
    port = keyed["port"]
    body = {"prompt": [1, 2], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a2V5LWE6"},
                    {"Authorization": "key-a"}):
        status, got, answer = _request(port, "POST", "/v1/completions", body, headers)
        assert status == 401 and got["www-authenticate"] == "Bearer", headers
        assert "key" in _error(answer, 401).lower()
        assert b"key-a" not in answer
    assert _request(port, "GET", "/v1/models")[0] == 401
    for key in ("key-a", "key-b"):
        assert _complete(port, body, headers={"Authorization": f"Bearer {key}"})[0] == 200
    for path in ("/health", "/ready", "/metrics"):  # probes and scrapers need no key
        assert _request(port, "GET", path)[0] == 200, path
    assert _metrics(port)['recipec_requests_rejected_total{reason="unauthorized"}'] >= 5


def test_fairness_is_keyed_by_api_key(keyed):
    """One address, two keys: each key has its own share of the queue."""
    port = keyed["port"]
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    conn, _ = _hold_the_slot(port, **a)
    results: list = []
    short = {"prompt": [1, 2], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    threads = [_in_thread(results, _complete, port, short, headers=a) for _ in range(2)]
    _wait_for(lambda: _metrics(port)["recipec_queue_depth"] == 2, "key A's two requests to queue", timeout=1)
    status, answer = _complete(port, short, headers=a)
    assert status == 429 and "--max-queue-per-client 2" in _error(answer, 429)
    threads.append(_in_thread(results, _complete, port, short, headers=b))
    _wait_for(lambda: _metrics(port)["recipec_queue_depth"] == 3, "key B's request to queue", timeout=1)
    conn.close()
    for t in threads:
        t.join(timeout=20)
    assert sorted(status for status, _ in results) == [200, 200, 200]


def test_a_request_past_its_deadline_ends_with_an_error(keyed):
    """--request-timeout 1.5: a stream ends with an SSE error event and [DONE], a whole request with 504."""
    port, auth = keyed["port"], {"Authorization": "Bearer key-b"}
    long = {"prompt": [3, 4], "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
    results: list = []
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({**long, "stream": True}),
                 {"Content-Type": "application/json", **auth})
    whole = _in_thread(results, _complete, port, long, headers=auth)  # queued behind the stream, then expires
    events = [line[6:].strip() for line in conn.getresponse() if line.startswith(b"data: ")]
    streamed = time.monotonic() - start
    conn.close()
    whole.join(timeout=20)
    assert events[-1] == b"[DONE]" and "--request-timeout" in _error(json.loads(events[-2]), 504)
    assert 1.2 < streamed < 4, streamed
    status, answer = results[0]
    assert status == 504 and "--request-timeout" in _error(answer, 504)


def test_hosts_named_by_the_flag_are_the_only_ones_answered(keyed):
    port = keyed["port"]
    assert _request(port, "GET", "/health", headers={"Host": "models.internal:443"})[0] == 200
    assert _request(port, "GET", "/health", headers={"Host": "localhost"})[0] == 400


def test_a_chunked_body_over_the_limit_is_refused(keyed):
    chunk = b"x" * 3000  # two of them pass --max-body-bytes 4096; no header announced the size
    answer, closed, _ = _raw(keyed["port"], b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Authorization: Bearer key-a\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" + (b"bb8\r\n" + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ") and closed, answer[:200]


def test_ready_checks_the_engine_apart_from_health(hard):
    status, _, answer = _request(hard["port"], "GET", "/ready")
    assert status == 200 and json.loads(answer) == {"status": "ready"}


def test_the_access_log_has_one_json_line_per_request(hard):
    port = hard["port"]
    marker = f"/access-{time.monotonic_ns()}"
    assert _request(port, "GET", marker, headers={"User-Agent": "hardening-test"})[0] == 404
    assert _request(port, "POST", marker, "{}", {"Content-Type": "text/plain"})[0] == 415  # refused by the guard
    assert _complete(port, {"prompt": [1, 2], "max_tokens": 2})[0] == 200
    entries = [json.loads(line) for line in hard["access"].read_text().splitlines()]  # every line is JSON
    mine = [e for e in entries if e["path"] == marker]
    assert [(e["method"], e["status"]) for e in mine] == [("GET", 404), ("POST", 415)]
    assert mine[0]["user_agent"] == "hardening-test" and mine[0]["client"] == "127.0.0.1"
    assert all(e["duration_ms"] >= 0 and e["bytes"] > 0 for e in mine)
    last = entries[-1]
    assert last["path"] == "/v1/completions" and last["status"] == 200 and last["bytes"] > 0


def test_no_traceback_in_the_hard_servers_log(hard):
    _no_traceback(hard)


# (6) Graceful shutdown

def test_shutdown_refuses_queued_requests_and_ends_running_ones_cleanly(build, tmp_path):
    """Batch of 3, --shutdown-grace 3: at SIGTERM two long requests (a stream, a whole one) and a short one
    run and one waits. The waiting one gets 503 at once, the short one finishes within the grace period,
    the long ones end at its end (an SSE error event and [DONE]; a JSON 503), nothing new is accepted, and
    the server exits 0 with no traceback."""
    server = _start(build, tmp_path, "--max-batch-size", "3", "--shutdown-grace", "3")
    port, proc = server["port"], server["proc"]
    try:
        long = {"prompt": [3, 4], "max_tokens": LONG, "temperature": 0, "ignore_eos": True}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({**long, "stream": True}),
                     {"Content-Type": "application/json"})
        stream = conn.getresponse()
        assert stream.readline().startswith(b"data: ")
        done: dict[str, tuple] = {}

        def call(name, body):
            result = _complete(port, body)
            done[name] = (*result, time.monotonic())

        threads = [threading.Thread(target=call, args=("whole", long))]
        threads[0].start()
        _wait_for(lambda: _metrics(port)["recipec_requests_running"] == 2, "two running")
        threads.append(threading.Thread(target=call, args=("short", {**long, "max_tokens": 400})))
        threads[-1].start()
        _wait_for(lambda: _metrics(port)["recipec_requests_running"] == 3, "three running")
        threads.append(threading.Thread(target=call, args=("queued", {**long, "max_tokens": 2})))
        threads[-1].start()
        _wait_for(lambda: _metrics(port)["recipec_queue_depth"] == 1, "one queued")
        sigterm = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        _wait_for(lambda: "queued" in done, "the queued request's answer", timeout=5)
        status, answer, at = done["queued"]
        assert status == 503 and at - sigterm < 1 and "not started" in _error(answer, 503)
        time.sleep(0.3)
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection(("127.0.0.1", port), timeout=2).close()

        events = [line[6:].strip() for line in stream if line.startswith(b"data: ")]
        stream_end = time.monotonic() - sigterm
        conn.close()
        for t in threads:
            t.join(timeout=15)
        assert events[-1] == b"[DONE]" and "shut down" in _error(json.loads(events[-2]), 503)
        assert 2.5 < stream_end < 5, stream_end
        status, answer, at = done["whole"]
        assert status == 503 and "shut down" in _error(answer, 503) and 2.5 < at - sigterm < 5
        status, answer, at = done["short"]
        assert status == 200 and len(answer["choices"][0]["token_ids"]) == 400 and at > sigterm
        assert proc.wait(timeout=10) == 0
        log = server["log"].read_text()
        assert "Traceback" not in log and "Exception" not in log and "Cancel" not in log, log[-3000:]
    finally:
        _stop(server)


# Readiness and the command line, without HTTP

def test_readiness_means_the_engine_ran_a_step():
    from recipec.runtime.engine import Policy
    from recipec.serve.protocol import ModelSpec
    from recipec.serve.service import Service
    from test_soak import VOCAB, _NextTokenModel

    class Broken(_NextTokenModel):
        def prefill(self, prompts):
            raise RuntimeError("the device is gone")

    async def probe(service: Service) -> str | None:
        return await service.not_ready(timeout=1)

    spec, policy = ModelSpec("fake/baseline", VOCAB, None), Policy("continuous", max_batch_size=2)
    # A failed prefill fails its requests in the engine, or (today's engine loses the batch it took) never
    # finishes them: either way the probe says the engine cannot run a step.
    for model, expected in ((_NextTokenModel(), (None,)),
                            (Broken(), ("the engine failed a step: the device is gone",
                                        "the engine ran no step within 1 s"))):
        service = Service(model, spec, policy)
        assert asyncio.run(probe(service)) == "engine stopped"
        service.engine.start()
        try:
            assert asyncio.run(probe(service)) in expected
            service.drain()
            assert asyncio.run(probe(service)) == "shutting down"
        finally:
            service.engine.stop()


def test_a_non_loopback_host_warns_unless_there_is_a_key(build, monkeypatch, capsys):
    import recipec.cli.serve as cli

    served = []
    monkeypatch.setattr(cli, "_check_port", lambda host, port: None)  # nothing binds: no socket on 0.0.0.0
    monkeypatch.setattr(cli, "run_server", lambda service, host, port, limits, access, *rest: served.append(access))
    monkeypatch.delenv("RECIPEC_API_KEY", raising=False)
    assert main([str(build), "--host", "0.0.0.0"]) == 0
    err = " ".join(capsys.readouterr().err.split())  # the console wraps lines
    assert "reachable from other machines, with no authentication" in err
    assert served[-1].api_keys == () and served[-1].allowed_hosts is None
    monkeypatch.setenv("RECIPEC_API_KEY", KEYS)
    assert main([str(build), "--host", "0.0.0.0"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "no authentication" not in err and "without TLS" in err
    assert served[-1].api_keys == ("key-a", "key-b")


@pytest.mark.parametrize("args, message", [
    (["--max-body-bytes", "0"], "--max-body-bytes must be > 0"),
    (["--header-timeout", "-1"], "--header-timeout must be > 0"),
    (["--max-queue-per-client", "0"], "--max-queue-per-client must be >= 1"),
    (["--shutdown-grace", "-2"], "--shutdown-grace must be >= 0"),
    (["--access-log", "/nonexistent-dir/access.log"], "cannot open the access log"),
])
def test_bad_limits_are_refused_naming_the_flag(build, monkeypatch, capsys, args, message):
    import recipec.cli.serve as cli

    monkeypatch.setattr(cli, "run_server", lambda *a, **k: pytest.fail("should not serve"))
    assert main([str(build), "--port", str(free_port()), *args]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
