"""`recipec serve` for the tests that drive it with the real clients (the openai package, lm-eval,
prometheus_client): a tiny Llama whose tokenizer has a tiny chat template, out/<name>/ as far as serve
reads it, a server on a free loopback port started and stopped by the test, and recipec's own answers
(greedy tokens, log-softmax over the model's logits) to compare with.

The tokenizer is conftest's word-level one (id i >= 3 is the word "w{i}", 1 and 2 are <s> and </s>), so a
template's roles are words too: user w10, system w11, assistant w12."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from recipec.onnx.logits import log_softmax
from recipec.runtime import lm as runtime
from conftest import free_port

CONTEXT = 4096  # room for a request that holds its batch slots for seconds
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
                 "{% if m['role'] == 'user' %}w10 {% elif m['role'] == 'system' %}w11 {% else %}w12 {% endif %}"
                 "{{ m['content'] }} {{ eos_token }} {% endfor %}{% if add_generation_prompt %}w12{% endif %}")
SERVING = {"device": "cpu", "threads": 1,
           "batching": {"policy": "continuous", "max_batch_size": 4, "max_wait_ms": 5, "max_tokens_per_step": 4096}}


@pytest.fixture(scope="session")
def chat_variant(tmp_path_factory, export_op) -> Path:
    """An exported variant whose tokenizer has CHAT_TEMPLATE (transformers saves it as chat_template.jinja)."""
    from transformers import AutoTokenizer

    from conftest import make_tiny_model

    model = make_tiny_model("llama", tmp_path_factory.mktemp("chat-torch"), tokenizer=True,
                            max_position_embeddings=CONTEXT)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model)
    variant = tmp_path_factory.mktemp("chat-onnx")
    export_op(model, variant)
    assert (variant / "chat_template.jinja").is_file()
    return variant


def make_build(root: Path, variant_dir: Path, serving: dict | None = None, chat_template: bool = True) -> Path:
    """out/<name>/ as far as serve reads it: manifest.json (the resolved serving section) and variants/baseline,
    its tokenizer's chat template removed unless `chat_template` (a base model's tokenizer has none)."""
    target = root / "variants" / "baseline"
    shutil.copytree(variant_dir, target)
    if not chat_template:
        (target / "chat_template.jinja").unlink()
    manifest = {"recipe": {"name": "tiny", "file": "tiny.yaml", "sha256": "0",
                           "resolved": {"serving": serving or SERVING}},
                "variants": {"baseline": {"stage": "baseline"}}, "device": "cpu"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@dataclass
class Server:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)


@contextmanager
def serving(build: Path, log_dir: Path, *args: str) -> Iterator[Server]:
    """`recipec serve build` on a free loopback port until the block ends (then killed)."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    # stderr to a file: nobody reads a pipe while the tests run, and a full one would block the server.
    proc = subprocess.Popen([sys.executable, "-m", "recipec.cli", "serve", str(build), "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"), env={**os.environ})
    try:
        _wait_healthy(Server(port, proc, log))
        yield Server(port, proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_healthy(server: Server, seconds: float = 60) -> None:
    import http.client

    deadline = time.monotonic() + seconds
    while True:
        if server.proc.poll() is not None:
            pytest.fail(f"recipec serve exited {server.proc.returncode}: {server.log.read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"recipec serve did not become healthy within {seconds:g} s")
        time.sleep(0.2)


def wait_for(condition, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def token_logprobs(variant_dir: Path, ids: list[int]) -> np.ndarray:
    """recipec's own log-probabilities of a sequence: log_softmax over the model's logits at every position,
    [len(ids), V]; row i is the distribution of token i + 1."""
    lm = runtime.load(variant_dir, "cpu", threads=1)
    tokens = np.asarray([ids], dtype=np.int64)
    logits, _ = lm.forward(tokens, np.ones_like(tokens), lm.empty_cache(1), logits_to_keep=0)
    return log_softmax(logits[0])


def greedy(variant_dir: Path, ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    return runtime.load(variant_dir, "cpu", threads=1).generate([ids], max_new_tokens,
                                                                ignore_eos=ignore_eos).tokens[0]
