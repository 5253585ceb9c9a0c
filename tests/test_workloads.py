"""Workloads as users have them: prompts from a file, rate sweeps (a list or auto) with capacity at the SLO, and
the bad inputs each rejected at validation with its field; then a build with a prompts file and a four-rate
Poisson sweep, and the same sweep against a running `recipec serve`."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_model, free_port
from test_build import recipec
from test_engine import FakeModel

from recipec.errors import RecipeInvalid
from recipec.plan.planner import load_plan
from recipec.profile.formatting import fmt
from recipec.profile.loadgen import Workload, make_items
from recipec.profile.metrics import length_stats
from recipec.profile.profiler import measure_runs, serving_plan, summarize_raw
from recipec.profile.report import validate_report
from recipec.profile.sweep import capacity, expand_runs, sweep_rates, variant_capacity
from recipec.runtime.engine import CacheOps, FakeClock
from recipec.source.prompts import PromptRecord, PromptsError, read_prompts, tokenize_prompts

RATES = [2, 8, 32, 128]


def run(rate, attained, batching="continuous"):
    """A summarized run at `rate` whose goodput is `attained` of its request rate."""
    return {"batching": batching, "rate_rps": rate, "request_throughput_rps": 10.0, "goodput_rps": 10.0 * attained}


# arithmetic, exact

def test_length_stats_exactly():
    assert length_stats([3, 7, 8, 30]) == {"min": 3, "p50": 7.5, "max": 30, "mean": 12.0}
    assert length_stats([]) is None


def test_capacity_is_interpolated_between_coarse_bracketing_rates_and_says_so():
    c = capacity([run(1, 1.0), run(2, 1.0), run(4, 0.95), run(8, 0.5)])
    assert c["method"] == "interpolated" and c["bracket_rps"] == [4, 8]
    assert c["capacity_at_slo_rps"] == pytest.approx(4 + 0.05 / 0.45 * 4)  # 4.444…, where the share crosses 90%
    assert "interpolated" in c["note"] and "not a measured rate" in c["note"]


def test_capacity_is_the_tested_rate_when_the_next_is_within_ten_percent():
    c = capacity([run(10, 0.92), run(10.5, 0.2)])
    assert (c["capacity_at_slo_rps"], c["method"], c["bracket_rps"]) == (10, "measured", [10, 10.5])


def test_capacity_when_every_rate_or_none_held():
    assert capacity([run(1, 1.0), run(2, 0.9)]) | {"note": ""} == {
        "capacity_at_slo_rps": 2, "method": "not_reached", "bracket_rps": [2, None], "note": ""}
    c = capacity([run(1, 0.5), run(2, 0.1)])
    assert (c["capacity_at_slo_rps"], c["method"], c["bracket_rps"]) == (None, "below_lowest", [0.0, 1])


def test_capacity_takes_the_highest_rate_held_even_past_a_noisy_failure():
    c = capacity([run(1, 1.0), run(2, 0.5), run(4, 0.95), run(8, 0.2)])
    assert c["bracket_rps"] == [4, 8] and c["capacity_at_slo_rps"] == pytest.approx(4 + 0.05 / 0.75 * 4)


def test_no_capacity_without_an_slo_or_rate_runs_and_one_per_policy():
    assert capacity([{**run(1, 1.0), "goodput_rps": None}]) is None
    assert capacity([{"batching": "static", "concurrency": 4, "goodput_rps": 1, "request_throughput_rps": 1}]) is None
    caps = variant_capacity([run(1, 1.0, "static"), run(2, 0.0, "static"), run(1, 1.0), run(2, 1.0)])
    assert [(c["batching"], c["method"]) for c in caps] == [("static", "interpolated"), ("continuous", "not_reached")]


def test_auto_sweep_rates_are_guidellms():
    assert sweep_rates(2.0, 10.0, 6) == list(np.linspace(2.0, 10.0, 5)[1:]) == [4.0, 6.0, 8.0, 10.0]
    assert sweep_rates(3.0, 4.0, 3) == [4.0]


def _raw(run, rate):
    """A raw run whose 10 requests complete at `rate` per second."""
    records = [{"arrival": i / rate, "token_times": [i / rate + 0.001], "n_in": 4} for i in range(10)]
    return {"run": run, "records": records}


def test_auto_sweep_bookkeeping_on_synthetic_records():
    measured = []

    def measure(r):
        measured.append(r)
        return _raw(r, {"synchronous": 2.0, "throughput": 10.0}.get(r.get("sweep"), r.get("rate_rps") or 1.0))

    plan = serving_plan({"workload": {"arrival": "poisson", "rate_rps": "auto", "sweep_size": 5, "requests": 10}})
    assert [r["rate_rps"] for r in plan] == ["auto"]
    out = expand_runs(plan, measure)
    assert [r.get("sweep") for r in measured] == ["synchronous", "throughput", "poisson", "poisson", "poisson"]
    assert [r.get("concurrency") for r in measured[:2]] == [1, 10]  # throughput: every request in flight
    # the synchronous run measured 10 requests over 4.5 s: 10 / 4.501 req/s; rates up to the throughput run's
    low, high = 10 / (9 / 2.0 + 0.001), 10 / (9 / 10.0 + 0.001)
    assert [r["rate_rps"] for r in measured[2:]] == pytest.approx(list(np.linspace(low, high, 4)[1:]))
    assert len(out) == 5 and all("sweep_size" not in r["run"] for r in out)


def test_a_fake_clock_sweep_reports_one_run_per_rate_and_a_capacity():
    spec = {"batching": {"policy": "continuous", "max_batch_size": 4},
            "workload": {"prompt_tokens": {"min": 4, "max": 12}, "output_tokens": 4, "requests": 12, "warmup_requests": 0,
                         "arrival": "poisson", "rate_rps": [5, 20, 80, 320]}, "slo": {"ttft_ms": 50}}
    clock = FakeClock()
    raw = measure_runs(FakeModel(clock), serving_plan(spec), vocab_size=50, clock=clock, cache_ops=CacheOps())
    runs = [summarize_raw(r, None, None, spec["slo"]) for r in raw]
    assert [r["rate_rps"] for r in runs] == [5, 20, 80, 320]
    assert all(4 <= r["prompt_tokens"]["min"] < r["prompt_tokens"]["max"] <= 12 for r in runs)
    held = [r["goodput_rps"] >= 0.9 * r["request_throughput_rps"] for r in runs]
    assert held[0] and not held[-1], held  # a fake step costs ≥ 10 ms: 320 req/s queues past 50 ms
    c = capacity(runs)  # on the fake clock the runs are deterministic: 5 and 20 req/s hold, 80 does not
    assert held == [True, True, False, False] and c["method"] == "interpolated" and c["bracket_rps"] == [20, 80]
    assert 20 < c["capacity_at_slo_rps"] < 80


def test_gates_read_capacity_and_batch_prompting_per_variant_and_search_waits_for_them():
    from recipec.profile.gates import evaluate_gates, validate_gate_metric
    from recipec.profile.search import before_serving

    report = {"variants": {"baseline": {"capacity_at_slo_rps": 3.0, "batch_prompting": {"accuracy_batched": 0.4}},
                           "int8": {"capacity_at_slo_rps": None}}}
    gates = [{"metric": "capacity_at_slo_rps", "min": 2.5}, {"metric": "batch_prompting.accuracy_batched", "min": 0.5,
                                                             "variant": "baseline"}]
    assert [(g["variant"], g["passed"], g["reason"]) for g in evaluate_gates(gates, report)] == [
        ("int8", False, "capacity_at_slo_rps was not measured"), ("baseline", False, "0.4 is not ≥ 0.5")]
    assert "unknown metric" in validate_gate_metric("batch_prompting.accuracy")
    assert "serving metrics only" in validate_gate_metric("capacity_at_slo_rps@rate_rps=2")
    assert before_serving(gates + [{"metric": "kl_divergence", "max": 1}]) == [{"metric": "kl_divergence", "max": 1}]


# prompts from data

def test_requests_take_the_prompts_in_file_order_with_their_own_output_lengths():
    w = Workload(num_requests=5, prompts=[[1, 2], [3, 4, 5], [6]], output_lens=[7, 8, 9], output_len=3)
    items = make_items(w, vocab_size=50, n=5)
    assert [(i.prompt, i.output_len) for i in items] == [([1, 2], 7), ([3, 4, 5], 8), ([6], 9), ([1, 2], 7),
                                                         ([3, 4, 5], 8)]


def test_jsonl_and_text_prompts(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"q": "a b", "n": 3}\n\n{"q": "c", "n": 1}\n')
    got = read_prompts({"source": "jsonl", "path": "p.jsonl", "field": "q", "output_field": "n"}, tmp_path)
    assert [(r.text, r.output_tokens, r.where.endswith(f"p.jsonl:{line}")) for r, line in zip(got, (1, 3))] == [
        ("a b", 3, True), ("c", 1, True)]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "1.txt").write_text("first prompt\n\nsecond\n")
    (tmp_path / "t" / "2.txt").write_text("third\n")
    assert [r.text for r in read_prompts({"source": "text", "path": "t/*.txt"}, tmp_path)] == [
        "first prompt", "second", "third"]


def test_a_prompt_too_long_for_the_context_is_an_error_naming_its_record_or_keeps_its_last_tokens():
    records = [PromptRecord("a b c", "p.jsonl:1"), PromptRecord("a b c d e f", "p.jsonl:2", output_tokens=2)]
    encode = lambda text: [ord(c) for c in text.split()]  # noqa: E731  one token per word
    with pytest.raises(PromptsError, match=r"p.jsonl:2: the prompt is 6 tokens; with its 2 output tokens it exceeds "
                                           r"the model's context of 7 tokens \(serving.workload.prompts.truncate"):
        tokenize_prompts(records, encode, context=7, output_tokens=4, truncate=False)
    out = tokenize_prompts(records, encode, context=7, output_tokens=4, truncate=True)
    assert out.ids == [[97, 98, 99], [98, 99, 100, 101, 102]] and out.truncated == ["p.jsonl:2"]


# bad input: a validation error naming its field, and no run starts

HEAD = """\
recipe: 1
name: wl
model: {source: path, path: model}
data:
  eval: {samples: 2, seq_len: 8}
  calibration: {samples: 2, seq_len: 8}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wl")
    make_tiny_model("llama", root / "model", tokenizer=True, max_position_embeddings=64)
    rng = random.Random(0)
    with open(root / "prompts.jsonl", "w") as f:  # word-level tokenizer: a prompt's tokens are its words
        for _ in range(12):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(3, 256)}" for _ in range(rng.randint(3, 40))),
                                "answer": "w5"}) + "\n")
    return root


def recipe(root: Path, workload: str, extra: str = "") -> Path:
    path = root / f"r{abs(hash(workload + extra))}.yaml"
    path.write_text(HEAD + f"serving:\n  workload: {workload}\n{extra}")
    return path


BAD = {
    "empty prompts file": ("{prompts: {source: jsonl, path: empty.jsonl}}", "",
                           "serving.workload.prompts.path: 'empty.jsonl' holds no prompts"),
    "missing field": ("{prompts: {source: jsonl, path: prompts.jsonl, field: prompt}}", "",
                      "serving.workload.prompts.field: ", "prompts.jsonl:1: no field 'prompt'"),
    "non-UTF-8 line": ("{prompts: {source: jsonl, path: latin1.jsonl}}", "",
                       "serving.workload.prompts.path: ", "latin1.jsonl:2: not UTF-8"),
    "rate 0": ("{arrival: poisson, rate_rps: [1, 0]}", "", "serving.workload.rate_rps[1]: 0 is less than or equal"),
    "negative rate": ("{arrival: poisson, rate_rps: -2}", "", "serving.workload.rate_rps: -2 is less than or equal"),
    "K < 2": ("{prompts: {source: jsonl, path: prompts.jsonl}}", "  batching_prompting_placeholder\n",
              "serving.batch_prompting.size: 1 is less than the minimum of 2"),
    "missing answer field": ("{prompts: {source: jsonl, path: prompts.jsonl}, requests: 4}",
                             "  batch_prompting: {size: 2, answer_field: truth}\n",
                             "serving.batch_prompting.answer_field: ", "prompts.jsonl:1: no field 'truth'"),
    "prompt longer than the context": ("{prompts: {source: jsonl, path: prompts.jsonl}, output_tokens: 30}", "",
                                       "serving.workload.prompts.path: ", "prompts.jsonl:",
                                       "exceeds the model's context of 64 tokens"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_validation_error_naming_its_field(model_dir, case):
    workload, extra, *expected = BAD[case]
    (model_dir / "empty.jsonl").write_text("\n  \n")
    (model_dir / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    extra = extra.replace("batching_prompting_placeholder", "batch_prompting: {size: 1}")
    with pytest.raises(RecipeInvalid) as err:
        load_plan(recipe(model_dir, workload, extra), with_keys=False)
    message = str(err.value)
    assert all(part in message for part in expected), message


def test_a_bad_input_stops_the_build_before_anything_runs(model_dir, tmp_path):
    path = recipe(model_dir, "{prompts: {source: jsonl, path: prompts.jsonl, field: prompt}}")
    result = recipec("build", str(path), "--out", str(tmp_path / "out"),
                     env={**os.environ, "RECIPEC_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 2 and "serving.workload.prompts.field" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# the Done-when recipe: a prompts file and a four-rate Poisson sweep

SWEEP = ("{prompts: {source: jsonl, path: prompts.jsonl}, output_tokens: 4, requests: 8, warmup_requests: 1, "
         f"arrival: poisson, rate_rps: {RATES}}}")
SLO = "  batching: {policy: continuous, max_batch_size: 4}\n  slo: {ttft_ms: 40}\n"


@pytest.fixture(scope="module")
def swept(model_dir):
    env = {**os.environ, "RECIPEC_CACHE": str(model_dir / "cache"), "COLUMNS": "200"}
    path = recipe(model_dir, SWEEP, SLO)
    result = recipec("build", str(path), "--out", str(model_dir / "out"), env=env)
    assert result.returncode == 0, result.stderr
    out = model_dir / "out" / "wl"
    return out, json.loads((out / "report.json").read_text()), env


def test_the_sweep_is_one_serving_run_per_rate_with_the_files_prompt_lengths(model_dir, swept):
    _, report, _ = swept
    validate_report(report)
    runs = report["variants"]["baseline"]["serving"]
    assert [r["rate_rps"] for r in runs] == RATES
    words = [len(json.loads(line)["text"].split()) for line in (model_dir / "prompts.jsonl").read_text().splitlines()]
    for r in runs:  # the first 8 prompts of the file, in order, one token per word
        assert r["prompt_tokens"] == length_stats(words[:8]) and r["prompt_tokens"]["min"] < r["prompt_tokens"]["max"]
        assert r["output_tokens"] == {"min": 4, "p50": 4.0, "max": 4, "mean": 4.0}
        assert r["prompts"] == {"source": "jsonl", "path": "prompts.jsonl", "field": "text", "records": 12,
                                "truncated": 0}


def test_the_sweep_gives_a_capacity_at_the_slo_a_table_and_the_plot(swept):
    out, report, _ = swept
    variant = report["variants"]["baseline"]
    [cap] = variant["capacity"]
    assert cap == {"batching": "continuous", **capacity(variant["serving"])}
    assert variant["capacity_at_slo_rps"] == cap["capacity_at_slo_rps"]
    assert cap["method"] != "below_lowest"  # a tiny model answers 2 req/s well within 40 ms
    assert (out / "plots" / "latency_vs_rate.png").stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "## Capacity at the SLO" in md and "(plots/latency_vs_rate.png)" in md
    assert f"| **baseline** | continuous | {fmt(cap['capacity_at_slo_rps'])} |" in md


def test_profile_url_sweeps_a_running_server_the_same_way(swept):
    out, _, env = swept
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "recipec.cli", "serve", str(out), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_healthy(port, server)
        result = recipec("profile", str(out), "--url", f"http://127.0.0.1:{port}", "--workload", "rate_rps=auto",
                         "--workload", "sweep_size=3", env=env)
    finally:
        server.kill()
        server.wait()
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert [r.get("sweep") for r in got["runs"]] == ["synchronous", "throughput", "poisson"]
    assert got["runs"][2]["rate_rps"] > 0 and got["runs"][0]["prompt_tokens"]["min"] < got["runs"][0]["prompt_tokens"]["max"]
    assert got["capacity"] == variant_capacity(got["runs"]) and len(got["capacity"]) == 1


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    import http.client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"recipec serve exited {proc.returncode}: {proc.stderr.read()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail("recipec serve did not become healthy")
