"""Profile one variant: serving runs under the recipe's batching policy at each load level, peak
memory, artifact size, and quality against the source model.

Serving runs in a fresh Python process (`python -m recipec.profiler worker IN OUT`) so its peak
memory is the variant's alone, not the builder's torch model and caches. On Linux the kernel's
peak-RSS counter (VmHWM) is reset before each run by writing 5 to /proc/self/clear_refs; where that
is refused, RSS is sampled every 5 ms. Quality is evaluated in the calling process, where the
source model's eval logits already are.

serving_spec is the recipe's resolved `serving` section:
  {threads, batching: {policy, max_batch_size, max_wait_ms, max_tokens_per_step},
   workload: {prompt_tokens, output_tokens, requests, warmup_requests, concurrency, arrival,
              rate_rps, burstiness, seed}, slo: {ttft_ms, tpot_ms, e2e_latency_ms} (optional)}
`policy` may be a list to profile several policies; concurrency and rate_rps may be lists.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .diskspace import tree_bytes
from .engine import CacheOps, Engine, Policy, RealClock
from .loadgen import Workload, run_closed_loop, run_open_loop
from .metrics import ModelCost, Peaks, RequestRecord, StepRecord, latency_samples, summarize_run

_DEFAULT_BATCHING = {"policy": "continuous", "max_batch_size": 8, "max_wait_ms": 5.0, "max_tokens_per_step": 4096}


# ---------- the runs a spec asks for ----------

def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _length(v: Any) -> int | list[int]:
    return [v["min"], v["max"]] if isinstance(v, dict) else int(v)


def serving_plan(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per run: policy settings, load level and workload, in the order they are measured
    (ascending load, so a process's memory peak grows with the run that caused it)."""
    b = {**_DEFAULT_BATCHING, **spec.get("batching", {})}
    w = spec.get("workload", {})
    common = {"max_batch_size": b["max_batch_size"], "max_wait_ms": b["max_wait_ms"],
              "max_tokens_per_step": b["max_tokens_per_step"],
              "prompt_tokens": w.get("prompt_tokens", 128), "output_tokens": w.get("output_tokens", 64),
              "num_requests": w.get("requests", 16), "warmup_requests": w.get("warmup_requests", 2),
              "seed": w.get("seed", 0)}
    if w.get("arrival", "closed") == "closed":
        loads = [{"concurrency": int(c)} for c in sorted(_as_list(w.get("concurrency", [1])))]
    else:
        loads = [{"rate_rps": float(r), "burstiness": float(w.get("burstiness", 1.0)),
                  "max_concurrency": w.get("max_concurrency")} for r in sorted(_as_list(w["rate_rps"]))]
    return [{"batching": p, **common, **load} for p in _as_list(b["policy"]) for load in loads]


def _workload(run: dict[str, Any]) -> Workload:
    return Workload(num_requests=run["num_requests"], prompt_len=_length(run["prompt_tokens"]),
                    output_len=_length(run["output_tokens"]), warmup_requests=run["warmup_requests"],
                    seed=run["seed"], ignore_eos=True)


# ---------- memory ----------

class PeakMemory:
    """Peak memory of this process (CPU) or of the GPU (CUDA) over a `with` block."""

    def __init__(self, device: str):
        self.device, self.peak_mb, self.source = device, None, ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self._hwm = _reset_hwm()
        self._samples: list[float] = []
        if self.device == "cuda":
            self._read, self._interval, self._how = _gpu_reader()
        else:
            self._read, self._interval, self._how = _rss_mb, 0.005, "RSS sampled every 5 ms"
        if self.device == "cuda" or not self._hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self._samples.append(value)
            self._stop.wait(self._interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.device != "cuda" and not self._hwm:
            self._samples.append(self._read())  # a run shorter than one interval still gets a sample
        host = _vm_hwm_mb() if self._hwm else max(self._samples)
        host_how = "VmHWM after reset (/proc/self/clear_refs)" if self._hwm else self._how
        if self.device == "cuda":
            self.peak_mb = max(self._samples) if self._samples else None
            self.source = f"{self._how}; host process peak {host:.0f} MiB ({host_how})"
        else:
            self.peak_mb, self.source = host, f"serving process peak resident set, {host_how}"
        return False


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm_mb() is not None
    except OSError:
        return False


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _gpu_reader() -> tuple[Callable[[], float | None], float, str]:
    """Device-wide memory in use: it sees onnxruntime's allocations, which torch's allocator stats do not."""
    from .hardware import nvidia_smi, torch_cuda

    if torch_cuda():
        import torch

        def used() -> float:
            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2**20
        return used, 0.010, "GPU memory in use (cudaMemGetInfo total - free) sampled every 10 ms"

    def smi() -> float | None:
        v = nvidia_smi("memory.used")
        return float(v) if v else None
    return smi, 0.100, "GPU memory in use (nvidia-smi memory.used) sampled every 100 ms"


# ---------- the runtime ----------

def load_model(variant_dir: Path, device: str, threads: int = 0):
    from . import runtime

    return runtime.load(variant_dir, device, threads=threads or None)


# ---------- the worker (a separate process) ----------

def serve_runs(variant_dir: Path, device: str, runs: Sequence[dict[str, Any]], threads: int = 0,
               log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Load the variant and measure each run; raw timestamps out, metrics are computed by the caller."""
    from .artifact import read_artifact

    vocab = int(read_artifact(variant_dir)["model"]["vocab_size"])
    t0 = time.perf_counter()
    model = load_model(Path(variant_dir), device, threads)
    load_s = time.perf_counter() - t0
    return {"load_seconds": load_s, "runs": measure_runs(model, runs, vocab, device, log=log)}


def measure_runs(model, runs: Sequence[dict[str, Any]], vocab_size: int, device: str = "cpu", clock=None,
                 cache_ops=None, log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    out = []
    for run in runs:
        log(f"serving {run['batching']} " + (f"concurrency {run['concurrency']}" if "concurrency" in run
                                             else f"{run['rate_rps']} req/s"))
        with PeakMemory(device) as mem:
            res = _one_run(model, run, vocab_size, clock or RealClock(), cache_ops or CacheOps())
        out.append({"run": run, "records": [asdict(r) for r in res.records], "steps": [asdict(s) for s in res.steps],
                    "peak_memory_mb": mem.peak_mb, "peak_memory_source": mem.source,
                    # other processes competing for the cores inflate latencies; say how busy the host was
                    "host_load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None})
    return out


def _one_run(model, run: dict[str, Any], vocab: int, clock, cache_ops):
    policy = Policy(run["batching"], run["max_batch_size"], run["max_wait_ms"], run["max_tokens_per_step"])
    engine = Engine(model, policy, clock, cache_ops, eos_token_id=getattr(model, "eos_token_ids", None))
    w = _workload(run)
    if "concurrency" in run:
        return run_closed_loop(engine, w, vocab, run["concurrency"], clock)
    return run_open_loop(engine, w, vocab, run["rate_rps"], clock, run["burstiness"], run.get("max_concurrency"))


def _worker_main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    result = serve_runs(Path(job["variant_dir"]), job["device"], job["runs"], job.get("threads", 0), log)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


def _serve_isolated(variant_dir: Path, device: str, runs: list[dict[str, Any]], threads: int,
                    log: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="recipec-profile-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"variant_dir": str(variant_dir), "device": device, "runs": runs, "threads": threads}))
        root = str(Path(__file__).resolve().parent.parent)  # importable even when recipec is not installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "recipec.profiler", "worker", str(job), str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        tail: list[str] = []
        for line in proc.stderr:  # the worker's progress lines, passed on as they come
            tail = (tail + [line.rstrip()])[-60:]
            log(line.rstrip())
        if proc.wait() != 0:
            raise RuntimeError(f"profiling {variant_dir} failed (exit {proc.returncode}):\n" + "\n".join(tail))
        return json.loads(out.read_text())


# ---------- metrics of a run ----------

def model_cost(art: dict[str, Any]) -> ModelCost:
    """From artifact.json. Embedding tables only Gathers read are excluded from both the bytes a decode
    step reads (it gathers one row) and the FLOP-bearing parameters (a gather multiplies nothing); a tied
    table is also the LM head's matmul, so it stays. MoE: only the routed share of expert weights is
    read and multiplied per token (exact at batch 1, a lower bound for larger batches)."""
    w, kv, m = art["weights"], art["kv_cache"], art["model"]
    dense = w["parameters"] - w["embedding_parameters"]
    active = w["active_parameters"] - w["embedding_parameters"]
    share = active / dense if dense else 1.0
    return ModelCost(weight_bytes_per_step=int(round((w["bytes"] - w["embedding_bytes"]) * share)),
                     active_params=int(active), num_layers=int(kv["num_layers"]),
                     num_heads=int(m["num_attention_heads"]), num_kv_heads=int(kv["num_kv_heads"]),
                     head_dim=int(kv["head_dim"]), kv_bytes_per_elem=np.dtype(kv["dtype"]).itemsize)


def summarize_raw(raw: dict[str, Any], cost: ModelCost | None, peaks: Peaks | None, slo: dict | None) -> dict[str, Any]:
    records = [RequestRecord(**r) for r in raw["records"]]
    steps = [StepRecord(**s) for s in raw["steps"]]
    run = dict(raw["run"])
    for key in ("prompt_tokens", "output_tokens"):
        run[key] = run[key] if not isinstance(run[key], list) else {"min": run[key][0], "max": run[key][1]}
    summary = summarize_run(records, steps, cost, peaks, slo)
    for k in ("mbu", "mbu_step", "mfu", "mfu_prefill", "mfu_decode"):
        summary.setdefault(k, None)
    # the values behind the summary's ttft/tpot/e2e statistics (the report's plots draw them)
    samples = {k: v for k, v in latency_samples(records).items() if k != "itl_ms"}
    return {**run, **summary, "slo": slo, "peak_memory_mb": raw["peak_memory_mb"],
            "peak_memory_source": raw["peak_memory_source"], "host_load_avg_1m": raw.get("host_load_avg_1m"),
            "samples": samples}


# ---------- quality ----------

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logit_quality(tokens: np.ndarray, logits: Iterable[np.ndarray], source_logits: np.ndarray) -> dict[str, float]:
    """tokens [N,T], logits [N,T,V] of the variant and of the source, next-token logits at each position.
    One sequence at a time: float64 log-softmax of a whole eval set of a 32k vocabulary would take GBs."""
    kl = top1 = nll = src_nll = 0.0
    for tok, ours, theirs in zip(np.asarray(tokens), logits, source_logits):
        lq, lp = _log_softmax(ours), _log_softmax(theirs)
        kl += float((np.exp(lp) * (lp - lq)).sum())
        top1 += float((ours.argmax(-1) == theirs.argmax(-1)).sum())
        nll, src_nll = nll + _nll_sum(tok, lq), src_nll + _nll_sum(tok, lp)
    n, n_pred = tokens.size, tokens.shape[0] * (tokens.shape[1] - 1)
    ppl, src_ppl = math.exp(nll / n_pred), math.exp(src_nll / n_pred)
    return {"kl_divergence": kl / n, "top1_agreement": top1 / n, "perplexity": ppl, "source_perplexity": src_ppl,
            "perplexity_ratio": ppl / src_ppl, "eval_tokens": int(n)}


def _nll_sum(tokens: np.ndarray, logprobs: np.ndarray) -> float:
    """Position t predicts token t+1; the last position has nothing to predict."""
    return float(-logprobs[np.arange(len(tokens) - 1), tokens[1:]].sum())


def greedy_agreement(ours: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]]) -> float:
    """Mean over prompts of the fraction of tokens generated before the first divergence: after it the
    two continuations condition on different text, so later matches mean nothing."""
    fractions = []
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        fractions.append(n / max(len(b), 1))
    return float(np.mean(fractions)) if fractions else float("nan")


def greedy_generate(model, prompts: Sequence[Sequence[int]], n_new: int) -> list[list[int]]:
    """Through the same engine that is measured, so the tokens compared are the tokens served."""
    engine = Engine(model, Policy("static", max_batch_size=len(prompts)), RealClock())
    reqs = [engine.submit(p, n_new) for p in prompts]
    while engine.step(flush=True):
        pass
    return [r.tokens for r in reqs]


def evaluate_quality(model, eval_tokens: np.ndarray | None, source_logits: np.ndarray | None,
                     source_greedy: dict[str, Any] | None) -> dict[str, Any]:
    q: dict[str, Any] = {"kl_divergence": None, "top1_agreement": None, "perplexity": None, "reason": None}
    if eval_tokens is not None and source_logits is not None:
        tokens = np.asarray(eval_tokens)
        q.update(logit_quality(tokens, sequence_logits(model, tokens), np.asarray(source_logits)))
    else:
        q["reason"] = "no source eval logits were given"
    if source_greedy:
        ours = greedy_generate(model, source_greedy["prompts"], len(source_greedy["tokens"][0]))
        q["greedy_agreement"] = greedy_agreement(ours, source_greedy["tokens"])
        q["greedy_prompts"] = len(source_greedy["prompts"])
    return q


def sequence_logits(model, tokens: np.ndarray) -> Iterator[np.ndarray]:
    """[T,V] logits at every position (logits_to_keep=0) of each sample in turn: alone, so no padding is
    involved, and lazily, so a large eval set never sits in memory twice."""
    for row in np.asarray(tokens, dtype=np.int64):
        ids = row[None, :]
        logits, _ = model.forward(ids, np.ones_like(ids), model.empty_cache(1), logits_to_keep=0)
        yield logits[0]


def source_reference(model_dir: Path, eval_tokens: np.ndarray, prompts: Sequence[Sequence[int]] = (),
                     n_new: int = 16) -> dict[str, Any]:
    """What profile_variant compares against, computed once from the source (transformers) model:
    {"logits": [N,T,V] float32, "greedy": {"prompts", "tokens"} or None}."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(eval_tokens), dtype=torch.long)
        logits = np.concatenate([model(ids[i:i + 1]).logits.float().numpy() for i in range(len(ids))])
        toks = [_torch_greedy(model, p, n_new) for p in prompts]
    greedy = {"prompts": [list(p) for p in prompts], "tokens": toks} if prompts else None
    return {"logits": logits, "greedy": greedy}


def _torch_greedy(model, prompt: Sequence[int], n_new: int) -> list[int]:
    """Plain argmax, eos not special: generate()'s min_new_tokens would mask eos, which the served
    variant (ignore_eos, no masking) does not, and the two would diverge wherever eos is the argmax."""
    import torch

    ids, out = torch.tensor([list(prompt)]), []
    for _ in range(n_new):
        out.append(int(model(ids).logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], dim=1)
    return out


# ---------- the entry point ----------

def artifact_section(variant_dir: Path, art: dict[str, Any], cost: ModelCost) -> dict[str, Any]:
    size = tree_bytes(variant_dir)
    w = art["weights"]
    return {"path": str(variant_dir), "bytes": int(size), "parameters": int(w["parameters"]),
            "active_parameters": int(w["active_parameters"]), "weight_bytes_per_decode_step": cost.weight_bytes_per_step,
            "bytes_by_dtype": {k: int(v["bytes"]) for k, v in w["by_dtype"].items()}}


def profile_variant(variant_dir: Path | str, serving_spec: dict[str, Any], device: str = "cpu",
                    eval_tokens: np.ndarray | None = None, source_logits: np.ndarray | None = None,
                    source_greedy: dict[str, Any] | None = None, hardware: dict[str, Any] | None = None,
                    log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The report's `variants.<id>` entry. `hardware` is hardware_info()'s dict (its peaks are the MBU
    and MFU denominators; without it they are null)."""
    from .artifact import read_artifact

    variant_dir = Path(variant_dir)
    art = read_artifact(variant_dir)
    runs = serving_plan(serving_spec)
    threads = int(serving_spec.get("threads", 0))
    raw = _serve_isolated(variant_dir, device, runs, threads, log)
    peaks = _peaks(hardware)
    cost = model_cost(art)
    serving = [summarize_raw(r, cost, peaks, serving_spec.get("slo")) for r in raw["runs"]]
    log("evaluating quality")
    model = load_model(variant_dir, device, threads)
    quality = evaluate_quality(model, eval_tokens, source_logits, source_greedy)
    return {"artifact": artifact_section(variant_dir, art, cost), "quality": quality, "serving": serving,
            "load_seconds": raw["load_seconds"]}


def _peaks(hardware: dict[str, Any] | None) -> Peaks | None:
    if not hardware or not hardware.get("peak_bandwidth_gb_s") or not hardware.get("peak_tflops"):
        return None
    return Peaks(hardware["peak_bandwidth_gb_s"], hardware["peak_tflops"])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m recipec.profiler worker JOB.json OUT.json")
